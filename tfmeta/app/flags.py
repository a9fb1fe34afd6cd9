"""Flags shared by the subcommands of `tfmeta` (train, bench, search): runtime, estimators, types.

Every estimator option is one flag, derived from the estimator's declared :class:`Flag` s, whose
defaults are its constructor's (:func:`tfmeta.estimators.register` checks they agree). A flag is
left None unless given, so the estimator's own default applies; the help shows that default.
Numeric flags parse with the shared validation vocabulary (:mod:`tfmeta.core.checks`).
"""

from __future__ import annotations

import math

from tfmeta import estimators
from tfmeta.core.checks import flag_type
from tfmeta.core import runtime

positive_int = flag_type(int, lambda v: v >= 1, "an integer >= 1")
positive_float = flag_type(float, lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
seconds = flag_type(float, lambda v: v >= 0 and math.isfinite(v), "a finite number of seconds >= 0")
unit_float = flag_type(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
nonnegative_float = flag_type(float, lambda v: v >= 0, "a number >= 0")
step_list = flag_type(lambda t: [int(s) for s in t.split(",")], lambda v: len(v) > 0 and all(s >= 1 for s in v),
                      "a comma-separated list of meta-step counts >= 1 (e.g. 10,20,40,80)")
threads = flag_type(lambda t: t if t == "auto" else int(t), lambda v: v == "auto" or v >= 0,
                    "an integer >= 0 or 'auto'")


def flag_name(name: str) -> str:
    """``inner_lr`` -> ``--inner-lr``."""
    return "--" + name.replace("_", "-")


def add_runtime_flags(p, distribute=True):
    """--strategy, --cpu-devices (with `distribute`), thread counts, --json."""
    if distribute:
        p.add_argument("--strategy", default="default", choices=runtime.STRATEGIES,
                       help="tf.distribute strategy: the meta-batch's tasks are split across replicas")
        p.add_argument("--cpu-devices", type=positive_int, default=1,
                       help="split the CPU into this many logical devices (replicas on a CPU-only machine)")
    p.add_argument("--intra-op-threads", type=threads, default="auto",
                   help="TensorFlow intra-op threads ('auto': 1 per op on CPU, tasks run side by side)")
    p.add_argument("--inter-op-threads", type=threads, default="auto",
                   help="TensorFlow inter-op threads ('auto': one per core on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def add_estimator_flags(p):
    """One flag per estimator option (``--reuse-window`` ...), default: the estimator's own."""
    for flag in estimators.all_flags():
        p.add_argument(flag_name(flag.name), dest=flag.name, type=flag.type,
                       default=None, help=f"{flag.help} (default {flag.default})")
    p.add_argument("--linearity-metrics", action="store_true",
                   help="log Phase and Amplitude Consistency (LIL, Eq. 3-4) every meta-step for any estimator")


def estimator_options(args) -> dict:
    """The chosen estimator's options that were given on the command line."""
    flags = list(estimators.get_class(args.estimator).flags)
    if getattr(args, "base", None) or any(f.name == "base" for f in flags):
        # a wrapper (e.g. linearity --base reuse) also takes its base estimator's flags
        base = getattr(args, "base", None) or next(f.default for f in flags if f.name == "base")
        flags += list(estimators.get_class(base).flags) if base in estimators.names() else []
    return {f.name: getattr(args, f.name) for f in flags if getattr(args, f.name, None) is not None}
