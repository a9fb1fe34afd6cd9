"""The grammar of the `tfmeta` command line: every subcommand's flags and their defaults.

Defaults come from one place: a run's from :class:`~tfmeta.app.config.RunConfig` and
``DATASET_DEFAULTS``, a session's from :class:`~tfmeta.app.config.TrainOptions`, an estimator's
from its constructor (:mod:`tfmeta.app.flags`); the help text prints them from there. What the
subcommands do is :mod:`tfmeta.app.commands`; :mod:`tfmeta.app.cli` ties the two together.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tfmeta.app.flags import (
    add_estimator_flags as _add_estimator_flags,
    add_runtime_flags as _add_runtime_flags,
    estimator_options,
    positive_float as _positive_float,
    positive_int as _positive_int,
    seconds as _seconds,
    step_list as _step_list,
    unit_float as _unit_float,
    nonnegative_float as _nonnegative_float,
)


def _default_max_skips() -> int:
    from tfmeta.training.keras_model import DEFAULT_MAX_SKIPS

    return DEFAULT_MAX_SKIPS


_RUNS = "runs"
#: RunConfig fields that `train --resume` may change (everything else defines the run).
RESUMABLE = ("iterations", "data_dir")


def _per_dataset(name: str) -> str:
    """'(default: 5 for omniglot, 1 for sinusoid, ...)', from `config.DATASET_DEFAULTS`."""
    from tfmeta.app.config import DATASET_DEFAULTS

    return "(default: " + ", ".join(
        f"{_fmt(values[name])} for {dataset}" for dataset, values in DATASET_DEFAULTS.items()) + ")"


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_train_flags(p):
    from tfmeta import estimators
    from tfmeta.app.config import RunConfig
    from tfmeta.data import DATASETS
    from tfmeta.core.inner_optimizers import INNER_OPTIMIZERS

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
    from tfmeta.app.config import META_LR_SCHEDULES

    p.add_argument("--meta-lr-schedule", default=d.meta_lr_schedule, choices=list(META_LR_SCHEDULES),
                   help="meta learning rate: constant, or cosine (keras CosineDecay from --meta-lr to "
                        "--min-meta-lr over --iterations; MAML++)")
    p.add_argument("--min-meta-lr", type=_nonnegative_float, default=d.min_meta_lr,
                   help="final meta learning rate of --meta-lr-schedule cosine")
    p.add_argument("--lslr", action=argparse.BooleanOptionalAction, default=d.lslr,
                   help="MAML++: meta-learn one inner learning rate per layer weight and inner step")
    p.add_argument("--per-step-bn", action=argparse.BooleanOptionalAction, default=d.per_step_bn,
                   help="MAML++: one meta-learned set of BatchNorm gamma/beta per inner step (needs BatchNorm: conv4)")
    p.add_argument("--per-step-bn-stats", action=argparse.BooleanOptionalAction, default=d.per_step_bn_stats,
                   help="MAML++: BatchNorm running statistics per inner step, each moved by its own step's batch "
                        "moments (for inference without a batch; needs BatchNorm: conv4)")
    _add_remat_flag(p)
    _add_estimator_flags(p)


def _add_remat_flag(p):
    from tfmeta.app.config import RunConfig
    from tfmeta.core.learner import REMAT_HELP

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
    from tfmeta.app.presets import PRESETS

    p.add_argument("--preset", default=None, choices=list(PRESETS), metavar="NAME",
                   help="a paper's settings (flags given explicitly override them; see "
                        "docs/presets.md): " + ", ".join(PRESETS))


def apply_preset(args, argv) -> None:
    """Give `args` the values of its `--preset`, except for the flags typed in `argv`."""
    from tfmeta.app import presets

    presets.apply(args.preset, args, _given_flags(argv, "train"))
    preset = presets.get(args.preset)
    print(f"preset {args.preset}: {preset.citation}, {preset.where}", file=sys.stderr)


def run_config(args):
    """The resolved RunConfig of parsed `tfmeta train` arguments (a new run)."""
    from tfmeta.app.config import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in fields},
                     estimator_options=estimator_options(args)).resolved()


def _parser(with_search: bool = True) -> argparse.ArgumentParser:
    from tfmeta.app.config import TrainOptions

    t = TrainOptions()  # the one source of `tfmeta train`'s run-option defaults
    parser = argparse.ArgumentParser(prog="tfmeta", description="The `tfmeta` command line: train, evaluate, export, bench, search.",
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
    export.add_argument("--statistics", default="batch", choices=["batch", "running"],
                        help="with --adapt-on: BatchNorm normalises with the batch, or with the per-step running "
                             "statistics of the last inner step (a run trained with --per-step-bn-stats; predicts "
                             "one example at a time)")
    export.add_argument("--checkpoint", default=None, metavar="CKPT",
                        help="export this checkpoint (e.g. ckpt-20) instead of the latest")
    from tfmeta.export.tflite import DEFAULT_PROFILE, PROFILES
    export.add_argument("--tflite", action="store_true",
                        help="also write model.tflite (LiteRT: adapt_and_predict and predict) into the version")
    export.add_argument("--tflite-profile", default=DEFAULT_PROFILE, choices=list(PROFILES),
                        help="; ".join(f"{k}: {v}" for k, v in PROFILES.items()) + f" (default {DEFAULT_PROFILE})")
    export.add_argument("--tflite-shots", type=_positive_int, default=None,
                        help="support examples per class of the .tflite's fixed support set (default: the run's shots)")

    bench = sub.add_parser("bench", help="time one meta-step configuration (conv4 on random inputs)")
    from tfmeta.app.bench import ESTIMATORS
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
        from tfmeta.app.autometa import cli as autometa_cli

        autometa_cli.add_parser(sub)
    for subparser in sub.choices.values():
        subparser.formatter_class = _HelpFormatter
    return parser



def _given_flags(argv: list[str], command: str) -> set[str]:
    """The destinations of the flags given explicitly on the command line."""
    parser = _parser(with_search=False)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}
