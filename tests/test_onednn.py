"""oneDNN on and malloc arenas limited by default, strided 1x1 convolutions kept exact under oneDNN,
machine-aware benchmarks."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import keras
import tensorflow as tf

from conftest import classification_tasks
from tfmeta import estimators
from tfmeta.core import runtime
from tfmeta.core.functional import FunctionalModel
from tfmeta.core.learner import MetaLearner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86_64 = platform.machine().lower() in ("x86_64", "amd64")

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# After `import tfmeta`: threads that each allocate while all are alive (glibc gives each new
# thread an arena of its own, up to its limit), then malloc_info's count of arenas ("heaps").
# Prints [TF_ENABLE_ONEDNN_OPTS, oneDNN in effect, tfmeta's arena limit, arenas, threads].
_REPORT = r"""
import ctypes, json, os, platform, tempfile, threading
import tfmeta
from tfmeta.core import runtime
threads, heaps = 2 * (os.cpu_count() or 1) + 6, None
if platform.libc_ver()[0] == "glibc":
    barrier = threading.Barrier(threads + 1)
    def work():
        blocks = [bytearray(65536) for _ in range(4)]
        barrier.wait()
        barrier.wait()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    libc, path = ctypes.CDLL(None), tempfile.mktemp()
    libc.fopen.restype = ctypes.c_void_p
    f = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(f))
    libc.fclose(ctypes.c_void_p(f))
    barrier.wait()
    for w in workers:
        w.join()
    heaps = open(path).read().count("<heap nr=")
    os.remove(path)
print(json.dumps([os.environ.get("TF_ENABLE_ONEDNN_OPTS"), runtime.onednn_enabled(), runtime.MALLOC_ARENAS,
                  heaps, threads]))
"""


def _python(code_or_args, onednn=None, timeout=300, arenas=None):
    """Run python in a fresh process with TF_ENABLE_ONEDNN_OPTS=`onednn` and MALLOC_ARENA_MAX=`arenas`
    (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "MALLOC_ARENA_MAX")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    if arenas is not None:  # "many": more than _REPORT's threads
        env["MALLOC_ARENA_MAX"] = str(8 * (os.cpu_count() or 1) + 32) if arenas == "many" else arenas
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.skipif(not X86_64, reason="tfmeta turns oneDNN on by default on x86-64 only")
def test_import_turns_onednn_on_quietly_and_limits_malloc_arenas_when_the_user_did_not_choose():
    proc = _python(_REPORT)
    assert proc.returncode == 0, proc.stderr
    variable, enabled, limit, heaps, threads = json.loads(proc.stdout.splitlines()[-1])
    assert (variable, enabled) == ("1", True)
    assert "oneDNN custom operations are on" not in proc.stderr  # tfmeta's choice: no start-up notice
    if GLIBC:  # two arenas per core, however many threads allocate
        assert limit == 2 * os.cpu_count() and heaps <= limit < threads


# "0" and "garbage" with the user's MALLOC_ARENA_MAX unset and set: both left to their readers
@pytest.mark.parametrize("value, enabled, arenas", [("0", False, None), ("garbage", False, "many")])
def test_import_leaves_the_users_settings_to_tensorflow_and_glibc(value, enabled, arenas):
    proc = _python(_REPORT, onednn=value, arenas=arenas)
    assert proc.returncode == 0, proc.stderr
    variable, got, limit, heaps, threads = json.loads(proc.stdout.splitlines()[-1])
    assert [variable, got] == [value, enabled]
    if value == "garbage":  # TensorFlow itself reports a value it does not understand
        assert "TF_ENABLE_ONEDNN_OPTS is not set to either" in proc.stderr
    if GLIBC and arenas is None:
        assert limit == 2 * os.cpu_count() and heaps <= limit
    elif GLIBC:  # glibc honours the user's limit and tfmeta sets none: each thread its own arena
        assert limit is None and heaps > threads


def test_tensorflow_imported_first_keeps_its_choice_and_tfmeta_works():
    proc = _python(
        "import logging, os; logging.basicConfig(level=logging.DEBUG); import tensorflow as tf; "
        "import keras, tfmeta, json; from tfmeta.core import runtime; "
        "m = tfmeta.MetaLearner(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]), task='regression'); "
        "print(json.dumps([os.environ.get('TF_ENABLE_ONEDNN_OPTS'), runtime.onednn_enabled()]))")
    assert proc.returncode == 0, proc.stderr
    variable, enabled = json.loads(proc.stdout.splitlines()[-1])
    assert variable is None and isinstance(enabled, bool)  # TensorFlow's own choice, left as it is
    assert "TensorFlow was imported before tfmeta" in proc.stderr  # a debug-level note only


