"""Inner optimizers against hand-written NumPy references, step by step."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfmeta.core import inner_optimizers as io


def _gradients(steps, shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s) for s in shapes] for _ in range(steps)]


def _run(opt, params, grad_seq, lr=None):
    params = [tf.constant(p) for p in params]
    state = opt.init(params)
    out = []
    for grads in grad_seq:
        params, state = io.step(opt, params, [tf.constant(g) for g in grads], state, lr)
        out.append([p.numpy() for p in params])
    return out


SHAPES = [(3, 2), (2,)]


def test_sgd_matches_numpy():
    grads = _gradients(4, SHAPES)
    phi = [np.ones(s) for s in SHAPES]
    got = _run(io.sgd(0.3), phi, grads)
    for t, g in enumerate(grads):
        phi = [p - 0.3 * gi for p, gi in zip(phi, g)]
        for a, b in zip(got[t], phi):
            np.testing.assert_allclose(a, b, rtol=1e-12)


def test_momentum_with_weight_decay_matches_eq5():
    """v <- mu v + g + omega phi; phi <- phi - eta v (Kim et al. 2020, Eq. 5)."""
    eta, mu, omega = 0.2, 0.9, 0.05
    grads = _gradients(5, SHAPES, seed=1)
    phi = [np.linspace(-1, 1, np.prod(s)).reshape(s) for s in SHAPES]
    got = _run(io.momentum(eta, mu, omega), phi, grads)
    v = [np.zeros(s) for s in SHAPES]
    for t, g in enumerate(grads):
        v = [mu * vi + gi + omega * p for vi, gi, p in zip(v, g, phi)]
        phi = [p - eta * vi for p, vi in zip(phi, v)]
        for a, b in zip(got[t], phi):
            np.testing.assert_allclose(a, b, rtol=1e-12)


def test_adam_matches_numpy_with_eps_root():
    lr, b1, b2, eps, eps_root = 0.01, 0.9, 0.999, 1e-8, 1e-10
    grads = _gradients(6, SHAPES, seed=2)
    phi = [np.zeros(s) for s in SHAPES]
    got = _run(io.adam(lr, b1, b2, eps, eps_root), phi, grads)
    m = [np.zeros(s) for s in SHAPES]
    v = [np.zeros(s) for s in SHAPES]
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi**2 for vi, gi in zip(v, g)]
        phi = [p - lr * (mi / (1 - b1**t)) / (np.sqrt(vi / (1 - b2**t) + eps_root) + eps)
               for p, mi, vi in zip(phi, m, v)]
        for a, b in zip(got[t - 1], phi):
            np.testing.assert_allclose(a, b, rtol=1e-10)


def test_per_parameter_learning_rates():
    grads = _gradients(1, SHAPES)
    rates = [np.full(s, 0.5) * np.arange(1, np.prod(s) + 1).reshape(s) for s in SHAPES]
    got = _run(io.sgd(1.0), [np.zeros(s) for s in SHAPES], grads, lr=[tf.constant(r) for r in rates])
    for a, r, g in zip(got[0], rates, grads[0]):
        np.testing.assert_allclose(a, -r * g, rtol=1e-12)


def test_meta_gradient_through_adam_is_finite_at_zero_gradient():
    """d/dtheta through sqrt(v) with a gradient that is exactly zero must not be NaN."""
    theta = tf.constant([1.0, 2.0], tf.float64)
    opt = io.adam(0.1)
    with tf.GradientTape() as outer:
        outer.watch(theta)
        params = [theta]
        state = opt.init(params)
        for _ in range(3):
            with tf.GradientTape() as inner:
                inner.watch(params)
                loss = tf.square(params[0][0] - 3.0)  # the second coordinate gets gradient 0
            grads = inner.gradient(loss, params)
            params, state = io.step(opt, params, grads, state)
        outer_loss = tf.reduce_sum(tf.square(params[0]))
    g = outer.gradient(outer_loss, theta)
    assert np.all(np.isfinite(g.numpy())), g


@pytest.mark.parametrize(
    "factory,kwargs,name",
    [
        (io.sgd, {"learning_rate": 0.0}, "learning_rate"),
        (io.momentum, {"momentum": 1.5}, "momentum"),
        (io.momentum, {"weight_decay": -1.0}, "weight_decay"),
        (io.adam, {"eps_root": 0.0}, "eps_root"),
        (io.adam, {"b2": 1.0}, "b2"),
    ],
)
def test_bad_hyperparameters_name_the_argument(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_unknown_inner_optimizer():
    with pytest.raises(ValueError, match="inner_optimizer"):
        io.get("rmsprop", 0.1)
