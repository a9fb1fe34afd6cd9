"""tfmeta: fast, exact gradient-based meta-learning for TensorFlow 2 / Keras 3.

The public API, thin over the layers that implement it (docs/architecture.md):

- :class:`MetaLearner` (what is meta-learned), :class:`MetaModel` (Keras-native meta-training),
  :class:`MetaTrainer` (runs with checkpoints and guards);
- :mod:`tfmeta.estimators` (``estimators.get("maml" | "fomaml" | "reptile" | "reuse" | "implicit"
  | "shifting" | "linearity")``), :mod:`tfmeta.inner_optimizers`, :mod:`tfmeta.implicit`;
- :mod:`tfmeta.data`, :mod:`tfmeta.models`, :mod:`tfmeta.evaluation`, :mod:`tfmeta.export`.

The layers, each importing only those before it: ``tfmeta.core`` -> ``tfmeta.data`` ->
``tfmeta.implicit`` -> ``tfmeta.estimators`` -> ``tfmeta.training`` -> ``tfmeta.export`` ->
``tfmeta.app`` (the command line, benchmarks, Auto-Meta search).

Example:
    >>> import keras, tfmeta
    >>> learner = tfmeta.MetaLearner(tfmeta.models.mlp(), task="regression", inner_lr=0.01)
    >>> trainer = tfmeta.MetaTrainer(learner, "maml", keras.optimizers.Adam(1e-3))
    >>> trainer.fit(tfmeta.data.SinusoidTasks(shots=5, query=10, meta_batch=25), iterations=1000)
"""

from tfmeta.core import _backend  # noqa: F401  (sets KERAS_BACKEND before Keras loads)
from tfmeta.core import runtime as _runtime

# Grappler: no AddN scheduling rewrite (second-order gradients through nested while loops trip it:
# AlreadyExistsError on the second call), one round of passes: see tfmeta.core.runtime.configure_grappler.
_runtime.configure_grappler()

from tfmeta import data, estimators, export, implicit  # noqa: E402
from tfmeta.core import inner_optimizers, mamlpp, models  # noqa: E402
from tfmeta.core.learner import MetaLearner, MetaParams  # noqa: E402
from tfmeta.training import evaluation  # noqa: E402
from tfmeta.training.keras_model import MetaModel  # noqa: E402
from tfmeta.training.trainer import MetaTrainer, NonFiniteMetaStepError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MetaLearner", "MetaModel", "MetaParams", "MetaTrainer", "NonFiniteMetaStepError",
    "data", "estimators", "evaluation", "export", "implicit", "inner_optimizers", "mamlpp", "models",
]
