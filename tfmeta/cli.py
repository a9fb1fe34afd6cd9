"""The `tfmeta` command line: train, evaluate, export, bench, search.

`tfmeta train` with no flags is the main job: sinusoid 5-shot regression with exact MAML, its
meta-training capped by the default ``--time-budget`` of 100 s (about 1.5 minutes in all on two
CPU cores; a capped run says "stopped by --time-budget at step N of M"), a progress bar, a final
line comparing held-out MSE before and after adaptation, and a SavedModel of the learned
initialization under ``saved_models/``. Every flag's default is in ``tfmeta <command> --help``.
With ``--json`` `train`, `evaluate` and `bench` print one JSON object as their last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from tfmeta import runtime
from tfmeta.rundir import RunDirectoryInUse, RunLock

_RUNS = "runs"
#: RunConfig fields that `train --resume` may change (everything else defines the run).
RESUMABLE = ("iterations", "data_dir")


def _checked(convert, ok, expected: str):
    """An argparse type: `convert` the text, then require `ok(value)`; the message says what was
    expected (one vocabulary for every numeric flag)."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a finite number > 0")
_seconds = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a finite number of seconds >= 0")
_unit_float = _checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_nonnegative_float = _checked(float, lambda v: v >= 0, "a number >= 0")
_step_list = _checked(lambda t: [int(s) for s in t.split(",")], lambda v: len(v) > 0 and all(s >= 1 for s in v),
                      "a comma-separated list of meta-step counts >= 1 (e.g. 10,20,40,80)")
_threads = _checked(lambda t: t if t == "auto" else int(t), lambda v: v == "auto" or v >= 0,
                    "an integer >= 0 or 'auto'")


