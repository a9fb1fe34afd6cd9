"""Implicit differentiation: conjugate gradient, Hessian-vector products, roots with custom gradients.

The reusable piece behind the ``implicit`` estimator (iMAML, 002_6afe990328515e50.txt), written
for any bilevel problem, in the style of jaxopt. Everything works on **lists of tensors** (one per
variable) inside or outside `tf.function`, and never forms a Hessian:

- :func:`conjugate_gradient`: (preconditioned) CG for ``A x = b`` with A symmetric positive
  definite and given only as ``matvec(v) -> A v``, as a `tf.while_loop` with a step cap and a
  residual tolerance (Eq. 7 of 002_...: CG minimises w^T A w / 2 - w^T b). It reports the residual
  and the steps taken, warns (:class:`ConvergenceWarning`, naming the residual) when it stops
  unconverged, and stops at non-positive curvature (A not positive definite).
- :func:`hvp` and :func:`hessian_operator`: Hessian-vector products by reverse-over-reverse
  differentiation ("double tape"; Appendix C of 002_...: time and memory within a constant factor
  of one gradient). Non-finite products raise ``tf.errors.InvalidArgumentError`` with a message.
- :func:`newton_cg`: the Hessian-free (truncated Newton-CG) minimiser of Sec. 4 and Appendix F.2
  of 002_...: CG on the Newton system with Hessian-vector products, backtracking line search.
- :func:`root_vjp`: the implicit function theorem. If x*(a) solves F(x*, a) = 0 then
  d x*/d a = -(dF/dx)^{-1} dF/da, so ``u^T dx*/da = -(dF/da)^T w`` with ``(dF/dx)^T w = u``,
  solved by CG (Lemma 1 / Eq. 6 of 002_... is the case F = grad of the proximal objective).
  Only the solution is used, never the path that reached it, so memory does not depend on how
  many steps the solver took.
- :func:`custom_root`: wraps any solver so that a `tf.GradientTape` differentiates its solution
  by :func:`root_vjp` (a `tf.custom_gradient`), e.g. to learn hyper-parameters by gradient
  descent on a validation loss (examples/hyperparameter_implicit.py).

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
"""

from __future__ import annotations

import numbers
import warnings
from typing import Callable, NamedTuple, Sequence

import numpy as np
import tensorflow as tf

Tensors = Sequence[tf.Tensor]
_ZERO = tf.UnconnectedGradients.ZERO
_NON_FINITE = (
    "tfmeta.implicit: non-finite Hessian-vector product (NaN or Inf) in {where}. The loss is not "
    "twice differentiable here or has diverged: lower the inner learning rate, raise lam, or "
    "check the inputs for NaN/Inf."
)


class ConvergenceWarning(UserWarning):
    """An iterative solve of :mod:`tfmeta.implicit` stopped before reaching its tolerance."""


class CGInfo(NamedTuple):
    """What :func:`conjugate_gradient` reports (scalar tensors).

    residual_norm: ||b - A x|| (the recursively updated residual of CG).
    relative_residual: residual_norm / ||b|| (0 when b = 0).
    steps: CG iterations completed (each costs one ``matvec``).
    converged: whether residual_norm reached max(tol * ||b||, atol).
    positive_definite: False if CG met a direction p with p^T A p <= 0 (then it stopped there).
    """

    residual_norm: tf.Tensor
    relative_residual: tf.Tensor
    steps: tf.Tensor
    converged: tf.Tensor
    positive_definite: tf.Tensor


class RootInfo(NamedTuple):
    """What :func:`root_vjp` reports: ||F(x, args)|| at the given solution (how far it is from a
    root: the delta of Algorithm 2 of 002_...), and the linear solve's :class:`CGInfo` (or
    whatever the `solve` given returned)."""

    optimality_norm: tf.Tensor
    solve: object


# -- list arithmetic ----------------------------------------------------------------------------
def _as_list(tensors) -> list:
    if isinstance(tensors, (list, tuple)):
        return [tf.convert_to_tensor(t) for t in tensors]
    return [tf.convert_to_tensor(tensors)]


def _dot(a: Tensors, b: Tensors) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)])


def _norm(a: Tensors) -> tf.Tensor:
    return tf.sqrt(_dot(a, a))


def _axpy(alpha, x: Tensors, y: Tensors) -> list:
    """alpha * x + y, element-wise over the lists."""
    return [alpha * xi + yi for xi, yi in zip(x, y)]


def check_finite(tensors: Tensors, where: str) -> list:
    """`tensors`, with an in-graph check that raises InvalidArgumentError naming `where` if any
    holds NaN or Inf."""
    message = _NON_FINITE.format(where=where)
    return [tf.debugging.assert_all_finite(t, message) for t in tensors]


