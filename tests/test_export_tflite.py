"""LiteRT (TFLite) export of adapt_and_predict: run in ai_edge_litert's interpreter, not TensorFlow.

One conversion per learner, shared by the module's tests (conversions take seconds each).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf

import keras

from ai_edge_litert.interpreter import Interpreter as LiteRTInterpreter

from tfmeta import export
from tfmeta.export import savedmodel
from tfmeta.app import cli
from tfmeta.export import tflite as export_tflite
from tfmeta.core import models
from tfmeta.core.learner import MetaLearner

WAYS, SHOTS = 5, 1


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """An Omniglot-shaped conv4 (28x28x1, BatchNorm on batch statistics) adapting its head (ANIL),
    exported once as SavedModel + model.tflite (built-in profile) in one version."""
    keras.utils.set_random_seed(0)
    # init="keras": the reference accuracy below (0.58) was measured on Keras' initialization
    learner = MetaLearner(models.conv4(WAYS, filters=16, init="keras"), inner_lr=0.5, inner_steps=5, adapt="head")
    root = tmp_path_factory.mktemp("litert")
    path = export_tflite.export_tflite(learner, str(root), "omni", shots=SHOTS)
    with open(os.path.join(path, export_tflite.FILENAME), "rb") as f:
        content = f.read()
    return learner, path, content


def _task(seed=0, query=10):
    rng = np.random.default_rng(seed)
    sx = rng.random((WAYS * SHOTS, 28, 28, 1)).astype("float32")
    sy = np.repeat(np.arange(WAYS, dtype=np.int32), SHOTS)
    qx = rng.random((query, 28, 28, 1)).astype("float32")
    return sx, sy, qx


def _separable_task(seed, query_per_class=4, noise=0.15):
    """Each class is a fixed random 28x28 template; examples are the template plus noise."""
    rng = np.random.default_rng(seed)
    templates = (rng.random((WAYS, 28, 28, 1)) < 0.3).astype("float32")

    def draw(labels):
        x = templates[labels] + noise * rng.normal(size=(len(labels), 28, 28, 1))
        return x.astype("float32")

    sy = np.arange(WAYS, dtype=np.int32)
    qy = np.repeat(np.arange(WAYS, dtype=np.int32), query_per_class)
    return draw(sy), sy, draw(qy), qy


def _tree_digest(root):
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            digest.update(os.path.relpath(full, root).encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def test_version_holds_saved_model_and_tflite_with_both_signatures(head):
    _, path, content = head
    assert sorted(os.listdir(path)) == sorted(["assets", "fingerprint.pb", "model.keras", "model.tflite",
                                               "saved_model.pb", "variables"])
    signatures = LiteRTInterpreter(model_content=content).get_signature_list()
    assert signatures == {
        "adapt_and_predict": {"inputs": ["query_x", "support_x", "support_y"], "outputs": ["logits"]},
        "predict": {"inputs": ["x"], "outputs": ["logits"]},
    }


@pytest.mark.parametrize("query", [10, 3])
def test_litert_adapt_and_predict_equals_the_saved_model(head, query):
    _, path, content = head
    sx, sy, qx = _task(seed=query, query=query)
    served = tf.saved_model.load(path).signatures
    expected = served["adapt_and_predict"](support_x=tf.constant(sx), support_y=tf.constant(sy),
                                           query_x=tf.constant(qx))["logits"].numpy()
    model = export_tflite.TFLiteAdapter(content)
    got = model.adapt_and_predict(sx, sy, qx)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    before = served["serving_default"](x=tf.constant(qx))["logits"].numpy()
    np.testing.assert_allclose(model.predict(qx), before, rtol=0, atol=1e-4)
    assert np.abs(got - before).max() > 1e-2  # the inner loop ran


def test_adaptation_in_litert_beats_chance_on_a_separable_task(head):
    _, _, content = head
    model = export_tflite.TFLiteAdapter(content)
    before, after = [], []
    for seed in range(6):  # 120 query images: chance (0.2) is 0.04 wide, one standard deviation
        sx, sy, qx, qy = _separable_task(seed)
        before.append(np.mean(model.predict(qx).argmax(-1) == qy))
        after.append(np.mean(model.adapt_and_predict(sx, sy, qx).argmax(-1) == qy))
    # Random (not meta-trained) conv features, head adapted on one example per class: 0.58 here.
    assert np.mean(after) >= 0.45, (before, after)
    assert np.mean(after) >= np.mean(before) + 0.2, (before, after)


def test_builtin_profile_has_no_flex_and_no_variable_ops(head):
    _, _, content = head
    ops = export_tflite.op_names(content)
    assert "WHILE" in ops  # the inner loop is in the flatbuffer
    assert export_tflite.flex_ops(content) == []
    assert not any(op.startswith("Flex") for op in ops)
    assert not set(ops) & {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE"}


@pytest.mark.parametrize("which,value,message", [
    ("support_x", np.zeros((4, 28, 28, 1), "float32"), r"support_x has shape \[4, 28, 28, 1\]: the exported model expects \[5, 28, 28, 1\]"),
    ("query_x", np.zeros((6, 28, 28, 3), "float32"), r"query_x has shape \[6, 28, 28, 3\]: the exported model expects \[any, 28, 28, 1\]"),
    ("support_y", np.arange(5, dtype=np.int64), "support_y has dtype int64: the exported model expects int32"),
    ("support_x", np.zeros((5, 28, 28, 1), "float64"), "support_x has dtype float64"),
    ("support_y", np.array([0, 1, 2, 3, 5], np.int32), r"class indices 0..4"),
])
def test_bad_inputs_are_named_before_the_interpreter_runs(head, which, value, message, monkeypatch):
    _, path, _ = head
    before = _tree_digest(path)
    model = export_tflite.TFLiteAdapter(os.path.join(path, export_tflite.FILENAME))
    calls = []
    monkeypatch.setitem(model._runners, "adapt_and_predict", lambda **kw: calls.append(kw))
    sx, sy, qx = _task()
    arrays = {"support_x": sx, "support_y": sy, "query_x": qx, which: value}
    with pytest.raises(ValueError, match=message):
        model.adapt_and_predict(**arrays)
    assert calls == []
    assert _tree_digest(path) == before  # the export version is untouched


def test_builtin_profile_refuses_a_learner_that_needs_flex_and_writes_nothing(tmp_path):
    keras.utils.set_random_seed(1)
    learner = MetaLearner(models.mlp((8,), inputs=2, outputs=3), inner_steps=2, adapt="all")
    first = export.export_adapter(learner, str(tmp_path), "toy")
    before = _tree_digest(tmp_path)
    with pytest.raises(ValueError, match=r"need the Flex delegate: ReluGrad\. Export with profile='full'"):
        export_tflite.export_tflite(learner, str(tmp_path), "toy", shots=2, profile="builtin")
    assert _tree_digest(tmp_path) == before
    assert os.listdir(os.path.dirname(first)) == ["1"]


@pytest.fixture(scope="module")
def full():
    """An Omniglot-shaped conv4 adapting every layer (MAML), converted once in the full profile."""
    keras.utils.set_random_seed(0)
    learner = MetaLearner(models.conv4(WAYS, filters=4), inner_lr=0.5, inner_steps=2, adapt="all")
    return learner, export_tflite.convert(learner, shots=SHOTS, profile="full")


def test_builtin_profile_refuses_full_conv4_adaptation_naming_its_flex_ops(full, tmp_path):
    learner, _ = full
    (tmp_path / "omni" / "1").mkdir(parents=True)  # an earlier version (its bytes are what must survive)
    (tmp_path / "omni" / "1" / "saved_model.pb").write_bytes(b"earlier export")
    before = _tree_digest(tmp_path)
    with pytest.raises(ValueError, match=r"need the Flex delegate: Conv2DBackpropFilter, MaxPoolGrad, ReluGrad\. "
                                         r"Export with profile='full'"):
        export_tflite.export_tflite(learner, str(tmp_path), "omni", shots=SHOTS, profile="builtin")
    assert _tree_digest(tmp_path) == before
    assert os.listdir(tmp_path / "omni") == ["1"]


def _flex_logits(content, arrays):
    """adapt_and_predict's logits from an interpreter with the Flex delegate: this process's
    tf.lite.Interpreter where its TensorFlow links it, else $TFMETA_FLEX_PYTHON's; skip if neither."""
    try:
        return export_tflite.TFLiteAdapter(content, interpreter_class=tf.lite.Interpreter).adapt_and_predict(**arrays)
    except RuntimeError as err:
        if "Select TensorFlow op" not in str(err):
            raise
    python = os.environ.get(export_tflite.FLEX_PYTHON_ENV)
    if not python:
        pytest.skip(f"no Flex delegate: TensorFlow {tf.__version__}'s tf.lite.Interpreter and ai_edge_litert refuse "
                    f"Select TF ops (TF wheels >= 2.20 and LiteRT 2.x do not link it); set "
                    f"{export_tflite.FLEX_PYTHON_ENV} to a Python with tensorflow-cpu 2.18 to run this test")
    outputs, _ = export_tflite.run_flex(content, "adapt_and_predict", arrays, python=python)
    return outputs["logits"]


