"""5-way 1-shot Omniglot with ANIL (only the classifier head adapts) or any estimator.

Run: python examples/omniglot_anil.py --data-dir ../shared/data/omniglot [--estimator maml]
The data directory holds Omniglot's original archives (images_background_small1.zip, or the full
images_background.zip / images_evaluation.zip); without it tensorflow-datasets downloads Omniglot.
"""

import argparse

import keras

import tfmeta
from tfmeta import data, evaluation, models
from tfmeta.core import runtime
from tfmeta.core.learner import MetaLearner
from tfmeta.training import MetaTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", default=None)
parser.add_argument("--estimator", default="maml")
parser.add_argument("--adapt", default="head", choices=["all", "head", "body"])
parser.add_argument("--iterations", type=int, default=300)
args = parser.parse_args()

runtime.configure_threads()
keras.utils.set_random_seed(0)
kwargs = dict(ways=5, shots=1, query=15, data_dir=args.data_dir)
train = data.make_sampler("omniglot", "train", meta_batch=16, seed=0, **kwargs)
test = data.make_sampler("omniglot", "test", meta_batch=16, seed=1, **kwargs)
learner = MetaLearner(models.conv4(5), inner_lr=0.4, inner_steps=5, adapt=args.adapt)
MetaTrainer(learner, args.estimator, keras.optimizers.Adam(1e-3)).fit(train, args.iterations)
result = evaluation.evaluate(learner, test, episodes=200)
print(f"test accuracy after adaptation: {100 * result['accuracy_after']:.1f}% "
      f"± {100 * result['accuracy_after_ci95']:.1f} (before: {100 * result['accuracy_before']:.1f}%)")
