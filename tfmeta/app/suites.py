"""Benchmark suites: every estimator side by side, one configuration per process, with plots.

- :func:`cost`: seconds per meta-step and peak memory for each estimator and number of inner
  steps (`tfmeta bench --suite cost --json --plot DIR`), each configuration in its own
  `tfmeta bench` process so that peak memory is its own.
- :func:`accuracy`: each estimator meta-trained on Omniglot 5-way 1-shot for the same wall-clock
  budget, validated as it goes and tested on 600 episodes with a 95% interval
  (`tfmeta bench --suite accuracy --data-dir DIR --budget-minutes M`): the project's counterpart of
  the papers' Omniglot tables. Meta-train, meta-validation and meta-test alphabets are disjoint
  (`tfmeta/data/omniglot.py`).

Both write one JSON file and PNG plots, and show progress (configuration, elapsed, estimated
remaining) on stderr.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

from tfmeta.core.files import write_json

#: Estimators of the cost suite (reuse is run at several windows).
COST_ESTIMATORS = ("maml", "fomaml", "reptile", "implicit", "shifting", "linearity")
REUSE_WINDOWS = (2, 4, 8)
INNER_STEPS = (1, 2, 4, 8, 16)
LONG_INNER_STEPS = (32, 64, 100)  # implicit, reuse, maml and maml+remat: memory against T
#: estimators also run at LONG_INNER_STEPS (exact MAML as the reference for remat).
LONG_ESTIMATORS = ("implicit", "maml")
#: rematerialised MAML (`--remat`): memory about sqrt(T) instead of T.
REMAT_MODES = ("sqrt",)
ACCURACY_ESTIMATORS = ("maml", "fomaml", "reptile", "reuse", "implicit", "shifting", "linearity")


class _Progress:
    """One line per configuration on stderr: which, elapsed, estimated remaining."""

    def __init__(self, total: int):
        self.total, self.done, self.began = total, 0, time.monotonic()

    def start(self, label: str):
        elapsed = time.monotonic() - self.began
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        sys.stderr.write(f"[{self.done + 1}/{self.total}] {label}  elapsed {elapsed:.0f}s, "
                         f"~{left:.0f}s left\n")
        sys.stderr.flush()

    def finish(self):
        self.done += 1


def _machine() -> dict:
    """The machine the suite ran on (each row also records its own process's, under "machine")."""
    from tfmeta.core import runtime

    return runtime.machine()


def _run_json(cmd: list[str], timeout: float) -> dict:
    """Run a tfmeta command in its own process; its last stdout line is a JSON object."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def cost_configurations(quick: bool = False) -> list[tuple[str, dict, int]]:
    """(estimator, options, inner steps) of the cost suite; `quick` is a small subset (every
    estimator once, at T = 2: about 2 minutes)."""
    steps = (2,) if quick else INNER_STEPS
    long = () if quick else LONG_INNER_STEPS
    configs = [("plain", {}, 0)]
    for name in COST_ESTIMATORS:
        for t in steps + (long if name in LONG_ESTIMATORS else ()):
            configs.append((name, {}, t))
    for mode in REMAT_MODES:
        for t in steps + long:
            configs.append(("maml", {"remat": mode}, t))
    for window in (2,) if quick else REUSE_WINDOWS:
        for t in steps + long:
            if t >= window:
                configs.append(("reuse", {"reuse_window": window}, t))
    return configs


def _label(name: str, options: dict) -> str:
    label = f"reuse({options['reuse_window']})" if name == "reuse" else name
    return label + (f"+remat({options['remat']})" if options.get("remat") else "")


def cost(*, quick: bool = False, meta_batch: int | None = None, steps: int | None = None,
         json_path: str | None = None, plot_dir: str | None = None, timeout: float = 600) -> dict:
    """Run the cost suite; returns (and writes to `json_path`) the results and the targets' status."""
    meta_batch = meta_batch or (2 if quick else 4)
    steps = steps or (1 if quick else 2)
    size = ["--filters", "16"] if quick else []
    configs = cost_configurations(quick)
    progress = _Progress(len(configs))
    results = []
    for name, options, t in configs:
        progress.start(f"{_label(name, options)} T={t}")
        cmd = [sys.executable, "-m", "tfmeta", "bench", "--estimator", name, "--meta-batch", str(meta_batch),
               "--steps", str(steps), "--json", *size]
        if name != "plain":
            cmd += ["--inner-steps", str(t)]
        for key, value in options.items():
            cmd += ["--" + key.replace("_", "-"), str(value)]
        row = _run_json(cmd, timeout)
        row.update({"label": _label(name, options), "estimator": name, "inner_steps": t, "options": options})
        results.append(row)
        progress.finish()
    report = {
        "suite": "cost",
        "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(),
        "quick": quick,
        "meta_batch": meta_batch,
        "steps": steps,
        "results": results,
        "targets": cost_targets(results),
    }
    _write(report, json_path)
    if plot_dir:
        report["plots"] = plot_cost(results, plot_dir)
        _write(report, json_path)
    return report


def _lookup(results, label, t):
    for r in results:
        if r["label"] == label and r["inner_steps"] == t and "error" not in r:
            return r
    return None


def cost_targets(results: list[dict]) -> dict:
    """The estimator issues' targets, met or missed (None where a figure is missing)."""
    targets = {}
    maml8, reuse4 = _lookup(results, "maml", 8), _lookup(results, "reuse(4)", 8)
    if maml8 and reuse4:
        ratio = reuse4["seconds_per_step_median"] / maml8["seconds_per_step_median"]
        targets["reuse(4)/maml(8) time <= 0.5"] = {"value": ratio, "met": ratio <= 0.5}
        mem = reuse4["peak_rss_mb"] / maml8["peak_rss_mb"]
        targets["reuse(4)/maml(8) memory < 1"] = {"value": mem, "met": mem < 1}
    implicit = [r for r in results if r["label"] == "implicit" and "error" not in r]
    base = _lookup(results, "implicit", 5) or _lookup(results, "implicit", 4)
    if base and len(implicit) > 1:
        worst = max(r["peak_rss_mb"] for r in implicit) / base["peak_rss_mb"]
        targets["implicit memory max / T=4-5 <= 1.2"] = {"value": worst, "met": worst <= 1.2}
    remat = sorted((r for r in results if r["label"] == "maml+remat(sqrt)" and "error" not in r),
                   key=lambda r: r["inner_steps"])
    remat_base = _lookup(results, "maml+remat(sqrt)", 5) or _lookup(results, "maml+remat(sqrt)", 4)
    if remat_base and remat and remat[-1]["inner_steps"] > remat_base["inner_steps"]:
        mem = remat[-1]["peak_rss_mb"] / remat_base["peak_rss_mb"]
        targets[f"maml+remat(sqrt) memory T={remat[-1]['inner_steps']} / "
                f"T={remat_base['inner_steps']} <= 1.3"] = {"value": mem, "met": mem <= 1.3}
    both = [(r, _lookup(results, "maml", r["inner_steps"])) for r in remat]
    both = [(r, m) for r, m in both if m is not None]
    if both:
        r, m = both[-1]  # the longest inner loop where plain MAML ran
        ratio = r["seconds_per_step_median"] / m["seconds_per_step_median"]
        targets[f"maml+remat(sqrt)/maml time at T={r['inner_steps']} <= 1.5"] = {
            "value": ratio, "met": ratio <= 1.5}
    plain = _lookup(results, "plain", 0)
    maml5 = _lookup(results, "maml", 5) or _lookup(results, "maml", 4)
    if plain and maml5:
        ratio = maml5["seconds_per_step_median"] / plain["seconds_per_step_median"]
        targets[f"maml(T={maml5['inner_steps']})/plain <= 2.5"] = {"value": ratio, "met": ratio <= 2.5}
    return targets


def _save_plot(path: str, lines: dict, *, xlabel: str, ylabel: str, hline=None,
               logx: bool = False, logy: bool = False, marker: str = "o") -> str:
    """One PNG: `lines` maps a label to (xs, ys); `hline` is an optional (y, label) reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker=marker, label=label)
    if hline is not None:
        ax.axhline(hline[0], color="gray", linestyle="--", label=hline[1])
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_cost(results: list[dict], plot_dir: str) -> list[str]:
    """time_vs_inner_steps.png and memory_vs_inner_steps.png, one line per estimator."""
    paths = []
    plain = _lookup(results, "plain", 0)
    for key, ylabel, name in (("seconds_per_step_median", "seconds per meta-step", "time_vs_inner_steps.png"),
                              ("peak_rss_mb", "peak resident memory (MB)", "memory_vs_inner_steps.png")):
        lines = {}
        for label in sorted({r["label"] for r in results if r["label"] != "plain"}):
            rows = sorted((r for r in results if r["label"] == label and "error" not in r),
                          key=lambda r: r["inner_steps"])
            if rows:
                lines[label] = ([r["inner_steps"] for r in rows], [r[key] for r in rows])
        paths.append(_save_plot(os.path.join(plot_dir, name), lines, xlabel="inner steps T", ylabel=ylabel,
                                hline=(plain[key], "plain step") if plain else None, logx=True,
                                logy=key == "seconds_per_step_median"))
    return paths


def accuracy(data_dir: str, *, budget_minutes: float = 5.0, estimators=ACCURACY_ESTIMATORS,
             meta_batch: int = 8, episodes: int = 600, out_dir: str = "runs/accuracy",
             json_path: str | None = None, plot_dir: str | None = None) -> dict:
    """Meta-train each estimator for the same wall-clock budget on Omniglot 5-way 1-shot."""
    if not data_dir or not os.path.isdir(data_dir):
        raise ValueError(f"data_dir={data_dir!r} is not a directory with Omniglot's archives.")
    if not budget_minutes > 0:
        raise ValueError(f"budget_minutes={budget_minutes!r} is not valid: expected a number > 0.")
    progress = _Progress(len(estimators))
    results = []
    for name in estimators:
        progress.start(f"{name}: {budget_minutes:g} min")
        run = os.path.join(out_dir, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        cmd = [sys.executable, "-m", "tfmeta", "train", "--dataset", "omniglot", "--data-dir", data_dir,
               "--estimator", name, "--ways", "5", "--shots", "1", "--query", "15",
               "--meta-batch", str(meta_batch), "--iterations", "1000000",
               "--time-budget", str(budget_minutes * 60), "--steps-per-epoch", "25",
               "--validation-batches", "4", "--episodes", str(episodes), "--out", run,
               "--no-export", "--no-progress", "--no-tensorboard", "--json"]
        row = _run_json(cmd, timeout=budget_minutes * 60 + 900)
        row["estimator"] = name
        row["curve"] = _curve(os.path.join(run, "metrics.csv"))
        results.append(row)
        progress.finish()
    report = {"suite": "accuracy", "date": time.strftime("%Y-%m-%d"),
              "machine": _machine(),
              "budget_minutes": budget_minutes, "meta_batch": meta_batch, "episodes": episodes,
              "results": results}
    _write(report, json_path)
    if plot_dir:
        report["plots"] = plot_accuracy(results, plot_dir)
        _write(report, json_path)
    return report


def _curve(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    keys = ("meta_step", "wall_seconds", "val_accuracy", "val_loss")
    return [{k: float(r[k]) for k in keys if r.get(k) not in (None, "")} for r in rows]


def plot_accuracy(results: list[dict], plot_dir: str) -> list[str]:
    """accuracy_vs_time.png and accuracy_vs_steps.png (meta-validation accuracy)."""
    paths = []
    for key, xlabel, name in (("wall_seconds", "wall-clock seconds", "accuracy_vs_time.png"),
                              ("meta_step", "meta-steps", "accuracy_vs_steps.png")):
        lines = {}
        for row in results:
            points = [(p[key], p["val_accuracy"]) for p in row["curve"] if key in p and "val_accuracy" in p]
            if points:
                lines[row["estimator"]] = tuple(zip(*points))
        paths.append(_save_plot(os.path.join(plot_dir, name), lines, xlabel=xlabel,
                                ylabel="meta-validation accuracy (5-way 1-shot)", marker="."))
    return paths


def _write(report: dict, path: str | None) -> None:
    if not path:
        return
    write_json(path, report, indent=1)
