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
(init="pytorch": the kernel, bias, head and BatchNorm factors, epsilon 1.001e-5; Adam epsilon 1e-7);
`--variant default,adam_eps` is conv4() with Adam epsilon 1e-8. `distinct` (with any of these) changes
the tasks, not the network: tfmeta's train sampler draws 5 distinct classes (character x rotation), so
a task may hold two rotations of one character; with `distinct` such an episode is redrawn, as
l2l_omniglot.py's tasks (distinct characters, one rotation each) never hold one. Every run reports how
many of its training tasks held two rotations of one character.

Reports, as one JSON line per run: the inner loop's effect at the initialization (relative support
loss drop over T steps and relative change of each kernel, MetaLearner.inner_loop_effect), the first meta-step's train query accuracy,
and held-out accuracy after N meta-steps with the protocol of ../shared/peerbench/l2l_omniglot.py
(tfmeta.training.holdout: the archive's test split, Greek, or --holdout's npz from omniglot_npz.py; no rotations, 5-way 1-shot, 5 query per class, 200 episodes drawn
with random.Random(0), T adaptation steps, mean and 95% interval), so figures compare with
learn2learn's on the very same episodes.

usage: PYTHONPATH=. python docs/init_ablation.py --data-dir DIR [--holdout test.npz] --variant kernel,bias
           [--steps 20,80] [--seconds S] [--M 32] [--seed 0] [--effect-only]
"""

from __future__ import annotations

import argparse
import json
import math
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


def load_holdout(a):
    """The held-out arrays: --holdout's .npz (peerbench's omniglot_npz.py), else the archive's test split
    (tfmeta's loader decodes it as omniglot_npz.py does: the same arrays, the same episodes)."""
    if a.holdout:
        data = np.load(a.holdout)
        return data["images"], data["labels"]
    from tfmeta.data import load_omniglot

    return load_omniglot(a.data_dir, rotations=False)["test"]


def train_sampler(data_dir, *, meta_batch, seed, distinct):
    """tfmeta's Omniglot train sampler (classes = character x rotation), counting the tasks that hold
    two rotations of one character; with `distinct`, such an episode is redrawn (l2l_omniglot.py's
    tasks never hold one: it draws distinct characters, then a rotation for each)."""
    from tfmeta.data import EpisodeSampler, load_omniglot

    class Sampler(EpisodeSampler):
        tasks, shared = 0, 0

        def _episode_rows(self, rng):
            while True:
                state = rng.bit_generator.state  # peek at the classes the parent will draw
                chosen = rng.choice(len(self._classes), size=self._ways, replace=False)
                rng.bit_generator.state = state
                characters = (self._classes[chosen] - self._classes.min()) // 4  # id = first + 4c + k
                two = len(set(characters.tolist())) < self._ways
                if not (distinct and two):
                    break
                rng.choice(len(self._classes), size=self._ways, replace=False)  # redraw
            self.tasks += 1
            self.shared += two
            return super()._episode_rows(rng)

    images, labels = load_omniglot(data_dir)["train"]
    return Sampler(images, labels, ways=5, shots=1, query=15, meta_batch=meta_batch, seed=seed, name="train")


def adam_epsilon_effect(opt):
    """How much Adam's epsilon (1e-7 against 1e-8) changes the meta-update, from Adam's own second
    moments: the update is m / (sqrt(v_hat) + eps), so the two epsilons' updates differ by the factor
    (s + 1e-7) / (s + 1e-8) with s = sqrt(v_hat) per meta-parameter element."""
    t = int(opt.iterations.numpy())
    v = np.concatenate([np.ravel(v.numpy()) for v in opt._velocities]) / (1 - opt.beta_2 ** t)
    s = np.sqrt(v)
    ratio = (s + 1e-7) / (s + 1e-8) - 1
    by_variable = {v.name: float(np.median(np.sqrt(v.numpy() / (1 - opt.beta_2 ** t)))) for v in opt._velocities}
    return {"median_sqrt_v_by_variable": by_variable, "median_sqrt_v": float(np.median(s)), "min_sqrt_v": float(s.min()),
            "share_differing_over_1pct": float((ratio > 0.01).mean()),
            "share_differing_over_10pct": float((ratio > 0.1).mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--holdout", default=None,
                   help="held-out .npz from peerbench's omniglot_npz.py (default: the archive's test split, Greek)")
    p.add_argument("--variant", default="",
                   help=f"comma-separated factors from {FACTORS}, 'all' (PyTorch-like), '' (Keras defaults) or "
                        "'default' (tfmeta's conv4(), with adam_eps and distinct allowed beside it)")
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
    tokens = {v for v in a.variant.split(",") if v}
    default = "default" in tokens
    variant = set(FACTORS[:5]) if tokens == {"all"} else tokens - {"default"}
    known = set(FACTORS) | {"distinct"}
    if variant - known:
        p.error(f"--variant: unknown factors {sorted(variant - known)}; expected some of {sorted(known)}")
    if default and variant - {"adam_eps", "distinct"}:
        p.error("--variant: 'default' combines only with adam_eps and distinct")

    import keras

    from tfmeta import MetaLearner, MetaTrainer
    from tfmeta.training.holdout import holdout_accuracy, holdout_episodes, holdout_scorer

    keras.utils.set_random_seed(a.seed)
    if default:
        from tfmeta import models

        model = models.conv4(5)
    else:
        model = build(variant)
    learner = MetaLearner(model, inner_lr=0.4, inner_steps=a.T)
    sampler = train_sampler(a.data_dir, meta_batch=a.M, seed=a.seed, distinct="distinct" in variant)
    row = {"variant": a.variant or "keras", "seed": a.seed, "M": a.M, "T": a.T,
           **learner.inner_loop_effect(sampler.sample(0))}
    if not a.effect_only:
        opt = keras.optimizers.Adam(1e-3, epsilon=1e-8 if "adam_eps" in variant else 1e-7)
        trainer = MetaTrainer(learner, "maml", opt)
        episodes = holdout_episodes(*load_holdout(a), a.episodes)
        scorer = holdout_scorer(learner)
        marks = sorted(int(s) for s in a.steps.split(","))
        trained, curve, step = 0.0, [], 0
        sampler.tasks = sampler.shared = 0
        while step < marks[-1] or (a.seconds > 0 and trained < a.seconds):
            began = time.monotonic()
            logs = trainer.train_step(sampler.sample(step))
            curve.append(round(logs["accuracy"], 3))
            trained += time.monotonic() - began
            step += 1
            timed_out = a.seconds > 0 and trained >= a.seconds
            if step in marks or timed_out:
                acc, ci = holdout_accuracy(learner, episodes, scorer=scorer)
                key = f"holdout_{a.seconds:g}s" if timed_out else f"holdout_{step}"
                row[key] = [round(float(acc), 1), round(float(ci), 1)]
                row[key.replace("holdout", "adam_epsilon")] = adam_epsilon_effect(opt)
                print(f"# step {step} ({trained:.0f} s): holdout {acc:.1f} ± {ci:.1f}", file=sys.stderr, flush=True)
            if timed_out:
                row["steps_in_seconds"] = step
                break
        row["first_step_query_acc"] = curve[0]
        row["train_query_acc"] = curve
        row["seconds"] = round(trained, 1)
        row["tasks_with_two_rotations_of_a_character"] = f"{sampler.shared} of {sampler.tasks}"
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
