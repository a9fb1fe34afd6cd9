"""Shared types of the meta-learning step: one task, and what a meta-gradient returns.

Every layer above the core speaks these: estimators take a :class:`Task` per iteration of their
task loop and return a :class:`MetaGradient`; evaluation scores a :class:`Task`; the linearity
metrics (:mod:`tfmeta.core.linearity`) measure one.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


class MetaGradient(NamedTuple):
    """Mean query loss after adaptation, meta-gradients, and mean metrics over the tasks."""

    loss: tf.Tensor
    grads: list
    metrics: dict


class Task(NamedTuple):
    """One task's support and query sets (an element of a TaskBatch)."""

    support_x: tf.Tensor
    support_y: tf.Tensor
    query_x: tf.Tensor
    query_y: tf.Tensor
