"""MAML++: the training fixes of Antoniou, Edwards, Storkey 2019, as options of tfmeta's parts.

Each fix is an option of the part it belongs to, so it composes with the rest of tfmeta:

- **Per-step BatchNorm weights (BNWB)**, ``MetaLearner(..., per_step_bn=True)``: one set of
  gamma/beta per inner step. The forward pass at the iterate phi_k (k inner steps done) uses set
  k: set 0 is the model's own gamma/beta, sets 1..T are the learner's ``bn_variables`` (one
  ``[T, *shape]`` variable per BatchNorm weight). The sets are meta-parameters; the inner loop does
  not adapt BatchNorm weights (the paper's ``enable_inner_loop_optimizable_bn_params: false``).
  Adapted parameters carry the set of their step, so the SavedModel's ``adapt_and_predict``, the
  ``model.keras`` of an adapted model (:func:`tfmeta.core.plain.plain_model`) and ``MetaModel.adapt``
  predict with set T, and ``serving_default`` / the exported initialization with set 0. tfmeta's
  exact batch moments stay in place: the meta-gradient of every set is exact (float64
  finite-difference test). Adapting for more than T steps (``evaluate --inner-steps``) uses set T
  after step T.
- **Per-layer per-step learning rates (LSLR)**, ``MetaLearner(..., lslr=True)``: one inner
  learning rate per adapted weight tensor (a layer's kernel and bias each) and inner step,
  meta-learned, initialised to the inner learning rate (the learner's ``lslr_variables``, one
  ``[T]`` vector per adapted weight; beside Meta-SGD's per-element ``lr_variables``, not combined
  with them).
- **Multi-step loss (MSL)**, ``estimators.get("maml", msl_steps=N)`` (``--msl-steps N``): the
  meta-objective is sum_k w_k L_query(phi_k), k = 1..T, with the weights of
  :func:`msl_weights` annealed towards the last step over the first N meta-steps, then the last
  step's loss alone (plain MAML).
- **Derivative-order annealing (DA)**, ``estimators.get("maml", first_order_steps=N)``
  (``--first-order-steps N``): first-order (inner gradients stopped) for the first N meta-steps,
  second order after. The order is a boolean tensor read from the meta-step inside the compiled
  step (a `tf.cond` around each inner gradient), so the switch costs no retrace; in the
  first-order branch the backward pass computes no Hessian term.
- **Per-step BatchNorm running statistics (BNRS)**, ``MetaLearner(..., per_step_bn_stats=True)``
  (``--per-step-bn-stats``): per BatchNorm layer a running mean and variance for each iterate
  phi_0..phi_T (the learner's ``bn_statistics``, ``[T+1, channels]`` each). Row k is moved only by
  the batch moments of the support set at phi_k (:func:`statistics_observer`, one forward pass on
  constants per inner step), averaged over the meta-batch's tasks, once per meta-step, with the
  layer's momentum after a cumulative average over the first meta-steps
  (:func:`update_statistics`). Training and the exported signatures still
  normalise with the batch; ``MetaModel.adapt(..., statistics="running")`` gives a plain Keras
  model whose stock BatchNorm layers hold row T, to predict one example at a time.
- **Cosine annealing of the meta learning rate** (``--meta-lr-schedule cosine --min-meta-lr``):
  Keras' own ``keras.optimizers.schedules.CosineDecay`` over the run's iterations
  (:func:`cosine_meta_lr`).

``tfmeta train --preset maml++`` turns all of them on with the paper's settings
(``docs/mamlpp.md``); :meth:`MetaLearner.mamlpp` builds the learner in Python.

Differences from the reference implementation (HowToTrainYourMAMLPytorch), by design:

- its query pass after inner step k uses BatchNorm set k-1 (the set of the support pass before
  the update); tfmeta uses set k, the set of the iterate the pass runs at, so phi_T's support and
  query passes share one set;
- the MSL weights and DA switch move per meta-step, not per epoch of 500 meta-steps;
- BNRS: the reference moves step k's statistics on every forward pass of step k (support and
  query, task after task, PyTorch momentum 0.1) and never normalises with them (its BatchNorm
  runs in training mode throughout); tfmeta moves row k once per meta-step by the tasks' mean
  support moments at phi_k (a cumulative average, then the layer's momentum), and uses the rows for inference
  without a batch.

References:
    Antoniou, Edwards, Storkey. How to train your MAML. ICLR 2019. arXiv:1810.09502.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfmeta.core import checks

CITATION = "Antoniou, Edwards, Storkey 2019, How to train your MAML, ICLR 2019, arXiv:1810.09502"

#: the floor of a non-final step's MSL weight, times T (Antoniou et al. 2019, Sec. 4, MSL; 0.03/T).
MSL_FLOOR = 0.03


#: the argparse type of an annealing length in meta-steps (an integer >= 0; argparse names the flag).
nonnegative_steps = checks.flag_type(int, lambda value: value >= 0, "an integer >= 0 (meta-steps)")


def check_steps(name: str, value) -> int:
    """`value` as an annealing length in meta-steps; ValueError naming `name` and its flag."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} (--{name.replace('_', '-')}) is not valid: expected an "
                         "integer >= 0 (meta-steps).")
    return value


