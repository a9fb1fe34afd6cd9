"""Meta-training runs: a `MetaModel` plus checkpoints, resume, time budget and non-finite guard.

:class:`MetaTrainer` is the one training loop behind `tfmeta train` and the Python API: it drives
:class:`~tfmeta.training.keras_model.MetaModel` (Keras' own `fit`, so callbacks work) and adds what a run
needs around it. Checkpoints (`tf.train.CheckpointManager`) hold the meta-parameters, the
meta-optimizer state, the meta-step counter (which is also the position of the deterministic
task sampler) and any estimator state, so a resumed run sees the same tasks and reaches the same
parameters as an uninterrupted one. A NaN or Inf meta-loss or meta-gradient is caught inside the
compiled step before anything is applied, and the run stops with
:class:`NonFiniteMetaStepError`; the checkpoint on disk stays the last good one.

Example:
    >>> learner = MetaLearner(tfmeta.models.mlp(), task="regression", inner_lr=0.01, inner_steps=1)
    >>> trainer = MetaTrainer(learner, "maml", keras.optimizers.Adam(1e-3), checkpoint_dir="runs/x/ckpt")
    >>> history = trainer.fit(SinusoidTasks(shots=5, query=10, meta_batch=25), iterations=1000)
"""

from __future__ import annotations

import glob
import os
import re
import time
from typing import Callable

from tfmeta.core import _backend  # noqa: F401

import keras
import tensorflow as tf

from tfmeta.training.keras_model import DEFAULT_MAX_SKIPS, FIELDS, NONFINITE_MARKER, MetaModel
from tfmeta.core.learner import MetaLearner


