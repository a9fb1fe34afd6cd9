"""`tfmeta bench --suite learning`: held-out accuracy against meta-steps and training seconds,
tfmeta's MAML beside learn2learn's.

tfmeta meta-trains exact MAML as ``tfmeta train --dataset omniglot`` builds it (conv4, 5-way
1-shot, 15 query, T inner SGD steps at lr 0.4, Adam 1e-3; ``config.RunConfig``) on the train
alphabets of the Omniglot archive in ``--data-dir`` (or ``$TFMETA_OMNIGLOT_DIR``), and at every
checkpoint (a meta-step count, ``--checkpoints``) and optionally after ``--seconds`` of
meta-training, scores the learned initialization on the test alphabet (Greek in the small
archive) with learn2learn's protocol (:mod:`tfmeta.training.holdout`: no rotations, 5 query per class,
``--episodes`` episodes drawn with ``random.Random(0)``, 95% interval). Training seconds count the
meta-steps only (task sampling and the first step's tracing included), never the evaluations.

learn2learn runs through ``../shared/peerbench/l2l_omniglot.py`` in its own virtual environment
(``$HOME/.cache/peer-venv/bin/python``; ``--peer-python``), found beside the data
(``DATA_DIR/../../peerbench``) or given by ``--peer-dir``, on ``.npz`` files written here from
tfmeta's own loader (the same arrays, so the held-out episodes are identical). That script reports
only its final accuracy, so each checkpoint is its own run from the same seed (``--steps N``),
and ``--seconds`` one more (``--seconds S``). The two tools never run at the same time. Without the
peer's venv or script the suite runs tfmeta alone and says why in the JSON.

The report (``--output FILE``) holds one curve per tool: points with ``meta_step``,
``train_seconds``, ``accuracy`` and ``ci95`` (percent); ``--plot DIR`` draws
``accuracy_vs_meta_steps.png`` and ``accuracy_vs_seconds.png`` (matplotlib: the ``bench`` extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from tfmeta.core.files import write_json

#: learn2learn's virtual environment (``../shared/peerbench/README.md`` installs it there).
PEER_PYTHON = os.path.join("~", ".cache", "peer-venv", "bin", "python")
PEER_SCRIPT = "l2l_omniglot.py"
#: default checkpoints as fractions of --steps (10/20/40/80 for 80 steps).
CHECKPOINT_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)
DEFAULT_STEPS = 80
PLOTS = ("accuracy_vs_meta_steps.png", "accuracy_vs_seconds.png")


def data_dir_or_env(data_dir: str | None) -> str:
    """`--data-dir`, else ``$TFMETA_OMNIGLOT_DIR``; ValueError naming both when neither is a folder."""
    folder = data_dir or os.environ.get("TFMETA_OMNIGLOT_DIR")
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"--data-dir={folder!r} is not valid: expected a directory with Omniglot's archives "
                         "(or set TFMETA_OMNIGLOT_DIR).")
    return folder


def checkpoint_steps(steps: int | None, checkpoints: list[int] | None) -> tuple[int, list[int]]:
    """(last meta-step, sorted checkpoints) from `--steps` and `--checkpoints`, validated."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps={steps!r} (--steps) is not valid: expected an integer >= 1.")
    if checkpoints:
        bad = [c for c in checkpoints if isinstance(c, bool) or not isinstance(c, int) or c < 1]
        if bad:
            raise ValueError(f"checkpoints={checkpoints!r} (--checkpoints) is not valid: expected meta-step "
                             "counts >= 1.")
        marks = sorted(set(checkpoints))
        if steps is not None and marks[-1] > steps:
            raise ValueError(f"checkpoints={checkpoints!r} (--checkpoints) is not valid: expected meta-steps "
                             f"<= steps={steps} (--steps).")
        return (steps or marks[-1]), sorted(set(marks) | ({steps} if steps else set()))
    steps = steps or DEFAULT_STEPS
    return steps, sorted({max(1, round(steps * f)) for f in CHECKPOINT_FRACTIONS})


# -- the peer ------------------------------------------------------------------------------------
def find_peer(data_dir: str, peer_dir: str | None = None, peer_python: str | None = None) -> dict:
    """``{"python", "script"}`` of learn2learn's runner, or ``{"skipped": why}``.

    An explicit `peer_dir` or `peer_python` that does not exist is an error (ValueError naming the
    flag); the defaults (the venv in the home folder, ``peerbench`` beside the data's parent) are
    looked for and, when absent, the peer is skipped.
    """
    python = os.path.expanduser(peer_python or PEER_PYTHON)
    if peer_python and not os.path.isfile(python):
        raise ValueError(f"--peer-python={peer_python!r} is not valid: expected learn2learn's venv Python "
                         f"(default {PEER_PYTHON}).")
    if peer_dir:
        script = os.path.join(peer_dir, PEER_SCRIPT)
        if not os.path.isfile(script):
            raise ValueError(f"--peer-dir={peer_dir!r} is not valid: expected a folder holding {PEER_SCRIPT}.")
    else:
        script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(data_dir))), "peerbench",
                              PEER_SCRIPT)
        if not os.path.isfile(script):
            return {"skipped": f"{script} not found (pass --peer-dir)"}
    if not os.path.isfile(python):
        return {"skipped": f"learn2learn's venv {python} not found (pass --peer-python)"}
    return {"python": python, "script": script}


