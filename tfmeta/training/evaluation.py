"""Evaluation on held-out tasks: mean and 95% confidence interval over episodes, as papers report.

For every test episode the learner adapts on the support set (T inner steps, or `steps`) and is
scored on the query set; the loss (and accuracy, for classification) before adaptation, at the
meta-learned initialization, is reported beside it. The 95% interval is 1.96 standard errors.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tfmeta.core.learner import MetaLearner
from tfmeta.core.task import Task


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval of `values`."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def score_names(learner: MetaLearner) -> list[str]:
    """Names of :func:`task_scores`, in order."""
    names = ["loss_before", "loss_after"]
    for m in learner.metric_names:
        names += [f"{m}_before", f"{m}_after"]
    return names


def task_scores(learner: MetaLearner, task, steps: int | None = None, estimator=None) -> tf.Tensor:
    """Query loss (and metrics) of one task before and after adaptation, as a vector.

    Ordered as :func:`score_names`; the adaptation runs `steps` (default T) inner steps on the
    support set from the current meta-parameters, without any outer tape; with an `estimator`
    (and no `steps`), the estimator's own adaptation (:meth:`Estimator.evaluation_params`).
    """
    sx, sy, qx, qy = task
    meta = learner.unflatten(learner.meta_values())
    before, before_metrics = learner.outer_loss(meta.init, meta, qx, qy)
    if estimator is not None and steps is None:
        params = estimator.evaluation_params(learner, meta, Task(sx, sy, qx, qy))
    else:
        params = learner.adapt(meta, sx, sy, second_order=False, steps=steps)
    after, after_metrics = learner.outer_loss(params, meta, qx, qy)
    row = [before, after]
    for m in learner.metric_names:
        row += [before_metrics[m], after_metrics[m]]
    return tf.stack([tf.cast(v, learner.dtype) for v in row])


def batch_scores(learner: MetaLearner, tasks, steps: int | None = None, estimator=None) -> tf.Tensor:
    """[M, len(score_names)] scores of a batch of tasks (a `tf.map_fn`: no tape, no growth in M)."""
    return tf.map_fn(lambda t: task_scores(learner, t, steps, estimator), tuple(tasks),
                     fn_output_signature=learner.dtype)


def evaluate(
    learner: MetaLearner, sampler, *, episodes: int = 600, steps: int | None = None, start: int = 0,
    estimator=None,
) -> dict[str, float]:
    """Adapt to `episodes` tasks from `sampler` and report means with 95% intervals.

    Returns keys ``loss_before``, ``loss_after`` (and ``accuracy_before``, ``accuracy_after`` for
    classification), each with a ``*_ci95`` half-width, plus ``episodes``.
    """
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"episodes={episodes!r} is not valid: expected an integer >= 1.")
    scorer = tf.function(lambda *tasks: batch_scores(learner, tasks, steps, estimator), reduce_retracing=True,
                         autograph=False)
    rows = []
    index = start
    while sum(len(r) for r in rows) < episodes:
        tasks = tuple(tf.convert_to_tensor(t) for t in sampler.sample(index))
        rows.append(scorer(*tasks).numpy())
        index += 1
    scores = np.concatenate(rows)[:episodes]
    names = score_names(learner)
    result: dict[str, float] = {"episodes": episodes}
    for column, name in enumerate(names):
        result[name], result[f"{name}_ci95"] = mean_ci95(scores[:, column])
    return result
