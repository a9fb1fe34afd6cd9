"""Functional core: run any Keras 3 model on explicit parameter tensors.

`FunctionalModel` wraps a built Keras model (Sequential, functional or subclassed) and calls it
through `keras.Model.stateless_call`, so the parameters are ordinary tensors that inner-loop
updates can produce and that `tf.GradientTape` can differentiate through, to any order, inside
`tf.function`.

BatchNorm policy
----------------
Keras' `BatchNormalization` takes its batch moments from `tf.nn.moments`, whose variance is
``mean(squared_difference(x, stop_gradient(mean)))``: values and first derivatives are right, but
terms of the second derivative are dropped, which makes an "exact" MAML meta-gradient silently
wrong (off by 37-206% on conv4). While a `FunctionalModel` runs, every BatchNormalization layer
computes its moments exactly instead (``mean = E[x]``, ``var = E[(x - mean)^2]``); the query
pass may use TensorFlow's fused batch norm on float32 conv feature maps, exact for the first
derivative it needs and faster (:func:`_fused_batch_call`). Two policies:

- ``"batch"`` (default): every inner step and the query pass normalise with the statistics of the
  current batch of the current task (transductive, as in Finn et al.).
- ``"running"``: normalise with the layer's stored running statistics (frozen during adaptation);
  the affine parameters gamma and beta still adapt.

Under both policies the running statistics are never updated by inner steps or meta-steps: the
BatchNorm state that `stateless_call` returns is discarded.

Random layers
-------------
Dropout and other layers that draw from a ``keras.random.SeedGenerator`` get a fresh generator
state on every call: from the open seed scope of :mod:`tfmeta.core.randomness` (the meta-step, task
and inner-step loops open and fold them, so each inner step of each task draws its own masks,
reproducibly), or, with no scope open, from the model's own generator states, which are then
advanced as in a plain Keras model.

Strided 1x1 convolutions
------------------------
With TensorFlow 2.21's oneDNN CPU kernels (on by default with tfmeta, see :mod:`tfmeta.core._backend`)
the filter gradient of a convolution whose kernel is 1x1 and whose stride is above 1 is wrong
(``Conv2DBackpropFilter`` and the depthwise one, when the input size is a multiple of the stride:
off by 20-200% on AVX2, float64 and Eigen kernels are right; on AVX-512 the same layer corrupts
the heap). ResNet-style shortcuts are such layers. While a `FunctionalModel` runs, every
Conv/DepthwiseConv/SeparableConv layer with a 1x1 kernel and a stride above 1 subsamples its input
first and convolves with stride 1: the same function (a 1x1 kernel reads exactly the strided
positions; "same" and "valid" padding add nothing), computed by kernels that are right
(:func:`pointwise_subsampling`). Keras' own ``model.fit`` outside tfmeta is not rewritten.

Which weights adapt
-------------------
``adapt`` selects the weights that the inner loop updates; the others are shared across tasks and
still meta-learned. ``"all"`` (MAML), ``"head"`` (ANIL: the weights of the last layer that has
weights), ``"body"`` (BOIL: every weight except the head), or any predicate ``fn(path) -> bool``
on Keras variable paths such as ``"sequential/dense_1/kernel"``.

Example:
    >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(40, activation="relu"),
    ...                           keras.layers.Dense(1)])
    >>> fmodel = FunctionalModel(model, adapt="head")
    >>> params = fmodel.parameters()            # list of tensors, one per trainable weight
    >>> y = fmodel(params, tf.zeros([5, 1]))    # differentiable in `params`
"""

from __future__ import annotations

import contextlib
import threading
import types
from typing import Callable, Sequence

from tfmeta.core import _backend  # noqa: F401
from tfmeta.core import randomness

import keras
import tensorflow as tf

ADAPT_CHOICES = ("all", "head", "body")
BATCHNORM_POLICIES = ("batch", "running")


def _exact_moments(layer, inputs, mask):
    """Batch moments with the full second derivative: var = mean(square(x - mean(x)))."""
    if mask is not None:  # Keras' masked branch is already exact.
        return type(layer)._moments(layer, inputs, mask)
    axes = list(layer._reduction_axes)
    mean = tf.reduce_mean(inputs, axis=axes, keepdims=True)
    variance = tf.reduce_mean(tf.square(inputs - mean), axis=axes, keepdims=True)
    mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
    return mean, variance


