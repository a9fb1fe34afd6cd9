"""Property-based: every combination of task shape and estimator option runs with finite
meta-gradients, or is rejected up front with a ValueError that names the argument."""

from __future__ import annotations

import re

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras

from tfmeta import estimators
from tfmeta.data import EpisodeSampler
from tfmeta.core.learner import MetaLearner
from tfmeta.training import MetaTrainer

CLASSES, PER_CLASS, FEATURES = 4, 5, 3
RNG = np.random.default_rng(0)
IMAGES = RNG.normal(size=(CLASSES * PER_CLASS, FEATURES)).astype("float32")
LABELS = np.repeat(np.arange(CLASSES), PER_CLASS)

VALID_OPTIONS = {
    "maml": st.just({}),
    "fomaml": st.just({}),
    "reptile": st.just({}),
    "reuse": st.fixed_dictionaries({"reuse_window": st.integers(1, 3)}),
    "implicit": st.fixed_dictionaries({"cg_steps": st.integers(0, 3), "lam": st.sampled_from([0.5, 2.0]),
                                       "inner_solver": st.sampled_from(["gd", "hessian-free"])}),
    "linearity": st.fixed_dictionaries({"base": st.sampled_from(["maml", "fomaml"]),
                                        "phase_weight": st.sampled_from([0.0, 0.1])}),
}
#: One bad value per argument; a configuration gets at most one of them.
BAD = {
    "ways": 0, "shots": 0, "query": 0, "meta_batch": 0, "inner_steps": -1,
    "inner_optimizer": "rmsprop", "inner_lr": -0.1,
    "reuse_window": 0, "cg_steps": -1, "lam": 0.0, "inner_solver": "adam", "base": "reptile",
    "phase_weight": -0.1, "too_many_ways": 5, "too_many_examples": 4,
}


@st.composite
def configurations(draw):
    name = draw(st.sampled_from(sorted(n for n in VALID_OPTIONS if n in estimators.names())))
    config = dict(
        estimator=name,
        options=draw(VALID_OPTIONS[name]),
        ways=draw(st.integers(1, CLASSES)),
        shots=draw(st.integers(1, 2)),
        query=draw(st.integers(1, 2)),
        meta_batch=draw(st.integers(1, 3)),
        inner_steps=draw(st.integers(0, 3)),
        inner_optimizer=draw(st.sampled_from(["sgd", "momentum", "adam"])),
        inner_lr=draw(st.sampled_from([1e-3, 0.1, 0.5])),
    )
    if name == "reuse":
        config["inner_steps"] = max(config["inner_steps"], config["options"]["reuse_window"])
    bad = draw(st.sampled_from([None] * 8 + sorted(BAD)))
    if bad == "too_many_ways":
        config["ways"] = CLASSES + 1
    elif bad == "too_many_examples":
        config["shots"], config["query"] = 3, 3  # 6 > PER_CLASS examples
    elif bad in config:
        config[bad] = BAD[bad]
    elif bad in config["options"]:
        config["options"][bad] = BAD[bad]
    else:
        bad = None  # an option this estimator does not have
    config["bad"] = bad
    return config


def _named(err: ValueError, config) -> bool:
    """The message names one of the arguments (as `name=` or the name itself)."""
    names = list(config) + list(config["options"]) + ["learning_rate", "split", "examples", "classes"]
    text = str(err)
    return any(re.search(rf"\b{re.escape(n)}\b", text) for n in names)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configurations())
def test_runs_with_finite_meta_gradients_or_is_rejected_up_front(config):
    try:
        sampler = EpisodeSampler(IMAGES, LABELS, ways=config["ways"], shots=config["shots"],
                                 query=config["query"], meta_batch=config["meta_batch"], seed=1)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(config["ways"])])
        learner = MetaLearner(model, inner_optimizer=config["inner_optimizer"], inner_lr=config["inner_lr"],
                              inner_steps=config["inner_steps"])
        estimator = estimators.get(config["estimator"], **config["options"])
        trainer = MetaTrainer(learner, estimator)
    except ValueError as err:
        assert config["bad"] is not None, f"a valid configuration was refused: {config}: {err}"
        assert _named(err, config), f"unclear error for {config}: {err}"
        return
    assert config["bad"] is None, f"accepted a bad configuration: {config}"
    logs = trainer.train_step(sampler.sample(0))
    assert all(np.isfinite(v) for v in logs.values()), (config, logs)
    assert all(np.all(np.isfinite(v.numpy())) for v in learner.meta_variables)
