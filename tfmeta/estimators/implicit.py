"""iMAML: implicit meta-gradients of a proximal inner problem (Rajeswaran et al. 2019).

For each task the adapted weights are (approximately) the minimiser of the proximal objective

    G(phi, theta) = L_train(phi) + sum_k lambda_k / 2 ||phi_k - theta_k||^2        (Eq. 3-4)

(one lambda for all adapted weights, as in the paper, or one per adapted variable, or learned),
found by an inner solver that is **never differentiated through**: no tape is open across it, so
nothing of its trajectory is kept and memory does not grow with the number of inner steps.

- ``inner_solver="gd"``: the learner's inner optimizer for T = ``learner.inner_steps`` steps on G
  from theta (`tfmeta.core.inner_loop.run` with ``second_order=False``). An inner optimizer with weight
  decay omega (``momentum(weight_decay=omega)``, Kim et al. 2020, Eq. 5) converges to
  the zero of grad_phi G + omega phi, the minimiser of G_omega = G + omega/2 ||phi||^2; the
  implicit system below is then that of G_omega (see "Weight decay").
- ``inner_solver="hessian-free"``: Newton-CG on G (Sec. 4 and Rajeswaran et al. 2019, Appendix F.2): CG for the
  Newton direction with Hessian-vector products of G, backtracking line search on G, repeated
  ``newton_steps`` times (default T; the paper uses 3), ``newton_cg_steps`` CG steps each.

The meta-gradient is then the implicit one of Lemma 1 (Eq. 6) and Algorithm 2: with
v = grad_phi L_test(phi) and H = grad^2_phi L_train(phi) (Hessian-vector products only),

    (I + H / lambda) g = v,      g = the meta-gradient of theta        (scalar lambda)

solved by at most ``cg_steps`` steps of conjugate gradient from g = 0. Written as the root
condition F(phi, theta) = grad_phi G = 0, this is :func:`tfmeta.implicit.root_vjp`: CG on
(H + Lambda) w = v with preconditioner Lambda^-1, and g = Lambda w. For a scalar lambda those CG
iterates are exactly CG on the paper's system (a scalar preconditioner changes nothing); for
per-variable lambdas it is CG on the symmetric I + Lambda^-1/2 H Lambda^-1/2. ``cg_steps=0`` skips
CG and uses g = v, first-order MAML at the proximal solution (Appendix A). The official code
solves a differently damped system, ((1 + c) I + H / (lambda + d)) x = v with c = 1 and d = 10 by
default, which is not Eq. 6; this estimator follows the paper (see docs/implicit.md).

Weight decay: with the ``gd`` solver and an inner optimizer whose ``weight_decay`` omega > 0, the
root condition is F = grad_phi L_train + Lambda (phi - theta) + omega phi = 0, so dF/dphi =
H + (Lambda + omega I) and dF/dtheta = -Lambda, and Lemma 1 becomes

    ((1 + omega / lambda) I + H / lambda) g = v                          (scalar lambda)

(CG preconditioned by (Lambda + omega)^-1). ``cg_steps=0`` still uses g = v. The hessian-free
solver minimises G itself (it ignores the learner's optimizer), so no decay enters there.

Weights that ``adapt`` leaves out (e.g. the body under ANIL) are shared across tasks: they get the
direct query-loss gradient plus the implicit term of their effect on phi (the same root
condition differentiated in them), so the meta-gradient is the derivative of
L_test(phi*(theta)) in every meta-parameter. A learned lambda (:class:`LearnedLambda`, passed as
the learner's ``meta_network``) gets d L_test / d log lambda_k = -<g_k, phi_k - theta_k> in the
same way. Meta-SGD rates do not exist here (there is no differentiated learning rate) and other
meta-networks are not supported.

Metrics: ``inner_grad_norm`` = ||grad_phi G(phi)|| (G_omega with weight decay) at the returned phi (how far from the proximal
minimiser: the delta of Algorithm 2), and, when ``cg_steps > 0``, ``cg_residual`` =
||v - (I + H Lambda^-1) g|| / ||v|| (the delta' of Algorithm 2, relative).

Example:
    >>> est = tfmeta.estimators.get("implicit", lam=2.0, cg_steps=5, inner_solver="hessian-free")
    >>> loss, grads, metrics = est.meta_gradient(learner, task_batch)
    CLI: tfmeta train --estimator implicit --lam 2 --cg-steps 5 --inner-solver hessian-free

References:
    Rajeswaran, A., Finn, C., Kakade, S. M., Levine, S. "Meta-Learning with Implicit Gradients."
    NeurIPS 2019. arXiv:1909.04630.

    Kim, J.-H., Park, J., Choi, Y. "Multi-step Estimation for Gradient-based Meta-learning."
    2020. arXiv:2004.05439.
"""

