"""LIL: Linearity in the Inner Loop on top of a MAML-family estimator (LIL).

The meta-objective of one task is the base estimator's query loss plus LIL's two regularizers
(LIL, Sec. 5; definitions in :mod:`tfmeta.core.linearity`):

    L_query(theta^S) + phase_weight * KL(s(f(x|theta^S)) || s(f(x|theta_hat)))      (Eq. 7-8)
                     + amplitude_weight * sum_k ||theta^{k+1} - theta^k||             (Eq. 9)

with theta^S the base estimator's adapted parameters (``base.adapted_params``, so ANIL/BOIL
settings of the learner, Meta-SGD rates and gradient-reuse windows are those of the base) and
theta_hat = theta^0 - delta g_0 the linear estimate. One inner loop per task: an observer
accumulates the path length and g_0 while the base adapts.

- Second-order base (maml, reuse, ...): the whole objective is differentiated through the inner
  loop, so both regularizers reach the initialization, Meta-SGD rates and meta-network weights.
- First-order base (fomaml): the Jacobian of the inner loop is the identity, as in FOMAML:
  theta^S = theta^0 + stop(theta^S - theta^0) and theta_hat = theta^0 + stop(theta_hat - theta^0).
  The phase loss then reaches theta^0 through both forward passes; the path length is a constant,
  so the pseudo-amplitude loss has no gradient (a positive amplitude_weight is refused).

Default weights (Sec. 6): phase 0.1; pseudo-amplitude 0.01 for 1-shot and 0.1 for 5-shot tasks
with a MAML base, off for the other bases. "MAML base" here: a second-order base while the learner
adapts all weights (ANIL and BOIL, the learner's adapt="head"/"body", get 0 as in the paper;
FOMAML gets 0). The number of shots K is read in the graph from each task: support size /
number of distinct support labels (the support size for regression); K = 1 gives 0.01, K >= 2
gives 0.1.

The reported ``loss`` is the query loss (comparable with the base estimator's); the metrics add
``phase_loss`` and ``amplitude_loss`` (unweighted) and the linearity metrics PC and AC.

References:
    Anonymous. "Enforcing Zero-Hessian in Meta-Learning" (LIL). Under double-blind review; no
    arXiv identifier.
"""

from __future__ import annotations

from tfmeta.core import checks

import tensorflow as tf

from tfmeta.core import linearity
from tfmeta.estimators.base import (
    Estimator, Flag, StepState, get_class, names, register, zeros_for_none,
)
from tfmeta.estimators.fomaml import FirstOrderMAML
from tfmeta.estimators.maml import MAML
from tfmeta.core.learner import MetaLearner

#: estimator classes whose meta-gradient is the gradient of the query loss at ``adapted_params``
#: (exactly, or with the identity Jacobian of first-order MAML): the bases LIL can wrap.
BASE_FAMILY = (MAML, FirstOrderMAML)


def base_names() -> list[str]:
    """Registered estimators the linearity wrapper accepts as ``base``."""
    return [n for n in names() if issubclass(get_class(n), BASE_FAMILY)]


def _amplitude_flag(text: str):
    """CLI parser of --amplitude-weight: a number, or 'auto' for the paper's default."""
    return "auto" if text.strip().lower() == "auto" else float(text)


def _weight(name: str, value) -> float:
    return checks.number(name, value, at_least=0.0, convert=True)


def _query_outputs_and_loss(learner: MetaLearner, params, meta, task):
    """f(x_query | params), the query loss and metrics: learner.outer_loss, one forward pass."""
    outputs = learner.fmodel(params, task.query_x)
    plain = type(learner).outer_loss is MetaLearner.outer_loss and \
        getattr(learner, "_outer_loss", None) is None
    if plain:
        return outputs, learner.task_loss(outputs, task.query_y), learner.metrics(outputs, task.query_y)
    loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
    return outputs, loss, metrics


