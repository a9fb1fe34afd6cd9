"""MetaModel: Keras fit/evaluate/adapt, callbacks, and resume after kill -9."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import keras

from tfmeta.core import models
from tfmeta.data import SinusoidTasks, make_sampler
from tfmeta.training.keras_model import MetaModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OMNIGLOT = os.environ.get("TFMETA_OMNIGLOT_DIR", os.path.join(REPO, "..", "shared", "data", "omniglot"))


class Counter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = self.epochs = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_end(self, epoch, logs=None):
        self.epochs += 1


def _scalars(logdir):
    """"<run>/<tag>" of the scalar summaries written under `logdir` (run: train, validation)."""
    from tensorboard.backend.event_processing import event_accumulator
    tags = set()
    for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents*"), recursive=True):
        acc = event_accumulator.EventAccumulator(path)
        acc.Reload()
        run = os.path.basename(os.path.dirname(path))
        tags |= {f"{run}/{t}" for t in set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])}
    return tags


def test_fit_with_callbacks_lowers_the_meta_loss(tmp_path):
    keras.utils.set_random_seed(0)
    meta = MetaModel(models.mlp(), task="regression", inner_lr=0.01, inner_steps=1)
    meta.compile(optimizer=keras.optimizers.Adam(1e-3), estimator="maml")
    val = SinusoidTasks(shots=5, query=10, meta_batch=25, seed=5, split="val")
    before = meta.evaluate(val, steps=4, return_dict=True, verbose=0)
    counter = Counter()
    history = meta.fit(
        SinusoidTasks(shots=5, query=10, meta_batch=25), epochs=3, steps_per_epoch=150,
        validation_data=val, validation_steps=4, verbose=0,
        callbacks=[counter, keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
                   keras.callbacks.TensorBoard(str(tmp_path / "tb")),
                   keras.callbacks.EarlyStopping(monitor="val_loss", patience=5),
                   keras.callbacks.ModelCheckpoint(str(tmp_path / "best.weights.h5"), monitor="val_loss",
                                                   save_weights_only=True, save_best_only=True)],
    )
    after = meta.evaluate(val, steps=4, return_dict=True, verbose=0)
    assert after["loss"] < 0.8 * before["loss"]
    assert after["loss"] < after["loss_before"]  # adaptation helps
    assert counter.batches == 450 and counter.epochs == 3
    assert int(meta.meta_step.numpy()) == 450
    assert set(history.history) >= {"loss", "val_loss", "val_loss_before"}
    assert (tmp_path / "log.csv").read_text().count("\n") == 4
    restored = MetaModel(models.mlp(), task="regression", inner_lr=0.01, inner_steps=1)
    restored.load_weights(str(tmp_path / "best.weights.h5"))  # the best epoch is the last here
    for a, b in zip(restored.get_weights(), meta.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert {"train/epoch_loss", "validation/epoch_loss", "validation/epoch_loss_before"} <= \
        _scalars(str(tmp_path / "tb"))


def test_adapt_returns_a_plain_keras_model_with_adapted_weights():
    keras.utils.set_random_seed(1)
    meta = MetaModel(models.mlp(), task="regression", inner_lr=0.05, inner_steps=5)
    task = SinusoidTasks(shots=10, query=10, meta_batch=1, seed=2).sample(0)
    adapted = meta.adapt(task.support_x[0], task.support_y[0])
    assert type(adapted).__module__.startswith("keras")
    fmodel = meta.learner.fmodel
    base_loss = float(np.mean((meta.base_model(task.support_x[0]) - task.support_y[0]) ** 2))
    adapted_loss = float(np.mean((adapted(task.support_x[0]) - task.support_y[0]) ** 2))
    assert adapted_loss < base_loss
    # the base model (the initialization) is untouched
    assert not np.allclose(adapted.get_weights()[0], meta.base_model.get_weights()[0])
    with pytest.raises(ValueError, match="same number of examples"):
        meta.adapt(task.support_x[0], task.support_y[0][:3])
    del fmodel


@pytest.mark.skipif(not os.path.isdir(OMNIGLOT), reason="Omniglot archive not available")
def test_fit_on_an_omniglot_slice_lowers_the_meta_loss():
    keras.utils.set_random_seed(0)
    kwargs = dict(ways=5, shots=1, query=5, meta_batch=4, data_dir=OMNIGLOT)
    train = make_sampler("omniglot", "train", seed=0, **kwargs)
    val = make_sampler("omniglot", "val", seed=1, **kwargs)
    meta = MetaModel(models.conv4(5, filters=16), inner_lr=0.4, inner_steps=1)
    meta.compile(optimizer=keras.optimizers.Adam(3e-3), estimator="fomaml")
    before = meta.evaluate(val, steps=8, return_dict=True, verbose=0)
    meta.fit(train, epochs=1, steps_per_epoch=60, verbose=0)
    after = meta.evaluate(val, steps=8, return_dict=True, verbose=0)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > before["accuracy"]


#: the session flags of the runs below: checkpoints every 25 meta-steps, epochs of 100, so that the
#: killed run resumes in the middle of its first epoch and crosses two epoch boundaries after it.
SESSION = ["--no-export", "--no-progress", "--no-tensorboard", "--episodes", "10", "--time-budget", "0",
           "--checkpoint-every", "25"]


def _train(out, iterations, *extra):
    return ["train", "--iterations", str(iterations), "--out", str(out), *SESSION, "--steps-per-epoch", "100",
            *extra]


def _meta_tensors(run):
    path = tf.train.latest_checkpoint(os.path.join(run, "checkpoints"))
    reader = tf.train.load_checkpoint(path)
    keys = sorted(k for k in reader.get_variable_to_shape_map() if k.startswith("meta_variables"))
    return path, [reader.get_tensor(k) for k in keys]


def test_resume_after_kill_reaches_the_uninterrupted_parameters(tmp_path, capsys):
    """The killed run is a `python -m tfmeta train` process; the uninterrupted run and the resume
    run in this process (`cli.main`), as `tests/test_fault_matrix.py` does."""
    from tfmeta.app import cli

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli.main(_train(straight, 300)) == 0

    proc = subprocess.Popen([sys.executable, "-m", "tfmeta", *_train(killed, 300)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (killed / "checkpoints" / "ckpt-50.index").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert glob.glob(str(killed / "checkpoints" / "ckpt-*.index")), "no checkpoint before the kill"
    path, _ = _meta_tensors(str(killed))
    assert not path.endswith("ckpt-300"), "the run finished before it was killed"
    kept = int(path.rsplit("-", 1)[1])

    capsys.readouterr()
    code = cli.main(["train", "--resume", str(killed), *SESSION])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert f"resumed at step {kept}: meta-trained steps {kept + 1}-300" in out  # not from the start
    a_path, a = _meta_tensors(str(straight))
    b_path, b = _meta_tensors(str(killed))
    assert a_path.endswith("ckpt-300") and b_path.endswith("ckpt-300")
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
