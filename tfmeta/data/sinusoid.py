"""Sinusoid regression tasks (Finn et al., 2017, "Model-Agnostic Meta-Learning").

Each task is ``y = A * sin(x - phase)`` with amplitude ``A ~ U[0.1, 5]``, phase
``~ U[0, pi]`` and inputs ``x ~ U[-5, 5]``. A meta-batch holds ``meta_batch`` tasks,
each with ``shots`` support points and ``query`` query points (disjoint draws).

Batches are a pure function of ``(seed, split, index)``; the ``split`` ("train",
"val", "test") selects an independent random stream so the splits' tasks differ.

Example:
    >>> tasks = SinusoidTasks(shots=5, query=10, meta_batch=2, seed=0)
    >>> batch = tasks.sample(0)
    >>> batch.support_x.shape, batch.query_y.shape
    ((2, 5, 1), (2, 10, 1))
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfmeta.data.episodes import TaskBatch, check_index, check_positive_int, make_dataset

__all__ = ["SinusoidTasks", "AMPLITUDE_RANGE", "PHASE_RANGE", "INPUT_RANGE"]

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, np.pi)
INPUT_RANGE = (-5.0, 5.0)
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


class SinusoidTasks:
    """Meta-batches of sinusoid regression tasks with the EpisodeSampler interface.

    Args:
        shots: support points per task.
        query: query points per task.
        meta_batch: tasks per meta-batch.
        seed: base seed (integer >= 0).
        split: "train", "val" or "test"; each gives an independent task stream.

    Example:
        >>> tasks = SinusoidTasks(shots=10, meta_batch=4, split="val")
        >>> amplitudes, phases = tasks.task_parameters(0)
        >>> amplitudes.shape
        (4,)
    """

    task_type = "regression"
    ways = 1
    feature_shape = (1,)

    def __init__(self, *, shots=5, query=10, meta_batch=25, seed=0, split="train"):
        self.shots = check_positive_int("shots", shots)
        self.query = check_positive_int("query", query)
        self.meta_batch = check_positive_int("meta_batch", meta_batch)
        self.seed = check_index(seed, "seed")
        if split not in SPLIT_STREAMS:
            raise ValueError(f"split must be one of {tuple(SPLIT_STREAMS)}, got split={split!r}")
        self.name = split

    @property
    def specs(self) -> TaskBatch:
        """TaskBatch of ``tf.TensorSpec`` describing one meta-batch."""
        m = self.meta_batch
        s = tf.TensorSpec((m, self.shots, 1), tf.float32)
        q = tf.TensorSpec((m, self.query, 1), tf.float32)
        return TaskBatch(s, s, q, q)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_STREAMS[self.name], check_index(index)])

    def _draw(self, index: int):
        """Amplitudes [M], phases [M] (float64) and inputs [M, shots+query, 1] of batch ``index``."""
        rng = self._rng(index)
        amplitudes = rng.uniform(*AMPLITUDE_RANGE, size=self.meta_batch)
        phases = rng.uniform(*PHASE_RANGE, size=self.meta_batch)
        x = rng.uniform(*INPUT_RANGE, size=(self.meta_batch, self.shots + self.query, 1))
        return amplitudes, phases, x

    def task_parameters(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(amplitudes, phases)``, each float64 [meta_batch], of the tasks in ``sample(index)``.

        Example:
            >>> a, p = SinusoidTasks(meta_batch=3).task_parameters(5)
            >>> bool(((a >= 0.1) & (a <= 5)).all())
            True
        """
        amplitudes, phases, _ = self._draw(index)
        return amplitudes, phases

    def sample(self, index: int) -> TaskBatch:
        """The meta-batch at position ``index`` (float32 numpy arrays).

        Example:
            >>> SinusoidTasks(shots=3, query=4, meta_batch=2).sample(0).query_x.shape
            (2, 4, 1)
        """
        amplitudes, phases, x = self._draw(index)
        y = amplitudes[:, None, None] * np.sin(x - phases[:, None, None])
        x, y = x.astype(np.float32), y.astype(np.float32)
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def dataset(self, start: int = 0) -> tf.data.Dataset:
        """Endless deterministic dataset of TaskBatch tensors for ``start, start+1, ...``.

        Example:
            >>> ds = SinusoidTasks(meta_batch=2).dataset(start=3)
            >>> next(iter(ds)).support_y.shape
            TensorShape([2, 5, 1])
        """
        return make_dataset(self.sample, self.specs, start)

    def __repr__(self) -> str:
        return (
            f"SinusoidTasks(split={self.name!r}, shots={self.shots}, query={self.query}, "
            f"meta_batch={self.meta_batch}, seed={self.seed})"
        )
