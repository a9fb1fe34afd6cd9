"""Continual trajectory shifting: a meta-update after every inner step (003_2cbdd90bd1e4b64e.txt).

Algorithm 2 of 003_2cbdd90bd1e4b64e.txt: T task learners theta^(t) run their inner optimization
side by side from the shared initialization phi; after **every** inner step k the meta-update

    Delta_k = -beta * mean_t MetaGrad(phi; theta_k^(t))                       (Alg. 2, line 11)

is applied to phi (line 12), and every task learner is shifted by the same Delta_k (line 13), so
that the k-step learner approximates U_k(phi + Delta_1 + ... + Delta_{k-1}) (Eq. 1). The horizon k
grows from 1 to K; then the task learners are reset to phi and the process repeats, M times.

How it maps onto tfmeta
-----------------------
The estimator is **stateful**: one :meth:`Shifting.meta_gradient` call (one ``MetaTrainer``
meta-step) is one k of Algorithm 2. The M tasks of the batch are the T task learners (task learner
t is row t of every batch, so the sampler must give row t the same task during a round, as
:class:`tfmeta.data.synthetic2d.Synthetic2DTasks` and :class:`RoundTasks` do). A call

1. shifts every task learner by ``phi_now - phi_before`` (``phi_before`` is phi recorded by the
   previous call): that difference *is* the meta-update the meta-optimizer applied after the
   previous call, Delta_{k-1}, whatever the meta-optimizer (SGD, Adam, clipping...), so the shift
   equals the meta-update exactly; at the start of a repetition (k = 1) it resets the learners to
   phi instead;
2. takes ONE inner step per task (the learner's inner optimizer: SGD, momentum with weight
   decay as in supplementary Sec. A and E, or Adam) on the task's support set;
3. returns MetaGrad averaged over tasks as the meta-gradient: Reptile's ``phi - theta_k``
   (``shift_grad="reptile"``) or first-order MAML's query-loss gradient at theta_k
   (``shift_grad="fomaml"``). With ``keras.optimizers.SGD(beta)`` as meta-optimizer the update is
   exactly Delta_k = -beta * mean MetaGrad. With Adam the update is Adam's step on that
   "gradient" (per-coordinate rescaled, with momentum); the shift still equals whatever update
   was applied, so Eq. 1 holds with Adam's Delta_k.

The per-task parameters and inner-optimizer states live in ``tf.Variable`` s owned by the
estimator (leading dimension T, left unknown so the traced meta-step does not depend on M); they
are created by :meth:`Shifting.check` (MetaTrainer calls it before it builds its checkpoint) or on
the first call (under ``tf.init_scope``); :attr:`Shifting.state` is what a checkpoint holds.
Under a ``tf.distribute`` strategy the task learners stay on the replica that runs their tasks:
the variables are per replica (:mod:`tfmeta.replica_state`), each replica shifts and steps its
own rows, the only communication is the meta-gradient all-reduce of every call (one per inner
step), and a checkpoint gathers every replica's rows in task order.

A round is M repetitions of K calls; at the start of a round the learners and the optimizer
states start afresh from phi. Between repetitions the optimizer state is kept (the
authors found resetting makes no difference; supplementary C.2) unless ``reset_state=True``.

Task-specific parts
-------------------
In the paper the classifier head is part of theta but not of phi: kept per task, trained by the
inner steps, never shifted, never reset between repetitions, never meta-learned; BatchNorm
statistics are neither in theta nor in phi. In tfmeta the weights a learner does *not* adapt
(``adapt="head"`` etc.) are shared by all tasks and meta-learned as usual (they are read from phi
at every step, so there is nothing to shift), and BatchNorm running statistics are never updated
by inner steps (:mod:`tfmeta.functional`). ``task_specific="head"`` makes the adapted weights of
the last layer task-specific as in the paper: one copy per task learner, never shifted, kept
across repetitions, reset to the model's head at the start of a round, zero meta-gradient.

``accurate=True`` is "Ours Accurate" of Sec. 4.1: each call recomputes U_k(phi + Delta_1 + ... +
Delta_{k-1}) from scratch (k inner steps from the current phi, on the current support set, from
the optimizer state of the repetition's start) and uses it for MetaGrad, while still running the
shifted trajectory, so the metric ``approx_error`` is ||epsilon||_2 of Eq. 2 of the supplementary
(Sec. 3.3): the exact k-step learner minus the shifted one, with the same Deltas. It costs k inner
steps per task instead of one.

Example:
    >>> learner = tfmeta.data.synthetic2d.make_learner((-5.0, 5.0))
    >>> trainer = MetaTrainer(learner, Shifting(horizon=100, repeats=3), keras.optimizers.SGD(0.1))
    >>> batch = Synthetic2DTasks().sample(0)
    >>> for _ in range(300):            # K * M meta-updates, 300 x 8 inner steps in all
    ...     logs = trainer.train_step(batch)
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import tensorflow as tf

from tfmeta import functional, inner_optimizers, randomness
from tfmeta.data.episodes import TaskBatch, check_index, check_positive_int, make_dataset
from tfmeta.estimators.base import Estimator, Flag, MetaGradient, Task, random_scope, register
from tfmeta.replica_state import TaskRows, replica_variable

SHIFT_GRADS = ("reptile", "fomaml")
TASK_SPECIFIC = ("none", "head")

__all__ = ["Shifting", "RoundTasks", "ManyShotTasks", "approximation_error", "continual_shifting"]


def _boolean(value) -> bool:
    """A flag's boolean: True/False, or the text true/false/yes/no/1/0 (command line)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} is not valid: expected an integer >= 1.")
    return int(value)


