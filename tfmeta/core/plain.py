"""Plain Keras models that predict the way the meta-learner was trained.

tfmeta runs BatchNormalization with the statistics of the batch it is given (policy ``"batch"``,
the default: transductive, as in Finn et al.), and meta-training never updates a layer's running
statistics. A stock Keras model handed to a user would use those untouched running statistics in
`predict` (inference mode) and answer at chance. :func:`plain_model` returns a copy whose
BatchNormalization layers are replaced by the same computation in stock Keras parts, so inference
and training mode both normalise with the batch's statistics:

    x -> (x - mean_batch) / sqrt(var_batch + epsilon)       keras.ops, exact moments
      -> x * gamma + beta                                    keras.layers.EinsumDense

Each replaced layer is a small functional sub-model with the BatchNormalization layer's name; its
two weights are gamma and beta, in that order, so ``trainable_variables`` line up one to one with
the original model's (the running statistics are gone: they were never used). The result saves
to ``.keras`` and loads with ``keras.models.load_model(path)`` (safe mode on) without tfmeta, and
`predict` gives the outputs of the SavedModel's ``adapt_and_predict`` for the same batch. Keras'
`predict` splits its input into batches of ``batch_size`` (default 32) and each batch is
normalised on its own: pass ``batch_size=len(x)`` to normalise over a whole query set as
``adapt_and_predict`` does.

Under policy ``"running"`` (and for BatchNormalization layers that are not trainable, which use
their running statistics in tfmeta too) the copy keeps stock layers. So does a copy given
``statistics``: MAML++'s per-step running statistics (``MetaLearner(per_step_bn_stats=True)``),
which its stock layers then hold as their running mean and variance, so that `predict` normalises
every example alone, without a batch (non-transductive).

Example:
    >>> plain = plain_model(learner.model, adapted_params)
    >>> plain.save("adapted.keras")
    >>> keras.models.load_model("adapted.keras").predict(query_x, batch_size=len(query_x))
"""

from __future__ import annotations

from typing import Sequence

from tfmeta.core import _backend  # noqa: F401

import keras
from keras import ops

_LETTERS = "abcdefghij"


def _is_batch_statistics(layer, batchnorm: str) -> bool:
    return batchnorm == "batch" and isinstance(layer, keras.layers.BatchNormalization) and layer.trainable


def _input_shape(layer) -> tuple:
    try:
        return tuple(layer.input.shape)
    except (AttributeError, ValueError):
        shapes = getattr(layer, "_build_shapes_dict", None) or {}
        if len(shapes) == 1:
            return tuple(next(iter(shapes.values())))
    raise ValueError(f"BatchNormalization layer {layer.name!r}: its input shape is unknown (build the model).")


def _batch_statistics_block(layer: keras.layers.BatchNormalization) -> keras.Model:
    """A functional stand-in for `layer` that always normalises with batch statistics."""
    shape = _input_shape(layer)
    rank = len(shape)
    if not isinstance(layer.axis, int) or rank > len(_LETTERS):
        raise ValueError(f"BatchNormalization layer {layer.name!r}: axis={layer.axis!r} on a rank-{rank} "
                         "input is not supported by tfmeta.plain_model; expected one integer axis.")
    if layer.center and not layer.scale:
        raise ValueError(f"BatchNormalization layer {layer.name!r} has center=True, scale=False: "
                         "tfmeta.plain_model supports scale=True, or center=scale=False.")
    axis = layer.axis % rank
    reduce = [i for i in range(rank) if i != axis]
    inputs = keras.Input(shape[1:], dtype=layer.compute_dtype)
    mean = ops.mean(inputs, axis=reduce, keepdims=True)
    centered = ops.subtract(inputs, mean)
    variance = ops.mean(ops.square(centered), axis=reduce, keepdims=True)
    x = ops.multiply(centered, ops.rsqrt(ops.add(variance, layer.epsilon)))
    if layer.scale:
        if axis == rank - 1:
            channel, equation, output_shape = "c", "...c,c->...c", (shape[-1],)
        else:
            dims = _LETTERS[:rank]
            channel, equation, output_shape = dims[axis], f"{dims},{dims[axis]}->{dims}", tuple(shape[1:])
        x = keras.layers.EinsumDense(equation, output_shape=output_shape, name="gamma_beta",
                                     bias_axes=channel if layer.center else None, dtype=layer.dtype_policy)(x)
    return keras.Model(inputs, x, name=layer.name)


