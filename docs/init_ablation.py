"""One-factor-at-a-time initialization experiments behind docs/initialization.md.

MAML (exact second order), conv4, Omniglot small archive: meta-train on tfmeta's train split
(Balinese, Early_Aramaic, Korean; classes = character x rotation), 5-way 1-shot, 15 query, M tasks,
T=5 inner SGD steps at lr 0.4, Adam 1e-3. Every variant starts from conv4(init="keras") (Keras'
layer defaults) and changes the named factors to PyTorch's defaults:

  kernel   conv kernels from VarianceScaling(1/3, "fan_in", "uniform") (PyTorch's kaiming_uniform(a=sqrt 5))
  bias     conv biases uniform in +-1/sqrt(fan_in)
  bn_eps   BatchNorm epsilon 1e-5 (Keras: 1e-3)
  head     Dense head: kernel and bias as PyTorch's nn.Linear
  adam_eps Adam epsilon 1e-8 (Keras: 1e-7)
  scale10  (not a PyTorch factor) every kernel multiplied by 10

`--variant all` is every PyTorch factor together; `--variant default` is tfmeta's conv4() as it is
(init="pytorch": the kernel, bias, head and BatchNorm factors, epsilon 1.001e-5; Adam epsilon 1e-7).

Reports, as one JSON line per run: the inner loop's effect at the initialization (relative support
loss drop over T steps and relative change of each kernel, MetaLearner.inner_loop_effect), the first meta-step's train query accuracy,
and held-out accuracy after N meta-steps with the protocol of ../shared/peerbench/l2l_omniglot.py
(HOLDOUT.npz from omniglot_npz.py, no rotations, 5-way 1-shot, 5 query per class, 200 episodes drawn
with random.Random(0), T adaptation steps, mean and 95% interval), so figures compare with
learn2learn's on the very same episodes.

usage: PYTHONPATH=. python docs/init_ablation.py --data-dir DIR --holdout test.npz --variant kernel,bias
           [--steps 20,80] [--M 32] [--seed 0] [--effect-only]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

import numpy as np

FACTORS = ("kernel", "bias", "bn_eps", "head", "adam_eps", "scale10")


def build(variant: set, ways: int = 5):
    import keras

    from tfmeta import models

    model = models.conv4(ways, init="keras")
    for layer in model.layers:
        is_conv = isinstance(layer, keras.layers.Conv2D)
        is_head = isinstance(layer, keras.layers.Dense)
        if (is_conv and "kernel" in variant) or (is_head and "head" in variant):
            layer.kernel.assign(keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")(layer.kernel.shape))
        if (is_conv and "bias" in variant) or (is_head and "head" in variant):
            fan_in = int(np.prod(layer.kernel.shape[:-1]))
            bound = 1 / math.sqrt(fan_in)
            layer.bias.assign(keras.initializers.RandomUniform(-bound, bound)(layer.bias.shape))
        if isinstance(layer, keras.layers.BatchNormalization) and "bn_eps" in variant:
            layer.epsilon = 1e-5
        if (is_conv or is_head) and "scale10" in variant:
            layer.kernel.assign(layer.kernel * 10.0)
    return model


def holdout_episodes(path: str, episodes: int):
    """The episodes of l2l_omniglot.py's evaluation, in the same order."""
    data = np.load(path)
    x, y = data["images"], data["labels"]
    chars = [np.where(y == c)[0] for c in range(y.max() + 1)]
    er = random.Random(0)
    sx, qx, qy = [], [], []
    for _ in range(episodes):
        cls = er.sample(range(len(chars)), 5)
        s, q, l = [], [], []
        for i, c in enumerate(cls):
            idx = er.sample(list(chars[c]), 6)
            s.append(x[idx[0]])
            q += [x[j] for j in idx[1:]]
            l += [i] * 5
        sx.append(np.stack(s)), qx.append(np.stack(q)), qy.append(l)
    n = len(sx)
    return (np.stack(sx), np.tile(np.arange(5, dtype=np.int32), (n, 1)), np.stack(qx),
            np.asarray(qy, np.int32))


def holdout_accuracy(learner, episodes, chunk: int = 50):
    import tensorflow as tf

    from tfmeta import evaluation

    scorer = tf.function(lambda *t: evaluation.batch_scores(learner, t), reduce_retracing=True)
    col = evaluation.score_names(learner).index("accuracy_after")
    accs = np.concatenate([scorer(*(e[i:i + chunk] for e in episodes)).numpy()[:, col]
                           for i in range(0, len(episodes[0]), chunk)])
    return 100 * accs.mean(), 100 * 1.96 * accs.std() / math.sqrt(len(accs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--holdout", required=True, help="Greek .npz from peerbench's omniglot_npz.py")
    p.add_argument("--variant", default="", help=f"comma-separated factors from {FACTORS}, 'all' (PyTorch-like), or '' (Keras defaults)")
    p.add_argument("--steps", default="20,80", help="meta-steps at which held-out accuracy is measured")
    p.add_argument("--seconds", type=float, default=0.0,
                   help="also stop meta-training after this many seconds of meta-steps (held-out evaluations "
                        "not counted) and evaluate there")
    p.add_argument("--M", type=int, default=32)
    p.add_argument("--T", type=int, default=5)
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--effect-only", action="store_true", help="only the inner loop's effect at the initialization")
    a = p.parse_args(argv)
    variant = set(FACTORS[:5]) if a.variant == "all" else {v for v in a.variant.split(",") if v}
    default = a.variant == "default"
    if default:
        variant = set()
    if variant - set(FACTORS):
        p.error(f"--variant: unknown factors {sorted(variant - set(FACTORS))}; expected some of {FACTORS}")

    import keras

    from tfmeta import MetaLearner, MetaTrainer
    from tfmeta.data import make_sampler

    keras.utils.set_random_seed(a.seed)
    if default:
        from tfmeta import models

        model = models.conv4(5)
    else:
        model = build(variant)
    learner = MetaLearner(model, inner_lr=0.4, inner_steps=a.T)
    sampler = make_sampler("omniglot", "train", ways=5, shots=1, query=15, meta_batch=a.M,
                           seed=a.seed, data_dir=a.data_dir)
    row = {"variant": a.variant or "keras", "seed": a.seed, "M": a.M, "T": a.T,
           **learner.inner_loop_effect(sampler.sample(0))}
    if not a.effect_only:
        opt = keras.optimizers.Adam(1e-3, epsilon=1e-8 if "adam_eps" in variant else 1e-7)
        trainer = MetaTrainer(learner, "maml", opt)
        episodes = holdout_episodes(a.holdout, a.episodes)
        marks = sorted(int(s) for s in a.steps.split(","))
        trained, curve, step = 0.0, [], 0
        while step < marks[-1] or (a.seconds > 0 and trained < a.seconds):
            began = time.monotonic()
            logs = trainer.train_step(sampler.sample(step))
            curve.append(round(logs["accuracy"], 3))
            trained += time.monotonic() - began
            step += 1
            timed_out = a.seconds > 0 and trained >= a.seconds
            if step in marks or timed_out:
                acc, ci = holdout_accuracy(learner, episodes)
                key = f"holdout_{a.seconds:g}s" if timed_out else f"holdout_{step}"
                row[key] = [round(float(acc), 1), round(float(ci), 1)]
                print(f"# step {step} ({trained:.0f} s): holdout {acc:.1f} ± {ci:.1f}", file=sys.stderr, flush=True)
            if timed_out:
                row["steps_in_seconds"] = step
                break
        row["first_step_query_acc"] = curve[0]
        row["train_query_acc"] = curve
        row["seconds"] = round(trained, 1)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
