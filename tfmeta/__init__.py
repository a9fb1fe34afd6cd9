"""tfmeta: fast, exact gradient-based meta-learning for TensorFlow 2 / Keras 3."""

from tfmeta import _backend  # noqa: F401  (sets KERAS_BACKEND before Keras loads)
from tfmeta import runtime as _runtime

# Second-order gradients through nested while loops trip Grappler's AddN scheduling rewrite
# (AlreadyExistsError on the second call): see tfmeta.runtime.disable_addn_scheduling.
_runtime.disable_addn_scheduling()

__version__ = "0.1.0"
