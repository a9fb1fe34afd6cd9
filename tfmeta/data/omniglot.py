"""Omniglot (Lake et al., 2015) for few-shot classification, split by alphabet.

Sources, in order of preference:

* ``data_dir`` holding the original archives ``images_background.zip`` +
  ``images_evaluation.zip`` (the full set) or ``images_background_small1.zip``, or
  their extracted folders; inside, ``<archive>/<alphabet>/<character>/<id>_<drawer>.png``
  (105x105 black-and-white PNGs). If both the full set and small1 are there, the full
  set is used.
* ``data_dir=None``: ``tensorflow_datasets.load("omniglot")`` (needs internet the first
  time); it provides the full set. Offline, without tfds' prepared copy, it fails within
  seconds with a message naming ``--data-dir`` and the archives it accepts.

Splits are by ALPHABET, so meta-train, meta-val and meta-test never share a character
(see ``SPLITS``):

===========  ========================================  ================  ==============
layout       train                                     val               test
===========  ========================================  ================  ==============
``small1``   Balinese, Early_Aramaic, Korean (86 ch.)  Latin (26 ch.)    Greek (24 ch.)
``full``     images_background alphabets except the    those last 5      all 20
             last 5 in sorted order (25 alphabets)                       images_evaluation
                                                                         alphabets
===========  ========================================  ================  ==============

A class is (alphabet, character, rotation): with ``rotations=True`` every character gives
4 classes rotated by 0/90/180/270 degrees (Finn et al., 2017), all in the character's split.
Images are float32 in [0, 1] as decoded from the original PNGs (background 1, ink 0), area-resized to
``image_size``. Class ids are unique across the three splits (train first, then val, then
test); within a split the ids are consecutive, and with rotations id ``first + 4*c + k`` is
character ``c`` rotated by ``np.rot90(image, k)``. Rows are grouped by class in ascending
id order, drawings in file-name order.

Decoded arrays are cached as ``.npz`` in ``$TFMETA_CACHE`` (default ``~/.cache/tfmeta``),
keyed by archive md5, size and image size, and written atomically.

Example:
    >>> splits = load_omniglot("../shared/data/omniglot")  # doctest: +SKIP
    >>> images, labels = splits["test"]  # doctest: +SKIP
    >>> images.shape, len(set(labels))  # doctest: +SKIP
    ((1920, 28, 28, 1), 96)

Size (about 420 lines): one loader for three sources (archives, extracted folders, tensorflow-datasets),
its on-disk cache and the offline check; they share the alphabet split and the decoding, so they stay
together.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
import zlib
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tfmeta.data.episodes import check_positive_int

__all__ = ["load_omniglot", "SPLITS", "SPLIT_NAMES", "ARCHIVES", "cache_dir"]

SPLIT_NAMES = ("train", "val", "test")
ARCHIVES = ("images_background", "images_evaluation", "images_background_small1")

# layout -> split -> (archive, alphabets): a tuple of alphabet names, or a slice over the
# archive's alphabets in sorted order. Layouts are tried in this order; the first whose
# archives are all present is used.
SPLITS = {
    "full": {
        "train": ("images_background", slice(None, -5)),
        "val": ("images_background", slice(-5, None)),
        "test": ("images_evaluation", slice(None)),
    },
    "small1": {
        "train": ("images_background_small1", ("Balinese", "Early_Aramaic", "Korean")),
        "val": ("images_background_small1", ("Latin",)),
        "test": ("images_background_small1", ("Greek",)),
    },
}

_CACHE_VERSION = 2
_DECODE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError, tf.errors.OpError)


class _Archive(NamedTuple):
    """Unrotated images of one archive: images [N, S, S, 1], char_ids [N] into characters."""

    images: np.ndarray
    char_ids: np.ndarray
    characters: np.ndarray  # "alphabet/character", sorted


# -- public ------------------------------------------------------------------------------------
def load_omniglot(data_dir=None, *, image_size=28, rotations=True) -> dict:
    """Omniglot as ``{"train"|"val"|"test": (images [N, S, S, 1] float32, labels [N] int32)}``.

    Args:
        data_dir: folder with the original archives (or extracted folders); None uses tfds.
        image_size: side S of the resized square images.
        rotations: if True, each character gives 4 classes (0/90/180/270 degrees).

    Raises:
        ValueError: a corrupt or truncated archive (naming the file), bad arguments.
        FileNotFoundError: ``data_dir`` holds no Omniglot archive.
        RuntimeError: ``data_dir`` is None and tensorflow_datasets cannot provide the data.

    Example:
        >>> images, labels = load_omniglot("data/omniglot", image_size=28)["train"]  # doctest: +SKIP
    """
    image_size = check_positive_int("image_size", image_size)
    if data_dir is None:
        archives, layout = _load_tfds(image_size), "full"
    else:
        sources = _find_sources(os.fspath(data_dir))
        layout = _choose_layout(sources, data_dir)
        needed = {archive for archive, _ in SPLITS[layout].values()}
        archives = {name: _load_archive(sources[name], name, image_size) for name in needed}
    return _assemble(archives, layout, rotations)


def cache_dir() -> str:
    """Folder for decoded-array caches: ``$TFMETA_CACHE`` or ``~/.cache/tfmeta``.

    Example:
        >>> os.path.basename(cache_dir()) or "set by TFMETA_CACHE"  # doctest: +SKIP
        'tfmeta'
    """
    return os.environ.get("TFMETA_CACHE") or os.path.expanduser("~/.cache/tfmeta")


# -- locating sources --------------------------------------------------------------------------
def _find_sources(data_dir: str) -> dict:
    """``{archive name: path}`` of the archives (zip preferred) or folders in ``data_dir``."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir={data_dir!r} is not a directory")
    sources = {}
    for name in ARCHIVES:
        for candidate in (os.path.join(data_dir, name + ".zip"), os.path.join(data_dir, name)):
            if os.path.exists(candidate):
                sources[name] = candidate
                break
    return sources