def _add_runtime_flags(p, distribute=True):
    if distribute:
        p.add_argument("--strategy", default="default", choices=runtime.STRATEGIES,
                       help="tf.distribute strategy: the meta-batch's tasks are split across replicas")
        p.add_argument("--cpu-devices", type=_positive_int, default=1,
                       help="split the CPU into this many logical devices (replicas on a CPU-only machine)")
    p.add_argument("--intra-op-threads", type=_threads, default="auto",
                   help="TensorFlow intra-op threads ('auto': 1 per op on CPU, tasks run side by side)")
    p.add_argument("--inter-op-threads", type=_threads, default="auto",
                   help="TensorFlow inter-op threads ('auto': one per core on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _add_estimator_flags(p):
    """One flag per estimator option (``--reuse-window`` ...), default: the estimator's own."""
    from tfmeta import estimators

    for flag in estimators.all_flags():
        p.add_argument("--" + flag.name.replace("_", "-"), dest=flag.name, type=flag.type,
                       default=None, help=f"{flag.help} (default {flag.default})")
    p.add_argument("--linearity-metrics", action="store_true",
                   help="log Phase and Amplitude Consistency (LIL, Eq. 3-4) every meta-step for any estimator")


def estimator_options(args) -> dict:
    """The chosen estimator's options that were given on the command line."""
    from tfmeta import estimators

    flags = list(estimators.get_class(args.estimator).flags)
    if getattr(args, "base", None) or any(f.name == "base" for f in flags):
        # a wrapper (e.g. linearity --base reuse) also takes its base estimator's flags
        base = getattr(args, "base", None) or next(f.default for f in flags if f.name == "base")
        flags += list(estimators.get_class(base).flags) if base in estimators.names() else []
    return {f.name: getattr(args, f.name) for f in flags if getattr(args, f.name, None) is not None}


def _per_dataset(name: str) -> str:
    """'(default: 5 for omniglot, 1 for sinusoid, ...)', from `config.DATASET_DEFAULTS`."""
    from tfmeta.config import DATASET_DEFAULTS

    return "(default: " + ", ".join(
        f"{_fmt(values[name])} for {dataset}" for dataset, values in DATASET_DEFAULTS.items()) + ")"


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_train_flags(p):
    from tfmeta import estimators
    from tfmeta.config import RunConfig
    from tfmeta.data import DATASETS
    from tfmeta.inner_optimizers import INNER_OPTIMIZERS

    d = RunConfig()  # the one source of the flags' defaults (per dataset: DATASET_DEFAULTS)
    p.add_argument("--estimator", default=d.estimator, choices=estimators.names(), help="meta-gradient estimator")
    p.add_argument("--dataset", default=d.dataset, choices=DATASETS, help="task distribution")
    p.add_argument("--data-dir", default=d.data_dir,
                   help="directory with Omniglot's original archives (default: tensorflow-datasets download)")
    p.add_argument("--model", default=d.model, choices=["conv4", "mlp", "point"], help="network " + _per_dataset("model"))
    p.add_argument("--ways", type=_positive_int, default=d.ways, help="classes per task " + _per_dataset("ways"))
    p.add_argument("--shots", type=_positive_int, default=d.shots,
                   help="support examples per class " + _per_dataset("shots"))
    p.add_argument("--query", type=_positive_int, default=d.query,
                   help="query examples per class " + _per_dataset("query"))
    p.add_argument("--inner-steps", type=_positive_int, default=d.inner_steps,
                   help="inner steps T " + _per_dataset("inner_steps"))
    p.add_argument("--inner-lr", type=_positive_float, default=d.inner_lr,
                   help="inner learning rate " + _per_dataset("inner_lr"))
    p.add_argument("--inner-optimizer", default=d.inner_optimizer, choices=sorted(INNER_OPTIMIZERS),
                   help="inner optimizer " + _per_dataset("inner_optimizer"))
    p.add_argument("--inner-momentum", type=_unit_float, default=None,
                   help="momentum mu of --inner-optimizer momentum (Kim et al. 2020, Eq. 5; default 0.9)")
    p.add_argument("--inner-weight-decay", type=_nonnegative_float, default=None,
                   help="weight decay omega of --inner-optimizer momentum (Kim et al. 2020, Eq. 5; default 0)")
    p.add_argument("--adapt", default=d.adapt, choices=["all", "head", "body"],
                   help="weights adapted in the inner loop: all (MAML), head (ANIL), body (BOIL)")
    p.add_argument("--meta-lr", type=_positive_float, default=d.meta_lr, help="meta learning rate")
    p.add_argument("--meta-optimizer", default=d.meta_optimizer, choices=["adam", "sgd"],
                   help="meta-optimizer (sgd: Reptile's epsilon, shifting's beta)")
    p.add_argument("--meta-batch", type=_positive_int, default=d.meta_batch,
                   help="tasks per meta-step " + _per_dataset("meta_batch"))
    p.add_argument("--iterations", type=_positive_int, default=d.iterations,
                   help="meta-steps " + _per_dataset("iterations"))
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initialization and the task streams")
    from tfmeta.config import META_LR_SCHEDULES

    p.add_argument("--meta-lr-schedule", default=d.meta_lr_schedule, choices=list(META_LR_SCHEDULES),
                   help="meta learning rate: constant, or cosine (keras CosineDecay from --meta-lr to "
                        "--min-meta-lr over --iterations; MAML++)")
    p.add_argument("--min-meta-lr", type=_nonnegative_float, default=d.min_meta_lr,
                   help="final meta learning rate of --meta-lr-schedule cosine")
    p.add_argument("--lslr", action=argparse.BooleanOptionalAction, default=d.lslr,
                   help="MAML++: meta-learn one inner learning rate per layer weight and inner step")
    p.add_argument("--per-step-bn", action=argparse.BooleanOptionalAction, default=d.per_step_bn,
                   help="MAML++: one meta-learned set of BatchNorm gamma/beta per inner step (needs BatchNorm: conv4)")
    _add_remat_flag(p)
    _add_estimator_flags(p)


def _add_remat_flag(p):
    from tfmeta.config import RunConfig
    from tfmeta.learner import REMAT_HELP

    p.add_argument("--remat", default=RunConfig.remat, metavar="{none,sqrt,every:K}",
                   help=f"{REMAT_HELP} (default none)")


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows each flag's default (argparse %-formats help text: write %% for %)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (text == argparse.SUPPRESS or "(default" in text or not action.option_strings or action.nargs == 0
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _add_preset_flag(p):
    from tfmeta.presets import PRESETS

    p.add_argument("--preset", default=None, choices=list(PRESETS), metavar="NAME",
                   help="a paper's settings (flags given explicitly override them; see "
                        "docs/presets.md): " + ", ".join(PRESETS))


def apply_preset(args, argv) -> None:
    """Give `args` the values of its `--preset`, except for the flags typed in `argv`."""
    from tfmeta import presets

    presets.apply(args.preset, args, _given_flags(argv, "train"))
    preset = presets.get(args.preset)
    print(f"preset {args.preset}: {preset.citation}, {preset.where}", file=sys.stderr)


def run_config(args):
    """The resolved RunConfig of parsed `tfmeta train` arguments (a new run)."""
    from tfmeta.config import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in fields},
                     estimator_options=estimator_options(args)).resolved()


