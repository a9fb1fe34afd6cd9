"""The reuse estimator (multi-step estimation, Kim et al. 2020) against the paper's identities.

(a) SGD: window n with K windows == MAML with learning rate n*eta and K steps (Eq. 14-15);
(b) momentum: it is not (Eq. 13, Prop. 1); Lemma 1's recursion (Eq. 32-35) gives Appendix C's
    numbers and predicts the estimator's iterates and meta-gradient on a quadratic;
(c) n = 1 is MAML exactly; (d) the meta-gradient equals finite differences of the estimated
    dynamics; bad input; the gradient-difference metric of Fig. 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras

from conftest import classification_tasks, fd_check, small_dense, smooth_conv_bn
from tfmeta import estimators
from tfmeta.app import cli
from tfmeta.core import inner_optimizers
from tfmeta.estimators.base import Task
from tfmeta.estimators.reuse import (
    Reuse, gradient_difference_observer, momentum_window_coefficients,
    rescaled_one_step_hyperparameters,
)
from tfmeta.core.learner import MetaLearner
from tfmeta.training import MetaTrainer


def _meta_gradient(learner, tasks, est):
    return tf.function(lambda values: est.meta_gradient(learner, tasks, values))(learner.meta_values())


def _adapted(learner, tasks, est, i=0):
    meta = learner.unflatten(learner.meta_values())
    return est.adapted_params(learner, meta, Task(*(t[i] for t in tasks)))


def _fd_error(learner, tasks, est):
    error, analytic, result = fd_check(learner, tasks, est)
    assert abs(analytic) > 1e-6
    return error, result


def _max_rel_gap(a, b):
    num = max(float(tf.reduce_max(tf.abs(x - y))) for x, y in zip(a, b))
    return num / max(float(tf.reduce_max(tf.abs(y))) for y in b)


def _weigher_loss(weigher):
    """An inner loss whose per-example weights come from a meta-network (Sec. 2.2)."""

    def inner_loss(learner, params, meta, x, y):
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=learner.fmodel(params, x))
        weights, _ = weigher.stateless_call(meta.net, [], x)
        return tf.reduce_mean(weights[:, 0] * losses)

    return inner_loss


def _weigher(seed=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="softplus")])


def _reference(learner, tasks, window, eta, mu=0.0, omega=0.0):
    """Eq. 11-12 written out, independently of tfmeta's inner loop: eagerly, a Python loop over
    the T steps, the task gradient evaluated at steps 0, n, 2n, ... and reused in between, Eq. 5's
    momentum step by hand (mu = omega = 0: SGD), one tape around everything. All weights adapt.
    Returns (mean query loss, meta-gradient, mean over tasks of the gradient-difference metric)."""
    values = learner.meta_values()
    count = int(tasks[0].shape[0])
    differences = []
    with tf.GradientTape() as tape:
        tape.watch(values)
        meta = learner.unflatten(values)
        total = 0.0
        for i in range(count):
            sx, sy, qx, qy = (t[i] for t in tasks)
            phi, velocity, evaluated = list(meta.init), [tf.zeros_like(p) for p in meta.init], []
            for step in range(learner.inner_steps):
                if step % window == 0:
                    with tf.GradientTape() as inner:
                        inner.watch(phi)
                        support = learner.inner_loss(phi, meta, sx, sy)
                    grads = inner.gradient(support, phi)
                    evaluated.append(grads)
                velocity = [mu * v + g + omega * p for v, g, p in zip(velocity, grads, phi)]
                phi = [p - eta * v for p, v in zip(phi, velocity)]
            total += learner.outer_loss(phi, meta, qx, qy)[0] / count
            flat = [np.concatenate([g.numpy().ravel() for g in gs]) for gs in evaluated]
            ratios = [np.linalg.norm(b - a) / np.linalg.norm(b) for a, b in zip(flat, flat[1:])]
            differences.append(np.mean(ratios) if ratios else 0.0)
    return float(total), tape.gradient(total, values), float(np.mean(differences))


# -- (a) SGD: Eq. 14-15 ------------------------------------------------------------------------
@pytest.mark.parametrize("window,windows,meta_network", [(2, 2, False), (3, 2, True), (4, 1, False)])
def test_sgd_reuse_equals_maml_with_rescaled_rate(float64, window, windows, meta_network):
    """n steps with one gradient == one step of n*eta; K windows == K MAML steps (Eq. 14-15)."""
    eta = 0.15
    model = small_dense()
    extra = {}
    if meta_network:
        weigher = _weigher()
        extra = dict(meta_network=weigher, inner_loss=_weigher_loss(weigher))
    reuse_learner = MetaLearner(model, inner_lr=eta, inner_steps=window * windows, **extra)
    maml_learner = MetaLearner(model, inner_lr=window * eta, inner_steps=windows, **extra)
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    reuse, maml = Reuse(reuse_window=window), estimators.get("maml")

    for a, b in zip(_adapted(reuse_learner, tasks, reuse, 1), _adapted(maml_learner, tasks, maml, 1)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-9)
    got, want = _meta_gradient(reuse_learner, tasks, reuse), _meta_gradient(maml_learner, tasks, maml)
    np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-6)
    for a, b in zip(got.grads, want.grads):
        assert float(tf.reduce_max(tf.abs(b))) > 0
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-9)
    # and it is not exact MAML with T = n K steps of eta: the estimate is a real approximation
    exact = _meta_gradient(reuse_learner, tasks, maml)
    assert _max_rel_gap(got.grads, exact.grads) > 1e-3


# -- (b) momentum: Eq. 13, Lemma 1, Proposition 1 -----------------------------------------------
def test_momentum_reuse_differs_from_maml_with_rescaled_rate(float64):
    """With momentum the reused gradient does not amount to a rescaled learning rate (Prop. 1)."""
    eta, mu, omega, window, windows = 0.1, 0.9, 1e-4, 2, 2
    model = small_dense()
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    reuse_learner = MetaLearner(model, inner_optimizer=inner_optimizers.momentum(eta, mu, omega),
                                inner_steps=window * windows)
    maml_learner = MetaLearner(model, inner_optimizer=inner_optimizers.momentum(window * eta, mu, omega),
                               inner_steps=windows)
    reuse, maml = Reuse(reuse_window=window), estimators.get("maml")
    phi_reuse = _adapted(reuse_learner, tasks, reuse)
    phi_maml = _adapted(maml_learner, tasks, maml)
    moved = max(float(tf.reduce_max(tf.abs(p - t))) for p, t in zip(phi_maml, model.trainable_variables))
    differ = max(float(tf.reduce_max(tf.abs(p - q))) for p, q in zip(phi_reuse, phi_maml))
    assert differ > 1e-2 * moved, (differ, moved)
    got = _meta_gradient(reuse_learner, tasks, reuse)
    gap = _max_rel_gap(got.grads, _meta_gradient(maml_learner, tasks, maml).grads)
    assert gap > 1e-2, gap
    # ... and it is the windowed dynamics of Eq. 11-12, not the T-step trajectory with a fresh
    # gradient every step (the window ignored) nor a different window
    loss, reference, _ = _reference(reuse_learner, tasks, window, eta, mu, omega)
    np.testing.assert_allclose(float(got.loss), loss, rtol=1e-12)
    assert _max_rel_gap(got.grads, reference) < 1e-10
    for other in (1,):  # the window ignored
        _, wrong, _ = _reference(reuse_learner, tasks, other, eta, mu, omega)
        assert _max_rel_gap(got.grads, wrong) > 1e-3, other


def test_lemma1_recursion_gives_the_numbers_of_appendix_c():
    """Eq. 44-47 closed forms, Eq. 52-54 construction, and b~_4 (about -1.88) != b_7 (about -1.78)."""
    mu, omega, eta = 0.9, 1e-4, 0.1
    c = momentum_window_coefficients(6, momentum=mu, weight_decay=omega, learning_rate=eta)
    np.testing.assert_allclose(c.b_phi[1], -eta, rtol=1e-15)                                 # Eq. 44
    np.testing.assert_allclose(c.c_phi[1], 1 - eta * omega, rtol=1e-15)                      # Eq. 45
    np.testing.assert_allclose(c.b_phi[2], -eta * (mu + 2 - eta * omega), rtol=1e-14)        # Eq. 46
    np.testing.assert_allclose(c.c_phi[2], -eta * mu * omega + (1 - eta * omega) ** 2, rtol=1e-14)  # Eq. 47

    eta_t, omega_t, mu_t = rescaled_one_step_hyperparameters(momentum=mu, weight_decay=omega,
                                                             learning_rate=eta)
    np.testing.assert_allclose(eta_t, 0.289999, rtol=1e-12)
    np.testing.assert_allclose(omega_t, omega, rtol=1e-12)  # Eq. 53 simplifies to omega
    t = momentum_window_coefficients(3, momentum=mu_t, weight_decay=omega_t, learning_rate=eta_t)
    # the construction of Eq. 50-54: phi~_2 = phi_3 and phi~_3 = phi_5
    np.testing.assert_allclose([t.b_phi[1], t.c_phi[1], t.b_phi[2]], [c.b_phi[2], c.c_phi[2], c.b_phi[4]],
                               rtol=1e-12)
    b7, b4_tilde = c.b_phi[6], t.b_phi[3]
    assert round(b7, 2) == -1.78 and round(b4_tilde, 2) == -1.88, (b7, b4_tilde)
    np.testing.assert_allclose([b7, b4_tilde], [-1.7829093922, -1.8837397130], rtol=1e-9)
    # and plain SGD (mu = omega = 0) is the rescaled rate of Eq. 14: b_{n+1} = -n eta, c = 1
    s = momentum_window_coefficients(5, momentum=0.0, weight_decay=0.0, learning_rate=eta)
    np.testing.assert_allclose(s.b_phi, -eta * np.arange(6), rtol=1e-14)
    np.testing.assert_allclose(s.c_phi, np.ones(6))


def _quadratic_learner(h, a, w, optimizer, steps):
    """phi = one kernel [1, 3]; inner loss 0.5 sum h phi^2 - a.phi; outer loss w.phi."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(3, use_bias=False)])
    model.set_weights([np.array([[0.7, -1.3, 0.4]])])
    h, a, w = (tf.constant(v.reshape(1, 3)) for v in (h, a, w))
    return MetaLearner(
        model, task="regression", inner_optimizer=optimizer, inner_steps=steps,
        inner_loss=lambda learner, p, meta, x, y: (0.5 * tf.reduce_sum(h * p[0] ** 2)
                                                   - tf.reduce_sum(a * p[0])),
        outer_loss=lambda learner, p, meta, x, y: tf.reduce_sum(w * p[0]),
    )