def plain_model(model: keras.Model, params: Sequence | None = None, *, batchnorm: str = "batch",
                statistics: Sequence | None = None) -> keras.Model:
    """A stock Keras copy of `model` that predicts as tfmeta runs it (see module docstring).

    Args:
        model: a functional or Sequential Keras model.
        params: values for its trainable weights, in ``model.trainable_variables`` order (e.g.
            adapted parameters); default the model's current weights.
        batchnorm: the learner's BatchNorm policy, "batch" or "running".
        statistics: None, or ``(mean, variance)`` per BatchNormalization layer (in the order of
            ``model._flatten_layers()``): stock layers with these running statistics.

    Raises:
        ValueError: a subclassed model with BatchNormalization under the "batch" policy (its layers
            cannot be swapped; use a functional model, ``batchnorm="running"``, or the exported
            SavedModel), or an unsupported BatchNormalization configuration.
    """
    if statistics is not None:
        layers = [l for l in model._flatten_layers(include_self=False)
                  if isinstance(l, keras.layers.BatchNormalization)]
        if len(statistics) != len(layers):
            raise ValueError(f"statistics has {len(statistics)} (mean, variance) pairs: expected one per "
                             f"BatchNormalization layer of model {model.name!r} ({len(layers)}).")
        given = {id(v): value for layer, pair in zip(layers, statistics)
                 for v, value in zip((layer.moving_mean, layer.moving_variance), pair)}
        batchnorm = "running"  # stock layers, which read the running statistics in inference
    bn = [l for l in model._flatten_layers(include_self=False) if _is_batch_statistics(l, batchnorm)]
    if not bn:
        clone = keras.models.clone_model(model)
    else:
        if not (isinstance(model, keras.Sequential) or hasattr(model, "_operations")):  # functional
            raise ValueError(
                f"model {model.name!r} is a subclassed Keras model with BatchNormalization: tfmeta cannot "
                "give it batch-statistics inference as a plain Keras model. Use a functional or Sequential "
                "model, batchnorm='running', or the exported SavedModel's signatures."
            )

        def clone_layer(layer):
            if _is_batch_statistics(layer, batchnorm):
                return _batch_statistics_block(layer)
            return layer.__class__.from_config(layer.get_config())

        clone = keras.models.clone_model(model, clone_function=clone_layer)
    replaced = {id(v) for layer in bn for v in (layer.moving_mean, layer.moving_variance)}
    state = [v for v in model.non_trainable_variables if id(v) not in replaced]
    if statistics is not None:
        state = [given.get(id(v), v) for v in state]
    values = list(params) if params is not None else [v.value for v in model.trainable_variables]
    pairs = list(zip(clone.trainable_variables, values)) + list(zip(clone.non_trainable_variables, state))
    if len(clone.trainable_variables) != len(values) or len(clone.non_trainable_variables) != len(state):
        raise ValueError(f"model {model.name!r}: its copy has other weights than the original "
                         f"({len(clone.trainable_variables)} vs {len(values)} trainable).")
    for variable, value in pairs:
        if tuple(variable.shape) != tuple(value.shape):
            raise ValueError(f"model {model.name!r}: weight {variable.path} has shape {tuple(variable.shape)}, "
                             f"its value {tuple(value.shape)}.")
        variable.assign(value)
    return clone
