"""Exports in TF Serving's layout: versions, atomicity, the adapter served without tfmeta."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras

from conftest import small_dense
from tfmeta import export
from tfmeta.app import bench
from tfmeta.core import models
from tfmeta.training.keras_model import MetaModel
from tfmeta.core.learner import MetaLearner

FRESH = """
import sys, numpy as np, tensorflow as tf
d = np.load(sys.argv[1])
f = tf.saved_model.load(sys.argv[2]).signatures["adapt_and_predict"]
out = f(support_x=tf.constant(d["sx"]), support_y=tf.constant(d["sy"]), query_x=tf.constant(d["qx"]))
assert "tfmeta" not in sys.modules
np.save(sys.argv[3], out["logits"].numpy())
"""


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A float64 conv4 adapter: comparisons across processes test the logic, not float32 noise."""
    keras.utils.set_random_seed(0)
    learner = MetaLearner(models.conv4(5, filters=8, dtype="float64"), inner_lr=0.4, inner_steps=3)
    root = tmp_path_factory.mktemp("sm")
    return learner, export.export_adapter(learner, str(root), "omni"), root


def _tasks64(*args, **kwargs):
    sx, sy, qx, qy = bench.random_tasks(*args, **kwargs)
    return sx.astype("float64"), sy, qx.astype("float64"), qy


def test_adapter_in_a_fresh_process_matches_adapt_then_predict(adapter, tmp_path):
    learner, path, _ = adapter
    sx, sy, qx, _ = _tasks64(1, 5, 1, 3, seed=4)
    expected = MetaModel(learner).adapt(sx[0], sy[0])(qx[0], training=True).numpy()
    np.savez(tmp_path / "task.npz", sx=sx[0], sy=sy[0], qx=qx[0])
    script = tmp_path / "serve.py"
    script.write_text(FRESH)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "task.npz"), path, str(tmp_path / "out.npy")],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-5)
    assert np.load(tmp_path / "out.npy").dtype == np.float64
    before = tf.saved_model.load(path).signatures["serving_default"](x=tf.constant(qx[0]))["logits"]
    assert not np.allclose(before.numpy(), expected, atol=1e-3)  # adaptation changed the answer


def test_saved_model_cli_lists_both_signatures(adapter):
    _, path, _ = adapter
    out = subprocess.run(["saved_model_cli", "show", "--dir", path, "--all"],
                         capture_output=True, text=True, timeout=120).stdout
    assert "signature_def['serving_default']" in out
    assert "signature_def['adapt_and_predict']" in out
    assert os.path.isfile(os.path.join(path, "model.keras"))


@pytest.mark.parametrize("sy,message", [
    (np.zeros(4, np.int32), "same number of examples"),
    (np.array([0, 1, 2, 3, 7], np.int32), "class indices 0..4"),
    (np.array([0, 1, 2, 3, -1], np.int32), ">= 0"),
])
def test_bad_serving_input_fails_in_the_graph(adapter, sy, message):
    _, path, _ = adapter
    sx, _, qx, _ = _tasks64(1, 5, 1, 2)
    fn = tf.saved_model.load(path).signatures["adapt_and_predict"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        fn(support_x=tf.constant(sx[0]), support_y=tf.constant(sy), query_x=tf.constant(qx[0]))


def test_versions_never_overwrite_and_a_crash_leaves_no_partial_version(adapter, monkeypatch):
    learner, first, root = adapter
    stamp = os.path.getmtime(os.path.join(first, "saved_model.pb"))
    second = export.export_adapter(learner, str(root), "omni")
    assert os.path.basename(second) == "2"
    assert os.path.getmtime(os.path.join(first, "saved_model.pb")) == stamp

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", crash)  # model.keras is written last
    with pytest.raises(OSError, match="disk full"):
        export.export_adapter(learner, str(root), "omni")
    assert sorted(os.listdir(root / "omni")) == ["1", "2"]  # no version 3, no .tmp-* left


def test_plain_export_serves_and_reloads(tmp_path):
    model = small_dense()
    first = export.export_model(model, str(tmp_path), "toy")
    assert export.versions(str(tmp_path / "toy")) == [1]
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    (out,) = tf.saved_model.load(first).signatures["serving_default"](tf.constant(x)).values()
    np.testing.assert_allclose(out.numpy(), model(x).numpy(), rtol=1e-5)
    reloaded = keras.models.load_model(os.path.join(first, "model.keras"))
    np.testing.assert_allclose(reloaded(x), model(x), rtol=1e-6)
    with pytest.raises(ValueError, match="name"):
        export.export_model(model, str(tmp_path), "../escape")


def test_export_adapted_to_one_task(tmp_path):
    keras.utils.set_random_seed(2)
    learner = MetaLearner(models.mlp(), task="regression", inner_lr=0.05, inner_steps=5)
    rng = np.random.default_rng(0)
    sx = rng.uniform(-5, 5, (10, 1)).astype("float32")
    sy = (2 * np.sin(sx)).astype("float32")
    path = export.export_adapted(learner, sx, sy, str(tmp_path), "sine")
    served = tf.saved_model.load(path).signatures["serving_default"](x=tf.constant(sx))["predictions"]
    expected = MetaModel(learner).adapt(sx, sy)(sx)
    np.testing.assert_allclose(served.numpy(), expected.numpy(), atol=1e-5)
    reloaded = keras.models.load_model(os.path.join(path, "model.keras"))
    np.testing.assert_allclose(reloaded(sx), expected, atol=1e-5)


def test_safe_loading(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(lambda x: x * 2)])
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        export.load(str(tmp_path / "lambda.keras"))
    (tmp_path / "weights.pkl").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="path="):
        export.load(str(tmp_path / "weights.pkl"))
    path = export.export_model(small_dense(), str(tmp_path), "ok")
    assert isinstance(export.load(os.path.join(path, "model.keras")), keras.Model)
    assert "serving_default" in export.load(path).signatures
