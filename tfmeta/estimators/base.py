"""The interface every meta-gradient estimator shares, and the task loop they all use.

An estimator turns the current meta-parameters and a batch of M tasks into a meta-loss,
meta-gradients (one tensor per meta-parameter, ordered as `MetaLearner.meta_variables`) and
metrics, all inside one compiled graph. A subclass implements only
:meth:`Estimator.task_gradient` for one task; :meth:`Estimator.meta_gradient` runs it for every
task in a `tf.while_loop` in which each task takes its own tape and adds its meta-gradient to
accumulators, so nothing is differentiated through the task loop, the graph does not grow with M,
and memory stays flat in M. The meta-gradient is the mean over tasks (Eq. 9 of
000_6b55c9a7831360bd.txt).

Adding an estimator means one new module with a subclass decorated by :func:`register`.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple, Sequence

import contextlib

import tensorflow as tf

from tfmeta import randomness
from tfmeta.learner import MetaLearner

_REGISTRY: dict[str, type["Estimator"]] = {}


class MetaGradient(NamedTuple):
    """Mean query loss after adaptation, meta-gradients, and mean metrics over the tasks."""

    loss: tf.Tensor
    grads: list
    metrics: dict


class Task(NamedTuple):
    """One task's support and query sets (an element of a TaskBatch)."""

    support_x: tf.Tensor
    support_y: tf.Tensor
    query_x: tf.Tensor
    query_y: tf.Tensor


class Flag(NamedTuple):
    """An estimator option exposed on the command line as ``--name-with-dashes``.

    `name` is also the estimator's constructor argument; `type` parses the flag's text.
    """

    name: str
    type: Any
    default: Any
    help: str


def register(cls):
    """Class decorator: make an estimator available by its `name` (CLI `--estimator`)."""
    _REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_class(name: str) -> type["Estimator"]:
    if name not in _REGISTRY:
        raise ValueError(f"estimator={name!r} is not valid: expected one of {list(names())}.")
    return _REGISTRY[name]


def get(name: str, **kwargs) -> "Estimator":
    """An estimator instance by name, e.g. ``get("maml")`` or ``get("reuse", window=4)``."""
    return get_class(name)(**kwargs)


def all_flags() -> list[Flag]:
    """Every registered estimator's flags, once each (estimators may share a flag)."""
    seen: dict[str, Flag] = {}
    for name in names():
        for flag in _REGISTRY[name].flags:
            seen.setdefault(flag.name, flag)
    return list(seen.values())


