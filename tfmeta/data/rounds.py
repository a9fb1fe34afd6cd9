"""Samplers for trajectory shifting's rounds: the same task in row t for a whole round.

Continual trajectory shifting (:mod:`tfmeta.estimators.shifting`) keeps one task learner per row
of the meta-batch for a round of K * M meta-steps, so the sampler must give row t the same task
during a round: :class:`RoundTasks` wraps any episodic sampler that way, :class:`ManyShotTasks`
gives every row a whole labelled dataset (Shin et al. 2021, Sec. 4.2).

References:
    Shin, J., Lee, H. B., Gong, B., Hwang, S. J. "Large-Scale Meta-Learning with Continual
    Trajectory Shifting." ICML 2021. arXiv:2102.07215.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfmeta.data.episodes import TaskBatch, check_index, check_positive_int, make_dataset

__all__ = ["RoundTasks", "ManyShotTasks"]


class RoundTasks:
    """Keep each meta-batch for a whole round, so task learner t keeps task t (Algorithm 2).

    ``sample(index) = base.sample(index // length)``: with ``length = horizon * repeats`` every
    round of the shifting estimator trains its T task learners on one fixed batch of T tasks (the
    paper's setting: a fixed set of tasks), and the next round draws new tasks. Any sampler with
    ``sample``/``specs`` works (episodic Omniglot, sinusoid, synthetic2d); the other attributes
    are the base sampler's.

    Example:
        >>> sampler = RoundTasks(SinusoidTasks(meta_batch=4), length=300)
        >>> bool((sampler.sample(0).support_x == sampler.sample(299).support_x).all())
        True
    """

    def __init__(self, base, length: int):
        self.base = base
        self.length = check_positive_int("length", length)

    def sample(self, index: int) -> TaskBatch:
        return self.base.sample(check_index(index) // self.length)

    @property
    def specs(self) -> TaskBatch:
        return self.base.specs

    def dataset(self, start: int = 0) -> tf.data.Dataset:
        """Endless deterministic dataset: ``sample(start), sample(start + 1), ...``."""
        return make_dataset(self.sample, self.specs, start)

    def __getattr__(self, name):
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"RoundTasks({self.base!r}, length={self.length})"


class ManyShotTasks:
    """Many-shot heterogeneous tasks: task t is a whole labelled dataset (Shin et al. 2021, Sec. 4.2).

    Every ``sample(index)`` has one row per dataset, in the same order (task learner t always
    trains on dataset t, as Algorithm 2 needs): ``shots`` random examples of dataset t as the
    support minibatch of this inner step and ``query`` others as the query minibatch, with the
    dataset's own labels 0..C_t-1. The model's head needs :attr:`ways` = max C_t outputs; with
    ``task_specific="head"`` each task learner keeps its own head, as in the paper.

    Args:
        datasets: a sequence of ``(inputs [N_t, *features], integer labels [N_t])``.
        shots: support examples per task and step (the inner minibatch).
        query: query examples per task and step.
        seed: base seed; batches are a pure function of (seed, index).

    Example (each Omniglot alphabet of the train split as one many-way task)::

        images, labels = load_omniglot(data_dir)["train"]
        sizes = [4 * n for n in characters_per_alphabet]   # class ids are grouped by alphabet
        tasks = ManyShotTasks.from_label_ranges(images, labels, sizes, shots=32, query=32)
    """

    task_type = "classification"

    def __init__(self, datasets, *, shots=32, query=32, seed=0):
        self.shots = check_positive_int("shots", shots)
        self.query = check_positive_int("query", query)
        self.seed = check_index(seed, "seed")
        self._data = []
        for t, (x, y) in enumerate(datasets):
            x, y = np.asarray(x, np.float32), np.asarray(y)
            if y.ndim != 1 or len(y) != len(x) or not len(y) or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(
                    f"datasets[{t}] must be (inputs [N, ...], integer labels [N]) with N >= 1, got "
                    f"inputs {x.shape} and labels {y.shape} of dtype {y.dtype}."
                )
            if self._data and x.shape[1:] != self._data[0][0].shape[1:]:
                raise ValueError(
                    f"datasets[{t}] has inputs of shape {x.shape[1:]}, datasets[0] {self._data[0][0].shape[1:]}: "
                    "all tasks must share the input shape."
                )
            _, local = np.unique(y, return_inverse=True)
            self._data.append((x, local.astype(np.int32)))
        if not self._data:
            raise ValueError("datasets is empty: expected at least one (inputs, labels) pair.")
        self.meta_batch = len(self._data)
        self.feature_shape = tuple(self._data[0][0].shape[1:])
        self.classes = tuple(int(y.max()) + 1 for _, y in self._data)
        self.ways = max(self.classes)

    @classmethod
    def from_label_ranges(cls, inputs, labels, sizes, **kwargs) -> "ManyShotTasks":
        """Split one labelled array into tasks by consecutive class-id ranges of the given sizes."""
        labels = np.asarray(labels)
        edges = np.cumsum([0] + [check_positive_int("sizes", s) for s in sizes])
        datasets = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            rows = (labels >= lo) & (labels < hi)
            datasets.append((np.asarray(inputs)[rows], labels[rows]))
        return cls(datasets, **kwargs)

    @property
    def specs(self) -> TaskBatch:
        m, f = self.meta_batch, self.feature_shape
        return TaskBatch(
            tf.TensorSpec((m, self.shots) + f, tf.float32), tf.TensorSpec((m, self.shots), tf.int32),
            tf.TensorSpec((m, self.query) + f, tf.float32), tf.TensorSpec((m, self.query), tf.int32),
        )

    def sample(self, index: int) -> TaskBatch:
        """Minibatch ``index`` of every task (numpy): row t from dataset t."""
        rng = np.random.default_rng([self.seed, check_index(index)])
        fields = [[], [], [], []]
        for x, y in self._data:
            n = len(y)
            rows = rng.choice(n, self.shots + self.query, replace=n < self.shots + self.query)
            s, q = rows[: self.shots], rows[self.shots :]
            for field, value in zip(fields, (x[s], y[s], x[q], y[q])):
                field.append(value)
        return TaskBatch(*(np.stack(f) for f in fields))

    def dataset(self, start: int = 0) -> tf.data.Dataset:
        """Endless deterministic dataset: ``sample(start), sample(start + 1), ...``."""
        return make_dataset(self.sample, self.specs, start)

    def __repr__(self) -> str:
        return f"ManyShotTasks(classes={list(self.classes)}, shots={self.shots}, query={self.query}, seed={self.seed})"
