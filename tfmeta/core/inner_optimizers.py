"""Differentiable inner optimizers as pure functions over (params, grads, state).

As in optax, an optimizer is a pair of pure functions, here split at the learning rate:

- ``init(params) -> state``
- ``direction(grads, state, params) -> (direction, new_state)``

and one shared step, :func:`step`, applies ``params - learning_rate * direction``. Nothing is
assigned in place (Keras optimizers ``assign`` and cannot be differentiated through), so a tape can
differentiate the whole trajectory, and the learning rate may be a scalar or one tensor per
parameter that is itself meta-learned (Meta-SGD).

Example:
    >>> opt = momentum(learning_rate=0.1, momentum=0.9, weight_decay=1e-4)
    >>> state = opt.init(params)
    >>> params, state = step(opt, params, grads, state)

References:
    Finn, C., Abbeel, P., Levine, S. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks." ICML 2017. arXiv:1703.03400.

    Kim, J.-H., Park, J., Choi, Y. "Multi-step Estimation for Gradient-based Meta-learning."
    2020. arXiv:2004.05439.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import tensorflow as tf

from tfmeta.core import checks

Params = Sequence[tf.Tensor]


class InnerOptimizer(NamedTuple):
    """A differentiable optimizer: pure `init` and `direction` plus its default learning rate."""

    name: str
    learning_rate: float
    init: Callable[[Params], Any]
    direction: Callable[[Params, Any, Params], tuple[list[tf.Tensor], Any]]
    #: omega of Kim et al. 2020, Eq. 5 (0 for optimizers without weight decay): the
    #: steps converge to a zero of grad L + omega * phi, not of grad L (the implicit estimator
    #: needs it to differentiate the problem actually solved).
    weight_decay: float = 0.0


def _check_rate(name: str, value: float) -> float:
    return checks.number(name, value, above=0.0, finite=False, convert=True)


def _check_unit(name: str, value: float) -> float:
    return checks.number(name, value, at_least=0.0, below=1.0, finite=False, convert=True)


def sgd(learning_rate: float = 0.4) -> InnerOptimizer:
    """Plain gradient descent: phi <- phi - eta * g (Eq. 1 of Finn et al. in Sun's overview)."""
    _check_rate("learning_rate", learning_rate)
    return InnerOptimizer(
        "sgd",
        learning_rate,
        init=lambda params: (),
        direction=lambda grads, state, params: (list(grads), state),
    )


def momentum(
    learning_rate: float = 0.4, momentum: float = 0.9, weight_decay: float = 0.0
) -> InnerOptimizer:
    """SGD with momentum and weight decay, Kim et al. 2020, Eq. 5.

    v_{t+1} = mu * v_t + g_t + omega * phi_t,   phi_{t+1} = phi_t - eta * v_{t+1}.
    The state is the velocity v (zeros at the start of every task).
    """
    _check_rate("learning_rate", learning_rate)
    mu = _check_unit("momentum", momentum)
    omega = float(weight_decay)
    if omega < 0:
        raise ValueError(f"weight_decay={weight_decay!r} is not valid: expected a number >= 0.")

    def direction(grads, velocity, params):
        new_v = [mu * v + g + omega * p for v, g, p in zip(velocity, grads, params)]
        return new_v, new_v

    return InnerOptimizer(
        "momentum", learning_rate, init=lambda params: [tf.zeros_like(p) for p in params],
        direction=direction, weight_decay=omega,
    )


class AdamState(NamedTuple):
    count: tf.Tensor
    mu: list
    nu: list


def adam(
    learning_rate: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 1e-10,
) -> InnerOptimizer:
    """Adam (Kingma & Ba) with optax's `eps_root`, safe to differentiate through.

    m_t = b1 m + (1 - b1) g,  v_t = b2 v + (1 - b2) g^2,  m^ = m_t / (1 - b1^t),  v^ = v_t / (1 - b2^t),
    direction = m^ / (sqrt(v^ + eps_root) + eps).
    `eps_root > 0` keeps d sqrt(v^)/dv^ finite where a gradient is exactly zero, so meta-gradients
    through Adam never become NaN.
    """
    _check_rate("learning_rate", learning_rate)
    b1 = _check_unit("b1", b1)
    b2 = _check_unit("b2", b2)
    if eps_root <= 0:
        raise ValueError(
            f"eps_root={eps_root!r} is not valid: expected a number > 0 (zero gives NaN "
            "meta-gradients through sqrt at zero gradients)."
        )

    def init(params):
        zeros = [tf.zeros_like(p) for p in params]
        return AdamState(tf.zeros([], params[0].dtype), zeros, list(zeros))

    def direction(grads, state, params):
        del params
        count = state.count + 1
        mu = [b1 * m + (1 - b1) * g for m, g in zip(state.mu, grads)]
        nu = [b2 * v + (1 - b2) * tf.square(g) for v, g in zip(state.nu, grads)]
        c1, c2 = 1 - b1**count, 1 - b2**count
        out = [(m / c1) / (tf.sqrt(v / c2 + eps_root) + eps) for m, v in zip(mu, nu)]
        return out, AdamState(count, mu, nu)

    return InnerOptimizer("adam", learning_rate, init=init, direction=direction)


def step(
    optimizer: InnerOptimizer,
    params: Params,
    grads: Params,
    state: Any,
    learning_rate=None,
) -> tuple[list[tf.Tensor], Any]:
    """One differentiable update: params - learning_rate * direction(grads, state, params).

    `learning_rate` is None (the optimizer's own), a scalar, or one tensor per parameter
    (Meta-SGD: meta-learned, element-wise rates).
    """
    direction, state = optimizer.direction(grads, state, params)
    rates = learning_rate if learning_rate is not None else optimizer.learning_rate
    if not isinstance(rates, (list, tuple)):
        rates = [rates] * len(params)
    return [p - _as_dtype(r, p.dtype) * d for p, r, d in zip(params, rates, direction)], state


def _as_dtype(rate, dtype):
    # Python numbers stay Python numbers: tf.cast would round them through float32 first.
    return rate if isinstance(rate, (int, float)) else tf.cast(rate, dtype)


INNER_OPTIMIZERS = {"sgd": sgd, "momentum": momentum, "adam": adam}


def get(name: str, learning_rate: float | None = None, **kwargs) -> InnerOptimizer:
    """An inner optimizer by name: "sgd", "momentum" or "adam".

    `learning_rate` None (and any option left out) is the optimizer's own default: 0.4 for SGD
    and momentum, 1e-3 for Adam. Those defaults are defined once, in the signatures above.

    Example:
        >>> get("adam").learning_rate
        0.001
    """
    checks.choice("inner_optimizer", name, sorted(INNER_OPTIMIZERS))
    if learning_rate is not None:
        kwargs["learning_rate"] = learning_rate
    return INNER_OPTIMIZERS[name](**kwargs)
