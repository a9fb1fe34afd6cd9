"""The KerasTuner oracle of Auto-Meta's progressive search (PNAS's stages, a surrogate ranking).

:class:`ProgressiveOracle` hands out the cells of the current stage and, when a stage is done,
fits the surrogate on every (cell, score) so far and queues the best-ranked expansions of the top
K cells (steps 1-4 of :mod:`tfmeta.app.autometa.search`).

References:
    Liu, C. et al. "Progressive Neural Architecture Search." ECCV 2018. arXiv:1712.00559.
"""

from __future__ import annotations

import time

import keras_tuner as kt
import numpy as np

from tfmeta.app.autometa.space import OPERATORS, Cell, check_operators, initial_cells, planned_trials
from tfmeta.app.autometa.surrogate import Surrogate, cross_validated_spearman, spearman

OBJECTIVE = "val_accuracy"
_TrialStatus = kt.engine.trial.TrialStatus


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