#: FusedBatchNormV3 refuses a smaller epsilon (it would clamp it): such layers keep the exact ops.
_FUSED_MIN_EPSILON = 1.001e-5


def _fused_batch_call(layer, inputs, training=None, mask=None):
    """BatchNorm with batch statistics as one ``FusedBatchNormV3`` where it applies.

    Applies to 4-D float32 inputs normalised over the last axis (conv feature maps, NHWC), in
    training mode, without a mask; anything else runs Keras' own call with
    :func:`_exact_moments`. The fused op normalises with the exact batch moments and its gradient
    op computes the full first derivative, so a pass that is differentiated once (the query pass
    of every estimator) is exact. It is NOT used inside inner loops: TensorFlow 2.21 gets the
    second derivative of the fused op wrong inside a differentiated ``tf.while_loop`` whose
    state carries more than the parameters (a MAML meta-gradient with a momentum inner
    optimizer came out 3-10% off; correct unrolled or with plain SGD). See
    ``FunctionalModel.__call__(fused_batchnorm=...)``.
    """
    axis = layer.axis if isinstance(layer.axis, int) else None
    if (
        mask is not None
        or not training
        or inputs.shape.rank != 4
        or axis not in (-1, 3)
        or inputs.dtype != tf.float32
        or layer.epsilon < _FUSED_MIN_EPSILON
    ):
        return type(layer).call(layer, inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    gamma = tf.cast(layer.gamma, inputs.dtype) if layer.scale else tf.ones([channels], inputs.dtype)
    beta = tf.cast(layer.beta, inputs.dtype) if layer.center else tf.zeros([channels], inputs.dtype)
    outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
        inputs, gamma, beta, epsilon=layer.epsilon, is_training=True
    )
    return tf.cast(outputs, layer.compute_dtype)


def _running_moments(layer, inputs, mask):
    """The layer's stored running statistics, read through the stateless scope."""
    del mask
    return (
        tf.cast(layer.moving_mean, inputs.dtype),
        tf.cast(layer.moving_variance, inputs.dtype),
    )


def _is_strided_pointwise(layer) -> bool:
    """A convolution layer with an all-ones kernel and some stride above 1 (not a transpose)."""
    from keras.src.layers.convolutional.base_conv import BaseConv
    from keras.src.layers.convolutional.base_depthwise_conv import BaseDepthwiseConv
    from keras.src.layers.convolutional.base_separable_conv import BaseSeparableConv

    if not isinstance(layer, (BaseConv, BaseDepthwiseConv, BaseSeparableConv)):
        return False
    kernel, strides = tuple(layer.kernel_size), tuple(layer.strides)
    return all(k == 1 for k in kernel) and any(s > 1 for s in strides)


def _subsampled_call(layer, inputs, *args, **kwargs):
    """`layer`'s call on its input subsampled by its strides, with strides 1 (same outputs)."""
    strides = tuple(layer.strides)
    spatial = tuple(slice(None, None, s) for s in strides)
    if layer.data_format == "channels_first":
        index = (slice(None), slice(None)) + spatial
    else:
        index = (slice(None),) + spatial + (slice(None),)
    object.__setattr__(layer, "strides", (1,) * len(strides))
    try:
        return type(layer).call(layer, inputs[index], *args, **kwargs)
    finally:
        object.__setattr__(layer, "strides", strides)


@contextlib.contextmanager
def pointwise_subsampling(layers: Sequence[keras.layers.Layer]):
    """Temporarily compute strided 1x1 convolution `layers` as subsampling + stride-1 convolution
    (see the module docstring: oneDNN's filter gradient of the strided form is wrong)."""
    for layer in layers:
        object.__setattr__(layer, "call", types.MethodType(_subsampled_call, layer))
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")


def _recording(fn, record: dict, index: int):
    """`fn` (a `_moments` function) that also stores its result, gradient stopped, in
    ``record[index]``."""
    def moments(layer, inputs, mask):
        mean, variance = fn(layer, inputs, mask)
        record[index] = (tf.stop_gradient(mean), tf.stop_gradient(variance))
        return mean, variance
    return moments


