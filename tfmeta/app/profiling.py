"""Where the time of one meta-step goes: TensorFlow profiler trace, broken down by op and phase.

``python -m tfmeta.app.profiling --meta-batch 8 --inner-steps 5 --json`` runs `tfmeta bench`'s standard
configuration (conv4 on random 28x28 inputs, N-way K-shot, Q query images per class), warms it up,
traces one meta-step with ``tf.profiler`` and reads the trace (XSpace) back: the self time of every
op on TensorFlow's compute threads, grouped

- by kind: convolution forward / backprop-input / backprop-filter, BatchNorm (fused ops and the
  element-wise ops of the exact moments), max-pool and its gradients, while-loop accumulators
  (TensorList push/pop), executor bookkeeping, other element-wise ops;
- by phase of the MAML step (from the op's name scope): inner-loop forward and backward passes on
  the support set, query forward and backward, and the backward pass through the inner loop (the
  second-order part: derivatives of the inner gradient ops, e.g. a Conv2D that differentiates a
  Conv2DBackpropFilter);

and the idle fraction of the compute threads over the traced window. Fractions are meaningful on a
loaded machine; seconds are not (a preempted op's time counts as its own). See docs/performance.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile
import time

from tfmeta.core import _backend  # noqa: F401

KINDS = ("conv forward", "conv backprop input", "conv backprop filter", "batchnorm", "max-pool",
         "max-pool grad", "max-pool grad-grad", "accumulators", "executor", "other")
PHASES = ("inner forward", "inner backward", "query forward", "query backward",
          "through inner loop: 2nd-order", "through inner loop: other", "outside the task loop, executor")


def op_kind(op_type: str, name: str) -> str:
    """The kind (one of KINDS) of an op from its type (``_MklNative...`` prefixes ignored) and name."""
    base = op_type
    for prefix in ("_MklNative", "_Mkl", "_"):  # oneDNN's ops, and Eigen's fused ones (_FusedConv2D)
        if base.startswith(prefix):
            base = base[len(prefix):]
            break
    if base.startswith("Conv2DBackpropFilter") or base.startswith("DepthwiseConv2dNativeBackpropFilter"):
        return "conv backprop filter"
    if base.startswith("Conv2DBackpropInput") or base.startswith("DepthwiseConv2dNativeBackpropInput"):
        return "conv backprop input"
    if base in ("Conv2D", "FusedConv2D", "DepthwiseConv2dNative", "FusedDepthwiseConv2dNative"):
        return "conv forward"
    if base.startswith("FusedBatchNorm") or "batch_normalization" in name:
        return "batchnorm"
    if base == "MaxPoolGradGrad":
        return "max-pool grad-grad"
    if base == "MaxPoolGrad":
        return "max-pool grad"
    if base == "MaxPool":
        return "max-pool"
    if base.startswith("TensorList") or base.startswith("Stack"):
        return "accumulators"
    if base in ("Process", "ExecutorState", "ExecutorDoneCallback"):
        return "executor"
    return "other"


def op_phase(name: str) -> str:
    """The phase (one of PHASES) of a MAML meta-step op from its name scope in tfmeta's graph."""
    if "while_grad" in name:
        return "through inner loop: 2nd-order" if "/gradients/gradient_tape/" in name else "through inner loop: other"
    if "/while/while/body/" in name:
        return "inner backward" if "/gradient_tape/" in name.split("/while/while/body/", 1)[1] else "inner forward"
    if name.startswith("while/body/"):
        return "query backward" if "/gradient_tape/" in name else "query forward"
    return "outside the task loop, executor"


