"""Run configuration: the flags of `tfmeta train`, their per-dataset defaults, and what they build.

A run directory holds ``config.json`` (this configuration) and ``checkpoints/``; `evaluate`,
`export` and `train --resume` rebuild the same learner from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from typing import Any

from tfmeta.core import _backend  # noqa: F401

import keras

from tfmeta import data, estimators
from tfmeta.core import inner_optimizers, models
from tfmeta.core.files import write_json
from tfmeta.core.learner import MetaLearner, parse_remat
from tfmeta.data import synthetic2d

META_OPTIMIZERS = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}
#: `--meta-lr-schedule` choices.
META_LR_SCHEDULES = ("constant", "cosine")

#: Defaults that depend on the dataset (Finn et al.'s settings, shortened to fit CPU budgets).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "sinusoid": dict(model="mlp", ways=1, shots=5, query=10, inner_steps=1, inner_lr=0.01,
                     inner_optimizer="sgd", meta_batch=25, iterations=20000),
    "omniglot": dict(model="conv4", ways=5, shots=1, query=15, inner_steps=5, inner_lr=0.4,
                     inner_optimizer="sgd", meta_batch=32, iterations=2000),
    # Shin et al. 2021, Sec. 4.1: alpha 0.05, momentum 0.9, 100 inner steps (defined in synthetic2d).
    "synthetic2d": dict(model="point", ways=1, shots=1, query=1, **synthetic2d.PAPER_INNER_LOOP,
                        meta_batch=8, iterations=300),
}


@dataclasses.dataclass
class TrainOptions:
    """How `tfmeta train` runs a configuration (one field per flag; not saved with the run).

    The default `time_budget` caps the main job (`tfmeta train` with no flags) at 100 seconds of
    meta-training, so it finishes in about 1.5 minutes on two CPU cores; a run stopped by it says
    so ("stopped by --time-budget at step N of M") and `tfmeta train --resume RUNDIR` continues it.
    """

    #: seconds of meta-training before the run stops (0: no limit).
    time_budget: float = 100.0
    #: meta-steps between checkpoints.
    checkpoint_every: int = 500
    #: held-out episodes of the final evaluation.
    episodes: int = 600
    #: meta-steps between validations (Keras epochs).
    steps_per_epoch: int = 1000
    #: task batches of the val split evaluated after each epoch.
    validation_batches: int = 2


@dataclasses.dataclass
class RunConfig:
    """Everything that defines a meta-training run (one field per `tfmeta train` flag)."""

    estimator: str = "maml"
    dataset: str = "sinusoid"
    data_dir: str | None = None
    model: str | None = None
    ways: int | None = None
    shots: int | None = None
    query: int | None = None
    inner_steps: int | None = None
    inner_lr: float | None = None
    inner_optimizer: str | None = None
    #: mu and omega of the momentum inner optimizer (Kim et al. 2020, Eq. 5);
    #: None: the optimizer's defaults (0.9, 0).
    inner_momentum: float | None = None
    inner_weight_decay: float | None = None
    adapt: str = "all"
    meta_lr: float = 1e-3
    meta_optimizer: str = "adam"
    meta_batch: int | None = None
    iterations: int | None = None
    seed: int = 0
    #: the chosen estimator's own options (its `flags`), e.g. {"window": 4} for reuse.
    estimator_options: dict = dataclasses.field(default_factory=dict)
    #: log the LIL linearity metrics (PC, AC) every meta-step whatever the estimator.
    linearity_metrics: bool = False
    #: rematerialise the inner loop (MetaLearner's `remat`): "none", "sqrt" or "every:K".
    remat: str = "none"
    #: the `--preset` the values came from (a record; the values themselves are in the fields).
    preset: str | None = None
    #: MAML++ (tfmeta.core.mamlpp): per-layer per-step inner learning rates (LSLR) and per-step
    #: BatchNorm weights (BNWB), options of the learner.
    lslr: bool = False
    per_step_bn: bool = False
    #: MAML++'s per-step BatchNorm running statistics (BNRS), kept by the learner.
    per_step_bn_stats: bool = False
    #: the meta learning rate: "constant" or "cosine" (Keras' CosineDecay from meta_lr to
    #: min_meta_lr over the run's iterations; MAML++).
    meta_lr_schedule: str = "constant"
    min_meta_lr: float = 0.0

    def resolved(self) -> "RunConfig":
        """A copy with every None filled from the dataset's defaults; validates the choices."""
        if self.dataset not in DATASET_DEFAULTS:
            raise ValueError(
                f"dataset={self.dataset!r} is not valid: expected one of {list(DATASET_DEFAULTS)}."
            )
        filled = dataclasses.replace(self)
        for key, value in DATASET_DEFAULTS[self.dataset].items():
            if getattr(filled, key) is None:
                setattr(filled, key, value)
        choices = ["point"] if filled.dataset == "synthetic2d" else list(models.MODELS)
        if filled.model not in choices:
            raise ValueError(f"model={filled.model!r} is not valid for dataset={filled.dataset!r}: "
                             f"expected one of {choices}.")
        for name in ("inner_momentum", "inner_weight_decay"):
            if getattr(filled, name) is not None and filled.inner_optimizer != "momentum":
                raise ValueError(
                    f"{name}={getattr(filled, name)!r} (--{name.replace('_', '-')}) applies only to "
                    f"inner_optimizer='momentum', got inner_optimizer={filled.inner_optimizer!r}: "
                    "pass --inner-optimizer momentum."
                )
        if filled.meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(f"meta_optimizer={filled.meta_optimizer!r} is not valid: "
                             f"expected one of {sorted(META_OPTIMIZERS)}.")
        _check_remat(filled)
        _check_mamlpp(filled)
        return filled

    def save(self, path: str) -> None:
        """Write ``config.json`` of a run directory (created if missing) atomically."""
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str) -> "RunConfig":
        """Read `path`; a file that is not JSON, or JSON of the wrong shape, raises ValueError naming it."""
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path!r} is not a valid run configuration: not JSON ({err}).") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path!r} is not a valid run configuration: expected a JSON object of the "
                             f"run's settings, got a JSON {type(values).__name__}.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in values.items():
            if name in fields and not _has_type(value, fields[name].type):
                raise ValueError(f"{path!r} is not a valid run configuration: {name}={value!r} is not "
                                 f"valid (expected {fields[name].type}).")
        return cls(**{k: v for k, v in values.items() if k in fields})