def _parser(with_search: bool = True) -> argparse.ArgumentParser:
    from tfmeta.config import TrainOptions

    t = TrainOptions()  # the one source of `tfmeta train`'s run-option defaults
    parser = argparse.ArgumentParser(prog="tfmeta", description=__doc__.split("\n")[0],
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="meta-train a model (default: sinusoid MAML, meta-training capped "
                                         f"at --time-budget {t.time_budget:g} s)")
    _add_train_flags(train)
    _add_preset_flag(train)
    train.add_argument("--out", default=None, help="run directory (default runs/<dataset>-<estimator>-<time>)")
    train.add_argument("--resume", default=None, metavar="RUNDIR",
                       help="continue the run in RUNDIR (may change: " + ", ".join(
                           "--" + f.replace("_", "-") for f in RESUMABLE) + " and the flags of this "
                       "session; not the run's definition)")
    train.add_argument("--checkpoint", default=None, metavar="CKPT",
                       help="with --resume: continue from this checkpoint (e.g. ckpt-20) instead of the latest")
    train.add_argument("--time-budget", type=_seconds, default=t.time_budget,
                       help="stop meta-training after this many seconds, even before --iterations; the run "
                            "says so and --resume continues it (0: no limit)")
    train.add_argument("--checkpoint-every", type=_positive_int, default=t.checkpoint_every,
                       help="meta-steps between checkpoints")
    train.add_argument("--episodes", type=_positive_int, default=t.episodes,
                       help="held-out episodes for the final evaluation")
    train.add_argument("--export-dir", default="saved_models", help="where the learned initialization is exported")
    train.add_argument("--no-export", action="store_true", help="do not export the learned initialization")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--clip-norm", type=_positive_float, default=None,
                       help="clip the meta-gradient to this global norm")
    train.add_argument("--on-nonfinite", default="stop", choices=["stop", "skip"],
                       help="a NaN/Inf meta-loss, meta-gradient or update stops the run, or skips that step")
    train.add_argument("--max-skips", type=int, default=None, metavar="N",
                       help="with --on-nonfinite skip: stop (exit 3) after more than N meta-steps in a row "
                            "were skipped (default %d)" % _default_max_skips())
    train.add_argument("--deterministic", action="store_true",
                       help="tf.config.experimental.enable_op_determinism (bitwise-repeatable runs)")
    train.add_argument("--steps-per-epoch", type=_positive_int, default=t.steps_per_epoch,
                       help="meta-steps between validations (Keras epochs)")
    train.add_argument("--validation-batches", type=_positive_int, default=t.validation_batches,
                       help="task batches of the val split evaluated after each epoch")
    train.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                       help="do not write TensorBoard logs to RUNDIR/logs")
    _add_runtime_flags(train)

    evaluate = sub.add_parser("evaluate", help="adapt to held-out episodes: mean and 95%% CI")
    evaluate.add_argument("--run", default=None, help="run directory (default: the newest under runs/)")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"], help="which classes")
    evaluate.add_argument("--episodes", type=_positive_int, default=t.episodes, help="held-out episodes")
    evaluate.add_argument("--inner-steps", type=_positive_int, default=None, help="adaptation steps (default: the run's)")
    evaluate.add_argument("--checkpoint", default=None, metavar="CKPT",
                          help="evaluate this checkpoint (e.g. ckpt-20) instead of the latest")
    _add_runtime_flags(evaluate, distribute=False)

    export = sub.add_parser("export", help="export a run's learned initialization in TF Serving's layout")
    export.add_argument("--run", default=None, help="run directory (default: the newest under runs/)")
    export.add_argument("--export-dir", default="saved_models")
    export.add_argument("--name", default=None, help="model name (default <dataset>_<estimator>)")
    export.add_argument("--adapt-on", default=None, metavar="SUPPORT.npz",
                        help="export the model adapted to one task: an .npz with support_x and support_y")
    export.add_argument("--checkpoint", default=None, metavar="CKPT",
                        help="export this checkpoint (e.g. ckpt-20) instead of the latest")
    from tfmeta.export_tflite import DEFAULT_PROFILE, PROFILES
    export.add_argument("--tflite", action="store_true",
                        help="also write model.tflite (LiteRT: adapt_and_predict and predict) into the version")
    export.add_argument("--tflite-profile", default=DEFAULT_PROFILE, choices=list(PROFILES),
                        help="; ".join(f"{k}: {v}" for k, v in PROFILES.items()) + f" (default {DEFAULT_PROFILE})")
    export.add_argument("--tflite-shots", type=_positive_int, default=None,
                        help="support examples per class of the .tflite's fixed support set (default: the run's shots)")

    bench = sub.add_parser("bench", help="time one meta-step configuration (conv4 on random inputs)")
    from tfmeta.bench import ESTIMATORS
    bench.add_argument("--suite", default="step", choices=["step", "soak", "cost", "accuracy", "learning", "litert"],
                       help="step: time one configuration; soak: 2,000 sinusoid meta-steps, memory every "
                            "100; cost: every estimator x inner steps, one process each; accuracy: every "
                            "estimator on Omniglot for the same wall-clock budget; learning: MAML's held-out "
                            "accuracy against meta-steps and seconds, tfmeta beside learn2learn "
                            "(../shared/peerbench) when its venv is present; litert: size and "
                            "adapt_and_predict latency of the .tflite (head adaptation) against the SavedModel")
    bench.add_argument("--quick", action="store_true", help="cost suite: a small subset (every estimator once at T = 2, about 2 minutes)")
    bench.add_argument("--plot", default=None, metavar="DIR", help="cost/accuracy/learning suites: write PNG plots to DIR")
    bench.add_argument("--output", default=None, metavar="FILE", help="cost/accuracy/learning suites: write the JSON report to FILE")
    bench.add_argument("--data-dir", default=None, help="accuracy/learning suites: Omniglot's original archives (learning: default $TFMETA_OMNIGLOT_DIR)")
    bench.add_argument("--budget-minutes", type=_positive_float, default=5.0,
                       help="accuracy suite: meta-training wall-clock budget per estimator")
    bench.add_argument("--checkpoints", type=_step_list, default=None,
                       help="learning suite: meta-steps at which held-out accuracy is measured (default: "
                            "1/8, 1/4, 1/2 and all of --steps, i.e. 10,20,40,80)")
    bench.add_argument("--seconds", type=_seconds, default=0.0,
                       help="learning suite: also measure after this many seconds of meta-training (0: no)")
    bench.add_argument("--episodes", type=_positive_int, default=200,
                       help="learning suite: held-out episodes per measurement")
    bench.add_argument("--no-peer", action="store_true", help="learning suite: tfmeta only, not learn2learn")
    bench.add_argument("--peer-dir", default=None, metavar="DIR",
                       help="learning suite: folder with l2l_omniglot.py (default: DATA_DIR/../../peerbench)")
    bench.add_argument("--peer-python", default=None, metavar="FILE",
                       help="learning suite: learn2learn's venv Python (default ~/.cache/peer-venv/bin/python)")
    bench.add_argument("--peer-threads", type=_positive_int, default=None,
                       help="learning suite: learn2learn's torch threads (default: one per core)")
    bench.add_argument("--filters", type=_positive_int, default=64, help="conv4 filters")
    bench.add_argument("--estimator", default="maml", choices=ESTIMATORS)
    bench.add_argument("--model", default="conv4", choices=["conv4"])
    bench.add_argument("--ways", type=_positive_int, default=5)
    bench.add_argument("--shots", type=_positive_int, default=1)
    bench.add_argument("--query", type=_positive_int, default=15)
    bench.add_argument("--meta-batch", type=_positive_int, default=None,
                       help="tasks per meta-step (default 8; cost suite 4, quick 2; accuracy and learning 8)")
    bench.add_argument("--inner-steps", type=_positive_int, default=5)
    bench.add_argument("--steps", type=_positive_int, default=None,
                       help="timed meta-steps after the first call (default 5; soak: 2000; learning: meta-steps of "
                            "meta-training, default 80 or the last --checkpoints)")
    bench.add_argument("--unroll", action="store_true", help="unroll the inner loop in the graph")
    bench.add_argument("--parallel-tasks", type=_positive_int, default=2,
                       help="tasks of the task loop that may run at once")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--tflite-profile", default=DEFAULT_PROFILE, choices=list(PROFILES),
                       help="litert suite: builtin (head adaptation, LiteRT interpreter) or full (every layer, Flex; "
                            "timed in $TFMETA_FLEX_PYTHON's tf.lite.Interpreter when set)")
    _add_remat_flag(bench)
    _add_estimator_flags(bench)
    _add_runtime_flags(bench)
    if with_search:  # imports KerasTuner: only when the command may be `search`
        from tfmeta.autometa import cli as autometa_cli

        autometa_cli.add_parser(sub)
    for subparser in sub.choices.values():
        subparser.formatter_class = _HelpFormatter
    return parser


