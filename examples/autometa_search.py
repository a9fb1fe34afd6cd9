"""Auto-Meta from Python: a small progressive architecture search, then use what it found.

Run: python examples/autometa_search.py --data-dir ../shared/data/omniglot --out /tmp/autometa
(without --data-dir it searches the synthetic glyph family of tfmeta.app.autometa.synthetic).

The search meta-trains every 1-block cell with Reptile for --trial-budget meta-steps, scores each
by 5-way 1-shot accuracy on held-out classes, and grows the best cells one block at a time, the
surrogate choosing which expansions to meta-train (KerasTuner runs it; rerun the same command to
resume an interrupted search). Then it rebuilds the best network from its JSON description,
serves the exported adapter the way TF Serving would, and prints how well the surrogate ranked.
"""

import argparse

import numpy as np
import tensorflow as tf

import tfmeta  # noqa: F401
from tfmeta.core import runtime
from tfmeta.app.autometa.search import SearchConfig, make_samplers, run_search
from tfmeta.app.autometa.space import Architecture

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", default=None)
parser.add_argument("--out", default="autometa-example")
parser.add_argument("--blocks", type=int, default=2)
parser.add_argument("--top-k", type=int, default=4)
parser.add_argument("--trial-budget", type=int, default=10)
parser.add_argument("--budget-minutes", type=float, default=10.0)
parser.add_argument("--operators", default="conv3x3,sep3x3,maxpool3x3,identity")
args = parser.parse_args()

runtime.configure_threads()
tf.get_logger().setLevel("ERROR")
config = SearchConfig(
    dataset="omniglot" if args.data_dir else "synthetic", data_dir=args.data_dir,
    estimator="reptile", blocks=args.blocks, top_k=args.top_k, operators=args.operators,
    trial_budget=args.trial_budget, budget_minutes=args.budget_minutes, out=args.out,
    image_size=14, filters=8, reductions=1, meta_batch=4, query=5, inner_steps=3,
    val_episodes=40, test_episodes=100,
)
result = run_search(config)

best = result["best"]
print(f"{result['trials_completed']} candidates meta-trained in {result['elapsed_seconds']:.0f}s; best "
      f"(val accuracy {100 * best['score']:.1f}%): {best['cell_description']}")
if result["test"]:
    print(f"meta-test accuracy {100 * result['test']['accuracy_after']:.1f}% "
          f"± {100 * result['test']['accuracy_after_ci95']:.1f}")
report = result["surrogate"]
print(f"surrogate rank correlation: held-out {report['heldout_spearman']} over {report['heldout_pairs']} "
      f"chosen candidates, 5-fold cross-validated {report['cv_spearman']} over {report['cv_trials']} trials")

# The JSON description rebuilds the architecture: a plain Keras model for any tfmeta estimator.
model = Architecture.load(result["architecture"]).build()
print(f"rebuilt {model.name}: {model.count_params()} parameters")

# The export adapts per request inside the serving graph (no tfmeta needed to serve it).
served = tf.saved_model.load(result["export"]).signatures["adapt_and_predict"]
task = make_samplers(config)["test"].sample(0)
logits = served(support_x=tf.constant(task.support_x[0]), support_y=tf.constant(task.support_y[0]),
                query_x=tf.constant(task.query_x[0]))["logits"]
accuracy = np.mean(np.argmax(logits.numpy(), -1) == task.query_y[0])
print(f"served adapt_and_predict on one test task: query accuracy {100 * accuracy:.0f}%")