def _choose_layout(sources: dict, data_dir) -> str:
    """First layout in SPLITS whose archives are all in ``sources``."""
    for layout, splits in SPLITS.items():
        if all(archive in sources for archive, _ in splits.values()):
            return layout
    raise FileNotFoundError(
        f"data_dir={os.fspath(data_dir)!r} holds no complete Omniglot set: expected "
        "images_background.zip + images_evaluation.zip, or images_background_small1.zip "
        f"(or their extracted folders); found {sorted(sources) or 'none'}"
    )


# -- decoding and caching ----------------------------------------------------------------------
def _load_archive(path: str, name: str, image_size: int) -> _Archive:
    """Decoded archive, from the cache when possible (see ``cache_dir``)."""
    digest, size = _fingerprint(path)
    cache_file = os.path.join(
        cache_dir(), f"omniglot-{name}-{digest[:16]}-{size}-{image_size}px-v{_CACHE_VERSION}.npz"
    )
    cached = _read_cache(cache_file)
    if cached is not None:
        return cached
    entries = _read_zip(path, name) if os.path.isfile(path) else _read_folder(path, name)
    archive = _decode(entries, path, image_size)
    _write_cache(cache_file, archive)
    return archive


def _fingerprint(path: str) -> tuple[str, int]:
    """(md5 hex, byte size) of a zip, or of a folder's file listing and sizes."""
    md5 = hashlib.md5()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                md5.update(block)
        return md5.hexdigest(), os.path.getsize(path)
    total = 0
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for file in sorted(files):
            size = os.path.getsize(os.path.join(root, file))
            md5.update(f"{os.path.relpath(os.path.join(root, file), path)}:{size}\n".encode())
            total += size
    return md5.hexdigest(), total


def _member_key(relpath: str, name: str):
    """(alphabet, character, file) for ``<name>/<alphabet>/<character>/<file>.png``, else None."""
    parts = relpath.replace(os.sep, "/").split("/")
    if len(parts) == 4 and parts[0] == name and parts[3].endswith(".png"):
        return tuple(parts[1:])
    return None


def _read_zip(path: str, name: str) -> list:
    """Sorted ``[((alphabet, character, file), png bytes)]`` from a zip archive."""
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [(key, member) for member in zf.namelist() if (key := _member_key(member, name))]
            entries = [(key, zf.read(member)) for key, member in sorted(keys)]
    except _DECODE_ERRORS as err:
        raise ValueError(
            f"Omniglot archive {path!r} is corrupt or truncated ({type(err).__name__}: {err}); "
            "download it again"
        ) from err
    return _nonempty(entries, path, name)


