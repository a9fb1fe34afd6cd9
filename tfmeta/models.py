"""Standard networks of the few-shot literature, as plain Keras functional models.

- :func:`conv4`: the 4-layer convolutional network of Finn et al. for Omniglot (64 filters 3x3,
  BatchNorm, ReLU, 2x2 max-pool, four times, then a linear classifier on logits).
  ``smooth=True`` swaps ReLU/max-pool for tanh/average-pool, a smooth surrogate on which
  finite-difference checks of meta-gradients are meaningful.
- :func:`mlp`: the sinusoid regressor of Finn et al. (1 -> 40 -> 40 -> 1, ReLU).
"""

from __future__ import annotations

from typing import Sequence

from tfmeta import _backend  # noqa: F401

import keras


def conv4(
    ways: int = 5,
    *,
    image_size: int = 28,
    channels: int = 1,
    filters: int = 64,
    smooth: bool = False,
    dtype: str | None = None,
) -> keras.Model:
    """The conv4 network: 4 x [Conv2D(filters, 3x3, same), BN, ReLU, MaxPool 2], Dense(ways)."""
    activation, pool = ("tanh", keras.layers.AveragePooling2D) if smooth else ("relu", keras.layers.MaxPooling2D)
    inputs = keras.Input((image_size, image_size, channels), dtype=dtype)
    x = inputs
    for _ in range(4):
        x = keras.layers.Conv2D(filters, 3, padding="same", dtype=dtype)(x)
        x = keras.layers.BatchNormalization(dtype=dtype)(x)
        x = keras.layers.Activation(activation, dtype=dtype)(x)
        x = pool(2, dtype=dtype)(x)
    x = keras.layers.Flatten(dtype=dtype)(x)
    outputs = keras.layers.Dense(ways, dtype=dtype, name="head")(x)
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