from __future__ import annotations

from typing import Sequence

from tfmeta.core import _backend  # noqa: F401

import keras
import numpy as np
import tensorflow as tf

from tfmeta import implicit
from tfmeta.core import checks, inner_loop
from tfmeta.estimators.base import Estimator, Flag, register, task_result

INNER_SOLVERS = ("gd", "hessian-free")
#: relative residual at which the meta-gradient CG stops early when no `cg_tol` is given.
_EARLY_STOP = 1e-10


def _positive(name: str, value) -> float:
    return checks.number(name, value, above=0.0)


def _count(name: str, value, minimum: int) -> int:
    return checks.integer(name, value, minimum)


class LearnedLambda(keras.layers.Layer):
    """Learned proximal strengths lambda = exp(log_lambda) for the ``implicit`` estimator.

    Pass it as the learner's ``meta_network``: its one weight, ``log_lambda`` of shape [size],
    is then a meta-parameter trained with the initialization (the paper's remark after Eq. 3:
    "like alpha, the regularization strength lambda may also be learned"). size 1: one lambda for
    all adapted weights; size = number of adapted variables: one each.

    Example:
        >>> lam = LearnedLambda(initial=2.0)
        >>> learner = MetaLearner(model, meta_network=lam)
        >>> trainer = MetaTrainer(learner, "implicit")      # theta and log lambda are meta-learned
        >>> lam.lam                                         # current lambda values (numpy)
    """

    def __init__(self, initial=1.0, size: int = 1, **kwargs):
        size = _count("size", size, 1)
        values = list(initial) if isinstance(initial, (list, tuple, np.ndarray)) else [initial] * size
        if len(values) != size:
            raise ValueError(f"initial={initial!r} is not valid: expected one number or {size} numbers.")
        for v in values:
            _positive("initial", v)
        super().__init__(**kwargs)
        self.size = size
        self.log_lambda = self.add_weight(
            shape=(size,),
            initializer=keras.initializers.Constant(np.log(np.asarray(values, dtype="float64"))),
            name="log_lambda",
            trainable=True,
        )
        self.built = True

    def call(self, inputs=None):
        return keras.ops.exp(self.log_lambda)

    @property
    def lam(self) -> np.ndarray:
        """Current lambda values."""
        return np.exp(np.asarray(self.log_lambda.numpy(), dtype="float64"))


