"""The papers' settings on the command line: --inner-momentum, --inner-weight-decay and --preset
(tfmeta.app.presets), checked against the numbers in /work/shared/papers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from tfmeta.app import cli, presets
from tfmeta.app.config import build_estimator, build_inner_optimizer, build_learner


def _config(argv):
    args = cli._parser(with_search=False).parse_args(["train"] + argv)
    if args.preset:
        cli.apply_preset(args, ["train"] + argv)
    return cli.run_config(args)


def test_inner_momentum_and_weight_decay_reach_the_inner_optimizer():
    """Two steps of Eq. 5 (Kim et al. 2020) from v = 0 on L = p^2 / 2 (g = p):
    v1 = p0 + w p0, p1 = p0 - eta v1, v2 = mu v1 + p1 + w p1, p2 = p1 - eta v2."""
    config = _config(["--inner-optimizer", "momentum", "--inner-momentum", "0.5",
                      "--inner-weight-decay", "0.25", "--inner-lr", "0.1"])
    assert (config.inner_momentum, config.inner_weight_decay) == (0.5, 0.25)
    opt = build_learner(config).inner_optimizer
    assert opt.weight_decay == 0.25
    from tfmeta.core import inner_optimizers

    p = [tf.constant(2.0, tf.float64)]
    state = opt.init(p)
    for _ in range(2):
        p, state = inner_optimizers.step(opt, p, p, state)
    mu, w, eta, p0 = 0.5, 0.25, 0.1, 2.0
    v1 = (1 + w) * p0
    p1 = p0 - eta * v1
    v2 = mu * v1 + (1 + w) * p1
    np.testing.assert_allclose(float(p[0]), p1 - eta * v2, rtol=1e-12)


@pytest.mark.parametrize("argv,flag", [
    (["--inner-momentum", "0.5"], "--inner-momentum"),  # default inner optimizer: sgd
    (["--inner-optimizer", "adam", "--inner-weight-decay", "0.1"], "--inner-weight-decay"),
])
def test_momentum_flags_without_the_momentum_optimizer_are_refused(argv, flag, capsys):
    assert cli.main(["train"] + argv + ["--iterations", "1", "--no-export"]) == 2
    err = capsys.readouterr().err
    assert flag in err and "--inner-optimizer momentum" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,flag", [
    (["--inner-momentum", "1.5"], "--inner-momentum"),
    (["--inner-weight-decay", "-1"], "--inner-weight-decay"),
    (["--preset", "maml-everything"], "--preset"),
])
def test_bad_values_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train"] + argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


# The papers' numbers, read from /work/shared/papers (000 Appendix F, 002 Table 2 and Appendix F.2,
# 003 Sec. 4.1, 004 Sec. 5 and Appendix C).
PAPER = {
    "reuse-omniglot-5way": dict(estimator="reuse", inner_optimizer="momentum", inner_momentum=0.9,
                                inner_weight_decay=1e-4, inner_steps=8, inner_lr=0.4, meta_lr=1e-3,
                                meta_batch=32, ways=5, iterations=60000),
    "reuse-omniglot-20way": dict(inner_momentum=0.9, inner_weight_decay=1e-4, inner_steps=8,
                                 meta_batch=16, ways=20),
    "imaml-gd-omniglot-5way": dict(estimator="implicit", inner_steps=16, ways=5,
                                   _options=dict(lam=2.0, cg_steps=5, inner_solver="gd")),
    "imaml-gd-omniglot-20way": dict(inner_steps=25, ways=20, _options=dict(lam=2.0, cg_steps=5)),
    "imaml-hf-omniglot-5way": dict(_options=dict(lam=2.0, cg_steps=5, inner_solver="hessian-free",
                                                 newton_steps=3)),
    "imaml-hf-omniglot-20way": dict(ways=20, _options=dict(lam=2.0, newton_steps=3)),
    "cts-synthetic": dict(estimator="shifting", dataset="synthetic2d", inner_optimizer="momentum",
                          inner_momentum=0.9, inner_lr=0.05, meta_optimizer="sgd", meta_lr=0.1,
                          meta_batch=8, _options=dict(horizon=100, repeats=3)),
    "lil-omniglot-1shot": dict(estimator="linearity", inner_steps=3, inner_lr=0.5, shots=1,
                               _options=dict(base="maml", phase_weight=0.1, amplitude_weight=0.01)),
    "lil-omniglot-5shot": dict(shots=5, _options=dict(phase_weight=0.1, amplitude_weight=0.1)),
    # Antoniou et al. 2019 (arXiv:1810.09502), Sec. 4 and the authors' Omniglot 5-way 1-shot
    # configuration: epochs of 500 meta-steps, 100 epochs, MSL over 10, DA after 50.
    "maml++": dict(estimator="maml", dataset="omniglot", ways=5, shots=1, inner_steps=5, inner_lr=0.1,
                   meta_batch=8, meta_lr=1e-3, meta_lr_schedule="cosine", min_meta_lr=1e-5,
                   iterations=50000, lslr=True, per_step_bn=True,
                   _options=dict(msl_steps=5000, first_order_steps=25000)),
}


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_each_preset_holds_its_papers_numbers_and_builds(name):
    assert set(PAPER) == set(presets.PRESETS)
    config = _config(["--preset", name])
    want = dict(PAPER[name])
    options = want.pop("_options", {})
    for key, value in want.items():
        assert getattr(config, key) == value, key
    for key, value in options.items():
        assert config.estimator_options[key] == value, key
    assert config.preset == name
    preset = presets.get(name)
    assert "arXiv:" in preset.citation or "no arXiv id" in preset.citation
    est = build_estimator(config)  # the estimator accepts every option
    assert est.name == config.estimator
    opt = build_inner_optimizer(config)
    assert opt.weight_decay == (config.inner_weight_decay or 0.0)
    assert presets.command_line(name).startswith("tfmeta train --estimator")


def test_explicit_flags_override_the_preset_in_any_spelling():
    config = _config(["--preset", "reuse-omniglot-5way", "--inner-steps=4", "--reuse-win", "2",
                      "--inner-weight-decay", "0"])
    assert (config.inner_steps, config.estimator_options["reuse_window"]) == (4, 2)
    assert config.inner_weight_decay == 0.0  # an explicit value equal to "off" still wins
    assert (config.inner_momentum, config.meta_batch) == (0.9, 32)  # the rest is the preset's
    other = _config(["--preset", "imaml-hf-omniglot-5way", "--estimator", "maml"])
    assert other.estimator == "maml"


def test_preset_run_from_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", "--preset", "cts-synthetic", "--horizon", "4", "--iterations", "2",
                     "--episodes", "2", "--no-export", "--no-progress", "--no-tensorboard",
                     "--out", "run", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    assert "preset cts-synthetic: Shin, Lee, Gong, Hwang 2021" in captured.err
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert config["preset"] == "cts-synthetic"
    assert config["estimator_options"] == {"horizon": 4, "repeats": 3}
    assert (config["meta_optimizer"], config["meta_lr"], config["inner_momentum"]) == ("sgd", 0.1, 0.9)
