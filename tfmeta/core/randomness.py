"""Seeded randomness for random layers (Dropout, GaussianNoise, ...) inside meta-learning graphs.

Keras layers draw their random numbers from a ``keras.random.SeedGenerator`` whose state is a
non-trainable variable. `keras.Model.stateless_call` takes that state as an input and returns the
advanced state; :class:`~tfmeta.core.functional.FunctionalModel` must therefore supply a fresh state to
every call, or every call would draw the same dropout mask.

It does so from a **seed scope**: an int64 seed tensor [2] that the meta-learning loops derive
from one another with `tf.random.experimental.stateless_fold_in`, so that randomness is fresh
everywhere yet a function of one seed:

- a meta-step: :meth:`MetaModel.train_step <tfmeta.training.keras_model.MetaModel.train_step>` opens a
  scope seeded by (the model's initial SeedGenerator state, the meta-step counter), so a run is
  reproducible from its seed and resumes with the same masks;
- a task: the task loops fold in the task index (and the replica id under tf.distribute);
- an inner gradient evaluation: :func:`tfmeta.core.inner_loop.run` folds in the step index;
- a model call: each `FunctionalModel` call within one scope folds in a call counter, then one
  value per SeedGenerator of the model.

Seeds are integers, so nothing here is differentiated: a meta-gradient is exact for the masks its
forward pass drew (backpropagation reuses them). Under a fixed scope seed the masks are fixed,
which is what a finite-difference check needs.

Without any scope (a plain call of a `FunctionalModel`), the call reads the model's own
SeedGenerator states and writes the advanced states back, as a plain Keras model does: fresh
masks on every call.

Example:
    >>> with tfmeta.core.randomness.scope([1, 2]):          # reproducible masks
    ...     result = estimator.meta_gradient(learner, tasks)
"""

from __future__ import annotations

import contextlib
import threading

import tensorflow as tf

_LOCAL = threading.local()


class _Scope:
    def __init__(self, seed: tf.Tensor):
        self.seed = seed
        self.calls = 0


def _stack() -> list:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def active() -> bool:
    """Whether a seed scope is open (in this thread)."""
    return bool(_stack())


def as_seed(seed) -> tf.Tensor:
    """`seed` (an int, or two ints, or such a tensor) as an int64 tensor of shape [2]."""
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank == 0:
        seed = tf.stack([tf.zeros([], seed.dtype), seed])
    if seed.shape.rank != 1 or seed.shape[0] != 2 or not seed.dtype.is_integer:
        raise ValueError(f"seed={seed!r} is not valid: expected an integer or two integers.")
    return tf.cast(seed, tf.int64)


def fold_in(seed: tf.Tensor, data) -> tf.Tensor:
    """A new seed from `seed` and an integer (scalar tensor or int): deterministic, distinct."""
    data = tf.cast(data, tf.int64)
    return tf.cast(tf.random.experimental.stateless_fold_in(seed, data), tf.int64)


@contextlib.contextmanager
def scope(seed):
    """Run the enclosed calls under `seed` (see module docstring)."""
    stack = _stack()
    stack.append(_Scope(as_seed(seed)))
    try:
        yield
    finally:
        stack.pop()


@contextlib.contextmanager
def fold(data):
    """A sub-scope seeded by ``fold_in(current seed, data)``; does nothing when no scope is open.

    The loops call it with their counter (task index, inner step), so that iterations of one
    traced loop body draw different randomness.
    """
    stack = _stack()
    if not stack:
        yield
        return
    with scope(fold_in(stack[-1].seed, data)):
        yield


def next_seed() -> tf.Tensor | None:
    """The seed for one model call in the current scope (None without a scope)."""
    stack = _stack()
    if not stack:
        return None
    top = stack[-1]
    seed = fold_in(top.seed, top.calls)
    top.calls += 1
    return seed


def replica_fold():
    """:func:`fold` with the replica id under a multi-replica strategy; otherwise nothing."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return contextlib.nullcontext()
    return fold(context.replica_id_in_sync_group)
