"""`tfmeta bench`: seconds per meta-step, compile time and peak memory of one configuration.

The standard configuration is conv4 on random 28x28 inputs, N-way K-shot with Q query images per
class, M tasks per meta-batch, T inner SGD steps (lr 0.4), meta-optimizer Adam. ``plain`` is one
ordinary supervised Keras training step on the same M x N x (K + Q) images: the reference for
overhead ratios. Run one configuration per process, so that peak memory is its own. Each result
records the machine it was measured on (``machine``: CPU model, ISA class, oneDNN on or off,
TensorFlow version, threads; :func:`tfmeta.core.runtime.machine`).
"""

from __future__ import annotations

import os
import resource
import statistics
import time

from tfmeta.core import _backend  # noqa: F401

import keras
import numpy as np
import tensorflow as tf

from tfmeta import estimators
from tfmeta.core import models, runtime
from tfmeta.core.learner import MetaLearner, parse_remat, remat_window
from tfmeta.training import MetaTrainer

ESTIMATORS = ("plain",) + estimators.names()


def random_tasks(meta_batch, ways, shots, query, *, image_size=28, seed=0):
    """A batch of M random N-way tasks shaped like Omniglot episodes (numpy)."""
    rng = np.random.default_rng(seed)
    s, q = ways * shots, ways * query
    return (
        rng.random((meta_batch, s, image_size, image_size, 1), dtype=np.float32),
        np.tile(np.repeat(np.arange(ways, dtype=np.int32), shots), (meta_batch, 1)),
        rng.random((meta_batch, q, image_size, image_size, 1), dtype=np.float32),
        np.tile(np.repeat(np.arange(ways, dtype=np.int32), query), (meta_batch, 1)),
    )


def _plain_step(model, tasks):
    """One ordinary training step (Keras BatchNorm, Adam) on all images of the tasks."""
    sx, sy, qx, qy = tasks
    x = np.concatenate([sx.reshape((-1,) + sx.shape[2:]), qx.reshape((-1,) + qx.shape[2:])])
    y = np.concatenate([sy.reshape(-1), qy.reshape(-1)])
    x, y = tf.constant(x), tf.constant(y)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    return lambda: float(step())


def _meta_step(model, tasks, estimator, inner_steps, unroll, parallel_tasks, options, linearity_metrics,
               remat=None):
    learner = MetaLearner(model, inner_lr=0.4, inner_steps=inner_steps, unroll=unroll, remat=remat)
    est = estimators.get(estimator, parallel_tasks=parallel_tasks, linearity_metrics=linearity_metrics,
                         **options)
    est.check_remat(learner)
    trainer = MetaTrainer(learner, est, keras.optimizers.Adam(1e-3))
    tensors = tuple(tf.constant(t) for t in tasks)
    return lambda: trainer.train_step(tensors)["loss"]


