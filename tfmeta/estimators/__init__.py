"""Meta-gradient estimators, one module each, behind one interface (:class:`Estimator`).

``get(name)`` returns an estimator by its CLI name: "maml" (exact, second order), "fomaml"
(first-order MAML), "reptile".
"""

from tfmeta.estimators.base import (
    Estimator, Flag, MetaGradient, Task, all_flags, get, get_class, names, register,
)
from tfmeta.estimators import fomaml, maml, reptile  # noqa: F401  (register the estimators)

__all__ = [
    "Estimator", "Flag", "MetaGradient", "Task", "all_flags", "get", "get_class", "names", "register",
]
