"""tf.distribute: MirroredStrategy on 2 logical CPU devices, MultiWorkerMirroredStrategy on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import tensorflow as tf

from tfmeta import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process: logical devices must be configured before TensorFlow starts.
MIRRORED_CHECK = r"""
import json, sys
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
import tfmeta
from tfmeta import estimators, models
from tfmeta.data import SinusoidTasks
from tfmeta.keras_model import MetaModel

def one_step(strategy, name):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        meta = MetaModel(models.mlp(), task="regression", inner_lr=0.01, inner_steps=2)
        meta.compile(optimizer=keras.optimizers.SGD(0.1), estimator=estimators.get(name))
    before = [v.numpy() for v in meta.learner.meta_variables]
    meta.fit(SinusoidTasks(shots=5, query=10, meta_batch=4), epochs=1, steps_per_epoch=1, verbose=0)
    return [b - v.numpy() for b, v in zip(before, meta.learner.meta_variables)]

result = {}
for name in sys.argv[1:]:
    single = one_step(tf.distribute.get_strategy(), name)
    mirrored = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), name)
    scale = max(float(np.abs(s).max()) for s in single)
    result[name] = [scale, max(float(np.abs(s - m).max()) for s, m in zip(single, mirrored)) / scale]
print(json.dumps(result))
"""


def test_mirrored_meta_step_equals_the_default_strategy():
    from tfmeta import estimators
    wanted = [n for n in ("maml", "fomaml", "reptile", "reuse", "implicit", "linearity") if n in estimators.names()]
    proc = subprocess.run([sys.executable, "-c", MIRRORED_CHECK, *wanted], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == set(wanted)
    for name, (scale, relative) in result.items():
        assert scale > 0, name
        assert relative < 1e-4, (name, relative)


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match="meta_batch=5 cannot be split evenly over 2 replicas"):
        runtime.check_split(5, type("S", (), {"num_replicas_in_sync": 2})())
    with pytest.raises(ValueError, match="strategy"):
        runtime.make_strategy("tpu")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_two_workers_on_loopback_end_with_identical_parameters(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        cmd = [sys.executable, "-m", "tfmeta", "train", "--strategy", "multiworker", "--meta-batch", "4",
               "--iterations", "6", "--checkpoint-every", "3", "--no-export", "--no-progress",
               "--no-tensorboard", "--episodes", "10", "--time-budget", "0", "--out", str(tmp_path / "run"),
               "--json"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [o["steps"] for o in outputs] == [6, 6]
    assert [o["replicas"] for o in outputs] == [2, 2]
    assert outputs[0]["meta_parameters_checksum"] == outputs[1]["meta_parameters_checksum"]
    assert outputs[0]["run_dir"] != outputs[1]["run_dir"]  # the second worker writes beside the chief
    assert tf.train.latest_checkpoint(os.path.join(outputs[0]["run_dir"], "checkpoints")).endswith("ckpt-6")
