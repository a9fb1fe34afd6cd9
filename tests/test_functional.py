"""The functional core: any Keras model on explicit tensors, adapted-weight selection, BN policy."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras

from conftest import classification_tasks, smooth_conv_bn
from tfmeta import estimators
from tfmeta.core.functional import FunctionalModel, select_adapted
from tfmeta.core.learner import MetaLearner


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.out(self.hidden(x))


def _functional():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def _sequential():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])


def _subclassed():
    model = Subclassed()
    model(np.zeros((1, 4), "float32"))
    return model


@pytest.mark.parametrize("build", [_sequential, _functional, _subclassed])
def test_any_keras_model_runs_on_explicit_parameters(build):
    model = build()
    fmodel = FunctionalModel(model)
    x = tf.random.normal([5, 4])
    np.testing.assert_allclose(fmodel(fmodel.parameters(), x), model(x), rtol=1e-6)
    doubled = [2 * p for p in fmodel.parameters()]
    assert not np.allclose(fmodel(doubled, x), model(x))
    # inner loop and meta-gradient work on it
    tasks = classification_tasks(2, 3, 1, 2, (4,), dtype="float32")
    result = estimators.get("maml").meta_gradient(MetaLearner(model, inner_steps=2), tasks)
    assert all(np.all(np.isfinite(g)) for g in result.grads)


def test_head_body_and_predicate_selection():
    model = _sequential()
    paths = [v.path for v in model.trainable_variables]
    assert select_adapted(paths, "all") == (0, 1, 2, 3)
    assert select_adapted(paths, "head") == (2, 3)
    assert select_adapted(paths, "body") == (0, 1)
    assert select_adapted(paths, lambda p: p.endswith("bias")) == (1, 3)
    with pytest.raises(ValueError, match="adapt"):
        select_adapted(paths, "nothing")
    with pytest.raises(ValueError, match="selects none"):
        select_adapted(paths, lambda p: False)


@pytest.mark.parametrize("adapt,moving", [("head", (2, 3)), ("body", (0, 1))])
def test_only_selected_weights_adapt(adapt, moving):
    learner = MetaLearner(_sequential(), inner_steps=3, adapt=adapt)
    sx, sy, _, _ = classification_tasks(1, 3, 2, 1, (4,), dtype="float32")
    meta = learner.unflatten(learner.meta_values())
    phi = learner.adapt(meta, sx[0], sy[0])
    for i, (a, b) in enumerate(zip(meta.init, phi)):
        assert (not np.allclose(a, b)) == (i in moving)


def test_inner_steps_never_touch_running_statistics():
    model = smooth_conv_bn()
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    learner = MetaLearner(model, inner_steps=2)
    tasks = classification_tasks(2, 3, 2, 3, (6, 6, 1), dtype="float32")
    tf.function(lambda: estimators.get("maml").meta_gradient(learner, tasks))()
    for a, b in zip(before, model.non_trainable_variables):
        np.testing.assert_array_equal(a, b.numpy())


def test_running_policy_normalises_with_stored_statistics():
    model = smooth_conv_bn()
    for v in model.non_trainable_variables:  # non-trivial running statistics
        v.assign(tf.random.uniform(v.shape, 0.5, 1.5))
    x = tf.random.normal([4, 6, 6, 1])
    running = FunctionalModel(model, batchnorm="running")
    batch = FunctionalModel(model, batchnorm="batch")
    params = running.parameters()
    np.testing.assert_allclose(running(params, x), model(x, training=False), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch(params, x), model(x, training=True), rtol=1e-5, atol=1e-6)


def test_bad_models_and_policies_are_rejected():
    with pytest.raises(ValueError, match="no trainable weights"):
        FunctionalModel(keras.Sequential([keras.Input((3,)), keras.layers.Flatten()]))
    with pytest.raises(ValueError, match="not built"):
        FunctionalModel(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="batchnorm"):
        FunctionalModel(_sequential(), batchnorm="frozen")
    with pytest.raises(TypeError, match="keras.Model"):
        FunctionalModel("conv4")