def peer_command(peer: dict, train_npz: str, test_npz: str, *, meta_batch: int, inner_steps: int,
                 episodes: int, seed: int, steps: int | None = None, seconds: float | None = None) -> list[str]:
    """The ``l2l_omniglot.py`` command line for `steps` meta-steps or `seconds` of meta-training."""
    if (steps is None) == (seconds is None):
        raise ValueError("peer_command: give exactly one of steps and seconds")
    budget = ["--steps", str(steps)] if steps is not None else ["--seconds", f"{seconds:g}"]
    return [peer["python"], peer["script"], train_npz, test_npz, *budget, "--M", str(meta_batch),
            "--T", str(inner_steps), "--episodes", str(episodes), "--seed", str(seed)]


def run_peer(cmd: list[str], *, threads: int, timeout: float) -> dict:
    """Run one ``l2l_omniglot.py`` command; its ``RESULT {json}`` line as a curve point, or an error."""
    env = {**os.environ, "BENCH_THREADS": str(threads)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=os.path.dirname(cmd[1]) or None)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not result:
        return {"error": (proc.stderr.strip().splitlines() or ["no RESULT line"])[-1]}
    row = json.loads(result[-1][len("RESULT "):])
    return {"meta_step": int(row["meta_steps"]), "train_seconds": float(row["train_seconds"]),
            "accuracy": float(row["holdout_5w1s"]), "ci95": float(row["ci95"])}


def write_npz(path: str, images: np.ndarray, labels: np.ndarray) -> str:
    """The arrays in peerbench's ``omniglot_npz.py`` format (images, dense character ids)."""
    from tfmeta.training.holdout import dense_labels

    np.savez(path, images=np.asarray(images, np.float32), labels=dense_labels(labels))
    return path


# -- tfmeta --------------------------------------------------------------------------------------
def tfmeta_curve(data_dir: str, marks: list[int], episodes, *, seconds: float = 0.0, meta_batch: int = 8,
                 inner_steps: int = 5, seed: int = 0, progress=None) -> dict:
    """Meta-train tfmeta's MAML; held-out accuracy at each meta-step in `marks` (and at `seconds`)."""
    from tfmeta.app import config as cfg
    from tfmeta.training.holdout import holdout_accuracy, holdout_scorer
    from tfmeta.training import MetaTrainer

    run = cfg.RunConfig(dataset="omniglot", data_dir=data_dir, meta_batch=meta_batch, inner_steps=inner_steps,
                        seed=seed).resolved()
    learner = cfg.build_learner(run)
    trainer = MetaTrainer(learner, cfg.build_estimator(run), cfg.build_meta_optimizer(run))
    sampler = cfg.build_sampler(run, "train")
    scorer = holdout_scorer(learner)
    points, trained, step, first = [], 0.0, 0, None
    while step < marks[-1] or (seconds > 0 and trained < seconds):
        began = time.perf_counter()
        trainer.train_step(sampler.sample(step))
        took = time.perf_counter() - began
        first = took if first is None else first
        trained += took
        step += 1
        timed_out = seconds > 0 and trained >= seconds and not any(p.get("at") == "seconds" for p in points)
        if step in marks or timed_out:
            acc, ci = holdout_accuracy(learner, episodes, scorer=scorer)
            point = {"meta_step": step, "train_seconds": round(trained, 2), "accuracy": round(acc, 2),
                     "ci95": round(ci, 2)}
            if timed_out:
                point["at"] = "seconds"
            points.append(point)
            if progress:
                progress(f"tfmeta: step {step} ({trained:.0f} s): {acc:.1f}% ± {ci:.1f}")
    return {"points": points, "first_step_seconds": round(first, 2),
            "config": {"model": run.model, "ways": run.ways, "shots": run.shots, "query": run.query,
                       "inner_steps": run.inner_steps, "inner_lr": run.inner_lr, "meta_lr": run.meta_lr,
                       "meta_batch": run.meta_batch, "estimator": run.estimator, "seed": seed}}


