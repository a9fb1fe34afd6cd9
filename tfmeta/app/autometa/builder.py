"""Build an Auto-Meta architecture as a plain Keras functional model.

The network of an :class:`~tfmeta.app.autometa.space.Architecture` (PNAS's network level, used by
Auto-Meta, Sun's overview, Sec. 5)::

    image -> stem (3x3 conv, BN)
          -> [cell x cells_per_stage] -> reduction cell -> [cell x cells_per_stage] -> ... (stages)
          -> ReLU -> global average pooling -> Dense(classes) = logits

Inside a cell (filters F), both inputs H[c-2] and H[c-1] are first brought to F channels by
ReLU-1x1 conv-BN (with stride 2 for H[c-2] when it is one reduction behind H[c-1]); block i
computes ``op_a(I_a) + op_b(I_b)``; the cell's output concatenates the blocks no later block reads.
A reduction cell is the same cell with stride 2 on the operators that read the cell inputs and
twice the filters. Operators: ``conv3x3`` / ``sep3x3`` / ``sep5x5`` = ReLU, (separable) conv, BN;
``maxpool3x3`` / ``avgpool3x3`` = 3x3 pooling; ``identity`` = the input itself (a strided
ReLU-1x1 conv-BN in a reduction cell, where the input must shrink).

Every layer gets a name derived from its position (``c2_b1_a_conv3x3_conv``...), so the same
description always rebuilds the same layers, shapes and parameter count. The model is an
ordinary Keras model: every tfmeta estimator, `MetaTrainer` and `tfmeta.export` use it unchanged
(BatchNorm moments are made exact by :mod:`tfmeta.core.functional`).

Example:
    >>> arch = Architecture(Cell.from_json([[0, "sep3x3", 1, "maxpool3x3"]]), input_shape=(28, 28, 1))
    >>> model = build_model(arch)
    >>> model.output_shape
    (None, 5)

References:
    Kim, J. et al. "Auto-Meta: Automated Gradient Based Meta Learner Search." 2018.
    arXiv:1806.06927.

    Liu, C. et al. "Progressive Neural Architecture Search." ECCV 2018. arXiv:1712.00559.
"""

from __future__ import annotations

from tfmeta.core import _backend  # noqa: F401

import keras

#: what build_model reads of an architecture (a :class:`~tfmeta.app.autometa.space.Architecture`;
#: the builder reads the description, it does not import it: space builds through this module).
_FIELDS = ("cell", "input_shape", "classes", "filters", "cells_per_stage", "reductions")

_SEPARABLE = {"sep3x3": 3, "sep5x5": 5}


def _relu_conv_bn(x, filters: int, kernel: int, stride: int, name: str, dtype, separable=False):
    x = keras.layers.ReLU(name=f"{name}_relu", dtype=dtype)(x)
    if kernel == 1 and stride > 1:
        # A strided 1x1 convolution is a subsampling followed by a 1x1 convolution. Written as
        # one Conv2D(kernel 1, strides 2) it corrupts the heap under TensorFlow 2.21's oneDNN
        # kernels on CPU (glibc aborts within two training steps, plain Keras fit included).
        x = keras.layers.AveragePooling2D(1, strides=stride, padding="same", name=f"{name}_subsample",
                                          dtype=dtype)(x)
        stride = 1
    conv = keras.layers.SeparableConv2D if separable else keras.layers.Conv2D
    x = conv(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv",
             dtype=dtype)(x)
    return keras.layers.BatchNormalization(name=f"{name}_bn", dtype=dtype)(x)


