"""Exact MAML: backpropagate through all T inner steps (second order).

The meta-gradient of one task is d L_query(phi_{T+1}(theta)) / d theta, computed by a tape around
the differentiable inner loop: Eq. 3-4 of 000_6b55c9a7831360bd.txt (the adjoint recursion through
the optimizer's dynamics, here done by reverse-mode autodiff) and g_MAML = U'(phi) L'(phi~) of
001_7e396414bca289e5.txt, Sec. 3. Meta-SGD learning rates and meta-networks that enter the inner
loss receive their exact gradients too (Eq. 8 of 000_6b55c9a7831360bd.txt).
"""

from __future__ import annotations

import tensorflow as tf

from tfmeta.estimators.base import Estimator, register, zeros_for_none


@register
class MAML(Estimator):
    """Exact second-order MAML (Finn et al.).

    Example:
        >>> est = tfmeta.estimators.get("maml")
        >>> loss, grads, metrics = est.meta_gradient(learner, task_batch)
    """

    name = "maml"
    second_order = True

    def task_gradient(self, learner, meta_values, task):
        with tf.GradientTape() as tape:
            tape.watch(meta_values)
            meta = learner.unflatten(meta_values)
            params = self.adapted_params(learner, meta, task)
            loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
        grads = tape.gradient(loss, meta_values)
        return loss, zeros_for_none(grads, meta_values), metrics
