"""The README as a user meets it (issue 16): every Python block runs as written (at small sizes),
its run directory is one the CLI accepts, and the input convention it states is the loader's."""

from __future__ import annotations

import os
import re
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from conftest import OMNIGLOT_DIR
from tfmeta.app import cli
from tfmeta.data import load_omniglot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, "README.md"), encoding="utf-8") as _f:
    README = _f.read()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)

#: Sizes the README writes -> the sizes this test runs (each must occur in the README as written).
SMALL = {
    "meta_batch=32": "meta_batch=2",
    "iterations=2000).resolved()": "iterations=2, meta_batch=2, inner_steps=1).resolved()",
    "inner_steps=5": "inner_steps=1",
    "iterations=2000": "iterations=2",
    "episodes=600": "episodes=4",
    "epochs=20": "epochs=1",
    "steps_per_epoch=100": "steps_per_epoch=2",
    "steps=20)": "steps=1)",
}
DATA_DIR_LINE = re.compile(r'^DATA_DIR = "path/to/omniglot".*$', re.M)
SMALL1 = ("Balinese", "Early_Aramaic", "Korean", "Latin", "Greek")


def _png(seed):
    """A 105x105 PNG as Omniglot's: white background (255), black strokes (0)."""
    image = np.full((105, 105, 1), 255, np.uint8)
    r, c = np.random.default_rng(seed).integers(10, 80, size=2)
    image[r:r + 20, c:c + 4] = 0
    image[r:r + 4, c:c + 20] = 0
    return tf.io.encode_png(image).numpy()


def _synthetic_small1(folder, characters=2, drawings=16):
    """images_background_small1.zip with the split alphabets, enough drawings for 1-shot 15-query."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "images_background_small1.zip", "w") as zf:
        for a, alphabet in enumerate(SMALL1):
            for c in range(characters):
                for d in range(drawings):
                    zf.writestr(f"images_background_small1/{alphabet}/character{c + 1:02d}/{a:02d}{c:02d}_{d:02d}.png",
                                _png([a, c, d]))
    return folder


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """The shared archive if present, else a small synthetic one (so the README runs in CI)."""
    if os.path.isdir(OMNIGLOT_DIR):
        return os.path.abspath(OMNIGLOT_DIR)
    monkeypatch.setenv("TFMETA_CACHE", str(tmp_path / "cache"))
    return str(_synthetic_small1(tmp_path / "omniglot"))


def _small(block: str, data_dir: str) -> str:
    code = DATA_DIR_LINE.sub(f"DATA_DIR = {data_dir!r}", block)
    for written, small in SMALL.items():
        code = code.replace(written, small)
    return code


def test_the_readme_has_the_blocks_and_sizes_this_test_shrinks():
    assert len(BLOCKS) == 3
    for written in SMALL:
        assert written in README, f"README no longer writes {written!r}: update SMALL"
    assert all(DATA_DIR_LINE.search(block) for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _small(BLOCKS[index], data_dir)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    if "evaluation.evaluate" in code:
        assert re.search(r"accuracy \d\.\d{3} ± \d\.\d{3} \(95% interval\)", out), out
        assert os.listdir(tmp_path / "checkpoints" / "omni")
    if "RunConfig" in code:  # the run directory it writes is one the CLI takes
        assert cli.main(["evaluate", "--run", "runs/omni", "--episodes", "2", "--json"]) == 0
        assert "held-out accuracy over 2 episodes" in capsys.readouterr().out
    if "MetaModel" in code:
        assert re.search(r"\{'accuracy': [\d.]+, 'accuracy_before': [\d.]+, 'loss': [\d.]+, 'loss_before'", out), out
        assert "accuracy on this task:" in out and os.path.isfile(tmp_path / "adapted.keras")


def _stated_polarity():
    match = re.search(r"values in \[0, 1\] with (background|ink) (\d) and\s+(background|ink) (\d)", README)
    assert match, "the README's Serving section no longer states the Omniglot input convention"
    stated = {match.group(1): float(match.group(2)), match.group(3): float(match.group(4))}
    return stated["background"], stated["ink"]


def _assert_polarity(images, background, ink):
    assert float(np.median(images)) == pytest.approx(background, abs=0.05), "most pixels are background"
    farthest = images.min() if background > ink else images.max()
    assert float(farthest) == pytest.approx(ink, abs=0.1), "strokes reach the ink value"


def test_readme_input_convention_is_the_loaders_on_synthetic_pngs(tmp_path, monkeypatch):
    monkeypatch.setenv("TFMETA_CACHE", str(tmp_path / "cache"))
    images, _ = load_omniglot(_synthetic_small1(tmp_path / "omniglot", drawings=1))["test"]
    _assert_polarity(images, *_stated_polarity())


def test_readme_input_convention_is_the_loaders_on_the_archive():
    if not os.path.isdir(OMNIGLOT_DIR):
        pytest.skip(f"Omniglot archive not found in {OMNIGLOT_DIR} (set TFMETA_OMNIGLOT_DIR)")
    images, _ = load_omniglot(OMNIGLOT_DIR)["test"]
    _assert_polarity(images, *_stated_polarity())
