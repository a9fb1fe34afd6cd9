"""LIL (LIL): linearity metrics PC/AC (Eq. 3-4), phase and pseudo-amplitude
regularizers (Eq. 7-9), the linearity estimator, PC/AC for any estimator, LIL pre-training."""

from __future__ import annotations

import json
import threading

import hypothesis
import hypothesis.strategies as st
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import classification_tasks, small_dense, smooth_conv_bn
from tfmeta import estimators
from tfmeta.app import cli
from tfmeta.core import inner_optimizers, linearity, models
from tfmeta.estimators.base import Estimator, Task
from tfmeta.estimators.linearity import Linearity, LILPretraining
from tfmeta.estimators.maml import MAML
from tfmeta.core.learner import MetaLearner
from tfmeta.training import MetaTrainer, recipes


class _ReuseLike(MAML):
    """A MAML subclass overriding adapted_params with a gradient-reuse window (like "reuse")."""

    name = ""

    def __init__(self, window=2):
        super().__init__()
        self.window = window

    def adapted_params(self, learner, meta, task, observer=None):
        return learner.adapt(meta, task.support_x, task.support_y, second_order=True,
                             reuse_window=self.window, observer=observer)


def _flat(tensors):
    return np.concatenate([np.ravel(np.asarray(t)) for t in tensors])


def _reference(learner, task, window=1, values=None, with_query=False):
    """Eq. 3, 4, 7-9 from an explicitly stored trajectory (Python loop, NumPy norms), at the
    meta-parameters `values` (default the learner's); `with_query` adds the query loss."""
    meta = learner.unflatten(learner.meta_values() if values is None else values)
    sx, sy, qx, qy = task

    def grad(theta):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = learner.inner_loss(learner.fmodel.merge(meta.init, theta), meta, sx, sy)
        return tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    opt = learner.inner_optimizer
    theta = [meta.init[i] for i in learner.fmodel.adapted]
    state, trajectory, used = opt.init(theta), [theta], []
    for k in range(learner.inner_steps):
        if k % window == 0:
            g = grad(theta)
        used.append(g)
        theta, state = inner_optimizers.step(opt, theta, g, state, list(meta.lr) or None)
        trajectory.append(theta)
    points = [_flat(t) for t in trajectory]
    path = sum(np.linalg.norm(b - a) for a, b in zip(points, points[1:]))
    norms = [np.linalg.norm(_flat(g)) for g in used] + [np.linalg.norm(_flat(grad(theta)))]
    g0 = used[0]
    hat = [t - path / norms[0] * g for t, g in zip(trajectory[0], g0)]
    out_s = learner.fmodel(learner.fmodel.merge(meta.init, theta), qx).numpy()
    out_hat = learner.fmodel(learner.fmodel.merge(meta.init, hat), qx).numpy()
    if learner.task == "classification":
        log_p = out_s - np.log(np.exp(out_s).sum(-1, keepdims=True))
        log_q = out_hat - np.log(np.exp(out_hat).sum(-1, keepdims=True))
        phase = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))
    else:
        phase = np.mean(np.sum((out_s - out_hat) ** 2, -1))
    result = {
        "phase_consistency": path / np.linalg.norm(points[-1] - points[0]),
        "amplitude_consistency": np.mean(norms[1:]) / norms[0],
        "phase_loss": phase,
        "amplitude_loss": path,
    }
    if with_query:
        result["query_loss"] = float(learner.outer_loss(learner.fmodel.merge(meta.init, theta), meta,
                                                        qx, qy)[0])
    return result


def _one(tasks, i=0):
    return Task(*(t[i] for t in tasks))


def _sinusoid_tasks(meta_batch, shots, query, seed=0):
    rng = np.random.default_rng(seed)
    amp, phase = rng.uniform(0.1, 5, (meta_batch, 1, 1)), rng.uniform(0, np.pi, (meta_batch, 1, 1))
    sx, qx = rng.uniform(-5, 5, (meta_batch, shots, 1)), rng.uniform(-5, 5, (meta_batch, query, 1))
    return tuple(tf.constant(a) for a in (sx, amp * np.sin(sx + phase), qx, amp * np.sin(qx + phase)))


