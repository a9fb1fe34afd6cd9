"""The interface every meta-gradient estimator shares, and the task loop they all use.

An estimator turns the current meta-parameters and a batch of M tasks into a meta-loss,
meta-gradients (one tensor per meta-parameter, ordered as `MetaLearner.meta_variables`) and
metrics, all inside one compiled graph. A subclass implements only
:meth:`Estimator.task_gradient` for one task; :meth:`Estimator.meta_gradient` runs it for every
task in a `tf.while_loop` (:meth:`Estimator.task_loop`) in which each task takes its own tape and
adds its meta-gradient to accumulators, so nothing is differentiated through the task loop, the
graph does not grow with M, and memory stays flat in M. The meta-gradient is the mean over tasks
(Kim et al. 2020, Eq. 9).

The hooks, for estimators that need more than `task_gradient` (docs/architecture.md):

- `begin_step` / `task_step` / `end_step`: state carried by one meta-step, shared (LIL
  pre-training's teacher) or one row per task (trajectory shifting's task learners);
- `task_gradient(..., observer=)`: the linearity metrics ride along the estimator's own adaptation;
- `prepare_sampler`: the task stream an estimator needs (shifting: the same tasks for a round).

Adding an estimator means one new module with a subclass decorated by :func:`register`.

References:
    Kim, J.-H., Park, J., Choi, Y. "Multi-step Estimation for Gradient-based Meta-learning."
    2020. arXiv:2004.05439. Eq. 9 (the meta-gradient as the mean of the task gradients).

Size (about 460 lines): the estimator interface, its registry and flags, and the one task loop with its
hooks that every estimator runs; they change together.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
from typing import Any, ClassVar, NamedTuple, Sequence

import tensorflow as tf

from tfmeta.core import checks, linearity, mamlpp, randomness
from tfmeta.core.learner import MetaLearner
from tfmeta.core.task import MetaGradient, Task

_REGISTRY: dict[str, type["Estimator"]] = {}


class Flag(NamedTuple):
    """An estimator option exposed on the command line as ``--name-with-dashes``.

    `name` is also the estimator's constructor argument; `type` parses the flag's text.
    """

    name: str
    type: Any
    default: Any
    help: str


class StepState(NamedTuple):
    """What one meta-step's task loop carries besides the tasks (:meth:`Estimator.begin_step`).

    shared: anything every task reads (e.g. LIL pre-training's teacher values).
    rows: per-task tensors, leading dimension M: task i reads ``row[i]`` of each.
    outputs: one tensor per per-task output of :meth:`Estimator.task_step`, shaped like the
        stacked output ([M, ...]) and of its dtype; the stacked outputs go to `end_step`.
    """

    shared: Any = None
    rows: Sequence = ()
    outputs: Sequence = ()


def _constructor_defaults(cls) -> dict:
    return {
        name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def register(cls):
    """Class decorator: make an estimator available by its `name` (CLI `--estimator`).

    Every :class:`Flag` must name a constructor argument and carry its default (the constructor
    signature is the one source of an option's default; a mismatch is a TypeError at import).
    A constructor default of None means "the component's own default", which the flag states.
    """
    defaults = _constructor_defaults(cls)
    for flag in cls.flags:
        if flag.name not in defaults:
            raise TypeError(f"{cls.__name__}.flags: flag {flag.name!r} is not a constructor argument "
                            f"with a default: expected one of {sorted(defaults)}.")
        if defaults[flag.name] is not None and defaults[flag.name] != flag.default:
            raise TypeError(f"{cls.__name__}.flags: flag {flag.name!r} has default {flag.default!r}, "
                            f"the constructor {defaults[flag.name]!r}: expected the same.")
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
    """Every registered estimator's flags, once each.

    Estimators may share a flag only when it means the same: the same type and default. Two
    estimators declaring one name with another type or default is a ValueError naming both, so an
    estimator never silently gets another estimator's parser or default for its option.
    """
    seen: dict[str, tuple[str, Flag]] = {}
    for name in names():
        for flag in _REGISTRY[name].flags:
            if flag.name in seen:
                owner, first = seen[flag.name]
                if (first.type, first.default) != (flag.type, flag.default):
                    raise ValueError(
                        f"flag --{flag.name.replace('_', '-')} is declared by estimators {owner!r} "
                        f"(type {getattr(first.type, '__name__', first.type)}, default {first.default!r}) and "
                        f"{name!r} (type {getattr(flag.type, '__name__', flag.type)}, default {flag.default!r}): "
                        "expected one meaning per flag name; rename one of them."
                    )
                continue
            seen[flag.name] = (name, flag)
    return [flag for _, flag in seen.values()]


def zeros_for_none(grads: Sequence, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    return [tf.zeros_like(v) if g is None else g for g, v in zip(grads, like)]


def task_result(loss, grads, metrics, seen=None) -> tuple:
    """What a task_gradient returns: ``(loss, grads, metrics)``, and `seen` (``(meta, params,
    accumulator)``, from :meth:`Estimator.observed_params`) as a fourth value when it was given an
    observer."""
    return (loss, grads, metrics) if seen is None else (loss, grads, metrics, seen)


def random_scope(learner: MetaLearner):
    """The seed scope of a meta-gradient (see :mod:`tfmeta.core.randomness`): for a model with random
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
        linearity_metrics: also report "phase_consistency" and "amplitude_consistency" (LIL, Eq.
            3-4) of every task's inner loop (see :meth:`measured_task_gradient`).
    """

    name: ClassVar[str] = ""
    #: options of this estimator exposed by `tfmeta train` and `tfmeta bench`.
    flags: ClassVar[tuple[Flag, ...]] = ()
    #: whether the estimator differentiates through the inner loop (second order).
    second_order: ClassVar[bool] = False
    #: report the linearity metrics PC and AC every meta-step (any estimator).
    linearity_metrics: bool = False
    #: the training loop's meta-step counter (a variable), bound by `MetaModel.compile`;
    #: schedules read it inside the compiled step (MAML++'s MSL and DA, :mod:`tfmeta.core.mamlpp`).
    meta_step = None

    def bind_meta_step(self, variable) -> None:
        """Give the estimator the meta-step counter its schedules follow (no retrace as it moves)."""
        self.meta_step = variable

    def __init__(self, parallel_tasks: int = 2, linearity_metrics: bool = False):
        self.parallel_tasks = checks.integer("parallel_tasks", parallel_tasks, 1)
        self.linearity_metrics = checks.boolean("linearity_metrics", linearity_metrics)

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

    def check_statistics(self, learner: MetaLearner) -> None:
        """Raise ValueError, naming --per-step-bn-stats, if this estimator cannot keep the
        learner's per-step BatchNorm running statistics (MAML++'s BNRS).

        The default hooks collect them: :meth:`task_step` hands
        :func:`~tfmeta.core.mamlpp.statistics_observer` to ``task_gradient(..., observer=)`` and
        :meth:`end_step` averages the tasks' moments into ``learner.bn_statistics``. An estimator
        with its own hooks, a task_gradient without an observer, or no inner loop from the
        initialization (Reptile, iMAML, shifting refuse MAML++'s options altogether) cannot.
        """
        if not learner.bn_statistics:
            return
        cls = type(self)
        own_hooks = [h for h in ("begin_step", "task_step", "end_step")
                     if getattr(cls, h) is not getattr(Estimator, h)]
        if own_hooks or self.linearity_metrics or "observer" not in inspect.signature(
                self.task_gradient).parameters:
            why = (f"it has its own {', '.join(own_hooks)}" if own_hooks else
                   "--linearity-metrics also observes the inner loop" if self.linearity_metrics else
                   "its task gradient takes no inner-loop observer")
            raise ValueError(
                f"per_step_bn_stats=True (--per-step-bn-stats) is not valid with estimator {self.remat_name()}: "
                f"{why}. Expected estimator 'maml', 'fomaml' or 'reuse' without --linearity-metrics.")

    def metric_names(self, learner: MetaLearner) -> tuple[str, ...]:
        """Names of the metrics :meth:`task_gradient` returns (fixed, for the task loop)."""
        return learner.metric_names

    def reported_metric_names(self, learner: MetaLearner) -> tuple[str, ...]:
        """The metric keys :meth:`meta_gradient` returns: :meth:`metric_names`, plus
        "phase_consistency" and "amplitude_consistency" when `linearity_metrics` is on."""
        names = tuple(self.metric_names(learner))
        if self.linearity_metrics:
            names += tuple(n for n in linearity.METRIC_NAMES if n not in names)
        return names

    def prepare_sampler(self, sampler):
        """The task stream this estimator trains from, given the run's training sampler.

        Default: the sampler itself. An estimator whose task loop keeps per-task state across
        meta-steps (trajectory shifting) returns a sampler that keeps row t's task for as long as
        that state lives. `tfmeta train` and `tfmeta search` call it; nothing names estimators.
        """
        return sampler

    def adapted_params(self, learner: MetaLearner, meta, task: Task, observer=None):
        """The task's adapted parameters as this estimator differentiates them.

        Second-order estimators keep the inner gradients differentiable; others stop them.
        Estimators that change the inner dynamics (e.g. gradient reuse) override this, and
        wrappers (e.g. linearity regularizers) and the task step (linearity metrics) call it with
        an `observer` to get trajectory statistics: then it returns ``(params, accumulator)``.
        """
        return learner.adapt(
            meta, task.support_x, task.support_y, second_order=self.second_order, observer=observer
        )

    def observed_params(self, learner: MetaLearner, meta, task: Task, observer=None):
        """:meth:`adapted_params` for a task_gradient that takes an `observer`: ``(params, seen)``.

        `seen` is None without an observer, else ``(meta, params, accumulator)``: what
        task_gradient returns as its fourth value (:func:`task_result`).
        """
        if observer is None:
            return self.adapted_params(learner, meta, task), None
        params, acc = self.adapted_params(learner, meta, task, observer=observer)
        return params, (meta, params, acc)

    def evaluation_params(self, learner: MetaLearner, meta, task: Task):
        """Adapted parameters used to score a held-out task (no tape, no meta-gradient).

        By default the learner's own inner loop (T steps of its optimizer on the support loss);
        estimators whose adaptation is a different procedure (iMAML's proximal solve) override it.
        """
        return learner.adapt(meta, task.support_x, task.support_y, second_order=False)

    @abc.abstractmethod
    def task_gradient(
        self, learner: MetaLearner, meta_values: list[tf.Tensor], task: Task, observer=None
    ) -> tuple:
        """One task's query loss after adaptation, meta-gradient (aligned with `meta_values`,
        no None) and metrics (exactly the keys of :meth:`metric_names`).

        `observer`: None, or an :class:`~tfmeta.core.inner_loop.Observer` (the linearity metrics')
        that the estimator runs along the adaptation it differentiates, by passing it to
        :meth:`adapted_params` (combined with its own observer, if any). With one, a fourth value
        follows: ``(meta, params, accumulator)``, the MetaParams adapted from, the adapted
        parameters and the observer's accumulator, as ``learner.adapt`` returns an accumulator
        with an observer. An estimator may leave the argument out: its task step then measures a
        separate adaptation.
        """

    # -- the task loop, and the hooks of estimators with per-meta-step or per-task state ---------
    def begin_step(self, learner: MetaLearner, meta_values: list, tasks: Task) -> StepState:
        """What the task loop of one meta-step carries besides the tasks (default: nothing).

        Called once per :meth:`meta_gradient`, before the task loop. Returns a :class:`StepState`:
        ``shared`` is handed to every :meth:`task_step` (e.g. LIL pre-training's teacher),
        ``rows`` are per-task tensors with a leading dimension M (task i reads row i), and
        ``outputs`` describes (by a tensor of the same dtype and shape) each per-task output
        :meth:`task_step` returns; the stacked outputs go to :meth:`end_step`. Default: with
        per-step BatchNorm statistics, each task's ``[T+1, channels]`` batch moments per layer.
        """
        return StepState(outputs=[tf.zeros([1, *v.shape]) for pair in learner.bn_statistics for v in pair])

    def task_step(self, learner: MetaLearner, meta_values: list, task: Task, shared, row: list):
        """One task of the task loop: ``(loss, grads, metrics, outputs)``.

        Default: :meth:`measured_task_gradient` (task_gradient, with the linearity metrics when
        on) and no outputs; with per-step BatchNorm statistics, task_gradient with
        :func:`~tfmeta.core.mamlpp.statistics_observer` along its own inner loop, and the task's
        per-step batch moments as outputs. An estimator with per-task state overrides it, reading
        its row and returning the task's new row as `outputs`.
        """
        if learner.bn_statistics:
            meta = learner.unflatten([tf.stop_gradient(v) for v in meta_values])
            observer = mamlpp.statistics_observer(learner, meta, task.support_x)
            loss, grads, metrics, (_, _, moments) = self.task_gradient(learner, meta_values, task,
                                                                        observer=observer)
            return loss, grads, metrics, [t for pair in moments for t in pair]
        loss, grads, metrics = self.measured_task_gradient(learner, meta_values, task)
        return loss, grads, metrics, []

    def end_step(self, learner: MetaLearner, meta_values: list, state: StepState, outputs: list,
                 after) -> None:
        """After the task loop: store the stacked per-task `outputs` (default: nothing).

        `after` is the loop's mean loss: assignments made under
        ``tf.control_dependencies([after])`` run after every task of the step. Default: move the
        per-step BatchNorm statistics, if any (:func:`~tfmeta.core.mamlpp.update_statistics`).
        """
        if learner.bn_statistics:
            mamlpp.update_statistics(learner, list(zip(outputs[0::2], outputs[1::2])), after)

    def measured_task_gradient(self, learner: MetaLearner, meta_values: list, task: Task):
        """:meth:`task_gradient`, plus PC and AC when `linearity_metrics` is on.

        The linearity metrics come from the very trajectory the estimator differentiates: the
        task step hands :func:`~tfmeta.core.linearity.metrics_observer` to the estimator's
        ``task_gradient(..., observer=)``, which runs it along its own inner loop (one extra
        support gradient for g_S). An estimator whose task_gradient takes no observer, or adapts
        inside a nested graph, gets one extra first-order adaptation instead; one that reports
        PC/AC itself is left alone. Nothing is patched: the observer is an argument.
        """
        extra = ()
        if self.linearity_metrics:
            names = tuple(self.metric_names(learner))
            extra = tuple(n for n in linearity.METRIC_NAMES if n not in names)
        if not extra:
            return self.task_gradient(learner, meta_values, task)
        seen = None
        if "observer" in inspect.signature(self.task_gradient).parameters:
            loss, grads, metrics, seen = self.task_gradient(
                learner, meta_values, task, observer=linearity.metrics_observer())
            graph = tf.compat.v1.get_default_graph()
            if getattr(seen[1][0], "graph", graph) is not graph:
                seen = None  # adapted inside a nested graph: its tensors are not usable here
        else:
            loss, grads, metrics = self.task_gradient(learner, meta_values, task)
        if seen is None:
            meta = learner.unflatten([tf.stop_gradient(v) for v in meta_values])
            params, traj = self.adapted_params(learner, meta, task,
                                               observer=linearity.metrics_observer())
            seen = (meta, params, traj)
        meta, params, traj = seen
        measured = linearity.consistency(learner, meta, task, params, traj)
        metrics = dict(metrics)
        metrics.update({k: measured[k] for k in extra})
        return loss, grads, metrics

    def task_loop(self, learner: MetaLearner, tasks: Task, meta_values: list,
                  state: StepState) -> tuple[MetaGradient, list]:
        """Mean loss, meta-gradient and metrics of :meth:`task_step` over the M tasks, and the
        stacked per-task outputs.

        A `tf.while_loop` in which each task takes its own tape and adds its meta-gradient to
        accumulators: nothing is differentiated through the loop, the graph does not grow with M,
        memory stays flat in M. Rows are read with ``row[i]``; outputs are written to
        `tf.TensorArray` s. The meta-gradient is the mean over tasks (Kim et al. 2020, Eq. 9).
        """
        count = tf.shape(tasks.support_x)[0]
        dtype = learner.dtype
        names = self.reported_metric_names(learner)

        def body(i, loss_sum, metric_sums, grad_sums, outputs):
            task = Task(*(t[i] for t in tasks))
            row = [r[i] for r in state.rows]
            with randomness.fold(i):  # random layers: each task its own masks
                loss, grads, metrics, out = self.task_step(learner, meta_values, task, state.shared, row)
            return (
                i + 1,
                loss_sum + tf.cast(loss, dtype),
                {k: metric_sums[k] + tf.cast(metrics[k], dtype) for k in names},
                [a + g for a, g in zip(grad_sums, grads)],
                [ta.write(i, o) for ta, o in zip(outputs, out)],
            )

        start = (
            tf.constant(0),
            tf.zeros([], dtype),
            {k: tf.zeros([], dtype) for k in names},
            [tf.zeros_like(v) for v in meta_values],
            [tf.TensorArray(x.dtype, size=count, element_shape=x.shape[1:]) for x in state.outputs],
        )
        with random_scope(learner):
            _, loss, metrics, grads, outputs = tf.while_loop(
                lambda i, *_: i < count, body, start, parallel_iterations=self.parallel_tasks
            )
        m = tf.cast(count, dtype)
        mean = MetaGradient(loss / m, [g / m for g in grads], {k: v / m for k, v in metrics.items()})
        return mean, [ta.stack() for ta in outputs]

    @tf.autograph.experimental.do_not_convert  # explicit tf.while_loop/tf.cond: nothing to convert
    def meta_gradient(self, learner: MetaLearner, tasks, meta_values=None) -> MetaGradient:
        """Mean meta-loss, meta-gradient and metrics over a batch of tasks (in-graph task loop).

        :meth:`begin_step`, :meth:`task_loop` over :meth:`task_step`, :meth:`end_step`: estimators
        override those hooks, not this method.

        Args:
            learner: the MetaLearner.
            tasks: a TaskBatch (or any 4-tuple support_x, support_y, query_x, query_y) of M tasks.
            meta_values: meta-parameter tensors; default the learner's current values.
        """
        self.check_remat(learner)
        self.check_statistics(learner)
        meta_values = learner.meta_values() if meta_values is None else list(meta_values)
        tasks = Task(*tasks)
        state = self.begin_step(learner, meta_values, tasks)
        result, outputs = self.task_loop(learner, tasks, meta_values, state)
        self.end_step(learner, meta_values, state, outputs, result.loss)
        return result
