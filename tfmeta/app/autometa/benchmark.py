"""The found architecture against conv4, meta-trained for the same wall-clock time.

The benchmark of the Auto-Meta issue: after a search (``tfmeta search ... --out DIR``), meta-train
the best architecture (``DIR/best_architecture.json``) from scratch and conv4 (Finn et al.'s
network, :func:`tfmeta.models.conv4`) with the search's estimator, data and inner-loop settings,
each for the same number of seconds, and report for both the meta-test accuracy with its 95%
interval (:func:`tfmeta.evaluation.evaluate`), the parameter count and the median seconds per
meta-step (after the first, traced step). Both start from the same seed and see the same tasks.

    python -m tfmeta.app.autometa.benchmark --out DIR --minutes 10 [--episodes 600] [--json]

:func:`measure_surrogate` measures the surrogate on the same search: fitted on the scores of the
1-block cells, it predicts randomly drawn 2-block expansions of them that the search never trained;
those are then meta-trained exactly as the search's trials, and the Spearman rank correlation of
predicted with measured scores is the surrogate's held-out ranking quality (``--surrogate N``).

Example:
    >>> report = compare("autometa", minutes=10)                       # doctest: +SKIP
    >>> report["autometa"]["accuracy_after"], report["conv4"]["accuracy_after"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tfmeta.core import _backend  # noqa: F401

import keras
import numpy as np

from tfmeta.app.autometa.search import ARCHITECTURE_FILE, SEARCH_FILE, SearchConfig, make_samplers
from tfmeta.app.autometa.space import Architecture


def load_search(out: str) -> tuple[SearchConfig, Architecture]:
    """The configuration and best architecture of the search in `out`."""
    paths = [os.path.join(out, SEARCH_FILE), os.path.join(out, ARCHITECTURE_FILE)]
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"out={out!r} (--out) holds no finished search: {path} is missing.")
    with open(paths[0], encoding="utf-8") as f:
        identity = json.load(f)["identity"]
    identity["operators"] = tuple(identity["operators"])
    return SearchConfig(**identity, out=out).validated(), Architecture.load(paths[1])


def meta_train_for(model: keras.Model, config: SearchConfig, samplers: dict, seconds: float,
                   episodes: int) -> dict:
    """Meta-train `model` for `seconds` with the search's settings; meta-test accuracy and costs."""
    from tfmeta import estimators
    from tfmeta.training import evaluation
    from tfmeta.core.learner import MetaLearner
    from tfmeta.training import MetaTrainer

    learner = MetaLearner(model, task="classification", inner_optimizer=config.inner_optimizer,
                          inner_lr=config.inner_lr, inner_steps=config.inner_steps)
    estimator = estimators.get(config.estimator, **config.estimator_options)
    trainer = MetaTrainer(learner, estimator, keras.optimizers.Adam(config.meta_lr), on_nonfinite="skip")
    stamps = []
    began = time.monotonic()
    trainer.fit(samplers["train"], 10 ** 9, time_budget=seconds, progress=False,
                on_step=lambda step, logs: stamps.append(time.monotonic()))
    elapsed = time.monotonic() - began
    result = evaluation.evaluate(learner, samplers["test"], episodes=episodes, estimator=trainer.estimator)
    steps = np.diff(stamps)
    return {
        "parameters": int(model.count_params()), "meta_steps": int(trainer.step.numpy()),
        "train_seconds": elapsed, "seconds_per_meta_step": float(np.median(steps)) if len(steps) else elapsed,
        **{k: result[k] for k in ("episodes", "accuracy_after", "accuracy_after_ci95",
                                  "accuracy_before", "accuracy_before_ci95")},
    }


def compare(out: str, *, minutes: float, episodes: int = 600, conv4_filters: int = 64) -> dict:
    """The best architecture of the search in `out` vs. conv4, each meta-trained `minutes` minutes."""
    from tfmeta.core import models

    if not minutes > 0:
        raise ValueError(f"minutes={minutes!r} (--minutes) is not valid: expected a number > 0.")
    config, arch = load_search(out)
    if config.image_size < 16:
        raise ValueError(
            f"the search in out={out!r} used image_size={config.image_size}: conv4's four 2x2 poolings "
            "need images of at least 16 pixels."
        )
    config.test_episodes = episodes
    samplers = make_samplers(config)
    report = {"out": out, "minutes": minutes, "estimator": config.estimator, "cell": arch.cell.to_json(),
              "cell_description": arch.cell.describe()}
    for name, build in (("autometa", lambda: arch.build()),
                        ("conv4", lambda: models.conv4(config.ways, image_size=config.image_size,
                                                       filters=conv4_filters))):
        keras.utils.set_random_seed(config.seed)
        report[name] = meta_train_for(build(), config, samplers, 60.0 * minutes, episodes)
    return report