@pytest.mark.parametrize("flags, isa", [
    ("fpu sse2 avx fma avx2", "avx2"),
    ("avx2 avx512f avx512bw", "avx512f"),
    ("avx2 avx512f avx512_vnni avx512_bf16", "avx512_vnni"),
    ("avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8", "amx"),
    ("fpu sse2 asimd", "other"),
])
def test_isa_class_from_cpu_flags(flags, isa):
    assert runtime.isa_class(flags.split()) == isa


def _check_machine(machine, *, intra, inter):
    assert set(machine) == {"cpu_model", "isa", "onednn", "onednn_variable", "tensorflow",
                            "intra_op_threads", "inter_op_threads", "cpu_count", "malloc_arenas",
                            "malloc_arena_variable", "grappler"}
    assert isinstance(machine["cpu_model"], str) and machine["cpu_model"]
    assert machine["isa"] in runtime.ISA_CLASSES
    if os.path.exists("/proc/cpuinfo"):
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
        assert machine["isa"] == runtime.isa_class(flags)
    assert isinstance(machine["onednn"], bool)
    assert machine["tensorflow"] == tf.__version__
    assert (machine["intra_op_threads"], machine["inter_op_threads"]) == (intra, inter)
    assert machine["cpu_count"] == os.cpu_count()
    # tfmeta's limit (two arenas per core) is set only where the user's MALLOC_ARENA_MAX is not
    assert machine["malloc_arenas"] in (None, 2 * os.cpu_count())
    assert machine["malloc_arenas"] is None or machine["malloc_arena_variable"] is None


def test_bench_json_records_the_machine_and_the_cli_turns_onednn_on():
    proc = _python(["-m", "tfmeta", "bench", "--estimator", "plain", "--filters", "2", "--ways", "2",
                    "--query", "1", "--meta-batch", "1", "--steps", "1", "--intra-op-threads", "1",
                    "--inter-op-threads", "2", "--json"])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    machine = result["machine"]
    _check_machine(machine, intra=1, inter=2)
    if X86_64:  # the CLI runs with oneDNN on unless the user said otherwise
        assert (machine["onednn"], machine["onednn_variable"]) == (True, "1")


def test_machine_reports_what_is_in_effect_here():
    machine = runtime.machine()
    _check_machine(machine, intra=tf.config.threading.get_intra_op_parallelism_threads(),
                   inter=tf.config.threading.get_inter_op_parallelism_threads())
    assert machine["onednn"] == runtime.onednn_enabled()
    assert machine["malloc_arenas"] == runtime.MALLOC_ARENAS
    assert machine["malloc_arena_variable"] == os.environ.get("MALLOC_ARENA_MAX")
    assert machine["grappler"] == runtime.GRAPPLER


def test_grappler_runs_one_round_without_the_memory_or_cpu_layout_passes():
    """The options tfmeta set at import are the ones TensorFlow's functions run with."""
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.eager import context

    config = config_pb2.ConfigProto()
    config.ParseFromString(context.context().function_call_options.config_proto_serialized)
    rewrite, rc = config.graph_options.rewrite_options, rewriter_config_pb2.RewriterConfig
    gpu = bool(tf.config.list_physical_devices("GPU"))
    assert rewrite.memory_optimization == rc.NO_MEM_OPT
    assert rewrite.meta_optimizer_iterations == rc.ONE
    assert rewrite.layout_optimizer == (rc.DEFAULT if gpu else rc.OFF)
    assert runtime.GRAPPLER == {"memory_optimization": "off", "meta_optimizer_iterations": 1,
                                "layout_optimizer": "on" if gpu else "off"}


# -- strided 1x1 convolutions ----------------------------------------------------------------------

def _shortcut_net():
    """Tanh conv net with strided 1x1 layers on inputs whose size the stride divides (12 -> 6 -> 3),
    the case where oneDNN's filter gradient of the strided form is wrong."""
    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((12, 12, 2)),
        keras.layers.Conv2D(4, 3, padding="same", activation="tanh"),
        keras.layers.Conv2D(6, 1, strides=2, activation="tanh"),
        keras.layers.DepthwiseConv2D(1, strides=2, padding="same", activation="tanh"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])


def _maml_grads(model, tasks):
    learner = MetaLearner(model, inner_lr=0.3, inner_steps=2)
    fn = tf.function(lambda: estimators.get("maml").meta_gradient(learner, tasks).grads)
    return [g.numpy().astype(np.float64) for g in fn()]


