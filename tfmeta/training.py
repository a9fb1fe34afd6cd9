"""The meta-training loop: estimator -> meta-gradient -> Keras meta-optimizer, with checkpoints.

:class:`MetaTrainer` compiles one meta-step per input shape (the meta-batch dimension is left
unknown, so the graph is traced once whatever M is), refuses non-finite meta-losses or
meta-gradients before they touch the meta-parameters, and checkpoints meta-parameters,
meta-optimizer state and the step counter (which is also the position of the deterministic task
sampler) with `tf.train.CheckpointManager`, so a run resumes where its last checkpoint left it.

Example:
    >>> learner = MetaLearner(tfmeta.models.mlp(), task="regression", inner_lr=0.01, inner_steps=1)
    >>> trainer = MetaTrainer(learner, "maml", keras.optimizers.Adam(1e-3))
    >>> history = trainer.fit(SinusoidTasks(shots=5, query=10, meta_batch=25), iterations=1000)
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable

from tfmeta import _backend  # noqa: F401

import keras
import tensorflow as tf

from tfmeta import estimators
from tfmeta.learner import MetaLearner


class NonFiniteMetaStepError(FloatingPointError):
    """A meta-step produced a NaN or Inf meta-loss or meta-gradient; nothing was applied."""


def _task_spec(batch) -> tuple:
    """TensorSpecs of a task batch with the meta-batch dimension left unknown."""
    return tuple(
        tf.TensorSpec([None] + list(t.shape[1:]), tf.as_dtype(t.dtype)) for t in batch
    )


class MetaTrainer:
    """Meta-train a :class:`MetaLearner` with an estimator and a Keras meta-optimizer.

    Args:
        learner: the MetaLearner.
        estimator: an Estimator or its name ("maml", "fomaml", "reptile", ...).
        meta_optimizer: a Keras optimizer (default Adam(1e-3)).
        checkpoint_dir: where checkpoints go (None: no checkpoints).
        checkpoint_every: meta-steps between checkpoints.
        clip_norm: clip the meta-gradient to this global norm (None: no clipping).
    """

    def __init__(
        self,
        learner: MetaLearner,
        estimator="maml",
        meta_optimizer: keras.optimizers.Optimizer | None = None,
        *,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 100,
        max_checkpoints: int = 3,
        clip_norm: float | None = None,
    ):
        if isinstance(estimator, str):
            estimator = estimators.get(estimator)
        estimator.check(learner)
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every!r} is not valid: expected >= 1.")
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm={clip_norm!r} is not valid: expected a number > 0.")
        self.learner = learner
        self.estimator = estimator
        self.meta_optimizer = meta_optimizer or keras.optimizers.Adam(1e-3)
        self.meta_optimizer.build(learner.meta_variables)
        self.clip_norm = clip_norm
        self.checkpoint_every = checkpoint_every
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="meta_step")
        self._compute = None
        self._apply = tf.function(self._apply_fn)
        self.manager = None
        if checkpoint_dir is not None:
            ckpt = tf.train.Checkpoint(
                meta_variables=list(learner.meta_variables),
                optimizer=self.meta_optimizer,
                step=self.step,
            )
            self.manager = tf.train.CheckpointManager(ckpt, checkpoint_dir, max_checkpoints)

    # -- one meta-step -----------------------------------------------------------------------------
    def _compute_fn(self, *tasks):
        result = self.estimator.meta_gradient(self.learner, tasks)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in result.grads])
        finite = tf.logical_and(finite, tf.math.is_finite(result.loss))
        grads = result.grads
        if self.clip_norm is not None:
            grads, _ = tf.clip_by_global_norm(grads, self.clip_norm)
        return result.loss, grads, result.metrics, finite

    def _apply_fn(self, grads):
        self.meta_optimizer.apply(grads, self.learner.meta_variables)
        self.step.assign_add(1)

    def compiled_step(self, tasks):
        """The compiled graph of one meta-gradient computation (traced on first use)."""
        if self._compute is None:
            self._compute = tf.function(self._compute_fn, input_signature=_task_spec(tasks))
        return self._compute

    def train_step(self, tasks) -> dict[str, float]:
        """One meta-update on a batch of tasks; returns the meta-loss and metrics.

        Raises NonFiniteMetaStepError (leaving the meta-parameters untouched) when the meta-loss
        or a meta-gradient is NaN or Inf.
        """
        tasks = tuple(tf.convert_to_tensor(t) for t in tasks)
        self.learner.check_tasks(tasks)
        loss, grads, metrics, finite = self.compiled_step(tasks)(*tasks)
        if not bool(finite):
            where = f" The last good checkpoint is {self.manager.latest_checkpoint}." if (
                self.manager and self.manager.latest_checkpoint
            ) else ""
            raise NonFiniteMetaStepError(
                f"meta-step {int(self.step) + 1}: estimator {self.estimator.name!r} produced a "
                f"non-finite meta-loss or meta-gradient (loss={float(loss)}); nothing was applied."
                f"{where} Lower --meta-lr or --inner-lr, or set clip_norm."
            )
        self._apply(grads)
        return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}

    # -- the loop ----------------------------------------------------------------------------------
    def restore(self) -> int:
        """Restore the latest checkpoint if there is one; returns the meta-step reached."""
        if self.manager is not None and self.manager.latest_checkpoint:
            self.manager.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        return int(self.step)

    def save(self) -> str | None:
        return self.manager.save(checkpoint_number=int(self.step)) if self.manager else None

    def fit(
        self,
        sampler,
        iterations: int,
        *,
        time_budget: float | None = None,
        progress: bool = True,
        on_step: Callable[[int, dict], None] | None = None,
    ) -> list[dict]:
        """Meta-train until `iterations` meta-steps are done (or `time_budget` seconds pass).

        Resumes from the latest checkpoint: the task stream continues at the saved step, so a
        resumed run sees the same tasks as an uninterrupted one.
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations={iterations!r} is not valid: expected an integer >= 1.")
        start = self.restore()
        history: list[dict] = []
        began = time.monotonic()
        bar = _Progress(iterations, start, enabled=progress)
        for tasks in sampler.dataset(start=start).take(max(iterations - start, 0)):
            logs = self.train_step(tasks)
            step = int(self.step)
            logs["step"] = step
            history.append(logs)
            bar.update(step, logs)
            if on_step is not None:
                on_step(step, logs)
            if step % self.checkpoint_every == 0:
                self.save()
            if time_budget is not None and time.monotonic() - began > time_budget:
                break
        bar.close()
        if history and history[-1]["step"] % self.checkpoint_every:
            self.save()
        return history


class _Progress:
    """A one-line progress display on stderr (step, rate, loss, time left)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled and total > 0
        self.began = time.monotonic()
        self.last = 0.0

    def update(self, step: int, logs: dict):
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.25 and step < self.total):
            return
        self.last = now
        done = step - self.start
        rate = done / max(now - self.began, 1e-9)
        left = (self.total - step) / rate if rate > 0 else math.inf
        width = 24
        filled = int(width * step / self.total)
        metrics = " ".join(f"{k} {v:.4f}" for k, v in logs.items() if k != "step")
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
            f"{rate:.1f} step/s, ~{left:.0f}s left  {metrics}   "
        )
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