def measure_surrogate(out: str, *, candidates: int = 12, stage: int = 1, seed: int = 0) -> dict:
    """Held-out rank correlation of the surrogate on the search in `out` (see module docstring).

    The surrogate is fitted on every completed trial with at most `stage` blocks; `candidates`
    expansions of the completed `stage`-block cells that no trial ran are drawn at random,
    predicted, meta-trained and scored like the search's trials (in a temporary directory).
    """
    import tempfile

    from tfmeta.app.autometa.search import MetaTrainEvaluator, ProgressiveOracle
    from tfmeta.app.autometa.surrogate import Surrogate, spearman

    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 3:
        raise ValueError(f"candidates={candidates!r} (--surrogate) is not valid: expected an integer >= 3.")
    config, _ = load_search(out)
    oracle = ProgressiveOracle(config.blocks, config.top_k, config.operators, seed=config.seed)
    oracle._set_project_dir(out, "tuner")
    oracle.reload()
    done = [(cell, score) for _, cell, score in oracle.completed() if len(cell) <= stage]
    tried = {row[1].key() for row in oracle.completed()}
    pool = {child.key(): child for cell, _ in done if len(cell) == stage
            for child in cell.expansions(config.operators) if child.key() not in tried}
    if len(done) < 3 or len(pool) < candidates:
        raise ValueError(f"out={out!r} has {len(done)} completed cells of <= {stage} blocks and "
                         f"{len(pool)} untried expansions: too few to measure {candidates} candidates.")
    rng = np.random.default_rng(seed)
    chosen = [pool[k] for k in rng.choice(sorted(pool), size=candidates, replace=False)]
    model = Surrogate(config.blocks, config.operators, seed=config.seed)
    predicted = model.fit([c for c, _ in done], [s for _, s in done]).predict(chosen)
    evaluator = MetaTrainEvaluator(config, make_samplers(config))
    skeleton = config.skeleton()
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, cell in enumerate(chosen):
            measured.append(evaluator(skeleton.with_cell(cell), os.path.join(tmp, str(i)))["val_accuracy"])
    return {"spearman": spearman(predicted, measured), "fitted_on": len(done), "candidates": [
        {"cell": c.key(), "predicted": float(p), "measured": float(m)}
        for c, p, m in zip(chosen, predicted, measured)]}


def main(argv=None) -> int:
    from tfmeta.core import runtime

    parser = argparse.ArgumentParser(prog="python -m tfmeta.app.autometa.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory of a finished `tfmeta search`")
    parser.add_argument("--minutes", type=float, default=None, help="meta-training time of each network")
    parser.add_argument("--surrogate", type=int, default=None, metavar="N",
                        help="instead: measure the surrogate's held-out rank correlation on N new candidates")
    parser.add_argument("--episodes", type=int, default=600, help="meta-test episodes")
    parser.add_argument("--conv4-filters", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    runtime.configure_threads()
    try:
        if args.surrogate is not None:
            report = measure_surrogate(args.out, candidates=args.surrogate)
            print(f"surrogate: Spearman {report['spearman']:.3f} on {len(report['candidates'])} held-out "
                  f"candidates (fitted on {report['fitted_on']} cells)")
            if args.json:
                print(json.dumps(report))
            return 0
        if args.minutes is None:
            raise ValueError("--minutes is required (or --surrogate N).")
        report = compare(args.out, minutes=args.minutes, episodes=args.episodes, conv4_filters=args.conv4_filters)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"autometa benchmark: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        for name in ("autometa", "conv4"):
            r = report[name]
            print(f"{name:>9}: {100 * r['accuracy_after']:.2f}% ± {100 * r['accuracy_after_ci95']:.2f} "
                  f"({r['episodes']} episodes), {r['parameters']} parameters, {r['meta_steps']} meta-steps, "
                  f"{r['seconds_per_meta_step']:.3f} s/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
