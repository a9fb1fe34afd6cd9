"""Multi-step estimation: one task gradient reused over a window of n inner steps.

The estimator of Kim, Park and Choi (Kim et al. 2020, Sec. 3). The inner trajectory of
T = K*n steps is cut into K non-overlapping windows of n steps; the task gradient is evaluated once,
at the start of each window, and reused for the n optimizer steps of that window (the estimated
dynamics s_{t+n} = Phi^n_t(s_t; theta) of Eq. 11, Algorithm 1). The meta-gradient is taken
through these estimated dynamics (Eq. 12), so backpropagation meets K gradient evaluations, hence
K Hessian-vector products, instead of T. n = 1 is exact MAML. When n does not divide T the last
window is shorter: T mod n steps with one more gradient evaluation (ceil(T/n) in all).

- With plain SGD the estimate equals MAML with learning rate n*eta and K steps (Eq. 14-15).
- With momentum and weight decay it does not (Eq. 13, Proposition 1): the velocity and the decay
  keep evolving inside a window while the gradient is frozen. :func:`momentum_window_coefficients`
  implements the coefficient recursion of Lemma 1 (Eq. 32-35, Appendix C) that describes a window,
  and :func:`rescaled_one_step_hyperparameters` the one-step hyper-parameters of Eq. 52-54 that
  Proposition 1 shows cannot reproduce it.
- Meta-parameters may be the initialization (few-shot learning, Sec. 5.2) or meta-network weights
  that enter the inner loss (meta-transfer learning, Sec. 2.2 and 5.1), where first-order MAML and
  iMAML do not apply: see examples/meta_transfer_reuse.py.

The metric ``grad_difference`` is the gradient difference of Fig. 1,
||g' - g|| / ||g'||, averaged over consecutive *evaluated* gradients g, g' of the trajectory (with
n = 1 these are consecutive steps; with n > 1 consecutive window starts, n steps apart: the change
that the reuse ignores). It is 0 when fewer than two gradients are evaluated (T <= n).

Example:
    >>> est = tfmeta.estimators.get("reuse", reuse_window=4)   # CLI: --estimator reuse --reuse-window 4
    >>> loss, grads, metrics = est.meta_gradient(learner, task_batch)
    >>> metrics["grad_difference"]

References:
    Kim, J.-H., Park, J., Choi, Y. "Multi-step Estimation for Gradient-based Meta-learning."
    2020. arXiv:2004.05439.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfmeta.core import inner_loop
from tfmeta.core.inner_loop import combine
from tfmeta.estimators.base import Flag, register, zeros_for_none
from tfmeta.estimators.maml import MAML

GRAD_DIFFERENCE = "grad_difference"


# -- Lemma 1 and Proposition 1 (Appendix C) --------------------------------------------------------
class MomentumCoefficients(NamedTuple):
    """Coefficients of Lemma 1: with a constant gradient g, after k momentum steps

        v_{k+1}   = b_v[k] g + c_v[k] phi_1 + d_v[k] v_1
        phi_{k+1} = b_phi[k] g + c_phi[k] phi_1 + d_phi[k] v_1

    Index k holds the paper's t = k + 1 (k = 0 is the starting point), so the paper's b^phi_7 is
    ``b_phi[6]``. Lemma 1 starts from v_1 = 0; the d coefficients (same homogeneous recursion as c,
    Eq. 33 and 35, started from v_1 instead of phi_1) extend it to a window that starts with a
    non-zero velocity, as every window after the first does.
    """

    b_v: np.ndarray
    c_v: np.ndarray
    d_v: np.ndarray
    b_phi: np.ndarray
    c_phi: np.ndarray
    d_phi: np.ndarray


def _real(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(
            f"{name}={value!r} is not valid: expected a finite number {'> 0' if positive else '>= 0'}."
        )
    return float(value)


def momentum_window_coefficients(
    steps: int, *, momentum: float, weight_decay: float, learning_rate: float
) -> MomentumCoefficients:
    """Kim et al. 2020, Lemma 1 (Eq. 32-35): SGD with momentum under a fixed gradient.

    With g_t = g for all t, the momentum dynamics of Eq. 5 (v_{t+1} = mu v_t + g + omega phi_t,
    phi_{t+1} = phi_t - eta v_{t+1}) keep v_t and phi_t linear in g, phi_1 (and v_1):

        b^v_{t+1}   = mu b^v_t + 1 + omega b^phi_t                      (Eq. 32)
        c^v_{t+1}   = mu c^v_t + omega c^phi_t                          (Eq. 33)
        b^phi_{t+1} = -eta mu b^v_t - eta + (1 - eta omega) b^phi_t     (Eq. 34)
        c^phi_{t+1} = -eta mu c^v_t + (1 - eta omega) c^phi_t           (Eq. 35)

    from b_1 = 0, c^v_1 = 0, c^phi_1 = 1 (and d^v_1 = 1, d^phi_1 = 0 for the velocity). This is
    exactly one window of the reuse estimator: the state after a window of n steps that starts at
    (phi, v) with reused gradient g is ``b[n] g + c[n] phi + d[n] v``, and the vector
    (b^phi[n], b^v[n]) is sum_{i<n} A^i [-eta, 1] of Eq. 13.

    Args:
        steps: number of steps k >= 0 to record.
        momentum, weight_decay: mu >= 0 and omega >= 0 (mu may exceed 1 here: the hyper-parameters
            of :func:`rescaled_one_step_hyperparameters` do).
        learning_rate: eta > 0.

    Returns:
        :class:`MomentumCoefficients`, arrays of length steps + 1 (float64).

    Example (Appendix C: mu = 0.9, omega = 1e-4, eta = 0.1):
        >>> momentum_window_coefficients(6, momentum=0.9, weight_decay=1e-4, learning_rate=0.1).b_phi[6]
        -1.7829...
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps={steps!r} is not valid: expected an integer >= 0.")
    mu = _real("momentum", momentum)
    omega = _real("weight_decay", weight_decay)
    eta = _real("learning_rate", learning_rate, positive=True)
    rows = np.zeros((int(steps) + 1, 6))
    rows[0] = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0)  # b_v, c_v, d_v, b_phi, c_phi, d_phi at t = 1
    for k in range(int(steps)):
        b_v, c_v, d_v, b_phi, c_phi, d_phi = rows[k]
        rows[k + 1] = (
            mu * b_v + 1.0 + omega * b_phi,
            mu * c_v + omega * c_phi,
            mu * d_v + omega * d_phi,
            -eta * mu * b_v - eta + (1.0 - eta * omega) * b_phi,
            -eta * mu * c_v + (1.0 - eta * omega) * c_phi,
            -eta * mu * d_v + (1.0 - eta * omega) * d_phi,
        )
    return MomentumCoefficients(*(rows[:, i].copy() for i in range(6)))


