"""Tests for tfmeta.data: episode samplers, sinusoid tasks and the Omniglot loader."""

from __future__ import annotations

import io
import os
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfmeta.data import (
    DATASETS,
    EpisodeSampler,
    SinusoidTasks,
    TaskBatch,
    load_omniglot,
    make_sampler,
)

REPO = Path(__file__).resolve().parents[1]


# -- helpers -----------------------------------------------------------------------------------
def synthetic_split(class_ids, per_class, first_row=0):
    """Images [N, 2, 2, 1] whose every pixel is the row id (so a sampled image names its row).

    ``per_class`` is one count for all classes or one count per class.
    """
    labels = np.repeat(np.asarray(class_ids), per_class)
    rows = np.arange(first_row, first_row + len(labels), dtype=np.float32)
    images = np.broadcast_to(rows[:, None, None, None], (len(rows), 2, 2, 1)).copy()
    return images, labels


def rows_of(x):
    """Row ids of synthetic images [..., 2, 2, 1]."""
    return x[..., 0, 0, 0].astype(np.int64)


@pytest.fixture
def sampler():
    # Arbitrary, non-contiguous class ids with uneven class sizes (smallest has 6).
    images, labels = synthetic_split([7, 3, 100, 42, 5, 9, 11, 13], [6, 8, 8, 9, 8, 7, 8, 8])
    return EpisodeSampler(images, labels, ways=4, shots=2, query=3, meta_batch=6, seed=1, name="train")


def check_episodes(batch, sampler, labels):
    """Structural checks on every task of a classification batch; returns class->label maps."""
    m, ways, shots, query = sampler.meta_batch, sampler.ways, sampler.shots, sampler.query
    assert batch.support_x.shape == (m, ways * shots, *sampler.feature_shape)
    assert batch.query_x.shape == (m, ways * query, *sampler.feature_shape)
    assert batch.support_x.dtype == np.float32 and batch.query_x.dtype == np.float32
    assert batch.support_y.dtype == np.int32 and batch.query_y.dtype == np.int32
    mappings = []
    for t in range(m):
        s_rows, q_rows = rows_of(batch.support_x[t]), rows_of(batch.query_x[t])
        s_y, q_y = batch.support_y[t], batch.query_y[t]
        assert np.array_equal(np.bincount(s_y, minlength=ways), np.full(ways, shots))
        assert np.array_equal(np.bincount(q_y, minlength=ways), np.full(ways, query))
        assert len(set(s_rows)) == len(s_rows) and len(set(q_rows)) == len(q_rows)
        assert not set(s_rows) & set(q_rows), "support and query share an example"
        mapping = {}
        for rows, ys in ((s_rows, s_y), (q_rows, q_y)):
            for row, y in zip(rows, ys):
                assert mapping.setdefault(int(labels[row]), int(y)) == int(y), "class has two labels"
        assert sorted(mapping.values()) == list(range(ways)), "labels are not a bijection"
        mappings.append(tuple(sorted(mapping.items())))
    return mappings


# -- EpisodeSampler ----------------------------------------------------------------------------
def test_episode_structure(sampler):
    labels = sampler._labels  # rows of the synthetic images index into these
    for index in (0, 1, 17):
        check_episodes(sampler.sample(index), sampler, labels)
    assert sampler.feature_shape == (2, 2, 1)
    assert sampler.num_classes == 8
    assert (sampler.ways, sampler.shots, sampler.query, sampler.meta_batch) == (4, 2, 3, 6)
    assert sampler.task_type == "classification"


def test_labels_are_permuted_per_episode():
    # ways == number of classes: every episode has the same classes, only the labels can move.
    images, labels = synthetic_split([10, 20, 30, 40, 50], 4)
    sampler = EpisodeSampler(images, labels, ways=5, shots=1, query=1, meta_batch=10)
    mappings = []
    for index in range(3):
        mappings += check_episodes(sampler.sample(index), sampler, labels)
    assert len(set(mappings)) > 10, "class -> label mapping does not change across episodes"
    identity = tuple((c, i) for i, c in enumerate([10, 20, 30, 40, 50]))
    assert mappings.count(identity) < 5