# -- the metrics and loss values -------------------------------------------------------------------
@pytest.mark.parametrize("optimizer,adapt", [
    ("sgd", "all"), ("momentum", "all"), ("adam", "all"), ("sgd", "head"), ("sgd", "body"),
])
def test_observer_matches_stored_trajectory(float64, optimizer, adapt):
    opt = {"sgd": inner_optimizers.sgd(0.8),
           "momentum": inner_optimizers.momentum(0.3, momentum=0.9, weight_decay=0.01),
           "adam": inner_optimizers.adam(0.1)}[optimizer]
    learner = MetaLearner(small_dense(), inner_optimizer=opt, inner_steps=4, adapt=adapt)
    task = _one(classification_tasks(1, 3, 2, 4, (4,)))
    measured = linearity.trajectory_metrics(learner, task)
    expected = _reference(learner, task)
    for key, value in expected.items():
        np.testing.assert_allclose(float(measured[key]), value, rtol=1e-10, err_msg=key)


def test_regression_phase_loss_is_squared_distance(float64):
    keras.utils.set_random_seed(0)
    learner = MetaLearner(models.mlp((8,), activation="tanh"), task="regression", inner_lr=0.05,
                          inner_steps=3)
    task = _one(_sinusoid_tasks(1, 5, 7))
    measured = linearity.trajectory_metrics(learner, task)
    expected = _reference(learner, task)
    assert expected["phase_loss"] > 1e-8
    for key, value in expected.items():
        np.testing.assert_allclose(float(measured[key]), value, rtol=1e-10, err_msg=key)


def test_estimator_metrics_with_reuse_window_match_stored_trajectory(float64):
    """The wrapper sees the base's own dynamics: a reuse window reuses g inside each window."""
    learner = MetaLearner(small_dense(), inner_lr=0.7, inner_steps=5)
    tasks = classification_tasks(1, 3, 2, 3, (4,))
    result = Linearity(base=_ReuseLike(window=2)).meta_gradient(learner, tasks)
    expected = _reference(learner, _one(tasks), window=2)
    assert abs(expected["phase_consistency"] - _reference(learner, _one(tasks))["phase_consistency"]) > 1e-6
    for key, value in expected.items():
        np.testing.assert_allclose(float(result.metrics[key]), value, rtol=1e-10, err_msg=key)


