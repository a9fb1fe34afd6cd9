"""Few-shot classification episodes drawn from class-labelled arrays.

An *episode* (task) draws ``ways`` distinct classes, gives them the episode labels
``0..ways-1`` through a fresh random permutation, and splits ``shots + query``
distinct examples of each class into a support set (``shots`` per class) and a
disjoint query set (``query`` per class). ``meta_batch`` episodes are stacked into
one :class:`TaskBatch`.

Batches are a pure function of ``(seed, index)``: ``sample(i)`` always returns the
same arrays, so a run can resume from any position with ``dataset(start=i)``.

Example:
    >>> import numpy as np
    >>> images = np.random.rand(60, 8, 8, 1).astype("float32")
    >>> labels = np.repeat(np.arange(6), 10)
    >>> sampler = EpisodeSampler(images, labels, ways=3, shots=1, query=2, meta_batch=4)
    >>> batch = sampler.sample(0)
    >>> batch.support_x.shape, batch.support_y.shape, batch.query_x.shape
    ((4, 3, 8, 8, 1), (4, 3), (4, 6, 8, 8, 1))
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import tensorflow as tf

from tfmeta.core import checks

__all__ = ["TaskBatch", "EpisodeSampler", "check_positive_int", "check_index", "make_dataset"]


class TaskBatch(NamedTuple):
    """A meta-batch of ``M`` tasks.

    Classification: ``support_x`` [M, ways*shots, *feature_shape] float32,
    ``support_y`` [M, ways*shots] int32 in ``[0, ways)``; ``query_x``/``query_y``
    likewise with ``ways*query`` examples. Regression: ``support_x``/``support_y``
    [M, shots, 1] float32 and ``query_x``/``query_y`` [M, query, 1] float32.

    Example:
        >>> TaskBatch(*range(4)).query_x
        2
    """

    support_x: Any
    support_y: Any
    query_x: Any
    query_y: Any


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int, or raise ValueError unless it is an integer >= 1.

    Example:
        >>> check_positive_int("shots", 5)
        5
    """
    return checks.integer(name, value, 1)


def check_index(index: Any, name: str = "index") -> int:
    """Return ``index`` as an int, or raise ValueError unless it is an integer >= 0.

    Example:
        >>> check_index(np.int64(3))
        3
    """
    return checks.integer(name, index, 0)


