"""A synthetic few-shot image family ("glyphs") for architecture searches without Omniglot.

Omniglot is not always at hand (a user's machine without the archive and without internet, CI);
`tfmeta search --dataset synthetic` then searches on this family, which has Omniglot's form:
small grey images, ink 0 on background 1, many classes with 20 drawings each, and disjoint
classes in the train / val / test splits.

A class is a glyph of three random straight strokes between points of the image grid (its
prototype). A drawing of the class shifts the prototype by up to one pixel in each direction,
drops each ink pixel with probability 0.1 and adds Gaussian noise (standard deviation 0.1),
clipped to [0, 1]. The classes of a split are drawn from a seed of their own, so train, val and
test classes are disjoint with probability one, and every array is a pure function of
(seed, split, image_size).

Example:
    >>> images, labels = glyphs("val", image_size=14)
    >>> images.shape, len(set(labels.tolist()))
    ((400, 14, 14, 1), 20)
"""

from __future__ import annotations

import numpy as np

from tfmeta.data.episodes import EpisodeSampler, check_index, check_positive_int

#: classes per split (Omniglot's small split has 344 / 104 / 96 with rotations).
CLASSES = {"train": 60, "val": 20, "test": 20}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def _prototype(rng: np.random.Generator, size: int, strokes: int = 3) -> np.ndarray:
    """Ink mask [size, size] of `strokes` random straight strokes."""
    ink = np.zeros((size, size), bool)
    for _ in range(strokes):
        (r0, c0), (r1, c1) = rng.integers(1, size - 1, size=(2, 2))
        steps = 2 * max(abs(r1 - r0), abs(c1 - c0)) + 1
        rows = np.rint(np.linspace(r0, r1, steps)).astype(int)
        cols = np.rint(np.linspace(c0, c1, steps)).astype(int)
        ink[rows, cols] = True
    return ink


def glyphs(split: str, *, image_size: int = 14, per_class: int = 20, seed: int = 0):
    """Images [N, S, S, 1] float32 and labels [N] int32 of one split (see module docstring).

    Example:
        >>> images, labels = glyphs("train", image_size=12, per_class=5)
        >>> images.shape
        (300, 12, 12, 1)
    """
    if split not in CLASSES:
        raise ValueError(f"split={split!r} is not valid: expected one of {list(CLASSES)}.")
    size = check_positive_int("image_size", image_size)
    if size < 4:
        raise ValueError(f"image_size={image_size!r} is not valid: expected an integer >= 4.")
    per_class = check_positive_int("per_class", per_class)
    rng = np.random.default_rng([check_index(seed, "seed"), SPLIT_SEEDS[split], size])
    first = sum(CLASSES[s] for s in ("train", "val", "test")[: SPLIT_SEEDS[split]])
    images, labels = [], []
    for c in range(CLASSES[split]):
        ink = _prototype(rng, size)
        for _ in range(per_class):
            dr, dc = rng.integers(-1, 2, size=2)
            drawn = np.roll(np.roll(ink, dr, axis=0), dc, axis=1) & (rng.random((size, size)) > 0.1)
            image = np.where(drawn, 0.0, 1.0) + rng.normal(0, 0.1, (size, size))
            images.append(np.clip(image, 0.0, 1.0))
            labels.append(first + c)
    return np.asarray(images, np.float32)[..., None], np.asarray(labels, np.int32)


def make_sampler(split: str, *, ways: int, shots: int, query: int, meta_batch: int, seed: int = 0,
                 image_size: int = 14) -> EpisodeSampler:
    """An episodic sampler over one split of the glyph family (as `tfmeta.data.make_sampler`).

    Example:
        >>> make_sampler("train", ways=5, shots=1, query=2, meta_batch=4).sample(0).support_x.shape
        (4, 5, 14, 14, 1)
    """
    images, labels = glyphs(split, image_size=image_size)
    return EpisodeSampler(images, labels, ways=ways, shots=shots, query=query, meta_batch=meta_batch,
                          seed=seed, name=split)