def _newest_run() -> str:
    runs = [os.path.join(_RUNS, d) for d in os.listdir(_RUNS)] if os.path.isdir(_RUNS) else []
    runs = [r for r in runs if os.path.isfile(os.path.join(r, "config.json"))]
    if not runs:
        raise ValueError("--run was not given and runs/ holds no run: train one first (tfmeta train).")
    return max(runs, key=os.path.getmtime)


def _load_run(run_dir: str | None, checkpoint: str | None = None):
    from tfmeta.config import RunConfig, build_estimator, build_learner, build_meta_optimizer
    from tfmeta.training import MetaTrainer

    run_dir = run_dir or _newest_run()
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--run={run_dir!r} is not a tfmeta run directory (no config.json): expected a "
                         f"directory written by tfmeta train, or from Python by RunConfig.save(RUNDIR/config.json) "
                         f"and MetaTrainer(checkpoint_dir=RUNDIR/checkpoints) (README: Using it from Python).")
    config = RunConfig.load(path).resolved()
    learner = build_learner(config)
    trainer = MetaTrainer(learner, build_estimator(config), build_meta_optimizer(config),
                          checkpoint_dir=os.path.join(run_dir, "checkpoints"))
    if trainer.restore(checkpoint) == 0:
        raise ValueError(f"--run={run_dir!r} has no checkpoint yet.")
    if trainer.restore_note:
        print(f"note: {trainer.restore_note}", file=sys.stderr)
    return run_dir, config, learner, trainer.estimator