def _read_folder(path: str, name: str) -> list:
    """Sorted ``[((alphabet, character, file), png bytes)]`` from an extracted folder."""
    entries = []
    parent = os.path.dirname(os.path.abspath(path))
    for root, _, files in os.walk(path):
        for file in files:
            full = os.path.join(root, file)
            key = _member_key(os.path.relpath(full, parent), name)
            if key:
                with open(full, "rb") as f:
                    entries.append((key, f.read()))
    return _nonempty(sorted(entries), path, name)


def _nonempty(entries: list, path: str, name: str) -> list:
    if not entries:
        raise ValueError(
            f"Omniglot archive {path!r} has no images laid out as "
            f"{name}/<alphabet>/<character>/<id>_<drawer>.png"
        )
    return entries


@tf.function(reduce_retracing=True, autograph=False)
def _png_to_ink(png: tf.Tensor, image_size: tf.Tensor) -> tf.Tensor:
    """PNG bytes -> float32 [S, S, 1] in [0, 1] as the PNG has it: background 1, strokes 0.

    This is the documented input of exported models (README, Serving): no inversion to undo.
    """
    ink = tf.cast(tf.io.decode_png(png, channels=1), tf.float32) / 255.0
    resized = tf.image.resize(ink, tf.stack([image_size, image_size]), method="area")
    return tf.clip_by_value(resized, 0.0, 1.0)


def _decode(entries: list, path: str, image_size: int) -> _Archive:
    """Decode and resize all PNGs; a bad PNG raises ValueError naming the archive and member."""
    images = np.empty((len(entries), image_size, image_size, 1), np.float32)
    size = tf.constant(image_size)
    for i, ((alphabet, character, file), png) in enumerate(entries):
        try:
            images[i] = _png_to_ink(tf.constant(png), size).numpy()
        except tf.errors.OpError as err:
            raise ValueError(
                f"Omniglot archive {path!r} is corrupt: cannot decode "
                f"{alphabet}/{character}/{file} ({err.message.splitlines()[0]})"
            ) from err
    names = np.array([f"{a}/{c}" for (a, c, _), _ in entries])
    characters, char_ids = np.unique(names, return_inverse=True)
    return _Archive(images, char_ids.astype(np.int32), characters)


