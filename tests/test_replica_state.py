"""tfmeta.core.replica_state: per-replica task rows checkpoint as global rows and restore exactly.

The two-replica case (rows split over logical CPU devices, checkpoints moved between strategies)
runs in a subprocess in tests/test_distribute.py; here the same code paths with one replica.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfmeta.core.replica_state import TaskRows, replica_variable


def _rows(strategy):
    with strategy.scope():
        theta = replica_variable(tf.zeros([0, 3]), shape=[None, 3], name="theta")
        velocity = replica_variable(tf.zeros([0, 2, 2], tf.float64), shape=[None, 2, 2], name="velocity")
    return TaskRows([theta, velocity], strategy)


@pytest.mark.parametrize("make", [tf.distribute.get_strategy, lambda: tf.distribute.MirroredStrategy(["/cpu:0"])],
                         ids=["default", "mirrored-1"])
def test_rows_round_trip_through_a_checkpoint(tmp_path, make):
    strategy = make()
    rows = _rows(strategy)
    assert [int(x.shape[0]) for x in rows.global_values()] == [0, 0]  # nothing stored yet
    rng = np.random.default_rng(0)
    values = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 2, 2))]
    rows.assign_global(values)
    for got, want in zip(rows.global_values(), values):
        np.testing.assert_array_equal(got.numpy(), want)
    path = tf.train.Checkpoint(rows=rows).save(str(tmp_path / "ckpt"))

    fresh = _rows(make())
    tf.train.Checkpoint(rows=fresh).restore(path).assert_existing_objects_matched()
    for got, want in zip(fresh.global_values(), values):
        np.testing.assert_array_equal(got.numpy(), want)
    # the checkpoint holds the rows themselves, not a per-replica copy
    shapes = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    assert sorted(s for k, s in shapes.items() if k.startswith("rows/")) == [[4, 2, 2], [4, 3]]


def test_wrong_number_of_values_is_refused():
    rows = _rows(tf.distribute.get_strategy())
    with pytest.raises(ValueError, match="values: expected 2 tensors, got 1"):
        rows.assign_global([np.zeros((1, 3), np.float32)])
