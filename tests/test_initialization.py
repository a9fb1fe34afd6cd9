"""conv4's documented initialization, and the inner-loop-effect warning (docs/initialization.md)."""

import math
import warnings

import keras
import numpy as np
import pytest

from tfmeta import MetaLearner
from tfmeta.core import models
from tfmeta.core.learner import InnerLoopWarning


def _conv_and_dense(model):
    return [l for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))]


def test_conv4_default_initialization_is_pytorchs():
    """Kernels VarianceScaling(1/3, fan_in, uniform), biases U(+-1/sqrt(fan_in)), BN epsilon 1.001e-5."""
    keras.utils.set_random_seed(0)
    model = models.conv4(5)
    layers = _conv_and_dense(model)
    assert [type(l).__name__ for l in layers] == ["Conv2D"] * 4 + ["Dense"]
    for layer, fan_in in zip(layers, (9, 576, 576, 576, 64)):
        bound = 1 / math.sqrt(fan_in)
        init = layer.kernel_initializer.get_config()
        assert type(layer.kernel_initializer).__name__ == "VarianceScaling", layer.name
        assert (init["scale"], init["mode"], init["distribution"]) == pytest.approx((1 / 3, "fan_in", "uniform"))
        bias_init = layer.bias_initializer.get_config()
        assert (bias_init["minval"], bias_init["maxval"]) == pytest.approx((-bound, bound)), layer.name
        # the weights actually drawn: uniform in +-bound (std bound/sqrt(3)), not Keras' Glorot / zeros
        kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
        assert np.abs(kernel).max() <= bound * (1 + 1e-6), layer.name
        assert kernel.std() == pytest.approx(bound / math.sqrt(3), rel=0.1 if kernel.size < 1000 else 0.03), layer.name
        assert np.abs(bias).max() <= bound * (1 + 1e-6) and np.abs(bias).max() > 0.5 * bound, layer.name
    norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(norms) == 4 and all(l.epsilon == models.PYTORCH_BN_EPSILON == 1.001e-5 for l in norms)


def test_conv4_keras_initialization_and_bad_init():
    keras.utils.set_random_seed(0)
    model = models.conv4(5, init="keras")
    layers = _conv_and_dense(model)
    assert all(type(l.kernel_initializer).__name__ == "GlorotUniform" for l in layers)
    assert all(not np.any(l.bias.numpy()) for l in layers)
    with pytest.raises(ValueError, match=r"init='torch'.*'pytorch', 'keras'"):
        models.conv4(5, init="torch")


def _tasks(m=1, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(5, dtype=np.int32), (m, 1))
    return ((rng.random((m, 5, 28, 28, 1)) > 0.8).astype("float32"), labels,
            (rng.random((m, 5, 28, 28, 1)) > 0.8).astype("float32"), labels)


def _check(scale):
    keras.utils.set_random_seed(0)
    model = models.conv4(5)
    for v in model.trainable_variables:
        if v.path.endswith("kernel"):
            v.assign(v * scale)
    learner = MetaLearner(model, inner_lr=0.4, inner_steps=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = learner.check_inner_loop(_tasks())
    return report, [w for w in caught if issubclass(w.category, InnerLoopWarning)]


def test_inner_loop_warning_fires_on_10x_kernels_not_on_default():
    report, caught = _check(1.0)
    assert not caught and not report["stalled"]
    assert report["median_change"] > 0.6 and report["support_loss_drop"] > 0.3
    report, caught = _check(10.0)
    assert report["stalled"] and report["median_change"] < 0.25
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "VarianceScaling(1/3, 'fan_in', 'uniform')" in message and "README" in message


def test_inner_loop_warning_says_when_the_support_loss_rises():
    """An inner learning rate so large that the steps overshoot: the warning says the loss rises
    and to lower the rate, not "drops by -X%" with advice to raise it."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
    learner = MetaLearner(model, task="regression", inner_lr=50.0, inner_steps=3)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 10, 4)).astype("float32")
    y = rng.normal(size=(2, 10, 1)).astype("float32")
    from tfmeta.core.task import Task
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = learner.check_inner_loop(Task(x, y, x, y))
    assert report["support_loss_drop"] < 0 and report["stalled"]
    message = str([w for w in caught if issubclass(w.category, InnerLoopWarning)][0].message)
    assert "the support loss rises by" in message and "lower the inner learning rate" in message
    assert "drops by -" not in message
