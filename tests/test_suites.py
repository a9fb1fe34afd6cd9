"""The cost benchmark suite at its --quick size: JSON schema and plots."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import types

from tfmeta.app import cli, suites

FIGURES = ("seconds_per_step_median", "seconds_per_step_min", "peak_rss_mb", "compile_seconds")


def test_quick_cost_suite_writes_json_and_plots(tmp_path, capsys, monkeypatch):
    """`tfmeta bench --suite cost --quick`, run here. Each configuration is the `python -m tfmeta
    bench` command line the suite builds, run through `cli.main` in this process (a TensorFlow
    start-up each saved; `python -m tfmeta bench` as a process of its own is run in
    test_onednn.py), and its output goes through the suite's own parsing (`_run_json`).

    The suite runs four of the quick configurations (plain, maml, maml+remat, reuse: the options
    and the inner steps reach the command line); the other estimators' `tfmeta bench` runs are in
    their own tests (fomaml: test_cli, implicit, linearity, shifting, reuse), and a bench run is
    mostly a trace of the step (~6 CPU-s each)."""
    quick = suites.cost_configurations(quick=True)
    assert {suites._label(n, o) for n, o, _ in quick} == {
        "plain", "maml", "fomaml", "reptile", "implicit", "shifting", "linearity", "reuse(2)", "maml+remat(sqrt)"}
    assert {t for n, _, t in quick if n != "plain"} == {2}
    run_here = [c for c in quick if suites._label(c[0], c[1]) in {"plain", "maml", "maml+remat(sqrt)", "reuse(2)"}]
    monkeypatch.setattr(suites, "cost_configurations", lambda quick=False: run_here if quick else [])
    commands = []

    def run(cmd, **kwargs):
        assert cmd[:3] == [sys.executable, "-m", "tfmeta"] and cmd[3] == "bench", cmd
        commands.append(cmd)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(cmd[3:])
        return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())

    monkeypatch.setattr(suites, "subprocess",
                        types.SimpleNamespace(run=run, TimeoutExpired=subprocess.TimeoutExpired))
    output, plots = tmp_path / "cost.json", tmp_path / "plots"
    capsys.readouterr()
    code = cli.main(["bench", "--suite", "cost", "--quick", "--json", "--output", str(output),
                     "--plot", str(plots)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    assert "[1/" in stderr and "left" in stderr  # progress display
    report = json.loads(output.read_text())
    assert report == json.loads(stdout.strip().splitlines()[-1])
    assert report["suite"] == "cost" and report["quick"] is True
    labels = {r["label"] for r in report["results"]}
    assert labels == {"plain", "maml", "reuse(2)", "maml+remat(sqrt)"}
    assert len(report["results"]) == len(commands) == 4
    assert sum(c[c.index("--estimator") + 1] == "plain" for c in commands) == 1
    for cmd in commands:  # the options and T of each configuration reach its command line
        if "reuse" in cmd:
            assert cmd[cmd.index("--reuse-window") + 1] == "2" and cmd[cmd.index("--inner-steps") + 1] == "2"
        if "--remat" in cmd:
            assert cmd[cmd.index("--remat") + 1] == "sqrt" and cmd[cmd.index("--estimator") + 1] == "maml"
    for row in report["results"]:
        assert "error" not in row, row
        for key in FIGURES:
            assert isinstance(row[key], float) and row[key] >= 0, (row["label"], key)
        # what each bench process reported of its own configuration
        assert row["remat"] == ("sqrt" if row["label"] == "maml+remat(sqrt)" else "none"), row["label"]
        assert row["filters"] == 16 and row["meta_batch"] == 2 and row["steps"] == 1, row["label"]
    for name in ("time_vs_inner_steps.png", "memory_vs_inner_steps.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(report["targets"], dict)


def test_cost_configurations_cover_the_issue():
    configs = suites.cost_configurations()
    labels = {(n if n != "reuse" else f"reuse({o['reuse_window']})") for n, o, _ in configs}
    assert labels >= {"plain", "maml", "fomaml", "reptile", "reuse(2)", "reuse(4)", "reuse(8)",
                      "implicit", "shifting", "linearity"}
    assert {t for n, _, t in configs if n == "implicit"} == {1, 2, 4, 8, 16, 32, 64, 100}
    # maml, maml+remat, reuse and implicit side by side up to T = 100 (issue 21)
    for label in ("maml", "maml+remat(sqrt)", "implicit", "reuse(4)"):
        assert 100 in {t for n, o, t in configs if suites._label(n, o) == label}, label
    assert {t for n, o, t in configs if o.get("remat") == "sqrt"} == {1, 2, 4, 8, 16, 32, 64, 100}
    assert all(t >= o["reuse_window"] for n, o, t in configs if n == "reuse")


def _row(label, t, seconds, mb):
    return {"label": label, "inner_steps": t, "seconds_per_step_median": seconds, "peak_rss_mb": mb}


def test_cost_targets_of_remat():
    rows = [_row("maml", 4, 1.0, 900), _row("maml", 64, 10.0, 2000), _row("maml", 100, 0, 0) | {"error": "x"},
            _row("maml+remat(sqrt)", 4, 1.2, 800), _row("maml+remat(sqrt)", 64, 14.0, 1000),
            _row("maml+remat(sqrt)", 100, 30.0, 1100)]
    targets = suites.cost_targets(rows)
    memory = targets["maml+remat(sqrt) memory T=100 / T=4 <= 1.3"]
    assert memory == {"value": 1100 / 800, "met": False}
    time = targets["maml+remat(sqrt)/maml time at T=64 <= 1.5"]  # T=100 errored for maml
    assert time == {"value": 1.4, "met": True}