def read_trace(path: str) -> dict:
    """Self time (ps) and number of executions per (op type, op name) on the compute threads of
    an XSpace file, the busy time per thread and the traced window (ps)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    self_ps: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    busy, first, last = {}, None, None
    for line in plane.lines:
        if "Compute" not in line.name:  # TensorFlow's inter-op threads run the ops
            continue
        events = sorted(((line.timestamp_ns * 1000 + e.offset_ps, e.duration_ps,
                          plane.event_metadata[e.metadata_id].name) for e in line.events),
                        key=lambda t: (t[0], -t[1]))
        stack, covered = [], 0
        for start, duration, label in events + [(float("inf"), 0, "")]:
            while stack and stack[-1][0] <= start:
                end, item, children, total = stack.pop()
                self_ps[item] += total - children
            if start == float("inf"):
                break
            if stack:
                stack[-1][2] += duration
            else:
                covered += duration
            name, _, op_type = label.rpartition(":")
            stack.append([start + duration, (op_type or name, name), 0, duration])
            count[(op_type or name, name)] += 1
            first = start if first is None else min(first, start)
            last = start + duration if last is None else max(last, start + duration)
        busy[line.name] = covered
    return {"self_ps": self_ps, "count": count, "busy_ps": busy, "window_ps": (last - first) if busy else 0}


def breakdown(trace: dict) -> dict:
    """Fractions of the compute threads' time over the window, by kind, by phase and both."""
    threads = max(len(trace["busy_ps"]), 1)
    total = trace["window_ps"] * threads or 1
    kinds, phases, table = collections.Counter(), collections.Counter(), collections.Counter()
    runs = collections.Counter()
    for (op_type, name), ps in trace["self_ps"].items():
        kind, phase = op_kind(op_type, name), op_phase(name)
        runs[kind] += trace.get("count", {}).get((op_type, name), 0)
        kinds[kind] += ps
        phases[phase] += ps
        table[f"{phase} | {kind}"] += ps
    idle = 1.0 - sum(trace["busy_ps"].values()) / total
    return {
        "window_seconds": trace["window_ps"] / 1e12,
        "threads": threads,
        "idle": idle,
        "by_kind": {k: kinds[k] / total for k in KINDS},
        "by_phase": {p: phases[p] / total for p in PHASES},
        "by_phase_and_kind": {k: v / total for k, v in table.most_common() if v / total >= 0.005},
        "executions_by_kind": {k: runs[k] for k in KINDS},
    }