@contextlib.contextmanager
def batchnorm_policy(layers: Sequence[keras.layers.Layer], policy: str, *, fused: bool = False,
                     record: dict | None = None):
    """Temporarily replace `_moments` of BatchNormalization `layers` (see module docstring);
    with `fused` (policy "batch" only) also their call, by :func:`_fused_batch_call`. With a
    `record` dict (policy "batch", not fused), ``record[i]`` receives the batch moments of
    ``layers[i]`` (its last call)."""
    fn = {"batch": _exact_moments, "running": _running_moments}[policy]
    fused = fused and policy == "batch"
    for index, layer in enumerate(layers):
        moments = fn if record is None else _recording(fn, record, index)
        object.__setattr__(layer, "_moments", types.MethodType(moments, layer))
        if fused:
            object.__setattr__(layer, "call", types.MethodType(_fused_batch_call, layer))
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "_moments")
            if fused:
                object.__delattr__(layer, "call")


def _head_prefix(paths: Sequence[str]) -> str:
    """Path prefix of the layer that owns the last trainable weight (the classifier head)."""
    return paths[-1].rsplit("/", 1)[0] + "/"


def select_adapted(paths: Sequence[str], adapt) -> tuple[int, ...]:
    """Indices of the weights the inner loop updates, for an `adapt` choice (see module doc)."""
    if callable(adapt):
        chosen = tuple(i for i, p in enumerate(paths) if adapt(p))
    elif adapt in ADAPT_CHOICES:
        head = _head_prefix(paths)
        keep: Callable[[str], bool] = {
            "all": lambda p: True,
            "head": lambda p: p.startswith(head),
            "body": lambda p: not p.startswith(head),
        }[adapt]
        chosen = tuple(i for i, p in enumerate(paths) if keep(p))
    else:
        raise ValueError(
            f"adapt={adapt!r} is not valid: expected one of {ADAPT_CHOICES} or a callable "
            "fn(variable_path) -> bool."
        )
    if not chosen:
        raise ValueError(
            f"adapt={adapt!r} selects none of the model's trainable weights {list(paths)}."
        )
    return chosen