def _check_steps(name: str, value) -> None:
    if isinstance(value, tf.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}={value!r} is not valid: expected an integer >= 0.")


def _check_nonnegative(name: str, value) -> None:
    if isinstance(value, tf.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{name}={value!r} is not valid: expected a number >= 0.")


WARN_CHOICES = (True, False, "curvature")


# -- conjugate gradient -------------------------------------------------------------------------
def conjugate_gradient(
    matvec: Callable[[list], list],
    b,
    *,
    x0=None,
    max_steps=20,
    tol=1e-6,
    atol=0.0,
    preconditioner: Callable[[list], list] | None = None,
    warn=True,
    name: str = "conjugate_gradient",
):
    """Solve A x = b by (preconditioned) conjugate gradient; A symmetric positive definite.

    The minimisation of Eq. 7 of 002_6afe990328515e50.txt (w^T A w / 2 - w^T b) by CG
    (Hestenes-Stiefel; Nocedal & Wright Alg. 5.3 with preconditioner M^-1 = `preconditioner`), as a
    `tf.while_loop`: only the current iterate, residual and direction are kept, whatever the
    number of steps.

    Args:
        matvec: ``fn(list of tensors) -> list``, v -> A v (e.g. a Hessian-vector product).
        b: a tensor or a list of tensors (the structure of x).
        x0: starting point (default zeros; a nonzero one costs one more ``matvec``).
        max_steps: cap on CG iterations (Python int or int32 tensor, >= 0).
        tol, atol: stop when ||b - A x|| <= max(tol * ||b||, atol).
        preconditioner: optional ``fn(r) -> M^-1 r`` with M symmetric positive definite.
        warn: True: warn (:class:`ConvergenceWarning`) when the solve stops unconverged, naming
            the residual, or at non-positive curvature; "curvature": only the latter; False: never.
        name: names the solve in warnings.

    Returns:
        ``(x, info)``: x with the structure of `b`, and a :class:`CGInfo`.

    Example:
        >>> A = tf.constant([[4.0, 1.0], [1.0, 3.0]])
        >>> x, info = conjugate_gradient(lambda v: [tf.linalg.matvec(A, v[0])], tf.constant([1.0, 2.0]),
        ...                              max_steps=2, tol=1e-6)
        >>> x.numpy(), bool(info.converged)                  # [0.0909, 0.6364], True
    """
    _check_steps("max_steps", max_steps)
    _check_nonnegative("tol", tol)
    _check_nonnegative("atol", atol)
    if warn not in WARN_CHOICES:
        raise ValueError(f"warn={warn!r} is not valid: expected one of {WARN_CHOICES}.")
    single = not isinstance(b, (list, tuple))
    b = _as_list(b)
    dtype = b[0].dtype
    precondition = preconditioner or (lambda r: list(r))
    if x0 is None:
        x = [tf.zeros_like(t) for t in b]
        r = list(b)
    else:
        x = _as_list(x0)
        r = [bi - ai for bi, ai in zip(b, matvec(x))]
    z = list(precondition(r))
    p = list(z)
    rz = _dot(r, z)
    b_norm = _norm(b)
    threshold = tf.maximum(tf.cast(tol, dtype) * b_norm, tf.cast(atol, dtype))
    r_norm = _norm(r)
    zero = tf.zeros([], dtype)

    def cond(k, x, r, p, rz, r_norm, pd):
        return tf.logical_and(tf.logical_and(k < max_steps, r_norm > threshold), pd)

    def body(k, x, r, p, rz, r_norm, pd):
        ap = matvec(p)
        pap = _dot(p, ap)
        ok = pap > zero  # False for p^T A p <= 0 and for NaN
        alpha = tf.where(ok, rz / tf.where(ok, pap, tf.ones_like(pap)), zero)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        z = precondition(r)
        rz_new = _dot(r, z)
        beta = tf.where(rz > zero, rz_new / tf.where(rz > zero, rz, tf.ones_like(rz)), zero)
        p = _axpy(beta, p, z)
        return k + tf.cast(ok, tf.int32), x, r, p, rz_new, _norm(r), ok

    k, x, r, _, _, r_norm, pd = tf.while_loop(
        cond, body, (tf.constant(0), x, r, p, rz, r_norm, tf.constant(True)),
        parallel_iterations=1,
    )
    relative = tf.where(b_norm > zero, r_norm / tf.where(b_norm > zero, b_norm, tf.ones_like(b_norm)), zero)
    info = CGInfo(r_norm, relative, k, r_norm <= threshold, pd)
    if warn:
        x = _with_report(x, info, threshold, name, unconverged=warn is True)
    return (x[0] if single else x), info


def _with_report(x: list, info: CGInfo, threshold, name: str, *, unconverged: bool) -> list:
    """x, made to depend on a (host) check that warns about a failed or unconverged solve."""

    def report(r_norm, relative, threshold, steps, pd):
        if not bool(pd):
            warnings.warn(
                f"{name}: conjugate gradient met non-positive curvature (p^T A p <= 0): the matrix "
                "is not positive definite here, so the solve stopped early. For iMAML, raise lam "
                "so that I + H/lambda is positive definite.",
                ConvergenceWarning,
            )
        elif unconverged and float(r_norm) > float(threshold):
            warnings.warn(
                f"{name}: conjugate gradient did not converge in {int(steps)} steps: residual norm "
                f"{float(r_norm):.3e} (relative {float(relative):.3e}) > tolerance "
                f"{float(threshold):.3e}. Allow more steps or loosen the tolerance.",
                ConvergenceWarning,
            )
        return True

    if tf.executing_eagerly():
        report(info.residual_norm, info.relative_residual, threshold, info.steps,
               info.positive_definite)
        return x
    failed = tf.logical_not(info.positive_definite)
    if unconverged:
        failed = tf.logical_or(failed, info.residual_norm > threshold)

    def call_host():  # a host round trip only when there is something to report
        return tf.py_function(
            report,
            [info.residual_norm, info.relative_residual, threshold, info.steps,
             info.positive_definite],
            tf.bool,
        )

    done = tf.cond(failed, call_host, lambda: tf.constant(True))
    with tf.control_dependencies([done]):
        return [tf.identity(t) for t in x]


# -- Hessian-vector products --------------------------------------------------------------------
def hvp(loss_fn: Callable[[list], tf.Tensor], params, vector, *, check: bool = True):
    """Hessian-vector product (d^2 loss / d params^2) v, by differentiating <grad, v> (no Hessian).

    Appendix C of 002_6afe990328515e50.txt: the gradient of grad L(phi)^T v is H v, at a constant
    factor of the cost of one gradient. `params` and `vector` are tensors or lists of tensors.

    Example:
        >>> hvp(lambda p: tf.reduce_sum(p[0] ** 3), [tf.constant([1.0, 2.0])], [tf.ones([2])])
        [<tf.Tensor: ... numpy=array([ 6., 12.], dtype=float32)>]
    """
    params, vector = _as_list(params), _as_list(vector)
    with tf.GradientTape() as outer:
        outer.watch(params)
        with tf.GradientTape() as inner:
            inner.watch(params)
            loss = loss_fn(params)
        grads = inner.gradient(loss, params, unconnected_gradients=_ZERO)
        inner_product = _dot(grads, vector)
    out = outer.gradient(inner_product, params, unconnected_gradients=_ZERO)
    return check_finite(out, "hvp") if check else out


def hessian_operator(loss_fn: Callable[[list], tf.Tensor], params, *, check: bool = True):
    """``(matvec, loss, grads)`` at `params`: the loss and its gradient computed once, and
    ``matvec(v) -> H v`` reusing that computation for every product (for CG loops).

    Same products as :func:`hvp` (Appendix C of 002_6afe990328515e50.txt); the forward and first
    backward pass are shared by all calls, so k products cost k second backward passes.

    Example:
        >>> matvec, loss, grads = hessian_operator(lambda p: tf.reduce_sum(p[0] ** 3), [x])
        >>> matvec([v])   # == hvp(..., [x], [v])
    """
    params = _as_list(params)
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(params)
        with tf.GradientTape() as inner:
            inner.watch(params)
            loss = loss_fn(params)
        grads = inner.gradient(loss, params, unconnected_gradients=_ZERO)

    def matvec(vector):
        out = outer.gradient(grads, params, output_gradients=_as_list(vector),
                             unconnected_gradients=_ZERO)
        return check_finite(out, "hessian_operator") if check else out

    return matvec, loss, grads


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

    The inner solver of Sec. 4 and Appendix F.2 of 002_6afe990328515e50.txt ("Hessian-free or
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
        observer: optional :class:`tfmeta.inner_loop.Observer`, updated after every Newton step
            with (acc, step, x, grad, new_x).

    Returns:
        The last iterate (a list), or ``(iterate, accumulator)`` with an observer.

    Example:
        >>> x = newton_cg(lambda p: tf.reduce_sum(tf.exp(p[0]) - 2.0 * p[0]), [tf.zeros([3])],
        ...               steps=8)[0]           # -> log 2 in every coordinate
    """
    _check_steps("steps", steps)
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, numbers.Integral) or cg_steps < 1:
        raise ValueError(f"cg_steps={cg_steps!r} is not valid: expected an integer >= 1.")
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
    system of :func:`root_vjp` is the one of Lemma 1 of 002_6afe990328515e50.txt.

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
    002_6afe990328515e50.txt, dF/dx = H + lambda I and dF/dtheta = -lambda I: this is Lemma 1
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