#: Files and directories a tfmeta run writes into its directory.
_RUN_FILES = ("config.json", "config.json.tmp", "checkpoints", "metrics.csv", "logs", ".lock", "checkpoint")


def _default_max_skips() -> int:
    from tfmeta.keras_model import DEFAULT_MAX_SKIPS

    return DEFAULT_MAX_SKIPS


def _check_directory_path(flag: str, path: str) -> None:
    """`path` must be a directory or creatable as one: not a file, nor under a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}={path!r} is a file, not a directory.")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"{flag}={path!r} cannot be created: {parent!r} is a file, not a directory.")


def _describe(run_dir: str, names: list[str]) -> str:
    from tfmeta.training import checkpoint_numbers

    parts = []
    for name in names:
        path = os.path.join(run_dir, name)
        if name == "checkpoints" and os.path.isdir(path):
            numbers = checkpoint_numbers(path)
            parts.append("checkpoints/ (" + (", ".join(f"ckpt-{n}" for n in numbers) or
                                             ", ".join(sorted(os.listdir(path))) or "empty") + ")")
        else:
            parts.append(name + ("/" if os.path.isdir(path) else ""))
    return ", ".join(parts)


def _check_new_run_dir(run_dir: str) -> None:
    """A new run's directory: absent, empty, or without anything a run writes (nothing is deleted)."""
    _check_directory_path("--out", run_dir)
    if not os.path.isdir(run_dir):
        return
    entries = os.listdir(run_dir)
    if "config.json" in entries:
        raise ValueError(f"--out={run_dir!r} already holds a run: pass --resume {run_dir} to continue it.")
    found = sorted(e for e in entries if e in _RUN_FILES or e.startswith("ckpt-"))
    if found:
        raise ValueError(
            f"--out={run_dir!r} holds files of an incomplete tfmeta run ({_describe(run_dir, found)}) but no "
            "config.json: refusing to train over them. Nothing was changed; choose another --out, or move "
            "those files away.")


def _given_flags(argv: list[str], command: str) -> set[str]:
    """The destinations of the flags given explicitly on the command line."""
    parser = _parser(with_search=False)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def _resume_changes(args, config) -> dict:
    """Flags given with --resume: refuse those that would redefine the run; return the allowed
    changes {field: (old, new)} (applied to `config` by the caller)."""
    from tfmeta import estimators

    given = getattr(args, "_given", set())
    conflicts, changes = [], {}
    if "out" in given and os.path.abspath(args.out) != os.path.abspath(args.resume):
        conflicts.append(f"--out {args.out} (the run is in {args.resume})")
    fields = {f.name for f in dataclasses.fields(type(config))} - {"estimator_options"}
    for name in sorted(given & fields):
        new, old = getattr(args, name), getattr(config, name)
        if new == old:
            continue
        if name in RESUMABLE:
            changes[name] = (old, new)
        else:
            conflicts.append(f"--{name.replace('_', '-')} {new} (the run has {old})")
    option_names = {f.name: f.default for cls in map(estimators.get_class, estimators.names()) for f in cls.flags}
    for name in sorted(given & set(option_names)):
        new = getattr(args, name)
        old = config.estimator_options.get(name, option_names[name])
        if new != old:
            conflicts.append(f"--{name.replace('_', '-')} {new} (the run has {old})")
    if conflicts:
        raise ValueError(
            f"--resume {args.resume}: {'; '.join(conflicts)}: these flags define the run and cannot change "
            "when it resumes. Drop them, or start a new run with --out. (May change on resume: "
            + ", ".join("--" + f.replace("_", "-") for f in RESUMABLE) + " and the session's flags.)")
    return changes


def _check_memory(config) -> None:
    from tfmeta.config import physical_memory_bytes, task_batch_bytes

    need, have = task_batch_bytes(config), physical_memory_bytes()
    if have and need > have:
        raise ValueError(
            f"--meta-batch {config.meta_batch} (with --ways {config.ways}, --shots {config.shots}, --query "
            f"{config.query}) needs at least {need / 2**30:,.1f} GiB for one task batch, more than this "
            f"machine's {have / 2**30:,.1f} GiB of memory: lower --meta-batch (or the examples per task).")