# -- learner: LSLR and per-step BatchNorm ----------------------------------------------------------
def build_variables(learner, *, lslr: bool, per_step_bn: bool, meta_sgd: bool):
    """The learner's LSLR and per-step BatchNorm meta-variables, and the positions of the
    BatchNorm weights in ``model.trainable_variables`` (removed from the adapted weights)."""
    if not isinstance(lslr, bool) or not isinstance(per_step_bn, bool):
        raise ValueError(f"lslr={lslr!r}, per_step_bn={per_step_bn!r}: expected True or False.")
    fmodel, steps = learner.fmodel, learner.inner_steps
    trainable = learner.model.trainable_variables
    dtype = fmodel.dtype
    bn_indices: tuple = ()
    bn_variables = []
    if per_step_bn:
        if steps < 1:
            raise ValueError("per_step_bn=True (--per-step-bn) needs inner_steps >= 1.")
        ids = {id(v): i for i, v in enumerate(trainable)}
        bn_indices = tuple(sorted(
            ids[id(w)] for layer in fmodel._bn_layers
            for w in (getattr(layer, "gamma", None), getattr(layer, "beta", None))
            if w is not None and id(w) in ids))
        if not bn_indices:
            raise ValueError(f"per_step_bn=True (--per-step-bn): model {learner.model.name!r} has no "
                             "trainable BatchNormalization weights.")
        adapted = tuple(i for i in fmodel.adapted if i not in bn_indices)
        if not adapted:
            raise ValueError("per_step_bn=True (--per-step-bn) leaves no weight to adapt: the inner loop "
                             "does not adapt BatchNorm weights under per-step BatchNorm.")
        fmodel.adapted = adapted
        for k, i in enumerate(bn_indices):
            value = tf.convert_to_tensor(trainable[i].value)
            bn_variables.append(keras.Variable(tf.tile(value[None], [steps] + [1] * value.shape.rank),
                                               name=f"per_step_bn_{k}"))
    lslr_variables = []
    if lslr:
        if meta_sgd:
            raise ValueError("lslr=True (--lslr) and meta_sgd=True are alternatives: per-layer per-step "
                             "rates (MAML++) or per-element rates (Meta-SGD), not both.")
        if steps < 1:
            raise ValueError("lslr=True (--lslr) needs inner_steps >= 1.")
        rate = learner.inner_optimizer.learning_rate
        lslr_variables = [keras.Variable(tf.fill([steps], tf.cast(rate, dtype)), name=f"lslr_{k}")
                          for k, _ in enumerate(fmodel.adapted)]
    return lslr_variables, bn_variables, bn_indices


def bn_at_step(learner, params, meta, step) -> list:
    """`params` with the BatchNorm weights of step `step` (see module docstring)."""
    if not meta.bn:
        return list(params)
    params = list(params)
    last = learner.inner_steps
    for k, i in enumerate(learner.bn_indices):
        sets = meta.bn[k]
        if isinstance(step, int):
            s = min(step, last)
            params[i] = meta.init[i] if s == 0 else sets[s - 1]
        else:
            stacked = tf.concat([meta.init[i][None], sets], 0)
            # a one-hot contraction rather than a gather: dense gradients through the while loop
            pick = tf.one_hot(tf.minimum(tf.cast(step, tf.int32), last), last + 1, dtype=stacked.dtype)
            params[i] = tf.tensordot(pick, stacked, 1)
    return params