@hypothesis.settings(max_examples=25, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(
    seed=st.integers(0, 10_000),
    lr=st.floats(1e-3, 5.0),
    steps=st.integers(1, 4),
    optimizer=st.sampled_from(["sgd", "momentum", "adam"]),
)
def test_pc_at_least_one_and_ac_positive(float64, seed, lr, steps, optimizer):
    learner = MetaLearner(small_dense(seed=seed % 7), inner_optimizer=optimizer, inner_lr=lr,
                          inner_steps=steps)
    task = _one(classification_tasks(1, 3, 2, 2, (4,), seed=seed))
    metrics = linearity.trajectory_metrics(learner, task)
    assert float(metrics["phase_consistency"]) >= 1 - 1e-12
    assert float(metrics["amplitude_consistency"]) > 0
    assert float(metrics["phase_loss"]) >= -1e-15
    assert float(metrics["amplitude_loss"]) > 0
    # not only the bounds: the values of Eq. 3-4 from the stored trajectory
    expected = _reference(learner, task)
    for key in ("phase_consistency", "amplitude_consistency"):
        np.testing.assert_allclose(float(metrics[key]), expected[key], rtol=1e-8, err_msg=key)


@pytest.mark.parametrize("optimizer", [inner_optimizers.sgd(0.5),
                                       inner_optimizers.momentum(0.3, momentum=0.9)])
def test_linear_loss_is_perfectly_linear(float64, optimizer):
    """Constant gradient: PC = AC = 1 and theta_hat = theta^S, so the phase loss is 0."""
    model = small_dense()
    rng = np.random.default_rng(0)
    slopes = [tf.constant(rng.normal(size=v.shape)) for v in model.trainable_variables]

    def inner_loss(learner, params, meta, x, y):
        return tf.add_n([tf.reduce_sum(c * p) for c, p in zip(slopes, params)])

    learner = MetaLearner(model, inner_optimizer=optimizer, inner_steps=4, inner_loss=inner_loss)
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    for metrics in (linearity.trajectory_metrics(learner, _one(tasks)),
                    Linearity().meta_gradient(learner, tasks).metrics):
        assert abs(float(metrics["phase_consistency"]) - 1) < 1e-12
        assert abs(float(metrics["amplitude_consistency"]) - 1) < 1e-12
        assert abs(float(metrics["phase_loss"])) < 1e-14
        assert float(metrics["amplitude_loss"]) > 1


def test_nonlinear_model_with_large_inner_lr_has_pc_above_one(float64):
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    large = MetaLearner(small_dense(), inner_lr=6.0, inner_steps=5)
    small = MetaLearner(small_dense(), inner_lr=1e-3, inner_steps=5)
    pc_large = float(Linearity().meta_gradient(large, tasks).metrics["phase_consistency"])
    pc_small = float(Linearity().meta_gradient(small, tasks).metrics["phase_consistency"])
    assert pc_large > 1.2, pc_large
    assert 1 <= pc_small < 1 + 1e-3, pc_small


# -- the linearity estimator's meta-gradient -------------------------------------------------------
def _objective_fd(learner, tasks, est, eps=1e-5, seed=1):
    """Relative error of <grad, d> against a central difference of the weighted objective.

    Eager on purpose: tiny models run faster than a float64 second-order graph compiles."""

    def fn(values):
        return est.meta_gradient(learner, tasks, values)

    def objective(result):
        m = result.metrics
        return result.loss + est.phase_weight * m["phase_loss"] + est.amplitude_weight * m["amplitude_loss"]

    values = learner.meta_values()
    result = fn(values)
    rng = np.random.default_rng(seed)
    direction = [tf.constant(rng.normal(size=v.shape), v.dtype) for v in values]
    numeric = (float(objective(fn([v + eps * d for v, d in zip(values, direction)])))
               - float(objective(fn([v - eps * d for v, d in zip(values, direction)])))) / (2 * eps)
    analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(result.grads, direction))
    return abs(numeric - analytic) / max(abs(analytic), 1e-12), analytic


def _zero_outer_loss(learner, params, meta, x, y):
    return tf.zeros([], learner.dtype)


@pytest.mark.parametrize("case", ["dense", "conv_bn_regularizers_only", "meta_sgd_regularizers_only"])
def test_linearity_meta_gradient_matches_finite_differences(float64, case):
    if case == "dense":
        learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=3)
        tasks = classification_tasks(2, 3, 2, 3, (4,))
    elif case == "conv_bn_regularizers_only":
        learner = MetaLearner(smooth_conv_bn(), inner_lr=0.3, inner_steps=2, outer_loss=_zero_outer_loss)
        tasks = classification_tasks(2, 3, 2, 3, (6, 6, 1))
    else:
        learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=3, meta_sgd=True,
                              outer_loss=_zero_outer_loss)
        tasks = classification_tasks(2, 3, 2, 3, (4,))
    est = Linearity(base="maml", phase_weight=0.7, amplitude_weight=0.3)
    error, analytic = _objective_fd(learner, tasks, est)
    assert abs(analytic) > 1e-6
    assert error < 1e-6, error