def _json_safe(value):
    """`value` with every non-finite float as None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _summary_line(result: dict, task: str, what: str = "MSE") -> str:
    if task == "regression":
        return (
            f"held-out {what} over {result['episodes']} tasks: before adaptation "
            f"{result['loss_before']:.4f} ± {result['loss_before_ci95']:.4f}, after "
            f"{result['loss_after']:.4f} ± {result['loss_after_ci95']:.4f}"
        )
    return (
        f"held-out accuracy over {result['episodes']} episodes: before adaptation "
        f"{100 * result['accuracy_before']:.2f}% ± {100 * result['accuracy_before_ci95']:.2f}, after "
        f"{100 * result['accuracy_after']:.2f}% ± {100 * result['accuracy_after_ci95']:.2f}"
    )


def cmd_train(args) -> dict:
    import tensorflow as tf

    from tfmeta.config import RunConfig, build_sampler

    changes = {}
    if args.resume:
        run_dir = args.resume
        path = os.path.join(run_dir, "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"--resume={run_dir!r} is not a tfmeta run directory (no config.json).")
        config = RunConfig.load(path)
        changes = _resume_changes(args, config)
        config = dataclasses.replace(config, **{k: new for k, (_, new) in changes.items()}).resolved()
    else:
        if args.checkpoint is not None:
            raise ValueError(f"--checkpoint={args.checkpoint!r} needs --resume RUNDIR (it picks the "
                             "checkpoint a run continues from).")
        config = run_config(args)
        run_dir = args.out or os.path.join(
            _RUNS, f"{config.dataset}-{config.estimator}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        _check_new_run_dir(run_dir)
    if args.max_skips is not None and args.max_skips < 0:
        raise ValueError(f"--max-skips={args.max_skips} is not valid: expected an integer >= 0.")
    if not args.no_export:
        _check_directory_path("--export-dir", args.export_dir)
    _check_memory(config)
    args._changes = changes
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = runtime.make_strategy(args.strategy)
    runtime.check_split(config.meta_batch, strategy)
    chief = runtime.is_chief(strategy)
    if not chief:  # other workers checkpoint beside the chief's run, and export nothing
        run_dir = f"{run_dir.rstrip(os.sep)}-worker{strategy.cluster_resolver.task_id}"
    train_tasks = build_sampler(config, "train")
    test_tasks = build_sampler(config, "test", seed=config.seed + 1)
    with RunLock(run_dir):
        return _train_locked(args, config, run_dir, strategy, chief, train_tasks, test_tasks)


def _train_locked(args, config, run_dir, strategy, chief, train_tasks, test_tasks) -> dict:
    """The body of `tfmeta train`, run while this process holds the run directory's lock."""
    import keras
    import tensorflow as tf

    from tfmeta import evaluation, export
    from tfmeta.config import build_estimator, build_learner, build_meta_optimizer, build_sampler
    from tfmeta.training import MetaTrainer

    with strategy.scope():
        learner = build_learner(config)
        trainer = MetaTrainer(
            learner,
            build_estimator(config),
            build_meta_optimizer(config),
            checkpoint_dir=os.path.join(run_dir, "checkpoints"),
            checkpoint_every=args.checkpoint_every,
            clip_norm=args.clip_norm,
            on_nonfinite=args.on_nonfinite,
            max_skips=_default_max_skips() if args.max_skips is None else args.max_skips,
        )
    # Check what a resume starts from before writing anything: a failed resume changes no file.
    start = trainer.restore(args.checkpoint)
    if trainer.restore_note:
        print(f"note: {trainer.restore_note}", file=sys.stderr)
    if args.checkpoint is not None:
        from tfmeta.training import checkpoint_numbers

        newer = [n for n in checkpoint_numbers(trainer.checkpoint_dir, indexed=True)
                 if n > start]
        if newer:
            raise ValueError(
                f"--checkpoint {args.checkpoint}: {trainer.checkpoint_dir!r} holds newer checkpoints "
                f"({', '.join(f'ckpt-{n}' for n in newer)}) that continuing from step {start} would "
                "overwrite. Move them out of that directory first (evaluate and export can use "
                "--checkpoint without this).")
    if args.resume and config.iterations < start:
        raise ValueError(f"--iterations {config.iterations} is below the {start} meta-steps the run in "
                         f"{run_dir!r} already made.")
    changes = getattr(args, "_changes", {})
    for name, (old, new) in changes.items():
        print(f"resuming {run_dir}: --{name.replace('_', '-')} {new} (was {old})")
    if not args.resume or changes:
        config.save(os.path.join(run_dir, "config.json"))
    callbacks = [keras.callbacks.CSVLogger(os.path.join(run_dir, "metrics.csv"), append=True)]
    if args.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(run_dir, "logs")))
    began = time.monotonic()
    history = trainer.fit(
        train_tasks,
        config.iterations,
        time_budget=args.time_budget or None,
        progress=not args.no_progress,
        callbacks=callbacks,
        steps_per_epoch=args.steps_per_epoch,
        validation_data=build_sampler(config, "val", seed=config.seed + 2),
        validation_steps=args.validation_batches,
        checkpoint=args.checkpoint,
    )
    seconds = time.monotonic() - began
    result = evaluation.evaluate(learner, test_tasks, episodes=args.episodes, estimator=trainer.estimator)
    exported = None
    if not args.no_export and chief:
        exported = export.export_adapter(learner, args.export_dir, f"{config.dataset}_{config.estimator}")
    effect = trainer.inner_loop_report
    if effect is not None:
        change = effect["median_change"]
        n = effect["inner_steps"]
        one = n == 1
        print(f"inner loop at the initialization: {n} step{'' if one else 's'} lower{'s' if one else ''} the "
              f"support loss by {100 * effect['support_loss_drop']:.1f}%"
              + (f" and move{'s' if one else ''} the kernels by {100 * change:.0f}% of their norm (median)"
                 if change is not None else "")
              + (" - too little, see the warning above" if effect["stalled"] else ""))
    steps, start = int(trainer.step.numpy()), trainer.start_step
    if start >= config.iterations:
        done = f"the run already had {start} of {config.iterations} meta-steps: nothing to train"
    elif start:
        done = f"resumed at step {start}: meta-trained steps {start + 1}-{steps} ({steps - start}) in {seconds:.1f}s"
    else:
        done = f"meta-trained {steps} steps in {seconds:.1f}s"
    print(f"{done}; run directory {run_dir}" + (f"; exported {exported}" if exported else ""))
    if trainer.stopped_by_time_budget:
        print(f"stopped by --time-budget at step {steps} of {config.iterations} ({args.time_budget:g} s); "
              f"continue with: tfmeta train --resume {run_dir}")
    print(_summary_line(result, learner.task, "MSE" if config.dataset == "sinusoid" else "loss"))
    return {"run_dir": run_dir, "steps": steps, "start_step": start, "iterations": config.iterations,
            "stopped_by_time_budget": trainer.stopped_by_time_budget, "train_seconds": seconds, "export": exported,
            "resume_changes": {k: new for k, (_, new) in changes.items()},
            "replicas": strategy.num_replicas_in_sync,
            "meta_parameters_checksum": float(sum(float(tf.reduce_sum(tf.cast(v, tf.float64)))
                                                  for v in learner.meta_variables)),
            "final_train_loss": history[-1]["loss"] if history else None,
            "inner_loop": effect, **result}


