"""Held-out accuracy with learn2learn's Omniglot protocol, on the very same episodes.

``../shared/peerbench/l2l_omniglot.py`` (learn2learn's MAML, the peer tfmeta is compared with)
scores its meta-learned network on a held-out set of characters without rotations: each episode
draws ``ways`` characters with ``random.Random(seed).sample``, then ``shots + query`` drawings of
each (the first ``shots`` are the support set), and adapts with T inner steps. This module draws
the same episodes, in the same order, from the same arrays (:func:`holdout_episodes`), so that
tfmeta's accuracy and learn2learn's are measured on identical tasks, and reports the mean with
learn2learn's 95% interval (1.96 population standard deviations over sqrt(episodes),
:func:`holdout_accuracy`).

Arrays are those of ``tfmeta.data.load_omniglot(data_dir, rotations=False)["test"]`` (or of
peerbench's ``omniglot_npz.py``, which decodes the archive the same way): rows grouped by
character in ascending id order, drawings in file-name order.

Example:
    >>> images, labels = load_omniglot(data_dir, rotations=False)["test"]  # doctest: +SKIP
    >>> episodes = holdout_episodes(images, labels, 200)  # doctest: +SKIP
    >>> holdout_accuracy(learner, episodes)  # doctest: +SKIP
    (48.8, 1.8)
"""

from __future__ import annotations

import math
import random

import numpy as np

from tfmeta.data.episodes import TaskBatch, check_index, check_positive_int

__all__ = ["holdout_episodes", "holdout_accuracy", "holdout_scorer", "dense_labels"]


def dense_labels(labels) -> np.ndarray:
    """Class ids renumbered 0..C-1 in ascending order (a split's ids start where the last ended)."""
    return np.unique(np.asarray(labels), return_inverse=True)[1].astype(np.int32).reshape(-1)


def holdout_episodes(images, labels, episodes: int = 200, *, ways: int = 5, shots: int = 1,
                     query: int = 5, seed: int = 0) -> TaskBatch:
    """The episodes of ``l2l_omniglot.py``'s evaluation, in its order, as one stacked TaskBatch.

    Support labels are ``0..ways-1`` in class order (``shots`` each), query labels likewise with
    ``query`` each; ``support_x`` is [episodes, ways*shots, *shape].
    """
    episodes = check_positive_int("episodes", episodes)
    ways, shots, query = (check_positive_int(n, v) for n, v in (("ways", ways), ("shots", shots),
                                                                 ("query", query)))
    seed = check_index(seed, "seed")
    images = np.asarray(images, np.float32)
    y = dense_labels(labels)
    if len(y) != len(images):
        raise ValueError(f"labels has {len(y)} entries but images has {len(images)} rows")
    chars = [np.where(y == c)[0] for c in range(int(y.max()) + 1)]
    if len(chars) < ways:
        raise ValueError(f"ways={ways} but the held-out set has only {len(chars)} classes")
    smallest = min(len(rows) for rows in chars)
    if shots + query > smallest:
        raise ValueError(f"shots + query = {shots + query} but a held-out class has only {smallest} examples")
    er = random.Random(seed)
    sx, qx = [], []
    for _ in range(episodes):
        cls = er.sample(range(len(chars)), ways)
        s, q = [], []
        for c in cls:
            idx = er.sample(list(chars[c]), shots + query)
            s += [images[j] for j in idx[:shots]]
            q += [images[j] for j in idx[shots:]]
        sx.append(np.stack(s))
        qx.append(np.stack(q))
    support_y = np.tile(np.repeat(np.arange(ways, dtype=np.int32), shots), (episodes, 1))
    query_y = np.tile(np.repeat(np.arange(ways, dtype=np.int32), query), (episodes, 1))
    return TaskBatch(np.stack(sx), support_y, np.stack(qx), query_y)


def holdout_scorer(learner, steps: int | None = None):
    """A compiled scorer for :func:`holdout_accuracy` (build it once to score several times)."""
    import tensorflow as tf

    from tfmeta.training import evaluation

    return tf.function(lambda *t: evaluation.batch_scores(learner, t, steps), reduce_retracing=True,
                       autograph=False)


def holdout_accuracy(learner, episodes, *, steps: int | None = None, chunk: int = 50,
                     scorer=None) -> tuple[float, float]:
    """Accuracy after adaptation (percent) and its 95% half-width over `episodes`, as learn2learn's.

    The learner adapts on each episode's support set (`steps` inner steps, default its T) from its
    current meta-parameters and is scored on the query set; `chunk` episodes run per call
    (`scorer`: one from :func:`holdout_scorer`, so that repeated calls do not retrace).
    """
    from tfmeta.training import evaluation

    chunk = check_positive_int("chunk", chunk)
    scorer = scorer or holdout_scorer(learner, steps)
    col = evaluation.score_names(learner).index("accuracy_after")
    total = len(episodes[0])
    accs = np.concatenate([scorer(*(np.asarray(e[i:i + chunk]) for e in episodes)).numpy()[:, col]
                           for i in range(0, total, chunk)])
    return float(100 * accs.mean()), float(100 * 1.96 * accs.std() / math.sqrt(len(accs)))
