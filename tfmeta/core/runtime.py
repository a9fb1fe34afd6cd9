"""Process-wide runtime settings: TensorFlow threading, oneDNN, the machine.

On CPU, the task loop runs tasks side by side; single-threaded ops with one inter-op thread per
core beat splitting each small op over the cores (2.65 s vs 3.35 s per conv4 meta-step at M=32
on two cores). "auto" picks that for meta-steps on CPU and TensorFlow's own defaults otherwise.
Threading can only be set before TensorFlow runs its first op.
"""

from __future__ import annotations

import os

import tensorflow as tf

from tfmeta.core._backend import (  # noqa: F401  (re-exported)
    MALLOC_ARENAS, MALLOC_VARIABLE, ONEDNN_VARIABLE, onednn_enabled)


def configure_threads(intra_op: int | str = "auto", inter_op: int | str = "auto", *, task_loop: bool = True) -> tuple[int, int]:
    """Set TensorFlow's intra-/inter-op thread pools; returns the (intra, inter) chosen (0 = TF's choice)."""
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    cores = os.cpu_count() or 1
    auto_intra, auto_inter = (1, cores) if task_loop and not on_gpu else (0, 0)
    intra = auto_intra if intra_op == "auto" else int(intra_op)
    inter = auto_inter if inter_op == "auto" else int(inter_op)
    for name, value in (("intra_op", intra), ("inter_op", inter)):
        if value < 0:
            raise ValueError(f"{name}={value!r} is not valid: expected an integer >= 0 or 'auto'.")
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # TensorFlow already initialised: keep what it has.
        pass
    return intra, inter


#: What :func:`configure_grappler` set in this process (None until it ran or where it could not).
GRAPPLER: dict | None = None


def configure_grappler() -> dict | None:
    """Grappler (TensorFlow's graph optimizer) options for the functions this process runs.

    - Its **memory optimizer** is off. Its scheduling pass rewrites large ``AddN`` gradient sums
      into ``AccumulateNV2``, which becomes a ``TemporaryVariable`` in the per-step container.
      Inside the gradient of a ``tf.while_loop`` nested in another (the second-order inner loop
      within the task loop) that variable outlives the call, and the *next* call fails with
      ``AlreadyExistsError: Resource __per_step_0/.../AddN_*/tmp_var`` (seen with conv4 at 30 ways
      in TF 2.21). It brings nothing on CPU, where the per-task loop already keeps memory flat.
    - **One round** of the optimizer passes instead of two, and no **layout optimizer** when no GPU
      is visible: on a conv4 MAML step's graph the second round removed 40 of 3,461 nodes and the
      layout pass changed nothing on CPU, while they took 0.74 of Grappler's 1.71 s (M=2, T=2, 16
      filters); the first call of a conv4 MAML step (M=32, T=5) is 0.4-0.9 s shorter and each
      meta-step as fast (docs/performance.md, "Compile time").

    Returns what was set (also in :data:`GRAPPLER`), or None where the option could not be set (it
    lives in TensorFlow's eager context, not a public API).
    """
    global GRAPPLER
    try:
        from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
        from tensorflow.python.eager import context

        options = context.context().function_call_options
        config = config_pb2.ConfigProto()
        if options.config_proto_serialized:
            config.ParseFromString(options.config_proto_serialized)
        rewrite, rc = config.graph_options.rewrite_options, rewriter_config_pb2.RewriterConfig
        rewrite.memory_optimization = rc.NO_MEM_OPT
        rewrite.meta_optimizer_iterations = rc.ONE
        gpu = bool(tf.config.list_physical_devices("GPU"))
        if not gpu:
            rewrite.layout_optimizer = rc.OFF
        options.config_proto_serialized = config
        context.context().function_call_options = options
    except (ImportError, AttributeError, ValueError):  # pragma: no cover - other TF versions
        return None
    GRAPPLER = {"memory_optimization": "off", "meta_optimizer_iterations": 1,
                "layout_optimizer": "on" if gpu else "off"}
    return GRAPPLER


ISA_CLASSES = ("amx", "avx512_vnni", "avx512f", "avx2", "other")


def isa_class(flags) -> str:
    """The widest x86 vector-ISA class among CPU `flags` (as /proc/cpuinfo spells them):
    "amx" (AMX tiles), "avx512_vnni", "avx512f", "avx2" or "other"."""
    flags = set(flags)
    if "amx_tile" in flags:
        return "amx"
    for name in ("avx512_vnni", "avx512f", "avx2"):
        if name in flags:
            return name
    return "other"


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, list[str]]:
    model, flags = "", []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def machine() -> dict:
    """What a benchmark figure depends on: CPU model and ISA class, whether oneDNN is in effect,
    TensorFlow's version, thread pools (0 = TensorFlow's own choice), cores, and the malloc arena
    limit tfmeta set (None: none) beside the user's ``MALLOC_ARENA_MAX``, and the Grappler options
    tfmeta set (:func:`configure_grappler`; they change the compile time)."""
    import platform

    model, flags = _cpuinfo()
    return {
        "cpu_model": model or platform.processor() or platform.machine() or "unknown",
        "isa": isa_class(flags),
        "onednn": onednn_enabled(),
        "onednn_variable": os.environ.get(ONEDNN_VARIABLE),
        "tensorflow": tf.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "cpu_count": os.cpu_count() or 1,
        "malloc_arenas": MALLOC_ARENAS,
        "malloc_arena_variable": os.environ.get(MALLOC_VARIABLE),
        "grappler": GRAPPLER,
    }


STRATEGIES = ("default", "mirrored", "multiworker")


def split_cpu(devices: int) -> None:
    """Split the CPU into `devices` logical devices (to run replicas on a CPU-only machine).

    Must run before TensorFlow initialises its devices.
    """
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"cpu_devices={devices!r} is not valid: expected an integer >= 1.")
    if devices == 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    except RuntimeError as err:
        raise RuntimeError(f"cpu_devices={devices} must be set before TensorFlow starts: {err}") from None


def make_strategy(name: str = "default") -> tf.distribute.Strategy:
    """A `tf.distribute` strategy by name.

    - "default": no distribution;
    - "mirrored": one replica per GPU, or per logical CPU device when there is no GPU
      (see :func:`split_cpu`);
    - "multiworker": `MultiWorkerMirroredStrategy`, configured by the ``TF_CONFIG`` environment
      variable as TensorFlow expects (README: two workers on one machine or a cluster).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy='multiworker' needs the TF_CONFIG environment variable (see README).")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy={name!r} is not valid: expected one of {STRATEGIES}.")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes run outputs (always, except non-chief multi-worker workers)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", lambda: None)():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0)


def check_split(meta_batch: int, strategy: tf.distribute.Strategy) -> None:
    """The meta-batch must split evenly over the replicas (each replica runs M/R tasks)."""
    replicas = strategy.num_replicas_in_sync
    if meta_batch % replicas:
        raise ValueError(
            f"meta_batch={meta_batch} cannot be split evenly over {replicas} replicas: "
            f"use a multiple of {replicas}."
        )
