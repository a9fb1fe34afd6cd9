"""MAML++ (Antoniou, Edwards, Storkey 2019, arXiv:1810.09502): per-step BatchNorm weights, LSLR,
the multi-step loss, derivative-order annealing, the cosine meta learning rate and the preset."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import keras

from conftest import classification_tasks, small_dense, smooth_conv_bn
from tfmeta import estimators, export
from tfmeta.app import cli
from tfmeta.core import functional, mamlpp
from tfmeta.training.keras_model import MetaModel
from tfmeta.core.learner import MetaLearner


def _bound(estimator, step):
    estimator.bind_meta_step(tf.Variable(step, dtype=tf.int64))
    return estimator


def _scramble(learner, seed=0):
    """Give the per-step sets and rates distinct values (they start as copies of set 0 / the lr)."""
    rng = np.random.default_rng(seed)
    for v in learner.bn_variables:
        v.assign(v.numpy() + rng.normal(scale=0.3, size=v.shape))
    for v in learner.lslr_variables:
        v.assign(v.numpy() * rng.uniform(0.5, 1.5, size=v.shape))


def _fd(learner, tasks, est, groups, eps=1e-5, seed=1):
    """For each tuple of meta-parameter groups (fields of MetaParams): the relative error of
    <g, d> against a central difference along a random d supported on those groups."""
    fn = tf.function(lambda values: est.meta_gradient(learner, tasks, values))
    values = learner.meta_values()
    result = fn(values)
    rng = np.random.default_rng(seed)
    index = learner.unflatten(list(range(len(values))))
    out = []
    for parts in groups:
        chosen = {i for part in parts for i in getattr(index, part)}
        direction = [tf.constant(rng.normal(size=v.shape) if i in chosen else np.zeros(v.shape), v.dtype)
                     for i, v in enumerate(values)]

        def loss_at(step):
            return float(fn([v + step * d for v, d in zip(values, direction)]).loss)

        numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(result.grads, direction))
        out.append((abs(numeric - analytic) / max(abs(analytic), 1e-12), analytic))
    return out


def _learner(**kwargs):
    learner = MetaLearner(smooth_conv_bn(), inner_lr=0.3, inner_steps=2, **kwargs)
    _scramble(learner)
    return learner


TASKS = dict(meta_batch=2, ways=3, shots=2, query=3, shape=(6, 6, 1))


def _tasks(seed=0):
    return classification_tasks(**TASKS, seed=seed)


GROUPS = [("bn",), ("lslr",), ("init", "bn", "lslr")]


def test_per_step_bn_lslr_and_msl_meta_gradients_match_finite_differences(float64):
    """Per-step BatchNorm sets, LSLR rates, and everything, with the MSL
    weights mid-anneal so that every step's query loss enters the meta-loss."""
    learner = _learner(lslr=True, per_step_bn=True)
    est = _bound(estimators.get("maml", msl_steps=10), 4)  # weights (0.3, 0.7)
    for parts, (error, analytic) in zip(GROUPS, _fd(learner, _tasks(), est, GROUPS)):
        assert abs(analytic) > 1e-6, parts
        assert error < 1e-5, (parts, error)


def test_stock_batchnorm_fails_the_per_step_check(float64, monkeypatch):
    """The control: Keras' own moments (gradient stopped through the mean) fail the same check."""
    monkeypatch.setattr(functional, "_exact_moments",
                        lambda layer, x, mask: type(layer)._moments(layer, x, mask))
    learner = _learner(lslr=True, per_step_bn=True)
    est = _bound(estimators.get("maml", msl_steps=10), 4)
    [(error, _)] = _fd(learner, _tasks(), est, [("init", "bn")])
    assert error > 1e-4, error