def cmd_evaluate(args) -> dict:
    from tfmeta import evaluation
    from tfmeta.config import build_sampler

    run_dir, config, learner, estimator = _load_run(args.run, args.checkpoint)
    sampler = build_sampler(config, args.split, seed=config.seed + 1)
    result = evaluation.evaluate(learner, sampler, episodes=args.episodes, steps=args.inner_steps,
                                 estimator=estimator)
    print(_summary_line(result, learner.task, "MSE" if config.dataset == "sinusoid" else "loss"))
    return {"run_dir": run_dir, "split": args.split, **result}


def cmd_export(args) -> dict:
    from tfmeta import export

    run_dir, config, learner, _ = _load_run(args.run, args.checkpoint)
    name = args.name or f"{config.dataset}_{config.estimator}"
    if args.adapt_on is not None and args.tflite:
        raise ValueError("--tflite exports the adapting model; it cannot be combined with --adapt-on.")
    if args.tflite:
        from tfmeta import export_tflite

        shots = args.tflite_shots or config.shots
        path = export_tflite.export_tflite(learner, args.export_dir, name, shots=shots, profile=args.tflite_profile)
        size = os.path.getsize(os.path.join(path, export_tflite.FILENAME))
        print(f"wrote {os.path.join(path, export_tflite.FILENAME)} ({size / 1024:.1f} KiB, profile "
              f"{args.tflite_profile}, support set of {export_tflite.support_size(learner, shots)} examples)")
    elif args.adapt_on is None:
        path = export.export_adapter(learner, args.export_dir, name)
    else:
        import numpy as np

        if not os.path.isfile(args.adapt_on):
            raise ValueError(f"--adapt-on={args.adapt_on!r} is not a file.")
        with np.load(args.adapt_on) as support:
            missing = {"support_x", "support_y"} - set(support.files)
            if missing:
                raise ValueError(f"--adapt-on={args.adapt_on!r} lacks arrays {sorted(missing)}.")
            path = export.export_adapted(learner, support["support_x"], support["support_y"],
                                         args.export_dir, args.name or f"{name}_adapted")
    print(f"exported {run_dir} to {path}")
    return {"run_dir": run_dir, "export": path}


