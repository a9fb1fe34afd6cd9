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
        if learner.lr_variables or learner.lslr_variables:
            what = "meta_sgd=True" if learner.lr_variables else "lslr=True (--lslr)"
            raise ValueError(
                f"{what} needs a second-order estimator: estimator='fomaml' gives the "
                "learning rates no gradient. Use estimator='maml'."
            )

    def task_gradient(self, learner, meta_values, task, observer=None):
        meta = learner.unflatten(meta_values)
        params, seen = self.observed_params(learner, meta, task, observer)
        params = [tf.stop_gradient(p) for p in params]
        with tf.GradientTape() as tape:
            tape.watch(params)
            tape.watch(meta.net)
            tape.watch(meta.bn)
            # per-step BatchNorm: the last step's set gets the gradient of its direct effect
            query_params = learner.at_step(params, meta, learner.inner_steps) if meta.bn else params
            loss, metrics = learner.outer_loss(query_params, meta, task.query_x, task.query_y)
        g_params, g_net, g_bn = tape.gradient(loss, (params, list(meta.net), list(meta.bn)))
        grads = (list(g_params) + [None] * len(meta.lr) + list(g_net) + [None] * len(meta.lslr)
                 + list(g_bn))
        return task_result(loss, zeros_for_none(grads, meta_values), metrics, seen)
