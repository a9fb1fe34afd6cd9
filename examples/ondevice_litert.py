"""The on-device app: adapt a meta-learned model to 5 new Omniglot characters with LiteRT only.

Export the .tflite first (a run meta-trained with head-only adaptation, e.g. `--adapt head`):

    tfmeta train --dataset omniglot --data-dir DIR --adapt head --out runs/anil
    tfmeta export --run runs/anil --tflite          # saved_models/omniglot_maml/<v>/model.tflite
    python examples/ondevice_litert.py [MODEL.tflite] [--data-dir DIR] [--seed N]

This script plays the phone app: it imports only numpy, Pillow (to decode PNGs) and the LiteRT
interpreter (`ai_edge_litert`), never TensorFlow or tfmeta. It loads `model.tflite`, picks 5
characters the model never saw (the test alphabet, Greek, of the small background archive, or an
alphabet of `images_evaluation.zip`), takes one drawing per character as the support set (the
user's five examples, which never leave the device), runs `adapt_and_predict`, and classifies 15
other drawings of each character. It prints the model size, the accuracy before and after
adaptation, and the median latency of `adapt_and_predict` over 20 runs.

Where the Omniglot archive is looked for: `--data-dir`, else `$TFMETA_OMNIGLOT_DIR`, else
`../shared/data/omniglot` next to the repository; it must hold `images_evaluation.zip` or
`images_background_small1.zip` (the original archives, read in place, never copied).
Without a model path, the newest `saved_models/omniglot_*/<version>/model.tflite` is used.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import sys
import time
import zipfile

import numpy as np
from PIL import Image
from ai_edge_litert.interpreter import Interpreter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: archive -> alphabets the model never saw in meta-training (tfmeta's Omniglot test split).
ARCHIVES = {"images_evaluation.zip": None, "images_background_small1.zip": ("Greek",)}


def find_archive(data_dir: str | None) -> tuple[str, tuple | None]:
    candidates = [data_dir] if data_dir else [os.environ.get("TFMETA_OMNIGLOT_DIR"),
                                              os.path.join(REPO, "..", "shared", "data", "omniglot")]
    for folder in filter(None, candidates):
        for name, alphabets in ARCHIVES.items():
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name), alphabets
    raise SystemExit(f"no Omniglot archive ({' or '.join(ARCHIVES)}) in {[c for c in candidates if c]}: "
                     "pass --data-dir DIR or set TFMETA_OMNIGLOT_DIR.")


def area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Area (box) averaging from [H, W] to [size, size], as tf.image.resize(method="area")."""

    def weights(n):
        edges = np.linspace(0, n, size + 1)
        w = np.zeros((size, n))
        for i in range(size):
            for j in range(n):
                w[i, j] = max(0.0, min(edges[i + 1], j + 1) - max(edges[i], j))
        return w / w.sum(1, keepdims=True)

    return weights(image.shape[0]) @ image @ weights(image.shape[1]).T


def load_characters(path: str, alphabets, ways: int, drawings: int, size: int, seed: int):
    """`ways` random characters (of `alphabets`), `drawings` random drawings each, as [ways, drawings, S, S, 1]
    float32 in [0, 1] with background 1 and ink 0 (the PNGs as they are, area-resized)."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path) as zf:
        by_character: dict[str, list[str]] = {}
        for member in zf.namelist():
            parts = member.split("/")
            if member.endswith(".png") and len(parts) == 4 and (alphabets is None or parts[1] in alphabets):
                by_character.setdefault("/".join(parts[1:3]), []).append(member)
        names = sorted(by_character)
        chosen = [names[i] for i in rng.choice(len(names), ways, replace=False)]
        images = []
        for name in chosen:
            files = sorted(by_character[name])
            picks = [files[i] for i in rng.choice(len(files), drawings, replace=False)]
            images.append([area_resize(np.asarray(Image.open(io.BytesIO(zf.read(f))).convert("L"),
                                                  np.float64) / 255.0, size) for f in picks])
    return np.clip(np.array(images, np.float32), 0, 1)[..., None], chosen


def check(runner, arrays: dict) -> None:
    """The app's guard: shapes and dtypes must match the signature before the interpreter runs."""
    for name, info in runner.get_input_details().items():
        value, expected = arrays[name], tuple(info["shape_signature"])
        if value.ndim != len(expected) or any(e not in (-1, v) for e, v in zip(expected, value.shape)):
            raise SystemExit(f"{name} has shape {value.shape}, the model expects {expected} (-1: any).")
        if value.dtype != info["dtype"]:
            raise SystemExit(f"{name} has dtype {value.dtype}, the model expects {np.dtype(info['dtype'])}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model.tflite (default: the newest export)")
    parser.add_argument("--data-dir", default=None, help="folder with the Omniglot archive")
    parser.add_argument("--seed", type=int, default=0, help="which 5 characters and drawings")
    parser.add_argument("--query", type=int, default=15, help="drawings classified per character")
    parser.add_argument("--repeats", type=int, default=20, help="timed adapt_and_predict runs")
    args = parser.parse_args(argv)

    path = args.model
    if path is None:
        found = glob.glob(os.path.join("saved_models", "omniglot_*", "*", "model.tflite"))
        if not found:
            raise SystemExit("no saved_models/omniglot_*/<version>/model.tflite: run `tfmeta export --run RUN --tflite`.")
        path = max(found, key=os.path.getmtime)
    interpreter = Interpreter(model_path=path)
    adapt = interpreter.get_signature_runner("adapt_and_predict")
    predict = interpreter.get_signature_runner("predict")
    (key,) = adapt.get_output_details()
    support_shape = tuple(adapt.get_input_details()["support_x"]["shape_signature"])
    ways = int(predict(x=np.zeros((1,) + support_shape[1:], np.float32))[key].shape[-1])
    shots = support_shape[0] // ways

    archive, alphabets = find_archive(args.data_dir)
    images, names = load_characters(archive, alphabets, ways, shots + args.query, support_shape[1], args.seed)
    support_x = images[:, :shots].reshape((-1,) + support_shape[1:])
    support_y = np.repeat(np.arange(ways, dtype=np.int32), shots)
    query_x = images[:, shots:].reshape((-1,) + support_shape[1:])
    query_y = np.repeat(np.arange(ways, dtype=np.int32), args.query)
    inputs = {"support_x": support_x, "support_y": support_y, "query_x": query_x}
    check(adapt, inputs)

    before = np.mean(predict(x=query_x)[key].argmax(-1) == query_y)
    logits = adapt(**inputs)[key]
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        adapt(**inputs)
        seconds.append(time.perf_counter() - start)
    after = np.mean(logits.argmax(-1) == query_y)
    print(f"model {path}: {os.path.getsize(path) / 1024:.1f} KiB; {ways}-way {shots}-shot, "
          f"{len(query_y)} query images")
    print(f"characters: {', '.join(names)} ({os.path.basename(archive)})")
    print(f"query accuracy: before adaptation {100 * before:.1f}%, after {100 * after:.1f}%")
    print(f"adapt_and_predict latency: median {1000 * np.median(seconds):.1f} ms over {args.repeats} runs")
    print(f"TensorFlow imported: {'tensorflow' in sys.modules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