def _operator(x, op: str, filters: int, stride: int, name: str, dtype):
    """One operator of a block on input `x` (already `filters` channels)."""
    name = f"{name}_{op}"
    if op == "identity":
        if stride == 1:
            return x
        return _relu_conv_bn(x, filters, 1, stride, name, dtype)
    if op == "maxpool3x3":
        return keras.layers.MaxPooling2D(3, strides=stride, padding="same", name=name, dtype=dtype)(x)
    if op == "avgpool3x3":
        return keras.layers.AveragePooling2D(3, strides=stride, padding="same", name=name, dtype=dtype)(x)
    if op == "conv3x3":
        return _relu_conv_bn(x, filters, 3, stride, name, dtype)
    if op in _SEPARABLE:
        return _relu_conv_bn(x, filters, _SEPARABLE[op], stride, name, dtype, separable=True)
    raise ValueError(f"op={op!r} is an unknown operator name.")


def apply_cell(cell, prev2, prev1, filters: int, *, reduction: bool, name: str, dtype=None):
    """The cell on inputs H[c-2] = `prev2`, H[c-1] = `prev1`; returns its output tensor."""
    stride2 = 2 if prev2.shape[1] != prev1.shape[1] else 1
    inputs = [
        _relu_conv_bn(prev2, filters, 1, stride2, f"{name}_in0", dtype),
        _relu_conv_bn(prev1, filters, 1, 1, f"{name}_in1", dtype),
    ]
    read = set()
    for i, block in enumerate(cell.blocks, start=1):
        branches = []
        for side, (index, op) in zip("ab", block.pairs()):
            read.add(index)
            stride = 2 if reduction and index < 2 else 1
            branches.append(_operator(inputs[index], op, filters, stride, f"{name}_b{i}_{side}", dtype))
        inputs.append(keras.layers.Add(name=f"{name}_b{i}_add", dtype=dtype)(branches))
    outputs = [inputs[k] for k in range(2, len(inputs)) if k not in read]
    if len(outputs) == 1:
        return outputs[0]
    return keras.layers.Concatenate(name=f"{name}_concat", dtype=dtype)(outputs)


def build_model(arch, *, dtype=None, name: str = "autometa") -> keras.Model:
    """A Keras functional model for `arch` (see the module docstring for its layout).

    Example:
        >>> model = build_model(Architecture.load("autometa/best_architecture.json"))  # doctest: +SKIP
    """
    if not all(hasattr(arch, field) for field in _FIELDS):
        raise ValueError(f"arch={arch!r} is not valid: expected a tfmeta.app.autometa.space.Architecture.")
    inputs = keras.Input(arch.input_shape, name="image", dtype=dtype)
    x = keras.layers.Conv2D(arch.filters, 3, padding="same", use_bias=False, name="stem_conv",
                            dtype=dtype)(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn", dtype=dtype)(x)
    prev2 = prev1 = x
    filters = arch.filters
    count = 0
    for stage in range(arch.reductions + 1):
        for _ in range(arch.cells_per_stage):
            count += 1
            out = apply_cell(arch.cell, prev2, prev1, filters, reduction=False, name=f"c{count}", dtype=dtype)
            prev2, prev1 = prev1, out
        if stage < arch.reductions:
            count += 1
            filters *= 2
            out = apply_cell(arch.cell, prev2, prev1, filters, reduction=True, name=f"c{count}r", dtype=dtype)
            prev2, prev1 = prev1, out
    x = keras.layers.ReLU(name="head_relu", dtype=dtype)(prev1)
    x = keras.layers.GlobalAveragePooling2D(name="pool", dtype=dtype)(x)
    outputs = keras.layers.Dense(arch.classes, name="head", dtype=dtype)(x)
    return keras.Model(inputs, outputs, name=name)


def summary(model: keras.Model) -> list[tuple[str, str, tuple, int]]:
    """(name, layer class, output shape, parameter count) per layer: what "the same architecture" means.

    Example:
        >>> summary(build_model(arch)) == summary(build_model(Architecture.from_json(arch.to_json())))  # doctest: +SKIP
        True
    """
    return [(layer.name, type(layer).__name__, tuple(layer.output.shape), layer.count_params())
            for layer in model.layers]