def test_sample_is_pure_function_of_seed_and_index(sampler):
    images, labels = sampler._images, sampler._labels
    twin = EpisodeSampler(images, labels, ways=4, shots=2, query=3, meta_batch=6, seed=1)
    other_seed = EpisodeSampler(images, labels, ways=4, shots=2, query=3, meta_batch=6, seed=2)
    a, b = sampler.sample(5), twin.sample(5)
    sampler.sample(6)  # no hidden state between calls
    assert all(np.array_equal(x, y) for x, y in zip(a, sampler.sample(5)))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a.support_x, sampler.sample(6).support_x)
    assert not np.array_equal(a.support_x, other_seed.sample(5).support_x)


def test_dataset_start_matches_sample(sampler):
    ds = sampler.dataset(start=3)
    spec = ds.element_spec
    assert isinstance(spec, TaskBatch)
    assert spec.support_x.shape == (6, 8, 2, 2, 1) and spec.query_y.shape == (6, 12)
    assert spec.support_y.dtype == tf.int32 and spec.query_x.dtype == tf.float32
    for offset, element in enumerate(ds.take(2)):
        assert isinstance(element, TaskBatch)
        expected = sampler.sample(3 + offset)
        for got, want in zip(element, expected):
            np.testing.assert_array_equal(got.numpy(), want)
    # Deterministic: iterating again gives the same first element.
    first = next(iter(sampler.dataset(start=3)))
    np.testing.assert_array_equal(first.query_x.numpy(), sampler.sample(3).query_x)


def test_synthetic_splits_never_mix():
    splits = {
        "train": synthetic_split(range(0, 12), 5, first_row=0),
        "val": synthetic_split(range(12, 18), 5, first_row=60),
        "test": synthetic_split(range(18, 24), 5, first_row=90),
    }
    all_labels = np.concatenate([labels for _, labels in splits.values()])
    seen = {}
    for name, (images, labels) in splits.items():
        sampler = EpisodeSampler(images, labels, ways=3, shots=2, query=2, meta_batch=8, name=name)
        classes = set()
        for index in range(5):
            batch = sampler.sample(index)
            for x in (batch.support_x, batch.query_x):
                classes |= set(all_labels[rows_of(x)].ravel().tolist())
        assert classes <= set(labels.tolist())
        seen[name] = classes
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(ways=0), r"ways.*0"),
        (dict(shots=0), r"shots.*0"),
        (dict(query=0), r"query.*0"),
        (dict(query=1.5), r"query.*1\.5"),
        (dict(meta_batch=0), r"meta_batch.*0"),
        (dict(ways=True), r"ways"),
        (dict(seed=-1), r"seed.*-1"),
        (dict(ways=30), r"ways=30 but split 'test' has only 24 classes"),
        (dict(shots=4, query=3), r"shots \+ query = 4 \+ 3 = 7.*only 6 examples"),
    ],
)
def test_sampler_validation(kwargs, pattern):
    images, labels = synthetic_split(range(24), 6)
    args = dict(ways=5, shots=1, query=1, meta_batch=2, name="test") | kwargs
    with pytest.raises(ValueError, match=pattern):
        EpisodeSampler(images, labels, **args)


def test_sampler_validation_of_arrays():
    images, labels = synthetic_split(range(5), 4)
    geometry = dict(ways=2, shots=1, query=1, meta_batch=1)
    with pytest.raises(ValueError, match=r"labels.*1-D.*\(20, 1\)"):
        EpisodeSampler(images, labels[:, None], **geometry)
    with pytest.raises(ValueError, match=r"labels.*same length as images \(20\).*\(19,\)"):
        EpisodeSampler(images, labels[:-1], **geometry)
    with pytest.raises(ValueError, match=r"images.*'val' is empty"):
        EpisodeSampler(images[:0], labels[:0], name="val", **geometry)
    sampler = EpisodeSampler(images, labels, **geometry)
    with pytest.raises(ValueError, match=r"index.*-1"):
        sampler.sample(-1)
    with pytest.raises(ValueError, match=r"start.*-2"):
        sampler.dataset(start=-2)