def _read_cache(cache_file: str):
    """The cached _Archive, or None if missing or unreadable."""
    if not os.path.exists(cache_file):
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            return _Archive(data["images"], data["char_ids"], data["characters"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None


def _write_cache(cache_file: str, archive: _Archive) -> None:
    """Write ``archive`` atomically (temp file + os.replace); warn instead of failing."""
    folder = os.path.dirname(cache_file)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".omniglot-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **archive._asdict())
        os.chmod(tmp, 0o644)
        os.replace(tmp, cache_file)
    except OSError as err:
        warnings.warn(f"could not write Omniglot cache {cache_file!r}: {err}", stacklevel=3)
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


# -- tensorflow_datasets -----------------------------------------------------------------------
#: Where tensorflow-datasets downloads Omniglot from (its builder's URLs).
_TFDS_URL = "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip"
#: Seconds to wait for that host before declaring the machine offline.
_PROBE_SECONDS = 5.0
_WAY_OUT = ("Pass --data-dir (data_dir=...) with a folder holding Omniglot's original archives "
            "images_background.zip and images_evaluation.zip, or images_background_small1.zip "
            "(or their extracted folders).")


def _probe(url: str, seconds: float):
    """None if `url`'s server answers within `seconds` (HTTP errors count as answers), else why not.

    Runs in a daemon thread so a hanging DNS lookup cannot hold the caller past `seconds`;
    respects the usual proxy environment variables (urllib).
    """
    import threading
    import urllib.error
    import urllib.request

    outcome = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=seconds).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 - any failure to connect means offline
            outcome.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else f"no answer within {seconds:g} s"


def _load_tfds(image_size: int) -> dict:
    """The full set from tensorflow_datasets as ``{archive name: _Archive}``.

    Fails fast, naming the way out: an import error of tensorflow_datasets is reported as one,
    and without the prepared data and without network (probed for at most ``_PROBE_SECONDS``)
    nothing is downloaded (tensorflow_datasets would retry for minutes).
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise RuntimeError(
            f"could not import tensorflow_datasets ({type(err).__name__}: {err}), which loads Omniglot "
            "when no --data-dir is given. Reinstall tfmeta (python3 -m pip install -e \".[cpu]\") to get "
            f"its dependencies. {_WAY_OUT}"
        ) from err
    try:
        builder = tfds.builder("omniglot")
        prepared = builder.is_prepared()
    except Exception as err:  # noqa: BLE001
        raise RuntimeError(f"tensorflow_datasets could not set up Omniglot ({type(err).__name__}: {err}). "
                           f"{_WAY_OUT}") from err
    if not prepared:
        offline = _probe(_TFDS_URL, _PROBE_SECONDS)
        if offline is not None:
            raise RuntimeError(
                f"Omniglot is not in tensorflow_datasets' folder {builder.data_dir!r} and cannot be "
                f"downloaded: no network ({offline}). {_WAY_OUT}"
            )
    try:
        splits, info = tfds.load("omniglot", split=["train", "test"], with_info=True)
    except Exception as err:  # noqa: BLE001 - any failure means "no data"; explain the way out
        raise RuntimeError(
            f"could not get Omniglot from tensorflow_datasets ({type(err).__name__}: {err}). {_WAY_OUT}"
        ) from err
    alphabet_names = info.features["alphabet"].names
    return {
        name: _tfds_archive(ds, alphabet_names, image_size)
        for name, ds in zip(("images_background", "images_evaluation"), splits)
    }


def _tfds_archive(ds: tf.data.Dataset, alphabet_names: list, image_size: int) -> _Archive:
    def convert(ex):
        ink = tf.cast(ex["image"][..., :1], tf.float32) / 255.0
        return tf.image.resize(ink, (image_size, image_size), method="area"), ex["alphabet"], ex[
            "alphabet_char_id"
        ]

    images, names = [], []
    for img, alphabet, char in ds.map(convert).batch(1024).as_numpy_iterator():
        images.append(np.clip(img, 0.0, 1.0))
        names += [f"{alphabet_names[a]}/character{c + 1:02d}" for a, c in zip(alphabet, char)]
    names = np.array(names)
    order = np.argsort(names, kind="stable")
    characters, char_ids = np.unique(names[order], return_inverse=True)
    return _Archive(np.concatenate(images)[order], char_ids.astype(np.int32), characters)


# -- splitting ---------------------------------------------------------------------------------
def _select_alphabets(archive: _Archive, selector, name: str) -> list:
    """Alphabet names chosen by ``selector`` (names or a slice over the sorted alphabets)."""
    available = sorted({c.split("/")[0] for c in archive.characters})
    if isinstance(selector, slice):
        return available[selector]
    missing = sorted(set(selector) - set(available))
    if missing:
        raise ValueError(f"Omniglot archive {name!r} lacks the alphabets {missing} its split needs")
    return list(selector)


def _split_arrays(archive: _Archive, alphabets: list, first_id: int, rotations: bool):
    """Images and labels of ``alphabets``; ids start at ``first_id``, grouped by class."""
    alphabet_of_char = np.array([c.split("/")[0] for c in archive.characters])
    chars = np.flatnonzero(np.isin(alphabet_of_char, alphabets))
    rows = np.flatnonzero(np.isin(archive.char_ids, chars))
    local = np.searchsorted(chars, archive.char_ids[rows])  # 0..len(chars)-1
    images = archive.images[rows]
    if rotations:
        images = np.concatenate([np.rot90(images, k, axes=(1, 2)) for k in range(4)])
        labels = np.concatenate([first_id + 4 * local + k for k in range(4)])
    else:
        labels = first_id + local
    order = np.argsort(labels, kind="stable")
    return np.ascontiguousarray(images[order]), labels[order].astype(np.int32)


def _assemble(archives: dict, layout: str, rotations: bool) -> dict:
    """``{split: (images, labels)}`` following ``SPLITS[layout]``."""
    result, first_id = {}, 0
    for split in SPLIT_NAMES:
        name, selector = SPLITS[layout][split]
        alphabets = _select_alphabets(archives[name], selector, name)
        images, labels = _split_arrays(archives[name], alphabets, first_id, rotations)
        result[split] = (images, labels)
        first_id = int(labels.max()) + 1 if len(labels) else first_id
    return result