def rescaled_one_step_hyperparameters(
    *, momentum: float, weight_decay: float, learning_rate: float
) -> tuple[float, float, float]:
    """(eta~, omega~, mu~) of Eq. 52-54, Kim et al. 2020 (proof of Proposition 1).

    The only one-step momentum hyper-parameters whose iterates phi~_2 and phi~_3 match phi_3 and
    phi_5 of the 2-step estimate under a constant gradient:

        eta~   = eta (mu + 2 - eta omega)                                        (Eq. 52)
        omega~ = (mu omega + 2 omega - eta omega^2) / (mu + 2 - eta omega)        (Eq. 53)
        mu~    = -b^phi_5 / eta~ + eta~ omega~ - 2                                (Eq. 54)

    Proposition 1: even these miss phi_7 (b~^phi_4 != b^phi_7), so the multi-step estimate with
    momentum is not one-step momentum with other hyper-parameters.

    Example:
        >>> eta_, omega_, mu_ = rescaled_one_step_hyperparameters(momentum=0.9, weight_decay=1e-4,
        ...                                                      learning_rate=0.1)
        >>> momentum_window_coefficients(3, momentum=mu_, weight_decay=omega_,
        ...                              learning_rate=eta_).b_phi[3]   # paper: about -1.88
        -1.8837...
    """
    mu = _real("momentum", momentum)
    omega = _real("weight_decay", weight_decay)
    eta = _real("learning_rate", learning_rate, positive=True)
    b5 = momentum_window_coefficients(4, momentum=mu, weight_decay=omega, learning_rate=eta).b_phi[4]
    eta_t = eta * (mu + 2.0 - eta * omega)
    omega_t = (mu * omega + 2.0 * omega - eta * omega**2) / (mu + 2.0 - eta * omega)
    mu_t = -b5 / eta_t + eta_t * omega_t - 2.0
    return float(eta_t), float(omega_t), float(mu_t)


