"""Linear algebra of implicit differentiation: conjugate gradient and Hessian-vector products.

The reusable piece behind the ``implicit`` estimator (iMAML, Rajeswaran et al. 2019), written
for any bilevel problem, in the style of jaxopt. Everything works on **lists of tensors** (one per
variable) inside or outside `tf.function`, and never forms a Hessian:

- :func:`conjugate_gradient`: (preconditioned) CG for ``A x = b`` with A symmetric positive
  definite and given only as ``matvec(v) -> A v``, as a `tf.while_loop` with a step cap and a
  residual tolerance (Rajeswaran et al. 2019, Eq. 7: CG minimises w^T A w / 2 - w^T b). It reports the residual
  and the steps taken, warns (:class:`ConvergenceWarning`, naming the residual) when it stops
  unconverged, and stops at non-positive curvature (A not positive definite).
- :func:`hvp` and :func:`hessian_operator`: Hessian-vector products by reverse-over-reverse
  differentiation ("double tape"; Rajeswaran et al. 2019, Appendix C: time and memory within a constant factor
  of one gradient). Non-finite products raise ``tf.errors.InvalidArgumentError`` with a message.

:func:`newton_cg`, :func:`root_vjp` and :func:`custom_root` build on these in
:mod:`tfmeta.implicit.roots`.

References:
    Rajeswaran, A., Finn, C., Kakade, S. M., Levine, S. "Meta-Learning with Implicit Gradients."
    NeurIPS 2019. arXiv:1909.04630.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Callable, NamedTuple, Sequence

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

    The minimisation of Rajeswaran et al. 2019, Eq. 7 (w^T A w / 2 - w^T b) by CG
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

    Rajeswaran et al. 2019, Appendix C: the gradient of grad L(phi)^T v is H v, at a constant
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

    Same products as :func:`hvp` (Rajeswaran et al. 2019, Appendix C); the forward and first
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
