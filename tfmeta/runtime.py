"""Process-wide runtime settings: TensorFlow threading.

On CPU, the task loop runs tasks side by side; single-threaded ops with one inter-op thread per
core beat splitting each small op over the cores (2.65 s vs 3.35 s per conv4 meta-step at M=32
on two cores). "auto" picks that for meta-steps on CPU and TensorFlow's own defaults otherwise.
Threading can only be set before TensorFlow runs its first op.
"""

from __future__ import annotations

import os

import tensorflow as tf


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


def disable_addn_scheduling() -> bool:
    """Turn off Grappler's memory optimizer for the functions this process runs.

    Its scheduling pass rewrites large ``AddN`` gradient sums into ``AccumulateNV2``, which
    becomes a ``TemporaryVariable`` in the per-step container. Inside the gradient of a
    ``tf.while_loop`` nested in another (the second-order inner loop within the task loop) that
    variable outlives the call, and the *next* call fails with ``AlreadyExistsError: Resource
    __per_step_0/.../AddN_*/tmp_var`` (seen with conv4 at 30 ways in TF 2.21). The memory optimizer
    brings nothing on CPU, where the per-task loop already keeps memory flat. Returns whether the
    option could be set (it lives in TensorFlow's eager context, not a public API).
    """
    try:
        from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
        from tensorflow.python.eager import context

        options = context.context().function_call_options
        config = config_pb2.ConfigProto()
        if options.config_proto_serialized:
            config.ParseFromString(options.config_proto_serialized)
        config.graph_options.rewrite_options.memory_optimization = (
            rewriter_config_pb2.RewriterConfig.NO_MEM_OPT
        )
        options.config_proto_serialized = config
        context.context().function_call_options = options
        return True
    except (ImportError, AttributeError, ValueError):  # pragma: no cover - other TF versions
        return False


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
