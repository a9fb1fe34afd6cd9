"""Keras-native meta-training: `MetaModel`, a `keras.Model` whose `fit` meta-learns.

`MetaModel` wraps a :class:`~tfmeta.core.learner.MetaLearner` (or builds one around a Keras model) and
an estimator. `fit` runs Keras' own training loop, so every Keras callback works (History,
ProgbarLogger, TensorBoard, ModelCheckpoint, EarlyStopping, CSVLogger, user callbacks); each
training step is one meta-step: the estimator's meta-gradient over a batch of tasks, applied by
the compiled meta-optimizer to the meta-parameters. `evaluate` adapts to each task of its data and
reports the query loss (and accuracy) after and before adaptation. `adapt` returns a plain Keras
model holding the weights adapted to one task.

Data: a task sampler (anything with ``dataset(start)``, e.g. `tfmeta.data.make_sampler(...)`) or a
`tf.data.Dataset` of task batches ``(support_x, support_y, query_x, query_y)``.

Example:
    >>> meta = MetaModel(tfmeta.models.conv4(5), inner_lr=0.4, inner_steps=5)
    >>> meta.compile(optimizer=keras.optimizers.Adam(1e-3), estimator="maml")
    >>> meta.fit(train_sampler, epochs=10, steps_per_epoch=100,
    ...          validation_data=val_sampler, callbacks=[keras.callbacks.CSVLogger("log.csv")])
    >>> adapted = meta.adapt(support_x, support_y)      # a plain keras.Model
    >>> adapted.predict(query_x, batch_size=len(query_x))
"""

from __future__ import annotations

import sys
from typing import Sequence

from tfmeta.core import _backend  # noqa: F401

import keras
import tensorflow as tf

from tfmeta import estimators
from tfmeta.training import evaluation
from tfmeta.core import mamlpp, randomness
from tfmeta.core.learner import MetaLearner
from tfmeta.core.plain import plain_model

FIELDS = ("support_x", "support_y", "query_x", "query_y")
#: Marker in the in-graph assertion message of a non-finite meta-step.
NONFINITE_MARKER = "tfmeta: non-finite meta-step"
#: With on_nonfinite="skip", a run stops after this many meta-steps skipped in a row.
DEFAULT_MAX_SKIPS = 10


def task_dataset(data, *, start: int = 0, steps: int | None = None) -> tf.data.Dataset:
    """Task batches as a `tf.data.Dataset` of dicts keyed by :data:`FIELDS` (Keras' "x").

    `data` is a sampler (``dataset(start)``) or a `tf.data.Dataset` of 4-tuples; `steps` takes
    that many batches (a finite dataset, e.g. for validation).
    """
    if hasattr(data, "dataset"):
        data = data.dataset(start=start)
    elif not isinstance(data, tf.data.Dataset):
        raise TypeError(
            "data must be a task sampler (with .dataset()) or a tf.data.Dataset of "
            f"(support_x, support_y, query_x, query_y) batches, got {type(data).__name__}."
        )
    spec = data.element_spec
    if not isinstance(spec, dict):
        data = data.map(tf.autograph.experimental.do_not_convert(
            lambda *t: dict(zip(FIELDS, t[0] if len(t) == 1 else t))))
    return data.take(steps) if steps is not None else data


def _tasks(data) -> tuple:
    if isinstance(data, tuple) and len(data) in (2, 3) and isinstance(data[0], dict):
        data = data[0]  # Keras' (x, y, sample_weight) with y and sample_weight absent
    if isinstance(data, dict):
        return tuple(data[k] for k in FIELDS)
    return tuple(data)


