"""`tfmeta search`: Auto-Meta's progressive architecture search from the command line.

    tfmeta search --dataset omniglot --data-dir ../shared/data/omniglot --estimator reptile \\
        --blocks 3 --top-k 4 --trial-budget 20 --budget-minutes 30 --out autometa [--json]
    tfmeta search --quick --out /tmp/am          # B=2, K=2, two operators, tiny network: a smoke test
                                                 # (synthetic glyphs unless --data-dir is given)

Progress goes to stderr, one line per trial start and end ("trial i of n", elapsed time, best
score so far). Running the same command again on the same ``--out`` resumes an interrupted search
(KerasTuner's project directory ``<out>/tuner``); a different search there is refused. With
``--json`` the last line of stdout is the result (see :func:`tfmeta.app.autometa.search.run_search`).

`tfmeta/app/parser.py` and `tfmeta/app/commands.py` hook this in with :func:`add_parser` and :func:`run`; ``python -m
tfmeta.app.autometa.cli search ...`` runs it on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from tfmeta.app.flags import estimator_options, flag_name
from tfmeta.app.autometa.search import DATASETS, SearchConfig


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Create the ``search`` subcommand (all flags) on an argparse `subparsers` object."""
    from tfmeta import estimators
    from tfmeta.app.flags import add_estimator_flags, add_runtime_flags

    p = subparsers.add_parser(
        "search", help="Auto-Meta: progressive architecture search for a meta-learner (KerasTuner)",
        description=__doc__.split("\n")[0],
    )
    d = SearchConfig()
    q = SearchConfig.QUICK
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help=f"omniglot (disjoint alphabets per split) or synthetic glyphs (default {d.dataset}; "
                        "--quick without --data-dir: synthetic)")
    p.add_argument("--data-dir", default=None, help="directory with Omniglot's original archives")
    p.add_argument("--estimator", default=d.estimator, choices=estimators.names(),
                   help=f"meta-gradient estimator of every trial (default {d.estimator}, as Auto-Meta)")
    p.add_argument("--blocks", type=int, default=None, metavar="B",
                   help=f"most blocks per cell (default {d.blocks}; quick {q['blocks']})")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help=f"cells expanded and meta-trained per stage (default {d.top_k}; quick {q['top_k']})")
    p.add_argument("--trial-budget", type=int, default=None, metavar="STEPS",
                   help=f"meta-steps per candidate (default {d.trial_budget}; quick {q['trial_budget']})")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help=f"stop starting trials after this long, over all sessions (default {d.budget_minutes:g})")
    p.add_argument("--out", default=d.out, metavar="DIR", help=f"search directory (default {d.out})")
    p.add_argument("--quick", action="store_true",
                   help="a small end-to-end search: " + ", ".join(f"{k}={v}" for k, v in q.items()))
    p.add_argument("--operators", default=None,
                   help=f"comma-separated operator set (default all: {','.join(d.operators)})")
    for name, kind, what in (
        ("ways", int, "classes per task"), ("shots", int, "support examples per class"),
        ("query", int, "query examples per class"), ("meta_batch", int, "tasks per meta-step"),
        ("inner_steps", int, "inner steps T"), ("inner_lr", float, "inner learning rate"),
        ("meta_lr", float, "meta learning rate (Adam)"), ("image_size", int, "image side in pixels"),
        ("filters", int, "filters of the first stage"), ("cells_per_stage", int, "normal cells per stage (N)"),
        ("reductions", int, "reduction cells"), ("val_episodes", int, "meta-validation episodes per trial"),
        ("test_episodes", int, "meta-test episodes for the best candidate (0: none)"), ("seed", int, "seed"),
    ):
        default = getattr(d, name)
        p.add_argument(flag_name(name), type=kind, default=None,
                       help=f"{what} (default {default:g}" + (f"; quick {q[name]:g})" if name in q else ")"))
    from tfmeta.core.inner_optimizers import INNER_OPTIMIZERS

    p.add_argument("--inner-optimizer", default=None, choices=sorted(INNER_OPTIMIZERS))
    p.add_argument("--export-dir", default=None, help="where the best model is exported (default <out>/saved_models)")
    p.add_argument("--export-name", default=None, help="exported model name (default autometa_<dataset>)")
    p.add_argument("--no-export", action="store_true", help="do not export the best candidate")
    add_estimator_flags(p)
    add_runtime_flags(p, distribute=False)
    return p


def config_from_args(args) -> SearchConfig:
    """The SearchConfig of parsed flags: --quick's settings, then every flag given."""
    fields = {f.name for f in dataclasses.fields(SearchConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["estimator_options"] = estimator_options(args)
    return SearchConfig.quick(**values) if args.quick else SearchConfig(**values)


def run(args) -> dict:
    """Run `tfmeta search` for parsed `args`; returns the JSON result (ValueError on bad input)."""
    import tensorflow as tf

    from tfmeta.app.autometa.search import run_search

    tf.get_logger().setLevel("ERROR")  # every candidate is a new graph: retracing warnings are expected
    config = config_from_args(args)
    result = run_search(config, export=not args.no_export, summary_trials=0 if args.json else 3)
    if not args.json:
        best = result["best"]
        print(f"best of {result['trials_completed']} candidates (trial {int(best['trial_id']) + 1}, "
              f"KerasTuner trial_{best['trial_id']}): "
              f"{best['cell_description']}; val accuracy {100 * best['score']:.2f}%")
        if result["test"]:
            t = result["test"]
            print(f"meta-test accuracy over {t['episodes']} episodes: {100 * t['accuracy_after']:.2f}% "
                  f"± {100 * t['accuracy_after_ci95']:.2f}")
        print(f"architecture: {result['architecture']}" + (f"; exported {result['export']}" if result["export"] else ""))
        if not result["complete"]:
            print(f"search stopped ({result['stopped_by']}) at stage {result['stage']} of {result['blocks']}: "
                  "run the same command (with a larger --budget-minutes) to continue it")
    return result


def main(argv=None) -> int:
    """``python -m tfmeta.app.autometa.cli search ...``: the same command outside `tfmeta`."""
    from tfmeta.core import runtime
    from tfmeta.app.rundir import RunDirectoryInUse

    parser = argparse.ArgumentParser(prog="python -m tfmeta.app.autometa.cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    runtime.configure_threads(args.intra_op_threads, args.inter_op_threads)
    try:
        result = run(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, RunDirectoryInUse) as err:
        print(f"tfmeta search: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tfmeta search: interrupted; run the same command to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
