"""What defines an Auto-Meta search: :class:`SearchConfig` (the flags of `tfmeta search`) and the
train / val / test samplers it meta-trains and scores candidates on.

The fields a search shares with `tfmeta train` on Omniglot (ways, shots, inner steps, inner
learning rate and optimizer, meta learning rate, seed) read their defaults from
:mod:`tfmeta.app.config`, where they are defined once; the search's own fields are defined here.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from tfmeta import data, estimators
from tfmeta.app.autometa import synthetic
from tfmeta.app.autometa.space import OPERATORS, Architecture, Cell, check_operators
from tfmeta.app.config import DATASET_DEFAULTS, RunConfig

DATASETS = ("omniglot", "synthetic")

# -- configuration ---------------------------------------------------------------------------------
_OMNIGLOT = DATASET_DEFAULTS["omniglot"]
_RUN = RunConfig()


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
    # shared with `tfmeta train` on Omniglot: read from its defaults (app.config), defined once there
    ways: int = _OMNIGLOT["ways"]
    shots: int = _OMNIGLOT["shots"]
    #: the search's own, smaller episodes: it meta-trains a candidate per trial
    query: int = 5
    meta_batch: int = 4
    inner_steps: int = _OMNIGLOT["inner_steps"]
    inner_lr: float = _OMNIGLOT["inner_lr"]
    inner_optimizer: str = _OMNIGLOT["inner_optimizer"]
    meta_lr: float = _RUN.meta_lr
    image_size: int = 28
    filters: int = 16
    cells_per_stage: int = 1
    reductions: int = 2
    val_episodes: int = 50
    test_episodes: int = 200
    seed: int = _RUN.seed
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
    # the estimator's view of the training stream (shifting: the same tasks for a round)
    estimator = estimators.get(config.estimator, **config.estimator_options)
    samplers["train"] = estimator.prepare_sampler(samplers["train"])
    return samplers