@register
class Linearity(Estimator):
    """LIL regularizers (phase Eq. 7-8, pseudo-amplitude Eq. 9) on a MAML-family base estimator.

    Args:
        base: the base estimator: a registered name ("maml", "fomaml", "reuse", ...) or an
            instance of a MAML or first-order MAML (sub)class. ANIL/BOIL: a learner with
            adapt="head"/"body".
        phase_weight: weight of the phase loss (>= 0; paper 0.1).
        amplitude_weight: weight of the pseudo-amplitude loss (>= 0), or "auto"/None for the
            paper's default (see the module docstring).
        parallel_tasks: tasks of the task loop that may run at once (see Estimator).
        **base_options: constructor options of `base` when it is a name (e.g. reuse_window=2).

    Example:
        >>> est = tfmeta.estimators.get("linearity", base="maml", phase_weight=0.1)
        >>> loss, grads, metrics = est.meta_gradient(learner, task_batch)
        >>> metrics["phase_consistency"], metrics["amplitude_consistency"]
    """

    name = "linearity"
    flags = (
        Flag("base", str, "maml",
             "linearity estimator: base estimator LIL regularizes (maml, fomaml or another "
             "MAML-family estimator; ANIL/BOIL via --adapt head/body)"),
        Flag("phase_weight", float, linearity.PHASE_WEIGHT,
             "linearity estimator: weight of LIL's phase loss (Eq. 7-8)"),
        Flag("amplitude_weight", _amplitude_flag, "auto",
             "linearity estimator: weight of LIL's pseudo-amplitude loss (Eq. 9); 'auto': 0.01 "
             "for 1-shot, 0.1 for more shots with a second-order base adapting all weights, else 0"),
    )

    def __init__(self, base="maml", phase_weight: float = linearity.PHASE_WEIGHT,
                 amplitude_weight="auto", parallel_tasks: int = 2,
                 linearity_metrics: bool = False, **base_options):
        super().__init__(parallel_tasks=parallel_tasks, linearity_metrics=linearity_metrics)
        accepted = base_names()
        if isinstance(base, Estimator):
            if base_options:
                raise ValueError(
                    f"base_options={base_options!r} are not valid with a base estimator instance: "
                    "configure the instance instead."
                )
            if not isinstance(base, BASE_FAMILY):
                raise ValueError(
                    f"base={base.name or type(base).__name__!r} is not valid: expected one of "
                    f"{accepted} (an estimator whose meta-gradient is the gradient of the query "
                    "loss at its adapted_params)."
                )
        elif isinstance(base, str) and base in accepted:
            base = get_class(base)(**base_options)
        else:
            raise ValueError(
                f"base={base!r} is not valid: expected one of {accepted} (or a MAML/FOMAML "
                "estimator instance; ANIL and BOIL are the learner's adapt='head'/'body')."
            )
        self.base = base
        self.second_order = base.second_order
        self.phase_weight = _weight("phase_weight", phase_weight)
        if amplitude_weight is None or (isinstance(amplitude_weight, str)
                                        and amplitude_weight.lower() == "auto"):
            self.amplitude_weight = None
        else:
            self.amplitude_weight = _weight("amplitude_weight", amplitude_weight)
            if self.amplitude_weight > 0 and not base.second_order:
                raise ValueError(
                    f"amplitude_weight={amplitude_weight!r} is not valid with base={base.name!r}: "
                    "a first-order base treats the inner trajectory as a constant, so the "
                    "pseudo-amplitude loss has no gradient. Expected 0 (or 'auto'), or a "
                    "second-order base such as 'maml'."
                )

    def check(self, learner: MetaLearner) -> None:
        self.base.check(learner)

    def bind_meta_step(self, variable) -> None:
        super().bind_meta_step(variable)
        self.base.bind_meta_step(variable)  # the base's schedules (MAML++'s DA) follow it too

    def remat_name(self) -> str:
        return f"'linearity' with base {self.base.name!r}"

    def check_remat(self, learner: MetaLearner) -> None:
        super().check_remat(learner)
        if learner.remat is not None:
            self.base.check_remat(learner)

    def metric_names(self, learner: MetaLearner) -> tuple[str, ...]:
        return tuple(learner.metric_names) + linearity.LOSS_NAMES + linearity.METRIC_NAMES

    def amplitude_weight_for(self, learner: MetaLearner, task):
        """The pseudo-amplitude weight used for `task` (a float, or a scalar tensor for 'auto')."""
        if self.amplitude_weight is not None:
            return self.amplitude_weight
        adapts_all = len(learner.fmodel.adapted) == len(learner.fmodel.paths)
        if not (self.base.second_order and adapts_all):
            return 0.0
        return linearity.default_amplitude_weight(linearity.support_shots(learner, task),
                                                  learner.dtype)

    def adapted_params(self, learner, meta, task, observer=None):
        return self.base.adapted_params(learner, meta, task, observer=observer)

    def task_gradient(self, learner, meta_values, task):
        adapted = learner.fmodel.adapted
        amplitude_weight = self.amplitude_weight_for(learner, task)
        with tf.GradientTape() as tape:
            tape.watch(meta_values)
            meta = learner.unflatten(meta_values)
            params, traj = self.base.adapted_params(learner, meta, task,
                                                    observer=linearity.observer())
            start = [meta.init[i] for i in adapted]
            estimate = linearity.linear_estimate(start, traj)
            path = linearity.amplitude_loss(traj)
            if not self.second_order:  # FOMAML: identity Jacobian of the inner loop
                params = [t + tf.stop_gradient(p - t) for t, p in zip(meta.init, params)]
                estimate = [s + tf.stop_gradient(e - s) for s, e in zip(start, estimate)]
                path = tf.stop_gradient(path)
            outputs, loss, metrics = _query_outputs_and_loss(learner, params, meta, task)
            estimate_outputs = learner.fmodel(learner.fmodel.merge(meta.init, estimate),
                                              task.query_x)
            phase = linearity.phase_loss(learner.task, outputs, estimate_outputs)
            total = loss
            if self.phase_weight:
                total = total + self.phase_weight * phase
            if not (isinstance(amplitude_weight, float) and amplitude_weight == 0.0):
                total = total + amplitude_weight * path
        grads = tape.gradient(total, meta_values)
        metrics = dict(metrics)
        metrics["phase_loss"] = tf.stop_gradient(phase)
        metrics["amplitude_loss"] = tf.stop_gradient(path)
        metrics.update(linearity.consistency(learner, meta, task, params, traj))
        return loss, zeros_for_none(grads, meta_values), metrics