# -- the gradient-difference metric of Fig. 1 ------------------------------------------------------
def gradient_difference_observer(window: int) -> inner_loop.Observer:
    """An :class:`~tfmeta.core.inner_loop.Observer` for Kim et al. 2020, Fig. 1.

    Accumulates ||g' - g|| / ||g'|| (global norms over all adapted tensors) over consecutive
    evaluated gradients g, g' of a trajectory run with ``reuse_window=window``: a gradient is
    fresh at steps 0, n, 2n, ... (the last, shorter window also starts at a multiple of n). The
    accumulator is (last gradient, sum of ratios, number of ratios); nothing in it is
    differentiated. :func:`mean_gradient_difference` turns it into the metric.

    Example:
        >>> params, acc = learner.adapt(meta, x, y, reuse_window=2,
        ...                             observer=gradient_difference_observer(2))
        >>> mean_gradient_difference(acc)
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window={window!r} is not valid: expected an integer >= 1.")

    def init(params):
        dtype = params[0].dtype
        return [tf.zeros_like(p) for p in params], tf.zeros([], dtype), tf.zeros([], dtype)

    def update(acc, step, params, grads, new_params):
        del params, new_params
        previous, total, count = acc
        grads = [tf.stop_gradient(g) for g in grads]
        fresh = tf.cast(tf.logical_and(step > 0, step % window == 0), total.dtype)
        change = tf.linalg.global_norm([g - p for g, p in zip(grads, previous)])
        ratio = tf.math.divide_no_nan(change, tf.linalg.global_norm(grads))
        return grads, total + fresh * tf.cast(ratio, total.dtype), count + fresh

    return inner_loop.Observer(init, update)


def mean_gradient_difference(acc) -> tf.Tensor:
    """The metric from a :func:`gradient_difference_observer` accumulator (0 with no pair)."""
    _, total, count = acc
    return tf.math.divide_no_nan(total, count)


# -- the estimator -----------------------------------------------------------------------------
def _check_window(reuse_window) -> int:
    if isinstance(reuse_window, bool) or not isinstance(reuse_window, numbers.Integral) \
            or reuse_window < 1:
        raise ValueError(
            f"reuse_window={reuse_window!r} is not valid: expected an integer >= 1 (inner steps "
            "per task-gradient evaluation)."
        )
    return int(reuse_window)


@register
class Reuse(MAML):
    """Multi-step estimated meta-gradient (Kim et al. 2020, Eq. 11-12, Algorithm 1).

    The meta-gradient of one task is d L_query(phi_{T+1}) / d theta through the estimated
    dynamics: each window of `reuse_window` = n inner steps evaluates the task gradient once and
    applies the learner's inner optimizer n times with it; the last window is shorter when n does
    not divide T. Second order: the gradients stay differentiable, so meta-network weights inside
    the inner loss and Meta-SGD rates get their (estimated) gradients too.

    Args:
        reuse_window: n, an integer with 1 <= n <= the learner's inner steps T (n = 1: MAML).
        parallel_tasks, linearity_metrics: as for every :class:`~tfmeta.estimators.Estimator`.

    Held-out evaluation adapts with the learner's exact inner loop (a gradient every step): the
    dynamics that this meta-gradient estimates.

    Example:
        >>> est = tfmeta.estimators.get("reuse", reuse_window=4)
        >>> MetaTrainer(MetaLearner(models.conv4(5), inner_steps=8), est).fit(sampler, 1000)
    """

    name = "reuse"
    second_order = True
    flags = (
        Flag(
            "reuse_window", int, 2,
            "reuse estimator: inner steps n per task-gradient evaluation (1 = exact MAML; "
            "T not divisible by n gives a shorter last window)",
        ),
    )

    def __init__(self, reuse_window: int = 2, parallel_tasks: int = 2, linearity_metrics: bool = False):
        super().__init__(parallel_tasks=parallel_tasks, linearity_metrics=linearity_metrics)
        self.reuse_window = _check_window(reuse_window)

    def check(self, learner):
        if self.reuse_window > learner.inner_steps:
            raise ValueError(
                f"reuse_window={self.reuse_window} is not valid for inner_steps="
                f"{learner.inner_steps}: expected a window of at most the number of inner steps "
                "(the paper uses T = K * n; n = T gives one gradient evaluation)."
            )

    def check_remat(self, learner):
        """A remat window K must hold whole reuse windows (checkpoints at window starts)."""
        super().check_remat(learner)
        k = learner.remat
        if isinstance(k, int) and k % self.reuse_window and k < learner.inner_steps:
            raise ValueError(
                f"remat={k!r} (--remat every:{k}) is not valid with reuse_window="
                f"{self.reuse_window}: expected a multiple of the reuse window (or sqrt, which "
                "picks one), so that checkpoints fall on the starts of reuse windows."
            )

    def metric_names(self, learner):
        return tuple(learner.metric_names) + (GRAD_DIFFERENCE,)

    def adapted_params(self, learner, meta, task, observer=None):
        """phi_{T+1} through the estimated dynamics of Eq. 11 (one gradient per window)."""
        self.check(learner)
        return learner.adapt(
            meta, task.support_x, task.support_y, second_order=True,
            reuse_window=self.reuse_window, observer=observer,
        )

    def task_gradient(self, learner, meta_values, task, observer=None):
        own = gradient_difference_observer(self.reuse_window)
        with tf.GradientTape() as tape:
            tape.watch(meta_values)
            meta = learner.unflatten(meta_values)
            params, acc = self.adapted_params(
                learner, meta, task, observer=own if observer is None else combine(own, observer)
            )
            if observer is not None:
                acc, seen = acc
            loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
        grads = tape.gradient(loss, meta_values)
        metrics = dict(metrics)
        metrics[GRAD_DIFFERENCE] = mean_gradient_difference(acc)
        result = loss, zeros_for_none(grads, meta_values), metrics
        return result if observer is None else (*result, (meta, params, seen))
