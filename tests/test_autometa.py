"""Auto-Meta (tfmeta.app.autometa): search space, builder, surrogate, KerasTuner search, `search --quick`."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

import tfmeta  # noqa: F401
import tensorflow as tf

from tfmeta import export
from tfmeta.core import models
from tfmeta.app.autometa import benchmark, builder, cli, search, space, surrogate
from tfmeta.app.autometa.space import OPERATORS, Architecture, Cell

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras_tuner.src.engine.oracle")

OMNIGLOT = os.environ.get("TFMETA_OMNIGLOT_DIR", os.path.join(REPO, "..", "shared", "data", "omniglot"))


# -- search space and builder ----------------------------------------------------------------------
@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_builder_gives_a_valid_model_for_random_cells_and_the_description_rebuilds_it(blocks):
    rng = np.random.default_rng(blocks)
    for _ in range(2):
        cell = space.random_cell(rng, blocks)
        arch = Architecture(cell, input_shape=(12, 12, 1), classes=3, filters=2, cells_per_stage=1, reductions=1)
        model = builder.build_model(arch)
        assert model.output_shape == (None, 3)
        logits = model(np.random.default_rng(0).random((2, 12, 12, 1)).astype("float32"), training=True)
        assert logits.shape == (2, 3) and np.all(np.isfinite(logits))
        # the JSON description alone rebuilds the same layers, shapes and parameter count
        again = builder.build_model(Architecture.from_json(json.dumps(json.loads(arch.to_json()))))
        assert builder.summary(again) == builder.summary(model)
        assert again.count_params() == model.count_params()
        # ...and the comparison does see a different cell
        other = space.random_cell(rng, blocks)
        if other.key() != cell.key():
            assert builder.summary(builder.build_model(arch.with_cell(other))) != builder.summary(model)


def test_every_operator_builds_in_normal_and_reduction_cells():
    cell = Cell.from_json([[0, "conv3x3", 1, "sep3x3"], [0, "sep5x5", 2, "maxpool3x3"],
                           [1, "avgpool3x3", 2, "identity"]])
    model = Architecture(cell, input_shape=(12, 12, 1), filters=2, cells_per_stage=2, reductions=2).build()
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"Conv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D", "BatchNormalization",
            "Add", "Concatenate", "GlobalAveragePooling2D", "Dense"} <= kinds
    # two reductions: 12 -> 6 -> 3, filters 2 -> 4 -> 8, the reduction cells are there
    assert any(layer.name.endswith("r_b1_add") for layer in model.layers)
    assert model.get_layer("c8_b3_add").output.shape == (None, 3, 3, 8)
    assert model.get_layer("c8_concat").output.shape == (None, 3, 3, 16)  # blocks 2 and 3: unread
    # separable kernel sizes follow the operator names
    assert model.get_layer("c1_b2_a_sep5x5_conv").kernel_size == (5, 5)


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_every_expansion_has_one_more_block_and_contains_the_cell(blocks):
    rng = np.random.default_rng(10 + blocks)
    for operators in (OPERATORS, ("conv3x3", "identity")):
        cell = space.random_cell(rng, blocks, operators)
        children = cell.expansions(operators)
        pairs = (blocks + 2) * len(operators)  # the new block reads 0, 1 or one of the b blocks
        assert len(children) == pairs * (pairs + 1) // 2
        assert len({c.key() for c in children}) == len(children)
        for child in children:
            assert len(child.blocks) == blocks + 1
            assert child.contains(cell) and child.blocks[:blocks] == cell.blocks
            assert Cell.from_values(child.to_values()) == child == Cell.from_key(child.key())
    assert len(space.initial_cells()) == 78


# -- surrogate -------------------------------------------------------------------------------------
_VALUE = {"conv3x3": 1.0, "sep3x3": 0.8, "sep5x5": 0.9, "maxpool3x3": 0.1, "avgpool3x3": 0.2, "identity": 0.3}


def _synthetic_score(cell: Cell) -> float:
    """A known objective: operator values, reading H[c-1] helps, same-operator pairs interact."""
    total = 0.0
    for b in cell.blocks:
        total += _VALUE[b.op_a] + _VALUE[b.op_b] + 0.3 * (1 in (b.input_a, b.input_b))
        total += 0.4 * (b.op_a == b.op_b) * (_VALUE[b.op_a] - 0.5)
    return total / len(cell.blocks) + 0.05 * len(cell.blocks)


def test_spearman_matches_the_closed_form_and_handles_ties():
    rng = np.random.default_rng(0)
    a, b = rng.permutation(20), rng.permutation(20)
    d = a - b
    assert surrogate.spearman(a, b) == pytest.approx(1 - 6 * (d ** 2).sum() / (20 * (20 ** 2 - 1)))
    assert surrogate.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert surrogate.rankdata([5, 1, 5, 3]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert np.isnan(surrogate.spearman([1, 1, 1], [1, 2, 3]))


def test_surrogate_backpropagation_matches_finite_differences():
    model = surrogate.Surrogate(2, hidden=3)
    rng = np.random.default_rng(1)
    x = space.encode_all([space.random_cell(rng, 2) for _ in range(6)], 2)
    t = rng.normal(size=6)
    params = [rng.normal(size=(x.shape[1], 3)), rng.normal(size=3), rng.normal(size=3), np.asarray(0.2)]
    _, grads = model._loss_and_grads(params, x, t)
    for k, index in ((0, (5, 1)), (1, (2,)), (2, (0,)), (3, ())):
        plus = [p.copy() for p in params]
        minus = [p.copy() for p in params]
        plus[k][index] += 1e-6
        minus[k][index] -= 1e-6
        fd = (model._loss_and_grads(plus, x, t)[0] - model._loss_and_grads(minus, x, t)[0]) / 2e-6
        assert fd == pytest.approx(float(grads[k][index]), rel=1e-5, abs=1e-8)


def test_surrogate_ranks_held_out_candidates_of_a_known_objective():
    rng = np.random.default_rng(3)
    train = space.initial_cells() + [space.random_cell(rng, 2) for _ in range(60)]
    held_out = [space.random_cell(rng, 3) for _ in range(100)]  # larger cells than any it saw
    model = surrogate.Surrogate(3).fit(train, [_synthetic_score(c) for c in train])
    rho = surrogate.spearman(model.predict(held_out), [_synthetic_score(c) for c in held_out])
    assert rho > 0.5
    # ranking is what the search uses: the best-ranked candidates are among the truly good ones
    top = [c for c, _ in model.rank(held_out)[:10]]
    assert np.mean([_synthetic_score(c) for c in top]) > np.mean([_synthetic_score(c) for c in held_out])


# -- the KerasTuner search -------------------------------------------------------------------------
class _Counting:
    """A synthetic evaluator: the known objective, a record of what it ran, an optional interrupt."""

    def __init__(self, interrupt_at=None, seconds=0.0):
        self.calls, self.interrupt_at, self.seconds = [], interrupt_at, seconds

    def __call__(self, arch, trial_dir):
        self.calls.append(arch.cell.key())
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a trial
        time.sleep(self.seconds)
        return {"val_accuracy": _synthetic_score(arch.cell)}


def _config(out, **kw):
    return search.SearchConfig(**{**dict(blocks=3, top_k=2, operators=("conv3x3", "identity"),
                                         out=str(out)), **kw})


def _quiet(event, tuner, trial):
    return None


def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path):
    planned = space.planned_trials(3, 2, ("conv3x3", "identity"))  # 10 + 2 + 2
    reference = search.run_search(_config(tmp_path / "ref"), evaluator=_Counting(), progress=_quiet)
    assert reference["trials_completed"] == planned and reference["complete"]

    first = _Counting(interrupt_at=11)  # in stage 2, a surrogate-chosen cell still queued
    with pytest.raises(KeyboardInterrupt):
        search.run_search(_config(tmp_path / "run"), evaluator=first, progress=_quiet)
    second = _Counting()
    result = search.run_search(_config(tmp_path / "run"), evaluator=second, progress=_quiet)
    finished, interrupted = first.calls[:-1], first.calls[-1]
    assert not set(finished) & set(second.calls)          # finished trials are not run again
    assert second.calls.count(interrupted) == 1            # the interrupted one is retried once
    assert len(finished) + len(second.calls) == planned
    assert result["trials_completed"] == planned and result["trials_run_this_session"] == len(second.calls)
    # the resumed search made the same choices as the uninterrupted one
    assert result["expansions"] == reference["expansions"]
    assert result["best"]["cell"] == reference["best"]["cell"]
    best = Architecture.load(result["architecture"])
    assert best.cell == Cell.from_json(reference["best"]["cell"])
    # the stages grew the top cells: 2-block candidates extend the best 1-block cells
    ones = sorted((c for c in space.initial_cells(("conv3x3", "identity"))), key=_synthetic_score, reverse=True)
    stage2 = result["expansions"][0]
    assert stage2["parents"] == [c.key() for c in ones[:2]]
    assert all(any(ch["cell"].startswith(p + "|") for p in stage2["parents"]) for ch in stage2["chosen"])
    # a completed search run again runs nothing
    third = _Counting()
    search.run_search(_config(tmp_path / "run"), evaluator=third, progress=_quiet)
    assert third.calls == []


def test_time_budget_stops_the_search_and_a_larger_budget_continues_it(tmp_path):
    planned = space.planned_trials(3, 2, ("conv3x3", "identity"))
    slow = _Counting(seconds=0.1)
    stopped = search.run_search(_config(tmp_path / "b", budget_minutes=0.005), evaluator=slow, progress=_quiet)
    assert stopped["stopped_by"] == "budget" and not stopped["complete"]
    assert 1 <= stopped["trials_completed"] == len(slow.calls) < planned
    assert Architecture.load(stopped["architecture"]).cell == Cell.from_json(stopped["best"]["cell"])
    done = search.run_search(_config(tmp_path / "b", budget_minutes=10), evaluator=slow, progress=_quiet)
    assert done["complete"] and done["trials_completed"] == planned
    assert len(slow.calls) == len(set(slow.calls)) == planned  # nothing ran twice
    assert done["elapsed_seconds"] > stopped["elapsed_seconds"]  # the clock spans both sessions


def test_diverging_candidates_fail_alone_and_other_errors_stop_the_search(tmp_path):
    def diverging(arch, trial_dir):
        if "identity" in arch.cell.key():
            raise search.TrialDiverged("validation loss nan is not finite")
        return {"val_accuracy": _synthetic_score(arch.cell)}

    result = search.run_search(_config(tmp_path / "d", blocks=1), evaluator=diverging, progress=_quiet)
    assert result["trials_completed"] == 3 and result["trials_failed"] == 7  # conv3x3-only cells remain
    assert "identity" not in result["best"]["cell_description"]

    def broken(arch, trial_dir):
        raise ValueError("estimator='reptile' meta-learns the initialization only")

    with pytest.raises(ValueError, match="initialization only"):  # the error itself, not KerasTuner's
        search.run_search(_config(tmp_path / "e", blocks=1), evaluator=broken, progress=_quiet)


@pytest.mark.parametrize("kw,name", [
    (dict(operators=("conv3x3", "conv7x7")), "operators"),
    (dict(operators="conv3x3,dilated"), "operators"),
    (dict(blocks=0), "blocks"),
    (dict(top_k=0), "top_k"),
    (dict(trial_budget=0), "trial_budget"),
    (dict(budget_minutes=0), "budget_minutes"),
])
def test_bad_settings_raise_value_errors_naming_the_argument(tmp_path, kw, name):
    with pytest.raises(ValueError, match=name):
        search.run_search(_config(tmp_path / "x", **kw), evaluator=_Counting(), progress=_quiet)
    if name == "trial_budget":
        with pytest.raises(ValueError, match="one meta-step"):
            search.run_search(_config(tmp_path / "x", **kw), evaluator=_Counting(), progress=_quiet)


def test_unknown_operators_in_a_description_are_named():
    with pytest.raises(ValueError, match="op_a='conv9x9'"):
        Cell.from_json([[0, "conv9x9", 1, "identity"]])
    with pytest.raises(ValueError, match="input_b=3"):
        Cell.from_json([[0, "identity", 3, "identity"]])


def test_an_output_directory_holding_a_different_search_is_refused(tmp_path):
    out = tmp_path / "s"
    search.run_search(_config(out, blocks=1, operators=("identity",)), evaluator=_Counting(), progress=_quiet)
    with pytest.raises(ValueError, match=r"out=.*holds a different search \(blocks: 1 there, 2 here"):
        search.run_search(_config(out, blocks=2, operators=("identity",)), evaluator=_Counting(), progress=_quiet)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="out=.*holds no tfmeta search"):
        search.run_search(_config(tmp_path / "other"), evaluator=_Counting(), progress=_quiet)
    # through the command line: exit status 2 and the flag named
    assert cli.main(["search", "--out", str(out), "--blocks", "2", "--operators", "identity",
                     "--dataset", "synthetic"]) == 2
    assert cli.main(["search", "--out", str(tmp_path / "y"), "--top-k", "0"]) == 2
    assert cli.main(["search", "--out", str(tmp_path / "y"), "--operators", "conv3x3,conv7x7"]) == 2


def test_bad_flags_are_named_on_stderr(tmp_path, capsys):
    assert cli.main(["search", "--out", str(tmp_path / "y"), "--trial-budget", "0"]) == 2
    assert "trial_budget=0 (--trial-budget) is too small to take one meta-step" in capsys.readouterr().err


def test_quick_search_end_to_end_exports_a_model_that_loads(tmp_path, capsys, recwarn, monkeypatch):
    data = (["--dataset", "omniglot", "--data-dir", OMNIGLOT] if os.path.isdir(OMNIGLOT)
            else ["--dataset", "synthetic"])
    out = tmp_path / "am"
    # the main of `python -m tfmeta.app.autometa.cli` (its __main__ only calls it), run in this
    # process: a TensorFlow start-up saved
    capsys.readouterr()
    code = cli.main(["search", "--quick", "--operators", "conv3x3", "--top-k", "1", "--image-size", "16",
                     "--out", str(out), "--json", *data])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    planned = space.planned_trials(2, 1, ("conv3x3",))  # 3 one-block cells + the best one's expansion
    assert result["complete"] and result["trials_completed"] == planned and result["stage"] == 2
    assert f"trial {planned} of {planned} done" in stderr and "best so far" in stderr
    assert "elapsed" in stderr
    # the inner loop is checked once, on the first candidate (its kernels move by a few percent of
    # their norm: warned), not again for every candidate
    from tfmeta.core.learner import InnerLoopWarning
    assert sum(issubclass(w.category, InnerLoopWarning) for w in recwarn) == 1
    # KerasTuner's project holds one record per trial
    records = sorted(p for p in os.listdir(out / "tuner") if p.startswith("trial_"))
    assert len(records) == planned
    # the best architecture's JSON rebuilds the model that was meta-trained and exported
    arch = Architecture.load(result["architecture"])
    assert arch.cell.to_json() == result["best"]["cell"]
    assert arch.build().count_params() == result["best"]["metrics"]["parameters"]
    loaded = tf.saved_model.load(result["export"])
    adapt = loaded.signatures["adapt_and_predict"]
    rng = np.random.default_rng(0)
    support_x = rng.random((5, 16, 16, 1)).astype("float32")
    out_logits = adapt(support_x=tf.constant(support_x), support_y=tf.range(5, dtype=tf.int32),
                       query_x=tf.constant(rng.random((7, 16, 16, 1)).astype("float32")))["logits"]
    assert out_logits.shape == (7, 5) and np.all(np.isfinite(out_logits.numpy()))
    keras_model = export.load(os.path.join(result["export"], "model.keras"))
    # model.keras is the plain-Keras copy whose BatchNorm predicts with batch statistics
    # (tfmeta.core.plain): the same trainable weights, without the unused running statistics
    def trainable(model):
        return sum(int(np.prod(w.shape)) for w in model.trainable_weights)

    assert trainable(keras_model) == trainable(arch.build())
    assert 0.0 <= result["test"]["accuracy_after"] <= 1.0

    # the benchmark tooling runs on the finished search: found cell vs. conv4 for the same time,
    # and the surrogate's held-out rank correlation on new, meta-trained candidates
    report = benchmark.compare(str(out), minutes=0.02, episodes=4)
    for name in ("autometa", "conv4"):
        assert report[name]["meta_steps"] >= 1 and report[name]["episodes"] == 4
        assert report[name]["seconds_per_meta_step"] > 0
    assert report["autometa"]["parameters"] == arch.build().count_params()
    assert report["conv4"]["parameters"] == models.conv4(5, image_size=16).count_params()
    # the surrogate's held-out measurement: candidates are scored by a stand-in for meta-training
    # (the search above ran the real MetaTrainEvaluator on 4 cells; each more costs a compile, ~8 s),
    # so what is checked here is which candidates are drawn and that each measured score is theirs
    scored = {}

    class Scorer:
        def __init__(self, config, samplers):
            pass

        def __call__(self, arch, trial_dir):
            scored[arch.cell.key()] = float(sum(map(ord, arch.cell.key())))  # any score of the cell
            return {"val_accuracy": scored[arch.cell.key()]}

    monkeypatch.setattr(search, "MetaTrainEvaluator", Scorer)
    tried = {row["cell"] for stage in result["expansions"] for row in stage["chosen"]}
    untried = {child.key() for cell in space.initial_cells(("conv3x3",))
               for child in cell.expansions(("conv3x3",))} - tried
    assert len(tried) == 1 and len(untried) >= 3
    measured = benchmark.measure_surrogate(str(out), candidates=len(untried))
    assert measured["fitted_on"] == 3  # the 1-block cells
    # every untried expansion of the 1-block cells, and only those, scored once each
    assert {c["cell"] for c in measured["candidates"]} == untried == set(scored)
    for candidate in measured["candidates"]:
        assert candidate["measured"] == scored[candidate["cell"]]
    assert -1.0 <= measured["spearman"] <= 1.0 or np.isnan(measured["spearman"])