@pytest.mark.parametrize("case", ["dense", "meta_sgd_regularizers_only"])
def test_linearity_meta_gradient_is_the_derivative_of_the_papers_objective(float64, case):
    """The finite-difference test above differentiates the estimator's own objective; here the
    finite differences are of an independent implementation of Eq. 7-9 (stored trajectory,
    NumPy norms: `_reference`), per group of meta-parameters (initialization, Meta-SGD rates)."""
    meta_sgd = case != "dense"
    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=3, meta_sgd=meta_sgd,
                          outer_loss=_zero_outer_loss if meta_sgd else None)
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    wp, wa = 0.7, 0.3
    est = Linearity(base="maml", phase_weight=wp, amplitude_weight=wa)
    result = est.meta_gradient(learner, tasks)
    values = learner.meta_values()

    def objective(point):
        total = 0.0
        for i in range(2):
            r = _reference(learner, _one(tasks, i), values=point, with_query=True)
            total += (r["query_loss"] + wp * r["phase_loss"] + wa * r["amplitude_loss"]) / 2
        return total

    rng = np.random.default_rng(5)
    sizes = learner._sizes
    groups = {"init": range(sizes[0]), "lr": range(sizes[0], sizes[0] + sizes[1])}
    for name, members in groups.items():
        if not members:
            continue
        direction = [tf.constant(rng.normal(size=v.shape) if k in members else np.zeros(v.shape), v.dtype)
                     for k, v in enumerate(values)]
        eps = 1e-5
        numeric = (objective([v + eps * d for v, d in zip(values, direction)])
                   - objective([v - eps * d for v, d in zip(values, direction)])) / (2 * eps)
        analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(result.grads, direction))
        assert abs(analytic) > 1e-6, name
        assert abs(numeric - analytic) < 1e-6 * abs(analytic), (name, numeric, analytic)


def test_regularizer_gradients_reach_every_meta_parameter(float64):
    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=3, meta_sgd=True)
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    plain = estimators.get("maml").meta_gradient(learner, tasks)
    for weights in ((1.0, 0.0), (0.0, 1.0)):
        lil = Linearity(phase_weight=weights[0], amplitude_weight=weights[1]).meta_gradient(learner, tasks)
        np.testing.assert_allclose(float(lil.loss), float(plain.loss), rtol=1e-12)
        for g, p in zip(lil.grads, plain.grads):
            assert float(tf.reduce_max(tf.abs(g - p))) > 1e-8, weights


@pytest.mark.parametrize("base", ["maml", "fomaml", "reuse_like", "anil"])
def test_zero_weights_give_the_base_meta_gradient(float64, base):
    optimizer = inner_optimizers.momentum(0.2, momentum=0.9, weight_decay=0.05)
    learner = MetaLearner(small_dense(), inner_optimizer=optimizer, inner_steps=3,
                          adapt="head" if base == "anil" else "all")
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    base_est = {"maml": MAML(), "anil": MAML(), "fomaml": estimators.get("fomaml"),
                "reuse_like": _ReuseLike(2)}[base]
    expected = base_est.meta_gradient(learner, tasks)
    result = Linearity(base=base_est, phase_weight=0.0, amplitude_weight=0.0).meta_gradient(learner, tasks)
    np.testing.assert_allclose(float(result.loss), float(expected.loss), rtol=1e-12)
    for g, e in zip(result.grads, expected.grads):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-9, atol=1e-13)


def test_registered_reuse_base_by_name(float64):
    if "reuse" not in estimators.names():
        pytest.skip("the reuse estimator is not in this checkout")
    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=4)
    tasks = classification_tasks(1, 3, 2, 3, (4,))
    result = estimators.get("linearity", base="reuse", reuse_window=2).meta_gradient(learner, tasks)
    for key, value in _reference(learner, _one(tasks), window=2).items():
        np.testing.assert_allclose(float(result.metrics[key]), value, rtol=1e-10, err_msg=key)