@register
class Implicit(Estimator):
    """Implicit MAML (Rajeswaran et al.; see module docstring).

    Args:
        lam: proximal strength lambda > 0 (Eq. 3), or one per adapted variable (a sequence).
            Default 1.0. With a :class:`LearnedLambda` meta-network, leave it out.
        cg_steps: conjugate-gradient steps of the meta-gradient solve (>= 0; 0: first order).
        inner_solver: "gd" (learner's inner optimizer, T steps) or "hessian-free" (Newton-CG).
        cg_tol: None (default): run ``cg_steps`` steps, the paper's fixed budget (stop earlier only
            at a relative residual of 1e-10); warn only if CG meets non-positive curvature
            (I + H/lambda not positive definite: raise lam). A number: stop at that relative
            residual, and warn with the residual when ``cg_steps`` do not reach it.
        newton_steps: Newton iterations of "hessian-free" (default: learner.inner_steps).
        newton_cg_steps: CG steps per Newton direction (paper: 5).
        parallel_tasks: see :class:`~tfmeta.estimators.base.Estimator`.
    """

    name = "implicit"
    second_order = False
    flags = (
        Flag("lam", float, 1.0, "implicit: proximal regularization strength lambda > 0 (Eq. 3)"),
        Flag("cg_steps", int, 5, "implicit: conjugate-gradient steps for the meta-gradient (0: first order)"),
        Flag("inner_solver", str, "gd", f"implicit: inner solver, one of {list(INNER_SOLVERS)}"),
        Flag("newton_steps", int, None,
             "implicit: Newton-CG iterations of --inner-solver hessian-free (None: the inner steps "
             "T; Rajeswaran et al. 2019, Appendix F.2, use 3)"),
    )

    def __init__(
        self,
        lam: float | Sequence[float] | None = None,
        cg_steps: int = 5,
        inner_solver: str = "gd",
        *,
        cg_tol: float | None = None,
        newton_steps: int | None = None,
        newton_cg_steps: int = 5,
        parallel_tasks: int = 2,
        linearity_metrics: bool = False,
    ):
        super().__init__(parallel_tasks=parallel_tasks, linearity_metrics=linearity_metrics)
        self._lam_given = lam is not None
        if lam is None:
            lam = 1.0
        if isinstance(lam, (list, tuple, np.ndarray)):
            if len(lam) == 0:
                raise ValueError("lam=[] is not valid: expected a number > 0 or one per adapted variable.")
            self.lam = tuple(_positive("lam", float(v) if isinstance(v, np.floating) else v) for v in lam)
        else:
            self.lam = _positive("lam", lam)
        self.cg_steps = _count("cg_steps", cg_steps, 0)
        if inner_solver not in INNER_SOLVERS:
            raise ValueError(
                f"inner_solver={inner_solver!r} is not valid: expected one of {list(INNER_SOLVERS)}."
            )
        self.inner_solver = inner_solver
        self.cg_tol = None if cg_tol is None else _positive("cg_tol", cg_tol)
        self.newton_steps = None if newton_steps is None else _count("newton_steps", newton_steps, 0)
        self.newton_cg_steps = _count("newton_cg_steps", newton_cg_steps, 1)

    # -- setup -----------------------------------------------------------------------------------
    def check(self, learner):
        from tfmeta.core import mamlpp

        mamlpp.refuse(learner, self.name)
        if learner.lr_variables:
            raise ValueError(
                "meta_sgd=True is not supported by estimator='implicit': iMAML does not "
                "differentiate the inner solver, so learning rates get no meta-gradient. Use "
                "estimator='maml', or learn lambda instead (LearnedLambda as meta_network)."
            )
        net = learner.meta_network
        adapted = len(learner.fmodel.adapted)
        if net is not None and not isinstance(net, LearnedLambda):
            raise ValueError(
                f"meta_network={net.name!r} is not supported by estimator='implicit': the only "
                "meta-network it trains is tfmeta.estimators.implicit.LearnedLambda (a learned "
                "proximal strength). Use estimator='maml' for other meta-networks."
            )
        if isinstance(net, LearnedLambda):
            if self._lam_given:
                raise ValueError(
                    f"lam={self.lam!r} was given with a LearnedLambda meta_network: lambda is the "
                    "learned one; leave lam out (set the start value with LearnedLambda(initial=...))."
                )
            if net.size not in (1, adapted):
                raise ValueError(
                    f"LearnedLambda(size={net.size}) does not fit: expected size 1 or one per "
                    f"adapted variable ({adapted})."
                )
        if isinstance(self.lam, tuple) and len(self.lam) != adapted:
            raise ValueError(
                f"lam has {len(self.lam)} values: expected one number or one per adapted variable "
                f"({adapted}: {[learner.fmodel.paths[i] for i in learner.fmodel.adapted]})."
            )

    def metric_names(self, learner):
        extra = ("inner_grad_norm",) + (("cg_residual",) if self.cg_steps > 0 else ())
        return tuple(learner.metric_names) + extra

    def _lambdas(self, learner, net: list) -> list:
        """lambda_k for each adapted variable, as tensors of the learner's dtype."""
        count = len(learner.fmodel.adapted)
        dtype = learner.dtype
        if isinstance(learner.meta_network, LearnedLambda):
            lam = tf.exp(tf.cast(net[0], dtype))
            return [lam[0]] * count if lam.shape[0] == 1 else [lam[k] for k in range(count)]
        if isinstance(self.lam, tuple):
            return [tf.constant(v, dtype) for v in self.lam]
        return [tf.constant(self.lam, dtype)] * count

    def _decay(self, learner) -> float:
        """omega: the weight decay of the ``gd`` solver's optimizer (0 for hessian-free)."""
        if self.inner_solver != "gd":
            return 0.0
        return float(getattr(learner.inner_optimizer, "weight_decay", 0.0))

    def _objective(self, learner, meta, task, decay: float = 0.0):
        """G(adapted, theta, net): the task's proximal inner objective (Eq. 4), plus
        decay/2 ||adapted||^2 when `decay` > 0 (the problem the ``gd`` solver solves)."""
        index = learner.fmodel.adapted

        def objective(adapted, theta, net):
            theta, net = list(theta), list(net)
            lams = self._lambdas(learner, net)
            params = learner.fmodel.merge(theta, adapted)
            loss = learner.inner_loss(params, meta._replace(init=theta, net=net),
                                      task.support_x, task.support_y)
            prox = tf.add_n([
                0.5 * lam * tf.reduce_sum(tf.square(phi - theta[i]))
                for lam, phi, i in zip(lams, adapted, index)
            ])
            if decay > 0:
                prox += 0.5 * decay * tf.add_n([tf.reduce_sum(tf.square(phi)) for phi in adapted])
            return loss + tf.cast(prox, loss.dtype)

        return objective

    # -- the inner problem -----------------------------------------------------------------------
    def evaluation_params(self, learner, meta, task):
        """Held-out tasks adapt as in meta-training: the proximal inner problem (Eq. 4)."""
        return self.adapted_params(learner, meta, task)

    def adapted_params(self, learner, meta, task, observer=None):
        """phi: the inner solver's approximate minimiser of G (Eq. 4), all parameters (merged).

        Constants (no gradient flows to meta): the meta-gradient comes from :meth:`task_gradient`.
        An observer sees the adapted subset and the gradients of G along the solver's steps.
        """
        self.check(learner)
        theta = [tf.stop_gradient(t) for t in meta.init]
        net = [tf.stop_gradient(t) for t in meta.net]
        meta = meta._replace(init=theta, net=net)
        objective = self._objective(learner, meta, task)
        start = [theta[i] for i in learner.fmodel.adapted]

        def loss_fn(adapted):
            return objective(adapted, theta, net)

        if self.inner_solver == "gd":
            result = inner_loop.run(
                loss_fn, start, learner.inner_optimizer, learner.inner_steps,
                second_order=False, unroll=learner.unroll, observer=observer,
            )
        else:
            steps = learner.inner_steps if self.newton_steps is None else self.newton_steps
            result = implicit.newton_cg(
                loss_fn, start, steps=steps, cg_steps=self.newton_cg_steps, observer=observer,
            )
        adapted, acc = result if observer is not None else (result, None)
        params = learner.fmodel.merge(theta, [tf.stop_gradient(p) for p in adapted])
        return (params, acc) if observer is not None else params

    # -- the meta-gradient -----------------------------------------------------------------------
    def _solve(self, lams: list, decay: float = 0.0):
        """Algorithm 2, step 5, as the linear solve of root_vjp: (H + Lambda + omega I) w = v."""
        inverse = [1.0 / lam for lam in lams]
        damped = [1.0 / (lam + decay) for lam in lams] if decay > 0 else inverse

        def scale(r, factors):
            return [ri * tf.cast(s, ri.dtype) for ri, s in zip(r, factors)]

        def solve(matvec, b):
            if self.cg_steps == 0:  # CG not invoked: g = Lambda w = v (Appendix A)
                return scale(b, inverse), None
            return implicit.conjugate_gradient(
                matvec, b,
                max_steps=self.cg_steps,
                tol=_EARLY_STOP if self.cg_tol is None else self.cg_tol,
                preconditioner=lambda r: scale(r, damped),
                warn="curvature" if self.cg_tol is None else True,
                name="implicit meta-gradient (I + H/lambda) g = v",
            )

        return solve

    def task_gradient(self, learner, meta_values, task, observer=None):
        self.check(learner)
        meta = learner.unflatten(meta_values)
        index = learner.fmodel.adapted
        theta = [tf.stop_gradient(t) for t in meta.init]
        net = [tf.stop_gradient(t) for t in meta.net]
        meta = meta._replace(init=theta, net=net)
        params, seen = self.observed_params(learner, meta, task, observer)
        phi = [tf.stop_gradient(params[i]) for i in index]

        # v = grad_phi L_test(phi) (Algorithm 2, step 4) and the direct partials in theta and net.
        with tf.GradientTape() as tape:
            tape.watch(phi)
            tape.watch(theta)
            tape.watch(net)
            loss, metrics = learner.outer_loss(
                learner.fmodel.merge(theta, phi), meta._replace(init=theta, net=net),
                task.query_x, task.query_y,
            )
        v, direct_theta, direct_net = tape.gradient(
            loss, (phi, theta, net), unconnected_gradients=tf.UnconnectedGradients.ZERO
        )

        # The implicit part: F(phi; theta, net) = grad_phi G = 0 differentiated (Lemma 1).
        decay = self._decay(learner)
        optimality = implicit.gradient_optimality(self._objective(learner, meta, task, decay))
        (implicit_theta, implicit_net), info = implicit.root_vjp(
            optimality, phi, (theta, net), v, solve=self._solve(self._lambdas(learner, net), decay),
        )
        grads = [a + b for a, b in zip(direct_theta, implicit_theta)]
        grads += [a + b for a, b in zip(direct_net, implicit_net)]
        metrics = dict(metrics)
        metrics["inner_grad_norm"] = info.optimality_norm
        if self.cg_steps > 0:
            metrics["cg_residual"] = info.solve.relative_residual
        return task_result(loss, grads, metrics, seen)
