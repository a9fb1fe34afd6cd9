"""Export learned initializations in TF Serving's layout, atomically.

``saved_models/<name>/<version>/`` with integer versions: each export is written to a hidden
temporary directory beside the versions and renamed into place, so a reader (TF Serving polls
this directory) never sees a half-written version, a crash leaves at most a ``.tmp-*`` directory
that TF Serving ignores, and a new version never overwrites an old one.

Each version holds a SavedModel (``serving_default``: inputs -> the model's outputs, BatchNorm in
inference mode) that ``tf.saved_model.load`` serves without tfmeta installed, and
``model.keras``, the same initialization for ``keras.models.load_model`` and plain ``model.fit``
fine-tuning.
"""

from __future__ import annotations

import os
import shutil
import uuid

from tfmeta import _backend  # noqa: F401

import keras


def versions(root: str) -> list[int]:
    """Integer versions already present under `root` (a model's directory), sorted."""
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root) if d.isdigit())


def export_model(model: keras.Model, base_dir: str, name: str) -> str:
    """Write `model` as ``base_dir/name/<next version>/`` atomically; returns that path.

    Example:
        >>> path = export_model(learner.model, "saved_models", "sinusoid_maml")
        >>> served = tf.saved_model.load(path).signatures["serving_default"]
    """
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"name={name!r} is not valid: expected a non-empty directory name.")
    root = os.path.join(base_dir, name)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{uuid.uuid4().hex}")
    try:
        model.export(tmp, format="tf_saved_model", verbose=False)
        model.save(os.path.join(tmp, "model.keras"))
        while True:
            target = os.path.join(root, str((versions(root) or [0])[-1] + 1))
            try:
                os.rename(tmp, target)  # atomic; fails if another writer took this version
                return target
            except OSError:
                if not os.path.exists(target):
                    raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