def test_msl_weights_follow_the_papers_schedule():
    w = lambda step: mamlpp.msl_weights(step, 5, 10, tf.float64).numpy()  # noqa: E731
    np.testing.assert_allclose(w(0), [0.2] * 5)
    np.testing.assert_allclose(w(5), [0.1] * 4 + [0.6])  # 1/T - e/T; 1/T + e (T-1)/T
    np.testing.assert_allclose(w(9.9), [0.006] * 4 + [0.976])  # floors 0.03/T and 1 - (T-1) 0.03/T
    np.testing.assert_array_equal(w(10), [0, 0, 0, 0, 1])  # annealed: plain MAML from N on
    np.testing.assert_array_equal(mamlpp.msl_weights(0, 5, 0).numpy(), [0, 0, 0, 0, 1])


def test_msl_with_all_weight_on_the_last_step_equals_maml(float64):
    learner = _learner(lslr=True, per_step_bn=True)
    tasks = _tasks()
    maml = estimators.get("maml").meta_gradient(learner, tasks)
    annealed = _bound(estimators.get("maml", msl_steps=3), 3).meta_gradient(learner, tasks)
    assert float(annealed.loss) == float(maml.loss)
    for a, b in zip(annealed.grads, maml.grads):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    midway = _bound(estimators.get("maml", msl_steps=3), 1).meta_gradient(learner, tasks)
    assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(midway.grads, maml.grads)) > 1e-6


def test_da_equals_fomaml_before_the_switch_and_maml_after_in_one_trace(float64):
    learner = _learner(per_step_bn=True)
    tasks = _tasks()
    est = estimators.get("maml", first_order_steps=2)
    step = tf.Variable(0, dtype=tf.int64)
    est.bind_meta_step(step)
    traces = []

    @tf.function
    def da():
        traces.append(1)
        return est.meta_gradient(learner, tasks)

    before = da()
    fo = estimators.get("fomaml").meta_gradient(learner, tasks)
    for a, b in zip(before.grads, fo.grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-13)
    step.assign(2)
    after = da()
    so = estimators.get("maml").meta_gradient(learner, tasks)
    for a, b in zip(after.grads, so.grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-13)
    assert len(traces) == 1
    assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(fo.grads, so.grads)) > 1e-6


def test_msl_and_da_switch_inside_fit_with_at_most_two_traces():
    learner = MetaLearner(smooth_conv_bn(), inner_lr=0.3, inner_steps=2, lslr=True, per_step_bn=True)
    meta = MetaModel(learner)
    meta.compile(optimizer=keras.optimizers.Adam(mamlpp.cosine_meta_lr(1e-2, 6, 1e-4)),
                 estimator=estimators.get("maml", msl_steps=2, first_order_steps=3))
    tasks = classification_tasks(**TASKS, dtype="float32")
    data = tf.data.Dataset.from_tensors(tasks).repeat()
    for _ in range(3):  # three fits of two steps: the MSL end (step 2) and the DA switch (3) inside
        meta.fit(data, epochs=1, steps_per_epoch=2, verbose=0, check_inner_loop=False)
    assert int(meta.meta_step.numpy()) == 6
    assert meta.trace_count <= 2, meta.trace_count
    assert abs(float(meta.optimizer.learning_rate) - 1e-4) < 1e-9  # Keras' cosine decay ran to its end


def test_bad_values_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="msl_steps=-1 .--msl-steps."):
        estimators.get("maml", msl_steps=-1)
    with pytest.raises(ValueError, match="first_order_steps=-2 .--first-order-steps."):
        estimators.get("maml", first_order_steps=-2)
    with pytest.raises(ValueError, match="--lslr"):
        MetaModel(MetaLearner(small_dense(), lslr=True)).compile(estimator="reptile")
    with pytest.raises(ValueError, match="--per-step-bn"):
        MetaLearner(small_dense(), per_step_bn=True)  # no BatchNorm
    with pytest.raises(ValueError, match="bind_meta_step"):
        estimators.get("maml", msl_steps=2).meta_gradient(MetaLearner(small_dense()),
                                                          classification_tasks(1, 3, 1, 1, (4,), dtype="float32"))