def test_lemma1_predicts_the_estimators_iterates_and_meta_gradient(float64):
    """On a quadratic the gradient is constant within a window, so Lemma 1 (with a starting velocity)
    gives the iterates of every window, the shorter last one included, and Eq. 13's Jacobian."""
    eta, mu, omega, window, steps = 0.1, 0.9, 0.05, 3, 10   # windows of 3, 3, 3, 1
    h, a, w = np.array([2.0, 0.5, 4.0]), np.array([0.3, -0.2, 1.0]), np.array([1.0, -2.0, 0.5])
    learner = _quadratic_learner(h, a, w, inner_optimizers.momentum(eta, mu, omega), steps)
    tasks = (tf.zeros([1, 2, 1], tf.float64), tf.zeros([1, 2, 3], tf.float64),
             tf.zeros([1, 2, 1], tf.float64), tf.zeros([1, 2, 3], tf.float64))
    est = Reuse(reuse_window=window)

    phi, v = learner.model.get_weights()[0][0], np.zeros(3)
    jacobian = np.tile(np.eye(2), (3, 1, 1))  # d(phi, v)/d theta per coordinate
    grads, t = [], 0
    while t < steps:
        n = min(window, steps - t)
        c = momentum_window_coefficients(n, momentum=mu, weight_decay=omega, learning_rate=eta)
        g = h * phi - a
        grads.append(g)
        phi, v = (c.b_phi[n] * g + c.c_phi[n] * phi + c.d_phi[n] * v,
                  c.b_v[n] * g + c.c_v[n] * phi + c.d_v[n] * v)
        step = np.stack([np.stack([c.c_phi[n] + c.b_phi[n] * h, np.full(3, c.d_phi[n])], -1),
                         np.stack([c.c_v[n] + c.b_v[n] * h, np.full(3, c.d_v[n])], -1)], -2)
        jacobian = step @ jacobian
        t += n
    assert len(grads) == 4

    np.testing.assert_allclose(_adapted(learner, tasks, est)[0].numpy()[0], phi, rtol=1e-12)
    result = _meta_gradient(learner, tasks, est)
    np.testing.assert_allclose(float(result.loss), w @ phi, rtol=1e-12)
    np.testing.assert_allclose(result.grads[0].numpy()[0], w * jacobian[:, 0, 0], rtol=1e-10)
    ratios = [np.linalg.norm(g1 - g0) / np.linalg.norm(g1) for g0, g1 in zip(grads, grads[1:])]
    np.testing.assert_allclose(float(result.metrics["grad_difference"]), np.mean(ratios), rtol=1e-10)
    # exact MAML on the same quadratic differs (10 gradient evaluations instead of 4)
    exact = _meta_gradient(learner, tasks, estimators.get("maml"))
    assert abs(float(exact.loss) - float(result.loss)) > 1e-3


