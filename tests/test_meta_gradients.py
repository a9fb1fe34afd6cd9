"""Meta-gradients against central finite differences in float64, and the estimators' identities."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import keras

from conftest import classification_tasks, fd_check, small_dense, smooth_conv_bn
from tfmeta import estimators
from tfmeta.core import functional, inner_optimizers
from tfmeta.core.learner import MetaLearner


def _fd_check(learner, tasks, estimator="maml"):
    error, analytic, _ = fd_check(learner, tasks, estimator)
    return error, analytic


@pytest.mark.parametrize("unroll", [False, True])
def test_maml_matches_finite_differences_dense(float64, unroll):
    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=3, unroll=unroll)
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    error, analytic = _fd_check(learner, tasks)
    assert abs(analytic) > 1e-6
    assert error < 1e-5, error


@pytest.mark.parametrize("optimizer", [
    inner_optimizers.sgd(0.3),
    inner_optimizers.momentum(0.2, momentum=0.9, weight_decay=0.01),
    inner_optimizers.adam(0.05),
])
def test_maml_matches_finite_differences_conv_batchnorm(float64, optimizer):
    """Guards the exact BatchNorm moments: stock Keras BN drops second-order terms."""
    learner = MetaLearner(smooth_conv_bn(), inner_optimizer=optimizer, inner_steps=2)
    tasks = classification_tasks(2, 3, 2, 3, (6, 6, 1))
    error, _ = _fd_check(learner, tasks)
    assert error < 1e-5, error


def test_stock_keras_batchnorm_would_fail_the_check(float64, monkeypatch):
    """Without the exact moments the same check fails: the guard above can fail."""
    monkeypatch.setattr(
        functional, "_exact_moments", lambda layer, x, mask: type(layer)._moments(layer, x, mask)
    )
    learner = MetaLearner(smooth_conv_bn(), inner_lr=0.3, inner_steps=2)
    tasks = classification_tasks(2, 3, 2, 3, (6, 6, 1))
    error, _ = _fd_check(learner, tasks)
    assert error > 1e-4, error


def test_meta_sgd_and_meta_network_gradients_match_finite_differences(float64):
    """Learning rates and a meta-network inside the inner loss (Sec. 2.2, Kim et al. 2020) get exact gradients."""
    keras.utils.set_random_seed(3)
    weigher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="softplus")])

    def inner_loss(learner, params, meta, x, y):
        logits = learner.fmodel(params, x)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        weights, _ = weigher.stateless_call(meta.net, [], x)
        return tf.reduce_mean(weights[:, 0] * losses)

    learner = MetaLearner(small_dense(), inner_lr=0.3, inner_steps=2, meta_sgd=True,
                          meta_network=weigher, inner_loss=inner_loss)
    tasks = classification_tasks(2, 3, 2, 3, (4,))
    est = estimators.get("maml")
    grads = est.meta_gradient(learner, tasks).grads
    meta = learner.unflatten(grads)
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in meta.lr + meta.net)
    error, _ = _fd_check(learner, tasks)
    assert error < 1e-5, error


def test_fomaml_equals_maml_with_inner_gradients_stopped(float64):
    learner = MetaLearner(smooth_conv_bn(), inner_lr=0.3, inner_steps=3)
    tasks = classification_tasks(3, 3, 2, 3, (6, 6, 1))
    fo = estimators.get("fomaml").meta_gradient(learner, tasks)
    values = learner.meta_values()
    expected = [tf.zeros_like(v) for v in values]
    for i in range(3):
        with tf.GradientTape() as tape:
            tape.watch(values)
            meta = learner.unflatten(values)
            params = learner.adapt(meta, tasks[0][i], tasks[1][i], second_order=False)
            loss, _ = learner.outer_loss(params, meta, tasks[2][i], tasks[3][i])
        expected = [e + g / 3 for e, g in zip(expected, tape.gradient(loss, values))]
    second = estimators.get("maml").meta_gradient(learner, tasks)
    for a, b in zip(fo.grads, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)
    gap = max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(fo.grads, second.grads))
    assert gap > 1e-6  # first order really differs from second order


def test_reptile_meta_gradient_is_theta_minus_adapted(float64):
    learner = MetaLearner(small_dense(), inner_lr=0.2, inner_steps=4)
    tasks = classification_tasks(3, 3, 2, 3, (4,))
    result = estimators.get("reptile").meta_gradient(learner, tasks)
    meta = learner.unflatten(learner.meta_values())
    expected = [tf.zeros_like(v) for v in meta.init]
    for i in range(3):
        phi = learner.adapt(meta, tasks[0][i], tasks[1][i], second_order=False)
        expected = [e + (t - p) / 3 for e, t, p in zip(expected, meta.init, phi)]
    for a, b in zip(result.grads, expected):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-14)
        assert float(tf.reduce_max(tf.abs(b))) > 0


def test_task_loop_averages_per_task_meta_gradients(float64):
    """The in-graph task loop equals the mean of single-task meta-gradients (Eq. 9, Kim et al. 2020)."""
    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=2)
    tasks = classification_tasks(3, 3, 2, 3, (4,))
    est = estimators.get("maml")
    whole = est.meta_gradient(learner, tasks)
    singles = [est.meta_gradient(learner, tuple(t[i:i + 1] for t in tasks)) for i in range(3)]
    for k, g in enumerate(whole.grads):
        mean = sum(s.grads[k] for s in singles) / 3
        np.testing.assert_allclose(g.numpy(), mean.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(float(whole.loss), np.mean([float(s.loss) for s in singles]))


def _op_types(fn) -> set:
    graph_def = fn.get_concrete_function().graph.as_graph_def()
    ops = {n.op for n in graph_def.node}
    for function in graph_def.library.function:
        ops |= {n.op for n in function.node_def}
    return ops


def _maml_grads(model, tasks, *, check_fused=False):
    learner = MetaLearner(model, inner_optimizer=inner_optimizers.momentum(0.3, momentum=0.9), inner_steps=3)
    fn = tf.function(lambda: estimators.get("maml").meta_gradient(learner, tasks).grads)
    if check_fused:  # the float32 conv net really runs the fused op and its second derivative
        assert {"FusedBatchNormV3", "FusedBatchNormGradV3"} <= _op_types(fn)
    return np.concatenate([g.numpy().ravel().astype(np.float64) for g in fn()])


def test_fused_batchnorm_in_the_query_pass_keeps_the_meta_gradient_exact(monkeypatch):
    """The float32 query pass takes FusedBatchNormV3: the MAML meta-gradient (momentum inner
    optimizer, tf.while_loop) must equal the float64 exact-moments one (FD-checked above) to
    float32 round-off. Fused BN inside the inner loop would fail this check (TF 2.21 gets its
    second derivative wrong there: 2.9% off in this setting), and so does stock Keras BN."""
    tasks64 = classification_tasks(2, 3, 2, 3, (6, 6, 1))
    tasks32 = tuple(tf.cast(t, "float32") if t.dtype == tf.float64 else t for t in tasks64)
    model32 = smooth_conv_bn()
    fused = _maml_grads(model32, tasks32, check_fused=True)
    previous, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        model64 = smooth_conv_bn()
        model64.set_weights([w.astype("float64") for w in model32.get_weights()])
        exact = _maml_grads(model64, tasks64)
    finally:
        keras.config.set_floatx(previous)
        keras.config.set_dtype_policy(policy)
    error = np.linalg.norm(fused - exact) / np.linalg.norm(exact)
    assert error < 1e-4, error

    monkeypatch.setattr(functional, "_fused_batch_call",
                        lambda layer, x, training=None, mask=None: type(layer).call(layer, x, training, mask))
    monkeypatch.setattr(functional, "_exact_moments", lambda layer, x, mask: type(layer)._moments(layer, x, mask))
    stock = _maml_grads(smooth_conv_bn(), tasks32)
    assert np.linalg.norm(stock - exact) / np.linalg.norm(exact) > 1e-2
