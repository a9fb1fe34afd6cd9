"""Fault injection: the matrix of issue 17, one test per path found by trying to break tfmeta.

Each scenario runs with its exact inputs and asserts the exit status, a message naming the file or
flag, and that every byte of the previous good checkpoints and earlier export versions is unchanged
(SHA-256 of each file before and after). `tfmeta` runs in-process (``cli.main``) on tiny sinusoid
runs; only the kill -9 property test starts a process.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tfmeta import export
from tfmeta.app import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the session flags of every run here: a few meta-steps of sinusoid, 2 tasks each
FAST = ["--meta-batch", "2", "--episodes", "4", "--no-progress", "--no-tensorboard", "--time-budget", "0",
        "--validation-batches", "1"]


def _cli(capsys, *argv):
    """Run `tfmeta argv` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def _hashes(*roots) -> dict:
    """SHA-256 of every file under `roots` (hidden ones included), by path."""
    found = {}
    for root in roots:
        for path in sorted(glob.glob(os.path.join(str(root), "**"), recursive=True)
                           + glob.glob(os.path.join(str(root), "**", ".*"), recursive=True)):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def _checkpoint_tensors(prefix) -> dict:
    reader = tf.train.load_checkpoint(str(prefix))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if "VARIABLE_VALUE" in k and not k.startswith("save_counter")}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished 6-step run (ckpt-2, ckpt-4, ckpt-6) and its export version 1."""
    base = tmp_path_factory.mktemp("good")
    run, models = base / "run", base / "models"
    assert cli.main(["train", "--out", str(run), "--iterations", "6", "--checkpoint-every", "2",
                     "--export-dir", str(models), *FAST]) == 0
    assert sorted(os.listdir(run / "checkpoints")) == sorted(
        ["checkpoint"] + [f"ckpt-{n}.{ext}" for n in (2, 4, 6) for ext in ("index", "data-00000-of-00001")])
    return base


@pytest.fixture
def run_copy(good_run, tmp_path):
    """A private copy of the good run: (run directory, export directory)."""
    shutil.copytree(good_run, tmp_path / "copy")
    return tmp_path / "copy" / "run", tmp_path / "copy" / "models"


# 1. --on-nonfinite skip ----------------------------------------------------------------------------

def _overflowing_trainer(tmp_path, **kwargs):
    """A sinusoid MetaTrainer whose meta-gradient is finite but ~1e20: Adam's second moment
    (g^2) overflows to inf while the meta-loss and meta-gradient are finite."""
    import keras

    from tfmeta.core import models
    from tfmeta.core.learner import MetaLearner
    from tfmeta.training import MetaTrainer

    scale = tf.Variable(1.0)

    def outer_loss(learner, params, meta, x, y):
        return learner.task_loss(learner.fmodel(params, x), y) * scale

    keras.utils.set_random_seed(0)
    learner = MetaLearner(models.mlp(), task="regression", inner_lr=0.01, inner_steps=1, outer_loss=outer_loss)
    trainer = MetaTrainer(learner, "maml", keras.optimizers.Adam(1e-3), checkpoint_dir=str(tmp_path / "ckpt"),
                          checkpoint_every=1, **kwargs)
    return trainer, scale


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_1_an_update_that_would_be_non_finite_is_undone(tmp_path, mode):
    from tfmeta.data import SinusoidTasks
    from tfmeta.training import NonFiniteMetaStepError

    trainer, scale = _overflowing_trainer(tmp_path, on_nonfinite=mode, max_skips=2)
    tasks = SinusoidTasks(shots=5, query=10, meta_batch=2, seed=0)
    trainer.fit(tasks, iterations=2, progress=False)
    state = list(trainer.learner.meta_variables) + list(trainer.meta_optimizer.variables)
    before = [v.numpy().copy() for v in state]
    saved = _hashes(tmp_path / "ckpt")
    scale.assign(1e20)
    match = "meta-optimizer's update" if mode == "stop" else "more than max_skips=2 meta-steps in a row"
    with pytest.raises(NonFiniteMetaStepError, match=match):
        trainer.fit(tasks, iterations=10, progress=False)
    for b, v in zip(before, state):  # meta-parameters and Adam's moments: as before the bad steps
        np.testing.assert_array_equal(b, v.numpy())
    after = _hashes(tmp_path / "ckpt")
    for path, digest in saved.items():  # the last good checkpoint, every byte
        if "ckpt-2." in path:
            assert after[path] == digest
    assert trainer.step.numpy() == (2 if mode == "stop" else 4)  # skip: 2 steps skipped, the 3rd stops it
    good = _checkpoint_tensors(tmp_path / "ckpt" / "ckpt-2")
    for n in (3, 4) if mode == "skip" else ():  # skipped steps checkpoint the same finite values
        skipped = _checkpoint_tensors(tmp_path / "ckpt" / f"ckpt-{n}")
        for key, value in good.items():
            if key.startswith(("meta_variables", "optimizer/_momentums", "optimizer/_velocities")):
                np.testing.assert_array_equal(skipped[key], value, err_msg=key)


def test_1_skip_with_huge_inner_lr_keeps_parameters_finite_and_json_valid(run_copy, tmp_path, capsys):
    _, models = run_copy
    earlier = _hashes(models)
    run = tmp_path / "nan"
    rc, out, err = _cli(capsys, "train", "--iterations", "30", "--meta-batch", "2", "--inner-lr", "1e6",
                        "--on-nonfinite", "skip", "--json", "--out", run, "--export-dir", models,
                        "--checkpoint-every", "10", *FAST[2:])
    assert rc in (0, 3), err
    if rc == 3:
        assert "max_skips=10" in err and "--inner-lr" in err
    else:
        result = json.loads(out.strip().splitlines()[-1], parse_constant=pytest.fail)  # no bare NaN
        assert result["steps"] == 30
    for index in glob.glob(str(run / "checkpoints" / "ckpt-*.index")):
        for key, value in _checkpoint_tensors(index[: -len(".index")]).items():
            assert np.all(np.isfinite(value)), (index, key)
    for version in export.versions(str(models / "sinusoid_maml"))[1:]:
        served = tf.saved_model.load(str(models / "sinusoid_maml" / str(version))).signatures["serving_default"]
        assert np.all(np.isfinite(served(x=tf.zeros([3, 1]))["predictions"].numpy()))
    after = _hashes(models)
    assert all(after[path] == digest for path, digest in earlier.items())  # export 1, every byte


def test_1_json_output_has_no_nan(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "evaluate", lambda args: {"loss": float("nan"), "x": [float("inf"), 1.0]})
    rc, out, _ = _cli(capsys, "evaluate", "--json")
    assert rc == 0
    assert json.loads(out.strip().splitlines()[-1], parse_constant=pytest.fail) == {"loss": None, "x": [None, 1.0]}


# 2. orphaned checkpoints ----------------------------------------------------------------------------

@pytest.mark.parametrize("leftover", ["checkpoints", ".lock"])
def test_2_a_directory_with_an_incomplete_run_is_refused(run_copy, capsys, leftover):
    run, _ = run_copy
    os.remove(run / "config.json")
    if leftover == ".lock":
        shutil.rmtree(run / "checkpoints")
        os.remove(run / "metrics.csv")
        (run / ".lock").write_text("123")
    before = _hashes(run)
    rc, _, err = _cli(capsys, "train", "--out", run, "--iterations", "2", *FAST, "--meta-batch", "3")
    assert rc == 2
    assert "no config.json" in err and "Nothing was changed" in err
    assert ("checkpoints/ (ckpt-2, ckpt-4, ckpt-6)" if leftover == "checkpoints" else ".lock") in err
    assert _hashes(run) == before


# 3. --resume without the checkpoint index file ------------------------------------------------------

def test_3_resume_without_index_file_continues_from_the_newest_intact_checkpoint(run_copy, capsys):
    run, models = run_copy
    os.remove(run / "checkpoints" / "checkpoint")
    before = _hashes(run / "checkpoints", models)
    rc, out, err = _cli(capsys, "train", "--resume", run, "--iterations", "8", "--checkpoint-every", "2",
                        "--export-dir", models, *FAST)
    assert rc == 0, err
    assert "checkpoint index file" in err and "ckpt-6" in err and "newest intact" in err
    assert "--iterations 8 (was 6)" in out
    assert "resumed at step 6: meta-trained steps 7-8 (2)" in out
    after = _hashes(run / "checkpoints", models)
    for path, digest in before.items():  # ckpt-2/4/6 and export 1 untouched
        assert after[path] == digest, path
    assert os.path.isfile(run / "checkpoints" / "ckpt-8.index")
    with open(run / "config.json") as f:
        assert json.load(f)["iterations"] == 8


def test_3_resume_without_index_file_and_a_corrupt_newest_checkpoint_is_refused(run_copy, capsys):
    run, _ = run_copy
    os.remove(run / "checkpoints" / "checkpoint")
    (run / "checkpoints" / "ckpt-6.index").write_bytes(b"garbage")
    before = _hashes(run)
    rc, _, err = _cli(capsys, "train", "--resume", run, "--iterations", "8", *FAST)
    assert rc == 2
    assert "ckpt-6.index" in err and "--checkpoint ckpt-4" in err
    assert _hashes(run) == before


# 4. --resume with flags that conflict ---------------------------------------------------------------

def test_4_resume_refuses_flags_that_redefine_the_run(run_copy, capsys):
    run, _ = run_copy
    before = _hashes(run)
    rc, _, err = _cli(capsys, "train", "--resume", run, "--dataset", "omniglot", "--iterations", "45",
                      "--inner-lr", "0.02", "--meta-batch", "2")
    assert rc == 2
    assert "--dataset omniglot (the run has sinusoid)" in err and "--inner-lr 0.02" in err
    assert "--meta-batch" not in err.split("cannot change")[0]  # the same value as the run's is fine
    assert _hashes(run) == before


def test_4_resume_refuses_iterations_below_the_steps_made(run_copy, capsys):
    run, _ = run_copy
    before = _hashes(run)
    rc, _, err = _cli(capsys, "train", "--resume", run, "--iterations", "4", *FAST)
    assert rc == 2 and "--iterations 4 is below the 6 meta-steps" in err
    assert _hashes(run) == before


# 5. corrupt checkpoints -----------------------------------------------------------------------------

def _corrupt(run, how):
    ckpt = run / "checkpoints"
    if how == "truncated-data":
        path = ckpt / "ckpt-6.data-00000-of-00001"
        path.write_bytes(path.read_bytes()[:100])
    else:
        path = ckpt / "ckpt-6.index"
        path.write_bytes(b"this is not an sstable" * 10)
    return path.name


@pytest.mark.parametrize("how", ["truncated-data", "garbage-index"])
@pytest.mark.parametrize("command", ["train", "evaluate", "export"])
def test_5_corrupt_checkpoint_is_named_and_an_older_one_offered(run_copy, capsys, how, command):
    run, models = run_copy
    name = _corrupt(run, how)
    before = _hashes(run, models)
    argv = (["train", "--resume", run, "--iterations", "8", *FAST] if command == "train" else
            [command, "--run", run] + (["--episodes", "2"] if command == "evaluate" else ["--export-dir", models]))
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2
    assert name in err and "--checkpoint ckpt-4" in err
    assert _hashes(run, models) == before  # config.json included: a failed resume writes nothing


def test_5_the_offered_older_checkpoint_works(run_copy, capsys):
    run, models = run_copy
    _corrupt(run, "truncated-data")
    before = _hashes(run, models)
    rc, out, err = _cli(capsys, "evaluate", "--run", run, "--checkpoint", "ckpt-4", "--episodes", "2")
    assert rc == 0, err
    assert "held-out MSE" in out
    # continuing training from it would overwrite the newer (corrupt) ckpt-6: refused, named
    rc, _, err = _cli(capsys, "train", "--resume", run, "--checkpoint", "ckpt-4", *FAST)
    assert rc == 2 and "ckpt-6" in err and "overwrite" in err
    assert _hashes(run, models) == before


# 6. named errors, exit 2 ----------------------------------------------------------------------------

def test_6_out_naming_a_file_or_a_path_under_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("keep me")
    before = _hashes(tmp_path)
    for out, expected in [(tmp_path / "afile", "is a file, not a directory"),
                          (tmp_path / "afile" / "run", f"{str(tmp_path / 'afile')!r} is a file")]:
        rc, _, err = _cli(capsys, "train", "--out", out, "--iterations", "2", *FAST)
        assert rc == 2 and "--out=" in err and expected in err
    rc, _, err = _cli(capsys, "train", "--out", tmp_path / "run", "--export-dir", tmp_path / "afile",
                      "--iterations", "2", *FAST)
    assert rc == 2 and "--export-dir=" in err
    assert _hashes(tmp_path) == before


@pytest.mark.parametrize("argv,flag", [
    (["train", "--intra-op-threads", "-3"], "--intra-op-threads"),
    (["evaluate", "--inter-op-threads", "two"], "--inter-op-threads"),
    (["train", "--inner-lr", "inf"], "--inner-lr"),
    (["train", "--meta-lr", "inf"], "--meta-lr"),
    (["train", "--time-budget", "-1"], "--time-budget"),
    (["train", "--time-budget", "nan"], "--time-budget"),
])
def test_6_8_bad_numbers_are_named(capsys, argv, flag, tmp_path, monkeypatch):  # findings 6 and 8
    monkeypatch.chdir(tmp_path)  # were a flag accepted, its run would write here
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2 and f"argument {flag}: expected" in err


@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"ways": "five"}', "{not json"])
@pytest.mark.parametrize("command", ["train", "evaluate", "export"])
def test_6_config_json_of_the_wrong_shape(run_copy, capsys, content, command):
    run, models = run_copy
    (run / "config.json").write_text(content)
    before = _hashes(run, models)
    argv = {"train": ["train", "--resume", run, *FAST], "evaluate": ["evaluate", "--run", run],
            "export": ["export", "--run", run, "--export-dir", models]}[command]
    rc, _, err = _cli(capsys, *argv)
    assert rc == 2 and "config.json" in err and "not a valid run configuration" in err
    assert _hashes(run, models) == before


def test_6_a_meta_batch_beyond_memory_is_refused_before_allocation(tmp_path, capsys):
    rc, _, err = _cli(capsys, "train", "--out", tmp_path / "run", "--iterations", "2",
                      *FAST, "--meta-batch", "1000000000000")
    assert rc == 2 and "--meta-batch 1000000000000" in err and "GiB" in err
    assert not os.path.exists(tmp_path / "run")


def test_refusals_of_the_errors_table_keep_every_byte(run_copy, tmp_path, capsys):
    """The rows of docs/reliability.md's table that were already promised: a run that is there,
    not a run directory, an --adapt-on file that is missing or lacks arrays."""
    run, models = run_copy
    before = _hashes(run, models)
    np.savez(tmp_path / "s.npz", support_x=np.zeros([5, 1], "float32"))
    for argv, expected in [
        (["train", "--out", run, *FAST], f"--out={str(run)!r} already holds a run: pass --resume"),
        (["evaluate", "--run", tmp_path], "is not a tfmeta run directory (no config.json)"),
        (["export", "--run", run, "--export-dir", models, "--adapt-on", tmp_path / "none.npz"], "is not a file"),
        (["export", "--run", run, "--export-dir", models, "--adapt-on", tmp_path / "s.npz"],
         "lacks arrays ['support_y']"),
    ]:
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2 and expected in err, err
    assert _hashes(run, models) == before


# 7. the serving graph -------------------------------------------------------------------------------

def _serving(good_run):
    return tf.saved_model.load(str(good_run / "models" / "sinusoid_maml" / "1")).signatures["adapt_and_predict"]


@pytest.mark.parametrize("case,message", [
    ("empty support", "support_x is empty"),
    ("empty query", "query_x is empty"),
    ("inf support_x", "support_x holds NaN or Inf"),
    ("nan query_x", "query_x holds NaN or Inf"),
    ("nan support_y", "support_y holds NaN or Inf"),
    ("support_y (5, 7)", "support_y must have shape [examples, 1]"),
    ("support_y (5,)", "support_y must have shape [examples, 1]"),
])
def test_7_serving_graph_refuses_degenerate_input(good_run, case, message):
    sx, sy, qx = np.zeros([5, 1], "float32"), np.zeros([5, 1], "float32"), np.zeros([3, 1], "float32")
    if case == "empty support":
        sx, sy = sx[:0], sy[:0]
    elif case == "empty query":
        qx = qx[:0]
    elif case == "inf support_x":
        sx[2, 0] = np.inf
    elif case == "nan query_x":
        qx[0, 0] = np.nan
    elif case == "nan support_y":
        sy[1, 0] = np.nan
    elif case == "support_y (5, 7)":
        sy = np.zeros([5, 7], "float32")
    else:
        sy = np.zeros([5], "float32")
    served = _serving(good_run)
    assert np.all(np.isfinite(served(support_x=np.zeros([5, 1], "float32"), support_y=np.zeros([5, 1], "float32"),
                                     query_x=np.zeros([3, 1], "float32"))["predictions"].numpy()))
    with pytest.raises(tf.errors.InvalidArgumentError, match=message.replace("[", r"\[")):
        served(support_x=sx, support_y=sy, query_x=qx)


def test_7_8_export_refuses_nan_parameters_and_bad_support_and_cleans_stale_tmp(run_copy):
    import keras

    from tfmeta.core import models
    from tfmeta.core.learner import MetaLearner

    _, exported = run_copy
    root = exported / "sinusoid_maml"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / f".tmp-{dead.pid}-{'a' * 32}"
    live = root / f".tmp-{os.getppid()}-{'b' * 32}"
    for d in (stale, live):
        d.mkdir()
        (d / "saved_model.pb").write_bytes(b"partial")
    earlier = _hashes(root / "1")
    keras.utils.set_random_seed(0)
    learner = MetaLearner(models.mlp(), task="regression", inner_lr=0.01, inner_steps=1)
    with pytest.raises(ValueError, match="support_x is empty"):
        export.export_adapted(learner, np.zeros([0, 1], "float32"), np.zeros([0, 1], "float32"), str(exported), "a")
    with pytest.raises(ValueError, match="support_x holds NaN or Inf"):
        export.export_adapted(learner, np.full([5, 1], np.inf, "float32"), np.zeros([5, 1], "float32"),
                              str(exported), "a")
    assert export.export_adapter(learner, str(exported), "sinusoid_maml").endswith("2")
    assert not stale.exists() and live.exists()  # the dead writer's leftovers went, the live one's stay
    learner.meta_variables[0].assign(tf.fill(learner.meta_variables[0].shape, float("nan")))
    with pytest.raises(ValueError, match="NaN or Inf: refusing to export"):
        export.export_adapter(learner, str(exported), "sinusoid_maml")
    assert export.versions(str(root)) == [1, 2]
    assert _hashes(root / "1") == earlier


def test_8_readme_shows_where_the_serving_error_message_is():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "Graph execution error" in readme and "support_x is empty" in readme


# kill -9 at random moments: resume reaches the uninterrupted parameters -----------------------------

ITERATIONS = 24
KILLED = ["--iterations", str(ITERATIONS), *FAST]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run's final meta-parameters."""
    base = tmp_path_factory.mktemp("straight")
    assert cli.main(["train", "--out", str(base / "run"), "--export-dir", str(base / "models"),
                     "--checkpoint-every", "4", *KILLED]) == 0
    return _checkpoint_tensors(tf.train.latest_checkpoint(str(base / "run" / "checkpoints")))


