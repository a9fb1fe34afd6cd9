"""Training: the Keras-native meta-model, the trainer, evaluation, recipes.

- :mod:`tfmeta.training.keras_model`: :class:`MetaModel`, meta-training inside Keras' ``fit``;
- :mod:`tfmeta.training.trainer`: :class:`MetaTrainer` (checkpoints, resume, time budget,
  non-finite guard);
- :mod:`tfmeta.training.evaluation`: held-out tasks, mean and 95% interval;
- :mod:`tfmeta.training.recipes`: LIL pre-training, continual trajectory shifting as one call.

This layer runs estimators (:mod:`tfmeta.estimators`) on data (:mod:`tfmeta.data`); nothing below
it imports it.
"""

from tfmeta.training.trainer import (
    CheckpointError, MetaTrainer, NonFiniteMetaStepError, checkpoint_numbers, checkpoint_problem,
)

__all__ = ["CheckpointError", "MetaTrainer", "NonFiniteMetaStepError", "checkpoint_numbers",
           "checkpoint_problem"]