# -- (c) n = 1 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", [inner_optimizers.momentum(0.2, 0.9, 0.01),
                                       inner_optimizers.adam(0.05)])
def test_window_one_is_maml_exactly(float64, optimizer):
    learner = MetaLearner(small_dense(), inner_optimizer=optimizer, inner_steps=3)
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    got = _meta_gradient(learner, tasks, Reuse(reuse_window=1))
    want = _meta_gradient(learner, tasks, estimators.get("maml"))
    assert float(got.loss) == float(want.loss)
    for a, b in zip(got.grads, want.grads):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert float(got.metrics["accuracy"]) == float(want.metrics["accuracy"])


# -- (d) finite differences of the estimated dynamics ---------------------------------------------
@pytest.mark.parametrize("model,optimizer,steps,window", [
    ("conv_bn", inner_optimizers.sgd(0.3), 4, 2),
    ("conv_bn", inner_optimizers.momentum(0.2, 0.9, 0.01), 3, 2),
    ("dense", inner_optimizers.momentum(0.3, 0.9, 1e-3), 5, 2),
    ("dense", inner_optimizers.adam(0.05), 4, 3),
])
def test_meta_gradient_matches_finite_differences(float64, model, optimizer, steps, window):
    if model == "conv_bn":
        net, shape = smooth_conv_bn(), (6, 6, 1)
    else:
        net, shape = small_dense(), (4,)
    learner = MetaLearner(net, inner_optimizer=optimizer, inner_steps=steps)
    tasks = classification_tasks(2, 3, 2, 3, shape)
    error, result = _fd_error(learner, tasks, Reuse(reuse_window=window))
    assert error < 1e-5, error
    # the estimate really differs from exact MAML: the check is of the estimated dynamics
    exact = _meta_gradient(learner, tasks, estimators.get("maml"))
    assert _max_rel_gap(result.grads, exact.grads) > 1e-4


