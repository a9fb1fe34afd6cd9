"""Progressive architecture search for gradient-based meta-learners (Auto-Meta) on KerasTuner.

Auto-Meta (Kim et al. 2018; Sun's overview, Sec. 5) approximates

    min_{A, theta} sum_j L(D_j^test, U(D_j^train, theta; A))

by alternating the two minimisations: for fixed candidate architectures A, meta-train theta
(Reptile by default, as Auto-Meta; any tfmeta estimator), score each A by meta-validation accuracy
on held-out classes, and grow the promising A progressively (PNAS, Liu et al. 2018):

1. meta-train every 1-block cell (:func:`~tfmeta.app.autometa.space.initial_cells`);
2. fit the surrogate (:class:`~tfmeta.app.autometa.surrogate.Surrogate`) on every (cell, score) so far;
3. expand the top K cells of the last stage by one block, rank all expansions with the surrogate
   and meta-train only the K best-ranked;
4. repeat 2-3 until cells have B blocks (or the time budget is spent).

The search's configuration is :mod:`tfmeta.app.autometa.config`, the oracle
:mod:`tfmeta.app.autometa.oracle`; this module is the tuner, the evaluator and the run.

KerasTuner is the engine. :class:`ProgressiveOracle` is a custom `keras_tuner.Oracle` whose
`populate_space` hands out the cells of the current stage and, when a stage is done, runs steps
2-3; :class:`MetaSearchTuner` is a `BaseTuner` whose `run_trial` meta-trains one candidate
(:class:`MetaTrainEvaluator`: `tfmeta.training.MetaTrainer` for a fixed number of meta-steps,
checkpointed in the trial's directory, then `tfmeta.evaluation.evaluate` on the val split). The
trial records (``trial_*/trial.json``: the cell as hyperparameters, the metrics, the status), the
oracle's state (stage, queue, surrogate predictions, time spent) and the summaries
(`results_summary`, `get_best_trials`) are KerasTuner's, in its project directory
``<out>/tuner``. Interrupt a search (Ctrl-C, kill) and run the same command again: KerasTuner
reloads the project, finished trials are not run again, the trial that was running is retried
(continuing from its own checkpoint).

Example:
    >>> config = SearchConfig(dataset="omniglot", data_dir="../shared/data/omniglot",
    ...                       blocks=3, top_k=4, trial_budget=20, budget_minutes=30, out="autometa")
    >>> result = run_search(config)                          # doctest: +SKIP
    >>> result["best"]["cell"], result["export"]              # doctest: +SKIP

References:
    Kim, J. et al. "Auto-Meta: Automated Gradient Based Meta Learner Search." 2018.
    arXiv:1806.06927.

    Liu, C. et al. "Progressive Neural Architecture Search." ECCV 2018. arXiv:1712.00559.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

from tfmeta.core import _backend  # noqa: F401

import keras
import keras_tuner as kt
import numpy as np
from keras_tuner.engine.base_tuner import BaseTuner

from tfmeta import estimators
from tfmeta.app.autometa.config import DATASETS, SearchConfig, make_samplers
from tfmeta.app.autometa.oracle import OBJECTIVE, ProgressiveOracle, _TrialStatus, search_space
from tfmeta.app.autometa.space import Architecture, Cell
from tfmeta.core.files import write_json

__all__ = ["DATASETS", "OBJECTIVE", "SearchConfig", "make_samplers", "search_space", "ProgressiveOracle",
           "MetaSearchTuner", "MetaTrainEvaluator", "Progress", "run_search"]


# -- KerasTuner: the tuner -------------------------------------------------------------------------
class TrialDiverged(ArithmeticError):
    """A candidate's meta-training or validation produced NaN/Inf: a failed trial, not a bug."""