class NonFiniteMetaStepError(FloatingPointError):
    """A meta-step produced a NaN or Inf meta-loss, meta-gradient or update; nothing was applied."""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit the run; names the file (nothing was changed)."""


_CKPT = re.compile(r"^ckpt-(\d+)\.")


def checkpoint_numbers(directory: str, *, indexed: bool = False) -> list[int]:
    """Checkpoint numbers with files in `directory` (only those with an ``.index`` if `indexed`), sorted."""
    numbers = set()
    for path in glob.glob(os.path.join(glob.escape(directory), "ckpt-*")):
        match = _CKPT.match(os.path.basename(path))
        if match and (not indexed or path.endswith(".index")):
            numbers.add(int(match.group(1)))
    return sorted(numbers)


def checkpoint_problem(prefix: str) -> str | None:
    """Why the checkpoint at `prefix` (e.g. ``run/checkpoints/ckpt-40``) cannot be restored, naming
    the file, or None when its index and every data file read back completely."""
    index = prefix + ".index"
    if not os.path.isfile(index):
        return f"its index file {index!r} is missing"
    try:
        reader = tf.train.load_checkpoint(prefix)
    except Exception as err:  # noqa: BLE001 - TensorFlow raises several kinds for a bad file
        return f"its index file {index!r} is corrupt ({_first_line(err)})"
    data = sorted(glob.glob(glob.escape(prefix) + ".data-*"))
    shards = re.search(r"-of-(\d+)$", data[0]) if data else None
    expected = [f"{prefix}.data-{i:05d}-of-{int(shards.group(1)):05d}" for i in range(int(shards.group(1)))] \
        if shards else [f"{prefix}.data-00000-of-00001"]
    missing = [f for f in expected if not os.path.isfile(f)]
    if missing:
        return f"its data file {missing[0]!r} is missing"
    try:
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
    except Exception as err:  # noqa: BLE001
        where = expected[0] if len(expected) == 1 else f"{prefix}.data-*"
        return f"its data file {where!r} is corrupt or truncated ({_first_line(err)})"
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


class _EveryStep(keras.callbacks.Callback):
    """Per-step bookkeeping: history, user hook, periodic checkpoints, time budget."""

    def __init__(self, trainer: "MetaTrainer", history: list, on_step, time_budget):
        super().__init__()
        self.trainer, self.history, self.on_step = trainer, history, on_step
        self.time_budget = time_budget
        self.began = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        # Runs before later callbacks (CSVLogger, TensorBoard): curves against time and steps.
        if logs is not None:
            logs["meta_step"] = float(self.trainer.step.numpy())
            logs["wall_seconds"] = time.monotonic() - self.began

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.trainer.step.numpy())
        entry = {k: float(v) for k, v in (logs or {}).items()}
        entry["step"] = step
        self.history.append(entry)
        if self.on_step is not None:
            self.on_step(step, entry)
        if step % self.trainer.checkpoint_every == 0:
            self.trainer.save()
        if self.time_budget is not None and time.monotonic() - self.began > self.time_budget:
            self.model.stop_training = True
            self.trainer.stopped_by_time_budget = True


class _Progress(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, except that a run stopped early ends its bar where it stopped
    (Keras' own bar jumps to the epoch's end)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.total_epochs = epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total_epochs  # "Epoch 18/20" also when one `fit` runs epochs 18..18

    def _finalize_progbar(self, logs):
        if self.model is not None and self.model.stop_training and self.progbar is not None:
            self.progbar.update(self.seen, list((logs or {}).items()), finalize=True)
            return
        super()._finalize_progbar(logs)


class MetaTrainer:
    """Meta-train a :class:`MetaLearner` with an estimator and a Keras meta-optimizer.

    Args:
        learner: the MetaLearner.
        estimator: an Estimator or its name ("maml", "fomaml", "reptile", ...).
        meta_optimizer: a Keras optimizer (default Adam(1e-3)).
        checkpoint_dir: where checkpoints go (None: no checkpoints).
        checkpoint_every: meta-steps between checkpoints.
        max_checkpoints: checkpoints kept on disk.
        clip_norm: clip the meta-gradient to this global norm (None: no clipping).
        on_nonfinite: "stop" (raise NonFiniteMetaStepError) or "skip" (leave that step's
            update out, print a message naming the step, and go on). An update that would make a
            meta-parameter or the optimizer's state non-finite counts as non-finite too.
        max_skips: with "skip", stop (NonFiniteMetaStepError) after more than this many
            meta-steps in a row were skipped.
    """

    def __init__(
        self,
        learner: MetaLearner,
        estimator="maml",
        meta_optimizer: keras.optimizers.Optimizer | None = None,
        *,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 100,
        max_checkpoints: int = 3,
        clip_norm: float | None = None,
        on_nonfinite: str = "stop",
        max_skips: int = DEFAULT_MAX_SKIPS,
    ):
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every!r} is not valid: expected an integer >= 1.")
        self.meta_model = MetaModel(learner)
        self.meta_model.compile(
            optimizer=meta_optimizer or keras.optimizers.Adam(1e-3), estimator=estimator,
            clip_norm=clip_norm, on_nonfinite=on_nonfinite, max_skips=max_skips,
        )
        self.learner = learner
        self.estimator = self.meta_model.estimator
        self.meta_optimizer = self.meta_model.optimizer
        self.step = self.meta_model.meta_step
        self.checkpoint_every = checkpoint_every
        #: True after a `fit` that `time_budget` stopped before `iterations`.
        self.stopped_by_time_budget = False
        self.start_step = 0
        self.manager = None
        self.checkpoint_dir = checkpoint_dir
        #: a note on how restore() chose its checkpoint when that was not the usual way (or None).
        self.restore_note = None
        #: the checkpoint prefix the last restore() loaded (None: none yet).
        self.restored_from = None
        if checkpoint_dir is not None:
            parts = dict(
                meta_variables=list(learner.meta_variables), optimizer=self.meta_optimizer, step=self.step
            )
            if self.estimator.state is not None:
                parts["estimator"] = self.estimator.state
            if learner.bn_statistics:  # MAML++'s per-step running statistics (not meta-parameters)
                parts["bn_statistics"] = [v for pair in learner.bn_statistics for v in pair]
                parts["bn_statistics_count"] = learner.bn_statistics_count
            ckpt = tf.train.Checkpoint(**parts)
            self.manager = tf.train.CheckpointManager(ckpt, checkpoint_dir, max_checkpoints)

    def _non_finite(self, err: Exception) -> NonFiniteMetaStepError:
        where = ""
        if self.manager is not None and self.manager.latest_checkpoint:
            where = f" The last good checkpoint is {self.manager.latest_checkpoint}."
        text, step = str(err), int(self.step.numpy()) + 1
        if "in a row were skipped" in text:
            return NonFiniteMetaStepError(
                f"meta-step {step}: more than max_skips={self.meta_model.max_skips} meta-steps in a row "
                f"were skipped as non-finite (estimator {self.estimator.name!r}); the meta-parameters are "
                f"those from before the skipped steps.{where} Lower --meta-lr or --inner-lr, or set clip_norm."
            )
        if "the meta-optimizer update at" in text:
            return NonFiniteMetaStepError(
                f"meta-step {step}: the meta-optimizer's update made the meta-parameters or its state "
                f"non-finite (estimator {self.estimator.name!r}); it was undone.{where} "
                "Lower --meta-lr or --inner-lr, or set clip_norm."
            )
        return NonFiniteMetaStepError(
            f"meta-step {step}: estimator {self.estimator.name!r} produced a "
            f"non-finite meta-loss or meta-gradient; nothing was applied.{where} "
            "Lower --meta-lr or --inner-lr, or set clip_norm."
        )

    def train_step(self, tasks) -> dict[str, float]:
        """One meta-update on a batch of tasks; returns this step's meta-loss and metrics.

        Raises NonFiniteMetaStepError (leaving the meta-parameters untouched) when the meta-loss
        or a meta-gradient is NaN or Inf.
        """
        tasks = tuple(tf.convert_to_tensor(t) for t in tasks)
        self.learner.check_tasks(tasks)
        self.meta_model.reset_metrics()
        try:
            logs = self.meta_model.train_on_batch(dict(zip(FIELDS, tasks)), return_dict=True)
        except tf.errors.InvalidArgumentError as err:
            if NONFINITE_MARKER in str(err):
                raise self._non_finite(err) from None
            raise
        return {k: float(v) for k, v in logs.items()}

    @property
    def inner_loop_report(self) -> dict | None:
        """The inner loop's effect at the initialization, measured when a fresh run starts."""
        return self.meta_model.inner_loop_report

    def restore(self, checkpoint: str | None = None) -> int:
        """Restore a checkpoint; returns the meta-step reached (0: nothing to restore).

        `checkpoint` is a path prefix or a name in the checkpoint directory ("ckpt-20"); by
        default the latest committed one (the ``checkpoint`` index file's), or, when that index
        file is missing, the newest checkpoint on disk if it is intact. Every tensor is read back
        before anything is restored: a missing, truncated or corrupt file raises CheckpointError
        naming the file and any older intact checkpoint. Nothing on disk is changed.
        """
        self.restore_note = None
        if self.manager is None:
            if checkpoint is not None:
                raise CheckpointError(f"checkpoint={checkpoint!r} was given but there is no checkpoint_dir.")
            return int(self.step.numpy())
        directory = self.checkpoint_dir
        if checkpoint is not None:
            prefix = checkpoint
            if not os.path.exists(prefix + ".index") and os.path.exists(os.path.join(directory, checkpoint + ".index")):
                prefix = os.path.join(directory, checkpoint)
            problem = checkpoint_problem(prefix)
            if problem:
                raise CheckpointError(f"checkpoint {prefix!r} cannot be used: {problem}.")
        else:
            prefix = self.manager.latest_checkpoint
            if prefix is None:
                numbers = checkpoint_numbers(directory)
                if not numbers:
                    return int(self.step.numpy())
                indexed = checkpoint_numbers(directory, indexed=True)
                if not indexed:
                    raise CheckpointError(
                        f"{directory!r} holds checkpoint files (ckpt-{numbers[-1]}.*) but no complete "
                        "checkpoint (no .index file) and no 'checkpoint' index file; nothing was changed.")
                prefix = os.path.join(directory, f"ckpt-{indexed[-1]}")
                if checkpoint_problem(prefix) is None:
                    self.restore_note = (
                        f"the checkpoint index file {os.path.join(directory, 'checkpoint')!r} is missing: "
                        f"restored {prefix!r}, the newest intact checkpoint on disk.")
            problem = checkpoint_problem(prefix)
            if problem:
                older = [n for n in checkpoint_numbers(directory, indexed=True)
                         if n < int(_CKPT.match(os.path.basename(prefix) + ".").group(1))
                         and checkpoint_problem(os.path.join(directory, f"ckpt-{n}")) is None]
                offer = (f" An older intact checkpoint exists: pass --checkpoint ckpt-{older[-1]} "
                         f"(MetaTrainer.restore(checkpoint='ckpt-{older[-1]}')) to use it."
                         if older else " No older intact checkpoint exists.")
                raise CheckpointError(f"checkpoint {prefix!r} cannot be restored: {problem}.{offer}")
        try:
            self.manager.checkpoint.restore(prefix).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as err:
            raise CheckpointError(
                f"checkpoint {prefix!r} does not fit this run's model, optimizer or estimator "
                f"({_first_line(err)}).") from None
        self.restored_from = prefix
        return int(self.step.numpy())

    def save(self) -> str | None:
        """Checkpoint the current state; refuses (NonFiniteMetaStepError) non-finite values."""
        if not self.manager:
            return None
        for variable in list(self.learner.meta_variables) + list(self.meta_optimizer.variables):
            value = variable.value if isinstance(variable, keras.Variable) else variable
            if value.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(value))):
                raise NonFiniteMetaStepError(
                    f"meta-step {int(self.step.numpy())}: {getattr(variable, 'path', variable.name)} "
                    "is not finite; it was not checkpointed. The last good checkpoint is "
                    f"{self.manager.latest_checkpoint}.")
        return self.manager.save(checkpoint_number=int(self.step.numpy()))

    def fit(
        self,
        sampler,
        iterations: int,
        *,
        time_budget: float | None = None,
        progress: bool = True,
        on_step: Callable[[int, dict], None] | None = None,
        callbacks: list | None = None,
        validation_data=None,
        validation_steps: int | None = None,
        steps_per_epoch: int | None = None,
        checkpoint: str | None = None,
        check_inner_loop: bool = True,
    ) -> list[dict]:
        """Meta-train until `iterations` meta-steps are done (or `time_budget` seconds pass).

        Resumes from the latest checkpoint (or `checkpoint`, see `restore`): the task stream
        continues at the saved step. Epochs
        (validation, epoch logs) end at multiples of `steps_per_epoch` counted from step 0, so a
        resumed run first finishes the epoch it was stopped in. Logs are Keras' running means over
        the current epoch. Returns one log dict per meta-step; `stopped_by_time_budget` says
        whether `time_budget` ended it early. A fresh run first measures the inner loop's effect
        at the initialization (see `MetaModel.fit`; the result is `inner_loop_report`, with an
        `InnerLoopWarning` when the inner loop barely moves the model).
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations={iterations!r} is not valid: expected an integer >= 1.")
        start = self.restore(checkpoint)
        self.meta_model.consecutive_skips.assign(0)  # max_skips counts within one fit
        #: the meta-step this `fit` started from (> 0 when it resumed a run).
        self.start_step = start
        self.stopped_by_time_budget = False
        history: list[dict] = []
        if iterations - start <= 0:
            return history
        per_epoch = steps_per_epoch or iterations
        every = _EveryStep(self, history, on_step, time_budget)
        callbacks = [every] + list(callbacks or [])
        if progress:
            callbacks.append(_Progress(-(-iterations // per_epoch)))
        step = start
        self.meta_model.stop_training = False
        try:
            # One Keras `fit` per run of equally long epochs: the epoch holding `start` (partial
            # when resuming), the full epochs, and a shorter last epoch if `iterations` is not a
            # multiple of `per_epoch`. Each takes exactly the steps it needs from the endless
            # task stream, so Keras never runs out of data.
            while step < iterations and not (self.stopped_by_time_budget or self.meta_model.stop_training):
                epoch = step // per_epoch
                if step % per_epoch or iterations < (epoch + 1) * per_epoch:
                    length, last = min((epoch + 1) * per_epoch, iterations) - step, epoch + 1
                else:
                    last = iterations // per_epoch
                    length = per_epoch
                self.meta_model.fit(
                    sampler, epochs=last, initial_epoch=epoch, steps_per_epoch=length, initial_step=step,
                    validation_data=validation_data, validation_steps=validation_steps,
                    verbose=1 if progress else 0, callbacks=callbacks,
                    check_inner_loop=check_inner_loop,
                )
                if int(self.step.numpy()) == step:  # nothing ran (e.g. a callback stopped it at once)
                    break
                step = int(self.step.numpy())
        except tf.errors.InvalidArgumentError as err:
            if NONFINITE_MARKER in str(err):
                raise self._non_finite(err) from None
            raise
        if history and history[-1]["step"] % self.checkpoint_every:
            self.save()
        return history
