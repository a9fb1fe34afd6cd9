"""The 2-D synthetic task family of Shin et al. 2021, Sec. 4.1 (continual trajectory shifting).

The template (Fig. 4a) is Himmelblau's function centred at (5, 5),

    f(x, y) = ((x^2 - 10x + y + 9)^2 + (x + y^2 - 10y + 13)^2) / 3,

with four global minima (value 0, :data:`TEMPLATE_MINIMA`). Task t translates the template's centre
to the point c_t on a circle around (5, 5) and rotates it by a random angle a_t around c_t
(Fig. 4b): with the rotation R(a) and a coordinate scale s,

    L_t(p) = f((5, 5) + R(a_t) (p - c_t) / s).

The learnable parameters are the 2-D point p itself. Two constants are not in the paper's text and
follow the authors' released code (JWoong148/ContinualTrajectoryShifting, synthetic/set_env.py and
synthetic/loss.py): the circle's radius is 7 and the coordinates are divided by s = 3 before the
template is applied (without that scale, inner SGD with momentum 0.9 and alpha = 0.05 diverges from
the paper's starting points such as (-5, 5) and (15, 5)). Both are arguments.

In tfmeta a model is a Keras model: :func:`point_model` is a one-layer model holding the 2-vector
p (its output is p, whatever the input), and :func:`make_learner` builds the MetaLearner whose inner
and outer losses are L_t (``inner_loss``/``outer_loss`` callables). A task is encoded in its inputs:
every row of ``support_x``/``query_x`` is ``(c_x, c_y, cos(a)/s, sin(a)/s)``; the targets are zeros
(the loss needs none). The paper's settings (alpha = 0.05, beta = 0.1, K = 100, M = 3, momentum 0.9)
are the defaults of :func:`make_learner` and of the ``shifting`` estimator with an SGD(0.1)
meta-optimizer.

Example:
    >>> tasks = Synthetic2DTasks(meta_batch=8, seed=0)
    >>> batch = tasks.sample(0)
    >>> batch.support_x.shape, batch.support_y.shape
    ((8, 1, 4), (8, 1, 1))
    >>> learner = make_learner(init=(-5.0, 5.0))          # momentum 0.9, alpha 0.05, T = 100
    >>> float(tasks.losses(np.tile([[-5.0, 5.0]], (8, 1))).mean()) > 0
    True

References:
    Shin, J., Lee, H. B., Gong, B., Hwang, S. J. "Large-Scale Meta-Learning with Continual
    Trajectory Shifting." ICML 2021. arXiv:2102.07215.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfmeta.core import _backend  # noqa: F401

import keras

from tfmeta.data.episodes import TaskBatch, check_index, check_positive_int, make_dataset

__all__ = [
    "Synthetic2DTasks", "Point", "point_model", "make_learner", "template", "task_loss",
    "TEMPLATE_CENTRE", "TEMPLATE_MINIMA", "RADIUS", "SCALE",
]

#: the template's centre (Himmelblau's function shifted by (5, 5)).
TEMPLATE_CENTRE = (5.0, 5.0)
#: the template's four global minima, f = 0 (Himmelblau's minima + (5, 5)).
TEMPLATE_MINIMA = (
    (8.0, 7.0),
    (5.0 - 2.805118086952745, 5.0 + 3.131312518250573),
    (5.0 - 3.779310253377747, 5.0 - 3.283185991286170),
    (5.0 + 3.584428340330492, 5.0 - 1.848126526964404),
)
#: radius of the circle of task centres around (5, 5) (authors' code).
RADIUS = 7.0
#: coordinates are divided by this before the template (authors' code).
SCALE = 3.0
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


def template(x, y):
    """f(x, y) of Sec. 4.1 (Fig. 4a): ((x^2 - 10x + y + 9)^2 + (x + y^2 - 10y + 13)^2) / 3.

    Works on numpy arrays and TensorFlow tensors alike.

    Example:
        >>> float(template(8.0, 7.0))
        0.0
    """
    return ((x * x - 10.0 * x + y + 9.0) ** 2 + (x + y * y - 10.0 * y + 13.0) ** 2) / 3.0


def task_loss(point, features):
    """L_t(p) = f((5, 5) + R(a_t)(p - c_t)/s) for points [..., 2] and task rows [..., 4].

    ``features`` rows are ``(c_x, c_y, cos(a)/s, sin(a)/s)`` as :class:`Synthetic2DTasks` writes
    them; numpy or TensorFlow.

    Example:
        >>> row = np.array([5.0, 12.0, 1 / 3, 0.0])          # centre (5, 12), no rotation
        >>> float(task_loss(np.array([5.0 + 9.0, 12.0 + 6.0]), row))  # (5,5)+(3,2) after /3
        0.0
    """
    dx = point[..., 0] - features[..., 0]
    dy = point[..., 1] - features[..., 1]
    c, s = features[..., 2], features[..., 3]
    u = TEMPLATE_CENTRE[0] + c * dx - s * dy
    v = TEMPLATE_CENTRE[1] + s * dx + c * dy
    return template(u, v)


@keras.saving.register_keras_serializable(package="tfmeta")
class Point(keras.layers.Layer):
    """A layer whose only weight is a 2-D point p; it outputs p for every input row.

    Example:
        >>> layer = Point(init=(1.0, 2.0))
        >>> tuple(layer(np.zeros((3, 4), "float32")).shape)
        (3, 2)
    """

    def __init__(self, init=(0.0, 0.0), **kwargs):
        super().__init__(**kwargs)
        init = tuple(float(v) for v in np.asarray(init, dtype=np.float64).reshape(-1))
        if len(init) != 2 or not all(np.isfinite(init)):
            raise ValueError(f"init={init!r} is not valid: expected two finite numbers.")
        self.init = init

    def build(self, input_shape):
        init = self.init
        self.point = self.add_weight(
            shape=(2,), name="point",
            initializer=lambda shape, dtype=None: keras.ops.convert_to_tensor(np.asarray(init), dtype=dtype),
        )

    def call(self, x):
        return keras.ops.zeros_like(x[..., :2]) + keras.ops.cast(self.point, x.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (2,)

    def get_config(self):
        return {**super().get_config(), "init": list(self.init)}


def point_model(init=(-5.0, 5.0), *, dtype=None) -> keras.Model:
    """The "network" of the synthetic experiment: inputs [N, 4] (task rows) -> the point p [N, 2].

    Example:
        >>> [tuple(v.shape) for v in point_model((0.0, 1.0)).trainable_variables]
        [(2,)]
    """
    inputs = keras.Input((4,), dtype=dtype)
    outputs = Point(init, dtype=dtype, name="point")(inputs)
    return keras.Model(inputs, outputs, name="point2d")


def _loss(learner, params, meta, x, y):
    del meta, y
    return tf.reduce_mean(task_loss(learner.fmodel(params, x), tf.cast(x, learner.dtype)))


#: the paper's inner loop (Shin et al. 2021, Sec. 4.1): SGD with momentum 0.9, alpha = 0.05, 100
#: inner steps; `tfmeta train --dataset synthetic2d` reads its defaults from here.
PAPER_INNER_LOOP = dict(inner_optimizer="momentum", inner_lr=0.05, inner_steps=100)


def make_learner(
    init=(-5.0, 5.0),
    *,
    inner_optimizer=PAPER_INNER_LOOP["inner_optimizer"],
    inner_lr: float | None = PAPER_INNER_LOOP["inner_lr"],
    inner_steps: int = PAPER_INNER_LOOP["inner_steps"],
    model: keras.Model | None = None,
    dtype=None,
    remat=None,
):
    """A MetaLearner for the synthetic tasks: the point model, inner and outer loss L_t.

    Defaults are the paper's (Sec. 4.1): SGD with momentum 0.9, alpha = 0.05, 100 inner steps.
    Pass ``model`` to share the point with another learner (e.g. one that evaluates with Adam, as
    the authors' code does in its meta-test, synthetic/get_avg_task_losses.py).

    Example:
        >>> learner = make_learner((15.0, 5.0), inner_optimizer="sgd", inner_lr=0.01)
        >>> learner.task
        'regression'
    """
    from tfmeta.core.learner import MetaLearner

    model = point_model(init, dtype=dtype) if model is None else model
    return MetaLearner(
        model, task="regression", inner_optimizer=inner_optimizer, inner_lr=inner_lr,
        inner_steps=inner_steps, inner_loss=_loss, outer_loss=_loss, remat=remat,
    )


class Synthetic2DTasks:
    """The fixed set of synthetic tasks of Sec. 4.1 with the sampler interface of SinusoidTasks.

    Task t (t = 0..meta_batch-1) has its centre at (5, 5) + radius (sin 2 pi t/T, cos 2 pi t/T)
    and a rotation angle drawn uniformly from [0, 2 pi) (a pure function of seed and split). Every
    ``sample(index)`` returns the same ``meta_batch`` tasks in the same order, as Algorithm 2 of
    Shin et al. 2021 needs: task learner t keeps task t. The "val" and "test" splits draw
    other rotations around the same centres.

    Args:
        meta_batch: number of tasks T (8 in the paper).
        shots, query: rows per support / query set (all rows identical; 1 is enough).
        radius, scale: geometry (see module docstring).
        seed: base seed (integer >= 0).
        split: "train", "val" or "test".

    Example:
        >>> tasks = Synthetic2DTasks(seed=3)
        >>> centres, angles = tasks.task_parameters()
        >>> centres.shape, angles.shape
        ((8, 2), (8,))
    """

    task_type = "regression"
    ways = 1
    feature_shape = (4,)

    def __init__(self, *, meta_batch=8, shots=1, query=1, radius=RADIUS, scale=SCALE, seed=0,
                 split="train"):
        self.meta_batch = check_positive_int("meta_batch", meta_batch)
        self.shots = check_positive_int("shots", shots)
        self.query = check_positive_int("query", query)
        for name, value in (("radius", radius), ("scale", scale)):
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} is not valid: expected a finite number > 0.")
        self.radius, self.scale = float(radius), float(scale)
        self.seed = check_index(seed, "seed")
        if split not in SPLIT_STREAMS:
            raise ValueError(f"split must be one of {tuple(SPLIT_STREAMS)}, got split={split!r}")
        self.name = split
        t = 2 * np.pi * np.arange(self.meta_batch) / self.meta_batch
        self._centres = np.asarray(TEMPLATE_CENTRE) + self.radius * np.stack([np.sin(t), np.cos(t)], -1)
        rng = np.random.default_rng([self.seed, SPLIT_STREAMS[split]])
        self._angles = rng.uniform(0.0, 2 * np.pi, size=self.meta_batch)

    def task_parameters(self) -> tuple[np.ndarray, np.ndarray]:
        """``(centres [T, 2], angles [T])`` of the tasks, float64."""
        return self._centres.copy(), self._angles.copy()

    def features(self) -> np.ndarray:
        """The task rows ``(c_x, c_y, cos(a)/s, sin(a)/s)``, float64 [T, 4]."""
        a = self._angles
        return np.concatenate(
            [self._centres, np.stack([np.cos(a), np.sin(a)], -1) / self.scale], -1
        )

    def losses(self, points) -> np.ndarray:
        """L_t(p_t) for points [T, 2] (one per task), float64 [T] (numpy reference).

        Example:
            >>> tasks = Synthetic2DTasks()
            >>> np.allclose(tasks.losses(tasks.minima()[:, 0]), 0.0)
            True
        """
        return task_loss(np.asarray(points, dtype=np.float64), self.features())

    def minima(self) -> np.ndarray:
        """The four global minima of every task, float64 [T, 4, 2]: p = c_t + s R(a_t)^T (m - (5, 5))."""
        a = self._angles
        rot_t = np.stack([np.stack([np.cos(a), np.sin(a)], -1),
                          np.stack([-np.sin(a), np.cos(a)], -1)], -2)  # R(a)^T, [T, 2, 2]
        m = np.asarray(TEMPLATE_MINIMA) - np.asarray(TEMPLATE_CENTRE)  # [4, 2]
        return self._centres[:, None, :] + self.scale * np.einsum("tij,mj->tmi", rot_t, m)

    @property
    def specs(self) -> TaskBatch:
        """TaskBatch of ``tf.TensorSpec`` describing one meta-batch."""
        m = self.meta_batch
        return TaskBatch(
            tf.TensorSpec((m, self.shots, 4), tf.float32), tf.TensorSpec((m, self.shots, 1), tf.float32),
            tf.TensorSpec((m, self.query, 4), tf.float32), tf.TensorSpec((m, self.query, 1), tf.float32),
        )

    def sample(self, index: int) -> TaskBatch:
        """The meta-batch at ``index``: the same T tasks for every index (float32 numpy).

        Example:
            >>> Synthetic2DTasks(meta_batch=2, query=3).sample(5).query_x.shape
            (2, 3, 4)
        """
        check_index(index)
        rows = self.features().astype(np.float32)[:, None, :]
        return TaskBatch(
            np.repeat(rows, self.shots, axis=1), np.zeros((self.meta_batch, self.shots, 1), np.float32),
            np.repeat(rows, self.query, axis=1), np.zeros((self.meta_batch, self.query, 1), np.float32),
        )

    def dataset(self, start: int = 0) -> tf.data.Dataset:
        """Endless deterministic dataset of TaskBatch tensors (``sample(start), sample(start+1), ...``)."""
        return make_dataset(self.sample, self.specs, start)

    def __repr__(self) -> str:
        return (
            f"Synthetic2DTasks(split={self.name!r}, meta_batch={self.meta_batch}, "
            f"radius={self.radius}, scale={self.scale}, seed={self.seed})"
        )
