"""Meta-gradient estimators, one module each, behind one interface (:class:`Estimator`).

``get(name, **options)`` returns an estimator by its CLI name, e.g. "maml" (exact, second order),
"fomaml" (first-order MAML), "reptile". Every module of this package is imported here, so a new
estimator is one new module whose class is decorated with :func:`register` (plus its tests).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from tfmeta.estimators.base import (
    Estimator, Flag, MetaGradient, Task, all_flags, get, get_class, names, register,
)

for _module in _pkgutil.iter_modules(__path__):
    if _module.name != "base":
        _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Estimator", "Flag", "MetaGradient", "Task", "all_flags", "get", "get_class", "names", "register",
]
