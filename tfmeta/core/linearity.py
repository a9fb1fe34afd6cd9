"""Linearity of the inner loop: LIL's metrics and regularizers.

"Enforcing Zero-Hessian in Meta-Learning" measures how linear the inner loop is along its own
trajectory theta^0 -> theta^1 -> ... -> theta^S, and regularizes the outer loss towards linearity:

- **Phase Consistency** (Eq. 3): ``PC = sum_k ||theta^{k+1} - theta^k|| / ||theta^S - theta^0||``,
  >= 1 by the triangle inequality, 1 when every step points the same way.
- **Amplitude Consistency** (Eq. 4): ``AC = 1/S sum_{k=1}^{S} ||g_k|| / ||g_0||``, 1 when the
  gradient norm does not change along the trajectory.
- **Phase loss** (Eq. 7-8): ``KL(s(f(x|theta^S)) || s(f(x|theta_hat)))`` on the query (target)
  set, with ``theta_hat = theta^0 - delta g_0`` and ``delta = sum_k ||theta^{k+1} - theta^k|| /
  ||g_0||``: theta_hat lies on the initial gradient direction, at the trajectory's path length.
  For regression the KL is replaced by the squared Euclidean distance between the two
  predictions, averaged over query examples.
- **Pseudo-amplitude loss** (Eq. 9): the path length ``sum_k ||theta^{k+1} - theta^k||``.

What "nabla_theta f(x|theta^k)" means. The paper writes the gradient of the model output, but
uses it as a vector in parameter space (Eq. 7 subtracts it from theta, Eq. 8 takes its norm) and
calls the linear case "the gradient does not change along the trajectory". tfmeta takes g_k = the
gradient the inner loop uses at theta^k: the gradient of the learner's inner (support) loss with
respect to the adapted weights (with a gradient-reuse window, the reused gradient). g_S, needed by
Eq. 4 and never computed by an S-step inner loop, costs one extra support-set gradient at theta^S
(first order, not differentiated). All norms are global Euclidean norms over the learner's
adapted weights (all of them for MAML, the head for ANIL, the body for BOIL).

Nothing of the trajectory is stored: an :class:`~tfmeta.core.inner_loop.Observer` (:func:`observer`)
accumulates the path length, g_0, ||g_0|| and the later gradient norms while the inner loop runs.

Example:
    >>> learner = MetaLearner(models.conv4(5), inner_lr=0.4, inner_steps=5)
    >>> metrics = trajectory_metrics(learner, Task(*(t[0] for t in task_batch)))
    >>> float(metrics["phase_consistency"]) >= 1.0
    True

LIL as pre-training for first-order MAML (Sec. 6, Table 1, Appendix E):
:func:`tfmeta.training.recipes.pretrain`. Any estimator reports PC and AC with
``linearity_metrics=True``: its task step runs :func:`metrics_observer` along its own adaptation
(:meth:`tfmeta.estimators.Estimator.measured_task_gradient`).

References:
    Anonymous. "Enforcing Zero-Hessian in Meta-Learning." Under double-blind review (no arXiv
    identifier). Eq. 3-4 (PC, AC), Eq. 7-8 (phase loss), Eq. 9 (pseudo-amplitude loss), Sec. 6.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import tensorflow as tf

from tfmeta.core import inner_loop
from tfmeta.core.task import Task

#: metrics of Eq. 3 and Eq. 4.
METRIC_NAMES = ("phase_consistency", "amplitude_consistency")
#: the two regularizer values (Eq. 7-8 and Eq. 9), reported as metrics by the linearity estimator.
LOSS_NAMES = ("phase_loss", "amplitude_loss")
#: the paper's weights (Sec. 6, "Hyperparameter setting").
PHASE_WEIGHT = 0.1
AMPLITUDE_WEIGHT_ONE_SHOT = 0.01
AMPLITUDE_WEIGHT_FEW_SHOT = 0.1


class Trajectory(NamedTuple):
    """What the :func:`observer` accumulates along one inner trajectory (adapted weights only).

    first_grad: g_0, the first inner gradient (a list like the adapted weights; empty when the
        observer does not keep it).
    path: sum_k ||theta^{k+1} - theta^k|| (Eq. 3 numerator, Eq. 8 numerator, Eq. 9).
    first_grad_norm: ||g_0||.
    later_grad_norms: sum_{k=1}^{S-1} ||g_k|| (Eq. 4 numerator without the last term).
    steps: S, as a float.
    """

    first_grad: list
    path: tf.Tensor
    first_grad_norm: tf.Tensor
    later_grad_norms: tf.Tensor
    steps: tf.Tensor


# -- small differentiable pieces -------------------------------------------------------------------
def global_norm(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """sqrt(sum of squares) over all tensors, with gradient 0 (not NaN) at the zero vector.

    Example:
        >>> float(global_norm([tf.constant([3.0]), tf.constant([[4.0]])]))
        5.0
    """
    squares = tf.add_n([tf.reduce_sum(tf.square(t)) for t in tensors])
    positive = squares > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, squares, tf.ones_like(squares))),
                    tf.zeros_like(squares))


def _safe_ratio(numerator, denominator, *, empty=1.0):
    """numerator / denominator; `empty` when both are 0, +inf when only the denominator is."""
    positive = denominator > 0
    ratio = numerator / tf.where(positive, denominator, tf.ones_like(denominator))
    fallback = tf.where(numerator > 0, tf.constant(float("inf"), numerator.dtype),
                        tf.constant(empty, numerator.dtype))
    return tf.where(positive, ratio, fallback)


# -- the observer ----------------------------------------------------------------------------------
def observer(*, keep_first_gradient: bool = True, differentiable: bool = True) -> inner_loop.Observer:
    """An inner-loop Observer accumulating a :class:`Trajectory` (the inputs of Eq. 3, 4, 7-9).

    Args:
        keep_first_gradient: keep g_0 itself (needed for theta_hat of Eq. 7), not only its norm.
        differentiable: keep the accumulated values differentiable with respect to whatever the
            trajectory depends on (the LIL regularizers); False stops gradients (metrics only,
            nothing recorded on an outer tape).

    Example:
        >>> params, traj = learner.adapt(meta, x, y, observer=observer())
        >>> traj.path  # sum_k ||theta^{k+1} - theta^k|| over the adapted weights
    """

    def init(params):
        zero = tf.zeros([], params[0].dtype)
        first = [tf.zeros_like(p) for p in params] if keep_first_gradient else []
        return Trajectory(first, zero, zero, zero, zero)

    def update(acc, step, params, grads, new_params):
        if not differentiable:
            params, grads, new_params = (
                [tf.stop_gradient(t) for t in ts] for ts in (params, grads, new_params)
            )
        is_first = tf.equal(step, 0)
        norm = global_norm(grads)
        step_length = global_norm([n - p for n, p in zip(new_params, params)])
        return Trajectory(
            [tf.where(is_first, g, f) for f, g in zip(acc.first_grad, grads)],
            acc.path + step_length,
            tf.where(is_first, norm, acc.first_grad_norm),
            acc.later_grad_norms + tf.where(is_first, tf.zeros_like(norm), norm),
            acc.steps + 1,
        )

    return inner_loop.Observer(init, update)


def metrics_observer() -> inner_loop.Observer:
    """The observer of the linearity metrics only: no g_0 kept, nothing differentiated."""
    return observer(keep_first_gradient=False, differentiable=False)


# -- metrics ---------------------------------------------------------------------------------------
def phase_consistency(path, start: Sequence[tf.Tensor], final: Sequence[tf.Tensor]) -> tf.Tensor:
    """Phase Consistency (LIL, Eq. 3): path length / ||theta^S - theta^0||.

    1 for a trajectory that never turns (and for an empty one), > 1 otherwise.

    Example:
        >>> phase_consistency(traj.path, start=theta0_adapted, final=thetaS_adapted)
    """
    return _safe_ratio(path, global_norm([f - s for f, s in zip(final, start)]))


def amplitude_consistency(trajectory: Trajectory, last_grad_norm) -> tf.Tensor:
    """Amplitude Consistency (LIL, Eq. 4).

    ``AC = 1/S sum_{k=1}^{S} ||g_k|| / ||g_0||`` with ``last_grad_norm = ||g_S||`` (the gradient at
    the adapted weights, which the inner loop itself does not evaluate). 1 for S = 0.

    Example:
        >>> amplitude_consistency(traj, global_norm(support_gradient(learner, meta, task, params)))
    """
    steps = trajectory.steps
    mean_later = _safe_ratio(trajectory.later_grad_norms + last_grad_norm, steps)
    return tf.where(steps > 0, _safe_ratio(mean_later, trajectory.first_grad_norm),
                    tf.ones_like(steps))


def support_gradient(learner, meta, task, params) -> list[tf.Tensor]:
    """The inner-loss gradient on the support set at `params` (full list), adapted weights only.

    This is g_S of Eq. 4 when `params` are the adapted weights theta^S. Not differentiated.

    Example:
        >>> g_S = support_gradient(learner, meta, task, adapted_params)
    """
    params = [tf.stop_gradient(p) for p in params]
    adapted = [params[i] for i in learner.fmodel.adapted]
    with tf.GradientTape() as tape:
        tape.watch(adapted)
        loss = learner.inner_loss(learner.fmodel.merge(params, adapted), meta,
                                  task.support_x, task.support_y)
    grads = tape.gradient(loss, adapted, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [tf.stop_gradient(g) for g in grads]


def consistency(learner, meta, task, params, trajectory: Trajectory) -> dict[str, tf.Tensor]:
    """PC (Eq. 3) and AC (Eq. 4) of one task's trajectory, as metrics (not differentiated).

    Args:
        learner: the MetaLearner.
        meta: the MetaParams the trajectory started from (theta^0 = meta.init).
        task: the task (its support set gives g_S).
        params: the adapted parameters theta^S (full list, as `learner.adapt` returns).
        trajectory: the :class:`Trajectory` the :func:`observer` accumulated.

    Example:
        >>> params, traj = learner.adapt(meta, task.support_x, task.support_y, observer=observer())
        >>> consistency(learner, meta, task, params, traj)["phase_consistency"]
    """
    adapted = learner.fmodel.adapted
    trajectory = tf.nest.map_structure(tf.stop_gradient, trajectory)
    start = [tf.stop_gradient(meta.init[i]) for i in adapted]
    final = [tf.stop_gradient(params[i]) for i in adapted]
    last = global_norm(support_gradient(learner, meta, task, params))
    return {
        "phase_consistency": phase_consistency(trajectory.path, start, final),
        "amplitude_consistency": amplitude_consistency(trajectory, last),
    }


# -- regularizers ----------------------------------------------------------------------------------
def linear_estimate(start: Sequence[tf.Tensor], trajectory: Trajectory) -> list[tf.Tensor]:
    """theta_hat of Eq. 7-8: theta^0 - delta g_0, delta = path length / ||g_0|| (adapted weights).

    theta_hat lies on the initial gradient direction at the trajectory's path length; it equals
    theta^S when the inner loop is linear (constant gradient, SGD or momentum). theta^0 when
    g_0 = 0. Differentiable in theta^0, g_0 and the path length.

    Example:
        >>> theta_hat = linear_estimate([meta.init[i] for i in learner.fmodel.adapted], traj)
    """
    if not trajectory.first_grad:
        raise ValueError(
            "trajectory.first_grad is empty: expected a Trajectory from "
            "observer(keep_first_gradient=True)."
        )
    norm = trajectory.first_grad_norm
    positive = norm > 0
    delta = tf.where(positive, trajectory.path / tf.where(positive, norm, tf.ones_like(norm)),
                     tf.zeros_like(norm))
    return [s - delta * g for s, g in zip(start, trajectory.first_grad)]


def phase_loss(task_type: str, adapted_outputs, estimate_outputs) -> tf.Tensor:
    """LIL's phase loss (LIL, Eq. 7), from the two query predictions.

    classification: mean over query examples of KL(s(f(x|theta^S)) || s(f(x|theta_hat))), s the
    softmax of the logits. regression: mean over query examples of the squared Euclidean distance
    ||f(x|theta^S) - f(x|theta_hat)||^2 (tfmeta's regression variant; the paper defines only the KL).
    Zero when theta_hat = theta^S.

    Example:
        >>> phase_loss("classification", fmodel(theta_S, qx), fmodel(theta_hat, qx))
    """
    if task_type == "classification":
        log_p = tf.nn.log_softmax(adapted_outputs, axis=-1)
        log_q = tf.nn.log_softmax(estimate_outputs, axis=-1)
        per_example = tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1)
    elif task_type == "regression":
        per_example = tf.reduce_sum(tf.square(adapted_outputs - estimate_outputs), axis=-1)
    else:
        raise ValueError(
            f"task_type={task_type!r} is not valid: expected 'classification' or 'regression'."
        )
    return tf.reduce_mean(per_example)


def amplitude_loss(trajectory: Trajectory) -> tf.Tensor:
    """LIL's pseudo-amplitude loss (LIL, Eq. 9): sum_k ||theta^{k+1} - theta^k||.

    Example:
        >>> amplitude_loss(traj)  # == traj.path
    """
    return trajectory.path


def support_shots(learner, task) -> tf.Tensor:
    """K of the task, in the graph: support size / number of distinct support labels
    (classification), the support size (regression)."""
    size = tf.shape(task.support_y)[0]
    if learner.task != "classification":
        return size
    classes = tf.size(tf.unique(tf.reshape(task.support_y, [-1])).y)
    return size // tf.maximum(classes, 1)


def default_amplitude_weight(shots, dtype=tf.float32) -> tf.Tensor:
    """The paper's pseudo-amplitude weight for a MAML base (Sec. 6): 0.01 for 1-shot tasks,
    0.1 for 5-shot tasks; tfmeta uses 0.1 for every K >= 2.

    Example:
        >>> float(default_amplitude_weight(1))
        0.01
    """
    return tf.where(tf.convert_to_tensor(shots) <= 1,
                    tf.constant(AMPLITUDE_WEIGHT_ONE_SHOT, dtype),
                    tf.constant(AMPLITUDE_WEIGHT_FEW_SHOT, dtype))


def trajectory_metrics(learner, task, meta=None, *, steps: int | None = None) -> dict[str, tf.Tensor]:
    """PC, AC and both LIL loss values of one task, measured on one plain adaptation.

    Runs ``learner.adapt`` (inner gradients stopped) from `meta` (default: the learner's current
    meta-parameters) on the task's support set; the phase loss uses its query inputs.

    Example:
        >>> task = Task(*(t[0] for t in task_batch))
        >>> trajectory_metrics(learner, task)["amplitude_consistency"]
    """
    task = Task(*task)
    meta = learner.unflatten(learner.meta_values()) if meta is None else meta
    params, traj = learner.adapt(meta, task.support_x, task.support_y, second_order=False,
                                 steps=steps, observer=observer(differentiable=False))
    start = [meta.init[i] for i in learner.fmodel.adapted]
    estimate = learner.fmodel.merge(meta.init, linear_estimate(start, traj))
    phase = phase_loss(learner.task, learner.fmodel(params, task.query_x),
                       learner.fmodel(estimate, task.query_x))
    return {"phase_loss": phase, "amplitude_loss": amplitude_loss(traj),
            **consistency(learner, meta, task, params, traj)}