# -- SinusoidTasks -----------------------------------------------------------------------------
def test_sinusoid_targets_and_ranges():
    tasks = SinusoidTasks(shots=5, query=10, meta_batch=200, seed=3)
    assert (tasks.task_type, tasks.ways, tasks.feature_shape) == ("regression", 1, (1,))
    batch = tasks.sample(4)
    assert batch.support_x.shape == batch.support_y.shape == (200, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (200, 10, 1)
    assert all(a.dtype == np.float32 for a in batch)
    amplitudes, phases = tasks.task_parameters(4)
    assert amplitudes.shape == phases.shape == (200,)
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        want = amplitudes[:, None, None] * np.sin(x.astype(np.float64) - phases[:, None, None])
        np.testing.assert_allclose(y, want, atol=1e-5)
        assert x.min() >= -5 and x.max() <= 5 and x.max() - x.min() > 9
    assert amplitudes.min() >= 0.1 and amplitudes.max() <= 5 and np.ptp(amplitudes) > 4
    assert phases.min() >= 0 and phases.max() <= np.pi and np.ptp(phases) > 2.5
    assert not np.array_equal(batch.support_x, batch.query_x[:, :5]), "support and query reuse x"


def test_sinusoid_determinism_splits_and_dataset():
    tasks = SinusoidTasks(shots=3, query=4, meta_batch=5, seed=0)
    a = tasks.sample(2)
    twin = SinusoidTasks(shots=3, query=4, meta_batch=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, twin.sample(2)))
    assert not np.array_equal(a.support_x, tasks.sample(3).support_x)
    val = make_sampler("sinusoid", "val", ways=5, shots=3, query=4, meta_batch=5)
    test = make_sampler("sinusoid", "test", ways=5, shots=3, query=4, meta_batch=5)
    train = make_sampler("sinusoid", "train", ways=5, shots=3, query=4, meta_batch=5)
    assert isinstance(val, SinusoidTasks)
    assert np.array_equal(train.sample(2).support_x, a.support_x)
    params = [s.task_parameters(2)[0] for s in (train, val, test)]
    assert len({p.tobytes() for p in params}) == 3, "splits share tasks"
    first = next(iter(tasks.dataset(start=7)))
    assert first.support_x.shape == (5, 3, 1)
    for got, want in zip(first, tasks.sample(7)):
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(shots=0), r"shots.*0"),
        (dict(query=-1), r"query.*-1"),
        (dict(meta_batch=2.0), r"meta_batch.*2\.0"),
        (dict(seed=-3), r"seed.*-3"),
        (dict(split="dev"), r"split.*'dev'"),
    ],
)
def test_sinusoid_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SinusoidTasks(**kwargs)


def test_make_sampler_rejects_unknown_names():
    assert DATASETS == ("sinusoid", "omniglot", "synthetic2d")
    with pytest.raises(ValueError, match=r"dataset.*'sinusoid', 'omniglot'.*'mnist'"):
        make_sampler("mnist", "train", ways=5, shots=1, query=1, meta_batch=1)
    with pytest.raises(ValueError, match=r"split.*'dev'"):
        make_sampler("sinusoid", "dev", ways=5, shots=1, query=1, meta_batch=1)


# -- Omniglot loader on small synthetic archives ----------------------------------------------
SMALL1_ALPHABETS = ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")


def png_bytes(seed):
    """A 105x105 black-and-white PNG: white background (255) with a few black strokes."""
    image = np.full((105, 105, 1), 255, np.uint8)
    rng = np.random.default_rng(seed)
    r, c = rng.integers(0, 90, size=2)
    image[r : r + 15, c : c + 15] = 0
    return tf.io.encode_png(image).numpy()


def write_zip(path, alphabets=SMALL1_ALPHABETS, characters=2, drawings=3):
    """An Omniglot-layout archive; its top folder is the zip's stem."""
    with zipfile.ZipFile(path, "w") as zf:
        for a, alphabet in enumerate(alphabets):
            for c in range(characters):
                for d in range(drawings):
                    name = f"{path.stem}/{alphabet}/character{c + 1:02d}/{a:02d}{c:02d}_{d + 1:02d}.png"
                    zf.writestr(name, png_bytes([a, c, d, len(path.stem)]))
    return path


