"""Shared fixtures: float64 models for finite-difference checks, small task batches."""

from __future__ import annotations

import os

import numpy as np
import pytest

# TensorFlow, Keras and tfmeta are imported where they are used and, in every process that runs
# tests, by pytest_configure below (tfmeta first: it selects Keras' TensorFlow backend and oneDNN
# before TensorFlow loads); pytest-xdist's controller process runs no test and skips them (a
# TensorFlow start-up, ~10 s before the workers start).


@pytest.fixture
def float64():
    """Build Keras layers in float64 for the duration of a test."""
    import keras

    previous, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # the global policy is cached once a layer exists
    yield
    keras.config.set_floatx(previous)
    keras.config.set_dtype_policy(policy)


def classification_tasks(meta_batch, ways, shots, query, shape, *, seed=0, dtype="float64"):
    """Random N-way tasks (support/query inputs from a normal distribution) as tensors."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    s, q = ways * shots, ways * query
    return (
        tf.constant(rng.normal(size=(meta_batch, s) + tuple(shape)).astype(dtype)),
        tf.constant(np.tile(np.repeat(np.arange(ways), shots), (meta_batch, 1)).astype("int32")),
        tf.constant(rng.normal(size=(meta_batch, q) + tuple(shape)).astype(dtype)),
        tf.constant(rng.integers(0, ways, size=(meta_batch, q)).astype("int32")),
    )


def fd_check(learner, tasks, estimator="maml", eps=1e-5, seed=1):
    """Relative error of <meta-gradient, d> against a central difference of the meta-loss along a
    random direction d, in float64. Returns (relative error, <meta-gradient, d>, MetaGradient)."""
    import tensorflow as tf

    from tfmeta import estimators

    assert learner.dtype == tf.float64, "finite differences need a float64 model"
    est = estimators.get(estimator) if isinstance(estimator, str) else estimator
    fn = tf.function(lambda values: est.meta_gradient(learner, tasks, values))
    values = learner.meta_values()
    result = fn(values)
    rng = np.random.default_rng(seed)
    direction = [tf.constant(rng.normal(size=v.shape), v.dtype) for v in values]

    def loss_at(step):
        return float(fn([v + step * d for v, d in zip(values, direction)]).loss)

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    analytic = sum(float(tf.reduce_sum(g * d)) for g, d in zip(result.grads, direction))
    return abs(numeric - analytic) / max(abs(analytic), 1e-12), analytic, result


def smooth_conv_bn(ways=3, size=6, seed=0):
    """A small smooth Conv + BatchNorm network (tanh, average pooling): FD checks are meaningful."""
    import keras

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
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(5, activation="tanh"),
        keras.layers.Dense(ways),
    ])


#: The Omniglot small background archive's folder: $TFMETA_OMNIGLOT_DIR, else ../shared/data/omniglot
#: beside the repository. Tests that need it skip without it (README, "Run the tests").
OMNIGLOT_DIR = os.environ.get("TFMETA_OMNIGLOT_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "omniglot")



#: The test files with the most CPU time (processes started, distributed workers, graph traces), run
#: first, longest first (measured with a per-test CPU-time log, 2026-12-06): pytest-xdist's workers
#: (`-n 2 --dist loadfile`) take one file at a time in this order, so the two end together on short
#: files instead of one waiting for the other's long file.
LONGEST_FIRST = ("test_distribute.py", "test_autometa.py", "test_remat.py", "test_fault_matrix.py",
                 "test_implicit.py", "test_onednn.py", "test_reuse.py", "test_linearity.py",
                 "test_export_tflite.py", "test_training.py", "test_keras_model.py", "test_export.py",
                 "test_shifting.py", "test_readme.py", "test_plain_models.py", "test_newcomer.py",
                 "test_bnrs.py", "test_mamlpp.py", "test_cli.py", "test_suites.py", "test_meta_gradients.py",
                 "test_properties.py", "test_faults.py")


def pytest_configure(config):
    # pytest-xdist >= 3.6 otherwise reorders files by their number of tests (most first), which
    # puts the long files with few tests last.
    config.option.loadscopereorder = False
    xdist_controller = bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")
    if not xdist_controller:  # a process that runs tests: tfmeta before any test module's TensorFlow
        import tfmeta  # noqa: F401


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
