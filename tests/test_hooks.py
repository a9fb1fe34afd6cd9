"""Estimator hooks instead of special cases, one source of defaults, one validation vocabulary,
one atomic write (docs/architecture.md)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import classification_tasks, small_dense
from tfmeta import estimators
from tfmeta.app.autometa.config import SearchConfig
from tfmeta.app.config import DATASET_DEFAULTS, RunConfig, build_estimator, build_sampler
from tfmeta.core import checks, files
from tfmeta.core.learner import MetaLearner
from tfmeta.data.rounds import RoundTasks
from tfmeta.estimators import base
from tfmeta.estimators.base import Estimator, Flag, StepState
from tfmeta.estimators.maml import MAML


@pytest.fixture
def registry():
    """Register test estimators for one test only."""
    before = dict(base._REGISTRY)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(before)


# -- one source of defaults ------------------------------------------------------------------------
@pytest.mark.parametrize("name, rate", [("adam", 1e-3), ("sgd", 0.4), ("momentum", 0.4)])
def test_an_inner_optimizer_by_name_gets_its_own_default_learning_rate(name, rate):
    """MetaLearner(inner_optimizer="adam") used to get SGD's 0.4: inner_lr was always passed."""
    learner = MetaLearner(small_dense(), inner_optimizer=name)
    assert learner.inner_optimizer.learning_rate == rate
    assert MetaLearner(small_dense(), inner_optimizer=name, inner_lr=0.05).inner_optimizer.learning_rate == 0.05


def test_the_search_reads_the_shared_defaults_from_the_run_configuration():
    search, omniglot, run = SearchConfig(), DATASET_DEFAULTS["omniglot"], RunConfig()
    for name in ("ways", "shots", "inner_steps", "inner_lr", "inner_optimizer"):
        assert getattr(search, name) == omniglot[name], name
    assert (search.meta_lr, search.seed) == (run.meta_lr, run.seed)


# -- every estimator takes the common options; flags agree with constructors -----------------------
@pytest.mark.parametrize("name", estimators.names())
def test_every_estimator_takes_the_common_options(name):
    est = estimators.get(name, parallel_tasks=1, linearity_metrics=False)
    assert (est.parallel_tasks, est.linearity_metrics) == (1, False)


def test_linearity_metrics_is_a_constructor_option_of_implicit_too():
    """get("implicit", linearity_metrics=True) used to raise TypeError (config.py set an attribute)."""
    assert estimators.get("implicit", linearity_metrics=True).linearity_metrics is True
    config = RunConfig(estimator="implicit", linearity_metrics=True).resolved()
    assert build_estimator(config).linearity_metrics is True


def test_a_flag_must_carry_its_constructors_default(registry):
    class Drifted(Estimator):
        name = "_drifted"
        flags = (Flag("zeta", float, 2.0, "a flag whose default drifted from the constructor's"),)

        def __init__(self, zeta: float = 1.0, **common):
            super().__init__(**common)

        def task_gradient(self, learner, meta_values, task):
            raise NotImplementedError

    with pytest.raises(TypeError, match="flag 'zeta' has default 2.0, the constructor 1.0"):
        estimators.register(Drifted)


def test_two_estimators_may_not_give_one_flag_two_meanings(registry):
    def estimator(name, default):
        class One(Estimator):
            flags = (Flag("zeta", float, default, "zeta"),)

            def __init__(self, zeta: float = default, **common):
                super().__init__(**common)

            def task_gradient(self, learner, meta_values, task):
                raise NotImplementedError

        One.name = name
        return estimators.register(One)

    estimator("_zeta_a", 1.0)
    estimator("_zeta_b", 1.0)  # the same meaning: one flag
    assert [f.name for f in estimators.all_flags()].count("zeta") == 1
    estimator("_zeta_c", 3.0)
    with pytest.raises(ValueError, match=r"--zeta is declared by estimators '_zeta_a'.*'_zeta_c'"):
        estimators.all_flags()


