"""MAML++'s per-step BatchNorm running statistics (BNRS; Antoniou, Edwards, Storkey 2019, Sec. 4):
row k is moved by the batch moments at the iterate of inner step k only, and a model adapted with
``statistics="running"`` normalises each example alone with row T."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import keras

from conftest import classification_tasks, small_dense, smooth_conv_bn
from tfmeta import estimators
from tfmeta.app import cli
from tfmeta.core.learner import MetaLearner
from tfmeta.training import MetaTrainer
from tfmeta.training.keras_model import MetaModel

TASKS = dict(meta_batch=2, ways=3, shots=2, query=3, shape=(6, 6, 1), dtype="float32")
STEPS = 3


def _learner(**kwargs):
    learner = MetaLearner(smooth_conv_bn(), inner_lr=0.3, inner_steps=STEPS, per_step_bn_stats=True, **kwargs)
    rng = np.random.default_rng(0)
    for v in learner.bn_variables:  # distinct per-step BatchNorm weights (they start as copies)
        v.assign(v.numpy() + rng.normal(scale=0.3, size=v.shape))
    for mean, variance in learner.bn_statistics:  # distinct rows, so a row moved by another step shows
        mean.assign(rng.normal(size=mean.shape))
        variance.assign(rng.uniform(0.5, 2.0, size=variance.shape))
    return learner


def _expected_rows(learner, tasks, before, reuse_window=1, momentum=None):
    """Row k after one meta-step: momentum * row k + (1 - momentum) * the tasks' mean batch moments
    of the support set at phi_k (k inner steps from the initialization, with set k)."""
    meta = learner.unflatten(learner.meta_values())
    momentum = learner.fmodel.bn_layers[0].momentum if momentum is None else momentum
    rows = []
    for k in range(STEPS + 1):
        per_task = []
        for sx, sy in zip(tasks[0], tasks[1]):
            params = (learner.at_step(list(meta.init), meta, 0) if k == 0 else
                      learner.adapt(meta, sx, sy, steps=k, second_order=False, reuse_window=min(reuse_window, k)))
            per_task.append(learner.fmodel.batch_moments(params, sx)[0])
        mean = np.mean([m.numpy() for m, _ in per_task], 0)
        variance = np.mean([v.numpy() for _, v in per_task], 0)
        rows.append((momentum * before[0][k] + (1 - momentum) * mean,
                     momentum * before[1][k] + (1 - momentum) * variance))
    return rows


@pytest.mark.parametrize("name,options", [("maml", {}), ("maml", {"first_order_steps": 5}),
                                          ("reuse", {"reuse_window": 2}), ("fomaml", {})])
def test_step_k_statistics_are_updated_only_by_step_k(name, options):
    learner = _learner(per_step_bn=True)
    tasks = classification_tasks(**TASKS)
    (mean, variance), = learner.bn_statistics
    estimator = estimators.get(name, **options)
    estimator.bind_meta_step(tf.Variable(0, dtype=tf.int64))
    step = tf.function(lambda: estimator.meta_gradient(learner, tasks))
    # the first meta-step sets each row to its step's moments; later ones move it with the layer's
    # momentum (rows then at distinct random values, so a row moved by another step shows)
    for count, momentum in ((0.0, 0.0), (1000.0, None)):
        learner.bn_statistics_count.assign(count)
        before = (mean.numpy(), variance.numpy())
        expected = _expected_rows(learner, tasks, before, options.get("reuse_window", 1), momentum)
        step()
        for k, (m, v) in enumerate(expected):
            np.testing.assert_allclose(mean.numpy()[k], m, rtol=1e-4, atol=1e-5, err_msg=f"mean, row {k}, n={count}")
            np.testing.assert_allclose(variance.numpy()[k], v, rtol=1e-4, atol=1e-5,
                                       err_msg=f"variance, row {k}, n={count}")
        assert float(learner.bn_statistics_count.numpy()) == count + 1
        mean.assign(mean.numpy() + np.random.default_rng(1).normal(size=mean.shape))
    # every row moved, each by its own step: the steps' moments differ from one another
    assert np.abs(np.diff([m for m, _ in expected], axis=0)).max() > 1e-3


def test_fit_keeps_the_statistics_and_checkpoints_them(tmp_path):
    learner = _learner()
    trainer = MetaTrainer(learner, "maml", keras.optimizers.Adam(1e-2), checkpoint_dir=str(tmp_path / "ckpt"))
    before = [v.numpy() for pair in learner.bn_statistics for v in pair]
    data = tf.data.Dataset.from_tensors(classification_tasks(**TASKS)).repeat()
    trainer.meta_model.fit(data, epochs=1, steps_per_epoch=2, verbose=0, check_inner_loop=False)
    trainer.save()
    after = [v.numpy() for pair in learner.bn_statistics for v in pair]
    assert all(np.abs(a - b).min() > 0 for a, b in zip(after, before))  # every row of every statistic moved
    for pair in learner.bn_statistics:
        for v in pair:
            v.assign(tf.zeros_like(v))
    learner.bn_statistics_count.assign(0.0)
    assert trainer.restore() == 2
    for v, value in zip([v for pair in learner.bn_statistics for v in pair], after):
        np.testing.assert_array_equal(v.numpy(), value)
    assert float(learner.bn_statistics_count.numpy()) == 2.0


def test_running_statistics_model_normalises_each_example_alone(tmp_path):
    learner = _learner(per_step_bn=True)
    sx, sy, qx, _ = (t[0] for t in classification_tasks(**TASKS))
    meta = MetaModel(learner)
    running = meta.adapt(sx, sy, statistics="running")
    (layer,) = [l for l in running.layers if isinstance(l, keras.layers.BatchNormalization)]
    mean, variance = learner.bn_statistics[0]
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mean.numpy()[STEPS])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), variance.numpy()[STEPS])
    alone = np.concatenate([running.predict(qx[i:i + 1], verbose=0) for i in range(len(qx))])
    np.testing.assert_allclose(alone, running.predict(qx, verbose=0), rtol=1e-5, atol=1e-6)
    # the batch-statistics model (the default) depends on the batch; this one does not
    batch = meta.adapt(sx, sy)
    assert np.abs(batch.predict(qx[:1], batch_size=1, verbose=0) - batch.predict(qx, verbose=0)[:1]).max() > 1e-3
    # by hand: the adapted weights with set T, normalised by row T's statistics
    params = learner.adapt(learner.unflatten(learner.meta_values()), sx, sy, second_order=False)
    gamma, beta = (p.numpy() for p in params[2:4])
    conv = tf.nn.conv2d(qx, params[0], 1, "SAME") + params[1]
    normalised = (conv - mean.numpy()[STEPS]) / np.sqrt(variance.numpy()[STEPS] + layer.epsilon) * gamma + beta
    pooled = tf.nn.avg_pool2d(tf.tanh(normalised), 2, 2, "VALID")
    by_hand = tf.reshape(pooled, [len(qx), -1]) @ params[4] + params[5]
    np.testing.assert_allclose(alone, by_hand.numpy(), rtol=1e-4, atol=1e-5)
    path = os.path.join(tmp_path, "adapted.keras")
    running.save(path)
    np.testing.assert_allclose(keras.models.load_model(path).predict(qx[:1], verbose=0), alone[:1], rtol=1e-5,
                               atol=1e-6)


def test_bad_combinations_are_refused_naming_the_flag(capsys, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--per-step-bn-stats.*BatchNormalization"):
        MetaLearner(small_dense(), per_step_bn_stats=True)
    with pytest.raises(ValueError, match="--per-step-bn-stats.*--remat"):
        MetaLearner(smooth_conv_bn(), per_step_bn_stats=True, remat="sqrt")
    for estimator, what in (("reptile", "reptile"), ("linearity", "observer"),
                            (estimators.get("maml", linearity_metrics=True), "--linearity-metrics")):
        with pytest.raises(ValueError, match=f"--per-step-bn-stats.*{what}"):
            MetaModel(_learner()).compile(estimator=estimator)
    with pytest.raises(ValueError, match="per_step_bn_stats=True"):
        MetaModel(MetaLearner(smooth_conv_bn())).adapt(np.zeros((3, 6, 6, 1), "float32"), np.arange(3),
                                                       statistics="running")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--dataset", "omniglot", "--per-step-bn-stats", "--estimator", "implicit",
                     "--iterations", "1", "--no-export"]) == 2
    err = capsys.readouterr().err
    assert "--per-step-bn-stats" in err and "--estimator implicit" in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "runs")


def test_exported_adapted_model_with_running_statistics_serves_one_example_at_a_time(tmp_path, capsys):
    from tfmeta import export

    learner = _learner(per_step_bn=True)
    sx, sy, qx, _ = (t[0] for t in classification_tasks(**TASKS))
    expected = MetaModel(learner).adapt(sx, sy, statistics="running").predict(qx, verbose=0)
    path = export.export_adapted(learner, sx, sy, str(tmp_path), "m", statistics="running")
    served = tf.saved_model.load(path).signatures["serving_default"]
    (name,) = served.structured_input_signature[1]
    alone = np.concatenate([list(served(**{name: qx[i:i + 1]}).values())[0].numpy() for i in range(len(qx))])
    np.testing.assert_allclose(alone, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(keras.models.load_model(os.path.join(path, "model.keras")).predict(qx, verbose=0),
                               expected, rtol=1e-5, atol=1e-6)
    # from the command line: a run without the statistics, or no support set, is refused naming the flags
    run = str(tmp_path / "run")
    assert cli.main(["train", "--iterations", "1", "--out", run, "--no-export", "--no-progress",
                     "--episodes", "2"]) == 0
    support = str(tmp_path / "support.npz")
    np.savez(support, support_x=np.zeros((5, 1), "float32"), support_y=np.zeros((5, 1), "float32"))
    capsys.readouterr()
    for argv, words in ((["--statistics", "running"], ("--statistics running", "--adapt-on")),
                        (["--adapt-on", support, "--statistics", "running"],
                         ("--statistics running", "--per-step-bn-stats"))):
        assert cli.main(["export", "--run", run, "--export-dir", str(tmp_path / "out"), *argv]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words) and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out")
