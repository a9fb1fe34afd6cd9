"""Episodic data for meta-learning: task samplers for Omniglot and sinusoid regression.

Every sampler has ``sample(index) -> TaskBatch`` (numpy, a pure function of seed and
index), ``dataset(start=0) -> tf.data.Dataset`` (endless, deterministic), and the
properties ``feature_shape``, ``ways``, ``shots``, ``query``, ``meta_batch`` and
``task_type`` ("classification" or "regression").

Example:
    >>> sampler = make_sampler("sinusoid", "train", ways=1, shots=5, query=10, meta_batch=4)
    >>> sampler.sample(0).support_x.shape
    (4, 5, 1)
"""

from __future__ import annotations

import functools
import os

from tfmeta.data.episodes import EpisodeSampler, TaskBatch
from tfmeta.data.omniglot import SPLIT_NAMES, load_omniglot
from tfmeta.data.sinusoid import SinusoidTasks
from tfmeta.data.synthetic2d import Synthetic2DTasks

__all__ = [
    "DATASETS",
    "EpisodeSampler",
    "SinusoidTasks",
    "Synthetic2DTasks",
    "TaskBatch",
    "load_omniglot",
    "make_sampler",
]

DATASETS = ("sinusoid", "omniglot", "synthetic2d")


@functools.lru_cache(maxsize=1)
def _omniglot_splits(data_dir, image_size, rotations):
    """load_omniglot, memoised so the train/val/test samplers share one load."""
    return load_omniglot(data_dir, image_size=image_size, rotations=rotations)


def make_sampler(
    dataset,
    split,
    *,
    ways,
    shots,
    query,
    meta_batch,
    seed=0,
    data_dir=None,
    image_size=28,
    rotations=True,
):
    """An EpisodeSampler (omniglot) or SinusoidTasks (sinusoid) for ``split``.

    ``split`` is "train", "val" or "test". For sinusoid, ``ways`` is ignored (regression
    has no classes) and the split picks an independent task stream; ``data_dir``,
    ``image_size`` and ``rotations`` apply to omniglot only.

    Example:
        >>> val = make_sampler("omniglot", "val", ways=5, shots=1, query=15, meta_batch=32,
        ...                    data_dir="../shared/data/omniglot")  # doctest: +SKIP
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got dataset={dataset!r}")
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got split={split!r}")
    if dataset == "sinusoid":
        return SinusoidTasks(shots=shots, query=query, meta_batch=meta_batch, seed=seed, split=split)
    if dataset == "synthetic2d":
        return Synthetic2DTasks(meta_batch=meta_batch, shots=shots, query=query, seed=seed, split=split)
    key_dir = None if data_dir is None else os.path.abspath(os.fspath(data_dir))
    images, labels = _omniglot_splits(key_dir, image_size, bool(rotations))[split]
    return EpisodeSampler(
        images,
        labels,
        ways=ways,
        shots=shots,
        query=query,
        meta_batch=meta_batch,
        seed=seed,
        name=split,
    )