def _finite(name: str, value, *, positive: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not valid: expected a finite number.") from None
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}={value!r} is not valid: expected a finite number {bound}.")
    return number


def _one_step(learner, meta, theta, state, x, y):
    """U_1: one inner-optimizer step of the adapted weights `theta` on the support loss (x, y).

    The weights that do not adapt are read from `meta.init` (shared by all tasks). Gradients
    are constants (first order), as in Algorithm 2 of 003_2cbdd90bd1e4b64e.txt.
    """
    full = list(meta.init)
    theta = [tf.stop_gradient(t) for t in theta]
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = learner.inner_loss(learner.fmodel.merge(full, theta), meta, x, y)
    grads = tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    grads = [tf.stop_gradient(g) for g in grads]
    return inner_optimizers.step(learner.inner_optimizer, theta, grads, state)


def _steps(learner, meta, theta, state, steps, x, y):
    """U_steps from (theta, state): `steps` (a scalar tensor) inner steps in a `tf.while_loop`."""

    def body(j, theta, state):
        with randomness.fold(j):
            theta, state = _one_step(learner, meta, theta, state, x, y)
        return j + 1, theta, state

    _, theta, state = tf.while_loop(
        lambda j, *_: j < steps, body, (tf.zeros([], steps.dtype), list(theta), state),
        parallel_iterations=1,
    )
    return theta, state


