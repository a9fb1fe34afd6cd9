"""Standard networks of the few-shot literature, as plain Keras functional models.

- :func:`conv4`: the 4-layer convolutional network of Finn et al. for Omniglot (64 filters 3x3,
  BatchNorm, ReLU, 2x2 max-pool, four times, then a linear classifier on logits).
  ``smooth=True`` swaps ReLU/max-pool for tanh/average-pool, a smooth surrogate on which
  finite-difference checks of meta-gradients are meaningful.
- :func:`mlp`: the sinusoid regressor of Finn et al. (1 -> 40 -> 40 -> 1, ReLU).

Initialization matters for MAML (see ``docs/initialization.md``): with BatchNorm after every
convolution the effect of an inner SGD step on a convolution scales like lr / ||w||^2, so a
network whose kernels start large barely adapts in T steps. conv4's default ``init="pytorch"``
is the initialization of PyTorch's ``nn.Conv2d``/``nn.Linear`` (and so of learn2learn's and
Finn et al.'s PyTorch ports): kernels from ``VarianceScaling(1/3, "fan_in", "uniform")``
(``kaiming_uniform(a=sqrt(5))``, i.e. uniform in +-1/sqrt(fan_in)), biases uniform in
+-1/sqrt(fan_in), BatchNorm epsilon 1e-5 (1.001e-5, the smallest the fused BatchNorm kernel
accepts). ``init="keras"`` keeps Keras' layer defaults (Glorot-uniform kernels, zero biases,
BatchNorm epsilon 1e-3), whose middle kernels are about 1.7x larger.
"""

from __future__ import annotations

from typing import Sequence

from tfmeta.core import _backend  # noqa: F401

import math

import keras

#: conv4 initializations (see the module docstring).
INITS = ("pytorch", "keras")

#: BatchNorm epsilon of ``init="pytorch"``: PyTorch's 1e-5, raised to the fused kernel's minimum.
PYTORCH_BN_EPSILON = 1.001e-5


def fan_in_uniform(fan_in: int) -> dict:
    """PyTorch's default initializers for a layer with `fan_in` inputs, as Keras layer kwargs.

    kernel: ``VarianceScaling(1/3, "fan_in", "uniform")`` = PyTorch's ``kaiming_uniform_(a=sqrt(5))``,
    uniform in +-1/sqrt(fan_in); bias: uniform in +-1/sqrt(fan_in).
    """
    bound = 1.0 / math.sqrt(fan_in)
    return dict(
        kernel_initializer=keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
    )


def conv4(
    ways: int = 5,
    *,
    image_size: int = 28,
    channels: int = 1,
    filters: int = 64,
    smooth: bool = False,
    init: str = "pytorch",
    dtype: str | None = None,
) -> keras.Model:
    """The conv4 network: 4 x [Conv2D(filters, 3x3, same), BN, ReLU, MaxPool 2], Dense(ways).

    `init` is "pytorch" (default: PyTorch's layer initialization, see the module docstring) or
    "keras" (Keras' layer defaults).
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} is not valid: expected one of {INITS}.")
    torch_like = init == "pytorch"
    activation, pool = ("tanh", keras.layers.AveragePooling2D) if smooth else ("relu", keras.layers.MaxPooling2D)
    bn = dict(epsilon=PYTORCH_BN_EPSILON) if torch_like else {}
    inputs = keras.Input((image_size, image_size, channels), dtype=dtype)
    x = inputs
    fan_in = 9 * channels
    for _ in range(4):
        kw = fan_in_uniform(fan_in) if torch_like else {}
        x = keras.layers.Conv2D(filters, 3, padding="same", dtype=dtype, **kw)(x)
        x = keras.layers.BatchNormalization(dtype=dtype, **bn)(x)
        x = keras.layers.Activation(activation, dtype=dtype)(x)
        x = pool(2, dtype=dtype)(x)
        fan_in = 9 * filters
    x = keras.layers.Flatten(dtype=dtype)(x)
    kw = fan_in_uniform(int(x.shape[-1])) if torch_like else {}
    outputs = keras.layers.Dense(ways, dtype=dtype, name="head", **kw)(x)
    return keras.Model(inputs, outputs, name="conv4")


def mlp(
    hidden: Sequence[int] = (40, 40),
    *,
    inputs: int = 1,
    outputs: int = 1,
    activation: str = "relu",
    dtype: str | None = None,
) -> keras.Model:
    """A fully connected regressor (Finn et al.'s sinusoid network by default)."""
    x_in = keras.Input((inputs,), dtype=dtype)
    x = x_in
    for width in hidden:
        x = keras.layers.Dense(width, activation=activation, dtype=dtype)(x)
    y = keras.layers.Dense(outputs, dtype=dtype, name="head")(x)
    return keras.Model(x_in, y, name="mlp")


MODELS = {"conv4": conv4, "mlp": mlp}
