"""The Auto-Meta search space: cells of blocks, their expansions, encodings and JSON descriptions.

Auto-Meta (Kim et al. 2018, Sun's overview, Sec. 5) searches the architecture A of
``min_{A, theta} sum_j L(D_j^test, U(D_j^train, theta; A))`` in the PNAS space (Liu et al. 2018):

- a **block** applies an operator to each of two inputs and adds the results,
  ``H = op_a(I_a) + op_b(I_b)``;
- an input index is ``0`` (H_{c-2}, the output of the cell before the previous one), ``1``
  (H_{c-1}, the previous cell's output) or ``k >= 2`` (block ``k - 1`` of the same cell), so block
  ``i`` (1-based) may read indices ``0 .. i``;
- a **cell** is a sequence of up to B blocks; its output concatenates the blocks that no later
  block reads;
- an :class:`Architecture` stacks the cell ``cells_per_stage`` times per stage, with the same cell
  applied with stride 2 (a reduction cell, twice the filters) between stages, after a 3x3
  convolution stem and before a global-average-pooled linear classifier on logits
  (:mod:`tfmeta.app.autometa.builder` builds it).

The progressive search starts from every 1-block cell (:func:`initial_cells`) and grows the best
cells one block at a time (:meth:`Cell.expansions`). Within a block the two (input, operator)
pairs are unordered, so a block is stored in a canonical order and duplicate cells collapse.

Example:
    >>> cell = Cell.from_json([[0, "conv3x3", 1, "identity"]])
    >>> [len(c.blocks) for c in cell.expansions(("conv3x3", "identity"))][:2]
    [2, 2]
    >>> cell.key()
    '0:conv3x3+1:identity'

References:
    Kim, J. et al. "Auto-Meta: Automated Gradient Based Meta Learner Search." 2018.
    arXiv:1806.06927.

    Liu, C. et al. "Progressive Neural Architecture Search." ECCV 2018. arXiv:1712.00559.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from tfmeta.core.files import write_json

#: operators a block may apply to an input (PNAS's set, minus the 7x7 and dilated convolutions).
OPERATORS = ("conv3x3", "sep3x3", "sep5x5", "maxpool3x3", "avgpool3x3", "identity")

#: version tag of the JSON architecture description.
FORMAT = "tfmeta.autometa.architecture/1"

_INPUT_NAMES = {0: "H[c-2]", 1: "H[c-1]"}


def check_operators(operators, name: str = "operators") -> tuple[str, ...]:
    """Validate a collection of operator names (unknown or repeated names raise ValueError).

    Example:
        >>> check_operators(["conv3x3", "identity"])
        ('conv3x3', 'identity')
    """
    if isinstance(operators, str):
        operators = [o.strip() for o in operators.split(",") if o.strip()]
    operators = tuple(operators)
    if not operators:
        raise ValueError(f"{name}=() is not valid: expected one or more of {list(OPERATORS)}.")
    unknown = [o for o in operators if o not in OPERATORS]
    if unknown:
        raise ValueError(
            f"{name}={list(operators)!r} holds unknown operator names {unknown}: expected names "
            f"from {list(OPERATORS)}."
        )
    if len(set(operators)) != len(operators):
        raise ValueError(f"{name}={list(operators)!r} repeats an operator: expected distinct names.")
    return operators


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} is not valid: expected an integer >= {minimum}.")
    return int(value)


class Block(NamedTuple):
    """``H = op_a(I[input_a]) + op_b(I[input_b])``, with (input, operator) pairs in canonical order."""

    input_a: int
    op_a: str
    input_b: int
    op_b: str

    @classmethod
    def make(cls, input_a: int, op_a: str, input_b: int, op_b: str) -> "Block":
        """The block with its two unordered (input, operator) pairs sorted (canonical form)."""
        a, b = sorted([(int(input_a), op_a), (int(input_b), op_b)], key=_pair_order)
        return cls(a[0], a[1], b[0], b[1])

    def pairs(self) -> tuple[tuple[int, str], tuple[int, str]]:
        return (self.input_a, self.op_a), (self.input_b, self.op_b)


def _pair_order(pair):
    index, op = pair
    return (index, OPERATORS.index(op) if op in OPERATORS else len(OPERATORS), op)


@dataclasses.dataclass(frozen=True)
class Cell:
    """A cell: a tuple of :class:`Block` s (see the module docstring for input indices)."""

    blocks: tuple[Block, ...]

    def __post_init__(self):
        if not self.blocks:
            raise ValueError("cell=[] is not valid: expected at least one block.")
        for i, block in enumerate(self.blocks, start=1):
            for side, (index, op) in zip("ab", block.pairs()):
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= i:
                    raise ValueError(
                        f"cell block {i} input_{side}={index!r} is not valid: block {i} reads 0 "
                        f"(H[c-2]), 1 (H[c-1]) or an earlier block 2..{i} (expected 0..{i})."
                    )
                if op not in OPERATORS:
                    raise ValueError(
                        f"cell block {i} op_{side}={op!r} is an unknown operator name: expected one "
                        f"of {list(OPERATORS)}."
                    )
            if tuple(block) != tuple(Block.make(*block)):
                raise ValueError(f"cell block {i} {tuple(block)} is not canonical: use Block.make.")

    # -- construction and serialization ------------------------------------------------------------
    @classmethod
    def from_json(cls, blocks) -> "Cell":
        """A cell from ``[[input_a, op_a, input_b, op_b], ...]`` (or that list as a JSON string)."""
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        if not isinstance(blocks, (list, tuple)):
            raise ValueError(f"cell={blocks!r} is not valid: expected a list of [input_a, op_a, input_b, op_b].")
        made = []
        for i, b in enumerate(blocks, start=1):
            if not isinstance(b, (list, tuple)) or len(b) != 4:
                raise ValueError(
                    f"cell block {i}={b!r} is not valid: expected [input_a, op_a, input_b, op_b]."
                )
            for side, op in (("a", b[1]), ("b", b[3])):
                if op not in OPERATORS:
                    raise ValueError(
                        f"cell block {i} op_{side}={op!r} is an unknown operator name: expected one "
                        f"of {list(OPERATORS)}."
                    )
            made.append(Block.make(*b))
        return cls(tuple(made))

    def to_json(self) -> list:
        return [list(b) for b in self.blocks]

    def to_values(self) -> dict:
        """KerasTuner hyperparameter values: ``blocks`` and ``b{i}_in_a``, ``b{i}_op_a``, ... per block."""
        values = {"blocks": len(self.blocks)}
        for i, b in enumerate(self.blocks, start=1):
            values.update({f"b{i}_in_a": b.input_a, f"b{i}_op_a": b.op_a,
                           f"b{i}_in_b": b.input_b, f"b{i}_op_b": b.op_b})
        return values

    @classmethod
    def from_values(cls, values: dict) -> "Cell":
        """Inverse of :meth:`to_values`."""
        count = _check_int("blocks", values.get("blocks"), 1)
        return cls.from_json([[values[f"b{i}_in_a"], values[f"b{i}_op_a"], values[f"b{i}_in_b"],
                               values[f"b{i}_op_b"]] for i in range(1, count + 1)])

    def key(self) -> str:
        """A canonical string naming the cell (equal keys: the same cell)."""
        return "|".join(f"{b.input_a}:{b.op_a}+{b.input_b}:{b.op_b}" for b in self.blocks)

    @classmethod
    def from_key(cls, key: str) -> "Cell":
        """Inverse of :meth:`key`, e.g. ``Cell.from_key("0:conv3x3+1:identity|2:sep3x3+0:identity")``."""
        blocks = []
        for i, part in enumerate(str(key).split("|"), start=1):
            try:
                (ia, oa), (ib, ob) = (side.split(":") for side in part.split("+"))
                blocks.append([int(ia), oa, int(ib), ob])
            except ValueError:
                raise ValueError(
                    f"cell key block {i}={part!r} is not valid: expected 'input:op+input:op'."
                ) from None
        return cls.from_json(blocks)

    def describe(self) -> str:
        """Human-readable form, e.g. ``B1 = conv3x3(H[c-2]) + identity(H[c-1])``."""
        def name(index):
            return _INPUT_NAMES.get(index, f"B{index - 1}")

        return "; ".join(
            f"B{i} = {b.op_a}({name(b.input_a)}) + {b.op_b}({name(b.input_b)})"
            for i, b in enumerate(self.blocks, start=1)
        )

    def __len__(self) -> int:
        return len(self.blocks)

    # -- the progressive search ---------------------------------------------------------------------
    def expansions(self, operators: Sequence[str] = OPERATORS) -> list["Cell"]:
        """Every cell made by appending one block to this one (no duplicates), in a fixed order.

        The new block ``b + 1`` may read 0, 1 or any of the b blocks, with any operator: PNAS's
        expansion step (Liu et al. 2018, Sec. 3.2; Auto-Meta, Sun's overview, Sec. 5).

        Example:
            >>> len(Cell.from_json([[0, "conv3x3", 1, "conv3x3"]]).expansions(("conv3x3",)))
            6
        """
        operators = check_operators(operators)
        return [Cell(self.blocks + (block,)) for block in _all_blocks(len(self.blocks) + 1, operators)]

    def contains(self, other: "Cell") -> bool:
        """Whether `other`'s blocks are this cell's first blocks (this cell grows `other`)."""
        return self.blocks[: len(other.blocks)] == other.blocks


def _all_blocks(position: int, operators: Sequence[str]) -> list[Block]:
    """Every canonical block at `position` (1-based): unordered pairs of (input, operator)."""
    pairs = [(i, op) for i in range(position + 1) for op in operators]
    return [Block.make(*a, *b) for a, b in itertools.combinations_with_replacement(pairs, 2)]


def initial_cells(operators: Sequence[str] = OPERATORS) -> list[Cell]:
    """Every 1-block cell: the first stage of the progressive search.

    Example:
        >>> len(initial_cells())   # 12 (input, operator) pairs, unordered with repetition: 12*13/2
        78
    """
    return [Cell((b,)) for b in _all_blocks(1, check_operators(operators))]


def planned_trials(blocks: int, top_k: int, operators: Sequence[str] = OPERATORS) -> int:
    """Trials of a complete search: all 1-block cells, then `top_k` per further block."""
    return len(initial_cells(operators)) + (blocks - 1) * top_k


def random_cell(rng: np.random.Generator, blocks: int, operators: Sequence[str] = OPERATORS) -> Cell:
    """A uniformly drawn cell with `blocks` blocks (for tests and surrogate measurements)."""
    operators = check_operators(operators)
    made = []
    for i in range(1, _check_int("blocks", blocks, 1) + 1):
        ia, ib = (int(v) for v in rng.integers(0, i + 1, size=2))
        oa, ob = (operators[int(v)] for v in rng.integers(0, len(operators), size=2))
        made.append(Block.make(ia, oa, ib, ob))
    return Cell(tuple(made))


# -- encodings for the surrogate --------------------------------------------------------------------
def encoding_size(max_blocks: int, operators: Sequence[str] = OPERATORS) -> int:
    """Length of :func:`encode` vectors."""
    per_block = 2 * (max_blocks + 1 + len(operators)) + 1
    return max_blocks * per_block + len(operators) + 4


def encode(cell: Cell, max_blocks: int, operators: Sequence[str] = OPERATORS) -> np.ndarray:
    """A fixed-length vector for the surrogate: per-block one-hots plus whole-cell counts.

    Per block position (padded to `max_blocks`): a presence flag, one-hot input and one-hot
    operator of each side. Whole cell: the fraction of each operator among the 2b operator slots,
    the fraction of inputs reading H[c-2], H[c-1] and earlier blocks, and b / max_blocks. The counts
    let a predictor fitted on b-block cells rank (b+1)-block ones, PNAS's extrapolation step.

    Example:
        >>> encode(Cell.from_json([[0, "identity", 1, "identity"]]), 2).shape
        (48,)
    """
    operators = tuple(operators)
    if len(cell.blocks) > max_blocks:
        raise ValueError(f"cell has {len(cell.blocks)} blocks: expected at most max_blocks={max_blocks}.")
    inputs, ops = max_blocks + 1, len(operators)
    per_block = 2 * (inputs + ops) + 1
    vector = np.zeros(encoding_size(max_blocks, operators), np.float64)
    counts = np.zeros(ops)
    sources = np.zeros(3)
    for i, block in enumerate(cell.blocks):
        base = i * per_block
        vector[base] = 1.0
        for side, (index, op) in enumerate(block.pairs()):
            offset = base + 1 + side * (inputs + ops)
            vector[offset + index] = 1.0
            vector[offset + inputs + operators.index(op)] = 1.0
            counts[operators.index(op)] += 1
            sources[min(index, 2)] += 1
    slots = 2 * len(cell.blocks)
    tail = max_blocks * per_block
    vector[tail : tail + ops] = counts / slots
    vector[tail + ops : tail + ops + 3] = sources / slots
    vector[tail + ops + 3] = len(cell.blocks) / max_blocks
    return vector


def encode_all(cells: Iterable[Cell], max_blocks: int, operators: Sequence[str] = OPERATORS) -> np.ndarray:
    return np.stack([encode(c, max_blocks, operators) for c in cells])


# -- the network around the cell ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Architecture:
    """A complete network: the cell plus the skeleton it is stacked in (a JSON-able description).

    Args:
        cell: the searched cell.
        input_shape: (height, width, channels) of the images.
        classes: logits of the classifier head (the N of N-way tasks).
        filters: channels of the stem and first stage (doubled at each reduction cell).
        cells_per_stage: normal cells per stage (PNAS's N).
        reductions: reduction cells (stages - 1).
    """

    cell: Cell
    input_shape: tuple[int, int, int] = (28, 28, 1)
    classes: int = 5
    filters: int = 16
    cells_per_stage: int = 1
    reductions: int = 2

    def __post_init__(self):
        if not isinstance(self.cell, Cell):
            raise ValueError(f"cell={self.cell!r} is not valid: expected a Cell.")
        shape = tuple(self.input_shape)
        if len(shape) != 3 or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
            raise ValueError(f"input_shape={self.input_shape!r} is not valid: expected (height, width, channels) >= 1.")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in shape))
        _check_int("classes", self.classes, 1)
        _check_int("filters", self.filters, 1)
        _check_int("cells_per_stage", self.cells_per_stage, 1)
        _check_int("reductions", self.reductions, 0)

    def with_cell(self, cell: Cell) -> "Architecture":
        return dataclasses.replace(self, cell=cell)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "cell": self.cell.to_json(),
            "cell_description": self.cell.describe(),
            "input_shape": list(self.input_shape),
            "classes": self.classes,
            "filters": self.filters,
            "cells_per_stage": self.cells_per_stage,
            "reductions": self.reductions,
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, description: dict) -> "Architecture":
        """Inverse of :meth:`to_dict` (unknown formats raise ValueError)."""
        if not isinstance(description, dict) or description.get("format") != FORMAT:
            got = description.get("format") if isinstance(description, dict) else type(description).__name__
            raise ValueError(f"description format={got!r} is not valid: expected {FORMAT!r}.")
        return cls(
            cell=Cell.from_json(description["cell"]),
            input_shape=tuple(description["input_shape"]),
            classes=description["classes"],
            filters=description["filters"],
            cells_per_stage=description["cells_per_stage"],
            reductions=description["reductions"],
        )

    @classmethod
    def from_json(cls, text: str) -> "Architecture":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str) -> "Architecture":
        """Read a description written by :meth:`save` (or by `tfmeta search`)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def save(self, path: str, **extra) -> None:
        """Write the description (plus `extra` JSON fields such as a score) atomically."""
        write_json(path, {**self.to_dict(), **extra}, make_dirs=False)

    def build(self, *, dtype=None, name: str = "autometa"):
        """The plain Keras functional model (see :func:`tfmeta.app.autometa.builder.build_model`)."""
        from tfmeta.app.autometa.builder import build_model

        return build_model(self, dtype=dtype, name=name)
