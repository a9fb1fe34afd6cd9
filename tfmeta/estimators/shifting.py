"""Continual trajectory shifting: a meta-update after every inner step (Shin et al. 2021).

Shin et al. 2021, Algorithm 2: T task learners theta^(t) run their inner optimization
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
the variables are per replica (:mod:`tfmeta.core.replica_state`), each replica shifts and steps its
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
by inner steps (:mod:`tfmeta.core.functional`). ``task_specific="head"`` makes the adapted weights of
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

Size: about 75 lines of this docstring map Algorithm 2 onto tfmeta; the rest is one class whose
state (variables per replica, a round's counter, the task rows) and three task-loop hooks are one
step of the algorithm. Its samplers (:mod:`tfmeta.data.rounds`), driver
(:func:`tfmeta.training.recipes.continual_shifting`) and error analysis
(:mod:`tfmeta.estimators.shifting_analysis`) live elsewhere.

References:
    Shin, J., Lee, H. B., Gong, B., Hwang, S. J. "Large-Scale Meta-Learning with Continual
    Trajectory Shifting." ICML 2021. arXiv:2102.07215.
"""

from __future__ import annotations

import tensorflow as tf

from tfmeta.core import checks, functional, inner_optimizers, randomness
from tfmeta.core.replica_state import TaskRows, replica_variable
from tfmeta.data.rounds import RoundTasks
from tfmeta.estimators.base import Estimator, Flag, StepState, register

SHIFT_GRADS = ("reptile", "fomaml")
TASK_SPECIFIC = ("none", "head")

__all__ = ["Shifting"]


def _one_step(learner, meta, theta, state, x, y):
    """U_1: one inner-optimizer step of the adapted weights `theta` on the support loss (x, y).

    The weights that do not adapt are read from `meta.init` (shared by all tasks). Gradients
    are constants (first order), as in Shin et al. 2021, Algorithm 2.
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
    """Continual trajectory shifting (Shin et al. 2021, Algorithm 2).

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
        Flag("accurate", checks.parse_boolean, False,
             "shifting: recompute U_k(phi) from scratch each meta-update and report approx_error"),
        Flag("reset_state", checks.parse_boolean, False, "shifting: reset the inner optimizer state every repetition"),
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
        linearity_metrics: bool = False,
    ):
        super().__init__(parallel_tasks=parallel_tasks, linearity_metrics=linearity_metrics)
        self.horizon = checks.integer("horizon", horizon, 1)
        self.repeats = checks.integer("repeats", repeats, 1)
        self.shift_grad = checks.choice("shift_grad", shift_grad, SHIFT_GRADS)
        self.task_specific = checks.choice("task_specific", task_specific, TASK_SPECIFIC)
        self.accurate = checks.boolean("accurate", accurate)
        self.reset_state = checks.boolean("reset_state", reset_state)
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
        (:mod:`tfmeta.core.replica_state`); a checkpoint stores every replica's rows in task order and
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
        from tfmeta.core import mamlpp

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

        Reptile: phi - theta on the shared adapted weights (Shin et al. 2021, Sec. 3.1); first-order
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

    # -- one step k of Algorithm 2: the task loop's hooks --------------------------------------------
    def prepare_sampler(self, sampler):
        """Task learner t keeps task t for a round: every batch of a round is the round's first."""
        return RoundTasks(sampler, self.horizon * self.repeats)

    def begin_step(self, learner, meta_values, tasks) -> StepState:
        """Shift (Eq. 1: theta += phi_now - phi_before) or reset to phi: the rows of this step.

        The rows are every task learner's theta_{k-1} + Delta_{k-1} and inner-optimizer state
        (plus, with ``accurate``, the repetition's starting point); the outputs are the new theta
        and state of every task learner, stored by :meth:`end_step`.
        """
        self.build(learner)
        meta = learner.unflatten(meta_values)
        dtype = learner.dtype
        adapted = learner.fmodel.adapted
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
        start_theta0, start_state0 = [], []
        if self.accurate:
            start_theta0 = [
                tf.cond(rep_start, lambda t=t: t, lambda v=v: v.read_value())
                for t, v in zip(theta0, self.start_theta)
            ]
            start_state0 = [
                tf.cond(rep_start, lambda s=s: s, lambda v=v: v.read_value())
                for s, v in zip(state0, self.start_state)
            ]
        shared = {"meta": meta, "phi": phi, "k": k, "dtype": dtype, "count": (len(theta0), len(state0)),
                  "starts": (start_theta0, start_state0)}
        return StepState(shared=shared, rows=theta0 + state0 + start_theta0 + start_state0,
                         outputs=theta0 + state0)

    def task_step(self, learner, meta_values, task, shared, row):
        """One inner step of one task learner from its row; MetaGrad at the new theta_k."""
        meta, phi, k, dtype = shared["meta"], shared["phi"], shared["k"], shared["dtype"]
        n_theta, n_state = shared["count"]
        theta = row[:n_theta]
        state = row[n_theta:n_theta + n_state]
        start_theta = row[n_theta + n_state:2 * n_theta + n_state]
        start_state = row[2 * n_theta + n_state:]
        theta, state = _one_step(learner, meta, theta, self._pack(state),
                                 task.support_x, task.support_y)
        used = theta
        extra = {"horizon": tf.cast(k + 1, dtype)}
        if self.accurate:
            start = [p if not spec else s for p, s, spec in zip(phi, start_theta, self._specific)]
            exact, _ = _steps(learner, meta, start, self._pack(start_state), k + 1,
                              task.support_x, task.support_y)
            sq = [tf.reduce_sum(tf.square(e - t)) for e, t, spec in zip(exact, theta, self._specific)
                  if not spec]
            extra["approx_error"] = tf.sqrt(tf.add_n(sq))
            used = exact
        loss, grads, metrics = self._meta_grad(learner, meta, used, task)
        return loss, grads, dict(metrics, **extra), list(theta) + tf.nest.flatten(state)

    def end_step(self, learner, meta_values, state, outputs, after) -> None:
        """Store the task learners' new rows, the repetition's start, phi_now; advance the counter."""
        n_theta, n_state = state.shared["count"]
        start_theta0, start_state0 = state.shared["starts"]
        with tf.control_dependencies([after]):  # after the task loop (and so after the check)
            for v, x in zip(self.theta + self.opt_state, outputs):
                v.assign(x)
            if self.accurate:
                for v, x in zip(self.start_theta + self.start_state, start_theta0 + start_state0):
                    v.assign(x)
            for v, p in zip(self.phi_before, state.shared["phi"]):
                v.assign(p)
            self.calls.assign_add(1)

    def _pack(self, leaves):
        return tf.nest.pack_sequence_as(self._structure, list(leaves))
