"""Reptile: the meta-gradient of a task is theta - U^k(theta).

Sun's overview, Algorithm 1: phi~ = U^k_tau(phi), then phi <- phi + eps (phi~ - phi).
The meta-gradient returned is (theta - phi~), so a meta-optimizer SGD with learning rate eps is
exactly Reptile's update, and Adam treats (theta - phi~) as a gradient, as the paper suggests.
The inner loop runs on the support set; the reported loss is the query loss at phi~ (a
diagnostic, not differentiated). Weights that do not adapt get a zero meta-gradient.

References:
    Nichol, A., Achiam, J., Schulman, J. "On First-Order Meta-Learning Algorithms." 2018.
    arXiv:1803.02999.

    Sun, J. "Overview of Meta Learning: Learning to Learn." (Sun's overview: MAML, first-order
    MAML, Reptile, iMAML and Auto-Meta side by side; no arXiv identifier.)
"""

from __future__ import annotations

import tensorflow as tf

from tfmeta.estimators.base import Estimator, register, task_result


@register
class Reptile(Estimator):
    """Reptile (Nichol et al.)."""

    name = "reptile"

    def check(self, learner):
        from tfmeta.core import mamlpp

        mamlpp.refuse(learner, self.name)
        if learner.lr_variables or learner.meta_network is not None:
            raise ValueError(
                "estimator='reptile' meta-learns the initialization only: it cannot train "
                "meta_sgd learning rates or a meta_network. Use estimator='maml'."
            )

    def task_gradient(self, learner, meta_values, task, observer=None):
        meta = learner.unflatten(meta_values)
        params, seen = self.observed_params(learner, meta, task, observer)
        loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
        grads = [tf.stop_gradient(theta - phi) for theta, phi in zip(meta.init, params)]
        return task_result(tf.stop_gradient(loss), grads, metrics, seen)
