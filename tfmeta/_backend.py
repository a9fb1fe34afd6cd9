"""Make sure Keras runs on TensorFlow before anything imports it.

tfmeta builds nested `tf.GradientTape`s inside `tf.function` graphs, so Keras must use its
TensorFlow backend. Importing tfmeta sets ``KERAS_BACKEND=tensorflow`` unless the user chose a
backend already; a different backend is refused with a clear error when Keras is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "tfmeta needs Keras' TensorFlow backend, but KERAS_BACKEND="
        f"{keras.backend.backend()!r}; unset it or set KERAS_BACKEND=tensorflow."
    )