class _Abort(kt.errors.FatalError):
    """Carries an error that is not about the candidate out of KerasTuner's trial loop."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class MetaSearchTuner(BaseTuner):
    """KerasTuner tuner whose `run_trial` meta-trains one candidate architecture.

    Args:
        oracle: a :class:`ProgressiveOracle`.
        evaluator: ``evaluator(architecture, trial_dir) -> metrics dict`` holding ``val_accuracy``
            (:class:`MetaTrainEvaluator`, or any function, e.g. a synthetic objective in tests).
        skeleton: the :class:`Architecture` whose cell each trial replaces.
        directory, project_name, overwrite: KerasTuner's project directory options.
        progress: optional ``progress(event, tuner, trial)`` called at "begin" and "end" of trials.
    """

    def __init__(self, oracle: ProgressiveOracle, evaluator: Callable, skeleton: Architecture, *,
                 directory: str, project_name: str = "tuner", overwrite: bool = False,
                 progress: Callable | None = None):
        self.evaluator = evaluator
        self.skeleton = skeleton
        self.progress = progress
        super().__init__(oracle=oracle, hypermodel=None, directory=directory,
                         project_name=project_name, overwrite=overwrite)

    def architecture(self, trial) -> Architecture:
        return self.skeleton.with_cell(Cell.from_values(trial.hyperparameters.values))

    def run_trial(self, trial, *args, **kwargs):
        arch = self.architecture(trial)
        try:
            metrics = self.evaluator(arch, self.get_trial_dir(trial.trial_id))
        except TrialDiverged as err:
            raise kt.errors.FailedTrialError(str(err)) from err
        except Exception as err:  # not about this candidate: stop the search with this error
            raise _Abort(err) from err
        if OBJECTIVE not in metrics or not np.isfinite(metrics[OBJECTIVE]):
            raise kt.errors.FailedTrialError(f"{OBJECTIVE} is missing or not finite: {metrics}")
        return {k: float(v) for k, v in metrics.items()}

    def on_trial_begin(self, trial):
        if self.progress is not None:
            self.progress("begin", self, trial)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        if self.progress is not None:
            self.progress("end", self, trial)

    def load_model(self, trial):
        """The candidate's Keras model at its meta-learned initialization (from the trial's checkpoint)."""
        learner, _ = self.evaluator.restore(self.architecture(trial), self.get_trial_dir(trial.trial_id))
        return learner.model

    def save_model(self, trial_id, model, step=0):
        """Models are saved by the evaluator's checkpoints during `run_trial`; nothing more to do."""