def make_dataset(
    sample: Callable[[int], TaskBatch],
    specs: TaskBatch,
    start: int = 0,
) -> tf.data.Dataset:
    """Endless, deterministic ``tf.data.Dataset`` of ``sample(start), sample(start+1), ...``.

    ``specs`` is a TaskBatch of ``tf.TensorSpec`` giving each field's static shape and dtype.

    Example:
        >>> ds = make_dataset(sampler.sample, sampler.specs, start=10)  # doctest: +SKIP
    """
    start = check_index(start, "start")
    dtypes = [spec.dtype for spec in specs]

    def _numpy_sample(i):
        return [np.asarray(a, dtype=d.as_numpy_dtype) for a, d in zip(sample(int(i)), dtypes)]

    def _to_batch(i):
        fields = tf.numpy_function(_numpy_sample, [i], dtypes, stateful=False)
        for field, spec in zip(fields, specs):
            field.set_shape(spec.shape)
        return TaskBatch(*fields)

    indices = tf.data.Dataset.range(start, np.iinfo(np.int64).max)
    # plain TensorFlow already: AutoGraph would only spend time converting it
    ds = indices.map(tf.autograph.experimental.do_not_convert(_to_batch),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _check_labels(images: np.ndarray, labels: Any, name: str) -> np.ndarray:
    """Validate ``labels`` against ``images`` and return it as a 1-D int64 array."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must be 1-D with the same length as images ({images.shape[0]}) in split "
            f"{name!r}, got labels with shape {labels.shape}"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids in split {name!r}, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def _group_by_class(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sorted class ids and, for each, the row indices holding it."""
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
    return classes, np.split(order, bounds)


class EpisodeSampler:
    """Samples N-way K-shot classification meta-batches from one data split.

    Args:
        images: float32 array [N, *feature_shape] (e.g. [N, H, W, C]).
        labels: int array [N] of arbitrary class ids.
        ways, shots, query, meta_batch: episode geometry (all integers >= 1).
        seed: base seed; ``sample(i)`` depends only on ``(seed, i)``.
        name: split name, used in error messages.

    Example:
        >>> sampler = EpisodeSampler(images, labels, ways=5, shots=1, query=15,
        ...                          meta_batch=4, name="train")  # doctest: +SKIP
        >>> batch = next(iter(sampler.dataset(start=100)))  # same as sampler.sample(100)  # doctest: +SKIP
    """

    task_type = "classification"

    def __init__(self, images, labels, *, ways, shots, query, meta_batch, seed=0, name="split"):
        self._ways = check_positive_int("ways", ways)
        self._shots = check_positive_int("shots", shots)
        self._query = check_positive_int("query", query)
        self._meta_batch = check_positive_int("meta_batch", meta_batch)
        self._seed = check_index(seed, "seed")
        self.name = str(name)
        images = np.asarray(images, dtype=np.float32)
        if images.ndim < 2 or images.shape[0] == 0:
            raise ValueError(
                f"images must be a non-empty array [N, *feature_shape]: split {self.name!r} is empty "
                f"(images shape {images.shape})"
            )
        self._images = images
        self._labels = _check_labels(images, labels, self.name)
        self._classes, self._class_rows = _group_by_class(self._labels)
        self._check_geometry()

    def _check_geometry(self) -> None:
        """Raise ValueError if the split cannot supply one episode."""
        if self._ways > len(self._classes):
            raise ValueError(
                f"ways={self._ways} but split {self.name!r} has only {len(self._classes)} classes"
            )
        sizes = np.array([len(rows) for rows in self._class_rows])
        smallest = int(sizes.min())
        need = self._shots + self._query
        if need > smallest:
            cls = self._classes[int(sizes.argmin())]
            raise ValueError(
                f"shots + query = {self._shots} + {self._query} = {need} but class {cls} of split "
                f"{self.name!r} has only {smallest} examples (expected shots + query <= {smallest})"
            )

    # -- properties -------------------------------------------------------------------------
    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(28, 28, 1)``."""
        return tuple(self._images.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of distinct classes in this split."""
        return len(self._classes)

    @property
    def ways(self) -> int:
        return self._ways

    @property
    def shots(self) -> int:
        return self._shots

    @property
    def query(self) -> int:
        return self._query

    @property
    def meta_batch(self) -> int:
        return self._meta_batch

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def specs(self) -> TaskBatch:
        """TaskBatch of ``tf.TensorSpec`` describing one meta-batch."""
        m, n_s, n_q = self._meta_batch, self._ways * self._shots, self._ways * self._query
        return TaskBatch(
            tf.TensorSpec((m, n_s, *self.feature_shape), tf.float32),
            tf.TensorSpec((m, n_s), tf.int32),
            tf.TensorSpec((m, n_q, *self.feature_shape), tf.float32),
            tf.TensorSpec((m, n_q), tf.int32),
        )

    # -- sampling -----------------------------------------------------------------------------
    def _episode_rows(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Row indices [ways, shots] and [ways, query]; row l holds the class labelled l."""
        chosen = rng.choice(len(self._classes), size=self._ways, replace=False)
        by_label = chosen[rng.permutation(self._ways)]  # per-episode label permutation
        rows = np.stack(
            [rng.choice(self._class_rows[c], self._shots + self._query, replace=False) for c in by_label]
        )
        return rows[:, : self._shots], rows[:, self._shots :]

    def sample(self, index: int) -> TaskBatch:
        """The meta-batch at position ``index`` (numpy arrays), a pure function of (seed, index).

        Example:
            >>> np.array_equal(sampler.sample(3).query_x, sampler.sample(3).query_x)  # doctest: +SKIP
            True
        """
        rng = np.random.default_rng([self._seed, check_index(index)])
        support, query = zip(*(self._episode_rows(rng) for _ in range(self._meta_batch)))
        support, query = np.stack(support), np.stack(query)  # [M, ways, shots|query]
        m = self._meta_batch
        support_y = np.broadcast_to(np.arange(self._ways, dtype=np.int32)[:, None], support.shape[1:])
        query_y = np.broadcast_to(np.arange(self._ways, dtype=np.int32)[:, None], query.shape[1:])
        return TaskBatch(
            self._images[support.reshape(m, -1)],
            np.tile(support_y.reshape(1, -1), (m, 1)),
            self._images[query.reshape(m, -1)],
            np.tile(query_y.reshape(1, -1), (m, 1)),
        )

    def dataset(self, start: int = 0) -> tf.data.Dataset:
        """Endless dataset of TaskBatch tensors for indices ``start, start+1, ...``.

        Example:
            >>> first = next(iter(sampler.dataset(start=7)))  # equals sampler.sample(7)  # doctest: +SKIP
        """
        return make_dataset(self.sample, self.specs, start)

    def __repr__(self) -> str:
        return (
            f"EpisodeSampler(name={self.name!r}, classes={self.num_classes}, ways={self._ways}, "
            f"shots={self._shots}, query={self._query}, meta_batch={self._meta_batch}, seed={self._seed})"
        )