class FunctionalModel:
    """A built Keras model called on explicit parameter tensors (see module docstring).

    Args:
        model: a built `keras.Model` (or layer) that has trainable weights.
        adapt: which weights the inner loop updates: "all", "head", "body" or a predicate on paths.
        batchnorm: BatchNorm policy, "batch" (default) or "running".
    """

    def __init__(self, model: keras.Model, *, adapt="all", batchnorm: str = "batch"):
        if not isinstance(model, keras.layers.Layer):
            raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
        if not model.built:
            raise ValueError(
                "model is not built: call it once on an example batch, or give it an "
                "`keras.Input`, before meta-learning with it."
            )
        if not model.trainable_variables:
            raise ValueError(f"model {model.name!r} has no trainable weights to meta-learn.")
        if batchnorm not in BATCHNORM_POLICIES:
            raise ValueError(
                f"batchnorm={batchnorm!r} is not valid: expected one of {BATCHNORM_POLICIES}."
            )
        self.model = model
        self.batchnorm = batchnorm
        self._given_state = threading.local()  # see `given_state`
        self.paths = tuple(v.path for v in model.trainable_variables)
        self.adapted = select_adapted(self.paths, adapt)
        layers = list(model._flatten_layers(include_self=True))
        self._bn_layers = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
        self._strided_pointwise = [layer for layer in layers if _is_strided_pointwise(layer)]
        states = model.non_trainable_variables
        generators = [g.state for layer in layers for g in getattr(layer, "_seed_generators", ())]
        #: positions in `model.non_trainable_variables` of the random layers' generator states.
        self.random_states = tuple(
            i for i, v in enumerate(states) if any(v is g for g in generators)
        )
        for layer in self._bn_layers:
            if getattr(layer, "synchronized", False) or getattr(layer, "renorm", False):
                raise ValueError(
                    f"BatchNormalization layer {layer.name!r} uses synchronized or renorm "
                    "statistics, which tfmeta's exact moments do not support."
                )

    @property
    def dtype(self) -> tf.DType:
        return tf.as_dtype(self.model.trainable_variables[0].dtype)

    def parameters(self) -> list[tf.Tensor]:
        """Current values of the trainable weights, in `model.trainable_variables` order."""
        return [tf.convert_to_tensor(v.value) for v in self.model.trainable_variables]

    def state(self) -> list[tf.Tensor]:
        """Current values of the non-trainable state (BN statistics, RNG seeds).

        Inside :meth:`given_state`, the values given there instead of the variables' values.
        """
        given = getattr(self._given_state, "values", None)
        if given is not None:
            return list(given)
        return [tf.convert_to_tensor(v.value) for v in self.model.non_trainable_variables]

    @contextlib.contextmanager
    def given_state(self, values: Sequence[tf.Tensor]):
        """Calls in this context use `values` (as from :meth:`state`) and read no variable.

        A rematerialised inner loop (`tfmeta.core.inner_loop`, remat) recomputes its windows inside
        the gradient of a `tf.while_loop`, where reading a variable is not possible: it reads the
        state once and passes it in here.
        """
        previous = getattr(self._given_state, "values", None)
        self._given_state.values = list(values)
        try:
            yield
        finally:
            self._given_state.values = previous

    def __call__(self, params: Sequence[tf.Tensor], x, *, training: bool = True,
                 fused_batchnorm: bool = False):
        """Outputs of the model at `params` on inputs `x`; nothing in the model changes.

        `fused_batchnorm`: under the "batch" policy, normalise float32 conv feature maps with
        TensorFlow's fused batch norm (same values and first derivatives, about 12% faster MAML
        meta-steps on conv4). Only for passes that are not inside a differentiated
        `tf.while_loop` (see :func:`_fused_batch_call`): `MetaLearner.outer_loss` uses it for
        the query pass, inner loops never do.
        """
        states = self.state()
        seed = randomness.next_seed() if self.random_states else None
        if seed is not None:  # a fresh generator state per random layer (see module docstring)
            for k, i in enumerate(self.random_states):
                states[i] = tf.cast(randomness.fold_in(seed, k), states[i].dtype)
        with batchnorm_policy(self._bn_layers, self.batchnorm, fused=fused_batchnorm), \
                pointwise_subsampling(self._strided_pointwise):
            outputs, new_states = self.model.stateless_call(list(params), states, x, training=training)
        if self.random_states and seed is None:  # no scope: advance the model's own generators
            variables = self.model.non_trainable_variables
            for i in self.random_states:
                variables[i].assign(new_states[i])
        return outputs

    def batch_moments(self, params: Sequence[tf.Tensor], x) -> list[tuple[tf.Tensor, tf.Tensor]]:
        """The exact batch mean and variance at the input of every BatchNormalization layer, in
        ``bn_layers`` order, in one training-mode pass of the model at `params` on `x` (policy
        "batch"); constants: no gradient flows through them. MAML++'s per-step running statistics
        (:mod:`tfmeta.core.mamlpp`) are averages of these."""
        if self.batchnorm != "batch":
            raise ValueError(f"batch_moments needs the BatchNorm policy 'batch', not {self.batchnorm!r}.")
        record: dict = {}
        states = self.state()
        with batchnorm_policy(self._bn_layers, "batch", record=record), \
                pointwise_subsampling(self._strided_pointwise):
            self.model.stateless_call([tf.stop_gradient(p) for p in params], states, x, training=True)
        missing = [layer.name for i, layer in enumerate(self._bn_layers) if i not in record]
        if missing:
            raise ValueError(f"BatchNormalization layers {missing} took no batch statistics in a training pass "
                             "(not trainable, or not called): expected every one to normalise with its batch.")
        return [record[i] for i in range(len(self._bn_layers))]

    @property
    def bn_layers(self) -> list:
        """The model's BatchNormalization layers, in the order of :meth:`batch_moments`."""
        return list(self._bn_layers)

    def draw_seed(self) -> tf.Tensor:
        """A seed for a scope of :mod:`tfmeta.core.randomness`, drawn from (and advancing) the model's
        first random layer's generator state; a constant when the model has no random layer."""
        if not self.random_states:
            return tf.zeros([2], tf.int64)
        variable = self.model.non_trainable_variables[self.random_states[0]]
        value = tf.identity(variable.value)
        variable.assign(value + tf.constant([0, 1], value.dtype))
        return randomness.fold_in(tf.cast(value, tf.int64), 0x5EED)

    def initial_seed(self) -> tf.Tensor:
        """The model's first random layer's generator state now, as a seed (a constant)."""
        if not self.random_states:
            return tf.zeros([2], tf.int64)
        value = self.model.non_trainable_variables[self.random_states[0]].numpy()
        return tf.constant(value, tf.int64)

    def merge(self, params: Sequence[tf.Tensor], adapted: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """`params` with the adapted subset replaced by `adapted` (ordered as `self.adapted`)."""
        merged = list(params)
        for i, value in zip(self.adapted, adapted):
            merged[i] = value
        return merged
