"""Meta-training runs: a `MetaModel` plus checkpoints, resume, time budget and non-finite guard.

:class:`MetaTrainer` is the one training loop behind `tfmeta train` and the Python API: it drives
:class:`~tfmeta.keras_model.MetaModel` (Keras' own `fit`, so callbacks work) and adds what a run
needs around it. Checkpoints (`tf.train.CheckpointManager`) hold the meta-parameters, the
meta-optimizer state, the meta-step counter (which is also the position of the deterministic
task sampler) and any estimator state, so a resumed run sees the same tasks and reaches the same
parameters as an uninterrupted one. A NaN or Inf meta-loss or meta-gradient is caught inside the
compiled step before anything is applied, and the run stops with
:class:`NonFiniteMetaStepError`; the checkpoint on disk stays the last good one.

Example:
    >>> learner = MetaLearner(tfmeta.models.mlp(), task="regression", inner_lr=0.01, inner_steps=1)
    >>> trainer = MetaTrainer(learner, "maml", keras.optimizers.Adam(1e-3), checkpoint_dir="runs/x/ckpt")
    >>> history = trainer.fit(SinusoidTasks(shots=5, query=10, meta_batch=25), iterations=1000)
"""

from __future__ import annotations

import time
from typing import Callable

from tfmeta import _backend  # noqa: F401

import keras
import tensorflow as tf

from tfmeta.keras_model import FIELDS, NONFINITE_MARKER, MetaModel
from tfmeta.learner import MetaLearner


class NonFiniteMetaStepError(FloatingPointError):
    """A meta-step produced a NaN or Inf meta-loss or meta-gradient; nothing was applied."""


class _EveryStep(keras.callbacks.Callback):
    """Per-step bookkeeping: history, user hook, periodic checkpoints, time budget."""

    def __init__(self, trainer: "MetaTrainer", history: list, on_step, time_budget):
        super().__init__()
        self.trainer, self.history, self.on_step = trainer, history, on_step
        self.time_budget = time_budget
        self.began = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        # Runs before later callbacks (CSVLogger, TensorBoard): curves against time and steps.
        if logs is not None:
            logs["meta_step"] = float(self.trainer.step.numpy())
            logs["wall_seconds"] = time.monotonic() - self.began

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.trainer.step.numpy())
        entry = {k: float(v) for k, v in (logs or {}).items()}
        entry["step"] = step
        self.history.append(entry)
        if self.on_step is not None:
            self.on_step(step, entry)
        if step % self.trainer.checkpoint_every == 0:
            self.trainer.save()
        if self.time_budget is not None and time.monotonic() - self.began > self.time_budget:
            self.model.stop_training = True


