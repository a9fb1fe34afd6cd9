"""The papers' settings as named presets of `tfmeta train` (``--preset NAME``).

A preset is a set of `tfmeta train` flag values taken from a paper, with its citation. It acts as
if those flags had been typed: any flag given explicitly on the command line overrides the
preset's value, and flags the preset does not name keep their defaults. The run's config.json
records the preset's name and every resolved value, so ``--resume`` needs no preset.

Values a paper does not state (e.g. iMAML's inner learning rate for its GD solver) are left at
tfmeta's defaults and listed under ``unstated``. The papers train for far longer than a CPU
budget allows: `--time-budget` still stops a run (0: no limit).

Settings that are not a `tfmeta train` run are covered by tests instead: iMAML's Appendix F.1
(synthetic linear regression, lambda = 5, kappa = 50, x in R^50) is
``tests/test_implicit.py::test_meta_gradient_matches_the_closed_form_of_appendix_f1``.

References:
    Kim, Park, Choi. Multi-step Estimation for Gradient-based Meta-learning. 2020. arXiv:2006.04298.
    Rajeswaran, Finn, Kakade, Levine. Meta-Learning with Implicit Gradients. NeurIPS 2019.
        arXiv:1909.04630.
    Shin, Lee, Gong, Hwang. Large-Scale Meta-Learning with Continual Trajectory Shifting. ICML 2021.
        arXiv:2102.07215.
    Anonymous. Enforcing Zero-Hessian in Meta-Learning (LIL). Under double-blind review, 2021
        (the copy in /work/shared/papers/004 carries no arXiv id).
    Antoniou, Edwards, Storkey. How to train your MAML. ICLR 2019. arXiv:1810.09502.
"""

from __future__ import annotations

from typing import Any, NamedTuple

KIM = "Kim, Park, Choi 2020, Multi-step Estimation for Gradient-based Meta-learning, arXiv:2006.04298"
RAJESWARAN = ("Rajeswaran, Finn, Kakade, Levine 2019, Meta-Learning with Implicit Gradients, "
              "arXiv:1909.04630")
SHIN = ("Shin, Lee, Gong, Hwang 2021, Large-Scale Meta-Learning with Continual Trajectory "
        "Shifting, arXiv:2102.07215")
LIL = "Anonymous 2021, Enforcing Zero-Hessian in Meta-Learning (LIL), under review, no arXiv id"
MAMLPP = "Antoniou, Edwards, Storkey 2019, How to train your MAML, ICLR 2019, arXiv:1810.09502"
#: meta-steps per epoch in MAML++'s schedules (the reference implementation's total_iter_per_epoch).
MAMLPP_EPOCH = 500


class Preset(NamedTuple):
    """Flag values (argparse destinations: RunConfig fields and estimator options) and citation."""

    values: dict[str, Any]
    citation: str
    #: where in the paper the values are stated
    where: str
    #: settings the paper leaves open (tfmeta's defaults apply)
    unstated: str = ""


def _reuse(ways: int, meta_batch: int) -> Preset:
    return Preset(
        dict(estimator="reuse", dataset="omniglot", ways=ways, shots=1, inner_steps=8,
             inner_optimizer="momentum", inner_momentum=0.9, inner_weight_decay=1e-4,
             inner_lr=0.4, meta_optimizer="adam", meta_lr=1e-3, meta_batch=meta_batch,
             iterations=60000, reuse_window=4),
        KIM, "Sec. 5.2 and Appendix F (Multi-step (4); windows 2 and 8 also reported)",
    )


def _imaml(ways: int, solver: str) -> Preset:
    values = dict(estimator="implicit", dataset="omniglot", ways=ways, shots=1, lam=2.0,
                  cg_steps=5, inner_solver=solver, meta_optimizer="adam", meta_lr=1e-3)
    if solver == "gd":
        values["inner_steps"] = 16 if ways == 5 else 25
        unstated = "inner learning rate, meta-batch, iterations"
    else:
        values["newton_steps"] = 3  # 5 CG steps per Newton direction: newton_cg_steps' default
        unstated = "meta-batch, iterations"
    return Preset(values, RAJESWARAN, "Table 2 and Appendix F.2 (Omniglot)", unstated)


PRESETS: dict[str, Preset] = {
    "reuse-omniglot-5way": _reuse(5, 32),
    "reuse-omniglot-20way": _reuse(20, 16),
    "imaml-gd-omniglot-5way": _imaml(5, "gd"),
    "imaml-gd-omniglot-20way": _imaml(20, "gd"),
    "imaml-hf-omniglot-5way": _imaml(5, "hessian-free"),
    "imaml-hf-omniglot-20way": _imaml(20, "hessian-free"),
    "cts-synthetic": Preset(
        dict(estimator="shifting", dataset="synthetic2d", inner_optimizer="momentum",
             inner_momentum=0.9, inner_lr=0.05, horizon=100, repeats=3, meta_optimizer="sgd",
             meta_lr=0.1, meta_batch=8),
        SHIN, "Sec. 4.1 (eight 2-D tasks)", "iterations",
    ),
    "lil-omniglot-1shot": Preset(
        dict(estimator="linearity", base="maml", dataset="omniglot", shots=1, inner_steps=3,
             inner_lr=0.5, meta_lr=1e-3, phase_weight=0.1, amplitude_weight=0.01),
        LIL, "Sec. 5 'Hyperparameter setting' and Appendix C (4-Conv; the paper uses "
        "miniImageNet, tiered, Cars, CUB)", "meta-batch, iterations",
    ),
    "maml++": Preset(
        dict(estimator="maml", dataset="omniglot", ways=5, shots=1, inner_steps=5, inner_lr=0.1,
             inner_optimizer="sgd", meta_batch=8, meta_optimizer="adam", meta_lr=1e-3,
             meta_lr_schedule="cosine", min_meta_lr=1e-5, iterations=100 * MAMLPP_EPOCH,
             lslr=True, per_step_bn=True, per_step_bn_stats=True, msl_steps=10 * MAMLPP_EPOCH,
             first_order_steps=50 * MAMLPP_EPOCH),
        MAMLPP, "Sec. 4 (MSL, DA after 50 epochs, BNWB, BNRS, LSLR, CA) and the authors' Omniglot 5-way 1-shot "
        "configuration (epochs of 500 meta-steps; see docs/mamlpp.md)",
        "query examples per class",
    ),
    "lil-omniglot-5shot": Preset(
        dict(estimator="linearity", base="maml", dataset="omniglot", shots=5, inner_steps=3,
             inner_lr=0.5, meta_lr=1e-3, phase_weight=0.1, amplitude_weight=0.1),
        LIL, "Sec. 5 'Hyperparameter setting' and Appendix C (4-Conv)", "meta-batch, iterations",
    ),
}


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"--preset={name!r} is not valid: expected one of {list(PRESETS)}.")
    return PRESETS[name]


def apply(name: str, args, given: set[str]) -> dict[str, Any]:
    """Set the preset's values on the parsed `args` except those in `given` (flags typed on the
    command line); returns the values applied."""
    applied = {}
    for key, value in get(name).values.items():
        if key not in given:
            setattr(args, key, value)
            applied[key] = value
    return applied


def command_line(name: str) -> str:
    """The preset as the `tfmeta train` command line it stands for."""
    parts = ["tfmeta train"]
    for key, value in get(name).values.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:  # a switch (--lslr)
            parts.append(flag)
        elif value is not False:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)
