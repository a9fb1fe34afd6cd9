"""Meta-learn an initialization for sinusoid regression with exact MAML, through the Python API.

Run: python examples/sinusoid_maml.py   (about 30 s on two CPU cores)
"""

import keras

import tfmeta
from tfmeta import evaluation, models
from tfmeta.data import SinusoidTasks
from tfmeta.core.learner import MetaLearner
from tfmeta.training import MetaTrainer

keras.utils.set_random_seed(0)
learner = MetaLearner(models.mlp(), task="regression", inner_lr=0.01, inner_steps=1)
trainer = MetaTrainer(learner, "maml", keras.optimizers.Adam(1e-3))
trainer.fit(SinusoidTasks(shots=5, query=10, meta_batch=25, seed=0), iterations=3000)

test = SinusoidTasks(shots=5, query=10, meta_batch=25, seed=1, split="test")
result = evaluation.evaluate(learner, test, episodes=600, steps=10)
print(f"MSE before adaptation {result['loss_before']:.3f}, after 10 steps {result['loss_after']:.3f}")