# -- prepare_sampler instead of checks on estimator names ------------------------------------------
def test_the_training_sampler_comes_from_the_estimators_hook(registry):
    shifting = RunConfig(estimator="shifting", estimator_options={"horizon": 2, "repeats": 3}).resolved()
    sampler = build_sampler(shifting, "train")
    assert isinstance(sampler, RoundTasks) and sampler.length == 6
    assert not isinstance(build_sampler(shifting, "val"), RoundTasks)
    assert not isinstance(build_sampler(RunConfig().resolved(), "train"), RoundTasks)

    @estimators.register
    class EveryOther(MAML):  # a new estimator: nothing outside this class names it
        name = "_every_other"

        def prepare_sampler(self, sampler):
            return RoundTasks(sampler, 2)

    sampler = build_sampler(RunConfig(estimator="_every_other").resolved(), "train")
    assert isinstance(sampler, RoundTasks) and sampler.length == 2


# -- per-task state through the task loop's hooks ---------------------------------------------------
class _Visits(MAML):
    """MAML plus a per-task counter kept across meta-steps: the hook shape of an estimator with
    per-task state (begin_step -> rows, task_step -> the task's new row, end_step stores them)."""

    name = ""

    def __init__(self):
        super().__init__()
        self.visits = tf.Variable(tf.zeros([0], tf.float64), shape=[None])

    def metric_names(self, learner):
        return tuple(learner.metric_names) + ("visits",)

    def begin_step(self, learner, meta_values, tasks):
        count = tf.shape(tasks.support_x)[0]
        rows = tf.cond(tf.equal(tf.size(self.visits), count), lambda: self.visits.read_value(),
                       lambda: tf.zeros([count], tf.float64))
        return StepState(shared=tf.constant(1.0, tf.float64), rows=[rows], outputs=[rows])

    def task_step(self, learner, meta_values, task, shared, row):
        loss, grads, metrics = self.task_gradient(learner, meta_values, task)
        visits = row[0] + shared
        return loss, grads, dict(metrics, visits=visits), [visits]

    def end_step(self, learner, meta_values, state, outputs, after):
        with tf.control_dependencies([after]):
            self.visits.assign(outputs[0])


def test_an_estimator_keeps_per_task_state_through_the_hooks(float64):
    learner = MetaLearner(small_dense(), inner_lr=0.5, inner_steps=2)
    tasks = classification_tasks(3, 3, 2, 3, (4,))
    visits, maml = _Visits(), MAML()
    step = tf.function(lambda: visits.meta_gradient(learner, tasks))
    for k in range(1, 4):
        result = step()
        np.testing.assert_array_equal(visits.visits.numpy(), [k, k, k])
        assert float(result.metrics["visits"]) == k
    expected = maml.meta_gradient(learner, tasks)  # the loop's mean is MAML's, untouched
    np.testing.assert_allclose(float(result.loss), float(expected.loss), rtol=1e-12)
    for g, e in zip(result.grads, expected.grads):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-12, atol=1e-15)


# -- one validation vocabulary, one atomic write ----------------------------------------------------
@pytest.mark.parametrize("check, message", [
    (lambda: checks.integer("shots", 0, 1), "shots=0 is not valid: expected an integer >= 1."),
    (lambda: checks.integer("seed", True), "seed=True is not valid: expected an integer >= 0."),
    (lambda: checks.number("beta", float("nan"), at_least=0.0),
     "beta=nan is not valid: expected a finite number >= 0."),
    (lambda: checks.number("momentum", 1.0, at_least=0.0, below=1.0),
     "momentum=1.0 is not valid: expected a number in [0, 1)."),
    (lambda: checks.boolean("accurate", "yes"), "accurate='yes' is not valid: expected True or False."),
    (lambda: checks.choice("shift_grad", "maml", ("reptile", "fomaml")),
     "shift_grad='maml' is not valid: expected one of ('reptile', 'fomaml')."),
])
def test_checks_name_the_argument_and_what_was_expected(check, message):
    with pytest.raises(ValueError) as err:
        check()
    assert str(err.value) == message


def test_write_json_leaves_the_old_file_whole_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    files.write_json(str(path), {"seed": 0})
    before = hashlib.sha256(path.read_bytes()).hexdigest()

    def broken(value, f, **kwargs):
        f.write('{"seed": ')  # half a file, then the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken)
    with pytest.raises(OSError, match="disk full"):
        files.write_json(str(path), {"seed": 1})
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
