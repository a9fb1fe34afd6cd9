"""Fine-tune an exported meta-learned initialization with plain Keras (no tfmeta needed).

Run after `tfmeta train` (which exports to saved_models/sinusoid_maml/<version>/):
    python examples/finetune_exported.py saved_models/sinusoid_maml/1

It loads `model.keras` with `keras.models.load_model`, fits it on 10 points of a new sine wave with
plain `model.fit`, and compares the error with fine-tuning a freshly initialised network.
"""

import sys

import keras
import numpy as np


def new_task(seed=123, shots=10, query=100):
    rng = np.random.default_rng(seed)
    amplitude, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
    x = rng.uniform(-5, 5, (shots + query, 1)).astype("float32")
    y = (amplitude * np.sin(x - phase)).astype("float32")
    return (x[:shots], y[:shots]), (x[shots:], y[shots:])


def finetune(model, support, query, steps=10, lr=0.01):
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    model.fit(*support, batch_size=len(support[0]), epochs=steps, verbose=0)
    return float(model.evaluate(*query, verbose=0))


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "saved_models/sinusoid_maml/1"
    support, query = new_task()
    meta_learned = keras.models.load_model(f"{path}/model.keras")
    scratch = keras.models.clone_model(meta_learned)  # same architecture, fresh weights
    print(f"query MSE after 10 steps: meta-learned init {finetune(meta_learned, support, query):.3f}, "
          f"random init {finetune(scratch, support, query):.3f}")
