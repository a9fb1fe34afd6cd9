"""Implicit differentiation: linear solves with Hessian-vector products, and gradients of roots.

The layer between the core (functional model, inner loop) and the estimators: iMAML's
meta-gradient (:mod:`tfmeta.estimators.implicit`) solves ``(I + H/lambda) g = v`` with
:func:`conjugate_gradient`, its Hessian-free inner solver is :func:`newton_cg`, and
:func:`custom_root` / :func:`root_vjp` differentiate any solver's fixed point (Rajeswaran et al.
2019). The linear algebra is :mod:`tfmeta.implicit.linear`, the roots :mod:`tfmeta.implicit.roots`;
this package re-exports both.

References:
    Rajeswaran, A., Finn, C., Kakade, S. M., Levine, S. "Meta-Learning with Implicit Gradients."
    NeurIPS 2019. arXiv:1909.04630.
"""

from tfmeta.implicit.linear import (
    WARN_CHOICES, CGInfo, ConvergenceWarning, check_finite, conjugate_gradient, hessian_operator, hvp,
)
from tfmeta.implicit.roots import (
    RootInfo, custom_root, default_solve, gradient_optimality, newton_cg, root_vjp,
)

__all__ = [
    "WARN_CHOICES", "CGInfo", "ConvergenceWarning", "RootInfo", "check_finite", "conjugate_gradient",
    "custom_root", "default_solve", "gradient_optimality", "hessian_operator", "hvp", "newton_cg",
    "root_vjp",
]