class LILPretraining(Estimator):
    """LIL pre-training of the initialization (LIL, Appendix E).

    Not registered: use :func:`tfmeta.core.linearity.pretrain`. The meta-loss of a task is
    ``phase_weight * KL(s(f(x|theta_T^S)) || s(f(x|theta_hat)))`` on the query inputs (no query
    labels): theta_T^S the teacher's adaptation (T inner steps from an exponential moving average
    of the initialization, not differentiated), theta_hat = theta^0 - delta g_0 the student's
    one-step linear estimate, g_0 the student's support gradient at theta^0 (differentiated:
    one Hessian-vector product) and delta the teacher's path length over ||g_0||.

    Each :meth:`meta_gradient` call first moves the teacher: teacher <- m teacher + (1 - m) theta
    (the teacher starts at theta, when :meth:`check` or the first call creates it), so call it
    once per meta-step. :attr:`state` holds the teacher, for checkpoints.

    Example:
        >>> MetaTrainer(learner, LILPretraining()).fit(sampler, 15000)
    """

    name = "lil_pretraining"
    second_order = True
    #: the student takes one differentiated inner gradient; the teacher's inner loop is constant
    differentiates_inner_loop = False

    def __init__(self, phase_weight: float = linearity.PHASE_WEIGHT,
                 teacher_momentum: float = 0.999, parallel_tasks: int = 2,
                 linearity_metrics: bool = False):
        super().__init__(parallel_tasks=parallel_tasks, linearity_metrics=linearity_metrics)
        if self.linearity_metrics:
            raise ValueError(
                "linearity_metrics=True is not available with LIL pre-training: the student takes "
                "no inner trajectory to measure (only the teacher adapts)."
            )
        self.phase_weight = _weight("phase_weight", phase_weight)
        momentum = _weight("teacher_momentum", teacher_momentum)
        if momentum >= 1:
            raise ValueError(
                f"teacher_momentum={teacher_momentum!r} is not valid: expected a number in [0, 1)."
            )
        self.teacher_momentum = momentum
        self.teacher = None

    def check(self, learner):
        if learner.lr_variables:
            raise ValueError(
                "meta_sgd=True is not valid for LIL pre-training: it prepares an initialization "
                "for first-order MAML, which cannot train learning rates."
            )
        self._teacher_variables(learner)

    @property
    def variables(self) -> list:
        """The teacher's variables."""
        return list(self.teacher or [])

    @property
    def state(self):
        """The teacher, what a checkpoint holds of this estimator (None until :meth:`check`)."""
        return None if self.teacher is None else list(self.teacher)

    def metric_names(self, learner):
        return tuple(learner.metric_names) + ("phase_loss",)

    def _teacher_variables(self, learner):
        if self.teacher is None:
            with tf.init_scope():
                self.teacher = [
                    tf.Variable(tf.convert_to_tensor(v.value), trainable=False,
                                name=f"lil_teacher_{k}")
                    for k, v in enumerate(learner.model.trainable_variables)
                ]
        return self.teacher

    def begin_step(self, learner, meta_values, tasks) -> StepState:
        """Move the teacher once per meta-step (teacher <- m teacher + (1 - m) theta); every task
        of the step reads the moved teacher (the step's shared state)."""
        init = learner.unflatten(meta_values).init
        m = self.teacher_momentum
        teacher = self._teacher_variables(learner)
        for t, v in zip(teacher, init):
            t.assign(m * t + (1 - m) * tf.stop_gradient(v))
        return StepState(shared=[tf.convert_to_tensor(t) for t in teacher])

    def task_step(self, learner, meta_values, task, shared, row):
        loss, grads, metrics = self._task_gradient(learner, meta_values, task, shared)
        return loss, grads, metrics, []

    def task_gradient(self, learner, meta_values, task):
        """One task's phase-loss gradient against the teacher as it stands (no EMA move)."""
        teacher = [tf.convert_to_tensor(t) for t in self._teacher_variables(learner)]
        return self._task_gradient(learner, meta_values, task, teacher)

    def _task_gradient(self, learner, meta_values, task, teacher):
        adapted = learner.fmodel.adapted
        stopped = learner.unflatten([tf.stop_gradient(v) for v in meta_values])
        teacher_meta = stopped._replace(init=list(teacher))
        teacher_params, traj = learner.adapt(
            teacher_meta, task.support_x, task.support_y, second_order=False,
            observer=linearity.observer(keep_first_gradient=False, differentiable=False))
        target = tf.stop_gradient(learner.fmodel(teacher_params, task.query_x))
        with tf.GradientTape() as tape:
            tape.watch(meta_values)
            meta = learner.unflatten(meta_values)
            start = [meta.init[i] for i in adapted]
            with tf.GradientTape() as inner:
                inner.watch(start)
                support = learner.inner_loss(learner.fmodel.merge(meta.init, start), meta,
                                             task.support_x, task.support_y)
            first = inner.gradient(support, start,
                                   unconnected_gradients=tf.UnconnectedGradients.ZERO)
            student = linearity.Trajectory(first, tf.stop_gradient(traj.path),
                                           linearity.global_norm(first), traj.later_grad_norms,
                                           traj.steps)
            estimate = linearity.linear_estimate(start, student)
            outputs = learner.fmodel(learner.fmodel.merge(meta.init, estimate), task.query_x)
            phase = linearity.phase_loss(learner.task, target, outputs)
            total = self.phase_weight * phase
        grads = tape.gradient(total, meta_values)
        metrics = dict(learner.metrics(outputs, task.query_y))  # logged only, never differentiated
        metrics["phase_loss"] = tf.stop_gradient(phase)
        return tf.stop_gradient(phase), zeros_for_none(grads, meta_values), metrics
