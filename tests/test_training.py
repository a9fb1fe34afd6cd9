"""Meta-training: the loss that must drop, non-finite guards, checkpoints/resume, export."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import keras

from conftest import classification_tasks, small_dense
from tfmeta.training import evaluation
from tfmeta.core import models
from tfmeta.data import SinusoidTasks
from tfmeta.core.learner import MetaLearner
from tfmeta.training import MetaTrainer, NonFiniteMetaStepError


def _sinusoid_learner(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return MetaLearner(models.mlp(), task="regression", inner_lr=0.01, inner_steps=1, **kwargs)


@pytest.mark.parametrize("estimator,factor", [("maml", 0.8), ("fomaml", 0.8), ("reptile", 0.9)])
def test_meta_training_on_sinusoid_makes_adaptation_help(estimator, factor):
    learner = _sinusoid_learner()
    test = SinusoidTasks(shots=5, query=10, meta_batch=25, seed=7, split="test")
    before_training = evaluation.evaluate(learner, test, episodes=200)
    trainer = MetaTrainer(learner, estimator, keras.optimizers.Adam(1e-3))
    trainer.fit(SinusoidTasks(shots=5, query=10, meta_batch=25, seed=0), iterations=400, progress=False)
    after = evaluation.evaluate(learner, test, episodes=200)
    assert after["loss_after"] < before_training["loss_after"] * factor
    if estimator != "reptile":  # MAML-style objectives optimise the post-adaptation loss
        assert after["loss_after"] < after["loss_before"]


def test_non_finite_meta_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    poison = tf.Variable(1.0, dtype=tf.float32)

    def outer_loss(learner, params, meta, x, y):
        return learner.task_loss(learner.fmodel(params, x), y) * poison

    learner = _sinusoid_learner(outer_loss=outer_loss)
    trainer = MetaTrainer(learner, "maml", checkpoint_dir=str(tmp_path), checkpoint_every=1)
    sampler = SinusoidTasks(shots=5, query=10, meta_batch=4, seed=0)
    trainer.fit(sampler, iterations=3, progress=False)
    good = [v.numpy().copy() for v in learner.meta_variables]
    latest = trainer.manager.latest_checkpoint
    poison.assign(float("nan"))
    with pytest.raises(NonFiniteMetaStepError, match=r"meta-step 4: estimator 'maml'.*ckpt-3"):
        trainer.fit(sampler, iterations=6, progress=False)
    for a, v in zip(good, learner.meta_variables):
        np.testing.assert_array_equal(a, v.numpy())
    assert trainer.manager.latest_checkpoint == latest


def test_resume_reaches_the_same_parameters(tmp_path):
    sampler = SinusoidTasks(shots=5, query=10, meta_batch=4, seed=0)
    straight = _sinusoid_learner()
    MetaTrainer(straight, "maml").fit(sampler, iterations=6, progress=False)

    first = _sinusoid_learner()
    MetaTrainer(first, "maml", checkpoint_dir=str(tmp_path), checkpoint_every=3).fit(sampler, iterations=3, progress=False)
    resumed = _sinusoid_learner(seed=123)  # different init: everything must come from the checkpoint
    trainer = MetaTrainer(resumed, "maml", checkpoint_dir=str(tmp_path))
    trainer.fit(sampler, iterations=6, progress=False)
    assert int(trainer.step) == 6
    for a, b in zip(straight.meta_variables, resumed.meta_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("field,bad,match", [
    (1, lambda y: tf.expand_dims(y, -1), "support_y has shape"),
    (3, lambda y: tf.cast(y, tf.float32), "integer class labels"),
    (0, lambda x: x[..., :3], "support_x has shape"),
])
def test_task_batches_of_the_wrong_shape_are_rejected(field, bad, match):
    learner = MetaLearner(small_dense(), inner_steps=1)
    tasks = list(classification_tasks(2, 3, 1, 2, (4,), dtype="float32"))
    tasks[field] = bad(tasks[field])
    with pytest.raises(ValueError, match=match):
        MetaTrainer(learner, "maml").train_step(tasks)


def test_first_order_estimators_refuse_meta_sgd():
    learner = MetaLearner(small_dense(), meta_sgd=True)
    for name in ("fomaml", "reptile"):
        with pytest.raises(ValueError, match="meta_sgd"):
            MetaTrainer(learner, name)
    with pytest.raises(ValueError, match="estimator"):
        MetaTrainer(learner, "bogus")


def test_repeated_second_order_steps_on_large_activations():
    """Regression: Grappler's AddN->AccumulateNV2 rewrite leaked a per-step TemporaryVariable in
    the nested while-loop gradient, so the *second* meta-step failed with AlreadyExistsError
    (conv4, 64 filters, 30 ways). tfmeta turns that rewrite off on import."""
    from tfmeta.app import bench
    keras.utils.set_random_seed(0)
    tasks = tuple(tf.constant(t) for t in bench.random_tasks(1, 30, 1, 15))
    trainer = MetaTrainer(MetaLearner(models.conv4(30), inner_steps=2), "maml")
    losses = [trainer.train_step(tasks)["loss"] for _ in range(3)]
    assert all(np.isfinite(losses))


def test_skip_mode_leaves_bad_steps_out_and_goes_on():
    poison = tf.Variable(1.0, dtype=tf.float32)

    def outer_loss(learner, params, meta, x, y):
        return learner.task_loss(learner.fmodel(params, x), y) * poison

    learner = _sinusoid_learner(outer_loss=outer_loss)
    trainer = MetaTrainer(learner, "maml", on_nonfinite="skip", clip_norm=1.0)
    sampler = SinusoidTasks(shots=5, query=10, meta_batch=4, seed=0)
    trainer.train_step(sampler.sample(0))
    good = [v.numpy().copy() for v in learner.meta_variables]
    poison.assign(float("inf"))
    logs = trainer.train_step(sampler.sample(1))
    for a, v in zip(good, learner.meta_variables):
        np.testing.assert_array_equal(a, v.numpy())
    assert int(trainer.step.numpy()) == 2 and np.isfinite(logs["loss"])
    poison.assign(1.0)
    trainer.train_step(sampler.sample(2))
    assert any(not np.array_equal(a, v.numpy()) for a, v in zip(good, learner.meta_variables))
    with pytest.raises(ValueError, match="on_nonfinite"):
        MetaTrainer(learner, "maml", on_nonfinite="ignore")


def test_same_seed_same_meta_parameters():
    sampler = SinusoidTasks(shots=5, query=10, meta_batch=8, seed=3)
    finals = []
    for _ in range(2):
        learner = _sinusoid_learner(seed=11)
        MetaTrainer(learner, "maml").fit(sampler, iterations=20, progress=False)
        finals.append([v.numpy() for v in learner.meta_variables])
    for a, b in zip(*finals):
        np.testing.assert_array_equal(a, b)


def test_run_directory_in_use_is_refused(tmp_path):
    from tfmeta.app import cli
    from tfmeta.app.rundir import RunDirectoryInUse, RunLock
    with RunLock(str(tmp_path / "run")):
        with pytest.raises(RunDirectoryInUse, match="in use by another process"):
            with RunLock(str(tmp_path / "run")):
                pass
        assert cli.main(["train", "--out", str(tmp_path / "run"), "--iterations", "1", "--no-progress"]) == 2
    with RunLock(str(tmp_path / "run")):  # released: usable again
        pass