def run(
    estimator: str = "maml",
    *,
    model: str = "conv4",
    ways: int = 5,
    shots: int = 1,
    query: int = 15,
    meta_batch: int = 8,
    inner_steps: int = 5,
    steps: int = 5,
    unroll: bool = False,
    parallel_tasks: int = 2,
    seed: int = 0,
    options: dict | None = None,
    strategy: str = "default",
    linearity_metrics: bool = False,
    filters: int = 64,
    remat=None,
) -> dict:
    """Time `steps` meta-steps after one compile-and-run call; returns the figures as a dict."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not valid: expected one of {list(ESTIMATORS)}.")
    if model != "conv4":
        raise ValueError(f"model={model!r} is not valid: bench supports ['conv4'].")
    for name, value in (("ways", ways), ("shots", shots), ("query", query),
                        ("meta_batch", meta_batch), ("steps", steps)):
        if value < 1:
            raise ValueError(f"{name}={value!r} is not valid: expected an integer >= 1.")
    strat = runtime.make_strategy(strategy)
    runtime.check_split(meta_batch, strat)
    if estimator == "plain" and strategy != "default":
        raise ValueError("estimator='plain' is timed without a strategy: use strategy='default'.")
    remat = parse_remat(remat)
    if estimator == "plain" and remat is not None:
        raise ValueError(f"remat={remat!r} (--remat) is not valid with estimator='plain': it has no "
                         "inner loop.")
    _ = tf.constant(1.0) + 1.0  # one op, as the peer benchmark does before it reads RSS
    rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    tasks = random_tasks(meta_batch, ways, shots, query, seed=seed)
    with strat.scope():
        keras.utils.set_random_seed(seed)
        net = models.conv4(ways, filters=filters)
        if estimator == "plain":
            call = _plain_step(net, tasks)
        else:
            call = _meta_step(net, tasks, estimator, inner_steps, unroll, parallel_tasks, options or {},
                              linearity_metrics, remat)
    began = time.perf_counter()
    call()
    first = time.perf_counter() - began
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    median = statistics.median(times)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "estimator": estimator,
        "model": model,
        "filters": filters,
        "ways": ways,
        "shots": shots,
        "query": query,
        "meta_batch": meta_batch,
        "inner_steps": inner_steps if estimator != "plain" else 0,
        "unroll": unroll,
        "parallel_tasks": parallel_tasks,
        "options": options or {},
        "strategy": strategy,
        "linearity_metrics": linearity_metrics,
        "remat": "none" if remat is None else remat if remat == "sqrt" else f"every:{remat}",
        "remat_window": remat_window(remat, inner_steps) if estimator != "plain" else None,
        "replicas": strat.num_replicas_in_sync,
        "steps": steps,
        "seconds_per_step_median": median,
        "seconds_per_step_min": min(times),
        "first_call_seconds": first,
        "compile_seconds": max(first - median, 0.0),
        "peak_rss_mb": peak_rss,
        "rss_after_import_mb": rss_after_import,
        "working_memory_mb": peak_rss - rss_after_import,
        "threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                    tf.config.threading.get_inter_op_parallelism_threads()],
        "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
        "machine": runtime.machine(),
    }


def current_rss_mb() -> float:
    """Resident memory of this process now (not the peak), from /proc/self/statm."""
    with open("/proc/self/statm", encoding="ascii") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(estimator: str = "maml", *, steps: int = 2000, every: int = 100, seed: int = 0) -> dict:
    """Long-run check: MAML on sinusoid for `steps` meta-steps, resident memory every `every` steps.

    Resident memory must not grow after warm-up (no retracing, no leaking tapes); returns the
    samples, the growth from the first sample to the last, and the retraces after the first step.
    """
    from tfmeta.data import SinusoidTasks

    if steps < 2 * every:
        raise ValueError(f"steps={steps} is not valid: expected at least 2 x every={every}.")
    keras.utils.set_random_seed(seed)
    learner = MetaLearner(models.mlp(), task="regression", inner_lr=0.01, inner_steps=5)
    trainer = MetaTrainer(learner, estimator, keras.optimizers.Adam(1e-3))
    samples: dict[int, float] = {}
    traces: dict[int, int] = {}

    def record(step, logs):
        traces[step] = trainer.meta_model.trace_count
        if step % every == 0:
            samples[step] = current_rss_mb()

    began = time.perf_counter()
    trainer.fit(SinusoidTasks(shots=5, query=10, meta_batch=25, seed=seed), steps,
                progress=False, on_step=record)
    first, last = samples[min(samples)], samples[max(samples)]
    return {
        "suite": "soak",
        "estimator": estimator,
        "steps": steps,
        "rss_mb": {str(k): round(v, 1) for k, v in sorted(samples.items())},
        "rss_growth_percent": 100.0 * (last - first) / first,
        "retraces_after_warmup": traces[max(traces)] - traces[min(traces)],
        "seconds": time.perf_counter() - began,
        "machine": runtime.machine(),
    }