@pytest.mark.parametrize("model,steps,window", [("conv_bn", 4, 3), ("dense", 5, 2)])
def test_meta_gradient_equals_the_written_out_dynamics(float64, model, steps, window):
    """The finite-difference checks above differentiate the estimator's own loss; this compares
    the estimator with an independent implementation of Eq. 11-12 (a shorter last window too)."""
    net, shape = (smooth_conv_bn(), (6, 6, 1)) if model == "conv_bn" else (small_dense(), (4,))
    eta, mu, omega = 0.2, 0.9, 0.01
    learner = MetaLearner(net, inner_optimizer=inner_optimizers.momentum(eta, mu, omega),
                          inner_steps=steps)
    tasks = classification_tasks(2, 3, 2, 3, shape)
    got = _meta_gradient(learner, tasks, Reuse(reuse_window=window))
    loss, reference, difference = _reference(learner, tasks, window, eta, mu, omega)
    np.testing.assert_allclose(float(got.loss), loss, rtol=1e-12)
    assert _max_rel_gap(got.grads, reference) < 1e-10
    np.testing.assert_allclose(float(got.metrics["grad_difference"]), difference, rtol=1e-9)


def test_meta_network_and_meta_sgd_gradients_match_finite_differences(float64):
    """Meta-network weights inside the inner loss (Sec. 2.2) get the gradient of the estimate."""
    weigher = _weigher()
    learner = MetaLearner(small_dense(), inner_optimizer=inner_optimizers.momentum(0.3, 0.9, 1e-3),
                          inner_steps=4, meta_sgd=True, meta_network=weigher,
                          inner_loss=_weigher_loss(weigher))
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    error, result = _fd_error(learner, tasks, Reuse(reuse_window=2))
    assert error < 1e-5, error
    meta = learner.unflatten(result.grads)
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in meta.lr + meta.net)


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [0, -2, 2.5, 2.0, True, "2", None])
def test_bad_window_is_rejected(window):
    with pytest.raises(ValueError, match="reuse_window"):
        estimators.get("reuse", reuse_window=window)