# -- learner: per-step BatchNorm running statistics (BNRS) ------------------------------------------
def build_statistics(learner, on: bool) -> tuple[list, object]:
    """BNRS: per BatchNorm layer, a ``(mean, variance)`` pair of non-trainable ``[T+1, channels]``
    variables, row k for the iterate phi_k (k inner steps done), each row starting from the layer's
    own running statistics, and the count of meta-steps that moved them (None when off). Not
    meta-parameters: the task loop averages them (see :func:`statistics_observer`,
    :func:`update_statistics`)."""
    if not isinstance(on, bool):
        raise ValueError(f"per_step_bn_stats={on!r} (--per-step-bn-stats) is not valid: expected True or False.")
    if not on:
        return [], None
    fmodel, rows = learner.fmodel, learner.inner_steps + 1
    layers = fmodel.bn_layers
    if not layers:
        raise ValueError(f"per_step_bn_stats=True (--per-step-bn-stats): model {learner.model.name!r} has no "
                         "BatchNormalization layer.")
    if fmodel.batchnorm != "batch":
        raise ValueError(f"per_step_bn_stats=True (--per-step-bn-stats) is not valid with batchnorm="
                         f"{fmodel.batchnorm!r}: the statistics are averages of the batch moments that policy "
                         "'batch' normalises with. Expected batchnorm='batch'.")
    if learner.remat is not None:
        raise ValueError(f"per_step_bn_stats=True (--per-step-bn-stats) is not valid with remat={learner.remat!r} "
                         "(--remat): a rematerialised window does not replay the statistics pass. Expected "
                         "--remat none.")
    #: how many meta-steps moved the statistics (see update_statistics); a float, so that every
    #: replica's identical assignment averages to itself under tf.distribute.
    count = keras.Variable(0.0, name="per_step_bn_updates", trainable=False, aggregation="mean")
    statistics = []
    for k, layer in enumerate(layers):
        pair = []
        for part, own in (("mean", layer.moving_mean), ("variance", layer.moving_variance)):
            value = tf.cast(tf.convert_to_tensor(own.value), tf.float32)
            pair.append(keras.Variable(tf.tile(value[None], [rows, 1]), name=f"per_step_bn_{part}_{k}",
                                       trainable=False, aggregation="mean"))
        statistics.append(tuple(pair))
    return statistics, count


def statistics_observer(learner, meta, x):
    """An inner-loop observer that collects BNRS's per-step batch moments of one task.

    Its accumulator holds, per BatchNorm layer, ``[T+1, channels]`` means and variances: row k
    is the moments of the support batch at the iterate phi_k, k = 0..T (with per-step BatchNorm
    weights, those of set k). Each row is written by step k's pass alone (per-step statistics,
    Antoniou et al. 2019, Sec. 4, BNRS). The passes run on constants
    (no gradient, no Hessian term): one forward pass on the support set `x` per inner step."""
    from tfmeta.core.inner_loop import Observer

    rows = learner.inner_steps + 1
    init = [tf.stop_gradient(t) for t in meta.init]

    def moments_at(adapted, step):
        full = learner.at_step(learner.fmodel.merge(init, adapted), meta, step)
        return learner.fmodel.batch_moments(full, x)

    def write(acc, row, adapted):
        pick = tf.one_hot(row, rows)[:, None]
        return [(m + pick * (tf.cast(mean, tf.float32)[None] - m),
                 v + pick * (tf.cast(var, tf.float32)[None] - v))
                for (m, v), (mean, var) in zip(acc, moments_at(adapted, row))]

    def start(params):
        acc = [(tf.zeros([rows, mean.shape[-1]]), tf.zeros([rows, mean.shape[-1]]))
               for mean, _ in learner.bn_statistics]
        return write(acc, 0, params)

    def update(acc, step, params, grads, new_params):
        del params, grads
        return write(acc, step + 1, new_params)

    return Observer(init=start, update=update)


def update_statistics(learner, stacked, after) -> None:
    """Move each per-step running statistic towards the mean over the meta-batch's tasks of its
    step's batch moments, after `after`: ``s = m s + (1 - m) batch`` with m the smaller of the
    layer's momentum (as Keras' BatchNormalization moves its own) and n / (n + 1) after n earlier
    updates. So the first meta-step sets the statistics, the next ones average them, and from
    n = momentum / (1 - momentum) on (99 for Keras' 0.99) they move as Keras' do: a short run has
    statistics of its own batches, not the layer's initial ones. Rows whose task mean is not finite
    keep their values. `stacked`: per layer ``(means [M, T+1, C], variances [M, T+1, C])``."""
    count = learner.bn_statistics_count
    with tf.control_dependencies([after]):
        n = tf.convert_to_tensor(count.value)
        for layer, variables, moments in zip(learner.fmodel.bn_layers, learner.bn_statistics, stacked):
            momentum = tf.minimum(float(layer.momentum), n / (n + 1.0))
            for variable, batch in zip(variables, moments):
                mean = tf.reduce_mean(batch, 0)
                old = variable.value
                new = momentum * old + (1.0 - momentum) * mean
                variable.assign(tf.where(tf.math.is_finite(mean), new, old))
        count.assign(n + 1.0)


