"""The differentiable inner loop: T optimizer steps on a task's support loss.

One function, :func:`run`, shared by every estimator. The steps run in a `tf.while_loop` (graph
size does not grow with T; second-order gradients through it are exact in TF 2.21) or, with
``unroll=True``, as T copies of the step (about 20% faster per step on CPU, about 1 s more
compile time per step).

With ``second_order=True`` each inner gradient is itself differentiable, so a tape around `run`
yields the exact MAML meta-gradient, backpropagated through all T steps (Eq. 3-4 of
Kim et al. 2020). With ``second_order=False`` the inner gradients are constants
(`tf.stop_gradient`), which is first-order MAML's approximation.

``reuse_window=n`` evaluates the task gradient once at the start of each window of n steps and
reuses it for the n optimizer steps of that window (Kim et al. 2020, Eq. 11-12): only
ceil(T/n) gradient evaluations, and as many Hessian-vector products in backpropagation. When n
does not divide T the last window is shorter (T mod n steps).

``remat=K`` rematerialises the trajectory (checkpointing, Griewank 1992; Chen et al. 2016,
"Training deep nets with sublinear memory cost", arXiv:1604.06174): the forward pass keeps only
the inner state (iterate, optimizer state, observer accumulator) at the start of every window of K
steps, and the backward pass re-runs each window's K steps under a fresh tape and backpropagates
through them (:func:`_checkpointed`). The meta-gradient is unchanged (the vector-Jacobian product
of each window's map, inner gradients included, so still second order); memory holds one window's
activations plus T/K states: about sqrt(T) with K ~ sqrt(T), for one more forward pass of the inner
loop.

Random layers (Dropout) draw fresh randomness for each gradient evaluation: the step index is
folded into the open seed scope of :mod:`tfmeta.core.randomness`.

An :class:`Observer` accumulates statistics along the trajectory (path length, gradient norms,
gradient differences) without keeping the trajectory: the linearity metrics and the reuse
estimator's gradient-difference metric are observers.

References:
    Kim, J.-H., Park, J., Choi, Y. "Multi-step Estimation for Gradient-based Meta-learning."
    2020. arXiv:2004.05439.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import tensorflow as tf

from tfmeta.core import inner_optimizers, randomness


def _step_rates(rates, t):
    """The rates of inner step t from per-step rates (each with a leading step axis; steps past
    the last use the last step's rate)."""
    # a one-hot contraction rather than a gather: dense gradients through the while loop
    return [tf.tensordot(tf.one_hot(tf.minimum(t, r.shape[0] - 1), r.shape[0], dtype=r.dtype), r, 1)
            for r in rates]


class Observer(NamedTuple):
    """Statistics accumulated along the inner trajectory.

    ``init(params) -> acc`` (a nest of tensors) and
    ``update(acc, step, params, grads, new_params) -> acc``, called after every optimizer step
    with the iterate before the step, the gradient used (a reused one inside a window) and the
    iterate after it. `step` is the 0-based step index as an int32 tensor.
    """

    init: Callable[[list], Any]
    update: Callable[..., Any]


def combine(first: Observer, second: Observer) -> Observer:
    """One observer running two: the accumulator is the pair ``(first's, second's)``.

    Example:
        >>> params, (own, extra) = learner.adapt(meta, x, y, observer=combine(own_obs, extra_obs))
    """
    return Observer(
        init=lambda params: (first.init(params), second.init(params)),
        update=lambda acc, *args: (first.update(acc[0], *args), second.update(acc[1], *args)),
    )


def run(
    loss_fn: Callable[[list], tf.Tensor],
    params: Sequence[tf.Tensor],
    optimizer: inner_optimizers.InnerOptimizer,
    steps: int,
    *,
    learning_rate=None,
    second_order: bool = True,
    unroll: bool = False,
    reuse_window: int = 1,
    observer: Observer | None = None,
    remat: int | None = None,
    loss_args: Sequence[tf.Tensor] = (),
    loss_constants: Sequence[tf.Tensor] = (),
    step_rates: bool = False,
    step_argument: bool = False,
):
    """Adapt `params` by `steps` optimizer steps on `loss_fn(params)`.

    Args:
        loss_fn: the inner objective, ``loss_fn(params, *loss_args, *loss_constants)``.
        params: the starting point phi_1 (e.g. the meta-learned initialization theta).
        optimizer: an :class:`~tfmeta.inner_optimizers.InnerOptimizer`.
        steps: T >= 0, a Python int.
        learning_rate: None, a scalar, or one tensor per parameter (Meta-SGD); with
            `step_rates`, one tensor per parameter whose leading axis indexes the inner step
            (LSLR, Antoniou et al. 2019, Sec. 4: step t uses ``rate[min(t, len - 1)]``).
        second_order: keep the inner gradients differentiable (exact MAML) or stop them; a
            boolean tensor chooses in the graph (derivative-order annealing: one trace for
            both orders, :mod:`tfmeta.core.mamlpp`).
        unroll: Python-unroll the steps instead of a `tf.while_loop`.
        reuse_window: n >= 1, optimizer steps per gradient evaluation (1: every step).
        observer: optional :class:`Observer`.
        remat: None, or K with 1 <= K <= steps: keep the inner state every K steps only and
            recompute each window in the backward pass (second_order=True; ignored otherwise,
            there is nothing to recompute). With reuse_window n, K must be a multiple of n (or
            >= steps). Every tensor the loss depends on must then come in through `loss_args`
            (differentiated: e.g. meta-parameters), `loss_constants` (not differentiated: data,
            model state) or `learning_rate`: the recomputation rebinds those. A tensor only
            captured by `loss_fn` gets no gradient through a recomputed window (and an eager
            tensor captured there cannot be recomputed inside a `tf.while_loop` gradient).
        loss_args: tensors passed to `loss_fn` after the params (e.g. the meta-parameters).
        loss_constants: tensors passed to `loss_fn` after `loss_args`, never differentiated
            (e.g. the support set).
        step_argument: also pass ``step=t``, the 0-based index (an int32 tensor) of the inner
            step whose gradient is evaluated: ``loss_fn(params, *loss_args, *loss_constants,
            step=t)`` (per-step BatchNorm weights pick the set of step t, :mod:`tfmeta.core.mamlpp`).

    Returns:
        The last iterate (a list), or ``(last iterate, observer accumulator)`` with an observer.
    """
    if isinstance(reuse_window, bool) or not isinstance(reuse_window, int) or reuse_window < 1:
        raise ValueError(f"reuse_window={reuse_window!r} is not valid: expected an integer >= 1.")
    params = list(params)
    dynamic = not isinstance(second_order, bool)
    remat = _check_remat(remat, steps, reuse_window) if (dynamic or second_order) else None
    state = optimizer.init(params)
    acc = observer.init(params) if observer is not None else ()
    loss_constants = list(loss_constants)
    loss_args = list(loss_args) + loss_constants

    def compute(params, t, args, keep: bool):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = loss_fn(params, *args, step=t) if step_argument else loss_fn(params, *args)
        grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grads if keep else [tf.stop_gradient(g) for g in grads]

    def gradient(params, t, args):
        if dynamic:
            # the order is chosen in the graph: each branch computes the gradient, the
            # first-order one stops it, so its backward pass computes no Hessian term at all
            return tf.cond(second_order, lambda: compute(params, t, args, True),
                           lambda: compute(params, t, args, False))
        return compute(params, t, args, second_order)

    def window(t, params, state, acc, length: int, rate, args):
        """One gradient evaluation, then `length` optimizer steps with that gradient."""
        with randomness.fold(t):  # random layers: fresh masks for each gradient evaluation
            grads = gradient(params, t, args)
        for j in range(length):
            rate_j = _step_rates(rate, t + j) if step_rates else rate
            new_params, state = inner_optimizers.step(optimizer, params, grads, state, rate_j)
            if observer is not None:
                acc = observer.update(acc, t + j, params, grads, new_params)
            params = new_params
        return t + length, params, state, acc

    def advance(t, params, state, acc, steps: int, rate, args):
        """`steps` optimizer steps from step index t (a multiple of reuse_window)."""
        full, rest = divmod(steps, reuse_window)
        if unroll or full <= 1:
            for _ in range(full):
                t, params, state, acc = window(t, params, state, acc, reuse_window, rate, args)
        else:
            end = t + full * reuse_window
            t, params, state, acc = tf.while_loop(
                lambda t, *_: t < end,
                lambda t, p, s, a: window(t, p, s, a, reuse_window, rate, args),
                (t, params, state, acc),
                parallel_iterations=1,
            )
        if rest:
            t, params, state, acc = window(t, params, state, acc, rest, rate, args)
        return t, params, state, acc

    carry = (tf.constant(0), params, state, acc)
    if remat is None:
        _, params, state, acc = advance(*carry, steps, learning_rate, loss_args)
    else:
        _, params, state, acc = _checkpointed(advance, carry, steps, remat, learning_rate,
                                              loss_args, len(loss_constants), unroll)
    return (params, acc) if observer is not None else params


def _check_remat(remat, steps: int, reuse_window: int):
    if remat is None:
        return None
    if isinstance(remat, bool) or not isinstance(remat, int) or not 1 <= remat <= max(steps, 1):
        raise ValueError(
            f"remat={remat!r} is not valid for {steps} inner steps: expected None or a window K "
            f"with 1 <= K <= {steps} (CLI --remat every:K)."
        )
    if remat % reuse_window and remat < steps:
        raise ValueError(
            f"remat={remat!r} is not valid with reuse_window={reuse_window}: expected a multiple "
            "of the reuse window, so that checkpoints fall on window starts (CLI --remat every:K)."
        )
    return remat if steps else None


def _checkpointed(advance, carry, steps: int, window: int, learning_rate, loss_args,
                  constants: int, unroll):
    """`advance` over `steps` steps in windows of `window` steps, each recomputed in backprop.

    The outer loop (a `tf.while_loop` over the full windows, so the graph does not grow with T)
    carries the inner state from window to window; backpropagating through it stores only that
    state per window. Each window is a `tf.custom_gradient` function of (state, learning rates,
    loss_args) whose gradient re-runs the window forward from its stored input under a fresh tape
    and returns the vector-Jacobian product of the whole window map. The map contains the inner
    gradients, so its Jacobian holds the Hessian terms: exact second order.
    """
    # tensor learning rates (Meta-SGD) are inputs of each window, so they get their gradients
    if learning_rate is None or isinstance(learning_rate, (int, float)):
        rates, as_rate = [], lambda rates: learning_rate
    elif isinstance(learning_rate, (list, tuple)):
        rates, as_rate = list(learning_rate), list
    else:
        rates, as_rate = [learning_rate], lambda rates: rates[0]
    extra = (rates, list(loss_args))  # loss_args ends with the `constants` loss constants

    def segment(length: int):
        @tf.custom_gradient
        def run_window(*flat):
            (t, params, state, acc), (rate, args) = tf.nest.pack_sequence_as(structure, flat)
            out = tf.nest.flatten(advance(t, params, state, acc, length,
                                          as_rate(rate), args))

            def grad(*out_grads, variables=None):
                # fresh, distinct tensors: an input tensor that appears twice in `flat` (e.g.
                # Adam's zero moments) must not collect both positions' gradients twice
                inputs = [tf.identity(x) for x in flat]
                wrt = [i for i, x in enumerate(inputs[:len(inputs) - constants])
                       if x.dtype.is_floating]
                # variables read in the window: the model's non-trainable state (BatchNorm
                # statistics) takes no gradient; a trainable one read directly by a loss does
                variables = list(variables or [])
                trainable = [v for v in variables if getattr(v, "trainable", False)]
                with tf.GradientTape() as tape:
                    tape.watch([inputs[i] for i in wrt])
                    (t, params, state, acc), (rate, args) = tf.nest.pack_sequence_as(structure, inputs)
                    again = tf.nest.flatten(advance(t, params, state, acc, length,
                                                    as_rate(rate), args))
                ys, dys = [], []
                for y, dy in zip(again, out_grads):
                    if y.dtype.is_floating:
                        ys.append(y)
                        dys.append(tf.zeros_like(y) if dy is None else tf.cast(dy, y.dtype))
                grads = tape.gradient(ys, [inputs[i] for i in wrt] + trainable, output_gradients=dys,
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
                input_grads = [None] * len(inputs)
                for i, g in zip(wrt, grads):
                    input_grads[i] = g
                by_variable = {id(v): g for v, g in zip(trainable, grads[len(wrt):])}
                return input_grads, [by_variable.get(id(v)) for v in variables]

            return out, grad

        def call(t, params, state, acc):
            flat = tf.nest.flatten(((t, params, state, acc), extra))
            out = run_window(*flat)
            return tf.nest.pack_sequence_as((t, params, state, acc), list(out))

        return call

    structure = ((carry[0], carry[1], carry[2], carry[3]), extra)
    t, params, state, acc = carry
    full, rest = divmod(steps, window)
    if full:
        step = segment(window)
        if unroll or full == 1:
            for _ in range(full):
                t, params, state, acc = step(t, params, state, acc)
        else:
            t, params, state, acc = tf.while_loop(
                lambda t, *_: t < full * window, step, (t, params, state, acc),
                parallel_iterations=1,
            )
    if rest:
        t, params, state, acc = segment(rest)(t, params, state, acc)
    return t, params, state, acc