def test_window_larger_than_inner_steps_is_rejected(float64):
    learner = MetaLearner(small_dense(), inner_steps=3)
    tasks = classification_tasks(1, 3, 1, 1, (4,))
    est = Reuse(reuse_window=4)
    with pytest.raises(ValueError, match=r"reuse_window=4 .*inner_steps=3"):
        est.check(learner)
    with pytest.raises(ValueError, match="reuse_window=4"):
        MetaTrainer(learner, est)
    with pytest.raises(ValueError, match="reuse_window=4"):
        est.meta_gradient(learner, tasks)
    Reuse(reuse_window=3).check(learner)  # n = T is one window


def test_coefficient_functions_reject_bad_input():
    with pytest.raises(ValueError, match="steps"):
        momentum_window_coefficients(-1, momentum=0.9, weight_decay=0.0, learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        momentum_window_coefficients(3, momentum=0.9, weight_decay=0.0, learning_rate=0.0)
    with pytest.raises(ValueError, match="momentum"):
        rescaled_one_step_hyperparameters(momentum=float("nan"), weight_decay=0.0, learning_rate=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        momentum_window_coefficients(3, momentum=0.9, weight_decay=-1e-4, learning_rate=0.1)
    with pytest.raises(ValueError, match="window"):
        gradient_difference_observer(0)


def test_cli_exposes_reuse_window(capsys):
    args = cli._parser().parse_args(["bench", "--estimator", "reuse", "--reuse-window", "4"])
    assert cli.estimator_options(args) == {"reuse_window": 4}
    assert cli.main(["bench", "--estimator", "reuse", "--reuse-window", "9", "--inner-steps", "8",
                     "--steps", "1", "--meta-batch", "1"]) == 2
    assert "reuse_window=9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--estimator", "reuse", "--reuse-window", "2.5"])


# -- the gradient-difference metric (Fig. 1) ----------------------------------------------------
def test_gradient_difference_is_zero_for_a_linear_loss(float64):
    coefficients = tf.constant(np.linspace(-1.0, 1.0, 20).reshape(4, 5))
    learner = MetaLearner(
        small_dense(), inner_optimizer=inner_optimizers.momentum(0.1, 0.9, 0.0), inner_steps=4,
        inner_loss=lambda learner, p, meta, x, y: tf.reduce_sum(coefficients * p[0]),
    )
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    for window in (1, 2):
        result = _meta_gradient(learner, tasks, Reuse(reuse_window=window))
        assert float(result.metrics["grad_difference"]) == 0.0


def test_gradient_difference_is_finite_and_positive_on_a_network(float64):
    learner = MetaLearner(smooth_conv_bn(), inner_lr=0.3, inner_steps=4)
    tasks = classification_tasks(2, 3, 2, 3, (6, 6, 1))
    est = Reuse(reuse_window=2)
    assert est.metric_names(learner) == ("accuracy", "grad_difference")
    value = float(_meta_gradient(learner, tasks, est).metrics["grad_difference"])
    assert np.isfinite(value) and 0 < value < 2
    # the value itself: mean over tasks of mean_k ||g_{k+1} - g_k|| / ||g_{k+1}|| over the
    # evaluated gradients (Fig. 1), from the written-out trajectory
    _, _, reference = _reference(learner, tasks, 2, 0.3)
    np.testing.assert_allclose(value, reference, rtol=1e-9)


def test_linearity_metrics_ride_along_without_changing_the_meta_gradient(float64):
    learner = MetaLearner(small_dense(), inner_optimizer=inner_optimizers.momentum(0.2, 0.9, 0.01),
                          inner_steps=4)
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    plain = _meta_gradient(learner, tasks, Reuse(reuse_window=2))
    watched = _meta_gradient(learner, tasks, Reuse(reuse_window=2, linearity_metrics=True))
    assert {"grad_difference", "phase_consistency", "amplitude_consistency"} <= set(watched.metrics)
    assert float(watched.metrics["grad_difference"]) == float(plain.metrics["grad_difference"])
    for a, b in zip(watched.grads, plain.grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-15)