def zeros_for_none(grads: Sequence, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    return [tf.zeros_like(v) if g is None else g for g, v in zip(grads, like)]


def random_scope(learner: MetaLearner):
    """The seed scope of a meta-gradient (see :mod:`tfmeta.randomness`): for a model with random
    layers, the open scope (folded with the replica id) or, when none is open, one seeded from the
    model's generator state; nothing for other models."""
    if not learner.fmodel.random_states:
        return contextlib.nullcontext()
    if randomness.active():
        return randomness.replica_fold()
    return randomness.scope(learner.fmodel.draw_seed())


class Estimator(abc.ABC):
    """Base class of meta-gradient estimators.

    Args:
        parallel_tasks: how many tasks of the task loop may run at once (`parallel_iterations`
            of the `tf.while_loop`). On CPU, two tasks side by side with single-threaded ops beat
            splitting each op over the cores.
        linearity_metrics: also report "phase_consistency" and "amplitude_consistency" (Eq. 3-4
            of 004_51a19a27816aab9b.txt) of every task's inner loop (see
            :func:`tfmeta.linearity.instrument`); settable later as an attribute.
    """

    name: ClassVar[str] = ""
    #: options of this estimator exposed by `tfmeta train` and `tfmeta bench`.
    flags: ClassVar[tuple[Flag, ...]] = ()
    #: whether the estimator differentiates through the inner loop (second order).
    second_order: ClassVar[bool] = False
    #: report the linearity metrics PC and AC every meta-step (any estimator).
    linearity_metrics: bool = False
    #: the training loop's meta-step counter (a variable), bound by `MetaModel.compile`;
    #: schedules read it inside the compiled step (MAML++'s MSL and DA, :mod:`tfmeta.mamlpp`).
    meta_step = None

    def bind_meta_step(self, variable) -> None:
        """Give the estimator the meta-step counter its schedules follow (no retrace as it moves)."""
        self.meta_step = variable

    def __init__(self, parallel_tasks: int = 2, linearity_metrics: bool = False):
        if isinstance(parallel_tasks, bool) or not isinstance(parallel_tasks, int) or parallel_tasks < 1:
            raise ValueError(f"parallel_tasks={parallel_tasks!r} is not valid: expected an integer >= 1.")
        if not isinstance(linearity_metrics, bool):
            raise ValueError(f"linearity_metrics={linearity_metrics!r} is not valid: expected True or False.")
        self.parallel_tasks = parallel_tasks
        self.linearity_metrics = linearity_metrics

    @property
    def state(self):
        """The estimator's own state for checkpoints (a trackable), or None when it has none.

        Stateless estimators (all but trajectory shifting) return None. A stateful one returns
        its state once :meth:`check` built it; checkpoint it beside the meta-parameters:
        ``tf.train.Checkpoint(meta=learner.meta_variables, estimator=estimator.state)``.
        """
        return None

    def check(self, learner: MetaLearner) -> None:
        """Raise ValueError if this estimator cannot train `learner` (called before tracing)."""

    @property
    def differentiates_inner_loop(self) -> bool:
        """Whether the meta-gradient is backpropagated through the learner's inner loop, which
        the learner's `remat` then rematerialises (second-order estimators)."""
        return bool(self.second_order)

    def remat_name(self) -> str:
        """How :meth:`check_remat` names this estimator in its error."""
        return repr(self.name or type(self).__name__)

    def check_remat(self, learner: MetaLearner) -> None:
        """Raise ValueError, naming --remat, if the learner's `remat` does not apply here.

        Rematerialisation recomputes the inner loop's activations for backpropagation through it;
        an estimator that does not backpropagate through the inner loop (first-order MAML,
        Reptile, iMAML, trajectory shifting) stores none, so remat is refused rather than ignored.
        """
        if learner.remat is None:
            return
        if not self.differentiates_inner_loop:
            raise ValueError(
                f"remat={learner.remat!r} (--remat) is not valid with estimator "
                f"{self.remat_name()}: it does not differentiate through the inner loop, so "
                "there are no inner-loop activations to recompute. Expected --remat none, or a "
                "second-order estimator (maml, reuse, linearity with a second-order base)."
            )

    def metric_names(self, learner: MetaLearner) -> tuple[str, ...]:
        """Names of the metrics :meth:`task_gradient` returns (fixed, for the task loop)."""
        return learner.metric_names

    def reported_metric_names(self, learner: MetaLearner) -> tuple[str, ...]:
        """The metric keys :meth:`meta_gradient` returns: :meth:`metric_names`, plus
        "phase_consistency" and "amplitude_consistency" when `linearity_metrics` is on."""
        names = tuple(self.metric_names(learner))
        if self.linearity_metrics:
            from tfmeta import linearity

            names += tuple(n for n in linearity.METRIC_NAMES if n not in names)
        return names

    def adapted_params(self, learner: MetaLearner, meta, task: Task, observer=None):
        """The task's adapted parameters as this estimator differentiates them.

        Second-order estimators keep the inner gradients differentiable; others stop them.
        Estimators that change the inner dynamics (e.g. gradient reuse) override this, and
        wrappers (e.g. linearity regularizers) call it with an `observer` to get trajectory
        statistics: then it returns ``(params, accumulator)``.
        """
        return learner.adapt(
            meta, task.support_x, task.support_y, second_order=self.second_order, observer=observer
        )

    def evaluation_params(self, learner: MetaLearner, meta, task: Task):
        """Adapted parameters used to score a held-out task (no tape, no meta-gradient).

        By default the learner's own inner loop (T steps of its optimizer on the support loss);
        estimators whose adaptation is a different procedure (iMAML's proximal solve) override it.
        """
        return learner.adapt(meta, task.support_x, task.support_y, second_order=False)

    @abc.abstractmethod
    def task_gradient(
        self, learner: MetaLearner, meta_values: list[tf.Tensor], task: Task
    ) -> tuple[tf.Tensor, list[tf.Tensor], dict]:
        """One task's query loss after adaptation, meta-gradient (aligned with `meta_values`,
        no None) and metrics (exactly the keys of :meth:`metric_names`)."""

    def meta_gradient(self, learner: MetaLearner, tasks, meta_values=None) -> MetaGradient:
        """Mean meta-loss, meta-gradient and metrics over a batch of tasks (in-graph task loop).

        Args:
            learner: the MetaLearner.
            tasks: a TaskBatch (or any 4-tuple support_x, support_y, query_x, query_y) of M tasks.
            meta_values: meta-parameter tensors; default the learner's current values.
        """
        self.check_remat(learner)
        meta_values = learner.meta_values() if meta_values is None else list(meta_values)
        tasks = Task(*tasks)
        count = tf.shape(tasks.support_x)[0]
        dtype = learner.dtype
        names = self.reported_metric_names(learner)
        task_gradient = self.task_gradient
        if self.linearity_metrics:  # PC and AC from the same inner trajectory
            from tfmeta import linearity

            task_gradient = linearity.instrument(self, learner)

        def body(i, loss_sum, metric_sums, grad_sums):
            task = Task(*(t[i] for t in tasks))
            with randomness.fold(i):  # random layers: each task its own masks
                loss, grads, metrics = task_gradient(learner, meta_values, task)
            return (
                i + 1,
                loss_sum + tf.cast(loss, dtype),
                {k: metric_sums[k] + tf.cast(metrics[k], dtype) for k in names},
                [a + g for a, g in zip(grad_sums, grads)],
            )

        start = (
            tf.constant(0),
            tf.zeros([], dtype),
            {k: tf.zeros([], dtype) for k in names},
            [tf.zeros_like(v) for v in meta_values],
        )
        with random_scope(learner):
            _, loss, metrics, grads = tf.while_loop(
                lambda i, *_: i < count, body, start, parallel_iterations=self.parallel_tasks
            )
        m = tf.cast(count, dtype)
        return MetaGradient(loss / m, [g / m for g in grads], {k: v / m for k, v in metrics.items()})