@register
class Shifting(Estimator):
    """Continual trajectory shifting (Shin et al., Algorithm 2 of 003_2cbdd90bd1e4b64e.txt).

    Args:
        horizon: K, the inner steps of one repetition (the horizon grows from 1 to K).
        repeats: M, repetitions per round (task learners reset to phi between repetitions).
        shift_grad: MetaGrad: "reptile" (phi - theta_k) or "fomaml" (query-loss gradient at theta_k).
        accurate: recompute U_k(phi + Delta_1 + ... + Delta_{k-1}) from scratch every call
            ("Ours Accurate", Sec. 4.1) and report the metric ``approx_error`` (Eq. 2, suppl.).
        reset_state: reset the inner optimizer state at every repetition (default: only at the
            start of a round, supplementary C.2).
        task_specific: "none", or "head": the last layer's adapted weights are kept per task,
            never shifted nor meta-learned (supplementary C.2).
        parallel_tasks: task learners that may step at once (see Estimator).

    Example:
        >>> est = Shifting(horizon=4, repeats=2)
        >>> trainer = MetaTrainer(learner, est, keras.optimizers.SGD(0.1))
        >>> ckpt = tf.train.Checkpoint(meta=learner.meta_variables, estimator=est.state)
    """

    name = "shifting"
    second_order = False
    flags = (
        Flag("horizon", int, 100, "shifting: K, inner steps per repetition (the horizon grows from 1 to K)"),
        Flag("repeats", int, 3, "shifting: M, repetitions per round (task learners reset to phi in between)"),
        Flag("shift_grad", str, "reptile", "shifting: MetaGrad, reptile (phi - theta_k) or fomaml"),
        Flag("accurate", _boolean, False,
             "shifting: recompute U_k(phi) from scratch each meta-update and report approx_error"),
        Flag("reset_state", _boolean, False, "shifting: reset the inner optimizer state every repetition"),
        Flag("task_specific", str, "none", "shifting: 'head' keeps the last layer per task, never shifted"),
    )

    def __init__(
        self,
        horizon: int = 100,
        repeats: int = 3,
        shift_grad: str = "reptile",
        accurate: bool = False,
        reset_state: bool = False,
        task_specific: str = "none",
        parallel_tasks: int = 2,
    ):
        super().__init__(parallel_tasks)
        self.horizon = _positive("horizon", horizon)
        self.repeats = _positive("repeats", repeats)
        if shift_grad not in SHIFT_GRADS:
            raise ValueError(f"shift_grad={shift_grad!r} is not valid: expected one of {SHIFT_GRADS}.")
        if task_specific not in TASK_SPECIFIC:
            raise ValueError(
                f"task_specific={task_specific!r} is not valid: expected one of {TASK_SPECIFIC}."
            )
        for flag, value in (("accurate", accurate), ("reset_state", reset_state)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{flag}={value!r} is not valid: expected True or False.")
        self.shift_grad = shift_grad
        self.accurate = bool(accurate)
        self.reset_state = bool(reset_state)
        self.task_specific = task_specific
        self._signature = None
        self._variables: list[tf.Variable] = []

    # -- state -------------------------------------------------------------------------------------
    @property
    def variables(self) -> list[tf.Variable]:
        """Every state variable (calls counter, phi_before, task parameters, optimizer states).

        Empty until :meth:`check` or the first call built them. Under a tf.distribute strategy
        they are per-replica (read across replicas they show replica 0's tasks): checkpoint
        :attr:`state`, which gathers every replica's rows.
        """
        return list(self._variables)

    def build(self, learner) -> None:
        """Create the state variables for `learner` (idempotent; outside any traced graph).

        Task rows are a leading dimension of unknown size (``shape=[None, ...]``), filled at the
        first call of a round, so the variables exist before the meta-batch is known (a
        checkpoint can restore into them) and one trace serves every M.
        """
        adapted = learner.fmodel.adapted
        trainable = learner.model.trainable_variables
        self._validate(learner)
        shapes = tuple(tuple(trainable[i].shape) for i in adapted)
        specific = self._specific_mask(learner)
        signature = (shapes, learner.dtype.name, specific, learner.inner_optimizer.name)
        if self._signature is not None:
            if signature != self._signature:
                raise ValueError(
                    f"this shifting estimator holds task learners for adapted weights {self._signature[0]} "
                    f"({self._signature[1]}), not {shapes} ({learner.dtype.name}): use a new estimator "
                    "for another learner."
                )
            self._check_strategy()
            return
        dtype = learner.dtype
        strategy = tf.distribute.get_strategy()
        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            raise ValueError(
                "estimator='shifting' must build its task learners before the meta-step runs "
                "under a tf.distribute strategy: call estimator.check(learner) (MetaModel.compile "
                "does) inside strategy.scope()."
            )
        with tf.init_scope():
            zeros = [tf.zeros(s, dtype) for s in shapes]
            structure = learner.inner_optimizer.init(zeros)
            leaves = tf.nest.flatten(structure)

            def stacked(name, like):  # one row per task learner, on the replica running the task
                like = tf.convert_to_tensor(like)
                return replica_variable(
                    tf.zeros([0] + like.shape.as_list(), like.dtype),
                    shape=[None] + like.shape.as_list(), name=f"shifting/{name}",
                )

            self.calls = replica_variable(tf.constant(0, tf.int64), name="shifting/calls")
            self.phi_before = [
                replica_variable(z, name=f"shifting/phi_before_{j}") for j, z in enumerate(zeros)
            ]
            self.theta = [stacked(f"theta_{j}", z) for j, z in enumerate(zeros)]
            self.opt_state = [stacked(f"opt_state_{j}", leaf) for j, leaf in enumerate(leaves)]
            self.start_theta, self.start_state = [], []
            if self.accurate:
                self.start_theta = [stacked(f"start_theta_{j}", z) for j, z in enumerate(zeros)]
                self.start_state = [stacked(f"start_state_{j}", leaf) for j, leaf in enumerate(leaves)]
        self._structure = structure
        self._specific = specific
        self._strategy = strategy
        rows = self.theta + self.opt_state + self.start_theta + self.start_state
        self._variables = [self.calls] + self.phi_before + rows
        self._state = tf.Module(name="shifting_state")
        self._state.calls = self.calls
        self._state.phi_before = self.phi_before
        self._state.tasks = TaskRows(rows, strategy)
        self._signature = signature

    @property
    def state(self):
        """What a checkpoint holds: the call counter, phi_before and the task learners' rows.

        Under a tf.distribute strategy each replica keeps the rows of its own tasks
        (:mod:`tfmeta.replica_state`); a checkpoint stores every replica's rows in task order and
        restores them over the replicas present then. ``None`` until :meth:`check` (or the first
        call) built the state.

        Example:
            >>> ckpt = tf.train.Checkpoint(meta=learner.meta_variables, estimator=est.state)
        """
        return getattr(self, "_state", None)

    def _check_strategy(self) -> None:
        current = tf.distribute.get_strategy()
        if current is not self._strategy:
            raise ValueError(
                "this shifting estimator built its task learners under strategy "
                f"{type(self._strategy).__name__} and is now used under {type(current).__name__}: "
                "build it (estimator.check(learner), MetaModel.compile) inside the scope of the "
                "strategy that trains it, or use a new estimator."
            )

    def reset(self) -> None:
        """Start a new round at the next call: task learners and optimizer states from phi."""
        if self._signature is not None:
            self.calls.assign(0)

    def position(self) -> dict[str, int]:
        """Where the next call stands: ``{"round", "repetition", "step"}`` (0-based; step = k - 1)."""
        calls = int(self.calls.numpy()) if self._signature is not None else 0
        per_round = self.horizon * self.repeats
        return {
            "round": calls // per_round,
            "repetition": (calls % per_round) // self.horizon,
            "step": calls % self.horizon,
        }

    def _specific_mask(self, learner) -> tuple[bool, ...]:
        adapted = learner.fmodel.adapted
        if self.task_specific == "none":
            return tuple(False for _ in adapted)
        paths = learner.fmodel.paths
        head = functional._head_prefix(paths)
        return tuple(paths[i].startswith(head) for i in adapted)

    # -- Estimator interface -----------------------------------------------------------------------
    def check(self, learner) -> None:
        self.build(learner)

    def _validate(self, learner) -> None:
        if getattr(self, "linearity_metrics", False):
            raise ValueError(
                "linearity_metrics=True is not available with estimator='shifting': its task "
                "learners take one inner step per meta-update, so there is no inner trajectory to measure."
            )
        from tfmeta import mamlpp

        mamlpp.refuse(learner, self.name)
        if learner.lr_variables or learner.meta_network is not None:
            raise ValueError(
                "estimator='shifting' meta-learns the initialization only: it cannot train "
                "meta_sgd learning rates or a meta_network. Use estimator='maml'."
            )
        specific = self._specific_mask(learner)
        if self.task_specific == "head" and not any(specific):
            raise ValueError(
                "task_specific='head' needs the head to adapt, but the learner's adapt choice "
                "leaves the last layer out of the inner loop: use adapt='all'."
            )
        if all(specific):
            raise ValueError(
                "task_specific='head' with only the head adapting leaves nothing to shift or "
                "meta-learn by trajectory shifting: use adapt='all' or task_specific='none'."
            )

    def metric_names(self, learner) -> tuple[str, ...]:
        names = tuple(learner.metric_names) + ("horizon",)
        return names + ("approx_error",) if self.accurate else names

    def _meta_grad(self, learner, meta, theta, task):
        """Query loss, MetaGrad(phi; theta) for every meta-parameter, and metrics of one task.

        Reptile: phi - theta on the shared adapted weights (Sec. 3.1 of 003_...); first-order
        MAML: the query-loss gradient at theta. Task-specific weights get zero.
        """
        adapted = learner.fmodel.adapted
        params = [tf.stop_gradient(p) for p in learner.fmodel.merge(meta.init, theta)]
        if self.shift_grad == "fomaml":
            with tf.GradientTape() as tape:
                tape.watch(params)
                loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
            grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            grads = [tf.stop_gradient(g) for g in grads]
            for j, i in enumerate(adapted):
                if self._specific[j]:
                    grads[i] = tf.zeros_like(grads[i])
        else:
            loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
            grads = [tf.zeros_like(p) for p in meta.init]
            for j, i in enumerate(adapted):
                if not self._specific[j]:
                    grads[i] = meta.init[i] - params[i]
        return tf.stop_gradient(loss), grads, metrics

    def task_gradient(self, learner, meta_values, task):
        """One task learner at the first step of a repetition (k = 1, fresh optimizer state).

        theta_1 = U_1(phi) and MetaGrad(phi; theta_1): with K = 1 this is the whole algorithm
        (a one-step Reptile or first-order MAML task gradient). Stateless; :meth:`meta_gradient`
        runs the stateful version.
        """
        self.build(learner)
        meta = learner.unflatten(meta_values)
        theta = [meta.init[i] for i in learner.fmodel.adapted]
        theta, _ = _one_step(learner, meta, theta, learner.inner_optimizer.init(theta),
                             task.support_x, task.support_y)
        loss, grads, metrics = self._meta_grad(learner, meta, theta, task)
        metrics = dict(metrics, horizon=tf.ones([], learner.dtype))
        if self.accurate:
            metrics["approx_error"] = tf.zeros([], learner.dtype)
        return loss, grads, metrics

    def meta_gradient(self, learner, tasks, meta_values=None) -> MetaGradient:
        """One step k of Algorithm 2 for every task learner; the mean MetaGrad as meta-gradient.

        Shift (Eq. 1: theta += phi_now - phi_before) or reset to phi, one inner step per task,
        MetaGrad(phi; theta_k) averaged over tasks; then records phi_now and advances the
        counter. The task loop is a `tf.while_loop` (graph size independent of M) whose iterations
        only read stacked tensors and write `tf.TensorArray` s; the variables are assigned after it.
        """
        self.build(learner)
        meta_values = learner.meta_values() if meta_values is None else list(meta_values)
        meta = learner.unflatten(meta_values)
        tasks = Task(*tasks)
        dtype = learner.dtype
        adapted = learner.fmodel.adapted
        names = self.metric_names(learner)
        count = tf.shape(tasks.support_x)[0]
        K, M = self.horizon, self.repeats

        calls = self.calls.read_value()
        rows = tf.shape(self.theta[0])[0]
        check = tf.debugging.assert_equal(
            tf.logical_or(tf.equal(calls % (K * M), 0), tf.equal(rows, count)), True,
            message="shifting: the meta-batch (number of task learners) changed in the middle of "
                    "a round; keep it fixed or call estimator.reset() first",
        )
        with tf.control_dependencies([check] if check is not None else []):
            calls = tf.identity(calls)  # nothing below runs unless the check passed
        k = calls % K  # 0-based inner step of this call within the repetition
        rep_start = tf.equal(k, 0)
        round_start = tf.equal(calls % (K * M), 0)

        phi = [meta.init[i] for i in adapted]
        stored = [v.read_value() for v in self.theta]
        before = [v.read_value() for v in self.phi_before]

        def tiled(x):
            return tf.broadcast_to(x[None], tf.concat([[count], tf.shape(x)], 0))

        theta0 = []
        for j in range(len(phi)):
            p, s, b = phi[j], stored[j], before[j]
            if self._specific[j]:  # never shifted; reset only at the start of a round
                restart = lambda p=p, s=s: tf.cond(round_start, lambda: tiled(p), lambda: s)
                carry = lambda s=s: s
            else:  # Eq. 1: theta_{k-1} + Delta_{k-1}, Delta_{k-1} = phi_now - phi_before
                restart = lambda p=p: tiled(p)
                carry = lambda p=p, s=s, b=b: s + (p - b)[None]
            theta0.append(tf.cond(rep_start, restart, carry))

        fresh = [tiled(x) for x in tf.nest.flatten(learner.inner_optimizer.init(phi))]
        reset = tf.logical_or(round_start, tf.logical_and(rep_start, self.reset_state))
        state0 = [
            tf.cond(reset, lambda f=f: f, lambda v=v: v.read_value())
            for f, v in zip(fresh, self.opt_state)
        ]
        if self.accurate:
            start_theta0 = [
                tf.cond(rep_start, lambda t=t: t, lambda v=v: v.read_value())
                for t, v in zip(theta0, self.start_theta)
            ]
            start_state0 = [
                tf.cond(rep_start, lambda s=s: s, lambda v=v: v.read_value())
                for s, v in zip(state0, self.start_state)
            ]

        def pack(leaves):
            return tf.nest.pack_sequence_as(self._structure, list(leaves))

        def body(i, loss_sum, metric_sums, grad_sums, theta_out, state_out):
            task = Task(*(t[i] for t in tasks))
            theta = [t[i] for t in theta0]
            with randomness.fold(i):  # random layers: each task its own masks
                theta, state = _one_step(learner, meta, theta, pack(s[i] for s in state0),
                                         task.support_x, task.support_y)
                used = theta
                extra = {"horizon": tf.cast(k + 1, dtype)}
                if self.accurate:
                    start = [p if not spec else s[i] for p, s, spec in zip(phi, start_theta0, self._specific)]
                    exact, _ = _steps(learner, meta, start, pack(s[i] for s in start_state0), k + 1,
                                      task.support_x, task.support_y)
                    sq = [tf.reduce_sum(tf.square(e - t)) for e, t, spec in zip(exact, theta, self._specific)
                          if not spec]
                    extra["approx_error"] = tf.sqrt(tf.add_n(sq))
                    used = exact
                loss, grads, metrics = self._meta_grad(learner, meta, used, task)
            metrics = dict(metrics, **extra)
            return (
                i + 1,
                loss_sum + tf.cast(loss, dtype),
                {n: metric_sums[n] + tf.cast(metrics[n], dtype) for n in names},
                [a + g for a, g in zip(grad_sums, grads)],
                [ta.write(i, t) for ta, t in zip(theta_out, theta)],
                [ta.write(i, s) for ta, s in zip(state_out, tf.nest.flatten(state))],
            )

        def arrays(likes):
            return [
                tf.TensorArray(x.dtype, size=count, element_shape=x.shape[1:]) for x in likes
            ]

        start = (
            tf.constant(0),
            tf.zeros([], dtype),
            {n: tf.zeros([], dtype) for n in names},
            [tf.zeros_like(v) for v in meta_values],
            arrays(theta0),
            arrays(state0),
        )
        with random_scope(learner):
            _, loss, metrics, grads, theta_out, state_out = tf.while_loop(
                lambda i, *_: i < count, body, start, parallel_iterations=self.parallel_tasks
            )
        with tf.control_dependencies([loss]):  # after the task loop (and so after the check)
            for v, ta in zip(self.theta, theta_out):
                v.assign(ta.stack())
            for v, ta in zip(self.opt_state, state_out):
                v.assign(ta.stack())
            if self.accurate:
                for v, x in zip(self.start_theta + self.start_state, start_theta0 + start_state0):
                    v.assign(x)
            for v, p in zip(self.phi_before, phi):
                v.assign(p)
            self.calls.assign_add(1)
        m = tf.cast(count, dtype)
        return MetaGradient(loss / m, [g / m for g in grads], {n: v / m for n, v in metrics.items()})


# -- Algorithm 2 as one call ---------------------------------------------------------------------
def continual_shifting(learner, tasks, *, beta: float, horizon: int = 100, repeats: int = 3, **options):
    """Run Algorithm 2 of 003_2cbdd90bd1e4b64e.txt on a fixed batch of tasks: K * M meta-updates.

    The meta-optimizer is ``keras.optimizers.SGD(beta)``, so every meta-update is exactly
    Delta_k = -beta * mean_t MetaGrad(phi; theta_k^(t)) (line 11). Returns ``(trainer, history)``:
    the MetaTrainer (its `estimator` holds the task learners) and the per-step logs.

    Example:
        >>> learner = synthetic2d.make_learner((-5.0, 5.0))
        >>> trainer, history = continual_shifting(learner, Synthetic2DTasks().sample(0), beta=0.1)
        >>> int(trainer.step)
        300
    """
    import keras

    from tfmeta.training import MetaTrainer

    beta = _finite("beta", beta)
    estimator = Shifting(horizon=horizon, repeats=repeats, **options)
    trainer = MetaTrainer(learner, estimator, keras.optimizers.SGD(beta))
    tasks = tuple(tf.convert_to_tensor(t) for t in tasks)
    history = [trainer.train_step(tasks) for _ in range(estimator.horizon * estimator.repeats)]
    return trainer, history


# -- the approximation error of Sec. 3.3 ---------------------------------------------------------
def approximation_error(learner, task, *, alpha: float, beta: float, k: int, seed: int = 0,
                        meta_values=None) -> float:
    """||epsilon||_2 of Eq. 2 (supplementary C.4) of 003_2cbdd90bd1e4b64e.txt for one draw.

    epsilon = U_k(phi + Delta_1 + ... + Delta_{k-1}) - U_1(... U_1(U_1(phi) + Delta_1) ... + Delta_{k-1})

    with U vanilla SGD of learning rate `alpha` on the task's support loss, and synthetic
    meta-updates Delta_i = beta * x_i / ||x_i||_2, x_i ~ N(0, I) over the adapted weights (the
    same sequence in both terms), as in supplementary C.4. Eq. 5 bounds it by
    O(beta alpha h k^2 + beta^2 k): it grows with alpha, beta and k (Fig. 3), and is exactly 0 for
    k = 1 or beta = 0.

    Example:
        >>> approximation_error(learner, task, alpha=0.1, beta=0.01, k=10)  # doctest: +SKIP
        0.0009...
    """
    alpha = _finite("alpha", alpha, positive=True)
    beta = _finite("beta", beta)
    k = _positive("k", k)
    seed = check_index(seed, "seed")
    task = Task(*task)
    meta = learner.unflatten(learner.meta_values() if meta_values is None else list(meta_values))
    phi = [meta.init[i] for i in learner.fmodel.adapted]
    dtype = learner.dtype
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(k - 1):
        x = [rng.normal(size=p.shape) for p in phi]
        norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in x))
        deltas.append([tf.constant(beta * v / norm, dtype) for v in x])
    sgd = inner_optimizers.sgd(alpha)

    @tf.function
    def step(theta):
        grads = _gradient(learner, meta, theta, task.support_x, task.support_y)
        return inner_optimizers.step(sgd, theta, grads, ())[0]

    exact = [p + sum(d[j] for d in deltas) if deltas else p for j, p in enumerate(phi)]
    for _ in range(k):
        exact = step(exact)
    shifted = list(phi)
    for i in range(k):
        shifted = step(shifted)
        if i < k - 1:
            shifted = [t + d for t, d in zip(shifted, deltas[i])]
    return math.sqrt(sum(float(tf.reduce_sum(tf.square(e - s))) for e, s in zip(exact, shifted)))


