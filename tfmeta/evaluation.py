"""Evaluation on held-out tasks: mean and 95% confidence interval over episodes, as papers report.

For every test episode the learner adapts on the support set (T inner steps, or `steps`) and is
scored on the query set; the loss (and accuracy, for classification) before adaptation, at the
meta-learned initialization, is reported beside it. The 95% interval is 1.96 standard errors.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tfmeta.learner import MetaLearner


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval of `values`."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def _per_task_scores(learner: MetaLearner, steps: int | None):
    """A compiled fn(task batch) -> [M, 4 or 2] scores per task: pre/post loss (and accuracy)."""

    def one_task(task):
        sx, sy, qx, qy = task
        meta = learner.unflatten(learner.meta_values())
        pre_loss, pre_metrics = learner.outer_loss(meta.init, meta, qx, qy)
        params = learner.adapt(meta, sx, sy, second_order=False, steps=steps)
        post_loss, post_metrics = learner.outer_loss(params, meta, qx, qy)
        scores = [pre_loss, post_loss]
        if "accuracy" in pre_metrics:
            scores += [pre_metrics["accuracy"], post_metrics["accuracy"]]
        return tf.stack([tf.cast(s, tf.float64) for s in scores])

    @tf.function(reduce_retracing=True)
    def batch_scores(*tasks):
        return tf.map_fn(one_task, tuple(tasks), fn_output_signature=tf.float64)

    return batch_scores


def evaluate(
    learner: MetaLearner, sampler, *, episodes: int = 600, steps: int | None = None, start: int = 0
) -> dict[str, float]:
    """Adapt to `episodes` tasks from `sampler` and report means with 95% intervals.

    Returns keys ``loss_before``, ``loss_after`` (and ``accuracy_before``, ``accuracy_after`` for
    classification), each with a ``*_ci95`` half-width, plus ``episodes``.
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes={episodes!r} is not valid: expected an integer >= 1.")
    scorer = _per_task_scores(learner, steps)
    rows = []
    index = start
    while sum(len(r) for r in rows) < episodes:
        tasks = tuple(tf.convert_to_tensor(t) for t in sampler.sample(index))
        rows.append(scorer(*tasks).numpy())
        index += 1
    scores = np.concatenate(rows)[:episodes]
    names = ["loss_before", "loss_after"]
    if scores.shape[1] == 4:
        names += ["accuracy_before", "accuracy_after"]
    result: dict[str, float] = {"episodes": episodes}
    for column, name in enumerate(names):
        result[name], result[f"{name}_ci95"] = mean_ci95(scores[:, column])
    return result
