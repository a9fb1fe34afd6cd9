"""What is meta-learned: a Keras model, its adaptation procedure, losses and meta-parameters.

A :class:`MetaLearner` holds everything an estimator needs about one meta-learning problem:

- the model, run functionally (:class:`~tfmeta.core.functional.FunctionalModel`), and which of its
  weights adapt in the inner loop;
- the inner optimizer and number of inner steps T (the adaptation U of
  Sun's overview, Sec. 3);
- the task loss (cross-entropy on logits for classification, mean squared error for regression),
  or user losses;
- the **meta-parameters**, as :class:`MetaParams`: the initialization theta (the model's own
  trainable variables, so the learned initialization *is* the model), optional per-parameter
  learning rates (Meta-SGD), and optional meta-network weights that enter the inner loss
  (Kim et al. 2020, Sec. 2.2: g_t = grad_phi L_t(phi_t, theta)).

Example (meta-network weighting the inner loss)::

    weights = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="softplus")])

    def inner_loss(learner, params, meta, x, y):
        per_example = tf.square(learner.fmodel(params, x) - y)
        w, _ = weights.stateless_call(meta.net, [], x)
        return tf.reduce_mean(w * per_example)

    learner = MetaLearner(model, task="regression", meta_network=weights, inner_loss=inner_loss)

Size: one class, :class:`MetaLearner`, with its meta-parameters (initialization, Meta-SGD and
MAML++ rates, per-step BatchNorm, meta-network), adaptation and losses, which every estimator
reads; the inner loop, optimizers and MAML++ pieces it uses are modules of their own.

References:
    Finn, C., Abbeel, P., Levine, S. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks." ICML 2017. arXiv:1703.03400.

    Kim, J.-H., Park, J., Choi, Y. "Multi-step Estimation for Gradient-based Meta-learning."
    2020. arXiv:2004.05439.

    Sun, J. "Overview of Meta Learning: Learning to Learn." (Sun's overview: MAML, first-order
    MAML, Reptile, iMAML and Auto-Meta side by side; no arXiv identifier.)
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Sequence

from tfmeta.core import _backend  # noqa: F401

import keras
import numpy as np
import tensorflow as tf

from tfmeta.core import checks, inner_loop, inner_optimizers, mamlpp
from tfmeta.core.functional import FunctionalModel

TASK_TYPES = ("classification", "regression")

#: choices of `remat` (CLI --remat): no rematerialisation, a window of about sqrt(T) steps, or K.
REMAT_HELP = ("recompute the inner loop's activations in the backward pass instead of storing them "
              "(exact second order, memory ~ sqrt(T) or flat, one more inner forward pass): none, sqrt "
              "(a checkpoint every ~sqrt(T) inner steps) or every:K (every K steps, 1 <= K <= T)")


def parse_remat(value):
    """`remat` as given (None, "none", "sqrt", "every:K", or an int K) -> None, "sqrt" or K.

    Raises ValueError naming ``remat`` (``--remat``) for anything else or K < 1.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"remat={value!r} (--remat) is not valid: expected none, sqrt or every:K.")
    if isinstance(value, int):
        k = value
    else:
        text = str(value).strip().lower()
        if text == "none":
            return None
        if text == "sqrt":
            return "sqrt"
        k = None
        if text.startswith("every:"):
            try:
                k = int(text[len("every:"):])
            except ValueError:
                k = None
        if k is None:
            raise ValueError(
                f"remat={value!r} (--remat) is not valid: expected none, sqrt or every:K with K an "
                "integer (inner steps between checkpoints)."
            )
    if k < 1:
        raise ValueError(f"remat={value!r} (--remat) is not valid: expected every:K with K >= 1.")
    return k