def test_full_profile_runs_with_flex_and_equals_the_saved_model(full):
    learner, content = full
    assert export_tflite.flex_ops(content) == ["Conv2DBackpropFilter", "MaxPoolGrad", "ReluGrad"]
    assert not set(export_tflite.op_names(content)) & {"VAR_HANDLE", "READ_VARIABLE"}
    sx, sy, qx = _task(query=10)
    arrays = {"support_x": sx, "support_y": sy, "query_x": qx}
    # The plain LiteRT runtime (no Flex delegate) refuses it rather than answering garbage.
    with pytest.raises(RuntimeError, match="Select TensorFlow op"):
        export_tflite.TFLiteAdapter(content).adapt_and_predict(**arrays)
    got = _flex_logits(content, arrays)  # skips here if no interpreter with Flex can be had
    served = savedmodel._Adapter(learner)  # the SavedModel's signature functions, in memory
    expected = served.adapt_and_predict(*(tf.constant(a) for a in (sx, sy, qx)))["logits"].numpy()
    at_init = served.serve(tf.constant(qx))["logits"].numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    assert np.abs(got - at_init).max() > 1e-2  # every layer's inner loop ran


def test_run_flex_runs_a_signature_in_another_python(head):
    """The runner itself, on the built-in model with this Python (no Flex needed)."""
    import sys

    _, _, content = head
    sx, sy, qx = _task(seed=5, query=4)
    outputs, info = export_tflite.run_flex(content, "adapt_and_predict",
                                           {"support_x": sx, "support_y": sy, "query_x": qx},
                                           python=sys.executable, repeats=2)
    assert info["tensorflow"] == tf.__version__ and len(info["seconds"]) == 2
    np.testing.assert_allclose(outputs["logits"], export_tflite.TFLiteAdapter(content).adapt_and_predict(sx, sy, qx),
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="TFMETA_FLEX_PYTHON='/nonexistent/python' cannot be run"):
        export_tflite.run_flex(content, "predict", {"x": qx}, python="/nonexistent/python")


