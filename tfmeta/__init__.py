"""tfmeta: fast, exact gradient-based meta-learning for TensorFlow 2 / Keras 3."""

from tfmeta import _backend  # noqa: F401  (sets KERAS_BACKEND before Keras loads)

__version__ = "0.1.0"
