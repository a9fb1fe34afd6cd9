"""kill -9 in the middle of a checkpoint write or an export leaves the previous state loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKPOINTS = r"""
import sys, tensorflow as tf
import tfmeta, keras
from tfmeta.core import models
from tfmeta.core.learner import MetaLearner
from tfmeta.training import MetaTrainer
keras.utils.set_random_seed(0)
learner = MetaLearner(models.mlp(hidden=(1500, 1500)), task="regression")  # ~9 MB per checkpoint
trainer = MetaTrainer(learner, "maml", checkpoint_dir=sys.argv[1], max_checkpoints=2)
i = 0
while True:
    i += 1
    for v in learner.meta_variables:
        v.assign(tf.fill(v.shape, float(i)))
    trainer.step.assign(i)
    trainer.save()
    print(i, flush=True)
"""

EXPORTS = r"""
import sys, keras
import tfmeta
from tfmeta import export
from tfmeta.core import models
from tfmeta.core.learner import MetaLearner
keras.utils.set_random_seed(0)
learner = MetaLearner(models.mlp(hidden=(1000, 1000)), task="regression")
while True:
    print(export.export_adapter(learner, sys.argv[1], "m"), flush=True)
"""


def _run_and_kill(script, target, after_lines, extra_delay):
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = 0
    deadline = time.monotonic() + 120
    while lines < after_lines and time.monotonic() < deadline:
        if proc.stdout.readline():
            lines += 1
    time.sleep(extra_delay)  # land somewhere inside the next write
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert lines >= after_lines, "the writer did not get going"


# a moment inside a ~9 MB write (each writer is a fresh process, ~8 CPU-s of TensorFlow start-up);
# tests/test_fault_matrix.py kills training runs at random moments of training, checkpointing and
# export too
@pytest.mark.parametrize("delay", [0.05])
def test_kill_during_checkpoint_write_keeps_the_last_checkpoint(tmp_path, delay):
    _run_and_kill(CHECKPOINTS, tmp_path, 2, delay)
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest is not None
    reader = tf.train.load_checkpoint(latest)
    keys = [k for k in reader.get_variable_to_shape_map() if k.startswith("meta_variables") and "OPTIMIZER" not in k]
    step = int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
    assert step >= 2
    for key in keys:  # every tensor comes from the same, complete save
        values = reader.get_tensor(key)
        assert np.all(values == step), key


@pytest.mark.parametrize("delay", [0.2])
def test_kill_during_export_leaves_only_complete_versions(tmp_path, delay):
    from tfmeta import export
    _run_and_kill(EXPORTS, tmp_path, 1, delay)
    root = tmp_path / "m"
    versions = export.versions(str(root))
    assert versions and versions == list(range(1, len(versions) + 1))
    for v in versions:
        served = tf.saved_model.load(str(root / str(v))).signatures["serving_default"]
        out = served(x=tf.zeros([2, 1]))["predictions"]
        assert out.shape == (2, 1)
        assert os.path.isfile(root / str(v) / "model.keras")
