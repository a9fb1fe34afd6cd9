"""Exact MAML: backpropagate through all T inner steps (second order).

The meta-gradient of one task is d L_query(phi_{T+1}(theta)) / d theta, computed by a tape around
the differentiable inner loop: Kim et al. 2020, Eq. 3-4 (the adjoint recursion through
the optimizer's dynamics, here done by reverse-mode autodiff) and g_MAML = U'(phi) L'(phi~) of
Sun's overview, Sec. 3. Meta-SGD learning rates and meta-networks that enter the inner
loss receive their exact gradients too (Kim et al. 2020, Eq. 8).

Two MAML++ options (Antoniou, Edwards, Storkey 2019, Sec. 4; :mod:`tfmeta.core.mamlpp`):
``msl_steps=N``, the multi-step loss annealed over the first N meta-steps, and
``first_order_steps=N``, derivative-order annealing (first order for the first N meta-steps).
Both read the meta-step counter bound by the training loop (:meth:`Estimator.bind_meta_step`).

References:
    Finn, C., Abbeel, P., Levine, S. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks." ICML 2017. arXiv:1703.03400.

    Kim, J.-H., Park, J., Choi, Y. "Multi-step Estimation for Gradient-based Meta-learning."
    2020. arXiv:2004.05439.

    Sun, J. "Overview of Meta Learning: Learning to Learn." (Sun's overview: MAML, first-order
    MAML, Reptile, iMAML and Auto-Meta side by side; no arXiv identifier.)

    Antoniou, A., Edwards, H., Storkey, A. "How to train your MAML." ICLR 2019. arXiv:1810.09502.
"""

from __future__ import annotations

import tensorflow as tf

from tfmeta.core import mamlpp
from tfmeta.core.inner_loop import combine
from tfmeta.estimators.base import Estimator, Flag, register, task_result, zeros_for_none


@register
class MAML(Estimator):
    """Exact second-order MAML (Finn et al.), with MAML++'s MSL and DA as options.

    Args:
        msl_steps: N >= 0: the multi-step loss (MSL) for the first N meta-steps, its weights
            annealed towards the last step (:func:`tfmeta.core.mamlpp.msl_weights`); 0: off.
        first_order_steps: N >= 0: derivative-order annealing (DA), first order for the first N
            meta-steps, then exact second order; 0: off.

    Example:
        >>> est = tfmeta.estimators.get("maml")
        >>> loss, grads, metrics = est.meta_gradient(learner, task_batch)
        >>> est = tfmeta.estimators.get("maml", msl_steps=5000, first_order_steps=25000)  # MAML++
    """

    name = "maml"
    second_order = True
    flags = (
        Flag("msl_steps", mamlpp.nonnegative_steps, 0,
             "maml estimator: MAML++ multi-step loss over the first N meta-steps, its weights annealed "
             "towards the last inner step (Antoniou et al. 2019); 0: off"),
        Flag("first_order_steps", mamlpp.nonnegative_steps, 0,
             "maml estimator: MAML++ derivative-order annealing, first order for the first N meta-steps, "
             "then second order (Antoniou et al. 2019); 0: off"),
    )

    def __init__(self, msl_steps: int = 0, first_order_steps: int = 0, parallel_tasks: int = 2,
                 linearity_metrics: bool = False):
        super().__init__(parallel_tasks=parallel_tasks, linearity_metrics=linearity_metrics)
        self.msl_steps = mamlpp.check_steps("msl_steps", msl_steps)
        self.first_order_steps = mamlpp.check_steps("first_order_steps", first_order_steps)

    def check(self, learner):
        super().check(learner)
        if self.msl_steps and learner.remat is not None:
            raise ValueError(
                f"msl_steps={self.msl_steps} (--msl-steps) is not valid with remat={learner.remat!r} "
                "(--remat): the multi-step loss's query passes inside the inner loop are not "
                "rematerialised. Expected --remat none, or --msl-steps 0.")
        if self.msl_steps and self.linearity_metrics:
            raise ValueError(f"msl_steps={self.msl_steps} (--msl-steps) is not valid with "
                             "--linearity-metrics: both observe the inner loop. Drop one.")

    def _step(self):
        if self.meta_step is None:
            raise ValueError(
                "msl_steps / first_order_steps (--msl-steps / --first-order-steps) follow the "
                "meta-step: train through MetaModel or MetaTrainer, or call "
                "estimator.bind_meta_step(variable) first.")
        return self.meta_step

    def adapted_params(self, learner, meta, task, observer=None):
        if not self.first_order_steps:
            return super().adapted_params(learner, meta, task, observer)
        return learner.adapt(
            meta, task.support_x, task.support_y, observer=observer,
            second_order=mamlpp.second_order_at(self._step(), self.first_order_steps))

    def task_gradient(self, learner, meta_values, task, observer=None):
        with tf.GradientTape() as tape:
            tape.watch(meta_values)
            meta = learner.unflatten(meta_values)
            if self.msl_steps and learner.inner_steps > 1:
                weights = mamlpp.msl_weights(mamlpp.read_step(self._step()), learner.inner_steps,
                                             self.msl_steps, learner.dtype)
                msl = mamlpp.msl_observer(learner, meta, task.query_x, task.query_y, weights)
                params, acc = self.adapted_params(
                    learner, meta, task, observer=msl if observer is None else combine(msl, observer))
                earlier, seen = (acc, None) if observer is None else (acc[0], (meta, params, acc[1]))
                loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
                objective = earlier + weights[-1] * tf.cast(loss, learner.dtype)
            else:
                params, seen = self.observed_params(learner, meta, task, observer)
                loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
                objective = loss
        grads = tape.gradient(objective, meta_values)
        # with MSL the meta-loss reported is the weighted objective (the query loss once annealed)
        return task_result(objective, zeros_for_none(grads, meta_values), metrics, seen)