# -- meta-training one candidate -------------------------------------------------------------------
class MetaTrainEvaluator:
    """Meta-train a candidate for a fixed number of meta-steps; score it on the val split.

    Every candidate starts from the same seed and sees the same meta-training tasks and the same
    validation episodes, so scores differ only through the architecture. Meta-training runs in
    :class:`tfmeta.training.MetaTrainer` with checkpoints in ``<trial_dir>/checkpoints`` (a retried
    trial continues from them; :meth:`restore` reloads the meta-learned initialization).

    Returns ``val_accuracy`` (the objective: mean query accuracy after adaptation on
    `val_episodes` held-out episodes) and its ``val_accuracy_ci95``, ``val_accuracy_before``,
    ``val_loss``, ``train_loss``, ``meta_steps``, ``seconds_per_meta_step`` (median, after the
    first, traced step), ``train_seconds`` and ``parameters``.
    """

    def __init__(self, config: SearchConfig, samplers: dict):
        self.config = config
        self.samplers = samplers
        # the inner-loop check (MetaLearner.check_inner_loop: a warning when the inner loop barely
        # moves the model) runs on the first candidate only: it judges the search's inner-loop
        # settings, and each candidate's meta-trained score measures the rest (it cost 19% of a
        # quick search when run on every candidate)
        self.check_inner_loop = True

    def learner(self, arch: Architecture):
        from tfmeta.core.learner import MetaLearner

        keras.utils.set_random_seed(self.config.seed)
        model = arch.build()
        return MetaLearner(model, task="classification", inner_optimizer=self.config.inner_optimizer,
                           inner_lr=self.config.inner_lr, inner_steps=self.config.inner_steps)

    def trainer(self, learner, trial_dir: str):
        from tfmeta.training import MetaTrainer

        estimator = estimators.get(self.config.estimator, linearity_metrics=self.config.linearity_metrics,
                                   **self.config.estimator_options)
        return MetaTrainer(
            learner, estimator, keras.optimizers.Adam(self.config.meta_lr),
            checkpoint_dir=os.path.join(trial_dir, "checkpoints"),
            checkpoint_every=max(1, self.config.trial_budget // 4), max_checkpoints=1,
            on_nonfinite="skip",
        )

    def restore(self, arch: Architecture, trial_dir: str):
        """(learner at the trial's meta-learned initialization, its estimator)."""
        learner = self.learner(arch)
        trainer = self.trainer(learner, trial_dir)
        if trainer.restore() == 0:
            raise ValueError(f"trial directory {trial_dir!r} holds no checkpoint of a meta-trained candidate.")
        return learner, trainer.estimator

    def __call__(self, arch: Architecture, trial_dir: str) -> dict:
        from tfmeta.training import evaluation

        policy = keras.config.dtype_policy()
        keras.backend.clear_session()  # each candidate is a new graph: drop Keras' global state
        keras.config.set_dtype_policy(policy)
        learner = self.learner(arch)
        trainer = self.trainer(learner, trial_dir)
        stamps = []
        began = time.monotonic()
        check, self.check_inner_loop = self.check_inner_loop, False
        history = trainer.fit(self.samplers["train"], self.config.trial_budget, progress=False,
                              on_step=lambda step, logs: stamps.append(time.monotonic()),
                              check_inner_loop=check)
        train_seconds = time.monotonic() - began
        result = evaluation.evaluate(learner, self.samplers["val"], episodes=self.config.val_episodes,
                                     estimator=trainer.estimator)
        if not np.isfinite(result["accuracy_after"]) or not np.isfinite(result["loss_after"]):
            raise TrialDiverged(f"validation loss {result['loss_after']} is not finite")
        steps = np.diff(stamps)
        return {
            OBJECTIVE: result["accuracy_after"],
            "val_accuracy_ci95": result["accuracy_after_ci95"],
            "val_accuracy_before": result["accuracy_before"],
            "val_loss": result["loss_after"],
            "train_loss": history[-1]["loss"] if history else float("nan"),
            "meta_steps": float(trainer.step.numpy()),
            "seconds_per_meta_step": float(np.median(steps)) if len(steps) else train_seconds,
            "train_seconds": train_seconds,
            "parameters": float(learner.model.count_params()),
        }


# -- progress --------------------------------------------------------------------------------------
def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``trial i of n``, elapsed time and best score so far, one line per event on `stream`."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.began = {}

    def __call__(self, event: str, tuner: MetaSearchTuner, trial) -> None:
        oracle = tuner.oracle
        index, total = int(trial.trial_id) + 1, oracle.max_trials
        cell = Cell.from_values(trial.hyperparameters.values)
        if event == "begin":
            self.began[trial.trial_id] = time.monotonic()
            line = (f"[search] trial {index} of {total} ({len(cell)} block{'s' * (len(cell) > 1)}): "
                    f"{cell.describe()}")
        else:
            seconds = time.monotonic() - self.began.get(trial.trial_id, time.monotonic())
            best = oracle.get_best_trials(1)
            best = best[0] if best and best[0].status == _TrialStatus.COMPLETED else None
            score = (f"{OBJECTIVE} {trial.score:.4f}" if trial.status == _TrialStatus.COMPLETED
                     else f"{trial.status.lower()}")
            line = (f"[search] trial {index} of {total} done in {seconds:.1f}s: {score} | best so far "
                    + (f"{best.score:.4f} (trial {int(best.trial_id) + 1})" if best else "none")
                    + f" | elapsed {_clock(oracle.elapsed())}")
        print(line, file=self.stream, flush=True)


# -- the whole search ------------------------------------------------------------------------------
SEARCH_FILE = "search.json"
ARCHITECTURE_FILE = "best_architecture.json"
RESULT_FILE = "result.json"


def _check_out(config: SearchConfig) -> bool:
    """Raise ValueError if `out` holds something else than this search; True if it holds this one."""
    out = config.out
    path = os.path.join(out, SEARCH_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f).get("identity", {})
        mine = json.loads(json.dumps(config.identity()))
        diffs = [f"{k}: {stored.get(k)!r} there, {mine.get(k)!r} here"
                 for k in sorted(set(stored) | set(mine)) if stored.get(k) != mine.get(k)]
        if diffs:
            raise ValueError(
                f"out={out!r} (--out) holds a different search ({'; '.join(diffs)}): choose another "
                "--out, or repeat that search's settings to resume it."
            )
        return True
    if os.path.isdir(out) and set(os.listdir(out)) - {".lock"}:
        raise ValueError(
            f"out={out!r} (--out) is not empty and holds no tfmeta search ({SEARCH_FILE}): choose an "
            "empty or new directory."
        )
    return False


def run_search(config: SearchConfig, *, evaluator: Callable | None = None, progress: Callable | None = None,
               export: bool = True, summary_trials: int = 0) -> dict:
    """Run (or resume) the progressive search of `config`; returns a JSON-able summary.

    Writes into ``config.out``: ``search.json`` (what search this is), ``tuner/`` (KerasTuner's
    project: trial records and checkpoints), ``best_architecture.json`` (the best description,
    :meth:`Architecture.load` rebuilds it), ``result.json`` (this summary) and, with `export`,
    the best candidate's meta-learned initialization and adapter via
    :func:`tfmeta.export.export_adapter` (``<export_dir>/<export_name>/<version>/``).

    Args:
        config: the search.
        evaluator: replaces :class:`MetaTrainEvaluator` (``evaluator(arch, trial_dir) -> metrics``);
            export and the meta-test evaluation need the default one.
        progress: ``progress(event, tuner, trial)``; default :class:`Progress` on stderr.
        export: export the best candidate (default evaluator only).
        summary_trials: print KerasTuner's `results_summary` of this many best trials to stdout.
    """
    from tfmeta.app.rundir import RunLock

    config = config.validated()
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise ValueError(f"out={config.out!r} (--out) is a file: expected a directory.")
    _check_out(config)  # refuse early, before loading data; checked again under the lock
    samplers = make_samplers(config) if evaluator is None else None
    with RunLock(config.out):
        if not _check_out(config):
            with open(os.path.join(config.out, SEARCH_FILE), "w", encoding="utf-8") as f:
                json.dump({"identity": config.identity(), "created": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=2)
        if evaluator is None:
            evaluator = MetaTrainEvaluator(config, samplers)
        oracle = ProgressiveOracle(config.blocks, config.top_k, config.operators,
                                   budget_seconds=60.0 * config.budget_minutes, seed=config.seed)
        tuner = MetaSearchTuner(oracle, evaluator, config.skeleton(), directory=config.out,
                                project_name="tuner", progress=progress or Progress())
        finished_before = len(oracle.end_order)
        try:
            tuner.search()
        except _Abort as abort:  # e.g. an estimator that refuses the learner: its own ValueError
            raise abort.error from None
        if summary_trials:
            tuner.results_summary(summary_trials)
        return _finish(config, tuner, evaluator, samplers, export, finished_before)


def _finish(config, tuner, evaluator, samplers, export, finished_before) -> dict:
    oracle = tuner.oracle
    done = oracle.completed()
    statuses = [t.status for t in oracle.trials.values()]
    result = {
        "out": config.out, "project_dir": tuner.project_dir,
        "trials_completed": len(done), "trials_failed": statuses.count(_TrialStatus.FAILED),
        "trials_run_this_session": len(oracle.end_order) - finished_before,
        "planned_trials": oracle.max_trials, "stage": oracle.stage, "blocks": config.blocks,
        "complete": oracle.stage >= config.blocks and not oracle.queue and not oracle.ongoing_trials,
        "stopped_by": oracle.stop_reason or "complete", "elapsed_seconds": oracle.elapsed(),
        "surrogate": oracle.surrogate_report(), "expansions": oracle.expansions_log,
        "best": None, "architecture": None, "export": None, "test": None,
    }
    if not done:
        raise RuntimeError(f"no candidate completed in {tuner.project_dir}: see the trial records there.")
    best = max(done, key=lambda row: (row[2], -int(row[0])))  # ties: the earliest trial
    best_trial = oracle.get_trial(best[0])
    arch = tuner.architecture(best_trial)
    metrics = {name: best_trial.metrics.get_last_value(name) for name in best_trial.metrics.metrics}
    result["best"] = {"trial_id": best[0], "cell": arch.cell.to_json(), "cell_description": arch.cell.describe(),
                      "score": best[2], "metrics": metrics}
    path = os.path.join(config.out, ARCHITECTURE_FILE)
    arch.save(path, search={"trial_id": best[0], OBJECTIVE: best[2], "metrics": metrics})
    result["architecture"] = path
    if isinstance(evaluator, MetaTrainEvaluator):
        from tfmeta.training import evaluation
        from tfmeta import export as export_module

        learner, estimator = evaluator.restore(arch, tuner.get_trial_dir(best[0]))
        if config.test_episodes:
            test = evaluation.evaluate(learner, samplers["test"], episodes=config.test_episodes, estimator=estimator)
            result["test"] = {k: test[k] for k in ("episodes", "accuracy_after", "accuracy_after_ci95",
                                                   "accuracy_before", "accuracy_before_ci95")}
        if export:
            export_dir = config.export_dir or os.path.join(config.out, "saved_models")
            name = config.export_name or f"autometa_{config.dataset}"
            result["export"] = export_module.export_adapter(learner, export_dir, name)
    write_json(os.path.join(config.out, RESULT_FILE), result, make_dirs=False)
    return result
