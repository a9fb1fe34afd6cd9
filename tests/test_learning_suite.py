"""`tfmeta bench --suite learning` at a tiny size on a synthetic archive, with a stand-in peer script;
learn2learn's held-out episodes (tfmeta.training.holdout); the peer's command line; flag validation."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from conftest import OMNIGLOT_DIR
from tfmeta.app import cli, suites_learning
from tfmeta.training.holdout import holdout_episodes

ALPHABETS = {"Balinese": (2, 16), "Early_Aramaic": (2, 16), "Korean": (2, 16), "Latin": (1, 16), "Greek": (5, 6)}


def _png(seed):
    image = np.full((28, 28, 1), 255, np.uint8)
    r, c = np.random.default_rng(seed).integers(0, 20, size=2)
    image[r:r + 8, c:c + 8] = 0
    return tf.io.encode_png(image).numpy()


@pytest.fixture
def archive(tmp_path, monkeypatch):
    """A small1-layout archive (train alphabets with 16 drawings: 1 shot + 15 query), no peerbench beside it."""
    monkeypatch.setenv("TFMETA_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "shared" / "data" / "omniglot"
    data.mkdir(parents=True)
    with zipfile.ZipFile(data / "images_background_small1.zip", "w") as zf:
        for a, (alphabet, (characters, drawings)) in enumerate(sorted(ALPHABETS.items())):
            for c in range(characters):
                for d in range(drawings):
                    zf.writestr(f"images_background_small1/{alphabet}/character{c + 1:02d}/{a:02d}{c:02d}_{d + 1:02d}.png",
                                _png([a, c, d]))
    return data


FAKE_PEER = textwrap.dedent("""\
    import json, os, sys
    import numpy as np
    args = sys.argv[1:]
    train, test = np.load(args[0]), np.load(args[1])
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 3
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl"), "a") as f:
        f.write(json.dumps({"argv": args, "threads": os.environ.get("BENCH_THREADS"),
                            "train": [list(train["images"].shape), int(train["labels"].max()) + 1],
                            "test": [list(test["images"].shape), int(test["labels"].max()) + 1]}) + "\\n")
    print("RESULT " + json.dumps({"impl": "learn2learn", "meta_steps": steps, "train_seconds": 0.5 * steps,
                                  "holdout_5w1s": 30.0 + steps, "ci95": 1.5}))
    """)


def _pixels(path, rgb):
    """How many pixels of the PNG are within 0.05 of colour `rgb` (matplotlib's C0, C1...)."""
    import matplotlib.image

    image = matplotlib.image.imread(path)[..., :3]
    return int((np.abs(image - np.asarray(rgb)).max(-1) < 0.05).sum())


def test_suite_runs_both_tools_writes_json_and_plots_both_curves(archive, tmp_path):
    peer = tmp_path / "peer"
    peer.mkdir()
    (peer / suites_learning.PEER_SCRIPT).write_text(FAKE_PEER)
    output, plots = tmp_path / "learning.json", tmp_path / "plots"
    code = cli.main(["bench", "--suite", "learning", "--data-dir", str(archive), "--steps", "2",
                     "--checkpoints", "1", "--seconds", "0.001", "--meta-batch", "1", "--inner-steps", "1",
                     "--episodes", "3", "--peer-dir", str(peer), "--peer-python", sys.executable,
                     "--peer-threads", "1", "--output", str(output), "--plot", str(plots), "--json"])
    assert code == 0
    report = json.loads(output.read_text())
    assert report["suite"] == "learning" and report["checkpoints"] == [1, 2] and report["steps"] == 2
    tf_points = report["tools"]["tfmeta"]["points"]
    assert [p["meta_step"] for p in tf_points] == [1, 2]  # 0.001 s is reached at step 1: one point there
    assert [p.get("at") for p in tf_points] == ["seconds", None]
    for p in tf_points:
        assert 0 <= p["accuracy"] <= 100 and p["ci95"] >= 0 and p["train_seconds"] > 0
    assert tf_points[1]["train_seconds"] >= tf_points[0]["train_seconds"]
    # learn2learn: one run per checkpoint and one for --seconds, each with the suite's settings
    l2l = report["tools"]["learn2learn"]["points"]
    assert [(p["meta_step"], p["accuracy"], p.get("at")) for p in l2l] == [(1, 31.0, None), (2, 32.0, None),
                                                                            (3, 33.0, "seconds")]
    calls = [json.loads(line) for line in (peer / "calls.jsonl").read_text().splitlines()]
    tail = ["--M", "1", "--T", "1", "--episodes", "3", "--seed", "0"]
    assert [c["argv"][2:] for c in calls] == [["--steps", "1", *tail], ["--steps", "2", *tail],
                                              ["--seconds", "0.001", *tail]]
    assert all(c["threads"] == "1" for c in calls)
    # the peer's arrays: the train alphabets' 6 characters (no rotations: it rotates), Greek's 5
    assert calls[0]["train"] == [[6 * 16, 28, 28, 1], 6] and calls[0]["test"] == [[5 * 6, 28, 28, 1], 5]
    # both curves in both plots: matplotlib's first two colours (tfmeta C0 blue, learn2learn C1 orange)
    assert sorted(report["plots"]) == sorted(str(plots / n) for n in suites_learning.PLOTS)
    for name in suites_learning.PLOTS:
        assert _pixels(plots / name, (0.122, 0.467, 0.706)) > 50, name
        assert _pixels(plots / name, (1.0, 0.498, 0.055)) > 50, name


def test_peer_is_skipped_without_its_venv_and_explicit_paths_are_checked(archive, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.cache/peer-venv
    found = suites_learning.find_peer(str(archive))
    assert "peerbench" in found["skipped"] and "--peer-dir" in found["skipped"]
    peer = tmp_path / "shared" / "peerbench"  # found beside the data: DATA_DIR/../../peerbench
    peer.mkdir()
    (peer / suites_learning.PEER_SCRIPT).write_text("")
    found = suites_learning.find_peer(str(archive))
    assert "peer-venv" in found["skipped"] and "--peer-python" in found["skipped"]
    found = suites_learning.find_peer(str(archive), peer_python=sys.executable)
    assert found == {"python": sys.executable, "script": str(peer / suites_learning.PEER_SCRIPT)}
    with pytest.raises(ValueError, match=r"--peer-dir=.*l2l_omniglot\.py"):
        suites_learning.find_peer(str(archive), peer_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--peer-python=.*venv"):
        suites_learning.find_peer(str(archive), peer_python=str(tmp_path / "python"))


def test_peer_command_line():
    peer = {"python": "/venv/bin/python", "script": "/peerbench/l2l_omniglot.py"}
    cmd = suites_learning.peer_command(peer, "tr.npz", "te.npz", meta_batch=8, inner_steps=5, episodes=200,
                                       seed=0, steps=40)
    assert cmd == ["/venv/bin/python", "/peerbench/l2l_omniglot.py", "tr.npz", "te.npz", "--steps", "40",
                   "--M", "8", "--T", "5", "--episodes", "200", "--seed", "0"]
    cmd = suites_learning.peer_command(peer, "tr.npz", "te.npz", meta_batch=8, inner_steps=5, episodes=200,
                                       seed=1, seconds=480.0)
    assert cmd[4:6] == ["--seconds", "480"] and cmd[-2:] == ["--seed", "1"]


def test_the_real_peer_script_accepts_the_command_line():
    """Every flag the suite passes is one l2l_omniglot.py parses (its --help; skipped without the venv)."""
    found = suites_learning.find_peer(OMNIGLOT_DIR) if os.path.isdir(OMNIGLOT_DIR) else {"skipped": "no data folder"}
    if "skipped" in found:
        pytest.skip(f"learn2learn's peer not present: {found['skipped']}")
    python, script = found["python"], found["script"]
    cmd = suites_learning.peer_command({"python": python, "script": script}, "a.npz", "b.npz", meta_batch=8,
                                       inner_steps=5, episodes=200, seed=0, steps=10)
    text = subprocess.run([python, script, "--help"], capture_output=True, text=True, timeout=60).stdout
    for flag in (a for a in cmd[4:] if a.startswith("--")):
        assert flag in text, flag


@pytest.mark.parametrize("flags, message", [
    (["--checkpoints", "0,10"], "--checkpoints: expected a comma-separated list of meta-step counts >= 1"),
    (["--checkpoints", "ten"], "--checkpoints: expected a comma-separated list"),
    (["--checkpoints", "10,40", "--steps", "20"], r"checkpoints=\[10, 40\] \(--checkpoints\).*<= steps=20 \(--steps\)"),
    (["--seconds", "-1"], "--seconds: expected a finite number of seconds >= 0"),
    (["--episodes", "0"], "--episodes: expected an integer >= 1"),
    (["--peer-dir", "/nonexistent"], r"--peer-dir='/nonexistent' is not valid"),
])
def test_bad_flags_exit_2_naming_the_flag(archive, flags, message, capsys):
    try:
        code = cli.main(["bench", "--suite", "learning", "--data-dir", str(archive), *flags])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    import re

    assert re.search(message, capsys.readouterr().err), flags


def test_data_dir_from_the_environment_or_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TFMETA_OMNIGLOT_DIR", raising=False)
    assert cli.main(["bench", "--suite", "learning"]) == 2
    assert "--data-dir=None is not valid" in capsys.readouterr().err
    monkeypatch.setenv("TFMETA_OMNIGLOT_DIR", str(tmp_path))
    assert suites_learning.data_dir_or_env(None) == str(tmp_path)


def test_default_checkpoints():
    assert suites_learning.checkpoint_steps(None, None) == (80, [10, 20, 40, 80])
    assert suites_learning.checkpoint_steps(16, None) == (16, [2, 4, 8, 16])
    assert suites_learning.checkpoint_steps(None, [40, 10]) == (40, [10, 40])
    assert suites_learning.checkpoint_steps(30, [10]) == (30, [10, 30])


def _l2l_episodes(HX, HY, episodes):
    """The evaluation loop of ../shared/peerbench/l2l_omniglot.py, verbatim but for torch."""
    hchars = [np.where(HY == c)[0] for c in range(HY.max() + 1)]
    er = random.Random(0)
    out = []
    for _ in range(episodes):
        cls = er.sample(range(len(hchars)), 5)
        sx, qx, qy = [], [], []
        for i, c in enumerate(cls):
            idx = er.sample(list(hchars[c]), 6)
            sx.append(HX[idx[0]]); qx += [HX[j] for j in idx[1:]]; qy += [i] * 5  # noqa: E702
        out.append((np.stack(sx), np.arange(5), np.stack(qx), np.asarray(qy)))
    return out


def test_holdout_episodes_are_learn2learns():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100, 108), 7)  # a test split's ids start after train and val
    images = rng.random((len(labels), 4, 4, 1)).astype(np.float32)
    ours = holdout_episodes(images, labels, 20)
    theirs = _l2l_episodes(images, labels - 100, 20)
    for e, (sx, sy, qx, qy) in enumerate(theirs):
        np.testing.assert_array_equal(ours.support_x[e], sx)
        np.testing.assert_array_equal(ours.support_y[e], sy)
        np.testing.assert_array_equal(ours.query_x[e], qx)
        np.testing.assert_array_equal(ours.query_y[e], qy)
    with pytest.raises(ValueError, match="shots \\+ query = 8"):
        holdout_episodes(images, labels, 2, query=7)
