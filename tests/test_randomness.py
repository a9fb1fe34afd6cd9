"""Random layers (Dropout) in meta-learning: fresh masks on every call, every inner step and every
task; reproducible under a seed; exact meta-gradients for the masks drawn (tfmeta.core.randomness)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import keras

from conftest import classification_tasks, fd_check
from tfmeta import estimators
from tfmeta.core import inner_loop, inner_optimizers, randomness
from tfmeta.core.functional import FunctionalModel
from tfmeta.training.keras_model import MetaModel
from tfmeta.core.learner import MetaLearner


def _dropout_net(seed=0, rate=0.5):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dropout(rate),
        keras.layers.Dense(3),
    ])


def _same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_plain_calls_draw_fresh_masks():
    fmodel = FunctionalModel(_dropout_net())
    x = tf.ones([16, 4])
    first, second = fmodel(fmodel.parameters(), x), fmodel(fmodel.parameters(), x)
    assert not np.allclose(first, second)
    # inference mode is deterministic
    np.testing.assert_array_equal(fmodel(fmodel.parameters(), x, training=False),
                                  fmodel(fmodel.parameters(), x, training=False))


def test_each_inner_step_draws_its_own_mask():
    """SGD on sum(w * dropout(1)): w_0 - w_T = 2 eta * sum_t mask_t. One mask for all T steps
    would leave every entry at 0 or 2 eta T; distinct masks give counts in between."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    fmodel = FunctionalModel(model)
    x = tf.ones([1, 64])
    steps, eta = 4, 0.5

    @tf.function
    def run(seed):
        with randomness.scope(seed):
            return inner_loop.run(lambda p: tf.reduce_sum(fmodel(p, x)), fmodel.parameters(),
                                  inner_optimizers.sgd(eta), steps)

    counts = -run(tf.constant([1, 2], tf.int64))[0].numpy().ravel() / (2 * eta)
    np.testing.assert_allclose(counts, np.round(counts))
    assert set(np.round(counts)) - {0, steps}, "every inner step drew the same dropout mask"
    np.testing.assert_array_equal(counts, -run(tf.constant([1, 2], tf.int64))[0].numpy().ravel() / (2 * eta))


def _learner(seed=0):
    return MetaLearner(_dropout_net(seed), inner_optimizer="sgd", inner_lr=0.3, inner_steps=3)


def test_meta_gradient_masks_are_fresh_per_task_and_per_call_and_reproducible_under_a_seed():
    learner = _learner()
    one = classification_tasks(1, 3, 2, 2, (4,), seed=1, dtype="float32")
    two = tuple(tf.concat([t, t], 0) for t in one)  # the same task twice
    est = estimators.get("maml")

    @tf.function
    def grads(tasks, seed):
        with randomness.scope(seed):
            return est.meta_gradient(learner, tasks).grads

    s1, s2 = tf.constant([0, 7], tf.int64), tf.constant([0, 8], tf.int64)
    assert _same(grads(one, s1), grads(one, s1))  # a fixed seed reproduces
    assert not _same(grads(one, s1), grads(one, s2))  # another seed, other masks
    # two copies of one task get different masks: their mean is not the single task's gradient
    assert not np.allclose(grads(two, s1)[0], grads(one, s1)[0])
    # no scope open: every call draws new masks
    plain = tf.function(lambda tasks: est.meta_gradient(learner, tasks).grads)
    assert not _same(plain(one), plain(one))


def test_meta_training_is_reproducible_from_the_model_seed():
    def train(seed):
        learner = _learner(seed)
        meta = MetaModel(learner)
        meta.compile(keras.optimizers.SGD(0.1), "maml")
        tasks = classification_tasks(2, 3, 2, 2, (4,), seed=1, dtype="float32")
        for _ in range(2):
            meta.train_on_batch(dict(zip(("support_x", "support_y", "query_x", "query_y"), tasks)))
        return [v.numpy() for v in learner.model.weights]

    assert _same(train(0), train(0))


def test_meta_gradient_with_dropout_matches_finite_differences_with_the_masks_held(float64):
    """Exact MAML through T=3 inner steps (a tf.while_loop) of a tanh net with Dropout: under one
    seed the masks are fixed, so the meta-loss is a smooth function of theta."""
    learner = _learner()
    tasks = classification_tasks(2, 3, 2, 3, (4,), seed=2)
    with randomness.scope([3, 4]):
        error, analytic, _ = fd_check(learner, tasks, "maml")
    assert abs(analytic) > 1e-6
    assert error < 1e-6, error