class MetaModel(keras.Model):
    """A Keras model whose training step is a meta-step (see module docstring).

    Args:
        learner: a MetaLearner, or a Keras model from which one is built with `learner_kwargs`
            (task, inner_optimizer, inner_lr, inner_steps, adapt, batchnorm, meta_sgd, ...).
    """

    def __init__(self, learner, *, name: str = "meta_model", **learner_kwargs):
        super().__init__(name=name)
        if not isinstance(learner, MetaLearner):
            learner = MetaLearner(learner, **learner_kwargs)
        elif learner_kwargs:
            raise ValueError(
                f"learner options {sorted(learner_kwargs)} were given with a ready MetaLearner."
            )
        self.learner = learner
        self.base_model = learner.model
        self.meta_sgd_rates = list(learner.lr_variables)
        self.mamlpp_variables = list(learner.lslr_variables) + list(learner.bn_variables)
        self.meta_network = learner.meta_network
        self.meta_step = keras.Variable(0, dtype="int64", trainable=False, name="meta_step")
        #: random layers (Dropout): meta-step k draws its masks from fold_in(this seed, k), so a
        #: run is reproducible from the model's seed and a resumed run draws the same masks.
        self._random_seed = learner.fmodel.initial_seed()
        self.estimator = None
        self.clip_norm = None
        self.on_nonfinite = "stop"
        self.max_skips = DEFAULT_MAX_SKIPS
        #: meta-steps skipped in a row (on_nonfinite="skip"); reset by every applied step.
        self.consecutive_skips = keras.Variable(0, dtype="int64", trainable=False, name="consecutive_skips")
        #: how many times the meta-step was traced (a retrace after warm-up is a bug: see bench soak).
        self.trace_count = 0
        self._adapt_fns = {}
        #: the inner loop's effect at the initialization, measured by `fit` at meta-step 0.
        self.inner_loop_report = None
        self.built = True

    # -- Keras plumbing --------------------------------------------------------------------------
    def call(self, x, training=False):
        """Predictions at the meta-learned parameters (BatchNorm as the learner's policy)."""
        fmodel = self.learner.fmodel
        return fmodel(fmodel.parameters(), x)

    def compile(self, optimizer="adam", estimator="maml", *, clip_norm: float | None = None,
                on_nonfinite: str = "stop", max_skips: int = DEFAULT_MAX_SKIPS, **kwargs):
        """Configure meta-training.

        Args:
            optimizer: the meta-optimizer (a Keras optimizer or its name).
            estimator: an Estimator or its name ("maml", "fomaml", "reptile", ...).
            clip_norm: clip the meta-gradient to this global norm (None: no clipping).
            on_nonfinite: what a NaN/Inf meta-loss or meta-gradient does: "stop" (the step fails
                in the graph before anything is applied; `MetaTrainer` turns it into
                `NonFiniteMetaStepError`) or "skip" (no update that step, a message on stderr).
                Either way an update that would make a meta-parameter or the optimizer's state
                NaN/Inf (e.g. Adam's second moment overflowing) is undone.
            max_skips: with "skip", the step fails (`NonFiniteMetaStepError`) once more than this
                many meta-steps in a row were skipped: a run that cannot make a finite step stops.
        """
        kwargs.setdefault("jit_compile", False)  # XLA never finished compiling MAML on CPU
        super().compile(optimizer=optimizer, **kwargs)
        if isinstance(estimator, str):
            estimator = estimators.get(estimator)
        if not isinstance(estimator, estimators.Estimator):
            raise TypeError(f"estimator must be a name or an Estimator, got {type(estimator).__name__}.")
        estimator.check_remat(self.learner)
        estimator.check_statistics(self.learner)
        estimator.check(self.learner)
        estimator.bind_meta_step(self.meta_step)
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm={clip_norm!r} is not valid: expected a number > 0.")
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is not valid: expected 'stop' or 'skip'.")
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise ValueError(f"max_skips={max_skips!r} is not valid: expected an integer >= 0.")
        self.estimator = estimator
        self.max_skips = max_skips
        self.clip_norm = clip_norm
        self.on_nonfinite = on_nonfinite
        self.optimizer.build(self.learner.meta_variables)
        names = ("loss",) + tuple(estimator.reported_metric_names(self.learner))
        test_names = ("loss", "loss_before") + sum(
            ((m, f"{m}_before") for m in self.learner.metric_names), ()
        )
        self._trackers = {n: keras.metrics.Mean(name=n) for n in dict.fromkeys(names + test_names)}
        self._train_names, self._test_names = names, test_names

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # MetaModel and its optimizer are built at construction/compile. Keras' symbolic build
        # would all-reduce a data batch across replicas first, which fails for dict batches under
        # MultiWorkerMirroredStrategy; there is nothing for it to build.
        return

    @property
    def metrics(self):
        return list(getattr(self, "_trackers", {}).values())

    def _log(self, names: Sequence[str], values: dict, keep=None) -> dict:
        """Update the running means (`keep` False: a skipped step, not counted) and return them."""
        for n in names:
            if keep is None:
                self._trackers[n].update_state(values[n])
            else:
                value = tf.where(keep, tf.cast(values[n], tf.float32), 0.0)
                self._trackers[n].update_state(value, sample_weight=tf.cast(keep, tf.float32))
        logs = {n: self._trackers[n].result() for n in names}
        if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
            # Keras reduces multi-worker logs with reduce("MEAN", axis=0), which needs a batch
            # axis; the values are already global (metric states are synchronised).
            logs = {n: tf.reshape(v, [1]) for n, v in logs.items()}
        return logs

    # -- steps -----------------------------------------------------------------------------------
    def train_step(self, data):
        """One meta-step: estimator meta-gradient -> checks -> meta-optimizer update."""
        if self.estimator is None:
            raise RuntimeError("MetaModel must be compiled (compile(optimizer, estimator)) before fit.")
        self.trace_count += 1  # Python side effect: runs once per trace, not per step
        tasks = _tasks(data)
        if self.learner.fmodel.random_states:
            seed = randomness.fold_in(self._random_seed, self.meta_step)
            with randomness.scope(seed):
                result = self.estimator.meta_gradient(self.learner, tasks)
        else:
            result = self.estimator.meta_gradient(self.learner, tasks)
        # Under a tf.distribute strategy each replica holds the mean over its own tasks and the
        # optimizer sums over replicas: dividing by the replica count gives the global mean.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        grads = [g / replicas for g in result.grads] if replicas > 1 else list(result.grads)
        finite = tf.math.is_finite(result.loss)
        for g in grads:
            finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(g)))
        if self.clip_norm is not None:
            grads, _ = tf.clip_by_global_norm(grads, self.clip_norm)
        message = f"{NONFINITE_MARKER}: estimator {self.estimator.name!r} gave a non-finite meta-loss or meta-gradient at meta-step"
        # A finite but huge meta-gradient can still make the meta-optimizer's update (or its own
        # state, e.g. Adam's second moment overflowing to inf) non-finite: snapshot the state,
        # update, and put the snapshot back unless every updated value is finite.
        state = list(self.learner.meta_variables) + list(self.optimizer.variables)
        snapshot = [tf.identity(_tf_variable(v)) for v in state]
        if self.on_nonfinite == "stop":
            check = tf.debugging.Assert(finite, [message, self.meta_step + 1, "loss", result.loss])
            with tf.control_dependencies([check] + snapshot):
                grads = [tf.identity(g) for g in grads]
            self.optimizer.apply(grads, self.learner.meta_variables)
            applied = tf.constant(True)
        else:
            def update():
                self.optimizer.apply(grads, self.learner.meta_variables)
                return tf.constant(True)

            def skip():
                tf.print(message, self.meta_step + 1, "loss", result.loss, "(skipped)",
                         output_stream=sys.stderr)
                return tf.constant(False)

            with tf.control_dependencies(snapshot):
                finite = tf.identity(finite)
            applied = tf.cond(finite, update, skip)
        with tf.control_dependencies([applied]):
            updated = [tf.identity(_tf_variable(v)) for v in state]
        sound = tf.constant(True)
        for v in updated:
            if v.dtype.is_floating:
                sound = tf.logical_and(sound, tf.reduce_all(tf.math.is_finite(v)))
        _assign_all(state, [tf.where(sound, u, s) for u, s in zip(updated, snapshot)])
        # read back after the restore, so that a failing check below cannot pre-empt it
        restored = [tf.identity(_tf_variable(v)) for v in state]
        bad_update = f"{NONFINITE_MARKER}: the meta-optimizer update at meta-step"
        if self.on_nonfinite == "stop":
            with tf.control_dependencies(restored):
                sound = tf.identity(sound)
            check = tf.debugging.Assert(sound, [bad_update, self.meta_step + 1,
                                                "made the meta-parameters or optimizer state non-finite; "
                                                "it was undone"])
            with tf.control_dependencies([check]):
                self.meta_step.assign_add(1)  # nothing changes unless both checks passed
            keep = None
        else:
            tf.cond(tf.logical_and(finite, tf.logical_not(sound)),
                    lambda: tf.print(bad_update, self.meta_step + 1, "made the meta-parameters or optimizer "
                                     "state non-finite (undone, skipped)", output_stream=sys.stderr),
                    lambda: tf.no_op())
            keep = tf.logical_and(finite, sound)
            # the task stream moves on past a bad batch; a run that cannot make a finite step stops
            with tf.control_dependencies(restored):
                keep = tf.identity(keep)
            skips = tf.where(keep, tf.constant(0, self.consecutive_skips.dtype), self.consecutive_skips + 1)
            self.consecutive_skips.assign(skips)
            limit = tf.debugging.Assert(
                skips <= self.max_skips,
                [f"{NONFINITE_MARKER}: more than max_skips={self.max_skips} meta-steps in a row were "
                 "skipped, the last at meta-step", self.meta_step + 1])
            with tf.control_dependencies([limit]):
                self.meta_step.assign_add(1)
        return self._log(self._train_names, {"loss": result.loss, **result.metrics}, keep)

    def test_step(self, data):
        """Adapt to every task of the batch; query loss/accuracy after and before adaptation."""
        rows = tf.reduce_mean(evaluation.batch_scores(self.learner, _tasks(data), estimator=self.estimator), 0)
        values = {}
        for k, name in enumerate(evaluation.score_names(self.learner)):
            values[name[: -len("_after")] if name.endswith("_after") else name] = rows[k]
        return self._log(self._test_names, values)

    # -- data and adaptation ---------------------------------------------------------------------
    def fit(self, x=None, *, epochs=1, steps_per_epoch=None, validation_data=None,
            validation_steps=None, initial_step: int | None = None, check_inner_loop: bool = True,
            **kwargs):
        """Keras `fit` on task batches; a sampler's stream starts at the meta-step reached.

        `steps_per_epoch` is required for endless samplers (default 100); `validation_data` may
        be a sampler (then `validation_steps` batches, default 10, the same every epoch).
        With `check_inner_loop`, a run that starts at meta-step 0 first measures the inner loop's
        effect at the initialization on the first task batch (`MetaLearner.check_inner_loop`:
        kept in `inner_loop_report`, an `InnerLoopWarning` when the inner loop barely moves
        the model).
        """
        start = int(self.meta_step.numpy()) if initial_step is None else initial_step
        if check_inner_loop and start == 0 and x is not None:
            first = next(iter(task_dataset(x, start=start)))
            self.inner_loop_report = self.learner.check_inner_loop(_tasks(first))
        if hasattr(x, "dataset") and steps_per_epoch is None:
            steps_per_epoch = 100
        if validation_data is not None and hasattr(validation_data, "dataset"):
            validation_steps = validation_steps or 10
            validation_data = task_dataset(validation_data, steps=validation_steps)
        kwargs.setdefault("shuffle", False)  # a task stream is already random and resumable
        return super().fit(
            task_dataset(x, start=start), epochs=epochs, steps_per_epoch=steps_per_epoch,
            validation_data=validation_data, validation_steps=validation_steps, **kwargs,
        )

    def evaluate(self, x=None, *, steps=None, return_dict=True, **kwargs):
        """Keras `evaluate` on task batches (a sampler needs `steps`, default 10).

        Returns a dict (``return_dict=False``: Keras' list): the query ``loss`` and ``accuracy``
        after adaptation and ``loss_before``/``accuracy_before`` at the initialization, averaged.
        """
        if hasattr(x, "dataset"):
            steps = steps or 10
            x = task_dataset(x, steps=steps)
        elif isinstance(x, tf.data.Dataset):
            x = task_dataset(x)
        return super().evaluate(x, steps=steps, return_dict=return_dict, **kwargs)

    def adapt(self, support_x, support_y, steps: int | None = None, *,
              statistics: str = "batch") -> keras.Model:
        """A plain Keras model (a copy of the base model) holding the weights adapted to one task.

        It predicts as the learner does (:func:`tfmeta.core.plain.plain_model`): under the default
        BatchNorm policy "batch" its BatchNorm layers normalise with the statistics of the batch
        they are given, also in `predict`, so ``predict(query_x, batch_size=len(query_x))`` gives
        the logits of the SavedModel's ``adapt_and_predict``. It saves to ``.keras`` and loads
        with plain Keras.

        ``statistics="running"`` (a learner with ``per_step_bn_stats=True``, MAML++'s BNRS): the
        copy keeps stock BatchNorm layers holding the running statistics of the last inner step,
        so that `predict` normalises each example alone (non-transductive: any batch size, one
        example included).

        Example:
            >>> adapted = meta.adapt(support_x, support_y)
            >>> logits = adapted.predict(query_x, batch_size=len(query_x))
        """
        learner = self.learner
        if statistics not in ("batch", "running"):
            raise ValueError(f"statistics={statistics!r} is not valid: expected 'batch' or 'running'.")
        if statistics == "running" and not learner.bn_statistics:
            raise ValueError("statistics='running' needs per-step running statistics: expected a learner "
                             "built with per_step_bn_stats=True (--per-step-bn-stats).")
        sx = tf.convert_to_tensor(support_x, learner.dtype)
        sy = tf.convert_to_tensor(support_y)
        if sx.shape.rank is None or sy.shape.rank is None or sx.shape[0] != sy.shape[0]:
            raise ValueError(
                f"support_x {sx.shape} and support_y {sy.shape} must hold the same number of examples."
            )
        if steps not in self._adapt_fns:  # one compiled adaptation per step count, not per call
            self._adapt_fns[steps] = _adapt_fn(learner, steps)
        params = self._adapt_fns[steps](sx, sy)
        if statistics == "running":
            done = learner.inner_steps if steps is None else steps
            return plain_model(self.base_model, params, statistics=mamlpp.statistics_at(learner, done))
        return plain_model(self.base_model, params, batchnorm=learner.fmodel.batchnorm)


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


def _assign_all(variables, values) -> None:
    """Assign `values` to `variables` from a train step, under any tf.distribute strategy (the
    same merge-call path as Keras' optimizer updates)."""

    def assign(distribution, pairs):
        for variable, value in pairs:
            distribution.extended.update(variable, lambda v, x: v.assign(x), args=(value,), group=False)

    pairs = [(_tf_variable(v), value) for v, value in zip(variables, values)]
    tf.__internal__.distribute.interim.maybe_merge_call(assign, tf.distribute.get_strategy(), pairs)


def _adapt_fn(learner: MetaLearner, steps: int | None):
    @tf.function(reduce_retracing=True, autograph=False)
    def adapt(sx, sy):
        meta = learner.unflatten(learner.meta_values())
        return learner.adapt(meta, sx, sy, second_order=False, steps=steps)

    return adapt