def test_first_order_base_uses_the_identity_jacobian(float64):
    """base fomaml: grad = d/dtheta [L(theta + c_S) + w KL(f(theta + c_S) || f(theta + c_hat))]."""
    learner = MetaLearner(smooth_conv_bn(), inner_lr=0.4, inner_steps=3)
    tasks = classification_tasks(1, 3, 2, 3, (6, 6, 1))
    task = _one(tasks)
    result = Linearity(base="fomaml", phase_weight=0.5).meta_gradient(learner, tasks)
    values = learner.meta_values()
    meta = learner.unflatten(values)
    params, traj = learner.adapt(meta, task.support_x, task.support_y, second_order=False,
                                 observer=linearity.observer())
    hat = learner.fmodel.merge(meta.init, linearity.linear_estimate(
        [meta.init[i] for i in learner.fmodel.adapted], traj))
    c_s = [p - t for p, t in zip(params, meta.init)]
    c_hat = [h - t for h, t in zip(hat, meta.init)]
    with tf.GradientTape() as tape:
        tape.watch(values)
        out = learner.fmodel([v + c for v, c in zip(values, c_s)], task.query_x)
        out_hat = learner.fmodel([v + c for v, c in zip(values, c_hat)], task.query_x)
        objective = learner.task_loss(out, task.query_y) + 0.5 * linearity.phase_loss(
            "classification", out, out_hat)
    expected = tape.gradient(objective, values)
    fomaml = estimators.get("fomaml").meta_gradient(learner, tasks)
    for g, e, f in zip(result.grads, expected, fomaml.grads):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-9, atol=1e-13)
    assert max(float(tf.reduce_max(tf.abs(g - f))) for g, f in zip(result.grads, fomaml.grads)) > 1e-6


def test_auto_amplitude_weight_follows_shots_and_base(float64):
    """Paper defaults: 0.01 (1-shot), 0.1 (5-shot) with MAML; 0 for FOMAML, ANIL, BOIL."""
    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=2)
    for shots, weight in ((1, 0.01), (5, 0.1)):
        tasks = classification_tasks(2, 3, shots, 2, (4,))
        auto = Linearity().meta_gradient(learner, tasks)
        explicit = Linearity(amplitude_weight=weight).meta_gradient(learner, tasks)
        other = Linearity(amplitude_weight=0.05).meta_gradient(learner, tasks)
        for a, e in zip(auto.grads, explicit.grads):
            np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-12, atol=1e-15)
        assert max(float(tf.reduce_max(tf.abs(a - o))) for a, o in zip(auto.grads, other.grads)) > 1e-9
    task = _one(classification_tasks(1, 3, 5, 2, (4,)))
    assert Linearity(base="fomaml").amplitude_weight_for(learner, task) == 0.0
    for adapt in ("head", "body"):
        assert Linearity().amplitude_weight_for(MetaLearner(small_dense(), adapt=adapt), task) == 0.0


# -- PC and AC for any estimator (Estimator(linearity_metrics=True)) -------------------------------
class _OwnLoop(Estimator):
    """An estimator that adapts without calling adapted_params (the fallback path)."""

    def task_gradient(self, learner, meta_values, task):
        meta = learner.unflatten(meta_values)
        params = learner.adapt(meta, task.support_x, task.support_y, second_order=False)
        loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
        return loss, [tf.zeros_like(v) for v in meta_values], metrics


@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "reuse_like", "own_loop"])
def test_any_estimator_logs_pc_and_ac(float64, name):
    learner = MetaLearner(small_dense(), inner_lr=0.9, inner_steps=4)
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    make = {"reuse_like": lambda: _ReuseLike(2), "own_loop": _OwnLoop}.get(
        name, lambda: estimators.get(name))
    plain, instrumented = make(), make()
    instrumented.linearity_metrics = True
    expected = plain.meta_gradient(learner, tasks)
    result = tf.function(lambda: instrumented.meta_gradient(learner, tasks))()
    np.testing.assert_allclose(float(result.loss), float(expected.loss), rtol=1e-13)
    for g, e in zip(result.grads, expected.grads):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12, atol=1e-16)
    assert set(result.metrics) == set(expected.metrics) | set(linearity.METRIC_NAMES)
    window = 2 if name == "reuse_like" else 1
    references = [_reference(learner, _one(tasks, i), window=window) for i in range(2)]
    for key in linearity.METRIC_NAMES:
        np.testing.assert_allclose(float(result.metrics[key]),
                                   np.mean([r[key] for r in references]), rtol=1e-10)


