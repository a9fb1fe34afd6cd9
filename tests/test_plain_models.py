"""Plain Keras models handed out by tfmeta predict as the meta-learner does (issue 16, item 3).

BatchNorm's running statistics are never updated by meta-training; `MetaModel.adapt()`, the
exported ``model.keras`` and ``tfmeta export --adapt-on`` must not fall back to them in `predict`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras

from tfmeta import export
from tfmeta.core import models
from tfmeta.training.keras_model import MetaModel
from tfmeta.core.learner import MetaLearner
from tfmeta.core.plain import plain_model

FRESH = """
import sys, numpy as np, keras
d = np.load(sys.argv[1])
init = keras.models.load_model(sys.argv[2], safe_mode=True)
adapted = keras.models.load_model(sys.argv[3], safe_mode=True)
assert "tfmeta" not in sys.modules
q = d["qx"]
np.savez(sys.argv[4], init=init.predict(q, batch_size=len(q), verbose=0),
         adapted=adapted.predict(q, batch_size=len(q), verbose=0))
"""


def _omniglot_shaped_task(seed=0, ways=5, shots=1, query=15):
    """Glyph-like 28x28 images (background 1, a few dark strokes), 5-way 1-shot, 15 query each."""
    rng = np.random.default_rng(seed)

    def glyphs(n, cls):
        images = np.ones((n, 28, 28, 1), np.float32)
        r, c = 3 + 4 * cls, 4 + 3 * cls
        images[:, r:r + 6, c:c + 10] = 0.0
        return np.clip(images + rng.normal(0, 0.1, images.shape).astype(np.float32), 0, 1)

    sx = np.concatenate([glyphs(shots, k) for k in range(ways)])
    qx = np.concatenate([glyphs(query, k) for k in range(ways)])
    return sx, np.repeat(np.arange(ways), shots).astype(np.int32), qx, np.repeat(np.arange(ways), query)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(0)
    learner = MetaLearner(models.conv4(5), inner_lr=0.4, inner_steps=5)
    root = tmp_path_factory.mktemp("sm")
    sx, sy, qx, qy = _omniglot_shaped_task()
    adapter = export.export_adapter(learner, str(root), "omniglot_maml")
    adapted = export.export_adapted(learner, sx, sy, str(root), "omniglot_maml_adapted")
    served = tf.saved_model.load(adapter)
    reference = served.signatures["adapt_and_predict"](
        support_x=tf.constant(sx), support_y=tf.constant(sy), query_x=tf.constant(qx))["logits"].numpy()
    initial = served.signatures["serving_default"](x=tf.constant(qx))["logits"].numpy()
    return learner, adapter, adapted, (sx, sy, qx, qy), reference, initial


def test_adapt_predict_matches_adapt_and_predict_on_conv4(exported):
    learner, _, _, (sx, sy, qx, qy), reference, _ = exported
    adapted = MetaModel(learner).adapt(sx, sy)
    assert type(adapted).__module__.startswith("keras")
    logits = adapted.predict(qx, batch_size=len(qx), verbose=0)
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))  # the same accuracy
    np.testing.assert_allclose(adapted(qx, training=True), reference, atol=1e-4, rtol=1e-4)
    # control: a stock Keras copy with the adapted weights falls back to running statistics
    stock = keras.models.clone_model(learner.model)
    stock.set_weights(learner.model.get_weights())
    for variable, value in zip(stock.trainable_variables, adapted.trainable_variables):
        variable.assign(value)
    assert np.abs(stock.predict(qx, batch_size=len(qx), verbose=0) - reference).max() > 0.1


def test_exported_keras_files_load_without_tfmeta_and_predict_as_served(exported, tmp_path):
    _, adapter, adapted, (sx, sy, qx, qy), reference, initial = exported
    np.savez(tmp_path / "task.npz", qx=qx)
    script = tmp_path / "load.py"
    script.write_text(FRESH)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "task.npz"), os.path.join(adapter, "model.keras"),
         os.path.join(adapted, "model.keras"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["init"], initial, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["adapted"], reference, atol=1e-4, rtol=1e-4)
    served = tf.saved_model.load(adapted).signatures["serving_default"](x=tf.constant(qx))["logits"].numpy()
    np.testing.assert_allclose(served, reference, atol=1e-4, rtol=1e-4)


def test_running_policy_keeps_stock_batchnorm_and_subclassed_models_are_refused():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                              keras.layers.Dense(3)])
    model.layers[1].moving_mean.assign(np.full(4, 0.3, np.float32))
    learner = MetaLearner(model, batchnorm="running", inner_steps=1)
    x = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32)
    plain = plain_model(model, batchnorm="running")
    assert any(isinstance(l, keras.layers.BatchNormalization) for l in plain.layers)
    np.testing.assert_allclose(plain.predict(x, verbose=0), learner.fmodel(learner.fmodel.parameters(), x),
                               atol=1e-5)

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense, self.bn = keras.layers.Dense(3), keras.layers.BatchNormalization()

        def call(self, x, training=False):
            return self.bn(self.dense(x), training=training)

    net = Net()
    net(x)
    with pytest.raises(ValueError, match="subclassed Keras model with BatchNormalization"):
        plain_model(net)
