"""Newton-CG minimisation and the implicit differentiation of roots (any solver's fixed point).

- :func:`newton_cg`: the Hessian-free (truncated Newton-CG) minimiser of Rajeswaran et al. 2019
  (Sec. 4, Appendix F.2): CG on the Newton system with Hessian-vector products, backtracking line
  search.
- :func:`root_vjp`: the implicit function theorem. If x*(a) solves F(x*, a) = 0 then
  d x*/d a = -(dF/dx)^{-1} dF/da, so ``u^T dx*/da = -(dF/da)^T w`` with ``(dF/dx)^T w = u``,
  solved by CG (Rajeswaran et al. 2019, Lemma 1 / Eq. 6 is the case F = grad of the proximal
  objective). Only the solution is used, never the path that reached it.
- :func:`custom_root`: wraps any solver so that a `tf.GradientTape` differentiates its solution
  by :func:`root_vjp` (a `tf.custom_gradient`).

The linear algebra underneath (CG, Hessian-vector products) is :mod:`tfmeta.implicit.linear`.

Example (learn a ridge strength by implicit differentiation of the validation loss)::

    def ridge(w, log_alpha):                       # inner objective G(w, alpha)
        return mse(w, x_train, y_train) + tf.exp(log_alpha) * tf.reduce_sum(tf.square(w[0]))

    @custom_root(gradient_optimality(ridge))       # F(w, a) = dG/dw = 0 at the solution
    def fit(init, log_alpha):
        return newton_cg(lambda w: ridge(w, log_alpha), init, steps=2, cg_steps=50)[0]

    with tf.GradientTape() as tape:
        tape.watch(log_alpha)
        w = fit([tf.zeros([d])], log_alpha)
        val = mse(w, x_val, y_val)
    hypergradient = tape.gradient(val, log_alpha)

References:
    Rajeswaran, A., Finn, C., Kakade, S. M., Levine, S. "Meta-Learning with Implicit Gradients."
    NeurIPS 2019. arXiv:1909.04630.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf

from tfmeta.core import checks

from tfmeta.implicit.linear import (
    _ZERO, _as_list, _axpy, _check_nonnegative, _check_steps, _dot, _norm, check_finite,
    conjugate_gradient, hessian_operator,
)


class RootInfo(NamedTuple):
    """What :func:`root_vjp` reports: ||F(x, args)|| at the given solution (how far it is from a
    root: the delta of Rajeswaran et al. 2019, Algorithm 2), and the linear solve's :class:`CGInfo` (or
    whatever the `solve` given returned)."""

    optimality_norm: tf.Tensor
    solve: object



# -- Hessian-free (Newton-CG) minimisation ------------------------------------------------------
def newton_cg(
    objective_fn: Callable[[list], tf.Tensor],
    x0,
    *,
    steps: int = 3,
    cg_steps: int = 5,
    cg_tol: float = 1e-10,
    line_search_steps: int = 20,
    armijo: float = 1e-4,
    observer=None,
):
    """Minimise `objective_fn` by Hessian-free (truncated Newton-CG) steps with a line search.

    The inner solver of Sec. 4 and Rajeswaran et al. 2019, Appendix F.2 ("Hessian-free or
    Newton-CG ... CG for the search direction, line search for the step size, repeated 3 times"),
    as Nocedal & Wright Alg. 7.1: at x, CG (at most `cg_steps`, from 0) on H d = -grad with
    Hessian-vector products; if CG meets non-positive curvature on its first step, d = -grad.
    Then backtracking from t = 1, halving until f(x + t d) <= f(x) + armijo * t * grad^T d (Armijo,
    up to 16 ulps of f: near the minimum the decrease is below rounding and Newton steps are
    taken whole); if `line_search_steps` halvings do not suffice, the step is skipped (t = 0). Nothing is
    differentiated through: the iterations run in a `tf.while_loop` and keep no trajectory.

    Args:
        objective_fn: ``fn(list of tensors) -> scalar``.
        x0: starting point (tensor or list of tensors).
        steps: Newton iterations (>= 0).
        cg_steps: CG iterations per Newton direction (>= 1).
        cg_tol: relative residual at which a direction's CG stops early.
        line_search_steps: most halvings of the step.
        armijo: sufficient-decrease constant in (0, 1).
        observer: optional :class:`tfmeta.core.inner_loop.Observer`, updated after every Newton step
            with (acc, step, x, grad, new_x).

    Returns:
        The last iterate (a list), or ``(iterate, accumulator)`` with an observer.

    Example:
        >>> x = newton_cg(lambda p: tf.reduce_sum(tf.exp(p[0]) - 2.0 * p[0]), [tf.zeros([3])],
        ...               steps=8)[0]           # -> log 2 in every coordinate
    """
    _check_steps("steps", steps)
    checks.integer("cg_steps", cg_steps, 1)
    _check_steps("line_search_steps", line_search_steps)
    _check_nonnegative("cg_tol", cg_tol)
    if not 0.0 < float(armijo) < 1.0:
        raise ValueError(f"armijo={armijo!r} is not valid: expected a number in (0, 1).")
    x = [tf.stop_gradient(t) for t in _as_list(x0)]
    acc = observer.init(x) if observer is not None else ()

    def iteration(k, x, acc):
        matvec, f, g = hessian_operator(objective_fn, x)
        neg_g = [-t for t in g]
        d, info = conjugate_gradient(matvec, neg_g, max_steps=cg_steps, tol=cg_tol, warn=False)
        d = [tf.where(info.steps > 0, di, gi) for di, gi in zip(d, neg_g)]
        slope = _dot(g, d)
        descent = slope < 0
        d = [tf.where(descent, di, gi) for di, gi in zip(d, neg_g)]
        slope = tf.where(descent, slope, -_dot(g, g))

        def ls_cond(j, t, accepted):
            return tf.logical_and(j < line_search_steps + 1, tf.logical_not(accepted))

        # Values that differ by rounding only (near the minimum) count as no increase.
        roundoff = 16.0 * float(np.finfo(f.dtype.as_numpy_dtype).eps) * (tf.abs(f) + 1.0)

        def ls_body(j, t, accepted):
            trial = objective_fn(_axpy(t, d, x))
            ok = trial <= f + armijo * t * slope + roundoff  # False for NaN
            return j + 1, tf.where(ok, t, 0.5 * t), ok

        one = tf.ones([], f.dtype)
        _, t, accepted = tf.while_loop(ls_cond, ls_body, (tf.constant(0), one, tf.constant(False)),
                                       parallel_iterations=1)
        t = tf.where(accepted, t, tf.zeros_like(t))
        new_x = [tf.stop_gradient(v) for v in _axpy(t, d, x)]
        if observer is not None:
            acc = observer.update(acc, k, x, g, new_x)
        return k + 1, new_x, acc

    _, x, acc = tf.while_loop(lambda k, *_: k < steps, iteration, (tf.constant(0), x, acc),
                              parallel_iterations=1)
    return (x, acc) if observer is not None else x


# -- implicit differentiation of roots ----------------------------------------------------------
def gradient_optimality(objective_fn: Callable) -> Callable:
    """The optimality condition of a minimisation: F(x, *args) = d objective(x, *args) / dx.

    Its root is a stationary point; its Jacobian in x is the Hessian (symmetric), so the linear
    system of :func:`root_vjp` is the one of Rajeswaran et al. 2019, Lemma 1.

    Example:
        >>> F = gradient_optimality(lambda x, a: tf.reduce_sum(tf.square(x[0] - a)))
        >>> F([tf.constant(3.0)], tf.constant(1.0))   # [4.0]
    """

    def optimality(x, *args):
        x = list(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = objective_fn(x, *args)
        return tape.gradient(value, x, unconnected_gradients=_ZERO)

    return optimality


def default_solve(matvec, b):
    """CG with at most 100 steps to relative residual 1e-8 (the default of :func:`root_vjp`)."""
    return conjugate_gradient(matvec, b, max_steps=100, tol=1e-8, name="root_vjp")


def root_vjp(
    optimality_fn: Callable,
    solution,
    args,
    cotangent,
    *,
    solve: Callable | None = None,
    check: bool = True,
):
    """Vector-Jacobian product of a root x*(args) of F(x, *args) = 0, by the implicit function theorem.

    dx*/dargs = -(dF/dx)^-1 dF/dargs, so ``u^T dx*/dargs = -(dF/dargs)^T w`` where
    ``(dF/dx)^T w = u``. For F = grad_phi of the proximal objective of Eq. 4 of
    Rajeswaran et al. 2019, dF/dx = H + lambda I and dF/dtheta = -lambda I: this is Lemma 1
    (Eq. 6), and `solve` is step 5 of Algorithm 2. F, its products with dF/dx and dF/dargs are
    computed at `solution` only (one forward and backward pass, reused by every product), so
    nothing depends on how the solution was found.

    Args:
        optimality_fn: ``F(x, *args) -> list`` aligned with x (e.g. :func:`gradient_optimality`).
        solution: x (list of tensors), treated as a root.
        args: a tuple of the remaining arguments of F (tensors or nests of tensors).
        cotangent: u, aligned with `solution` (e.g. the gradient of an outer loss at x).
        solve: ``fn(matvec, b) -> (w, info)`` solving (dF/dx)^T w = b with matvec(v) = (dF/dx)^T v
            (default :func:`default_solve`: CG, which needs dF/dx symmetric positive definite).
        check: raise InvalidArgumentError on non-finite products.

    Returns:
        ``(grads, info)``: grads with the structure of `args` (zeros where F does not depend on
        an argument) and a :class:`RootInfo`.

    Example:
        >>> F = gradient_optimality(lambda x, a: tf.reduce_sum(tf.square(x[0] - a)))   # x* = a
        >>> grads, _ = root_vjp(F, [tf.constant(1.0)], (tf.constant(1.0),), [tf.constant(5.0)])
        >>> grads[0]   # 5.0: d x*/d a = 1
    """
    solution = [tf.stop_gradient(t) for t in _as_list(solution)]
    flat = [tf.stop_gradient(tf.convert_to_tensor(a)) for a in tf.nest.flatten(args)]
    args = tf.nest.pack_sequence_as(args, flat)
    cotangent = _as_list(cotangent)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(solution)
        tape.watch(flat)
        residual = list(optimality_fn(solution, *args))
    if len(residual) != len(solution):
        raise ValueError(
            f"optimality_fn returned {len(residual)} tensors for a solution of {len(solution)}: "
            "expected one per solution tensor."
        )

    def matvec(vector):
        out = tape.gradient(residual, solution, output_gradients=_as_list(vector),
                            unconnected_gradients=_ZERO)
        return check_finite(out, "root_vjp") if check else out

    w, info = (solve or default_solve)(matvec, cotangent)
    w = _as_list(w)
    grads = tape.gradient(residual, flat, output_gradients=w, unconnected_gradients=_ZERO)
    if check:
        grads = check_finite(grads, "root_vjp (d optimality / d args)")
    grads = [-g for g in grads]
    return tf.nest.pack_sequence_as(args, grads), RootInfo(_norm(residual), info)


def custom_root(optimality_fn: Callable, *, solve: Callable | None = None):
    """Decorator: give ``solver(init, *args) -> solution`` implicit gradients in its args.

    The wrapped function runs `solver` with no tape watching it (its iterations are never
    differentiated, so they keep no trajectory) and, under a `tf.GradientTape`, differentiates the
    returned solution by :func:`root_vjp` of `optimality_fn` (a `tf.custom_gradient`): the same
    implicit gradient as the iMAML estimator, for any bilevel problem. `init` receives no gradient.
    Variables read inside the solver or `optimality_fn` are constants: pass what should receive a
    gradient as an argument.

    Args:
        optimality_fn: ``F(x, *args) -> list``, zero at the solution (e.g.
            ``gradient_optimality(objective)``).
        solve: the linear solve of :func:`root_vjp`.

    Example:
        >>> @custom_root(gradient_optimality(lambda w, a: inner_objective(w, a)))
        ... def fit(init, a):
        ...     return newton_cg(lambda w: inner_objective(w, a), init, steps=3, cg_steps=20)
        >>> with tf.GradientTape() as tape:
        ...     tape.watch(a)
        ...     w = fit([tf.zeros([5])], a)
        ...     outer = validation_loss(w)
        >>> tape.gradient(outer, a)
    """

    def decorator(solver: Callable) -> Callable:
        def wrapped(init, *args):
            init = [tf.stop_gradient(t) for t in _as_list(init)]
            flat_args = [tf.convert_to_tensor(a) for a in tf.nest.flatten(args)]

            @tf.custom_gradient
            def root(*flat):
                stopped = tf.nest.pack_sequence_as(args, [tf.stop_gradient(t) for t in flat])
                solution = [tf.identity(t) for t in _as_list(solver(init, *stopped))]

                def grad(*upstream, variables=None):
                    upstream = [tf.zeros_like(s) if u is None else u
                                for u, s in zip(upstream, solution)]
                    grads, _ = root_vjp(optimality_fn, solution, stopped, upstream, solve=solve)
                    flat_grads = tf.nest.flatten(grads)
                    if variables:
                        return flat_grads, [None] * len(variables)
                    return flat_grads

                return solution, grad

            return list(root(*flat_args))

        return wrapped

    return decorator
