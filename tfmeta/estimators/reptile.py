"""Reptile: the meta-gradient of a task is theta - U^k(theta).

Algorithm 1 of 001_7e396414bca289e5.txt: phi~ = U^k_tau(phi), then phi <- phi + eps (phi~ - phi).
The meta-gradient returned is (theta - phi~), so a meta-optimizer SGD with learning rate eps is
exactly Reptile's update, and Adam treats (theta - phi~) as a gradient, as the paper suggests.
The inner loop runs on the support set; the reported loss is the query loss at phi~ (a
diagnostic, not differentiated). Weights that do not adapt get a zero meta-gradient.
"""

from __future__ import annotations

import tensorflow as tf

from tfmeta.estimators.base import Estimator, register


@register
class Reptile(Estimator):
    """Reptile (Nichol et al.)."""

    name = "reptile"

    def check(self, learner):
        from tfmeta import mamlpp

        mamlpp.refuse(learner, self.name)
        if learner.lr_variables or learner.meta_network is not None:
            raise ValueError(
                "estimator='reptile' meta-learns the initialization only: it cannot train "
                "meta_sgd learning rates or a meta_network. Use estimator='maml'."
            )

    def task_gradient(self, learner, meta_values, task):
        meta = learner.unflatten(meta_values)
        params = self.adapted_params(learner, meta, task)
        loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
        grads = [tf.stop_gradient(theta - phi) for theta, phi in zip(meta.init, params)]
        return tf.stop_gradient(loss), grads, metrics
