"""Progressive architecture search for gradient-based meta-learners (Auto-Meta) on KerasTuner.

Auto-Meta (Kim et al. 2018; Sec. 5 of 001_7e396414bca289e5.txt) approximates

    min_{A, theta} sum_j L(D_j^test, U(D_j^train, theta; A))

by alternating the two minimisations: for fixed candidate architectures A, meta-train theta
(Reptile by default, as Auto-Meta; any tfmeta estimator), score each A by meta-validation accuracy
on held-out classes, and grow the promising A progressively (PNAS, Liu et al. 2018):

1. meta-train every 1-block cell (:func:`~tfmeta.autometa.space.initial_cells`);
2. fit the surrogate (:class:`~tfmeta.autometa.surrogate.Surrogate`) on every (cell, score) so far;
3. expand the top K cells of the last stage by one block, rank all expansions with the surrogate
   and meta-train only the K best-ranked;
4. repeat 2-3 until cells have B blocks (or the time budget is spent).

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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable

from tfmeta import _backend  # noqa: F401

import keras
import keras_tuner as kt
import numpy as np
from keras_tuner.engine.base_tuner import BaseTuner

from tfmeta.autometa.space import (
    OPERATORS, Architecture, Cell, check_operators, initial_cells, planned_trials,
)
from tfmeta.autometa.surrogate import Surrogate, cross_validated_spearman, spearman

OBJECTIVE = "val_accuracy"
DATASETS = ("omniglot", "synthetic")
_TrialStatus = kt.engine.trial.TrialStatus


# -- configuration ---------------------------------------------------------------------------------
@dataclasses.dataclass
class SearchConfig:
    """Everything that defines a search (the flags of `tfmeta search`).

    The fields in :meth:`identity` define *which* search a directory holds; `budget_minutes`,
    `export_dir`, `export_name` and `test_episodes` may change when resuming.
    """

    dataset: str = "omniglot"
    data_dir: str | None = None
    estimator: str = "reptile"
    estimator_options: dict = dataclasses.field(default_factory=dict)
    linearity_metrics: bool = False
    blocks: int = 3
    top_k: int = 4
    operators: tuple = OPERATORS
    trial_budget: int = 20
    budget_minutes: float = 30.0
    out: str = "autometa"
    ways: int = 5
    shots: int = 1
    query: int = 5
    meta_batch: int = 4
    inner_steps: int = 5
    inner_lr: float = 0.4
    inner_optimizer: str = "sgd"
    meta_lr: float = 1e-3
    image_size: int = 28
    filters: int = 16
    cells_per_stage: int = 1
    reductions: int = 2
    val_episodes: int = 50
    test_episodes: int = 200
    seed: int = 0
    export_dir: str | None = None
    export_name: str | None = None

    #: what `--quick` changes (flags given explicitly still win).
    QUICK = dict(blocks=2, top_k=2, operators=("conv3x3", "identity"), trial_budget=1, budget_minutes=5.0,
                 query=2, meta_batch=2, inner_steps=1, image_size=14, filters=4, cells_per_stage=1,
                 reductions=0, val_episodes=4, test_episodes=4)

    @classmethod
    def quick(cls, **overrides) -> "SearchConfig":
        """The smoke-test search: B=2, K=2, two operators, tiny network, one meta-step per trial.

        Without a `dataset`, it searches Omniglot when a `data_dir` is given, else the synthetic
        glyphs (no download needed).
        """
        if overrides.get("dataset") is None:
            overrides["dataset"] = "omniglot" if overrides.get("data_dir") else "synthetic"
        return cls(**{**cls.QUICK, **overrides})

    def validated(self) -> "SearchConfig":
        """A copy with normalised values; ValueError naming the argument on bad input."""
        c = dataclasses.replace(self)
        if c.dataset not in DATASETS:
            raise ValueError(f"dataset={c.dataset!r} (--dataset) is not valid: expected one of {list(DATASETS)}.")
        c.operators = check_operators(c.operators, "operators")
        _int(c, "blocks", 1, "B, the most blocks a cell may have")
        _int(c, "top_k", 1, "K, the cells expanded and meta-trained per stage")
        if isinstance(c.trial_budget, bool) or not isinstance(c.trial_budget, (int, np.integer)) \
                or c.trial_budget < 1:
            raise ValueError(
                f"trial_budget={c.trial_budget!r} (--trial-budget) is too small to take one meta-step: "
                "expected an integer number of meta-steps per candidate >= 1."
            )
        if not isinstance(c.budget_minutes, (int, float)) or isinstance(c.budget_minutes, bool) \
                or not c.budget_minutes > 0 or not math.isfinite(c.budget_minutes):
            raise ValueError(f"budget_minutes={c.budget_minutes!r} (--budget-minutes) is not valid: expected a number > 0.")
        for name in ("ways", "shots", "query", "meta_batch", "image_size", "filters",
                     "cells_per_stage", "val_episodes"):
            _int(c, name, 1)
        for name in ("inner_steps", "reductions", "test_episodes", "seed"):
            _int(c, name, 0)
        for name in ("inner_lr", "meta_lr"):
            value = getattr(c, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r} (--{name.replace('_', '-')}) is not valid: expected a number > 0.")
        from tfmeta import estimators

        estimators.get_class(c.estimator)  # ValueError naming estimator=
        if not c.out or not isinstance(c.out, str):
            raise ValueError(f"out={c.out!r} (--out) is not valid: expected a directory path.")
        return c

    def identity(self) -> dict:
        """The fields that define the search a directory holds."""
        skip = {"budget_minutes", "export_dir", "export_name", "test_episodes", "out"}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        values["operators"] = list(values["operators"])
        if values["data_dir"] is not None:
            values["data_dir"] = os.path.abspath(values["data_dir"])
        return values

    def skeleton(self) -> Architecture:
        """The network around the searched cell (the cell itself is a placeholder)."""
        return Architecture(Cell.from_json([[0, self.operators[0], 1, self.operators[0]]]),
                            input_shape=(self.image_size, self.image_size, 1), classes=self.ways,
                            filters=self.filters, cells_per_stage=self.cells_per_stage,
                            reductions=self.reductions)


def _int(config, name: str, minimum: int, what: str = "") -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        flag = "--" + name.replace("_", "-")
        raise ValueError(
            f"{name}={value!r} ({flag}) is not valid: expected an integer >= {minimum}"
            + (f" ({what})." if what else ".")
        )
    setattr(config, name, int(value))


def make_samplers(config: SearchConfig) -> dict:
    """Train / val / test samplers with disjoint classes (Omniglot: disjoint alphabets)."""
    from tfmeta import data
    from tfmeta.autometa import synthetic

    samplers = {}
    for split, seed, batch in (("train", config.seed, config.meta_batch),
                               ("val", config.seed + 2, min(config.val_episodes, 16)),
                               ("test", config.seed + 1, min(max(config.test_episodes, 1), 16))):
        kwargs = dict(ways=config.ways, shots=config.shots, query=config.query, meta_batch=batch,
                      seed=seed, image_size=config.image_size)
        if config.dataset == "omniglot":
            samplers[split] = data.make_sampler("omniglot", split, data_dir=config.data_dir, **kwargs)
        else:
            samplers[split] = synthetic.make_sampler(split, **kwargs)
    if config.estimator == "shifting":  # task learner t keeps task t for a round (as tfmeta train)
        from tfmeta import estimators
        from tfmeta.estimators.shifting import RoundTasks

        options = {**{f.name: f.default for f in estimators.get_class("shifting").flags},
                   **config.estimator_options}
        samplers["train"] = RoundTasks(samplers["train"], options["horizon"] * options["repeats"])
    return samplers


# -- KerasTuner: the oracle ------------------------------------------------------------------------
def search_space(blocks: int, operators=OPERATORS) -> kt.HyperParameters:
    """The cell as KerasTuner hyperparameters: ``blocks`` and, active when ``blocks >= i``,
    ``b{i}_in_a``, ``b{i}_op_a``, ``b{i}_in_b``, ``b{i}_op_b`` (see :meth:`Cell.to_values`)."""
    hp = kt.HyperParameters()
    hp.Int("blocks", 1, blocks)
    for i in range(1, blocks + 1):
        with hp.conditional_scope("blocks", list(range(i, blocks + 1))):
            for side in "ab":
                hp.Choice(f"b{i}_in_{side}", list(range(i + 1)))
                hp.Choice(f"b{i}_op_{side}", list(operators))
    return hp


class ProgressiveOracle(kt.Oracle):
    """KerasTuner oracle of the progressive search (module docstring, steps 1-4).

    Its state (saved in ``oracle.json`` after every trial) holds the stage, the queue of cells
    still to meta-train in it, the surrogate's predictions for the cells it chose, a log of the
    expansions, and the seconds the search has run, so a reloaded oracle continues where it
    stopped (KerasTuner retries the trial that was running).

    Args:
        blocks: B.
        top_k: K.
        operators: the operator set.
        budget_seconds: stop creating trials once the search has run this long (all sessions).
        surrogate_options: keyword arguments of :class:`Surrogate`.
        seed: seeds the surrogate.
    """

    def __init__(self, blocks: int, top_k: int, operators=OPERATORS, *, budget_seconds: float | None = None,
                 surrogate_options: dict | None = None, seed: int = 0):
        self.blocks, self.top_k = int(blocks), int(top_k)
        self.operators = check_operators(operators)
        super().__init__(
            objective=kt.Objective(OBJECTIVE, "max"),
            max_trials=planned_trials(self.blocks, self.top_k, self.operators),
            hyperparameters=search_space(self.blocks, self.operators),
            allow_new_entries=False,
            tune_new_entries=False,
            seed=seed + 1,
            # Diverging candidates are failed trials, not the end of the search; errors that are
            # not about the candidate stop the search from the tuner (kt.errors.FatalError).
            max_consecutive_failed_trials=10 ** 9,
        )
        self.budget_seconds = budget_seconds
        self.surrogate_options = dict(surrogate_options or {})
        self.surrogate_seed = seed
        self.stage = 0
        self.queue: list[dict] = []
        self.predictions: dict[str, float] = {}
        self.expansions_log: list[dict] = []
        self.stop_reason: str | None = None
        self._seconds_before = 0.0
        self._clock = time.monotonic()
        self.verbose = 0  # progress goes to stderr through MetaSearchTuner

    # -- time ----------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds this search has run, over all sessions."""
        return self._seconds_before + time.monotonic() - self._clock

    # -- the search ----------------------------------------------------------------------------------
    def completed(self) -> list[tuple[str, Cell, float]]:
        """(trial id, cell, score) of every completed trial, in trial-id order."""
        rows = []
        for trial_id in sorted(self.trials):
            trial = self.trials[trial_id]
            if trial.status == _TrialStatus.COMPLETED and trial.score is not None and np.isfinite(trial.score):
                rows.append((trial_id, Cell.from_values(trial.hyperparameters.values), float(trial.score)))
        return rows

    def populate_space(self, trial_id):
        if self.budget_seconds is not None and self.elapsed() >= self.budget_seconds:
            self.stop_reason = "budget"
            return {"status": _TrialStatus.STOPPED}
        if not self.queue:
            if self.stage == 0:
                self.queue = [c.to_values() for c in initial_cells(self.operators)]
                self.stage = 1
            else:
                if self.ongoing_trials:  # another worker still runs this stage's last trial
                    return {"status": _TrialStatus.IDLE}
                if self.stage >= self.blocks or not self._expand():
                    self.stop_reason = self.stop_reason or "complete"
                    return {"status": _TrialStatus.STOPPED}
        return {"status": _TrialStatus.RUNNING, "values": self.queue.pop(0)}

    def _expand(self) -> bool:
        """Steps 2-3: fit the surrogate, expand the top K cells, queue the K best-ranked expansions."""
        done = self.completed()
        stage_rows = sorted((r for r in done if len(r[1]) == self.stage), key=lambda r: -r[2])
        parents = [cell for _, cell, _ in stage_rows[: self.top_k]]
        if not parents:
            self.stop_reason = "no candidate of the last stage completed"
            return False
        tried = {Cell.from_values(t.hyperparameters.values).key() for t in self.trials.values()}
        candidates, seen = [], set(tried)
        for parent in parents:
            for child in parent.expansions(self.operators):
                if child.key() not in seen:
                    seen.add(child.key())
                    candidates.append(child)
        if not candidates:
            self.stop_reason = "no new expansion"
            return False
        surrogate = Surrogate(self.blocks, self.operators, seed=self.surrogate_seed, **self.surrogate_options)
        surrogate.fit([cell for _, cell, _ in done], [score for _, _, score in done])
        chosen = surrogate.rank(candidates)[: self.top_k]
        for cell, predicted in chosen:
            self.predictions[cell.key()] = predicted
        self.queue = [cell.to_values() for cell, _ in chosen]
        self.stage += 1
        self.expansions_log.append({
            "stage": self.stage, "parents": [p.key() for p in parents], "fitted_on": len(done),
            "candidates": len(candidates),
            "chosen": [{"cell": c.key(), "predicted": p} for c, p in chosen],
        })
        return True

    def surrogate_report(self) -> dict:
        """How well the surrogate ranked: held-out and cross-validated Spearman correlations.

        ``heldout_spearman``: predictions made before a candidate was meta-trained vs. its
        measured score, over all surrogate-chosen candidates (None below 3). ``cv_spearman``: 5-fold
        cross-validated predictions over every completed trial (None below 10 trials).
        """
        done = self.completed()
        pairs = [(self.predictions[c.key()], s) for _, c, s in done if c.key() in self.predictions]
        heldout = spearman(*map(list, zip(*pairs))) if len(pairs) >= 3 else None
        cv = None
        if len(done) >= 10:
            cv = cross_validated_spearman([c for _, c, _ in done], [s for _, _, s in done],
                                          max_blocks=self.blocks, operators=self.operators,
                                          seed=self.surrogate_seed, **self.surrogate_options)
        clean = lambda v: None if v is None or not np.isfinite(v) else float(v)  # noqa: E731
        return {"model": "MLP ensemble", "heldout_spearman": clean(heldout), "heldout_pairs": len(pairs),
                "cv_spearman": clean(cv), "cv_trials": len(done)}

    # -- state ---------------------------------------------------------------------------------------
    def get_state(self):
        state = super().get_state()
        state["autometa"] = {
            "blocks": self.blocks, "top_k": self.top_k, "operators": list(self.operators),
            "stage": self.stage, "queue": self.queue, "predictions": self.predictions,
            "expansions": self.expansions_log, "elapsed_seconds": self.elapsed(),
            "stop_reason": self.stop_reason,
        }
        return state

    def set_state(self, state):
        super().set_state(state)
        mine = state["autometa"]
        if (mine["blocks"], mine["top_k"], tuple(mine["operators"])) != (self.blocks, self.top_k, self.operators):
            raise ValueError(
                f"the KerasTuner project holds a search with blocks={mine['blocks']}, "
                f"top_k={mine['top_k']}, operators={mine['operators']}, not blocks={self.blocks}, "
                f"top_k={self.top_k}, operators={list(self.operators)}."
            )
        self.stage, self.queue = mine["stage"], list(mine["queue"])
        self.predictions = dict(mine["predictions"])
        self.expansions_log = list(mine["expansions"])
        self._seconds_before = float(mine["elapsed_seconds"])
        self._clock = time.monotonic()
        self.stop_reason = None


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

    def learner(self, arch: Architecture):
        from tfmeta.learner import MetaLearner

        keras.utils.set_random_seed(self.config.seed)
        model = arch.build()
        return MetaLearner(model, task="classification", inner_optimizer=self.config.inner_optimizer,
                           inner_lr=self.config.inner_lr, inner_steps=self.config.inner_steps)

    def trainer(self, learner, trial_dir: str):
        from tfmeta import estimators
        from tfmeta.training import MetaTrainer

        estimator = estimators.get(self.config.estimator, **self.config.estimator_options)
        if self.config.linearity_metrics:
            estimator.linearity_metrics = True
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
        from tfmeta import evaluation

        policy = keras.config.dtype_policy()
        keras.backend.clear_session()  # each candidate is a new graph: drop Keras' global state
        keras.config.set_dtype_policy(policy)
        learner = self.learner(arch)
        trainer = self.trainer(learner, trial_dir)
        stamps = []
        began = time.monotonic()
        history = trainer.fit(self.samplers["train"], self.config.trial_budget, progress=False,
                              on_step=lambda step, logs: stamps.append(time.monotonic()))
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
    from tfmeta.rundir import RunLock

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
        from tfmeta import evaluation
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
    tmp = os.path.join(config.out, RESULT_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(config.out, RESULT_FILE))
    return result
