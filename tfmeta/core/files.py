"""Atomic file writes: a reader never sees a half-written file, a crash leaves the old one.

Every JSON file tfmeta writes (a run's ``config.json``, a search's ``result.json``, an
architecture description, a benchmark report) goes through :func:`write_json`: the text is written
to ``<path>.tmp`` and moved over `path` with ``os.replace``, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, value: Any, *, indent: int = 2, make_dirs: bool = True) -> None:
    """Write `value` as JSON to `path` atomically (via ``<path>.tmp`` and ``os.replace``).

    Args:
        make_dirs: create the parent directory when missing.

    Example:
        >>> write_json("runs/0/config.json", {"seed": 0})  # doctest: +SKIP
    """
    if make_dirs:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=indent)
    os.replace(tmp, path)
