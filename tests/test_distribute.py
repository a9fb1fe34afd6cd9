"""tf.distribute: MirroredStrategy on 2 logical CPU devices, MultiWorkerMirroredStrategy on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import tensorflow as tf

from tfmeta.core import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Both MirroredStrategy checks run in one fresh process (one TensorFlow start-up): logical devices
# must be configured before TensorFlow starts. Each check prints one JSON line.
TWO_DEVICES = r"""
import json, os, sys, tempfile
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
"""

MIRRORED_CHECK = r"""
import keras, numpy as np
import tfmeta
from tfmeta import estimators
from tfmeta.core import models
from tfmeta.data import SinusoidTasks
from tfmeta.training.keras_model import MetaModel

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


#: The estimators whose code meets the strategy differently. fomaml, reptile, reuse and implicit
#: define only a per-task gradient inside the base class's task loop, as maml does, so maml covers
#: them there; linearity and shifting override the step's hooks (shared state across tasks), and
#: shifting is compared with the default strategy over five steps in SHIFTING_CHECK below.
WANTED = ("maml", "linearity")


@pytest.fixture(scope="module")
def mirrored_checks():
    """{"mirrored": MIRRORED_CHECK's result, "shifting": SHIFTING_CHECK's}, from one process."""
    from tfmeta import estimators
    wanted = [n for n in WANTED if n in estimators.names()]
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICES + MIRRORED_CHECK + SHIFTING_CHECK, *wanted],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    assert len(lines) == 2, proc.stdout[-3000:]
    return {"wanted": wanted, "mirrored": lines[0], "shifting": lines[1]}


def test_mirrored_meta_step_equals_the_default_strategy(mirrored_checks):
    wanted, result = mirrored_checks["wanted"], mirrored_checks["mirrored"]
    assert set(result) == set(wanted)
    for name, (scale, relative) in result.items():
        assert scale > 0, name
        assert relative < 1e-4, (name, relative)


# Trajectory shifting keeps a task learner per task: each replica must keep (and step, and shift)
# the learners of its own tasks, and a checkpoint must hold every replica's rows in task order.
SHIFTING_CHECK = r"""
import keras, numpy as np
from tfmeta.core import inner_optimizers, models
from tfmeta.data import SinusoidTasks
from tfmeta.data.rounds import RoundTasks
from tfmeta.estimators.shifting import Shifting
from tfmeta.training.keras_model import MetaModel

tasks = RoundTasks(SinusoidTasks(shots=5, query=10, meta_batch=4), length=6)

def build(strategy):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        meta = MetaModel(models.mlp(), task="regression", inner_lr=0.02,
                         inner_optimizer=inner_optimizers.momentum(0.02, momentum=0.9))
        est = Shifting(horizon=3, repeats=2, accurate=True)
        meta.compile(optimizer=keras.optimizers.Adam(0.01), estimator=est)
        ckpt = tf.train.Checkpoint(meta=list(meta.learner.meta_variables), optimizer=meta.optimizer,
                                   step=meta.meta_step, estimator=est.state)
    return meta, est, ckpt

def run(meta, steps):
    meta.fit(tasks, epochs=1, steps_per_epoch=steps, verbose=0)

def values(meta, est):
    return [v.numpy() for v in meta.learner.meta_variables], [x.numpy() for x in est.state.tasks.global_values()]

def rel(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b)) / max(float(np.abs(x).max()) for x in a)

default = tf.distribute.get_strategy()
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
folder = tempfile.mkdtemp()
d, d_est, d_ckpt = build(default)
start = [v.numpy() for v in d.learner.meta_variables]
run(d, 3)
d_path = d_ckpt.save(os.path.join(folder, "default"))
run(d, 2)   # 5 calls: a repetition ends after call 3; calls 2, 3 and 5 shift the learners
m, m_est, m_ckpt = build(mirrored)
run(m, 3)
m_path = m_ckpt.save(os.path.join(folder, "mirrored"))
run(m, 2)
expected = values(d, d_est)
result = {"moved": max(float(np.abs(a - b).max()) for a, b in zip(start, expected[0])),
          "local_rows": [int(tf.shape(v)[0]) for v in mirrored.experimental_local_results(m_est.theta[0])],
          "calls": int(m_est.calls.numpy())}
for name, strategy, path in (("mirrored", None, None), ("mirrored_to_default", default, m_path),
                             ("default_to_mirrored", mirrored, d_path)):
    if strategy is None:
        got = values(m, m_est)
    else:
        r, r_est, r_ckpt = build(strategy)
        r_ckpt.restore(path).assert_existing_objects_matched()
        run(r, 2)
        got = values(r, r_est)
    result[name] = [rel(expected[0], got[0]), rel(expected[1], got[1])]
try:
    m_est.state.tasks.assign_global([np.zeros((3,) + tuple(v.shape[1:]), v.dtype.as_numpy_dtype)
                                     for v in m_est.state.tasks.variables])
    result["uneven"] = "accepted"
except ValueError as err:
    result["uneven"] = str(err)
print(json.dumps(result))
"""


def test_mirrored_shifting_keeps_each_task_learner_on_its_replica_and_checkpoints_them(mirrored_checks):
    result = mirrored_checks["shifting"]
    assert result["moved"] > 1e-3  # the runs did something
    assert result["local_rows"] == [2, 2]  # each replica holds the learners of its 2 tasks
    assert result["calls"] == 5
    # same meta-parameters and the same task learners (rows gathered in task order) as without a
    # strategy; a checkpoint written under one strategy resumes under the other
    for name in ("mirrored", "mirrored_to_default", "default_to_mirrored"):
        params, rows = result[name]
        assert params < 1e-4 and rows < 1e-4, (name, params, rows)
    assert "3 task rows, which cannot be split evenly over 2 replicas" in result["uneven"]


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


#: Trajectory shifting: the estimator with state across steps (its task learners) exercises the
#: whole multi-worker path (the step, checkpoints, the second worker's directory) and the rows each
#: worker keeps; maml's step under a strategy is compared with the default one above. Each worker
#: is a process of its own (~8 CPU-s of TensorFlow start-up).
@pytest.mark.parametrize("estimator", [["shifting", "--horizon", "2", "--repeats", "2"]], ids=lambda e: e[0])
def test_two_workers_on_loopback_end_with_identical_parameters(tmp_path, estimator):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        cmd = [sys.executable, "-m", "tfmeta", "train", "--strategy", "multiworker", "--meta-batch", "4",
               "--iterations", "6", "--checkpoint-every", "3", "--no-export", "--no-progress",
               "--no-tensorboard", "--episodes", "10", "--time-budget", "0", "--out", str(tmp_path / "run"),
               "--json", "--estimator", *estimator]
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
    latest = tf.train.latest_checkpoint(os.path.join(outputs[0]["run_dir"], "checkpoints"))
    assert latest.endswith("ckpt-6")
    if estimator[0] == "shifting":  # the chief's checkpoint holds the task learners of both workers
        shapes = tf.train.load_checkpoint(latest).get_variable_to_shape_map()
        rows = [shape[0] for key, shape in shapes.items() if key.startswith("estimator/tasks/")]
        assert rows and set(rows) == {4}, shapes
