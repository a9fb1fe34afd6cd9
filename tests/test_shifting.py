"""Continual trajectory shifting (Shin et al. 2021): Algorithm 2, Eq. 1, Eq. 2, Sec. 4.1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

import keras

from conftest import classification_tasks, small_dense
from tfmeta import estimators
from tfmeta.app import cli
from tfmeta.core import inner_optimizers
from tfmeta.data import SinusoidTasks, synthetic2d
from tfmeta.core.checks import parse_boolean as _boolean
from tfmeta.data.rounds import ManyShotTasks, RoundTasks
from tfmeta.estimators.shifting import Shifting
from tfmeta.estimators.shifting_analysis import approximation_error
from tfmeta.training.recipes import continual_shifting
from tfmeta.core.learner import MetaLearner
from tfmeta.training import MetaTrainer


def _rows(variables, i):
    return [v.numpy()[i] for v in variables]


def _adapted(learner, values, task, steps):
    """Plain independent training: `steps` inner steps from `values` (the learner's adapt)."""
    meta = learner.unflatten(values)
    params = learner.adapt(meta, task[0], task[1], second_order=False, steps=steps)
    return [params[i].numpy() for i in learner.fmodel.adapted]


def _task(tasks, i):
    return tuple(t[i] for t in tasks)


# -- Algorithm 2 identities ----------------------------------------------------------------------
@pytest.mark.parametrize("reset_state", [False, True])
def test_beta_zero_trajectories_are_plain_independent_training(float64, reset_state):
    """beta = 0: no meta-update, no shift; each task learner is plain training on its own task."""
    optimizer = inner_optimizers.momentum(0.3, momentum=0.9, weight_decay=0.01)
    learner = MetaLearner(small_dense(), inner_optimizer=optimizer, inner_steps=1)
    tasks = classification_tasks(3, 3, 2, 2, (4,))
    K = 3
    est = Shifting(horizon=K, repeats=2, reset_state=reset_state)
    trainer = MetaTrainer(learner, est, keras.optimizers.SGD(0.0))
    phi = learner.meta_values()
    for k in range(1, K + 1):  # first repetition: theta_k = U_k(phi), independently per task
        trainer.train_step(tasks)
        for i in range(3):
            for got, want in zip(_rows(est.theta, i), _adapted(learner, phi, _task(tasks, i), k)):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    velocity = [v.numpy() for v in est.opt_state]
    trainer.train_step(tasks)  # second repetition, k = 1: reset to phi
    for i in range(3):
        fresh = _adapted(learner, phi, _task(tasks, i), 1)
        sx, sy = tasks[0][i], tasks[1][i]
        meta = learner.unflatten(phi)
        theta = [phi[j] for j in learner.fmodel.adapted]
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = learner.inner_loss(learner.fmodel.merge(phi, theta), meta, sx, sy)
        grads = tape.gradient(loss, theta)
        carried, _ = inner_optimizers.step(optimizer, theta, grads, [tf.constant(v[i]) for v in velocity])
        want = fresh if reset_state else [c.numpy() for c in carried]
        for got, w, f in zip(_rows(est.theta, i), want, fresh):
            np.testing.assert_allclose(got, w, rtol=1e-12, atol=1e-13)
            if not reset_state:  # the kept velocity really changes the step
                assert np.abs(got - f).max() > 1e-6


@pytest.mark.parametrize("shift_grad,baseline", [("reptile", "reptile"), ("fomaml", "fomaml")])
def test_horizon_one_repetition_is_one_reptile_meta_update(float64, shift_grad, baseline):
    """K = 1: every repetition is one step from phi and one meta-update, i.e. Reptile with T = 1."""
    tasks = classification_tasks(3, 3, 2, 2, (4,))
    a = MetaLearner(small_dense(seed=2), inner_lr=0.4, inner_steps=1)
    b = MetaLearner(small_dense(seed=2), inner_lr=0.4, inner_steps=1)
    shifting = MetaTrainer(a, Shifting(horizon=1, repeats=2, shift_grad=shift_grad), keras.optimizers.SGD(0.7))
    reptile = MetaTrainer(b, baseline, keras.optimizers.SGD(0.7))
    for _ in range(3):
        la, lb = shifting.train_step(tasks), reptile.train_step(tasks)
        assert la["loss"] == pytest.approx(lb["loss"], rel=1e-12)
        for va, vb in zip(a.meta_variables, b.meta_variables):
            np.testing.assert_allclose(va.numpy(), vb.numpy(), rtol=1e-12, atol=1e-14)
    assert not np.allclose(a.meta_variables[0].numpy(), small_dense(seed=2).trainable_variables[0].numpy())


def _sgd_step(learner, phi, theta, x, y, lr):
    """An independent U_1 (plain SGD on the support loss) for adapted weights `theta`."""
    theta = [tf.constant(t) for t in theta]
    meta = learner.unflatten(phi)
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = learner.inner_loss(learner.fmodel.merge(phi, theta), meta, x, y)
    return [(t - lr * g).numpy() for t, g in zip(theta, tape.gradient(loss, theta))]


def test_shift_applied_to_task_parameters_equals_the_meta_update_exactly(float64):
    """Eq. 1 / Alg. 2 line 13: theta_k += Delta_k where Delta_k is the update the meta-optimizer applied.

    With Adam, Delta_k is Adam's step, not -beta * MetaGrad; the shift follows the real update. The
    inner loss has zero gradient, so the shift is the only change of the task parameters.
    """
    def flat_loss(learner, params, meta, x, y):
        return 0.0 * tf.add_n([tf.reduce_sum(p) for p in params])

    learner = MetaLearner(small_dense(), inner_lr=0.3, inner_loss=flat_loss)
    tasks = classification_tasks(2, 3, 2, 2, (4,))
    est = Shifting(horizon=5, repeats=1, shift_grad="fomaml")
    trainer = MetaTrainer(learner, est, keras.optimizers.Adam(0.05))
    adapted = learner.fmodel.adapted
    phis = [[v.numpy() for v in learner.meta_variables]]
    thetas = []
    for _ in range(4):
        before = [v.numpy() for v in learner.meta_variables]
        trainer.train_step(tasks)
        thetas.append([v.numpy() for v in est.theta])
        phis.append([v.numpy() for v in learner.meta_variables])
        np.testing.assert_array_equal(est.phi_before[0].numpy(), before[adapted[0]])
    for k in range(1, 4):  # call k+1 shifted theta by exactly phi_k - phi_{k-1} (Adam's update)
        for n, j in enumerate(adapted):
            shift = thetas[k][n] - thetas[k - 1][n]
            update = phis[k][j] - phis[k - 1][j]
            assert np.abs(update).max() > 1e-3
            np.testing.assert_allclose(shift, np.broadcast_to(update, shift.shape), rtol=0, atol=1e-15)
    # Adam's first update is about -lr * sign(g), not -lr * g: the shift is not -beta * MetaGrad
    meta = learner.unflatten([tf.constant(v) for v in phis[0]])
    g = [tf.zeros_like(v) for v in phis[0]]
    for i in range(2):
        params = [tf.constant(v) for v in phis[0]]
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss, _ = learner.outer_loss(params, meta, tasks[2][i], tasks[3][i])
        g = [a + b / 2 for a, b in zip(g, tape.gradient(loss, params))]
    assert not np.allclose(phis[1][0] - phis[0][0], -0.05 * g[0].numpy(), atol=1e-4)


def test_meta_update_with_sgd_is_minus_beta_mean_metagrad_and_shifts_tasks(float64):
    """Alg. 2 lines 9-13 step by step, recomputed independently (SGD inner steps, SGD(beta) meta)."""
    learner = MetaLearner(small_dense(), inner_lr=0.3)
    tasks = classification_tasks(3, 3, 2, 2, (4,))
    beta = 0.4
    est = Shifting(horizon=4, repeats=1)
    trainer = MetaTrainer(learner, est, keras.optimizers.SGD(beta))
    adapted = learner.fmodel.adapted
    theta = None  # the shifted task learners, per task
    for k in range(1, 4):
        phi = learner.meta_values()
        trainer.train_step(tasks)
        new = [
            _sgd_step(learner, phi, [phi[j].numpy() for j in adapted] if theta is None else theta[i],
                      tasks[0][i], tasks[1][i], 0.3)
            for i in range(3)
        ]
        for i in range(3):  # line 9: one inner step of every task learner (stored before the shift)
            for got, want in zip(_rows(est.theta, i), new[i]):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
        delta = [-beta * np.mean([phi[j].numpy() - new[i][n] for i in range(3)], axis=0)
                 for n, j in enumerate(adapted)]
        for n, j in enumerate(adapted):  # lines 11-12: phi += Delta_k
            np.testing.assert_allclose(learner.meta_variables[j].numpy(), phi[j].numpy() + delta[n],
                                       rtol=1e-12, atol=1e-14)
        theta = [[t + d for t, d in zip(new[i], delta)] for i in range(3)]  # line 13: the shift


def test_accurate_mode_recomputes_u_k_and_reports_the_approximation_error(float64):
    """Ours Accurate: MetaGrad at U_k(phi + Delta_1 + ... + Delta_{k-1}), and ||epsilon|| of Eq. 2."""
    learner = MetaLearner(small_dense(), inner_lr=0.3)
    tasks = classification_tasks(2, 3, 2, 2, (4,))
    beta = 0.5
    est = Shifting(horizon=4, repeats=1, accurate=True)
    trainer = MetaTrainer(learner, est, keras.optimizers.SGD(beta))
    reptile = estimators.get("reptile")
    errors = []
    for k in range(1, 5):
        phi = learner.meta_values()
        learner.inner_steps = k
        want = reptile.meta_gradient(learner, tasks, phi)  # Reptile with k steps from phi, from scratch
        logs = trainer.train_step(tasks)
        for p, v, w in zip(phi, learner.meta_variables, want.grads):
            np.testing.assert_allclose((p.numpy() - v.numpy()) / beta, w.numpy(), rtol=1e-9, atol=1e-12)
        norms = []  # epsilon = U_k(phi_now) - the shifted learner, per task
        for i in range(2):
            exact = _adapted(learner, phi, _task(tasks, i), k)
            norms.append(math.sqrt(sum(np.sum((e - s) ** 2) for e, s in zip(exact, _rows(est.theta, i)))))
        assert logs["approx_error"] == pytest.approx(np.mean(norms), rel=1e-9, abs=1e-15)
        errors.append(logs["approx_error"])
    assert errors[0] < 1e-15 and errors[1] > 1e-8 and errors[3] > errors[1]


def test_approximation_error_grows_with_alpha_beta_and_k(float64):
    """Fig. 3 trend of Sec. 3.3 (Eq. 5: O(beta alpha h k^2 + beta^2 k)) on a small smooth network."""
    learner = MetaLearner(small_dense(seed=1))
    task = _task(classification_tasks(1, 3, 4, 2, (4,), seed=3), 0)

    def eps(alpha=0.2, beta=0.05, k=8):
        return np.mean([approximation_error(learner, task, alpha=alpha, beta=beta, k=k, seed=s) for s in range(3)])

    by_alpha = [eps(alpha=a) for a in (0.05, 0.2, 0.8)]
    by_beta = [eps(beta=b) for b in (0.01, 0.05, 0.25)]
    by_k = [eps(k=k) for k in (2, 8, 24)]
    for series in (by_alpha, by_beta, by_k):
        assert series[0] > 0 and series[0] < series[1] < series[2], series
    assert eps(k=1) == 0.0 and eps(beta=0.0) == 0.0


def test_fig6a_shifting_beats_reptile_at_equal_inner_steps():
    """Sec. 4.1 / Fig. 6a: same cumulative inner steps (T*K*M), K times more meta-updates, better phi.

    Paper settings: alpha = 0.05, momentum 0.9, beta = 0.1 (SGD), K = 100, M = 3, eight tasks;
    phi is scored by the task-average loss after 100 adaptation steps (Adam, 0.05, as the authors'
    meta-test), averaged over the 3 x 3 grid of starting points of their code. The training loops
    are compiled (the same estimator code MetaTrainer runs) to keep the test fast.
    """
    tasks = synthetic2d.Synthetic2DTasks(seed=0)
    batch = tuple(tf.constant(t) for t in tasks.sample(0))
    learner = synthetic2d.make_learner((0.0, 0.0))
    shifting, reptile = Shifting(horizon=100, repeats=3), estimators.get("reptile")
    shifting.check(learner)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(learner.meta_variables)
    evaluator = synthetic2d.make_learner(model=learner.model, inner_optimizer=inner_optimizers.adam(0.05))

    def trainer(estimator, updates):
        @tf.function
        def run():
            for _ in tf.range(updates):
                result = estimator.meta_gradient(learner, batch)
                optimizer.apply(result.grads, learner.meta_variables)
        return run

    run_shifting, run_reptile = trainer(shifting, 300), trainer(reptile, 3)

    @tf.function
    def score():
        meta = evaluator.unflatten(evaluator.meta_values())

        def one(x):
            return evaluator.outer_loss(evaluator.adapt(meta, x, x[:, :1], second_order=False), meta, x, x)[0]
        return tf.reduce_mean(tf.map_fn(one, batch[0]))

    point = learner.model.trainable_variables[0]
    results = []
    for init in [(x, y) for x in (-5.0, 5.0, 15.0) for y in (-5.0, 5.0, 15.0)]:
        point.assign(init)
        shifting.reset()
        before = int(optimizer.iterations)
        run_shifting()
        assert int(optimizer.iterations) - before == 300 and int(shifting.calls) == 300
        ours = float(score())
        point.assign(init)
        before = int(optimizer.iterations)
        run_reptile()
        assert int(optimizer.iterations) - before == 3
        results.append((ours, float(score())))
    ours, theirs = np.mean(results, axis=0)
    # same budget: shifting 300 calls x 8 tasks x 1 step = Reptile 3 x 8 x 100 inner steps
    assert 300 * 8 * 1 == 3 * 8 * learner.inner_steps
    assert ours < 0.75 * theirs, results


# -- state, checkpoints, data --------------------------------------------------------------------
def test_state_round_trips_through_checkpoint_and_resumes_exactly(tmp_path):
    """The task learners and optimizer states are state: MetaTrainer's checkpoint holds
    `estimator.variables`, and a resumed run reaches the same parameters as an uninterrupted one."""
    tasks = classification_tasks(2, 3, 2, 2, (4,), dtype="float32")
    optimizer = inner_optimizers.momentum(0.3, momentum=0.9, weight_decay=1e-3)

    def make(seed):
        learner = MetaLearner(small_dense(seed=seed), inner_optimizer=optimizer)
        est = Shifting(horizon=3, repeats=2, accurate=True)
        trainer = MetaTrainer(learner, est, keras.optimizers.Adam(0.01), checkpoint_dir=str(tmp_path))
        return learner, est, trainer

    straight, est, trainer = make(0)
    for _ in range(4):
        trainer.train_step(tasks)
    trainer.save()
    saved = [v.numpy() for v in est.variables]
    assert len(saved) == 1 + 5 * 4  # calls; phi_before, theta, velocity, start theta/velocity per weight
    for _ in range(4):  # the uninterrupted run goes on: 8 calls cross a repetition and a round
        trainer.train_step(tasks)

    resumed, est2, trainer2 = make(5)  # another init: everything must come from the checkpoint
    assert trainer2.restore() == 4
    for a, v in zip(saved, est2.variables):
        np.testing.assert_array_equal(a, v.numpy())
    assert est2.position() == {"round": 0, "repetition": 1, "step": 1}
    for _ in range(4):
        trainer2.train_step(tasks)
    for a, b in zip(straight.meta_variables, resumed.meta_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)

    # without the estimator's state (a fresh round from phi) the resumed run differs
    trainer2.restore()
    est2.reset()
    for _ in range(4):
        trainer2.train_step(tasks)
    assert not np.allclose(straight.meta_variables[0].numpy(), resumed.meta_variables[0].numpy(), atol=1e-5)


def test_one_trace_serves_any_meta_batch_and_a_change_mid_round_is_refused():
    learner = MetaLearner(small_dense(), inner_lr=0.3)
    est = Shifting(horizon=2, repeats=1)
    est.check(learner)
    spec = tuple(tf.TensorSpec([None] + list(t.shape[1:]), t.dtype)
                 for t in classification_tasks(2, 3, 1, 1, (4,), dtype="float32"))
    step = tf.function(lambda *tasks: est.meta_gradient(learner, tasks).loss, input_signature=spec)
    step(*classification_tasks(2, 3, 1, 1, (4,), dtype="float32"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="meta-batch .* changed in the middle of a round"):
        step(*classification_tasks(3, 3, 1, 1, (4,), dtype="float32"))
    assert int(est.calls) == 1 and est.theta[0].numpy().shape[0] == 2  # the refused call changed nothing
    est.reset()
    step(*classification_tasks(3, 3, 1, 1, (4,), dtype="float32"))
    step(*classification_tasks(3, 3, 1, 1, (4,), dtype="float32", seed=1))
    assert est.theta[0].shape[0] is None and est.theta[0].numpy().shape[0] == 3
    assert step.experimental_get_tracing_count() == 1


def test_task_specific_head_is_kept_per_task_and_never_shifted(float64):
    """Supplementary C.2: the head is in theta but not in phi: per task, never shifted, never reset
    between repetitions, never meta-learned; the rest is shifted and reset as usual."""
    learner = MetaLearner(small_dense(), inner_lr=0.3)
    tasks = classification_tasks(2, 3, 2, 2, (4,))
    est = Shifting(horizon=2, repeats=2, task_specific="head")
    trainer = MetaTrainer(learner, est, keras.optimizers.SGD(0.5))
    adapted = learner.fmodel.adapted
    prefix = learner.fmodel.paths[-1].rsplit("/", 1)[0] + "/"  # the last layer
    head = [n for n, j in enumerate(adapted) if learner.fmodel.paths[j].startswith(prefix)]
    assert head and est._specific == tuple(n in head for n in range(len(adapted)))
    phi_head = [learner.meta_variables[adapted[n]].numpy() for n in head]

    def expected(i, phi, theta):
        return _sgd_step(learner, phi, theta, tasks[0][i], tasks[1][i], 0.3)

    phi_before = learner.meta_values()  # phi at the start of call 1
    trainer.train_step(tasks)
    previous = [[v.numpy()[i] for v in est.theta] for i in range(2)]
    for n in head:  # a change of the model's head between calls must not reach the task heads
        learner.meta_variables[adapted[n]].assign_add(tf.ones_like(learner.meta_variables[adapted[n]]))
    for call in (2, 3):  # call 2: k = 2 (shift body only); call 3: new repetition (reset body only)
        phi = learner.meta_values()
        trainer.train_step(tasks)
        for i in range(2):
            start = []
            for n, j in enumerate(adapted):
                if n in head:
                    start.append(previous[i][n])  # kept, not shifted, not reset
                elif call == 2:
                    start.append(previous[i][n] + (phi[j] - phi_before[j]).numpy())  # Eq. 1
                else:
                    start.append(phi[j].numpy())  # reset to phi
            for got, want in zip(_rows(est.theta, i), expected(i, phi, start)):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
        previous = [[v.numpy()[i] for v in est.theta] for i in range(2)]
        phi_before = phi if call == 2 else None
    for n, p in zip(head, phi_head):  # zero meta-gradient: SGD never moved the shared head
        np.testing.assert_array_equal(learner.meta_variables[adapted[n]].numpy(), p + 1.0)
    est.reset()  # a new round restarts the task heads from the model's head
    phi = learner.meta_values()
    trainer.train_step(tasks)
    for i in range(2):
        for got, want in zip(_rows(est.theta, i), expected(i, phi, [phi[j].numpy() for j in adapted])):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def test_synthetic2d_tasks_and_learner():
    """Sec. 4.1 task family: template minima, the same tasks every batch, loss through the learner."""
    assert all(synthetic2d.template(x, y) == pytest.approx(0.0, abs=1e-9) for x, y in synthetic2d.TEMPLATE_MINIMA)
    tasks = synthetic2d.Synthetic2DTasks(seed=4)
    np.testing.assert_allclose(tasks.losses(tasks.minima()[:, 2]), 0.0, atol=1e-9)
    centres, angles = tasks.task_parameters()
    np.testing.assert_allclose(np.linalg.norm(centres - 5.0, axis=1), synthetic2d.RADIUS)
    assert np.unique(np.round(angles, 6)).size == 8
    a, b = tasks.sample(0), tasks.sample(17)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    test = synthetic2d.Synthetic2DTasks(seed=4, split="test")
    assert not np.allclose(test.task_parameters()[1], angles)
    learner = synthetic2d.make_learner((-5.0, 5.0))
    meta = learner.unflatten(learner.meta_values())
    loss = learner.inner_loss(meta.init, meta, tf.constant(a.support_x[3]), tf.constant(a.support_y[3]))
    assert float(loss) == pytest.approx(tasks.losses(np.tile([[-5.0, 5.0]], (8, 1)))[3], rel=1e-5)
    batch = next(iter(tasks.dataset(start=2)))
    learner.check_tasks(tuple(batch))
    with pytest.raises(ValueError, match="radius"):
        synthetic2d.Synthetic2DTasks(radius=float("nan"))


def test_round_sampler_keeps_tasks_for_a_round():
    sampler = RoundTasks(SinusoidTasks(meta_batch=3, seed=1), length=4)
    np.testing.assert_array_equal(sampler.sample(0).support_x, sampler.sample(3).support_x)
    assert not np.array_equal(sampler.sample(3).support_x, sampler.sample(4).support_x)
    assert sampler.task_type == "regression" and sampler.meta_batch == 3
    assert next(iter(sampler.dataset(start=5))).support_x.shape == (3, 5, 1)


def test_continual_shifting_runs_algorithm_2_with_sgd_beta():
    tasks = synthetic2d.Synthetic2DTasks(meta_batch=4, seed=0).sample(0)
    learner = synthetic2d.make_learner((-5.0, 5.0), inner_steps=1)
    trainer, history = continual_shifting(learner, tasks, beta=0.1, horizon=10, repeats=2)
    assert int(trainer.step) == 20 and len(history) == 20
    assert [h["horizon"] for h in history[:3]] == [1.0, 2.0, 3.0] and history[10]["horizon"] == 1.0
    assert history[-1]["loss"] < history[0]["loss"]


# -- flags and bad input -------------------------------------------------------------------------
def test_flags_reach_the_command_line():
    args = cli._parser().parse_args(
        ["bench", "--estimator", "shifting", "--horizon", "7", "--repeats", "2", "--shift-grad", "fomaml",
         "--accurate", "true", "--reset-state", "no"]
    )
    options = cli.estimator_options(args)
    assert options == {"horizon": 7, "repeats": 2, "shift_grad": "fomaml", "accurate": True, "reset_state": False}
    est = estimators.get("shifting", **options)
    assert (est.horizon, est.repeats, est.accurate) == (7, 2, True)
    assert "shifting" in estimators.names()


@pytest.mark.parametrize("kwargs,match", [
    (dict(horizon=0), "horizon=0"),
    (dict(horizon=-3), "horizon=-3"),
    (dict(horizon=2.5), "horizon=2.5"),
    (dict(horizon=True), "horizon=True"),
    (dict(repeats=0), "repeats=0"),
    (dict(repeats=-1), "repeats=-1"),
    (dict(shift_grad="leap"), "shift_grad='leap'"),
    (dict(task_specific="body"), "task_specific='body'"),
    (dict(accurate="maybe"), "accurate='maybe'"),
])
def test_bad_options_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Shifting(**kwargs)


@pytest.mark.parametrize("beta", [float("nan"), float("inf"), -0.1, "x"])
def test_non_finite_beta_raises(beta):
    learner = MetaLearner(small_dense(), inner_lr=0.3)
    tasks = classification_tasks(1, 3, 1, 1, (4,), dtype="float32")
    with pytest.raises(ValueError, match="beta="):
        continual_shifting(learner, tasks, beta=beta, horizon=1, repeats=1)
    with pytest.raises(ValueError, match="beta="):
        approximation_error(learner, _task(tasks, 0), alpha=0.1, beta=beta, k=2)


def test_other_bad_input():
    learner = MetaLearner(small_dense(), inner_lr=0.3)
    task = _task(classification_tasks(1, 3, 1, 1, (4,), dtype="float32"), 0)
    with pytest.raises(ValueError, match="alpha=0"):
        approximation_error(learner, task, alpha=0.0, beta=0.1, k=2)
    with pytest.raises(ValueError, match="k=0"):
        approximation_error(learner, task, alpha=0.1, beta=0.1, k=0)
    with pytest.raises(ValueError, match="meta_sgd"):
        Shifting().check(MetaLearner(small_dense(), meta_sgd=True))
    with pytest.raises(ValueError, match="needs the head to adapt"):
        Shifting(task_specific="head").check(MetaLearner(small_dense(), adapt="body"))
    with pytest.raises(ValueError, match="nothing to shift"):
        Shifting(task_specific="head").check(MetaLearner(small_dense(), adapt="head"))
    built_outside = Shifting()
    built_outside.check(learner)
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        with pytest.raises(ValueError, match="built its task learners under strategy _DefaultDistributionStrategy"):
            built_outside.check(learner)
    est = Shifting()
    est.linearity_metrics = True
    with pytest.raises(ValueError, match="linearity_metrics=True"):
        est.check(learner)
    est = Shifting()
    est.check(learner)
    with pytest.raises(ValueError, match="use a new estimator"):
        est.check(MetaLearner(small_dense(inputs=6)))
    with pytest.raises(ValueError, match="expected true or false"):
        _boolean("perhaps")


def test_many_shot_tasks_train_one_learner_per_dataset():
    """Many-shot heterogeneous meta-training: task t is dataset t (its own label set), per-task heads."""
    rng = np.random.default_rng(0)
    datasets = []
    for t, classes in enumerate((2, 3)):
        centres = rng.normal(size=(classes, 4)) * 3
        y = rng.integers(0, classes, size=60) + 10 * t  # any integer labels: relabelled 0..C-1
        datasets.append((centres[y - 10 * t] + rng.normal(size=(60, 4)) * 0.3, y))
    tasks = ManyShotTasks(datasets, shots=16, query=8, seed=1)
    assert (tasks.meta_batch, tasks.ways, tasks.classes, tasks.feature_shape) == (2, 3, (2, 3), (4,))
    batch = tasks.sample(4)
    assert batch.support_x.shape == (2, 16, 4) and batch.query_y.shape == (2, 8)
    assert batch.support_y[0].max() < 2 and batch.support_y[1].max() < 3
    for x, y in zip(tasks.sample(4), batch):
        np.testing.assert_array_equal(x, y)
    split = ManyShotTasks.from_label_ranges(np.arange(10.0)[:, None], np.arange(10) // 2, [2, 3])
    assert split.classes == (2, 3) and split.sample(0).support_x[0].max() < 4
    learner = MetaLearner(small_dense(ways=3), inner_lr=0.2)
    trainer = MetaTrainer(learner, Shifting(horizon=15, repeats=1, task_specific="head"), keras.optimizers.SGD(0.5))
    logs = [trainer.train_step(tasks.sample(i)) for i in range(15)]
    assert np.mean([l["loss"] for l in logs[-3:]]) < 0.5 * np.mean([l["loss"] for l in logs[:3]])
    with pytest.raises(ValueError, match="datasets\\[1\\]"):
        ManyShotTasks([datasets[0], (np.zeros((3, 5)), np.zeros(3, int))])