def remat_window(remat, steps: int, reuse_window: int = 1):
    """The checkpoint window K for T = `steps` (None: no rematerialisation).

    "sqrt" picks K about sqrt(T) (a multiple of `reuse_window`, about sqrt(T / n) reuse windows);
    an integer K is used as is, at most T.
    """
    if remat is None or steps == 0:
        return None
    if remat == "sqrt":
        units = -(-steps // reuse_window)
        return min(reuse_window * max(1, round(math.sqrt(units))), steps)
    return min(remat, steps)


#: Smallest relative drop of the support loss over the T inner steps at the initialization below
#: which :meth:`MetaLearner.check_inner_loop` warns (measurements: docs/initialization.md).
INNER_LOOP_MIN_DROP = 0.01
#: Smallest median relative change ||phi_T - theta|| / ||theta|| of the adapted kernels of a model
#: with normalization layers below which it warns (docs/initialization.md).
INNER_LOOP_MIN_CHANGE = 0.3

_NORMALIZATION = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                  keras.layers.GroupNormalization)


def _all_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _all_layers(layer)


class InnerLoopWarning(UserWarning):
    """The inner loop barely lowers the support loss at the initialization: MAML will learn slowly."""


class MetaParams(NamedTuple):
    """Meta-parameter tensors: initialization, Meta-SGD rates (maybe empty), meta-network (maybe
    empty), and MAML++'s per-layer per-step rates (LSLR) and per-step BatchNorm weights (maybe
    empty; :mod:`tfmeta.core.mamlpp`)."""

    init: list
    lr: list
    net: list
    lslr: list = ()
    bn: list = ()


def _positive_int(name: str, value) -> int:
    return checks.integer(name, value, 0)


