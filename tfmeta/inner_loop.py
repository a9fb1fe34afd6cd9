"""The differentiable inner loop: T optimizer steps on a task's support loss.

One function, :func:`run`, shared by every estimator. The steps run in a `tf.while_loop` (graph
size does not grow with T; second-order gradients through it are exact in TF 2.21) or, with
``unroll=True``, as T copies of the step (about 20% faster per step on CPU, about 1 s more
compile time per step).

With ``second_order=True`` each inner gradient is itself differentiable, so a tape around `run`
yields the exact MAML meta-gradient, backpropagated through all T steps (Eq. 3-4 of
000_6b55c9a7831360bd.txt). With ``second_order=False`` the inner gradients are constants
(`tf.stop_gradient`), which is first-order MAML's approximation.

``reuse_window=n`` evaluates the task gradient once at the start of each window of n steps and
reuses it for the n optimizer steps of that window (Eq. 11-12 of 000_6b55c9a7831360bd.txt): only
ceil(T/n) gradient evaluations, and as many Hessian-vector products in backpropagation. When n
does not divide T the last window is shorter (T mod n steps).

Random layers (Dropout) draw fresh randomness for each gradient evaluation: the step index is
folded into the open seed scope of :mod:`tfmeta.randomness`.

An :class:`Observer` accumulates statistics along the trajectory (path length, gradient norms,
gradient differences) without keeping the trajectory: the linearity metrics and the reuse
estimator's gradient-difference metric are observers.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import tensorflow as tf

from tfmeta import inner_optimizers, randomness


class Observer(NamedTuple):
    """Statistics accumulated along the inner trajectory.

    ``init(params) -> acc`` (a nest of tensors) and
    ``update(acc, step, params, grads, new_params) -> acc``, called after every optimizer step
    with the iterate before the step, the gradient used (a reused one inside a window) and the
    iterate after it. `step` is the 0-based step index as an int32 tensor.
    """

    init: Callable[[list], Any]
    update: Callable[..., Any]


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
):
    """Adapt `params` by `steps` optimizer steps on `loss_fn(params)`.

    Args:
        loss_fn: the inner objective as a function of the adapted tensors.
        params: the starting point phi_1 (e.g. the meta-learned initialization theta).
        optimizer: an :class:`~tfmeta.inner_optimizers.InnerOptimizer`.
        steps: T >= 0, a Python int.
        learning_rate: None, a scalar, or one tensor per parameter (Meta-SGD).
        second_order: keep the inner gradients differentiable (exact MAML) or stop them.
        unroll: Python-unroll the steps instead of a `tf.while_loop`.
        reuse_window: n >= 1, optimizer steps per gradient evaluation (1: every step).
        observer: optional :class:`Observer`.

    Returns:
        The last iterate (a list), or ``(last iterate, observer accumulator)`` with an observer.
    """
    if isinstance(reuse_window, bool) or not isinstance(reuse_window, int) or reuse_window < 1:
        raise ValueError(f"reuse_window={reuse_window!r} is not valid: expected an integer >= 1.")
    params = list(params)
    state = optimizer.init(params)
    acc = observer.init(params) if observer is not None else ()

    def gradient(params):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = loss_fn(params)
        grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grads if second_order else [tf.stop_gradient(g) for g in grads]

    def window(t, params, state, acc, length: int):
        """One gradient evaluation, then `length` optimizer steps with that gradient."""
        with randomness.fold(t):  # random layers: fresh masks for each gradient evaluation
            grads = gradient(params)
        for j in range(length):
            new_params, state = inner_optimizers.step(optimizer, params, grads, state, learning_rate)
            if observer is not None:
                acc = observer.update(acc, t + j, params, grads, new_params)
            params = new_params
        return t + length, params, state, acc

    full, rest = divmod(steps, reuse_window)
    t = tf.constant(0)
    if unroll or full <= 1:
        for _ in range(full):
            t, params, state, acc = window(t, params, state, acc, reuse_window)
    else:
        t, params, state, acc = tf.while_loop(
            lambda t, *_: t < full * reuse_window,
            lambda t, p, s, a: window(t, p, s, a, reuse_window),
            (t, params, state, acc),
            parallel_iterations=1,
        )
    if rest:
        t, params, state, acc = window(t, params, state, acc, rest)
    return (params, acc) if observer is not None else params
