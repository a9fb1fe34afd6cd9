"""Exact MAML: backpropagate through all T inner steps (second order).

The meta-gradient of one task is d L_query(phi_{T+1}(theta)) / d theta, computed by a tape around
the differentiable inner loop: Kim et al. 2020, Eq. 3-4 (the adjoint recursion through
the optimizer's dynamics, here done by reverse-mode autodiff) and g_MAML = U'(phi) L'(phi~) of
Sun's overview, Sec. 3. Meta-SGD learning rates and meta-networks that enter the inner
loss receive their exact gradients too (Kim et al. 2020, Eq. 8).

References:
    Finn, C., Abbeel, P., Levine, S. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks." ICML 2017. arXiv:1703.03400.

    Kim, J.-H., Park, J., Choi, Y. "Multi-step Estimation for Gradient-based Meta-learning."
    2020. arXiv:2004.05439.

    Sun, J. "Overview of Meta Learning: Learning to Learn." (Sun's overview: MAML, first-order
    MAML, Reptile, iMAML and Auto-Meta side by side; no arXiv identifier.)
"""

from __future__ import annotations

import tensorflow as tf

from tfmeta.estimators.base import Estimator, register, task_result, zeros_for_none


@register
class MAML(Estimator):
    """Exact second-order MAML (Finn et al.).

    Example:
        >>> est = tfmeta.estimators.get("maml")
        >>> loss, grads, metrics = est.meta_gradient(learner, task_batch)
    """

    name = "maml"
    second_order = True

    def task_gradient(self, learner, meta_values, task, observer=None):
        with tf.GradientTape() as tape:
            tape.watch(meta_values)
            meta = learner.unflatten(meta_values)
            params, seen = self.observed_params(learner, meta, task, observer)
            loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
        grads = tape.gradient(loss, meta_values)
        return task_result(loss, zeros_for_none(grads, meta_values), metrics, seen)