class MetaTrainer:
    """Meta-train a :class:`MetaLearner` with an estimator and a Keras meta-optimizer.

    Args:
        learner: the MetaLearner.
        estimator: an Estimator or its name ("maml", "fomaml", "reptile", ...).
        meta_optimizer: a Keras optimizer (default Adam(1e-3)).
        checkpoint_dir: where checkpoints go (None: no checkpoints).
        checkpoint_every: meta-steps between checkpoints.
        max_checkpoints: checkpoints kept on disk.
        clip_norm: clip the meta-gradient to this global norm (None: no clipping).
        on_nonfinite: "stop" (raise NonFiniteMetaStepError) or "skip" (leave that step's
            update out, print a message naming the step, and go on).
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
        on_nonfinite: str = "stop",
    ):
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every!r} is not valid: expected an integer >= 1.")
        self.meta_model = MetaModel(learner)
        self.meta_model.compile(
            optimizer=meta_optimizer or keras.optimizers.Adam(1e-3), estimator=estimator,
            clip_norm=clip_norm, on_nonfinite=on_nonfinite,
        )
        self.learner = learner
        self.estimator = self.meta_model.estimator
        self.meta_optimizer = self.meta_model.optimizer
        self.step = self.meta_model.meta_step
        self.checkpoint_every = checkpoint_every
        self.manager = None
        if checkpoint_dir is not None:
            parts = dict(
                meta_variables=list(learner.meta_variables), optimizer=self.meta_optimizer, step=self.step
            )
            if self.estimator.state is not None:
                parts["estimator"] = self.estimator.state
            ckpt = tf.train.Checkpoint(**parts)
            self.manager = tf.train.CheckpointManager(ckpt, checkpoint_dir, max_checkpoints)

    def _non_finite(self, err: Exception) -> NonFiniteMetaStepError:
        where = ""
        if self.manager is not None and self.manager.latest_checkpoint:
            where = f" The last good checkpoint is {self.manager.latest_checkpoint}."
        return NonFiniteMetaStepError(
            f"meta-step {int(self.step.numpy()) + 1}: estimator {self.estimator.name!r} produced a "
            f"non-finite meta-loss or meta-gradient; nothing was applied.{where} "
            "Lower --meta-lr or --inner-lr, or set clip_norm."
        )

    def train_step(self, tasks) -> dict[str, float]:
        """One meta-update on a batch of tasks; returns this step's meta-loss and metrics.

        Raises NonFiniteMetaStepError (leaving the meta-parameters untouched) when the meta-loss
        or a meta-gradient is NaN or Inf.
        """
        tasks = tuple(tf.convert_to_tensor(t) for t in tasks)
        self.learner.check_tasks(tasks)
        self.meta_model.reset_metrics()
        try:
            logs = self.meta_model.train_on_batch(dict(zip(FIELDS, tasks)), return_dict=True)
        except tf.errors.InvalidArgumentError as err:
            if NONFINITE_MARKER in str(err):
                raise self._non_finite(err) from None
            raise
        return {k: float(v) for k, v in logs.items()}

    @property
    def inner_loop_report(self) -> dict | None:
        """The inner loop's effect at the initialization, measured when a fresh run starts."""
        return self.meta_model.inner_loop_report

    def restore(self) -> int:
        """Restore the latest checkpoint if there is one; returns the meta-step reached."""
        if self.manager is not None and self.manager.latest_checkpoint:
            self.manager.checkpoint.restore(self.manager.latest_checkpoint).assert_existing_objects_matched()
        return int(self.step.numpy())

    def save(self) -> str | None:
        return self.manager.save(checkpoint_number=int(self.step.numpy())) if self.manager else None

    def fit(
        self,
        sampler,
        iterations: int,
        *,
        time_budget: float | None = None,
        progress: bool = True,
        on_step: Callable[[int, dict], None] | None = None,
        callbacks: list | None = None,
        validation_data=None,
        validation_steps: int | None = None,
        steps_per_epoch: int | None = None,
        check_inner_loop: bool = True,
    ) -> list[dict]:
        """Meta-train until `iterations` meta-steps are done (or `time_budget` seconds pass).

        Resumes from the latest checkpoint: the task stream continues at the saved step. Logs
        are Keras' running means over the current epoch. Returns one log dict per meta-step.
        A fresh run first measures the inner loop's effect at the initialization (see
        `MetaModel.fit`; the result is `inner_loop_report`, with an `InnerLoopWarning` when the
        inner loop barely moves the model).
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations={iterations!r} is not valid: expected an integer >= 1.")
        start = self.restore()
        remaining = iterations - start
        history: list[dict] = []
        if remaining <= 0:
            return history
        per_epoch = min(steps_per_epoch or remaining, remaining)
        epochs = -(-remaining // per_epoch)
        every = _EveryStep(self, history, on_step, time_budget)
        sampler_or_data = sampler
        if epochs * per_epoch > remaining:  # the last epoch would run past `iterations`
            sampler_or_data = sampler.dataset(start=start).take(remaining)
        try:
            self.meta_model.fit(
                sampler_or_data, epochs=epochs, steps_per_epoch=per_epoch, initial_step=start,
                validation_data=validation_data, validation_steps=validation_steps,
                verbose=1 if progress else 0, callbacks=[every] + list(callbacks or []),
                check_inner_loop=check_inner_loop,
            )
        except tf.errors.InvalidArgumentError as err:
            if NONFINITE_MARKER in str(err):
                raise self._non_finite(err) from None
            raise
        if history and history[-1]["step"] % self.checkpoint_every:
            self.save()
        return history