class MetaLearner:
    """A model plus its differentiable adaptation procedure (see module docstring).

    Args:
        model: a built Keras model; classification models output logits.
        task: "classification" (sparse labels, cross-entropy, accuracy) or "regression" (MSE).
        inner_optimizer: an InnerOptimizer, or a name ("sgd", "momentum", "adam").
        inner_lr: learning rate when `inner_optimizer` is a name; None: that optimizer's own
            default (0.4 for "sgd" and "momentum", 1e-3 for "adam").
        inner_steps: T, the number of inner steps in meta-training and adaptation.
        adapt: which weights adapt: "all", "head", "body" or a predicate on variable paths.
        batchnorm: BatchNorm policy of :mod:`tfmeta.core.functional` ("batch" or "running").
        meta_sgd: meta-learn one learning rate per adapted weight element (Meta-SGD).
        meta_network: optional Keras model whose weights are meta-parameters entering the losses.
        inner_loss, outer_loss: optional ``fn(learner, params, meta, x, y) -> scalar`` replacing
            the task loss on the support (inner) or query (outer) set.
        lslr: meta-learn one inner learning rate per adapted weight tensor and inner step
            (MAML++'s LSLR, Antoniou et al. 2019, Sec. 4; :mod:`tfmeta.core.mamlpp`). Not with
            `meta_sgd`.
        per_step_bn: one set of BatchNorm gamma/beta per inner step, meta-learned and not
            adapted by the inner loop (MAML++'s BNWB, Antoniou et al. 2019, Sec. 4): the pass at
            the iterate phi_k (k inner steps done) uses set k; set 0 is the model's own weights,
            sets 1..T are `bn_variables`. Adapted parameters carry the set of their step, so a
            plain model or SavedModel made from them predicts with it.
        per_step_bn_stats: keep BatchNorm running statistics per inner step (MAML++'s BNRS,
            Antoniou et al. 2019, Sec. 4): `bn_statistics`, row k of each the running mean or
            variance at the iterate phi_k, moved by step k's batch moments only, once per
            meta-step (:func:`tfmeta.core.mamlpp.update_statistics`). Training and the exported
            signatures still normalise with the batch; the statistics serve inference without a
            batch: ``MetaModel.adapt(..., statistics="running")``. Needs policy "batch", no remat.
        unroll: unroll the inner loop in the graph instead of a `tf.while_loop`.
        remat: rematerialise the inner loop when it is differentiated (second order): None or
            "none", "sqrt" (a checkpoint every ~sqrt(T) steps) or "every:K" / K (1 <= K <= T).
            The forward pass stores the inner state every K steps only; the backward pass
            recomputes each window (see :mod:`tfmeta.core.inner_loop`). Same meta-gradient, memory
            about K steps' activations plus T/K states instead of T steps' activations.
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        task: str = "classification",
        inner_optimizer="sgd",
        inner_lr: float | None = None,
        inner_steps: int = 5,
        adapt="all",
        batchnorm: str = "batch",
        meta_sgd: bool = False,
        meta_network: keras.Model | None = None,
        inner_loss: Callable | None = None,
        outer_loss: Callable | None = None,
        unroll: bool = False,
        remat=None,
        lslr: bool = False,
        per_step_bn: bool = False,
        per_step_bn_stats: bool = False,
    ):
        if task not in TASK_TYPES:
            raise ValueError(f"task={task!r} is not valid: expected one of {TASK_TYPES}.")
        self.fmodel = FunctionalModel(model, adapt=adapt, batchnorm=batchnorm)
        self.model = model
        self.task = task
        if isinstance(inner_optimizer, str):
            inner_optimizer = inner_optimizers.get(inner_optimizer, inner_lr)
        if not isinstance(inner_optimizer, inner_optimizers.InnerOptimizer):
            raise TypeError(
                "inner_optimizer must be a name or a tfmeta.inner_optimizers.InnerOptimizer, "
                f"got {type(inner_optimizer).__name__}."
            )
        self.inner_optimizer = inner_optimizer
        self.inner_steps = _positive_int("inner_steps", inner_steps)
        self.unroll = bool(unroll)
        self.remat = parse_remat(remat)
        if isinstance(self.remat, int) and self.remat > self.inner_steps:
            raise ValueError(
                f"remat={remat!r} (--remat every:{self.remat}) is not valid for inner_steps="
                f"{self.inner_steps}: expected a window K with 1 <= K <= T."
            )
        self.meta_network = meta_network
        self._inner_loss = inner_loss
        self._outer_loss = outer_loss
        dtype = self.fmodel.dtype
        trainable = model.trainable_variables
        # MAML++ (first: per-step BatchNorm takes the BatchNorm weights out of the adapted ones)
        self.lslr_variables, self.bn_variables, self.bn_indices = mamlpp.build_variables(
            self, lslr=lslr, per_step_bn=per_step_bn, meta_sgd=meta_sgd)
        #: BNRS: per BatchNorm layer, (mean, variance) variables [T+1, channels], and how many meta-steps
        #: moved them (None without BNRS); not meta-parameters.
        self.bn_statistics, self.bn_statistics_count = mamlpp.build_statistics(self, per_step_bn_stats)
        self.lr_variables = []
        if meta_sgd:
            self.lr_variables = [
                keras.Variable(
                    tf.fill(trainable[i].shape, tf.cast(inner_optimizer.learning_rate, dtype)),
                    name=f"meta_sgd_lr_{k}",
                )
                for k, i in enumerate(self.fmodel.adapted)
            ]
        net_variables = list(meta_network.trainable_variables) if meta_network is not None else []
        self._sizes = (len(trainable), len(self.lr_variables), len(net_variables),
                       len(self.lslr_variables), len(self.bn_variables))
        self.meta_variables = (list(trainable) + self.lr_variables + net_variables
                               + self.lslr_variables + self.bn_variables)

    @classmethod
    def mamlpp(cls, model: keras.Model, *, inner_lr: float = 0.1, inner_steps: int = 5,
               lslr: bool = True, per_step_bn: bool = True, per_step_bn_stats: bool = True,
               **kwargs) -> "MetaLearner":
        """A learner with MAML++'s learner options: per-layer per-step learning rates (LSLR),
        per-step BatchNorm weights and running statistics, inner SGD 0.1 x 5 steps (Antoniou, Edwards, Storkey 2019,
        arXiv:1810.09502; the authors' Omniglot setting). Train it with
        ``estimators.get("maml", msl_steps=..., first_order_steps=...)`` and a cosine meta learning
        rate (:mod:`tfmeta.core.mamlpp`, ``docs/mamlpp.md``)."""
        return cls(model, inner_lr=inner_lr, inner_steps=inner_steps, lslr=lslr,
                   per_step_bn=per_step_bn, per_step_bn_stats=per_step_bn_stats, **kwargs)

    # -- meta-parameters -------------------------------------------------------------------------
    @property
    def dtype(self) -> tf.DType:
        return self.fmodel.dtype

    def meta_values(self) -> list[tf.Tensor]:
        """Current values of all meta-parameters, flat (init, then lr, then net)."""
        return [tf.convert_to_tensor(v.value) for v in self.meta_variables]

    def unflatten(self, flat: Sequence[tf.Tensor]) -> MetaParams:
        flat, parts, start = list(flat), [], 0
        for size in self._sizes:
            parts.append(flat[start:start + size])
            start += size
        return MetaParams(*parts)

    def at_step(self, params, meta: MetaParams, step) -> list:
        """`params` with the BatchNorm weights of inner step `step` (per-step BatchNorm; a Python
        int or an int tensor, steps past T use set T); `params` unchanged without it."""
        return mamlpp.bn_at_step(self, params, meta, step)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("accuracy",) if self.task == "classification" else ()

    def check_tasks(self, tasks) -> None:
        """Raise ValueError, naming the field, if a task batch does not fit this learner.

        Expected: support_x [M, S, *features], support_y [M, S] integer labels (classification) or
        [M, S, outputs] (regression); query likewise.
        """
        fields = ("support_x", "support_y", "query_x", "query_y")
        if len(tasks) != 4:
            raise ValueError(f"tasks must hold {fields}, got {len(tasks)} items.")
        shapes = {name: tuple(t.shape) for name, t in zip(fields, tasks)}
        features = getattr(self.model, "inputs", None)
        features = tuple(features[0].shape[1:]) if features else None
        y_rank = 2 if self.task == "classification" else 3
        for part in ("support", "query"):
            x, y = shapes[f"{part}_x"], shapes[f"{part}_y"]
            if features is not None and (len(x) != 2 + len(features) or any(
                f is not None and f != d for f, d in zip(features, x[2:]))):
                raise ValueError(
                    f"{part}_x has shape {x}: expected [meta_batch, examples, *{features}]."
                )
            if len(y) != y_rank or y[:2] != x[:2]:
                what = "integer labels [meta_batch, examples]" if self.task == "classification" \
                    else "targets [meta_batch, examples, outputs]"
                raise ValueError(f"{part}_y has shape {y} for {part}_x of shape {x}: expected {what}.")
            if self.task == "classification" and tasks[fields.index(f"{part}_y")].dtype.is_floating:
                raise ValueError(f"{part}_y must hold integer class labels, got dtype {tasks[fields.index(f'{part}_y')].dtype}.")
        if shapes["support_x"][0] != shapes["query_x"][0]:
            raise ValueError(
                f"support_x and query_x disagree on the meta-batch: {shapes['support_x'][0]} vs "
                f"{shapes['query_x'][0]}."
            )

    # -- losses ----------------------------------------------------------------------------------
    def task_loss(self, outputs, y) -> tf.Tensor:
        """Mean cross-entropy on logits (classification) or mean squared error (regression)."""
        if self.task == "classification":
            losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.cast(y, tf.int32), logits=outputs
            )
            return tf.reduce_mean(losses)
        return tf.reduce_mean(tf.square(outputs - tf.cast(y, outputs.dtype)))

    def metrics(self, outputs, y) -> dict[str, tf.Tensor]:
        if self.task != "classification":
            return {}
        hits = tf.equal(tf.argmax(outputs, -1, output_type=tf.int32), tf.cast(y, tf.int32))
        return {"accuracy": tf.reduce_mean(tf.cast(hits, self.dtype))}

    def inner_loss(self, params, meta: MetaParams, x, y) -> tf.Tensor:
        if self._inner_loss is not None:
            return self._inner_loss(self, params, meta, x, y)
        return self.task_loss(self.fmodel(params, x), y)

    def outer_loss(self, params, meta: MetaParams, x, y, *, fused: bool = True) -> tuple[tf.Tensor, dict]:
        """Query loss after adaptation, and the task metrics (accuracy for classification).

        The query pass is differentiated once (never inside an inner loop), so it may use fused
        BatchNorm (see `FunctionalModel.__call__`); a query pass inside the inner loop (MAML++'s
        multi-step loss) passes ``fused=False``.
        """
        outputs = self.fmodel(params, x, fused_batchnorm=fused)
        if self._outer_loss is not None:
            loss = self._outer_loss(self, params, meta, x, y)
        else:
            loss = self.task_loss(outputs, y)
        return loss, self.metrics(outputs, y)

    # -- the inner loop's effect -----------------------------------------------------------------
    def inner_loop_effect(self, tasks, *, max_tasks: int = 8) -> dict:
        """How much T inner steps from the current meta-parameters change the loss and the weights.

        On the first `max_tasks` tasks of the batch (first-order adaptation, no outer tape), means
        over tasks of:

        - ``support_loss_drop``: ``(L_support(theta) - L_support(phi_T)) / L_support(theta)``;
        - ``relative_change``: per adapted kernel (weights of rank >= 2), ``||phi_T - theta|| /
          ||theta||``. With BatchNorm after a layer its step scales like lr / ||w||^2, so large
          kernels show up here even when the head alone still fits the support set.
        """
        tasks = tuple(tf.convert_to_tensor(t)[:max_tasks] for t in tasks)
        self.check_tasks(tasks)
        trainable = self.model.trainable_variables
        kernels = [i for i in self.fmodel.adapted if len(trainable[i].shape) >= 2]

        def one(task):
            sx, sy = task[0], task[1]
            meta = self.unflatten(self.meta_values())
            before = self.inner_loss(meta.init, meta, sx, sy)
            params = self.adapt(meta, sx, sy, second_order=False)
            after = self.inner_loss(params, meta, sx, sy)
            drop = (before - after) / tf.maximum(tf.abs(before), tf.cast(1e-12, before.dtype))
            change = [tf.norm(params[i] - meta.init[i]) / tf.maximum(tf.norm(meta.init[i]), 1e-12)
                      for i in kernels]
            return tf.stack([drop] + change)

        # autograph=False: explicit control flow only; converting tfmeta's code cost ~3 s per check
        rows = tf.function(lambda *t: tf.map_fn(one, t, fn_output_signature=self.dtype), autograph=False)(
            *tasks)
        means = tf.reduce_mean(rows, 0).numpy()
        return {"support_loss_drop": float(means[0]),
                "relative_change": {trainable[i].path: float(v) for i, v in zip(kernels, means[1:])}}

    def check_inner_loop(self, tasks, *, min_change: float = INNER_LOOP_MIN_CHANGE,
                         min_drop: float = INNER_LOOP_MIN_DROP) -> dict:
        """Measure :meth:`inner_loop_effect` and warn (:class:`InnerLoopWarning`) when it is tiny.

        Warns when the support loss drops by less than `min_drop` (any model), or, in a model
        with normalization layers, when the median relative change of the adapted kernels is
        below `min_change`: a normalized layer's output depends only on its kernel's direction,
        so a kernel that moves by a small fraction of its norm barely changes the function.
        Returns the measurement plus ``inner_steps``, ``median_change`` (None without
        normalization layers) and ``stalled``.
        """
        effect = self.inner_loop_effect(tasks)
        changes = sorted(effect["relative_change"].values())
        normalized = any(isinstance(layer, _NORMALIZATION) for layer in _all_layers(self.model))
        median = float(np.median(changes)) if normalized and changes else None
        reasons = []
        if effect["support_loss_drop"] < 0:
            reasons.append(f"the support loss rises by {-100 * effect['support_loss_drop']:.1f}% (the inner "
                           "steps overshoot: lower the inner learning rate)")
        elif effect["support_loss_drop"] < min_drop:
            reasons.append(f"the support loss drops by {100 * effect['support_loss_drop']:.1f}% "
                           f"(below {100 * min_drop:g}%)")
        if median is not None and median < min_change:
            reasons.append(f"the adapted kernels move by {100 * median:.1f}% of their norm (median; "
                           f"below {100 * min_change:g}%)")
        if reasons:
            warnings.warn(
                f"the inner loop barely moves the model at its initialization: over {self.inner_steps} "
                f"inner steps {' and '.join(reasons)}, so meta-training will learn slowly. Initialize "
                "the kernels smaller (e.g. keras.initializers.VarianceScaling(1/3, 'fan_in', 'uniform'), "
                "PyTorch's default, as tfmeta.models.conv4 does), or raise the inner learning rate or "
                "the inner steps; see the README section 'Initialization'.",
                InnerLoopWarning, stacklevel=2,
            )
        return {**effect, "median_change": median, "inner_steps": self.inner_steps,
                "stalled": bool(reasons)}

    # -- adaptation ------------------------------------------------------------------------------
    @tf.autograph.experimental.do_not_convert  # explicit tf.while_loop/tf.cond: nothing to convert
    def adapt(
        self,
        meta: MetaParams,
        x,
        y,
        *,
        second_order: bool = True,
        steps: int | None = None,
        reuse_window: int = 1,
        observer: inner_loop.Observer | None = None,
    ):
        """phi_{T+1}: the full parameter list after T inner steps from theta on (x, y).

        Only the weights selected by `adapt` move; the others stay at the meta-parameters. The
        observer (see :mod:`tfmeta.core.inner_loop`) sees the adapted subset only; with one, returns
        ``(params, accumulator)``.
        """
        steps = self.inner_steps if steps is None else _positive_int("steps", steps)
        meta = MetaParams(*meta)
        sizes = [len(part) for part in meta]
        total = sum(sizes)

        def loss_fn(adapted, *flat, step):
            # the meta-parameters, the support set and the model's state come in as arguments
            # (neither captured nor read from variables), so that a rematerialised window
            # (remat) rebinds them, the meta-parameters receive their gradients through it, and
            # its recomputation inside a tf.while_loop gradient reads no variable
            parts, begin = [], 0
            for size in sizes:
                parts.append(list(flat[begin:begin + size]))
                begin += size
            inner = MetaParams(*parts)
            x_, y_, *state = flat[total:]
            params = self.fmodel.merge(inner.init, adapted)
            if inner.bn:  # per-step BatchNorm: the set of the step being evaluated
                params = self.at_step(params, inner, step)
            with self.fmodel.given_state(state):
                return self.inner_loss(params, inner, x_, y_)

        start = list(meta.init)
        lslr = bool(meta.lslr)
        result = inner_loop.run(
            loss_fn,
            [start[i] for i in self.fmodel.adapted],
            self.inner_optimizer,
            steps,
            learning_rate=list(meta.lslr) if lslr else (list(meta.lr) or None),
            step_rates=lslr,
            step_argument=True,
            second_order=second_order,
            unroll=self.unroll,
            reuse_window=reuse_window,
            observer=observer,
            remat=remat_window(self.remat, steps, reuse_window) if second_order is not False else None,
            loss_args=[t for part in meta for t in part],
            loss_constants=[tf.convert_to_tensor(x), tf.convert_to_tensor(y)] + self.fmodel.state(),
        )
        if observer is None:
            return self.at_step(self.fmodel.merge(start, result), meta, steps)
        adapted, acc = result
        return self.at_step(self.fmodel.merge(start, adapted), meta, steps), acc