def write_small1_zip(path):
    return write_zip(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TFMETA_CACHE", str(folder))
    return folder


def test_load_synthetic_archive_splits_and_cache(tmp_path, cache):
    data = tmp_path / "data"
    data.mkdir()
    write_small1_zip(data / "images_background_small1.zip")
    splits = load_omniglot(data, image_size=12)
    sizes = {name: len(np.unique(labels)) for name, (_, labels) in splits.items()}
    assert sizes == {"train": 3 * 2 * 4, "val": 2 * 4, "test": 2 * 4}
    images, labels = splits["train"]
    assert images.shape == (3 * 2 * 4 * 3, 12, 12, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32
    assert 0.8 < images.mean() < 1 and images.min() < 0.1, "background 1, ink 0, as in the PNGs"
    files = sorted(os.listdir(cache))
    assert len(files) == 1 and files[0].endswith(".npz") and "12px" in files[0]
    again = load_omniglot(data, image_size=12)
    for name in splits:
        np.testing.assert_array_equal(again[name][0], splits[name][0])
        np.testing.assert_array_equal(again[name][1], splits[name][1])
    # Extracted folder gives the same arrays as the zip.
    with zipfile.ZipFile(data / "images_background_small1.zip") as zf:
        zf.extractall(tmp_path / "extracted")
    extracted = load_omniglot(tmp_path / "extracted", image_size=12)
    np.testing.assert_array_equal(extracted["test"][0], splits["test"][0])


def test_full_layout_splits_background_and_evaluation_by_alphabet(tmp_path, cache):
    background = [f"Alpha{i}" for i in range(7)]
    write_zip(tmp_path / "images_background.zip", background, characters=1, drawings=2)
    write_zip(tmp_path / "images_evaluation.zip", ["Eval0", "Eval1"], characters=2, drawings=2)
    write_small1_zip(tmp_path / "images_background_small1.zip")  # ignored: the full set wins
    splits = load_omniglot(tmp_path, image_size=8, rotations=False)
    sizes = {name: len(np.unique(labels)) for name, (_, labels) in splits.items()}
    assert sizes == {"train": 2, "val": 5, "test": 4}  # last 5 background alphabets -> val


def test_tfds_examples_are_converted_like_archives():
    from tfmeta.data.omniglot import _tfds_archive

    gray = tf.io.decode_png(png_bytes(0), channels=1)
    examples = {
        "image": tf.stack([tf.repeat(gray, 3, axis=-1)] * 3),
        "alphabet": tf.constant([1, 0, 1], tf.int64),
        "alphabet_char_id": tf.constant([4, 0, 4], tf.int64),
    }
    archive = _tfds_archive(tf.data.Dataset.from_tensor_slices(examples), ["Aa", "Bb"], 28)
    assert archive.characters.tolist() == ["Aa/character01", "Bb/character05"]
    assert archive.char_ids.tolist() == [0, 1, 1]
    want = tf.image.resize(tf.cast(gray, tf.float32) / 255.0, (28, 28), method="area")
    np.testing.assert_allclose(archive.images[0], want.numpy(), atol=1e-6)


def test_truncated_or_corrupt_archive_gives_clear_error(tmp_path, cache):
    data = tmp_path / "data"
    data.mkdir()
    good = write_small1_zip(tmp_path / "good.zip").read_bytes()
    target = data / "images_background_small1.zip"
    target.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"images_background_small1\.zip.*corrupt or truncated"):
        load_omniglot(data)
    # A valid zip holding a broken PNG names the archive and the member.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("images_background_small1/Greek/character01/0001_01.png", b"\x89PNG not really")
    target.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match=r"images_background_small1\.zip.*Greek/character01/0001_01\.png"):
        load_omniglot(data)
    assert not cache.exists() or not os.listdir(cache), "a failed load left a cache file"


def test_missing_archives_and_offline_tfds(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="images_background_small1.zip"):
        load_omniglot(tmp_path)
    fake = types.ModuleType("tensorflow_datasets")

    def offline_load(*args, **kwargs):
        raise ConnectionError("no internet")

    fake.load = offline_load
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    with pytest.raises(RuntimeError, match="--data-dir"):
        load_omniglot(None)
    with pytest.raises(ValueError, match=r"image_size.*0"):
        load_omniglot(tmp_path, image_size=0)