def _wait_for(pattern, deadline):
    while time.monotonic() < deadline and not glob.glob(pattern):
        time.sleep(0.01)


@settings(max_examples=2, deadline=None, database=None, phases=(Phase.generate,),  # no slow shrinking
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(phase=st.sampled_from(["train", "checkpoint", "export"]), when=st.floats(0.0, 1.0))
def test_kill_9_at_random_moments_then_resume_reaches_the_uninterrupted_parameters(
        straight, tmp_path_factory, capsys, phase, when):
    base = tmp_path_factory.mktemp("killed")
    run, models = base / "run", base / "models"
    every = "1" if phase == "checkpoint" else "4"  # "checkpoint": a write is nearly always under way
    proc = subprocess.Popen([sys.executable, "-m", "tfmeta", "train", "--out", str(run), "--export-dir",
                             str(models), "--checkpoint-every", every, *KILLED],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    if phase == "export":
        _wait_for(str(models / "sinusoid_maml" / ".tmp-*"), deadline)
        time.sleep(0.5 * when)
    else:
        step = 1 + int(when * (ITERATIONS - 2))
        _wait_for(str(run / "checkpoints" / f"ckpt-{step if phase == 'checkpoint' else 4}.index"), deadline)
        time.sleep(0.02 * when if phase == "checkpoint" else 0.3 * when)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert os.path.isfile(run / "config.json"), "the run did not start before the deadline"
    kept = _hashes(models)
    kept = {p: d for p, d in kept.items() if "/.tmp-" not in p}  # complete versions only
    rc, _, err = _cli(capsys, "train", "--resume", run, "--export-dir", models, "--checkpoint-every", every,
                      *FAST)
    assert rc == 0, err
    resumed = _checkpoint_tensors(tf.train.latest_checkpoint(str(run / "checkpoints")))
    assert sorted(resumed) == sorted(straight)
    for key, value in straight.items():
        np.testing.assert_allclose(resumed[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    after = _hashes(models)
    assert all(after[p] == d for p, d in kept.items())  # earlier export versions: every byte kept
    assert not glob.glob(str(models / "sinusoid_maml" / ".tmp-*"))  # the killed export's leftovers cleaned
    for version in export.versions(str(models / "sinusoid_maml")):
        assert os.path.isfile(models / "sinusoid_maml" / str(version) / "saved_model.pb")