def test_convert_refuses_bad_arguments():
    keras.utils.set_random_seed(0)
    learner = MetaLearner(models.mlp((4,), inputs=2, outputs=2), adapt="head")
    with pytest.raises(ValueError, match="profile='tiny' is not valid"):
        export_tflite.convert(learner, shots=1, profile="tiny")
    with pytest.raises(ValueError, match="shots=0 is not valid"):
        export_tflite.convert(learner, shots=0)


def test_cli_export_tflite_writes_a_version_or_refuses_cleanly(tmp_path, capsys):
    """Sinusoid runs (regression: "predictions"): ANIL exports; MAML over ReLU needs Flex -> exit 2."""
    for adapt in ("head", "all"):
        assert cli.main(["train", "--iterations", "2", "--episodes", "5", "--adapt", adapt, "--no-progress",
                         "--out", str(tmp_path / adapt), "--no-export"]) == 0
    sm = tmp_path / "sm"
    assert cli.main(["export", "--run", str(tmp_path / "head"), "--export-dir", str(sm), "--tflite"]) == 0
    assert "model.tflite" in capsys.readouterr().out
    path = sm / "sinusoid_maml" / "1"
    model = export_tflite.TFLiteAdapter(str(path / "model.tflite"))
    assert model.specs["adapt_and_predict"]["support_x"][0] == (5, 1)  # the run's 5 shots
    rng = np.random.default_rng(0)
    sx, qx = rng.uniform(-5, 5, (5, 1)).astype("float32"), rng.uniform(-5, 5, (7, 1)).astype("float32")
    sy = np.sin(sx).astype("float32")
    expected = tf.saved_model.load(str(path)).signatures["adapt_and_predict"](
        support_x=tf.constant(sx), support_y=tf.constant(sy), query_x=tf.constant(qx))["predictions"]
    np.testing.assert_allclose(model.adapt_and_predict(sx, sy, qx), expected.numpy(), rtol=0, atol=1e-4)

    before = _tree_digest(sm)
    assert cli.main(["export", "--run", str(tmp_path / "all"), "--export-dir", str(sm), "--name", "sinusoid_maml",
                     "--tflite", "--tflite-profile", "builtin"]) == 2
    err = capsys.readouterr().err
    assert "tfmeta export: error:" in err and "ReluGrad" in err and "Traceback" not in err
    assert _tree_digest(sm) == before
    assert cli.main(["export", "--run", str(tmp_path / "head"), "--export-dir", str(sm), "--tflite",
                     "--adapt-on", "x.npz"]) == 2
    assert "--adapt-on" in capsys.readouterr().err


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OMNIGLOT = os.environ.get("TFMETA_OMNIGLOT_DIR", os.path.join(REPO, "..", "shared", "data", "omniglot"))


@pytest.mark.skipif(not os.path.isfile(os.path.join(OMNIGLOT, "images_background_small1.zip"))
                    and not os.path.isfile(os.path.join(OMNIGLOT, "images_evaluation.zip")),
                    reason="no Omniglot archive (set TFMETA_OMNIGLOT_DIR)")
def test_ondevice_example_adapts_to_new_characters_without_tensorflow(head):
    import subprocess
    import sys

    _, path, _ = head
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "ondevice_litert.py"),
                           os.path.join(path, "model.tflite"), "--data-dir", OMNIGLOT, "--repeats", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "5-way 1-shot, 75 query images" in out
    assert "(images_" in out and "query accuracy: before adaptation" in out
    assert "latency: median" in out
    assert "TensorFlow imported: False" in out
