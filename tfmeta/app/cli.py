"""The `tfmeta` command line: train, evaluate, export, bench, search.

`tfmeta train` with no flags is the main job: sinusoid 5-shot regression with exact MAML, its
meta-training capped by the default ``--time-budget`` of 100 s (about 1.5 minutes in all on two
CPU cores; a capped run says "stopped by --time-budget at step N of M"), a progress bar, a final
line comparing held-out MSE before and after adaptation, and a SavedModel of the learned
initialization under ``saved_models/``. Every flag's default is in ``tfmeta <command> --help``.
With ``--json`` `train`, `evaluate` and `bench` print one JSON object as their last line.

The command line is three modules: :mod:`tfmeta.app.parser` (the flags and their defaults),
:mod:`tfmeta.app.commands` (what each subcommand does) and this one (dispatch, exit codes).
"""

from __future__ import annotations

import json
import sys

from tfmeta.app.commands import (
    _json_safe, cmd_bench, cmd_evaluate, cmd_export, cmd_search, cmd_train,
)
from tfmeta.app.parser import _given_flags, _parser, apply_preset, estimator_options, run_config  # noqa: F401
from tfmeta.app.rundir import RunDirectoryInUse
from tfmeta.core import runtime

__all__ = ["COMMANDS", "main", "estimator_options", "run_config", "apply_preset"]

COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export, "bench": cmd_bench,
            "search": cmd_search}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(with_search=not argv or argv[0] in ("search", "-h", "--help"))
    args = parser.parse_args(argv)
    from tfmeta.training import NonFiniteMetaStepError

    try:
        if args.command == "train" and args.resume:
            args._given = _given_flags(argv, "train")
        if args.command == "train" and args.preset and not args.resume:
            apply_preset(args, argv)
        if args.command != "export":
            if getattr(args, "cpu_devices", 1) > 1:
                runtime.split_cpu(args.cpu_devices)
            task_loop = not (args.command == "bench" and (args.estimator == "plain" or args.suite == "litert"))
            runtime.configure_threads(args.intra_op_threads, args.inter_op_threads, task_loop=task_loop)
        result = COMMANDS[args.command](args)
    except NonFiniteMetaStepError as err:
        print(f"tfmeta {args.command}: stopped: {err}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, FileExistsError, RuntimeError,
            RunDirectoryInUse) as err:
        print(f"tfmeta {args.command}: error: {err}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(_json_safe(result), allow_nan=False))
    return 0
