"""Shared fixtures: float64 models for finite-difference checks, small task batches."""

from __future__ import annotations

import numpy as np
import pytest

import tfmeta  # noqa: F401  (selects the TensorFlow backend)
import keras
import tensorflow as tf


@pytest.fixture
def float64():
    """Build Keras layers in float64 for the duration of a test."""
    previous, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # the global policy is cached once a layer exists
    yield
    keras.config.set_floatx(previous)
    keras.config.set_dtype_policy(policy)


def classification_tasks(meta_batch, ways, shots, query, shape, *, seed=0, dtype="float64"):
    """Random N-way tasks (support/query inputs from a normal distribution) as tensors."""
    rng = np.random.default_rng(seed)
    s, q = ways * shots, ways * query
    return (
        tf.constant(rng.normal(size=(meta_batch, s) + tuple(shape)).astype(dtype)),
        tf.constant(np.tile(np.repeat(np.arange(ways), shots), (meta_batch, 1)).astype("int32")),
        tf.constant(rng.normal(size=(meta_batch, q) + tuple(shape)).astype(dtype)),
        tf.constant(rng.integers(0, ways, size=(meta_batch, q)).astype("int32")),
    )


def smooth_conv_bn(ways=3, size=6, seed=0):
    """A small smooth Conv + BatchNorm network (tanh, average pooling): FD checks are meaningful."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((size, size, 1)),
        keras.layers.Conv2D(3, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("tanh"),
        keras.layers.AveragePooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(ways),
    ])


def small_dense(ways=3, inputs=4, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(5, activation="tanh"),
        keras.layers.Dense(ways),
    ])