def test_strided_pointwise_convolutions_keep_the_meta_gradient_exact():
    """float32 (oneDNN kernels when on) against float64 (Eigen kernels) MAML meta-gradients of a
    net with strided 1x1 Conv2D and DepthwiseConv2D: per weight, float32 round-off only."""
    tasks64 = classification_tasks(2, 3, 1, 2, (12, 12, 2))
    tasks32 = tuple(tf.cast(t, "float32") if t.dtype == tf.float64 else t for t in tasks64)
    model32 = _shortcut_net()
    got = _maml_grads(model32, tasks32)
    previous, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        model64 = _shortcut_net()
        model64.set_weights([w.astype("float64") for w in model32.get_weights()])
        exact = _maml_grads(model64, tasks64)
    finally:
        keras.config.set_floatx(previous)
        keras.config.set_dtype_policy(policy)
    for variable, g, e in zip(model32.trainable_variables, got, exact):
        error = np.linalg.norm(g - e) / np.linalg.norm(e)
        assert error < 1e-4, (variable.path, error)


def test_strided_pointwise_convolutions_run_unstrided_on_a_subsampled_input():
    """Whatever the kernels, no 1x1 convolution runs strided inside tfmeta, and the outputs are
    the Keras model's own."""
    model = _shortcut_net()
    fmodel = FunctionalModel(model)
    x = tf.random.stateless_normal((2, 12, 12, 2), seed=(1, 2))
    fn = tf.function(lambda x: fmodel(fmodel.parameters(), x))
    graph = fn.get_concrete_function(x).graph
    convs = [op for op in graph.get_operations() if op.type in ("Conv2D", "DepthwiseConv2dNative")]
    assert len(convs) == 3
    for op in convs:
        if tuple(op.inputs[1].shape[:2]) == (1, 1):
            assert list(op.get_attr("strides")) == [1, 1, 1, 1], op.name
    np.testing.assert_allclose(fn(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert all("call" not in vars(layer) for layer in model.layers)  # the rewrite is undone


# -- profile breakdown -------------------------------------------------------------------------------

@pytest.mark.parametrize("op_type, name, kind, phase", [
    ("_MklNativeFusedConv2D", "while/body/_1/while/conv2d_1_2/BiasAdd", "conv forward", "query forward"),
    ("_FusedConv2D", "while/body/_1/while/conv2d_1_2/BiasAdd", "conv forward", "query forward"),  # Eigen
    ("_MklNativeConv2DBackpropFilterWithBias",
     "while/body/_1/gradient_tape/while/conv2d_1_2/convolution/Conv2DBackpropFilter",
     "conv backprop filter", "query backward"),
    ("_MklNativeFusedConv2D", "while/body/_1/while/while/body/_433/while/while/conv2d_1_2/BiasAdd",
     "conv forward", "inner forward"),
    ("_MklNativeConv2DBackpropInput",
     "while/body/_1/while/while/body/_433/gradient_tape/while/while/conv2d_1_2/convolution/Conv2DBackpropInput",
     "conv backprop input", "inner backward"),
    ("_MklNativeConv2D", "while/body/_1/gradient_tape/while/while/while/while_grad/body/_1041/gradient_tape/"
     "while/while/gradients/gradient_tape/while/while/conv2d_1_2/convolution/Conv2DBackpropFilter_grad/Conv2D",
     "conv forward", "through inner loop: 2nd-order"),
    ("MaxPoolGrad", "while/body/_1/gradient_tape/while/while/while/while_grad/body/_1041/gradient_tape/"
     "while/while/gradients/while/while/max_pooling2d_1/MaxPool2d_grad/MaxPoolGrad",
     "max-pool grad", "through inner loop: other"),
    ("Mul", "while/body/_1/while/while/body/_433/gradient_tape/while/while/batch_normalization_1_2/Mul",
     "batchnorm", "inner backward"),
    ("TensorListPushBack", "while/body/_1/while/while/body/_433/while/while/TensorListPushBack",
     "accumulators", "inner forward"),
    ("Process", "ExecutorState", "executor", "outside the task loop, executor"),
])
def test_profile_classifies_ops_by_kind_and_maml_phase(op_type, name, kind, phase):
    from tfmeta.app import profiling

    assert profiling.op_kind(op_type, name) == kind
    assert profiling.op_phase(name) == phase


def test_profile_breakdown_nests_self_time_and_counts_idle():
    """Self time excludes nested events; idle is the uncovered share of threads x window."""
    from tfmeta.app import profiling

    trace = {"self_ps": {("Conv2D", "while/body/_1/while/conv2d/Conv2D"): 30,
                         ("Process", "ExecutorState"): 10,
                         ("MaxPoolGrad", "while/body/_1/gradient_tape/while/max_pooling2d/MaxPoolGrad"): 20},
             "busy_ps": {"tf_Compute/1": 40, "tf_Compute/2": 20}, "window_ps": 50}
    result = profiling.breakdown(trace)
    assert result["idle"] == pytest.approx(0.4)
    assert result["by_kind"]["conv forward"] == pytest.approx(0.3)
    assert result["by_phase"]["query backward"] == pytest.approx(0.2)
    assert sum(result["by_kind"].values()) == pytest.approx(0.6)


def test_profile_reads_self_time_from_a_trace(tmp_path):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from tfmeta.app import profiling

    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    for i, label in enumerate(["ExecutorState:Process", "a/conv:Conv2D", "b/pool:MaxPoolGrad"], start=1):
        plane.event_metadata[i].id, plane.event_metadata[i].name = i, label
    one = plane.lines.add(name="tf_Compute/1", timestamp_ns=0)
    for meta, offset, duration in ((1, 0, 100), (2, 10, 50), (3, 70, 20)):
        one.events.add(metadata_id=meta, offset_ps=offset, duration_ps=duration)
    two = plane.lines.add(name="tf_Compute/2", timestamp_ns=0)
    two.events.add(metadata_id=2, offset_ps=20, duration_ps=30)
    plane.lines.add(name="python3", timestamp_ns=0).events.add(metadata_id=3, offset_ps=0, duration_ps=500)
    path = tmp_path / "t.xplane.pb"
    path.write_bytes(space.SerializeToString())
    trace = profiling.read_trace(str(path))
    assert trace["self_ps"] == {("Process", "ExecutorState"): 30, ("Conv2D", "a/conv"): 80,
                                ("MaxPoolGrad", "b/pool"): 20}
    assert trace["count"] == {("Process", "ExecutorState"): 1, ("Conv2D", "a/conv"): 2, ("MaxPoolGrad", "b/pool"): 1}
    assert trace["busy_ps"] == {"tf_Compute/1": 100, "tf_Compute/2": 30}
    assert trace["window_ps"] == 100


def test_conv_floor_counts_the_convolutions_a_traced_meta_step_runs():
    """The convolutions conv_floor adds up are the ones a MAML step runs: a traced step (M=2, T=2)
    executes exactly M x conv_ops_per_task of each kind, forward, input and filter gradients."""
    from tfmeta.app import profiling

    result = profiling.profile_meta_step(meta_batch=2, inner_steps=2, filters=4, warmup=1)
    ops = profiling.conv_ops_per_task(2)
    expected = {k: 2 * sum(n for (kind, _, _), n in ops.items() if kind == k) for k in profiling.CONV_KINDS}
    assert expected == {"conv forward": 52, "conv backprop input": 42, "conv backprop filter": 52}
    assert {k: result["executions_by_kind"][k] for k in profiling.CONV_KINDS} == expected


def test_conv_floor_adds_up_its_timed_convolutions():
    from tfmeta.app import profiling

    floor = profiling.conv_floor(meta_batch=4, inner_steps=1, ways=2, query=3, filters=2, image_size=8, cores=2,
                                 reps=1, copies=(2, 1), matmul_size=64)
    ops = floor["ops"]
    # layer 1: 2 on the query set + 4 on the support set; layers 2-4: 3 + 9 each
    assert sum(row["per_task"] for row in ops.values()) == floor["conv_ops_per_task"] == 6 + 3 * 12
    assert floor["floor_seconds"] == pytest.approx(4 * sum(r["per_task"] * r["seconds"] for r in ops.values()) / 2)
    assert ops["conv forward | layer 1 | query (6)"]["per_task"] == 1
    # FLOPs of one convolution: 2 x images x pixels x 9 x input channels x 2 filters. Layer 1 (8x8, 1
    # channel): 4 on 2 support images, 2 on 6 query images; layers 2-4 (4x4, 2x2, 1x1, 2 channels):
    # 9 on 2 support images, 3 on 6 query images
    per_task = 2 * 9 * 1 * 2 * 64 * (4 * 2 + 2 * 6) + sum(2 * 9 * 2 * 2 * p * (9 * 2 + 3 * 6) for p in (16, 4, 1))
    assert floor["gflop_per_meta_step"] == pytest.approx(4 * per_task / 1e9)
    assert floor["matmul_gflops_per_second"] > 0
