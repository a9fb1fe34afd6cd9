"""A newcomer's first hour (issue 16): help for every command, the time budget said out loud, an
honest resume, no stale lock, and Omniglot errors that name the way out."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import pytest

from tfmeta.app import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subcommands():
    parser = cli._parser(with_search=True)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_help_prints_for_every_command_with_defaults(capsys):
    parser, commands = _subcommands()
    assert set(commands) == {"train", "evaluate", "export", "bench", "search"}
    for argv in [["--help"], ["-h"]] + [[name, "--help"] for name in commands]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0, argv
        text = capsys.readouterr().out
        assert text.startswith("usage: tfmeta"), argv
    # every flag that has a default shows it, generated from its one source
    from tfmeta.app.config import DATASET_DEFAULTS, RunConfig, TrainOptions

    train = commands["train"].format_help()
    assert f"(default: {TrainOptions().time_budget})" in train.replace("\n", " ").replace("  ", " ") or \
        f"(default: {TrainOptions().time_budget})" in " ".join(train.split())
    flat = " ".join(train.split())
    assert f"stop meta-training after this many seconds" in flat
    assert f"(default: {DATASET_DEFAULTS['sinusoid']['iterations']} for sinusoid, " \
           f"{DATASET_DEFAULTS['omniglot']['iterations']} for omniglot" in flat
    assert f"meta learning rate (default: {RunConfig().meta_lr})" in flat
    assert "95% CI" in " ".join(parser.format_help().split())


def test_python_m_tfmeta_help_runs():
    proc = subprocess.run([sys.executable, "-m", "tfmeta", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "evaluate" in proc.stdout and "95% CI" in " ".join(proc.stdout.split())


def _train(argv, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli.main(argv)
    out = capsys.readouterr().out
    return code, out, [str(w.message) for w in caught]


def test_time_budget_stop_is_said_and_resume_is_honest(tmp_path, capsys):
    run = str(tmp_path / "run")
    common = ["--episodes", "5", "--no-export", "--no-tensorboard", "--json"]
    # a budget every first step overruns (it compiles): meta-training stops after step 1 of 7
    code, out, _ = _train(["train", "--iterations", "7", "--steps-per-epoch", "4", "--meta-batch", "2",
                           "--checkpoint-every", "1", "--time-budget", "0.001", "--out", run] + common, capsys)
    assert code == 0
    assert "stopped by --time-budget at step 1 of 7 (0.001 s); continue with: tfmeta train --resume" in out
    assert "4/4" not in out, "the progress bar must end where training ended"
    assert json.loads(out.splitlines()[-1])["stopped_by_time_budget"] is True
    assert not os.path.exists(os.path.join(run, ".lock")), "a clean finish removes the lock"

    code, out, messages = _train(["train", "--resume", run, "--time-budget", "0", "--steps-per-epoch", "4"]
                                 + common, capsys)
    assert code == 0
    assert not any("ran out of data" in m for m in messages), messages
    assert "resumed at step 1: meta-trained steps 2-7 (6) in" in out
    assert "stopped by --time-budget" not in out
    result = json.loads(out.splitlines()[-1])
    assert (result["steps"], result["start_step"], result["stopped_by_time_budget"]) == (7, 1, False)
    # epochs end at multiples of --steps-per-epoch from step 0: 4 and 7
    with open(os.path.join(run, "metrics.csv"), encoding="utf-8") as f:
        rows = f.read().splitlines()
    header = rows[0].split(",")
    ends = [(int(r.split(",")[0]), float(r.split(",")[header.index("meta_step")])) for r in rows[1:]]
    assert ends == [(0, 1.0), (0, 4.0), (1, 7.0)]
    assert not os.path.exists(os.path.join(run, ".lock"))


OFFLINE = r"""
import json, socket, sys, time
import tensorflow_datasets  # the install must bring what it imports (importlib_resources)
from tfmeta.app import cli

def offline(*args, **kwargs):
    raise socket.gaierror(-2, "Name or service not known")

socket.getaddrinfo = offline  # no network, whatever this machine has
began = time.monotonic()
code = cli.main(["train", "--dataset", "omniglot", "--no-progress", "--out", sys.argv[1]])
print(json.dumps({"code": code, "seconds": time.monotonic() - began}))
"""


def test_omniglot_without_data_dir_offline_fails_fast_naming_the_way_out(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    proc = subprocess.run([sys.executable, "-c", OFFLINE, str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path), env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 2, proc.stderr[-2000:]
    assert result["seconds"] < 10
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("tfmeta train: error:") and "no network" in message
    for name in ("--data-dir", "images_background.zip", "images_evaluation.zip", "images_background_small1.zip"):
        assert name in message
    assert "Traceback" not in proc.stderr


def test_tensorflow_datasets_import_error_is_reported_as_one(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails with ImportError
    from tfmeta.data.omniglot import load_omniglot

    with pytest.raises(RuntimeError, match=r"could not import tensorflow_datasets \((ModuleNotFound|Import)Error"):
        load_omniglot(None)
