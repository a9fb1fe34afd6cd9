"""Export learned initializations in TF Serving's layout, atomically.

``saved_models/<name>/<version>/`` with integer versions: each export is written to a hidden
temporary directory beside the versions and renamed into place, so a reader (TF Serving polls
this directory) never sees a half-written version, a crash leaves at most a ``.tmp-<pid>-*``
directory that TF Serving ignores (the next export removes those whose process is gone), and a new
version never overwrites an old one. Parameters that are not finite are never exported.

Each version holds a SavedModel that ``tf.saved_model.load`` serves without tfmeta installed, and
``model.keras``, the same model for ``keras.models.load_model`` and plain ``model.fit``
fine-tuning. The ``model.keras`` of a meta-learner predicts as the learner does (BatchNorm with the
statistics of the batch it is given, see :mod:`tfmeta.core.plain`), never with the running statistics
that meta-training leaves untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid

from tfmeta.core import _backend  # noqa: F401

import keras
import tensorflow as tf

from tfmeta.core.plain import plain_model


def versions(root: str) -> list[int]:
    """Integer versions already present under `root` (a model's directory), sorted."""
    if not os.path.isdir(root):
        return []
    return sorted(int(d) for d in os.listdir(root) if d.isdigit())


_TMP = re.compile(r"^\.tmp-(?:(\d+)-)?[0-9a-f]{32}$")
#: A temporary export directory without a process id (older tfmeta) counts as stale after this.
_LEGACY_TMP_SECONDS = 3600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_tmp(root: str) -> list[str]:
    """Remove ``root/.tmp-<pid>-*`` directories left by exports whose process no longer runs
    (e.g. killed); returns the paths removed. A live writer's directory is kept."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for entry in os.listdir(root):
        match = _TMP.match(entry)
        path = os.path.join(root, entry)
        if not match or not os.path.isdir(path):
            continue
        if match.group(1) is not None:
            stale = int(match.group(1)) != os.getpid() and not _alive(int(match.group(1)))
        else:
            stale = time.time() - os.path.getmtime(path) > _LEGACY_TMP_SECONDS
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _check_finite(values, what: str) -> None:
    values = list(values)
    for i, value in enumerate(values):
        value = tf.convert_to_tensor(value)
        if value.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(value))):
            name = what if len(values) == 1 else f"{what} {i}"
            raise ValueError(f"{name} holds NaN or Inf: refusing to export a model that would predict NaN.")


def _write_version(base_dir: str, name: str, write) -> str:
    """Run ``write(tmp_dir)`` and rename tmp_dir to ``base_dir/name/<next version>`` atomically."""
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"name={name!r} is not valid: expected a non-empty directory name.")
    root = os.path.join(base_dir, name)
    for path in (base_dir, root):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"export directory {path!r} is a file, not a directory.")
    os.makedirs(root, exist_ok=True)
    clean_stale_tmp(root)
    tmp = os.path.join(root, f".tmp-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        write(tmp)
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


def export_model(model: keras.Model, base_dir: str, name: str) -> str:
    """Write a plain Keras model as ``base_dir/name/<next version>/`` atomically; returns the path.

    The version holds a SavedModel (``serving_default``, inference mode) and ``model.keras``.

    Example:
        >>> path = export_model(adapted_model, "saved_models", "omniglot_task_17")
        >>> served = tf.saved_model.load(path).signatures["serving_default"]
    """

    _check_finite([v.value for v in model.weights], "weight")

    def write(tmp):
        model.export(tmp, format="tf_saved_model", verbose=False)
        model.save(os.path.join(tmp, "model.keras"))

    return _write_version(base_dir, name, write)


def export_adapted(learner, support_x, support_y, base_dir: str, name: str, steps: int | None = None,
                   statistics: str = "batch") -> str:
    """Adapt to one task's support set and export that model for plain serving.

    ``base_dir/name/<next version>/`` holds a SavedModel whose ``serving_default(x)`` predicts with
    the adapted weights (BatchNorm as the learner's policy, like `adapt_and_predict`), and
    ``model.keras``, a plain Keras model holding the adapted weights whose ``predict`` follows the
    same BatchNorm policy (:func:`tfmeta.core.plain.plain_model`).

    ``statistics="running"`` (a learner with MAML++'s per-step running statistics): both normalise
    with the running statistics of the last inner step instead of the batch, so each example is
    predicted alone (``MetaModel.adapt(..., statistics="running")``); the SavedModel is then Keras'
    own export of that model.
    """
    from tfmeta.training.keras_model import MetaModel

    _check_finite(learner.meta_values(), "meta-parameter")
    for what, array in (("support_x", support_x), ("support_y", support_y)):
        if tf.size(array) == 0:
            raise ValueError(f"{what} is empty: expected a support set with at least one example.")
        _check_finite([array], what)
    adapted_model = MetaModel(learner).adapt(support_x, support_y, steps=steps, statistics=statistics)
    _check_finite([v.value for v in adapted_model.trainable_variables], "adapted weight")
    module = None if statistics == "running" else _Adapter(
        learner, adapted=[v.value for v in adapted_model.trainable_variables])

    def write(tmp):
        if module is None:  # running statistics: Keras' own export of the stock-BatchNorm model
            adapted_model.export(tmp, format="tf_saved_model", verbose=False)
        else:
            tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve.get_concrete_function()})
        adapted_model.save(os.path.join(tmp, "model.keras"))

    return _write_version(base_dir, name, write)


class _Adapter(tf.Module):
    """The serving graph of a meta-learned model: predict at the initialization, or adapt first."""

    def __init__(self, learner, adapted=None):
        super().__init__(name="tfmeta_adapter")
        model = learner.model
        # Parameters adapted to one task (served instead of the initialization), if given.
        self.adapted = [tf.Variable(p, trainable=False) for p in adapted] if adapted is not None else None
        # Track the TensorFlow variables behind the Keras variables the functions read.
        self.meta_variables = [v.value for v in learner.meta_variables]
        self.state_variables = [v.value for v in model.non_trainable_variables]
        self.learner = learner
        features = tuple(model.inputs[0].shape[1:])
        dtype = learner.dtype
        self.output_key = "logits" if learner.task == "classification" else "predictions"
        x_spec = tf.TensorSpec((None,) + features, dtype, name="x")
        if learner.task == "classification":
            self.target_shape = []
            # the shape is checked in the graph with a clear message (a signature does not check it)
            y_spec = tf.TensorSpec(None, tf.int32, name="support_y")
            self.num_classes = int(model.outputs[0].shape[-1])
        else:
            self.target_shape = [int(d) for d in model.outputs[0].shape[1:]]
            y_spec = tf.TensorSpec(None, dtype, name="support_y")
        sx_spec = tf.TensorSpec((None,) + features, dtype, name="support_x")
        qx_spec = tf.TensorSpec((None,) + features, dtype, name="query_x")
        self.serve = tf.function(self._serve, input_signature=[x_spec], autograph=False)
        self.adapt_and_predict = tf.function(self._adapt_and_predict, input_signature=[sx_spec, y_spec, qx_spec],
                                             autograph=False)

    def _serve(self, x):
        learner = self.learner
        if self.adapted is not None:
            return {self.output_key: learner.fmodel([tf.convert_to_tensor(v) for v in self.adapted], x)}
        meta = learner.unflatten(learner.meta_values())
        return {self.output_key: learner.fmodel(meta.init, x)}

    def _adapt_and_predict(self, support_x, support_y, query_x):
        learner = self.learner
        # Cheap checks that fail in the graph with a clear message (TF Serving returns it after
        # "Graph execution error"): an empty set, NaN/Inf inputs, sizes and shapes that disagree.
        checks = [
            tf.debugging.assert_positive(tf.shape(support_x)[0],
                                         message="support_x is empty: expected at least one support example"),
            tf.debugging.assert_positive(tf.shape(query_x)[0],
                                         message="query_x is empty: expected at least one query example"),
            tf.debugging.assert_equal(
                tf.shape(support_x)[0], tf.shape(support_y)[0],
                message="support_x and support_y must hold the same number of examples"),
            tf.debugging.assert_all_finite(support_x, "support_x holds NaN or Inf"),
            tf.debugging.assert_all_finite(query_x, "query_x holds NaN or Inf"),
        ]
        if learner.task == "classification":
            checks += [
                tf.debugging.assert_non_negative(support_y, message="support_y labels must be >= 0"),
                tf.debugging.assert_less(
                    support_y, self.num_classes,
                    message=f"support_y labels must be class indices 0..{self.num_classes - 1}"),
            ]
        else:
            checks += [tf.debugging.assert_all_finite(support_y, "support_y holds NaN or Inf")]
        checks.append(_assert_trailing_shape(
            support_y, self.target_shape,
            "support_y must have shape [examples" + "".join(f", {d}" for d in self.target_shape) + "]"))
        with tf.control_dependencies(checks):
            support_x = tf.identity(support_x)
            support_y = tf.identity(support_y)
        meta = learner.unflatten(learner.meta_values())
        params = learner.adapt(meta, support_x, support_y, second_order=False)
        return {self.output_key: learner.fmodel(params, query_x)}


def _assert_trailing_shape(tensor, trailing, message):
    """An in-graph check that `tensor` has shape [any] + trailing (rank included)."""
    shape = tf.shape(tensor)
    rank_ok = tf.equal(tf.size(shape), 1 + len(trailing))
    dims = tf.cond(rank_ok, lambda: shape[1:], lambda: tf.fill([len(trailing)], -1))
    ok = tf.logical_and(rank_ok, tf.reduce_all(tf.equal(dims, tf.constant(trailing, tf.int32))))
    return tf.debugging.Assert(ok, [message + "; got shape", shape])


def export_adapter(learner, base_dir: str, name: str, *, files: dict[str, bytes] | None = None) -> str:
    """Export a few-shot model that adapts per request inside the serving graph.

    ``base_dir/name/<next version>/`` holds a SavedModel with two signatures and ``model.keras``
    (the initialization as a plain Keras model that predicts as the learner does):

    - ``serving_default(x) -> {"logits"}``: predictions at the meta-learned initialization;
    - ``adapt_and_predict(support_x, support_y, query_x) -> {"logits"}``: the learner's inner loop
      (its optimizer, learned rates and T steps) runs on the support set in the graph, then the
      adapted model predicts the query set. Labels must be int32 class indices 0..N-1; bad shapes or
      labels fail in the graph with a clear message.

    Regression learners use the key ``"predictions"`` instead of ``"logits"``. BatchNorm follows the
    learner's policy (batch statistics by default, as in meta-training). Loading needs only
    TensorFlow: ``tf.saved_model.load(path).signatures["adapt_and_predict"]``.

    `files` (``{file name: bytes}``) are written into the same version before it is renamed into
    place, e.g. ``model.tflite`` (:func:`tfmeta.export.tflite.export_tflite`).
    """
    _check_finite(learner.meta_values(), "meta-parameter")
    module = _Adapter(learner)

    def write(tmp):
        tf.saved_model.save(module, tmp, signatures={
            "serving_default": module.serve.get_concrete_function(),
            "adapt_and_predict": module.adapt_and_predict.get_concrete_function(),
        })
        plain_model(learner.model, batchnorm=learner.fmodel.batchnorm).save(os.path.join(tmp, "model.keras"))
        for filename, content in (files or {}).items():
            with open(os.path.join(tmp, filename), "wb") as f:
                f.write(content)

    return _write_version(base_dir, name, write)


def load(path: str):
    """Load an exported model safely: a ``.keras`` file (Keras safe mode on) or a SavedModel.

    Only these two formats load, and a ``.keras`` file loads with ``safe_mode=True``, so a model
    downloaded from elsewhere cannot run arbitrary Python (no lambda deserialization). A SavedModel
    holds only TensorFlow graphs. Returns a `keras.Model` or the `tf.saved_model.load` object.

    Example:
        >>> model = load("saved_models/sinusoid_maml/1/model.keras")
        >>> served = load("saved_models/sinusoid_maml/1").signatures["adapt_and_predict"]
    """
    if os.path.isfile(path) and path.endswith(".keras"):
        return keras.models.load_model(path, safe_mode=True)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb")):
        return tf.saved_model.load(path)
    raise ValueError(
        f"path={path!r} is not a .keras file or a SavedModel directory (with saved_model.pb)."
    )