def test_pc_and_ac_come_from_the_estimators_own_inner_loop(float64):
    """No second inner loop: the one adapted_params call carries the metrics observer."""
    calls = []

    class Counting(MAML):
        def adapted_params(self, learner, meta, task, observer=None):
            calls.append(observer is not None)
            return super().adapted_params(learner, meta, task, observer=observer)

    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=2)
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    result = tf.function(lambda: Counting(linearity_metrics=True).meta_gradient(learner, tasks))()
    assert calls == [True]  # the task loop's body is traced once
    assert float(result.metrics["phase_consistency"]) > 1


def test_pc_and_ac_while_two_threads_trace_one_estimator(float64):
    """Distribution strategies trace replicas in parallel threads: both must be measured."""
    barrier, calls = threading.Barrier(2, timeout=60), []

    class Waiting(MAML):
        def adapted_params(self, learner, meta, task, observer=None):
            calls.append(observer is not None)
            barrier.wait()  # both threads are inside the instrumented call at once
            return super().adapted_params(learner, meta, task, observer=observer)

    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=2)
    tasks = classification_tasks(1, 3, 2, 3, (4,))
    est, results = Waiting(linearity_metrics=True), [None, None]

    def work(i):
        results[i] = est.meta_gradient(learner, tasks)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [True, True]
    assert "adapted_params" not in vars(est)  # the method is restored
    expected = _reference(learner, _one(tasks))["phase_consistency"]
    for result in results:
        np.testing.assert_allclose(float(result.metrics["phase_consistency"]), expected, rtol=1e-10)


def test_linearity_metrics_option_and_reported_names(float64):
    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=2)
    est = estimators.get("maml", linearity_metrics=True)
    assert est.reported_metric_names(learner) == ("accuracy",) + linearity.METRIC_NAMES
    assert estimators.get("maml").reported_metric_names(learner) == ("accuracy",)
    lil = Linearity()
    lil.linearity_metrics = True  # it reports PC and AC itself: nothing is added twice
    assert lil.reported_metric_names(learner) == lil.metric_names(learner)
    result = lil.meta_gradient(learner, classification_tasks(2, 3, 2, 3, (4,)))
    assert set(result.metrics) == set(lil.metric_names(learner))
    with pytest.raises(ValueError, match="linearity_metrics='yes'"):
        estimators.get("maml", linearity_metrics="yes")


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,word", [
    (dict(phase_weight=-0.1), "phase_weight=-0.1"),
    (dict(phase_weight=float("nan")), "phase_weight"),
    (dict(amplitude_weight=-1.0), "amplitude_weight=-1.0"),
    (dict(amplitude_weight="large"), "amplitude_weight"),
    (dict(base="bogus"), "base='bogus'"),
    (dict(base="reptile"), "base='reptile'"),
    (dict(base="linearity"), "base='linearity'"),
    (dict(base="fomaml", amplitude_weight=0.1), "amplitude_weight=0.1"),
])
def test_bad_input_is_named(kwargs, word):
    with pytest.raises(ValueError, match=word.replace("(", r"\(")) as info:
        estimators.get("linearity", **kwargs)
    if "base" in kwargs and "amplitude_weight" not in kwargs:
        assert "maml" in str(info.value) and "fomaml" in str(info.value)


def test_fomaml_base_refuses_meta_sgd():
    learner = MetaLearner(small_dense(), meta_sgd=True)
    with pytest.raises(ValueError, match="meta_sgd"):
        MetaTrainer(learner, Linearity(base="fomaml"))


# -- LIL pre-training for first-order MAML (Sec. 6, Appendix E) ------------------------------------
class _FixedTasks:
    def __init__(self, batch):
        self.batch = batch

    def dataset(self, start=0):
        return tf.data.Dataset.from_tensors(self.batch).repeat()


