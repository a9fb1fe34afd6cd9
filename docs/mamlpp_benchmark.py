"""MAML vs MAML++ on Omniglot at equal meta-steps, behind the benchmark section of docs/mamlpp.md.

Both runs: conv4 (tfmeta's PyTorch-like initialization), tfmeta's Omniglot splits (disjoint
alphabets; classes are character x rotation), 5-way 1-shot, `--query` query examples per class,
meta-batch M, T = 5 inner SGD steps, Adam, the same seed and the same task stream.

- maml:   inner lr 0.4 (tfmeta's Omniglot default), constant meta lr 1e-3, exact second order.
- maml++: MetaLearner.mamlpp (inner lr 0.1 as LSLR initial value, per-step BatchNorm), MSL
          annealed over the first 10% of the meta-steps, DA switching at 50% (the paper's ratios:
          10 and 50 of 100 epochs), meta lr 1e-3 cosine-annealed to 1e-5 over the run.

Every `--every` meta-steps both are scored on `--val-batches` batches of the val split (the same
tasks for both); at the end on `--episodes` test episodes (mean and 95% interval). The per-meta-step
time ratio is measured in this one process after training: `--time-steps` meta-steps of each,
interleaved (ABAB...), so that the machine's load affects both alike. One JSON object per line.

usage: PYTHONPATH=. python docs/mamlpp_benchmark.py --data-dir DIR [--steps 300] [--M 4] [--every 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--M", type=int, default=4)
    p.add_argument("--query", type=int, default=5)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--val-batches", type=int, default=4)
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--time-steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import keras
    import tensorflow as tf

    from tfmeta import estimators, evaluation, mamlpp, models
    from tfmeta.data import make_sampler
    from tfmeta.learner import MetaLearner
    from tfmeta.training import MetaTrainer

    def sampler(split, seed, meta_batch):
        return make_sampler("omniglot", split, ways=5, shots=1, query=args.query, meta_batch=meta_batch,
                            seed=seed, data_dir=args.data_dir)

    def build(kind):
        keras.utils.set_random_seed(args.seed)
        model = models.conv4(5)
        if kind == "maml":
            learner = MetaLearner(model, inner_lr=0.4, inner_steps=5)
            est, opt = estimators.get("maml"), keras.optimizers.Adam(1e-3)
        else:
            learner = MetaLearner.mamlpp(model)
            est = estimators.get("maml", msl_steps=max(1, args.steps // 10),
                                 first_order_steps=args.steps // 2)
            opt = keras.optimizers.Adam(mamlpp.cosine_meta_lr(1e-3, args.steps, 1e-5))
        return MetaTrainer(learner, est, opt)

    trainers = {kind: build(kind) for kind in ("maml", "maml++")}
    val = [tuple(tf.convert_to_tensor(t) for t in b) for b in
           (sampler("val", args.seed + 2, 16).sample(i) for i in range(args.val_batches))]
    curves = {kind: [] for kind in trainers}
    train = sampler("train", args.seed, args.M)
    for kind, trainer in trainers.items():
        score = tf.function(lambda *b, learner=trainer.learner: evaluation.batch_scores(learner, b))
        began = time.monotonic()
        done = 0
        while done < args.steps:
            chunk = min(args.every, args.steps - done)
            trainer.fit(train, done + chunk, progress=False, check_inner_loop=False)
            done += chunk
            scores = np.concatenate([score(*b).numpy() for b in val])
            names = evaluation.score_names(trainer.learner)
            acc = float(scores[:, names.index("accuracy_after")].mean())
            curves[kind].append((done, acc))
            print(json.dumps({"method": kind, "meta_step": done, "val_accuracy": acc,
                              "seconds": round(time.monotonic() - began, 1)}), flush=True)
        test = sampler("test", args.seed + 1, 25)
        result = evaluation.evaluate(trainer.learner, test, episodes=args.episodes)
        print(json.dumps({"method": kind, "meta_steps": args.steps, "test_accuracy": result["accuracy_after"],
                          "test_ci95": result["accuracy_after_ci95"], "episodes": result["episodes"],
                          "val_curve": curves[kind]}), flush=True)
    # per-meta-step time ratio in this process, interleaved; the steps continue each run's stream
    times = {kind: [] for kind in trainers}
    batches = [tuple(tf.convert_to_tensor(t) for t in train.sample(args.steps + i)) for i in range(args.time_steps)]
    for trainer in trainers.values():
        trainer.train_step(batches[0])  # warm (already traced by fit)
    for i in range(args.time_steps):
        for kind, trainer in trainers.items():
            began = time.perf_counter()
            trainer.train_step(batches[i])
            times[kind].append(time.perf_counter() - began)
    ratio = float(np.median(times["maml++"]) / np.median(times["maml"]))
    print(json.dumps({"seconds_per_step_median": {k: float(np.median(v)) for k, v in times.items()},
                      "ratio_mamlpp_to_maml": ratio, "note": "second-order phase (DA switched), "
                      "interleaved in one process; machine shared"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