@pytest.mark.parametrize("argv,flags", [
    (["--estimator", "implicit"], ("--preset maml++", "--estimator implicit")),
    (["--estimator", "reptile"], ("--preset maml++", "--estimator reptile")),
    (["--estimator", "shifting"], ("--preset maml++", "--estimator shifting")),
])
def test_preset_with_an_estimator_it_does_not_apply_to_exits_2(argv, flags, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--preset", "maml++"] + argv + ["--iterations", "1", "--no-export"]) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in flags) and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "runs")  # refused before anything was written


@pytest.mark.parametrize("flag", ["--msl-steps", "--first-order-steps"])
def test_negative_annealing_lengths_exit_2_naming_the_flag(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--preset", "maml++", flag, "-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "integer >= 0" in err and "Traceback" not in err


def test_exported_adapter_uses_the_last_steps_batchnorm_weights(tmp_path):
    """adapt_and_predict, MetaModel.adapt's plain Keras model and the learner agree and use set T
    (with set 0 in its place the answer differs); serving_default and model.keras use set 0."""
    keras.utils.set_random_seed(0)
    learner = MetaLearner(smooth_conv_bn(), inner_lr=0.3, inner_steps=2, lslr=True, per_step_bn=True)
    _scramble(learner)
    sx, sy, qx, _ = (t[0] for t in classification_tasks(**TASKS, dtype="float32"))
    path = export.export_adapter(learner, str(tmp_path), "m")
    served = tf.saved_model.load(path)
    logits = served.signatures["adapt_and_predict"](
        support_x=sx, support_y=tf.cast(sy, tf.int32), query_x=qx)["logits"].numpy()
    meta = learner.unflatten(learner.meta_values())
    params = learner.adapt(meta, sx, sy, second_order=False)
    np.testing.assert_allclose(logits, learner.fmodel(params, qx).numpy(), rtol=1e-4, atol=1e-5)
    set0 = learner.fmodel(learner.at_step(params, meta, 0), qx).numpy()
    assert np.abs(logits - set0).max() > 1e-3  # set T is not set 0: the adapter really uses it
    plain = MetaModel(learner).adapt(sx, sy)
    np.testing.assert_allclose(plain.predict(qx, batch_size=len(qx), verbose=0), logits, rtol=1e-4, atol=1e-5)
    init = keras.models.load_model(os.path.join(path, "model.keras"))
    np.testing.assert_allclose(init.predict(qx, batch_size=len(qx), verbose=0),
                               served.signatures["serving_default"](x=qx)["logits"].numpy(),
                               rtol=1e-4, atol=1e-5)


def test_preset_builds_the_papers_learner_and_keras_cosine_schedule():
    from tfmeta.app.config import build_learner, build_meta_optimizer

    args = cli._parser(with_search=False).parse_args(["train", "--preset", "maml++"])
    cli.apply_preset(args, ["train", "--preset", "maml++"])
    config = cli.run_config(args)
    learner = build_learner(config)
    assert len(learner.bn_variables) == 8  # gamma and beta of conv4's four BatchNorm layers
    assert all(tuple(v.shape)[0] == 5 for v in learner.bn_variables + learner.lslr_variables)
    assert len(learner.lslr_variables) == len(learner.fmodel.adapted) == 10  # 4 conv + head, kernel and bias
    schedule = build_meta_optimizer(config)._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    np.testing.assert_allclose([float(schedule(0)), float(schedule(25000)), float(schedule(50000))],
                               [1e-3, (1e-3 + 1e-5) / 2, 1e-5], rtol=1e-5)
    assert config.per_step_bn_stats and len(learner.bn_statistics) == 4  # BNRS: conv4's four BatchNorm layers
    argv = ["train", "--preset", "maml++", "--dataset", "sinusoid", "--no-per-step-bn", "--no-per-step-bn-stats"]
    without = cli._parser(with_search=False).parse_args(argv)
    cli.apply_preset(without, argv)
    config = cli.run_config(without)  # explicit flags override the preset
    assert config.per_step_bn is False and config.per_step_bn_stats is False