def test_pretraining_teacher_is_a_moving_average(float64):
    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=3)
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    est = LILPretraining(teacher_momentum=0.75)
    first = learner.meta_values()
    result = est.meta_gradient(learner, tasks, first)
    assert set(result.metrics) == {"accuracy", "phase_loss"}
    second = [v + 1.0 for v in first]
    est.meta_gradient(learner, tasks, second)
    for t, a, b in zip(est.teacher, first, second):
        np.testing.assert_allclose(t.numpy(), 0.75 * a.numpy() + 0.25 * b.numpy(), rtol=1e-12)
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in result.grads)


def test_pretraining_teacher_is_in_the_trainers_checkpoint(float64, tmp_path):
    tasks = classification_tasks(2, 3, 2, 3, (4,))

    def make(seed):
        learner = MetaLearner(small_dense(seed=seed), inner_lr=0.5, inner_steps=2)
        est = LILPretraining(teacher_momentum=0.5)
        return est, MetaTrainer(learner, est, keras.optimizers.SGD(0.1), checkpoint_dir=str(tmp_path))

    est, trainer = make(0)
    for _ in range(3):
        trainer.train_step(tasks)
    trainer.save()
    saved = [v.numpy() for v in est.teacher]
    est2, trainer2 = make(7)  # another init: the teacher must come from the checkpoint
    assert trainer2.restore() == 3
    for a, v in zip(saved, est2.teacher):
        np.testing.assert_array_equal(a, v.numpy())


def test_pretraining_lowers_its_phase_loss_then_fomaml_runs(float64):
    keras.utils.set_random_seed(0)
    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=3)
    batch = classification_tasks(4, 3, 1, 3, (4,))
    trainer = MetaTrainer(learner, LILPretraining(), keras.optimizers.Adam(3e-2))
    # while the teacher is the initialization itself, the loss is Eq. 7's phase loss
    own = np.mean([float(linearity.trajectory_metrics(learner, _one(batch, i))["phase_loss"])
                   for i in range(4)])
    first = trainer.train_step(batch)["phase_loss"]
    np.testing.assert_allclose(first, own, rtol=1e-10)
    for _ in range(40):
        last = trainer.train_step(batch)["phase_loss"]
    assert np.isfinite(last) and last < 0.3 * first, (first, last)
    # the helper: LIL pre-training, then first-order MAML from that initialization
    sampler = _FixedTasks(batch)
    history = recipes.pretrain(learner, sampler, iterations=2)
    assert len(history) == 2 and np.isfinite(history[-1]["phase_loss"])
    after = MetaTrainer(learner, "fomaml").fit(sampler, iterations=2, progress=False)
    assert len(after) == 2 and np.isfinite(after[-1]["loss"])
    with pytest.raises(ValueError, match="teacher_momentum"):
        LILPretraining(teacher_momentum=1.0)


# -- command line ----------------------------------------------------------------------------------
def test_cli_bench_and_train_with_linearity(capsys, tmp_path):
    code = cli.main(["bench", "--estimator", "linearity", "--base", "maml", "--phase-weight", "0.2",
                     "--amplitude-weight", "auto", "--meta-batch", "2", "--inner-steps", "1",
                     "--steps", "1", "--ways", "2", "--query", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["options"] == {"base": "maml", "phase_weight": 0.2, "amplitude_weight": "auto"}
    code = cli.main(["train", "--estimator", "linearity", "--base", "fomaml",
                     "--amplitude-weight", "0", "--iterations", "3", "--episodes", "5",
                     "--out", str(tmp_path / "run"), "--no-export", "--no-progress", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 3
    assert cli.main(["train", "--estimator", "linearity", "--phase-weight", "-1",
                     "--out", str(tmp_path / "bad"), "--iterations", "1"]) == 2
    assert "phase_weight=-1.0" in capsys.readouterr().err
