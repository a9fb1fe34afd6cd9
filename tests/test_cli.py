"""The `tfmeta` command line: the main job, evaluate/export on its run, bench, bad flags."""

from __future__ import annotations

import json
import os

import pytest

from tfmeta.app import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OMNIGLOT = os.environ.get("TFMETA_OMNIGLOT_DIR", os.path.join(REPO, "..", "shared", "data", "omniglot"))


def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_train_main_job_lowers_held_out_mse_and_exports(tmp_path, capsys, recwarn):
    """The main job, run through `cli.main` here (`python -m tfmeta` as a process of its own is
    run by test_newcomer.py and test_fault_matrix.py): a TensorFlow start-up saved."""
    from tfmeta.core.learner import InnerLoopWarning

    run = tmp_path / "run"
    capsys.readouterr()
    code = cli.main(["train", "--iterations", "300", "--episodes", "200", "--out", str(run),
                     "--export-dir", str(tmp_path / "sm"), "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    result = _last_json(out)
    assert result["steps"] == 300
    assert result["loss_after"] < result["loss_before"]
    assert "held-out MSE" in out
    # the inner loop's effect at the initialization is reported, and the main job does not warn
    assert result["inner_loop"]["support_loss_drop"] > 0.01 and not result["inner_loop"]["stalled"]
    assert "inner loop at the initialization: 1 step lowers the support loss by" in out
    assert "InnerLoopWarning" not in err
    assert not [w for w in recwarn if issubclass(w.category, InnerLoopWarning)]
    assert os.path.isfile(os.path.join(result["export"], "saved_model.pb"))

    code = cli.main(["evaluate", "--run", str(run), "--episodes", "50", "--json"])
    assert code == 0
    code = cli.main(["export", "--run", str(run), "--export-dir", str(tmp_path / "sm")])
    assert code == 0
    assert sorted(os.listdir(tmp_path / "sm" / "sinusoid_maml")) == ["1", "2"]
    # the run directory refuses to be overwritten
    assert cli.main(["train", "--out", str(run), "--iterations", "1"]) == 2


def test_bench_prints_the_documented_json(capsys):
    code = cli.main(["bench", "--estimator", "fomaml", "--meta-batch", "2", "--inner-steps", "1",
                     "--steps", "1", "--ways", "2", "--query", "1", "--json"])
    assert code == 0
    result = _last_json(capsys.readouterr().out)
    for key in ("seconds_per_step_median", "seconds_per_step_min", "peak_rss_mb", "compile_seconds"):
        assert isinstance(result[key], float) and result[key] >= 0


@pytest.mark.parametrize("argv,flag", [
    (["train", "--inner-lr", "-1"], "--inner-lr"),
    (["train", "--inner-steps", "0"], "--inner-steps"),
    (["train", "--meta-lr", "0"], "--meta-lr"),
    (["train", "--estimator", "bogus"], "--estimator"),
    (["train", "--dataset", "imagenet"], "--dataset"),
    (["bench", "--meta-batch", "zero"], "--meta-batch"),
])
def test_bad_flags_are_named(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir(OMNIGLOT), reason="Omniglot archive not available")
@pytest.mark.parametrize("argv,word", [
    (["--ways", "100"], "ways=100"),
    (["--shots", "10", "--query", "15"], "shots"),
])
def test_impossible_episodes_are_named(argv, word, capsys, tmp_path):
    code = cli.main(["train", "--dataset", "omniglot", "--data-dir", OMNIGLOT,
                     "--out", str(tmp_path / "r"), *argv])
    assert code == 2
    assert word in capsys.readouterr().err