# -- real Omniglot (images_background_small1.zip) ---------------------------------------------
def omniglot_dir():
    folder = Path(os.environ.get("TFMETA_OMNIGLOT_DIR") or REPO.parent / "shared" / "data" / "omniglot")
    if not (folder / "images_background_small1.zip").is_file():
        pytest.skip(f"Omniglot archive not found in {folder} (set TFMETA_OMNIGLOT_DIR)")
    return folder


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("omniglot_cache")
    old = os.environ.get("TFMETA_CACHE")
    os.environ["TFMETA_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("TFMETA_CACHE", None)
    else:
        os.environ["TFMETA_CACHE"] = old


@pytest.fixture(scope="module")
def omniglot(real_cache):
    folder = omniglot_dir()
    return folder, load_omniglot(folder), load_omniglot(folder, rotations=False)


def test_real_omniglot_split_sizes_and_ranges(omniglot):
    _, splits, plain = omniglot
    characters = {"train": 24 + 22 + 40, "val": 26, "test": 24}  # by alphabet, see SPLITS
    total = 0
    for name, (images, labels) in splits.items():
        classes, counts = np.unique(labels, return_counts=True)
        assert len(classes) == 4 * characters[name]
        assert len(np.unique(plain[name][1])) == characters[name]
        assert (counts == 20).all()
        assert images.shape == (len(labels), 28, 28, 1) and images.dtype == np.float32
        assert labels.dtype == np.int32
        assert images.min() >= 0 and images.max() <= 1
        assert 0.7 < images.mean() < 0.98, "background 1, strokes 0, as in the PNGs"
        total += len(classes)
    assert total == 136 * 4 == 544
    ids = [set(labels.tolist()) for _, labels in splits.values()]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]


def test_real_omniglot_splits_follow_alphabets(omniglot):
    # The first image of each split is the first drawing of that split's first alphabet.
    folder, splits, _ = omniglot
    firsts = {"train": "Balinese", "val": "Latin", "test": "Greek"}
    with zipfile.ZipFile(folder / "images_background_small1.zip") as zf:
        for name, alphabet in firsts.items():
            prefix = f"images_background_small1/{alphabet}/character01/"
            member = sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".png"))[0]
            ink = tf.cast(tf.io.decode_png(zf.read(member), channels=1), tf.float32) / 255.0
            want = tf.image.resize(ink, (28, 28), method="area").numpy()
            np.testing.assert_allclose(splits[name][0][0], want, atol=1e-6)


def test_real_omniglot_rotations(omniglot):
    _, splits, plain = omniglot
    for name, (images, labels) in splits.items():
        base_images, base_labels = plain[name]
        first, base_first = labels.min(), base_labels.min()
        for c in range(0, len(np.unique(base_labels)), 7):
            original = base_images[base_labels == base_first + c]
            for k in range(4):
                rotated = images[labels == first + 4 * c + k]
                np.testing.assert_array_equal(rotated, np.rot90(original, k, axes=(1, 2)))
            assert not np.array_equal(images[labels == first + 4 * c + 1], original)


def test_real_omniglot_cache_written(omniglot, real_cache):
    files = os.listdir(real_cache)
    assert [f for f in files if f.endswith(".npz")], "no cache written"
    assert not [f for f in files if f.endswith(".tmp")], "temporary file left behind"


def test_real_omniglot_samplers_never_mix_splits(omniglot):
    folder, splits, _ = omniglot
    origin = {}
    for name, (images, _) in splits.items():
        for image in images:
            origin.setdefault(image.tobytes(), set()).add(name)
    for name in ("train", "val", "test"):
        sampler = make_sampler(
            "omniglot", name, ways=20, shots=1, query=5, meta_batch=4, seed=3, data_dir=folder
        )
        assert sampler.num_classes == len(np.unique(splits[name][1]))
        batch = sampler.sample(0)
        for x in (batch.support_x, batch.query_x):
            for image in x.reshape(-1, 28, 28, 1):
                assert origin[image.tobytes()] == {name}
        assert np.bincount(batch.support_y[0]).tolist() == [1] * 20
    with pytest.raises(ValueError, match=r"ways=30 but split 'test' has only 24 classes"):
        make_sampler(
            "omniglot", "test", ways=30, shots=1, query=1, meta_batch=1, data_dir=folder, rotations=False
        )