# -- the suite -----------------------------------------------------------------------------------
def run(data_dir: str | None, *, steps: int | None = None, checkpoints: list[int] | None = None,
        seconds: float = 0.0, meta_batch: int = 8, inner_steps: int = 5, episodes: int = 200, seed: int = 0,
        peer: bool = True, peer_dir: str | None = None, peer_python: str | None = None,
        peer_threads: int | None = None, json_path: str | None = None, plot_dir: str | None = None,
        timeout: float = 3600.0) -> dict:
    """Run the suite (tfmeta, then learn2learn when present); returns the report (see the module)."""
    data_dir = data_dir_or_env(data_dir)
    steps, marks = checkpoint_steps(steps, checkpoints)
    if not (seconds >= 0 and np.isfinite(seconds)):
        raise ValueError(f"seconds={seconds!r} (--seconds) is not valid: expected a finite number >= 0.")
    for name, value in (("meta_batch", meta_batch), ("inner_steps", inner_steps), ("episodes", episodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} (--{name.replace('_', '-')}) is not valid: expected an integer >= 1.")
    if plot_dir:
        require_matplotlib()
    found = find_peer(data_dir, peer_dir, peer_python) if peer else {"skipped": "--no-peer"}

    from tfmeta.core import runtime
    from tfmeta.data import load_omniglot
    from tfmeta.training.holdout import holdout_episodes

    def say(text):
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    load_before = os.getloadavg()[0]
    splits = load_omniglot(data_dir, rotations=False)
    test_x, test_y = splits["test"]
    held_out = holdout_episodes(test_x, test_y, episodes)
    say(f"tfmeta: meta-training to step {steps}" + (f" and {seconds:g} s" if seconds else "")
        + f", held-out accuracy at {marks}")
    tools = {"tfmeta": tfmeta_curve(data_dir, marks, held_out, seconds=seconds, meta_batch=meta_batch,
                                    inner_steps=inner_steps, seed=seed, progress=say)}
    if "skipped" in found:
        say(f"learn2learn: skipped ({found['skipped']})")
        tools["learn2learn"] = {"skipped": found["skipped"]}
    else:
        with tempfile.TemporaryDirectory(prefix="tfmeta-learning-") as tmp:
            train_npz = write_npz(os.path.join(tmp, "train.npz"), *splits["train"])
            test_npz = write_npz(os.path.join(tmp, "test.npz"), test_x, test_y)
            budgets = [{"steps": m} for m in marks] + ([{"seconds": seconds}] if seconds else [])
            points, commands = [], []
            for budget in budgets:
                cmd = peer_command(found, train_npz, test_npz, meta_batch=meta_batch, inner_steps=inner_steps,
                                   episodes=episodes, seed=seed, **budget)
                commands.append(cmd)
                say(f"learn2learn: {' '.join(cmd[1:])}")
                point = run_peer(cmd, threads=peer_threads or os.cpu_count() or 1, timeout=timeout)
                if "seconds" in budget:
                    point["at"] = "seconds"
                points.append(point)
                if "error" not in point:
                    say(f"learn2learn: step {point['meta_step']} ({point['train_seconds']:.0f} s): "
                        f"{point['accuracy']:.1f}% ± {point['ci95']:.1f}")
                else:
                    say(f"learn2learn: error: {point['error']}")
        tools["learn2learn"] = {"points": points, "commands": [c[1:] for c in commands],
                                "python": found["python"],
                                "note": "each point is its own run from the same seed (the script reports "
                                        "only its final accuracy)"}
    report = {"suite": "learning", "date": time.strftime("%Y-%m-%d"), "machine": runtime.machine(),
              "steps": steps, "checkpoints": marks, "seconds": seconds, "meta_batch": meta_batch,
              "inner_steps": inner_steps, "episodes": episodes, "seed": seed,
              "holdout": "test alphabet(s) of the archive, no rotations, 5-way 1-shot, 5 query per class, "
                         "learn2learn's episodes (tfmeta.training.holdout)",
              "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "train_seconds": "meta-steps only (sampling and the first step's tracing included), "
                               "evaluations excluded",
              "tools": tools}
    _write(report, json_path)
    if plot_dir:
        report["plots"] = plot(report, plot_dir)
        _write(report, json_path)
    return report


def require_matplotlib():
    """Import matplotlib (Agg) or raise RuntimeError naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("--plot needs matplotlib: pip install 'tfmeta[bench]' (or pip install matplotlib)") \
            from err
    matplotlib.use("Agg")
    return matplotlib


def curves(report: dict) -> dict:
    """``{tool: [points without errors]}`` of the tools that ran."""
    return {name: [p for p in tool.get("points", []) if "error" not in p]
            for name, tool in report["tools"].items() if tool.get("points")}


def plot(report: dict, plot_dir: str) -> list[str]:
    """accuracy_vs_meta_steps.png and accuracy_vs_seconds.png: one line (95% bars) per tool."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    machine = report.get("machine", {})
    where = machine.get("cpu_model", "")
    paths = []
    for key, xlabel, name in (("meta_step", "meta-steps", PLOTS[0]),
                              ("train_seconds", "training seconds (evaluation excluded)", PLOTS[1])):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for tool, points in curves(report).items():
            points = sorted(points, key=lambda p: p[key])
            ax.errorbar([p[key] for p in points], [p["accuracy"] for p in points],
                        yerr=[p["ci95"] for p in points], marker="o", capsize=3, label=tool)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy, 5-way 1-shot (%)")
        ax.set_title(f"MAML, Omniglot, M={report['meta_batch']}, T={report['inner_steps']}"
                     + (f" ({where})" if where else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(plot_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _write(report: dict, path: str | None) -> None:
    if not path:
        return
    write_json(path, report, indent=1)
