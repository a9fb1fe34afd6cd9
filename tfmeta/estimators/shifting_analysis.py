"""The approximation error of continual trajectory shifting (Shin et al. 2021, Sec. 3.3).

Trajectory shifting approximates the k-step learner from the shifted initialization,
U_k(phi + Delta_1 + ... + Delta_{k-1}), by shifting a running trajectory by every meta-update.
:func:`approximation_error` measures the gap for one draw of synthetic meta-updates, as the
supplementary (C.4) does; Eq. 5 bounds it by O(beta alpha h k^2 + beta^2 k). It is analysis, not an
estimator: the estimator itself is :mod:`tfmeta.estimators.shifting`.

References:
    Shin, J., Lee, H. B., Gong, B., Hwang, S. J. "Large-Scale Meta-Learning with Continual
    Trajectory Shifting." ICML 2021. arXiv:2102.07215.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tfmeta.core import checks, inner_optimizers
from tfmeta.core.task import Task

__all__ = ["approximation_error"]


def approximation_error(learner, task, *, alpha: float, beta: float, k: int, seed: int = 0,
                        meta_values=None) -> float:
    """||epsilon||_2 of Shin et al. 2021, Eq. 2 (supplementary C.4) for one draw.

    epsilon = U_k(phi + Delta_1 + ... + Delta_{k-1}) - U_1(... U_1(U_1(phi) + Delta_1) ... + Delta_{k-1})

    with U vanilla SGD of learning rate `alpha` on the task's support loss, and synthetic
    meta-updates Delta_i = beta * x_i / ||x_i||_2, x_i ~ N(0, I) over the adapted weights (the
    same sequence in both terms), as in supplementary C.4. Eq. 5 bounds it by
    O(beta alpha h k^2 + beta^2 k): it grows with alpha, beta and k (Fig. 3), and is exactly 0 for
    k = 1 or beta = 0.

    Example:
        >>> approximation_error(learner, task, alpha=0.1, beta=0.01, k=10)  # doctest: +SKIP
        0.0009...
    """
    alpha = checks.number("alpha", alpha, above=0.0, convert=True)
    beta = checks.number("beta", beta, at_least=0.0, convert=True)
    k = checks.integer("k", k, 1)
    seed = checks.integer("seed", seed, 0)
    task = Task(*task)
    meta = learner.unflatten(learner.meta_values() if meta_values is None else list(meta_values))
    phi = [meta.init[i] for i in learner.fmodel.adapted]
    dtype = learner.dtype
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(k - 1):
        x = [rng.normal(size=p.shape) for p in phi]
        norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in x))
        deltas.append([tf.constant(beta * v / norm, dtype) for v in x])
    sgd = inner_optimizers.sgd(alpha)

    @tf.function
    def step(theta):
        grads = _gradient(learner, meta, theta, task.support_x, task.support_y)
        return inner_optimizers.step(sgd, theta, grads, ())[0]

    exact = [p + sum(d[j] for d in deltas) if deltas else p for j, p in enumerate(phi)]
    for _ in range(k):
        exact = step(exact)
    shifted = list(phi)
    for i in range(k):
        shifted = step(shifted)
        if i < k - 1:
            shifted = [t + d for t, d in zip(shifted, deltas[i])]
    return math.sqrt(sum(float(tf.reduce_sum(tf.square(e - s))) for e, s in zip(exact, shifted)))


def _gradient(learner, meta, theta, x, y):
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = learner.inner_loss(learner.fmodel.merge(list(meta.init), theta), meta, x, y)
    return tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)