def profile_meta_step(*, estimator: str = "maml", ways: int = 5, shots: int = 1, query: int = 15,
                      meta_batch: int = 8, inner_steps: int = 5, filters: int = 64, warmup: int = 2,
                      logdir: str | None = None) -> dict:
    """Trace one meta-step of `tfmeta bench`'s configuration after `warmup` steps; returns the
    breakdown (see :func:`breakdown`) with the machine it ran on."""
    import keras
    import tensorflow as tf

    from tfmeta import estimators
    from tfmeta.app import bench
    from tfmeta.core import models, runtime
    from tfmeta.core.learner import MetaLearner
    from tfmeta.training import MetaTrainer

    tasks = tuple(tf.constant(t) for t in bench.random_tasks(meta_batch, ways, shots, query))
    keras.utils.set_random_seed(0)
    learner = MetaLearner(models.conv4(ways, filters=filters), inner_lr=0.4, inner_steps=inner_steps)
    trainer = MetaTrainer(learner, estimators.get(estimator), keras.optimizers.Adam(1e-3))
    for _ in range(warmup):
        float(trainer.train_step(tasks)["loss"])
    logdir = logdir or tempfile.mkdtemp(prefix="tfmeta-profile-")
    tf.profiler.experimental.start(logdir)
    began = time.perf_counter()
    float(trainer.train_step(tasks)["loss"])
    seconds = time.perf_counter() - began
    tf.profiler.experimental.stop()
    path = max(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    result = breakdown(read_trace(path))
    result.update({"estimator": estimator, "ways": ways, "shots": shots, "query": query,
                   "meta_batch": meta_batch, "inner_steps": inner_steps, "filters": filters,
                   "step_seconds": seconds, "trace": path, "machine": runtime.machine()})
    return result


CONV_KINDS = ("conv forward", "conv backprop input", "conv backprop filter")


def conv_ops_per_task(inner_steps: int, layers: int = 4) -> collections.Counter:
    """The convolutions one task of an exact second-order MAML step runs, by (kind, layer, set).

    Query set: the forward pass and its gradient (input gradients for layers 2.., filter gradients
    for all). Support set, each inner step: the same three, then the backward pass through them
    (reverse over reverse): the derivative of a forward convolution needs an input- and a
    filter-gradient convolution, that of an input gradient a filter-gradient and a forward
    convolution, that of a filter gradient an input-gradient and a forward convolution; layer 1's
    input (the images) needs no gradient, so its backward pass has one filter gradient and its
    derivative one forward convolution. Layers 2..: 3 + 6 per inner step; layer 1: 2 + 2.
    `tests/test_onednn.py` counts the convolutions a traced step runs against these.
    """
    ops: collections.Counter = collections.Counter()
    forward, grad_in, grad_filter = CONV_KINDS
    for layer in range(1, layers + 1):
        first = layer == 1
        ops[(forward, layer, "query")] += 1
        ops[(grad_filter, layer, "query")] += 1
        ops[(forward, layer, "support")] += inner_steps * (2 if first else 3)
        ops[(grad_filter, layer, "support")] += inner_steps * (2 if first else 3)
        if not first:
            ops[(grad_in, layer, "query")] += 1
            ops[(grad_in, layer, "support")] += inner_steps * 3
    return ops


def conv_floor(*, meta_batch: int = 32, inner_steps: int = 5, ways: int = 5, shots: int = 1, query: int = 15,
               filters: int = 64, image_size: int = 28, cores: int | None = None, reps: int = 3,
               copies: tuple[int, int] = (40, 6), matmul_size: int = 1024) -> dict:
    """A lower bound of a conv4 MAML meta-step's time from its convolutions alone.

    Times each convolution of :func:`conv_ops_per_task` (3x3, same padding, the layer's input size
    and channels, `ways * shots` support or `ways * query` query images) with TensorFlow's kernels
    as this process runs them, `copies` of it (support set, query set) in one graph so that the
    call overhead is amortized, and adds them up for `meta_batch` tasks spread perfectly over
    `cores`. Everything else of the step (BatchNorm, pooling, activations, loss, update, the
    executor) is left out, so a meta-step cannot be faster than this with these kernels. Run it
    with one intra-op and one inter-op thread (``main`` does), as the task loop runs each task on
    one core. Also reports the FLOPs and a `matmul_size`^3 matmul's rate as the machine's
    reference. See docs/performance.md ("Is 0.4x learn2learn's time reachable here?").
    """
    import tensorflow as tf

    cores = cores or os.cpu_count() or 1

    def timed(op, copies):
        # copies of the op on inputs of their own (no common subexpression to merge), each output
        # reduced to one element (the op still runs whole), so the graph times little but the ops
        fn = tf.function(lambda: tf.add_n([tf.reshape(op(i), [-1])[0] for i in range(copies)]))
        fn().numpy()
        best = float("inf")
        for _ in range(reps):
            began = time.perf_counter()
            fn().numpy()
            best = min(best, time.perf_counter() - began)
        return best / copies

    ops, sizes = conv_ops_per_task(inner_steps), {"support": ways * shots, "query": ways * query}
    per_op, flops, seconds = {}, 0, 0.0
    size, channels = image_size, 1
    for layer in range(1, 5):
        for which, batch in sizes.items():
            n_copies = copies[0] if which == "support" else copies[1]
            xs = [tf.random.normal([batch, size, size, channels]) for _ in range(n_copies)]
            ws = [tf.random.normal([3, 3, channels, filters]) for _ in range(n_copies)]
            dy = tf.random.normal([batch, size, size, filters])
            strides = [1, 1, 1, 1]
            kernels = {
                "conv forward": lambda i: tf.nn.conv2d(xs[0], ws[i], 1, "SAME"),
                "conv backprop input": lambda i: tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=xs[0].shape, filter=ws[i], out_backprop=dy, strides=strides, padding="SAME"),
                "conv backprop filter": lambda i: tf.raw_ops.Conv2DBackpropFilter(
                    input=xs[i], filter_sizes=ws[0].shape, out_backprop=dy, strides=strides, padding="SAME"),
            }
            op_flops = 2 * batch * size * size * 9 * channels * filters
            for kind, kernel in kernels.items():
                n = ops[(kind, layer, which)]
                if not n:
                    continue
                t = timed(kernel, n_copies)
                per_op[f"{kind} | layer {layer} | {which} ({batch})"] = {
                    "per_task": n, "seconds": t, "gflops_per_second": op_flops / t / 1e9}
                seconds += n * t
                flops += n * op_flops
        size, channels = size // 2, filters
    a = [tf.random.normal([matmul_size] * 2) for _ in range(4)]
    b = tf.random.normal([matmul_size] * 2)
    matmul = timed(lambda i: tf.matmul(a[i], b), 4)
    return {
        "meta_batch": meta_batch, "inner_steps": inner_steps, "ways": ways, "shots": shots, "query": query,
        "filters": filters, "image_size": image_size, "cores": cores,
        "conv_ops_per_task": sum(ops.values()),
        "gflop_per_meta_step": meta_batch * flops / 1e9,
        "conv_seconds_per_task": seconds,
        "floor_seconds": meta_batch * seconds / cores,
        "matmul_gflops_per_second": 2 * matmul_size ** 3 / matmul / 1e9,
        "ops": per_op,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfmeta.app.profiling", description=__doc__.splitlines()[0])
    parser.add_argument("--estimator", default="maml")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--logdir", default=None, help="where the trace goes (TensorBoard's profile plugin reads it)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--conv-floor", action="store_true",
                        help="instead: the lower bound of the meta-step's time from its convolutions alone "
                             "(conv_floor), one thread per task")
    args = parser.parse_args(argv)
    from tfmeta.core import runtime

    if args.conv_floor:
        runtime.configure_threads(1, 1)
        result = conv_floor(meta_batch=args.meta_batch, inner_steps=args.inner_steps, ways=args.ways,
                            shots=args.shots, query=args.query, filters=args.filters)
        result["machine"] = runtime.machine()
        if args.json:
            print(json.dumps(result))
            return 0
        for name, row in result["ops"].items():
            print(f"{name:>48s} x{row['per_task']:<3d} {1e3 * row['seconds']:8.3f} ms "
                  f"{row['gflops_per_second']:5.1f} GFLOP/s")
        print(f"{result['gflop_per_meta_step']:.1f} GFLOP of convolutions per meta-step; at these kernels' rates "
              f"{result['floor_seconds']:.2f} s on {result['cores']} cores (M={result['meta_batch']}, "
              f"T={result['inner_steps']}); 1024^3 matmul: {result['matmul_gflops_per_second']:.1f} GFLOP/s")
        return 0
    runtime.configure_threads("auto", "auto")
    result = profile_meta_step(estimator=args.estimator, ways=args.ways, shots=args.shots, query=args.query,
                               meta_batch=args.meta_batch, inner_steps=args.inner_steps,
                               filters=args.filters, logdir=args.logdir)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"one meta-step traced over {result['window_seconds']:.2f} s x {result['threads']} threads, "
          f"idle {100 * result['idle']:.1f}%")
    for title, key in (("kind", "by_kind"), ("phase", "by_phase"), ("phase | kind", "by_phase_and_kind")):
        print(f"-- by {title}")
        for name, share in sorted(result[key].items(), key=lambda kv: -kv[1]):
            print(f"{name:>50s} {100 * share:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
