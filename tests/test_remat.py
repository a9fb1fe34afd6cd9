"""Rematerialised inner loop (MetaLearner(remat=...), --remat): same meta-gradient, less memory.

float64, smooth Conv + BatchNorm model (tanh, average pooling): the meta-gradient with remat equals
the one without it to 1e-10 relative, for T in {1, 7, 10}, windows K in {1, 3, T}, each inner
optimizer (sgd, momentum with weight decay, adam, Meta-SGD); a central finite difference at T = 7;
the estimators that differentiate through the inner loop (maml, reuse, linearity) through their
task loop; and the refusals (K out of range, first-order estimators).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras

from conftest import classification_tasks, fd_check, smooth_conv_bn
from tfmeta import estimators
from tfmeta.core import inner_optimizers
from tfmeta.core.learner import MetaLearner, parse_remat, remat_window

OPTIMIZERS = {
    "sgd": dict(inner_optimizer=inner_optimizers.sgd(0.3)),
    "momentum_wd": dict(inner_optimizer=inner_optimizers.momentum(0.2, momentum=0.9, weight_decay=0.01)),
    "adam": dict(inner_optimizer=inner_optimizers.adam(0.05)),
    "meta_sgd": dict(inner_optimizer=inner_optimizers.sgd(0.3), meta_sgd=True),
}
#: (T, K) with K None for plain MAML. SGD runs the grid T in {1, 7} x K in {1, 3, T}; the other
#: optimizers the windows that differ in code path at T = 10 (K = 1: windows of one step; K = 3: a
#: while loop over windows with a shorter last window, 3 + 3 + 3 + 1); K = T (one window) is
#: optimizer-agnostic and run with SGD. Each (T, K) costs a graph trace (seconds): keep it lean.
FULL_GRID = [(1, None), (1, 1), (7, None), (7, 1), (7, 3), (7, 7)]
SHORT_GRID = [(10, None), (10, 1), (10, 3)]
VARIANTS = {"sgd": FULL_GRID, "momentum_wd": SHORT_GRID, "adam": SHORT_GRID, "meta_sgd": SHORT_GRID}


def _relative(a, b):
    a = np.concatenate([np.ravel(x) for x in a])
    b = np.concatenate([np.ravel(x) for x in b])
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def _meta_gradients(learner, task, variants):
    """d query loss / d meta-parameters of one task for each (T, remat K), in one graph."""
    sx, sy, qx, qy = (t[0] for t in task)

    @tf.function(autograph=False)
    def grads():
        out = []
        for steps, k in variants:
            learner.remat = k  # K <= T here; the constructor's check is tested below
            with tf.GradientTape() as tape:
                values = learner.meta_values()
                tape.watch(values)
                meta = learner.unflatten(values)
                params = learner.adapt(meta, sx, sy, steps=steps)
                loss, _ = learner.outer_loss(params, meta, qx, qy)
            out.append(tape.gradient(loss, values))
        return out

    return [[g.numpy() for g in gs] for gs in grads()]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_remat_meta_gradient_equals_maml(float64, optimizer):
    learner = MetaLearner(smooth_conv_bn(), **OPTIMIZERS[optimizer])
    task = classification_tasks(1, 3, 2, 2, (6, 6, 1))
    results = dict(zip(VARIANTS[optimizer], _meta_gradients(learner, task, VARIANTS[optimizer])))
    for (steps, k), grads in results.items():
        if k is None:
            assert np.max(np.abs(grads[0])) > 1e-6  # the initialization's gradient is not trivial
            continue
        error = _relative(results[(steps, None)], grads)
        assert error <= 1e-10, (optimizer, steps, k, error)
    if optimizer == "meta_sgd":  # the learning rates' gradients, through every window
        lr = learner.unflatten(results[(10, 3)]).lr
        assert all(np.max(np.abs(g)) > 0 for g in lr)


def test_remat_matches_finite_differences_at_seven_steps(float64):
    """(Adam's meta-gradient agrees with central differences to only about 1e-5 in float64, with
    or without remat: its eps_root square root; momentum with weight decay is checked here.)"""
    optimizer = inner_optimizers.momentum(0.2, momentum=0.9, weight_decay=0.01)
    learner = MetaLearner(smooth_conv_bn(), inner_optimizer=optimizer, inner_steps=7, meta_sgd=True,
                          remat=3)
    tasks = classification_tasks(2, 3, 2, 2, (6, 6, 1))
    error, analytic, _ = fd_check(learner, tasks)
    assert abs(analytic) > 1e-6
    assert error < 1e-6, error


def _estimator_grads(learner_kwargs, estimator, tasks):
    fn_grads = []
    for remat in (None, learner_kwargs.pop("remat")):
        learner = MetaLearner(smooth_conv_bn(), remat=remat, **learner_kwargs)
        fn = tf.function(lambda: estimator.meta_gradient(learner, tasks), autograph=False)
        result = fn()
        fn_grads.append(([g.numpy() for g in result.grads], {k: float(v) for k, v in result.metrics.items()}))
    return fn_grads


def test_remat_through_the_task_loop_linearity_on_reuse(float64):
    """maml's task loop with LIL on a reuse base: observers (the path length, differentiated by
    the amplitude loss) and reuse windows cross the checkpoints; the metrics are unchanged."""
    est = estimators.get("linearity", base="reuse", reuse_window=2, amplitude_weight=0.5)
    tasks = classification_tasks(2, 3, 2, 2, (6, 6, 1))
    kwargs = dict(inner_steps=5, remat="every:4", inner_optimizer="momentum")  # windows 4 + 1
    (plain, plain_metrics), (remat, remat_metrics) = _estimator_grads(kwargs, est, tasks)
    assert _relative(plain, remat) <= 1e-10
    assert plain_metrics["amplitude_loss"] > 0
    for key, value in plain_metrics.items():
        assert remat_metrics[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key


def test_remat_meta_network_and_frozen_body_get_their_gradients(float64):
    """A meta-network inside the inner loss (Sec. 2.2, Kim et al. 2020) and the weights that do not adapt
    (adapt="head") enter every window as inputs, so they get their gradients through it."""
    keras.utils.set_random_seed(3)
    weigher = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(1, activation="softplus")])

    def inner_loss(learner, params, meta, x, y):
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=learner.fmodel(params, x))
        weights, _ = weigher.stateless_call(meta.net, [], x)
        return tf.reduce_mean(weights[:, 0] * losses)

    kwargs = dict(inner_steps=6, meta_network=weigher, inner_loss=inner_loss, remat="sqrt",
                  adapt="head")
    tasks = classification_tasks(2, 3, 2, 2, (6, 6, 1))
    (plain, _), (remat, _) = _estimator_grads(kwargs, estimators.get("maml"), tasks)
    assert np.max(np.abs(plain[0])) > 1e-8 and np.max(np.abs(plain[-1])) > 1e-8  # conv, weigher
    assert _relative(plain, remat) <= 1e-10


# -- the option and its refusals -----------------------------------------------------------------
def test_parse_and_window():
    assert parse_remat(None) is None and parse_remat("none") is None
    assert parse_remat("sqrt") == "sqrt" and parse_remat("every:4") == 4 and parse_remat(3) == 3
    assert [remat_window("sqrt", t) for t in (1, 5, 25, 100)] == [1, 2, 5, 10]
    assert remat_window("sqrt", 100, reuse_window=4) == 20  # 25 windows of 4 -> 5 per checkpoint
    assert remat_window(None, 10) is None and remat_window(4, 3) == 3


@pytest.mark.parametrize("remat, match", [
    ("every:0", "K >= 1"), ("every:x", "none, sqrt or every:K"), ("fast", "none, sqrt or every:K"),
    (0, "K >= 1"), ("every:6", "1 <= K <= T"),
])
def test_bad_remat_is_refused(remat, match):
    with pytest.raises(ValueError, match="--remat") as err:
        MetaLearner(smooth_conv_bn(), inner_steps=5, remat=remat)
    assert match in str(err.value)


@pytest.mark.parametrize("name, options", [
    ("fomaml", {}), ("reptile", {}), ("implicit", {}), ("shifting", {}), ("lil_pretraining", {}),
    ("linearity", {"base": "fomaml"}),
])
def test_first_order_estimators_refuse_remat(name, options):
    from tfmeta.estimators.linearity import LILPretraining

    make = LILPretraining if name == "lil_pretraining" else lambda: estimators.get(name, **options)
    learner = MetaLearner(smooth_conv_bn(), inner_steps=4, remat="sqrt")
    with pytest.raises(ValueError, match="--remat") as err:
        make().check_remat(learner)
    assert name in str(err.value)
    make().check_remat(MetaLearner(smooth_conv_bn(), inner_steps=4))  # remat none: accepted


def test_reuse_needs_a_remat_window_of_whole_reuse_windows():
    learner = MetaLearner(smooth_conv_bn(), inner_steps=8, remat="every:3")
    with pytest.raises(ValueError, match="--remat"):
        estimators.get("reuse", reuse_window=2).check_remat(learner)
    estimators.get("reuse", reuse_window=3).check_remat(learner)


@pytest.mark.parametrize("argv, words", [
    (["train", "--estimator", "fomaml", "--remat", "sqrt"], ["--remat", "'fomaml'"]),
    (["train", "--estimator", "linearity", "--base", "fomaml", "--remat", "every:1"], ["--remat", "'fomaml'"]),
    (["train", "--inner-steps", "4", "--remat", "every:5"], ["--remat", "1 <= K <= T"]),
    (["train", "--remat", "every:0"], ["--remat", "K >= 1"]),
    (["train", "--remat", "often"], ["--remat", "none, sqrt or every:K"]),
    (["bench", "--estimator", "reptile", "--remat", "sqrt"], ["--remat", "'reptile'"]),
    (["bench", "--estimator", "reuse", "--reuse-window", "2", "--inner-steps", "6", "--remat", "every:3"],
     ["--remat", "multiple of the reuse window"]),
])
def test_cli_refuses_bad_remat_before_writing_anything(argv, words, capsys, tmp_path, monkeypatch):
    from tfmeta.app import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(argv + (["--out", "run"] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(w in err for w in words), err
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_remat_recomputes_the_same_dropout_masks(float64):
    """Random layers: each window's recomputation draws the masks its forward pass drew (the seed
    scope folds in the step index, not a counter), so the meta-gradient is unchanged."""
    from tfmeta.core import randomness

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3, padding="same"),
                                 keras.layers.BatchNormalization(), keras.layers.Activation("tanh"),
                                 keras.layers.Dropout(0.3), keras.layers.AveragePooling2D(2),
                                 keras.layers.Flatten(), keras.layers.Dense(3)])

    tasks = classification_tasks(2, 3, 2, 2, (6, 6, 1))
    grads = []
    for remat in (None, "every:2"):
        learner = MetaLearner(model(), inner_steps=5, remat=remat)
        fn = tf.function(lambda: estimators.get("maml").meta_gradient(learner, tasks), autograph=False)
        with randomness.scope([1, 2]):
            grads.append([g.numpy() for g in fn().grads])
    assert _relative(grads[0], grads[1]) <= 1e-10