_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "dict": (dict,), "bool": (bool,)}


def _has_type(value, annotation: str) -> bool:
    parts = [p.strip() for p in str(annotation).split("|")]
    if value is None:
        return "None" in parts
    types = tuple(t for p in parts if p != "None" for t in _JSON_TYPES.get(p, (object,)))
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


#: Numbers held per example feature by each dataset's inputs.
_FEATURES = {"sinusoid": 1, "synthetic2d": 2, "omniglot": 28 * 28}


def task_batch_bytes(config: RunConfig) -> int:
    """A lower estimate of the memory one task batch of `config` takes while it is sampled.

    meta_batch x ways x (shots + query) examples, each its features plus a label, as float64
    while the sampler draws them (the float32 tensors come on top). `tfmeta train` refuses a
    configuration whose estimate exceeds the machine's memory before anything is allocated.
    """
    ways = 1 if config.dataset == "sinusoid" else config.ways
    examples = config.meta_batch * ways * (config.shots + config.query)
    return examples * (_FEATURES.get(config.dataset, 1) + 1) * 8


def physical_memory_bytes() -> int | None:
    """The machine's physical memory (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_remat(config: RunConfig) -> None:
    """Refuse a bad --remat before anything is written: K out of 1..T, or an estimator that does
    not differentiate through the inner loop (the learner and estimator raise the same)."""
    remat = parse_remat(config.remat)
    if remat is None:
        return
    if isinstance(remat, int) and remat > config.inner_steps:
        raise ValueError(
            f"remat={config.remat!r} (--remat every:{remat}) is not valid for inner_steps="
            f"{config.inner_steps}: expected a window K with 1 <= K <= T."
        )
    probe = types.SimpleNamespace(remat=remat, inner_steps=config.inner_steps)
    build_estimator(config).check_remat(probe)


#: estimators the `maml++` preset applies to: MSL and DA are options of the maml estimator.
MAMLPP_ESTIMATORS = ("maml",)


def _check_mamlpp(config: RunConfig) -> None:
    """Refuse MAML++ settings that do not apply, naming the flags, before anything is written."""
    if config.preset == "maml++" and config.estimator not in MAMLPP_ESTIMATORS:
        raise ValueError(
            f"--preset maml++ is not valid with --estimator {config.estimator}: MAML++'s multi-step "
            "loss and derivative-order annealing are options of the maml estimator (and its per-step "
            "meta-parameters need an estimator that differentiates the inner loop). Expected "
            "--estimator maml, or no --preset.")
    if config.meta_lr_schedule not in META_LR_SCHEDULES:
        raise ValueError(f"meta_lr_schedule={config.meta_lr_schedule!r} (--meta-lr-schedule) is not valid: "
                         f"expected one of {list(META_LR_SCHEDULES)}.")
    if not 0 <= config.min_meta_lr <= config.meta_lr:
        raise ValueError(f"min_meta_lr={config.min_meta_lr!r} (--min-meta-lr) is not valid: expected a "
                         f"number in [0, --meta-lr {config.meta_lr:g}].")
    if config.min_meta_lr and config.meta_lr_schedule == "constant":
        raise ValueError(f"--min-meta-lr {config.min_meta_lr:g} applies only to --meta-lr-schedule cosine.")
    for flag, on in (("per_step_bn=True (--per-step-bn)", config.per_step_bn),
                     ("per_step_bn_stats=True (--per-step-bn-stats)", config.per_step_bn_stats)):
        if on and config.model != "conv4":
            raise ValueError(f"{flag} needs a model with BatchNorm: expected --model conv4, got {config.model!r}.")
    if config.per_step_bn_stats and config.remat != "none":
        raise ValueError(f"--per-step-bn-stats is not valid with --remat {config.remat}: a rematerialised window "
                         "does not replay the statistics pass. Expected --remat none.")
    if config.lslr and config.dataset == "synthetic2d":
        raise ValueError("lslr=True (--lslr) is not available with --dataset synthetic2d.")
    if config.per_step_bn_stats:  # the estimator refuses the same when it is compiled
        if config.estimator in ("reptile", "implicit", "shifting"):
            raise ValueError(f"--per-step-bn-stats is not valid with --estimator {config.estimator}: MAML++'s "
                             "options need an inner loop from the initialization to collect the statistics along. "
                             "Expected --estimator maml, fomaml or reuse.")
        build_estimator(config).check_statistics(types.SimpleNamespace(bn_statistics=[None]))
    for flag, on in (("--lslr", config.lslr), ("--per-step-bn", config.per_step_bn)):
        if on and config.estimator in ("reptile", "implicit", "shifting", "fomaml") and not (
                flag == "--per-step-bn" and config.estimator == "fomaml"):
            raise ValueError(
                f"{flag} is not valid with --estimator {config.estimator}: its meta-parameters act "
                "through the inner loop's dynamics, which this estimator does not differentiate. "
                "Expected --estimator maml, reuse or linearity.")


def build_model(config: RunConfig) -> keras.Model:
    """The configured network, freshly initialised from `config.seed`."""
    keras.utils.set_random_seed(config.seed)
    if config.model == "conv4":
        return models.conv4(config.ways)
    return models.mlp()


def build_meta_optimizer(config: RunConfig) -> keras.optimizers.Optimizer:
    """The meta-optimizer: Adam (default) or plain SGD (Reptile's and shifting's beta), with a
    constant learning rate or Keras' cosine decay over the run's iterations (MAML++)."""
    rate = config.meta_lr
    if config.meta_lr_schedule == "cosine":
        from tfmeta.core import mamlpp

        rate = mamlpp.cosine_meta_lr(config.meta_lr, config.iterations, config.min_meta_lr)
    return META_OPTIMIZERS[config.meta_optimizer](rate)


def build_inner_optimizer(config: RunConfig) -> inner_optimizers.InnerOptimizer:
    """The inner optimizer by name, with --inner-momentum / --inner-weight-decay if given."""
    options = {}
    if config.inner_momentum is not None:
        options["momentum"] = config.inner_momentum
    if config.inner_weight_decay is not None:
        options["weight_decay"] = config.inner_weight_decay
    return inner_optimizers.get(config.inner_optimizer, config.inner_lr, **options)


def build_learner(config: RunConfig) -> MetaLearner:
    if config.dataset == "synthetic2d":
        return synthetic2d.make_learner(inner_optimizer=build_inner_optimizer(config),
                                        inner_steps=config.inner_steps, remat=config.remat)
    task = "regression" if config.dataset == "sinusoid" else "classification"
    return MetaLearner(
        build_model(config),
        task=task,
        inner_optimizer=build_inner_optimizer(config),  # carries --inner-lr
        inner_steps=config.inner_steps,
        adapt=config.adapt,
        remat=config.remat,
        lslr=config.lslr,
        per_step_bn=config.per_step_bn,
        per_step_bn_stats=config.per_step_bn_stats,
    )


def build_estimator(config: RunConfig) -> estimators.Estimator:
    options = dict(config.estimator_options)
    if config.linearity_metrics:  # a common option: every estimator takes it
        options["linearity_metrics"] = True
    return estimators.get(config.estimator, **options)


def build_sampler(config: RunConfig, split: str, *, meta_batch: int | None = None, seed: int | None = None):
    sampler = data.make_sampler(
        config.dataset,
        split,
        ways=config.ways,
        shots=config.shots,
        query=config.query,
        meta_batch=meta_batch or config.meta_batch,
        seed=config.seed if seed is None else seed,
        data_dir=config.data_dir,
    )
    if split == "train":  # the estimator's view of the training stream (shifting: rounds)
        sampler = build_estimator(config).prepare_sampler(sampler)
    return sampler