def cmd_bench(args) -> dict:
    from tfmeta import bench, suites

    if args.suite == "cost":
        report = suites.cost(quick=args.quick, meta_batch=args.meta_batch, steps=args.steps,
                             json_path=args.output, plot_dir=args.plot)
        if not args.json:
            for row in report["results"]:
                figures = row.get("error") or (f"{row['seconds_per_step_median']:.3f} s/step, "
                                               f"{row['peak_rss_mb']:.0f} MB")
                print(f"{row['label']:>10} T={row['inner_steps']:<3} {figures}")
            for name, target in report["targets"].items():
                print(f"{name}: {target['value']:.2f} ({'met' if target['met'] else 'missed'})")
        return report
    if args.suite == "accuracy":
        report = suites.accuracy(args.data_dir, budget_minutes=args.budget_minutes,
                                 meta_batch=args.meta_batch or 8, json_path=args.output, plot_dir=args.plot)
        if not args.json:
            for row in report["results"]:
                acc = row.get("accuracy_after")
                print(f"{row['estimator']:>10}: " + (row.get("error") or
                      f"{100 * acc:.2f}% ± {100 * row['accuracy_after_ci95']:.2f} after {row['steps']} meta-steps"))
        return report

    if args.suite == "learning":
        from tfmeta import suites_learning

        report = suites_learning.run(
            args.data_dir, steps=args.steps, checkpoints=args.checkpoints, seconds=args.seconds,
            meta_batch=args.meta_batch or 8, inner_steps=args.inner_steps, episodes=args.episodes, seed=args.seed,
            peer=not args.no_peer, peer_dir=args.peer_dir, peer_python=args.peer_python,
            peer_threads=args.peer_threads, json_path=args.output, plot_dir=args.plot)
        if not args.json:
            for name, tool in report["tools"].items():
                if "skipped" in tool:
                    print(f"{name:>11}: skipped ({tool['skipped']})")
                for p in tool.get("points", []):
                    print(f"{name:>11}: " + (p.get("error") or
                          f"step {p['meta_step']:>4}, {p['train_seconds']:7.1f} s: {p['accuracy']:.1f}% ± {p['ci95']:.1f}"))
        return report

    if args.suite == "litert":
        from tfmeta import export_tflite

        result = export_tflite.benchmark(ways=args.ways, shots=args.shots, query=args.query, filters=args.filters,
                                         inner_steps=args.inner_steps, repeats=args.steps or 20, seed=args.seed,
                                         profile=args.tflite_profile,
                                         flex_python=os.environ.get(export_tflite.FLEX_PYTHON_ENV) or None)
        if not args.json:
            lite = result["litert_seconds_median"]
            lite = (f"{1000 * lite:.1f} ms ({result['litert_runtime']})" if lite is not None else
                    f"not run ({result['litert_error']}; set {export_tflite.FLEX_PYTHON_ENV})")
            print(f"litert ({result['profile']} profile, adapt={result['adapt']}): model.tflite "
                  f"{result['tflite_bytes'] / 1024:.1f} KiB, Flex ops {result['flex_ops'] or 'none'}; adapt_and_predict "
                  f"{args.ways}-way {args.shots}-shot, {result['query']} query: LiteRT {lite}, SavedModel "
                  f"{1000 * result['saved_model_seconds_median']:.1f} ms (median of {result['repeats']})")
        return result

    if args.suite == "soak":
        steps = args.steps or 2000
        result = bench.soak(args.estimator, steps=steps, seed=args.seed)
        if not args.json:
            print(f"soak: {steps} steps, resident memory {result['rss_mb']} MB, growth "
                  f"{result['rss_growth_percent']:.1f}%, retraces after warm-up {result['retraces_after_warmup']}")
        return result

    result = bench.run(
        args.estimator, model=args.model, ways=args.ways, shots=args.shots, query=args.query,
        meta_batch=args.meta_batch or 8, inner_steps=args.inner_steps, steps=args.steps or 5,
        filters=args.filters,
        unroll=args.unroll, parallel_tasks=args.parallel_tasks, seed=args.seed,
        options=estimator_options(args) if args.estimator != "plain" else {},
        strategy=args.strategy, linearity_metrics=args.linearity_metrics, remat=args.remat,
    )
    if not args.json:
        print(f"{args.estimator}: {result['seconds_per_step_median']:.3f} s/step (median of {result['steps']}), "
              f"compile {result['compile_seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB")
    return result


def cmd_search(args) -> dict:
    from tfmeta.autometa import cli as autometa_cli

    return autometa_cli.run(args)


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
