"""What the subcommands of `tfmeta` do: train (run directories, resume, guards), evaluate, export,
bench and search. Their flags are :mod:`tfmeta.app.parser`'s; :mod:`tfmeta.app.cli` dispatches.

Size (about 430 lines): one function per subcommand plus the run-directory guards that `train` shares with
`evaluate` and `export` (lock, resume changes, memory check); splitting them apart would scatter one
command's rules over several files.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

from tfmeta.app.flags import estimator_options
from tfmeta.app.parser import _RUNS, RESUMABLE, _default_max_skips, run_config
from tfmeta.app.rundir import RunLock
from tfmeta.core import runtime


def _newest_run() -> str:
    runs = [os.path.join(_RUNS, d) for d in os.listdir(_RUNS)] if os.path.isdir(_RUNS) else []
    runs = [r for r in runs if os.path.isfile(os.path.join(r, "config.json"))]
    if not runs:
        raise ValueError("--run was not given and runs/ holds no run: train one first (tfmeta train).")
    return max(runs, key=os.path.getmtime)


def _load_run(run_dir: str | None, checkpoint: str | None = None):
    from tfmeta.app.config import RunConfig, build_estimator, build_learner, build_meta_optimizer
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
    from tfmeta.app.config import physical_memory_bytes, task_batch_bytes

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

    from tfmeta.app.config import RunConfig, build_sampler

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

    from tfmeta import export
    from tfmeta.training import evaluation
    from tfmeta.app.config import build_estimator, build_learner, build_meta_optimizer, build_sampler
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
    from tfmeta.training import evaluation
    from tfmeta.app.config import build_sampler

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
    if args.statistics == "running" and args.adapt_on is None:
        raise ValueError("--statistics running applies to an adapted model: expected --adapt-on SUPPORT.npz.")
    if args.tflite:
        from tfmeta.export import tflite as export_tflite

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
            if args.statistics == "running" and not learner.bn_statistics:
                raise ValueError(f"--statistics running: the run in {run_dir!r} keeps no per-step running "
                                 "statistics (expected a run trained with --per-step-bn-stats, e.g. --preset maml++).")
            path = export.export_adapted(learner, support["support_x"], support["support_y"],
                                         args.export_dir, args.name or f"{name}_adapted",
                                         statistics=args.statistics)
    print(f"exported {run_dir} to {path}")
    return {"run_dir": run_dir, "export": path}


def cmd_bench(args) -> dict:
    from tfmeta.app import bench, suites

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
        from tfmeta.app import suites_learning

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
        from tfmeta.export import tflite as export_tflite

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
    from tfmeta.app.autometa import cli as autometa_cli

    return autometa_cli.run(args)
