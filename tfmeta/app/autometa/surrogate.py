"""The surrogate predictor of the progressive search: an ensemble of small MLPs on cell encodings.

Auto-Meta (Sun's overview, Sec. 5) follows PNAS: after the b-block candidates are
meta-trained, a predictor fitted on (cell encoding, meta-validation accuracy) ranks every
(b+1)-block expansion of the top K cells without training them, and only the K best-ranked are
meta-trained. The papers use an LSTM over the block sequence; on CPU, with tens of scored cells,
this module uses what PNAS reports as comparably good, an ensemble of small MLPs (PNAS, Sec. 5.2:
"MLP-ensemble" vs "RNN-ensemble"), on :func:`tfmeta.app.autometa.space.encode` vectors, which add
whole-cell operator and input counts to the per-block one-hots so that a predictor fitted on
b-block cells can rank (b+1)-block ones.

Each member is a one-hidden-layer tanh MLP fitted to standardized scores by full-batch Adam
(squared error plus L2 weight decay) on a bootstrap resample of the data, from its own random
initialization; the prediction is the members' mean. Everything is NumPy and seeded: fitting on
the same records gives the same ranking, so a resumed search ranks as the uninterrupted one did.

What matters is the ranking, so the quality measure is Spearman's rank correlation between
predicted and measured scores on candidates the predictor never saw (:func:`spearman`,
:func:`cross_validated_spearman`).

Example (scores that grow with the number of convolutions):
    >>> from tfmeta.app.autometa.space import initial_cells
    >>> ops = ("conv3x3", "identity")
    >>> cells = initial_cells(ops)
    >>> surrogate = Surrogate(max_blocks=2, operators=ops).fit(cells, [c.key().count("conv") for c in cells])
    >>> best, predicted = surrogate.rank(cells[0].expansions(ops))[0]
    >>> best.key().count("conv")   # the best-ranked expansion adds two more convolutions
    4

References:
    Kim, J. et al. "Auto-Meta: Automated Gradient Based Meta Learner Search." 2018.
    arXiv:1806.06927.

    Liu, C. et al. "Progressive Neural Architecture Search." ECCV 2018. arXiv:1712.00559.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tfmeta.app.autometa.space import OPERATORS, Cell, check_operators, encode_all


def rankdata(values) -> np.ndarray:
    """Ranks 1..n of `values`, ties sharing their average rank.

    Example:
        >>> rankdata([10, 30, 20, 20]).tolist()
        [1.0, 4.0, 2.5, 2.5]
    """
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation: Pearson's correlation of the (average-tie) ranks.

    rho = cov(rank a, rank b) / (std(rank a) std(rank b)); NaN when either side is constant or
    fewer than 2 values are given.

    Example:
        >>> spearman([1, 2, 3, 4], [10, 20, 40, 30])
        0.8
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D of the same length, got shapes {a.shape} and {b.shape}.")
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    if denominator == 0:
        return float("nan")
    return float(round((ra * rb).sum() / denominator, 12))


class Surrogate:
    """Ensemble of small MLPs predicting a cell's score from its encoding (see module docstring).

    Args:
        max_blocks: B, the largest cell the encodings must hold.
        operators: the operator set of the search (fixes the encoding layout).
        members: MLPs in the ensemble.
        hidden: hidden units per MLP.
        steps: full-batch Adam steps per member.
        learning_rate: Adam's step size.
        weight_decay: L2 penalty on the weights.
        seed: seeds the initializations and bootstrap resamples.
    """

    def __init__(self, max_blocks: int, operators: Sequence[str] = OPERATORS, *, members: int = 5,
                 hidden: int = 32, steps: int = 400, learning_rate: float = 0.01,
                 weight_decay: float = 1e-3, seed: int = 0):
        for name, value in (("max_blocks", max_blocks), ("members", members), ("hidden", hidden),
                            ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}={value!r} is not valid: expected an integer >= 1.")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate={learning_rate!r} is not valid: expected a number > 0.")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r} is not valid: expected a number >= 0.")
        self.max_blocks = int(max_blocks)
        self.operators = check_operators(operators)
        self.members, self.hidden, self.steps = int(members), int(hidden), int(steps)
        self.learning_rate, self.weight_decay, self.seed = float(learning_rate), float(weight_decay), int(seed)
        self._params: list[list[np.ndarray]] = []
        self._mean, self._scale = 0.0, 1.0

    # -- one MLP -----------------------------------------------------------------------------------
    @staticmethod
    def _forward(params, x):
        w1, b1, w2, b2 = params
        h = np.tanh(x @ w1 + b1)
        return h @ w2 + b2, h

    def _loss_and_grads(self, params, x, t):
        """Mean squared error + weight decay, and its gradient by backpropagation."""
        w1, b1, w2, b2 = params
        y, h = self._forward(params, x)
        n = len(t)
        residual = y - t
        loss = float((residual ** 2).mean() + self.weight_decay * ((w1 ** 2).sum() + (w2 ** 2).sum()))
        dy = 2.0 * residual / n
        dw2 = h.T @ dy + 2 * self.weight_decay * w2
        db2 = dy.sum()
        dh = np.outer(dy, w2) * (1.0 - h * h)
        dw1 = x.T @ dh + 2 * self.weight_decay * w1
        db1 = dh.sum(0)
        return loss, [dw1, db1, dw2, np.asarray(db2)]

    def _fit_member(self, x, t, rng):
        d = x.shape[1]
        params = [rng.normal(0, 1 / np.sqrt(d), (d, self.hidden)), np.zeros(self.hidden),
                  rng.normal(0, 1 / np.sqrt(self.hidden), self.hidden), np.zeros(())]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for step in range(1, self.steps + 1):
            _, grads = self._loss_and_grads(params, x, t)
            for k, g in enumerate(grads):
                m[k] = beta1 * m[k] + (1 - beta1) * g
                v[k] = beta2 * v[k] + (1 - beta2) * g * g
                m_hat = m[k] / (1 - beta1 ** step)
                v_hat = v[k] / (1 - beta2 ** step)
                params[k] = params[k] - self.learning_rate * m_hat / (np.sqrt(v_hat) + eps)
        return params

    # -- the ensemble ------------------------------------------------------------------------------
    def _encode(self, cells) -> np.ndarray:
        cells = list(cells)
        for c in cells:
            if not isinstance(c, Cell):
                raise ValueError(f"cells must hold tfmeta.app.autometa.space.Cell objects, got {type(c).__name__}.")
        return encode_all(cells, self.max_blocks, self.operators)

    def fit(self, cells: Sequence[Cell], scores) -> "Surrogate":
        """Fit every member to (encode(cell), standardized score) pairs; returns self."""
        x = self._encode(cells)
        t = np.asarray(scores, np.float64).reshape(-1)
        if len(t) != len(x) or len(t) < 1:
            raise ValueError(f"scores has {len(t)} values for {len(x)} cells: expected one score per cell, at least one.")
        if not np.all(np.isfinite(t)):
            raise ValueError("scores must be finite.")
        self._mean = float(t.mean())
        self._scale = float(t.std()) or 1.0
        t = (t - self._mean) / self._scale
        rng = np.random.default_rng(self.seed)
        self._params = []
        for _ in range(self.members):
            rows = rng.integers(0, len(t), len(t)) if len(t) > 2 else np.arange(len(t))
            self._params.append(self._fit_member(x[rows], t[rows], rng))
        return self

    def predict(self, cells: Sequence[Cell]) -> np.ndarray:
        """The ensemble's mean predicted score of each cell (in the scores' units)."""
        if not self._params:
            raise ValueError("the surrogate is not fitted: call fit(cells, scores) first.")
        x = self._encode(cells)
        outputs = np.mean([self._forward(p, x)[0] for p in self._params], axis=0)
        return outputs * self._scale + self._mean

    def rank(self, cells: Sequence[Cell]) -> list[tuple[Cell, float]]:
        """`cells` with their predictions, best predicted first (ties keep the given order)."""
        cells = list(cells)
        predictions = self.predict(cells)
        order = np.argsort(-predictions, kind="mergesort")
        return [(cells[i], float(predictions[i])) for i in order]


def cross_validated_spearman(cells: Sequence[Cell], scores, *, max_blocks: int,
                             operators: Sequence[str] = OPERATORS, folds: int = 5, seed: int = 0,
                             **surrogate_options) -> float:
    """Spearman correlation of out-of-fold predictions with the measured scores (k-fold).

    Every cell is predicted by a surrogate fitted on the other folds only; NaN with fewer than
    `folds` cells.

    Example:
        >>> cross_validated_spearman(cells, scores, max_blocks=3)  # doctest: +SKIP
        0.61
    """
    cells = list(cells)
    scores = np.asarray(scores, np.float64)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds={folds!r} is not valid: expected an integer >= 2.")
    if len(cells) < folds:
        return float("nan")
    order = np.random.default_rng(seed).permutation(len(cells))
    predictions = np.empty(len(cells))
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        model = Surrogate(max_blocks, operators, seed=seed, **surrogate_options)
        model.fit([cells[i] for i in train], scores[train])
        predictions[fold] = model.predict([cells[i] for i in fold])
    return spearman(predictions, scores)
