"""Training recipes that drive a :class:`~tfmeta.training.MetaTrainer` with a particular estimator.

- :func:`pretrain`: LIL's pre-training of the initialization for first-order MAML
  (LIL, Sec. 6, Table 1, Appendix E);
- :func:`continual_shifting`: Algorithm 2 of continual trajectory shifting on a fixed batch of
  tasks (Shin et al. 2021).

They live above the estimators and the trainer because they use both; the estimators themselves
(:mod:`tfmeta.estimators.linearity`, :mod:`tfmeta.estimators.shifting`) know nothing of training.

References:
    Anonymous. "Enforcing Zero-Hessian in Meta-Learning." Under double-blind review (no arXiv
    identifier). Sec. 6, Table 1, Appendix E.

    Shin, J., Lee, H. B., Gong, B., Hwang, S. J. "Large-Scale Meta-Learning with Continual
    Trajectory Shifting." ICML 2021. arXiv:2102.07215.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfmeta.core import checks
from tfmeta.core.linearity import PHASE_WEIGHT
from tfmeta.estimators.linearity import LILPretraining
from tfmeta.estimators.shifting import Shifting
from tfmeta.training.trainer import MetaTrainer

__all__ = ["pretrain", "continual_shifting"]


def pretrain(
    learner,
    sampler,
    iterations: int,
    *,
    phase_weight: float = PHASE_WEIGHT,
    teacher_momentum: float = 0.999,
    meta_optimizer=None,
    progress: bool = False,
) -> list[dict]:
    """Pre-train the initialization with LIL's phase loss only (LIL, Appendix E).

    The recipe behind Table 1 and "FOMAML + LIL" (Sec. 6): for the first half of training the
    initialization learns only to make the inner loop linear, without the query labels; then
    first-order MAML trains it as usual. Per task, a teacher (an exponential moving average of
    the initialization, momentum `teacher_momentum`, as in BYOL) adapts for the learner's T inner
    steps, and the student's one-step linear estimate theta_hat = theta^0 - delta g_0 (delta: the
    teacher's path length over ||g_0||) is pulled towards the teacher's adapted prediction by the
    phase loss of Eq. 7 on the query inputs. Only the student is differentiated (one
    Hessian-vector product through g_0, like 1-step MAML). BYOL's predictor head is not used.

    Args:
        learner: the MetaLearner whose initialization is pre-trained (in place).
        sampler: a task sampler with ``dataset(start=0)`` (e.g. ``data.make_sampler(...)``).
        iterations: meta-steps of pre-training.
        phase_weight: weight of the phase loss (the paper's 0.1).
        teacher_momentum: EMA momentum of the teacher, in [0, 1) (the paper's 0.999).
        meta_optimizer: a Keras optimizer (default Adam(1e-3)).

    Returns:
        The per-step logs (``loss`` is the phase loss).

    Example (the paper trains 15k + 15k iterations)::

        recipes.pretrain(learner, sampler, iterations=15000)
        MetaTrainer(learner, "fomaml").fit(sampler, iterations=15000)
    """
    estimator = LILPretraining(phase_weight=phase_weight, teacher_momentum=teacher_momentum)
    trainer = MetaTrainer(learner, estimator, meta_optimizer)
    return trainer.fit(sampler, iterations, progress=progress)


def continual_shifting(learner, tasks, *, beta: float, horizon: int = 100, repeats: int = 3, **options):
    """Run Algorithm 2 of Shin et al. (2021) on a fixed batch of tasks: K * M meta-updates.

    The meta-optimizer is ``keras.optimizers.SGD(beta)``, so every meta-update is exactly
    Delta_k = -beta * mean_t MetaGrad(phi; theta_k^(t)) (line 11). Returns ``(trainer, history)``:
    the MetaTrainer (its `estimator` holds the task learners) and the per-step logs.

    Example:
        >>> learner = synthetic2d.make_learner((-5.0, 5.0))
        >>> trainer, history = continual_shifting(learner, Synthetic2DTasks().sample(0), beta=0.1)
        >>> int(trainer.step)
        300
    """
    beta = checks.number("beta", beta, at_least=0.0, convert=True)
    estimator = Shifting(horizon=horizon, repeats=repeats, **options)
    trainer = MetaTrainer(learner, estimator, keras.optimizers.SGD(beta))
    tasks = tuple(tf.convert_to_tensor(t) for t in tasks)
    history = [trainer.train_step(tasks) for _ in range(estimator.horizon * estimator.repeats)]
    return trainer, history

