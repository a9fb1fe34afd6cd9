"""First-order MAML: the Jacobian of the inner loop replaced by the identity.

g_FOMAML = L'_query(phi~), the query-loss gradient at the adapted parameters, used as the gradient
of the initialization (Sun's overview, Sec. 3: "FOMAML treats these gradients as
constants"). The inner loop runs without an outer tape, so it costs about one plain training
step. Meta-network weights get only the gradient of their direct effect on the query loss.
With SGD (and momentum without weight decay) this equals MAML with the inner gradients stopped;
with weight decay it differs, because d phi_{T+1} / d theta is then (1 - eta*omega)^T-like, not I.

References:
    Finn, C., Abbeel, P., Levine, S. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks." ICML 2017. arXiv:1703.03400.

    Nichol, A., Achiam, J., Schulman, J. "On First-Order Meta-Learning Algorithms." 2018.
    arXiv:1803.02999.

    Sun, J. "Overview of Meta Learning: Learning to Learn." (Sun's overview: MAML, first-order
    MAML, Reptile, iMAML and Auto-Meta side by side; no arXiv identifier.)
"""

from __future__ import annotations

import tensorflow as tf

from tfmeta.estimators.base import Estimator, register, task_result, zeros_for_none


@register
class FirstOrderMAML(Estimator):
    """First-order MAML (Finn et al., Nichol et al.)."""

    name = "fomaml"

    def check(self, learner):
        if learner.lr_variables:
            raise ValueError(
                "meta_sgd=True needs a second-order estimator: estimator='fomaml' gives the "
                "learning rates no gradient. Use estimator='maml'."
            )

    def task_gradient(self, learner, meta_values, task, observer=None):
        meta = learner.unflatten(meta_values)
        params, seen = self.observed_params(learner, meta, task, observer)
        params = [tf.stop_gradient(p) for p in params]
        with tf.GradientTape() as tape:
            tape.watch(params)
            tape.watch(meta.net)
            loss, metrics = learner.outer_loss(params, meta, task.query_x, task.query_y)
        g_params, g_net = tape.gradient(loss, (params, meta.net))
        grads = list(g_params) + list(g_net)
        return task_result(loss, zeros_for_none(grads, meta_values), metrics, seen)
