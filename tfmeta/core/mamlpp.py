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
- per-step running statistics (BNRS) are not kept: tfmeta normalises with the batch's exact
  moments in training, evaluation and serving (as the reference implementation does, which runs
  its BatchNorm in training mode throughout), so running statistics would never be read.

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


def refuse(learner, estimator: str) -> None:
    """ValueError naming the flags when `estimator` cannot train the learner's MAML++ options."""
    given = [name for name, on in (("lslr=True (--lslr)", learner.lslr_variables),
                                   ("per_step_bn=True (--per-step-bn)", learner.bn_variables)) if on]
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
