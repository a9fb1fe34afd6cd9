"""Estimator state that stays on the replica that uses it, and checkpoints as one global state.

Under a `tf.distribute` strategy every replica runs its own share of a meta-batch's tasks. An
estimator that keeps state per task (the task learners of trajectory shifting,
:mod:`tfmeta.estimators.shifting`) must keep each task's state on the replica that runs the task,
without communicating it every step. Two pieces do that:

- :func:`replica_variable`: a `tf.Variable` each replica holds for itself
  (``synchronization=ON_READ``). Read and assigned inside a replica (the meta-step), it is that
  replica's own copy; no all-reduce is ever made for it. Read across replicas it is replica 0's
  value, so state that is identical on every replica (a step counter, the last meta-parameters)
  checkpoints as usual and restores into every replica.
- :class:`TaskRows`: variables whose leading axis is tasks, each replica holding the rows of its
  own tasks (replica r runs tasks ``r * M/R ... (r + 1) * M/R - 1`` of a meta-batch of M, the
  order in which tf.distribute splits a batch). A checkpoint stores the **global** rows, gathered
  in replica order (`Strategy.gather`, collective across workers), and restoring splits them again
  over the replicas present then, so a run checkpointed with R replicas resumes with any R' that
  divides M (including no strategy at all).

Without a strategy both are plain variables.

Example:
    >>> with strategy.scope():
    ...     theta = replica_variable(tf.zeros([0, 10]), shape=[None, 10], name="theta")
    ...     rows = TaskRows([theta])
    >>> tf.train.Checkpoint(rows=rows).save(path)   # the rows of every replica, in task order
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

__all__ = ["replica_variable", "TaskRows"]


def replica_variable(initial_value, *, shape=None, name: str | None = None) -> tf.Variable:
    """A non-trainable variable that every replica keeps for itself (see module docstring).

    Create it in the strategy's scope (outside any replica function). `shape` may leave the
    leading axis unknown (``[None, ...]``) so replicas can hold different numbers of rows.
    """
    return tf.Variable(
        initial_value,
        shape=None if shape is None else tf.TensorShape(shape),
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


def _distributed(variable) -> bool:
    return isinstance(variable, tf.distribute.DistributedValues)


class TaskRows(tf.__internal__.tracking.Trackable):
    """Per-task variables split over replicas by rows, checkpointed as the global rows.

    Args:
        variables: :func:`replica_variable` s of shape ``[None, ...]`` (leading axis: tasks),
            created under the strategy that will run them.
        strategy: that strategy (default: the current one).

    Example:
        >>> rows = TaskRows([theta, velocity])
        >>> [t.shape for t in rows.global_values()]       # every replica's rows, in task order
        [TensorShape([8, 10]), TensorShape([8, 10])]
        >>> rows.assign_global(values)                    # split again over the replicas
    """

    def __init__(self, variables: Sequence[tf.Variable], strategy: tf.distribute.Strategy | None = None):
        self._variables = list(variables)
        self._strategy = strategy or tf.distribute.get_strategy()
        self._gather = None

    @property
    def variables(self) -> list[tf.Variable]:
        return list(self._variables)

    def global_values(self) -> list[tf.Tensor]:
        """Every replica's rows concatenated in replica order (collective across workers)."""
        if not any(_distributed(v) for v in self._variables):
            return [v.read_value() for v in self._variables]
        components = self._strategy.experimental_local_results(self._variables[0]) if self._variables else ()
        if tf.executing_eagerly() and all(int(tf.shape(v)[0]) == 0 for v in components):
            # Nothing stored yet (e.g. a fresh state being restored into): an all-gather of
            # empty tensors crashes TensorFlow's collectives, and there is nothing to gather.
            return [tf.zeros([0] + v.shape.as_list()[1:], v.dtype) for v in self._variables]
        if self._gather is None:  # one all-gather of every variable, compiled once

            def gather():
                def local():
                    values = [v.read_value() for v in self._variables]
                    return tf.distribute.get_replica_context().all_gather(values, axis=0)

                return self._strategy.experimental_local_results(self._strategy.run(local))[0]

            self._gather = tf.function(gather, autograph=False)
        return list(self._gather())

    def assign_global(self, values: Sequence) -> None:
        """Give replica r rows ``r * n ... (r + 1) * n - 1`` of every value (n = rows / replicas)."""
        if len(values) != len(self._variables):
            raise ValueError(f"values: expected {len(self._variables)} tensors, got {len(values)}.")
        values = [tf.convert_to_tensor(x, v.dtype) for x, v in zip(values, self._variables)]
        strategy = self._strategy
        replicas = strategy.num_replicas_in_sync
        for x in values:
            rows = x.shape[0]  # static here (checkpoints restore eagerly); unknown: not checked
            if rows is not None and rows % replicas:
                raise ValueError(
                    f"the saved state holds {rows} task rows, which cannot be split evenly over "
                    f"{replicas} replicas: resume with a replica count that divides {rows}."
                )
        if not any(_distributed(v) for v in self._variables):
            for v, x in zip(self._variables, values):
                v.assign(x)
            return

        def put(*values):
            context = tf.distribute.get_replica_context()
            n = tf.shape(values[0])[0] // context.num_replicas_in_sync if values else 0
            start = context.replica_id_in_sync_group * n
            for v, x in zip(self._variables, values):
                v.assign(x[start : start + n])

        strategy.run(put, args=tuple(values))

    # -- tf.train.Checkpoint ---------------------------------------------------------------------
    def _serialize_to_tensors(self):
        return {f"rows_{j}": x for j, x in enumerate(self.global_values())}

    def _restore_from_tensors(self, restored_tensors):
        self.assign_global([restored_tensors[f"rows_{j}"] for j in range(len(self._variables))])
        return tf.no_op()