def statistics_at(learner, step: int) -> list:
    """BNRS: ``[(mean, variance), ...]`` per BatchNorm layer for the iterate of inner step `step`
    (steps past T use row T), as numpy arrays."""
    row = min(int(step), learner.inner_steps)
    return [(mean.numpy()[row], variance.numpy()[row]) for mean, variance in learner.bn_statistics]


def refuse(learner, estimator: str) -> None:
    """ValueError naming the flags when `estimator` cannot train the learner's MAML++ options."""
    given = [name for name, on in (("lslr=True (--lslr)", learner.lslr_variables),
                                   ("per_step_bn=True (--per-step-bn)", learner.bn_variables),
                                   ("per_step_bn_stats=True (--per-step-bn-stats)", learner.bn_statistics))
             if on]
    if given:
        raise ValueError(
            f"{' and '.join(given)} is not valid with estimator={estimator!r}: these meta-parameters "
            "act through the inner loop's dynamics, which this estimator does not differentiate. Use "
            "estimator='maml' (MAML++), reuse or linearity.")


# -- estimator: MSL and DA -------------------------------------------------------------------------
def read_step(variable) -> tf.Tensor:
    """The meta-step counter's value as an int64 tensor."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return tf.cast(tf.convert_to_tensor(value), tf.int64)


def msl_weights(meta_step, steps: int, anneal_steps: int, dtype=tf.float32) -> tf.Tensor:
    """The multi-step loss weights w_1..w_T at `meta_step` (Antoniou et al. 2019, Sec. 4, MSL).

    With progress e = meta_step / anneal_steps (the paper counts epochs over
    ``multi_step_loss_num_epochs``): every non-final step has max(1/T - e/T, 0.03/T), the last
    step min(1/T + e (T-1)/T, 1 - (T-1) 0.03/T). From meta-step `anneal_steps` on, the last step
    has weight 1 and the others 0: plain MAML's objective. `anneal_steps` = 0: always that.
    """
    one_hot = tf.one_hot(steps - 1, steps, dtype=dtype)
    if anneal_steps == 0:
        return one_hot
    t = float(steps)
    e = tf.cast(meta_step, tf.float64) / float(anneal_steps)
    floor = MSL_FLOOR / t
    non_final = tf.maximum(1.0 / t - e / t, floor)
    final = tf.minimum(1.0 / t + e * (t - 1.0) / t, 1.0 - (t - 1.0) * floor)
    annealed = tf.concat([tf.fill([steps - 1], non_final), final[None]], 0)
    return tf.where(e < 1.0, tf.cast(annealed, dtype), one_hot)


def msl_observer(learner, meta, query_x, query_y, weights):
    """An inner-loop observer accumulating sum_{k<T} w_k L_query(phi_k) (the final step's term is
    the estimator's own query loss, computed after the loop as in MAML)."""
    from tfmeta.core.inner_loop import Observer

    dtype = learner.dtype
    last = learner.inner_steps - 1

    def update(acc, step, params, grads, new_params):
        del params, grads

        def weighted():
            full = learner.at_step(learner.fmodel.merge(meta.init, new_params), meta, step + 1)
            loss, _ = learner.outer_loss(full, meta, query_x, query_y, fused=False)
            return tf.cast(weights[step], dtype) * tf.cast(loss, dtype)

        return acc + tf.cond(step < last, weighted, lambda: tf.zeros([], dtype))

    return Observer(init=lambda params: tf.zeros([], dtype), update=update)


def second_order_at(meta_step, first_order_steps: int):
    """True (a Python bool) without DA; else a boolean tensor: meta_step >= first_order_steps."""
    if first_order_steps == 0:
        return True
    return read_step(meta_step) >= first_order_steps


# -- training: the meta learning rate ----------------------------------------------------------
def cosine_meta_lr(meta_lr: float, iterations: int, min_meta_lr: float = 0.0):
    """Keras' CosineDecay from `meta_lr` to `min_meta_lr` over `iterations` meta-updates
    (Antoniou et al. 2019, Sec. 4, "cosine annealing of meta-optimizer learning rate")."""
    if not 0 <= min_meta_lr <= meta_lr:
        raise ValueError(f"min_meta_lr={min_meta_lr!r} (--min-meta-lr) is not valid: expected a number "
                         f"in [0, --meta-lr={meta_lr!r}].")
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=meta_lr, decay_steps=iterations, alpha=min_meta_lr / meta_lr)