def _gradient(learner, meta, theta, x, y):
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = learner.inner_loss(learner.fmodel.merge(list(meta.init), theta), meta, x, y)
    return tape.gradient(loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)


# -- a sampler for rounds on fixed tasks ---------------------------------------------------------
class RoundTasks:
    """Keep each meta-batch for a whole round, so task learner t keeps task t (Algorithm 2).

    ``sample(index) = base.sample(index // length)``: with ``length = horizon * repeats`` every
    round of the shifting estimator trains its T task learners on one fixed batch of T tasks (the
    paper's setting: a fixed set of tasks), and the next round draws new tasks. Any sampler with
    ``sample``/``specs`` works (episodic Omniglot, sinusoid, synthetic2d); the other attributes
    are the base sampler's.

    Example:
        >>> sampler = RoundTasks(SinusoidTasks(meta_batch=4), length=300)
        >>> bool((sampler.sample(0).support_x == sampler.sample(299).support_x).all())
        True
    """

    def __init__(self, base, length: int):
        self.base = base
        self.length = check_positive_int("length", length)

    def sample(self, index: int) -> TaskBatch:
        return self.base.sample(check_index(index) // self.length)

    @property
    def specs(self) -> TaskBatch:
        return self.base.specs

    def dataset(self, start: int = 0) -> tf.data.Dataset:
        """Endless deterministic dataset: ``sample(start), sample(start + 1), ...``."""
        return make_dataset(self.sample, self.specs, start)

    def __getattr__(self, name):
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"RoundTasks({self.base!r}, length={self.length})"


class ManyShotTasks:
    """Many-shot heterogeneous tasks: task t is a whole labelled dataset (Sec. 4.2 of 003_...).

    Every ``sample(index)`` has one row per dataset, in the same order (task learner t always
    trains on dataset t, as Algorithm 2 needs): ``shots`` random examples of dataset t as the
    support minibatch of this inner step and ``query`` others as the query minibatch, with the
    dataset's own labels 0..C_t-1. The model's head needs :attr:`ways` = max C_t outputs; with
    ``task_specific="head"`` each task learner keeps its own head, as in the paper.

    Args:
        datasets: a sequence of ``(inputs [N_t, *features], integer labels [N_t])``.
        shots: support examples per task and step (the inner minibatch).
        query: query examples per task and step.
        seed: base seed; batches are a pure function of (seed, index).

    Example (each Omniglot alphabet of the train split as one many-way task)::

        images, labels = load_omniglot(data_dir)["train"]
        sizes = [4 * n for n in characters_per_alphabet]   # class ids are grouped by alphabet
        tasks = ManyShotTasks.from_label_ranges(images, labels, sizes, shots=32, query=32)
    """

    task_type = "classification"

    def __init__(self, datasets, *, shots=32, query=32, seed=0):
        self.shots = check_positive_int("shots", shots)
        self.query = check_positive_int("query", query)
        self.seed = check_index(seed, "seed")
        self._data = []
        for t, (x, y) in enumerate(datasets):
            x, y = np.asarray(x, np.float32), np.asarray(y)
            if y.ndim != 1 or len(y) != len(x) or not len(y) or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(
                    f"datasets[{t}] must be (inputs [N, ...], integer labels [N]) with N >= 1, got "
                    f"inputs {x.shape} and labels {y.shape} of dtype {y.dtype}."
                )
            if self._data and x.shape[1:] != self._data[0][0].shape[1:]:
                raise ValueError(
                    f"datasets[{t}] has inputs of shape {x.shape[1:]}, datasets[0] {self._data[0][0].shape[1:]}: "
                    "all tasks must share the input shape."
                )
            _, local = np.unique(y, return_inverse=True)
            self._data.append((x, local.astype(np.int32)))
        if not self._data:
            raise ValueError("datasets is empty: expected at least one (inputs, labels) pair.")
        self.meta_batch = len(self._data)
        self.feature_shape = tuple(self._data[0][0].shape[1:])
        self.classes = tuple(int(y.max()) + 1 for _, y in self._data)
        self.ways = max(self.classes)

    @classmethod
    def from_label_ranges(cls, inputs, labels, sizes, **kwargs) -> "ManyShotTasks":
        """Split one labelled array into tasks by consecutive class-id ranges of the given sizes."""
        labels = np.asarray(labels)
        edges = np.cumsum([0] + [check_positive_int("sizes", s) for s in sizes])
        datasets = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            rows = (labels >= lo) & (labels < hi)
            datasets.append((np.asarray(inputs)[rows], labels[rows]))
        return cls(datasets, **kwargs)

    @property
    def specs(self) -> TaskBatch:
        m, f = self.meta_batch, self.feature_shape
        return TaskBatch(
            tf.TensorSpec((m, self.shots) + f, tf.float32), tf.TensorSpec((m, self.shots), tf.int32),
            tf.TensorSpec((m, self.query) + f, tf.float32), tf.TensorSpec((m, self.query), tf.int32),
        )

    def sample(self, index: int) -> TaskBatch:
        """Minibatch ``index`` of every task (numpy): row t from dataset t."""
        rng = np.random.default_rng([self.seed, check_index(index)])
        fields = [[], [], [], []]
        for x, y in self._data:
            n = len(y)
            rows = rng.choice(n, self.shots + self.query, replace=n < self.shots + self.query)
            s, q = rows[: self.shots], rows[self.shots :]
            for field, value in zip(fields, (x[s], y[s], x[q], y[q])):
                field.append(value)
        return TaskBatch(*(np.stack(f) for f in fields))

    def dataset(self, start: int = 0) -> tf.data.Dataset:
        """Endless deterministic dataset: ``sample(start), sample(start + 1), ...``."""
        return make_dataset(self.sample, self.specs, start)

    def __repr__(self) -> str:
        return f"ManyShotTasks(classes={list(self.classes)}, shots={self.shots}, query={self.query}, seed={self.seed})"
