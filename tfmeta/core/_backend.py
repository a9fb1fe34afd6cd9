"""Make sure Keras runs on TensorFlow, with oneDNN's CPU kernels, before anything imports it.

tfmeta builds nested `tf.GradientTape`s inside `tf.function` graphs, so Keras must use its
TensorFlow backend. Importing tfmeta sets ``KERAS_BACKEND=tensorflow`` unless the user chose a
backend already; a different backend is refused with a clear error when Keras is imported.

oneDNN: TensorFlow turns its oneDNN CPU kernels on by default only on x86 CPUs with AVX-512
VNNI/BF16/AMX; on AVX2 CPUs (AMD EPYC, older Xeons) it runs the slower Eigen kernels (a conv4
MAML meta-step took 1.4x as long). On x86-64, importing tfmeta before TensorFlow sets
``TF_ENABLE_ONEDNN_OPTS=1`` unless the user set that variable (to anything: TensorFlow itself
reads and reports it). TensorFlow reads it once, when it is imported, so if TensorFlow was
imported before tfmeta the process keeps what TensorFlow chose (a debug-level log line says so).
:func:`onednn_enabled` says what is in effect.

Memory: glibc's malloc gives each new thread its own arena (up to 8 per core) and keeps freed
blocks in it, so TensorFlow's thread pools, each freeing tensors that another thread allocated,
raise the peak resident memory of a meta-step (docs/performance.md: 8% less working memory with
two arenas per core, at about 1% more time). On Linux with glibc, importing tfmeta limits the
arenas to two per core (``mallopt(M_ARENA_MAX)``) unless the user set ``MALLOC_ARENA_MAX``, which
glibc itself then honours; :data:`MALLOC_ARENAS` is the limit tfmeta set (None: it set none).
"""

from __future__ import annotations

import logging
import os
import platform
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
MALLOC_VARIABLE = "MALLOC_ARENA_MAX"
_M_ARENA_MAX = -8  # mallopt's parameter number for the arena limit (glibc's malloc.h)
_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
# TensorFlow's own start-up lines for oneDNN, printed (unfiltered by TF_CPP_MIN_LOG_LEVEL) when
# tfmeta, not the user, turned it on; only these are dropped, everything else is passed through.
_ONEDNN_NOTICES = (b"oneDNN custom operations are on", b"WARNING: All log messages before absl::InitializeLog()")


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with stderr (file descriptor 2) captured, then write back what it printed
    except TensorFlow's "oneDNN custom operations are on" notice."""
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded interpreters)
        import tensorflow  # noqa: F401
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True)
                    if not any(notice in line for notice in _ONEDNN_NOTICES)]
            if kept:
                os.write(2, b"".join(kept))


def _limit_malloc_arenas() -> int | None:
    """Limit glibc's malloc to two arenas per core, unless the user chose (``MALLOC_ARENA_MAX``) or
    the C library is not glibc; returns the limit set, or None. Arenas that already exist stay."""
    if MALLOC_VARIABLE in os.environ or not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        if platform.libc_ver()[0] != "glibc":
            return None
        arenas = 2 * max(1, os.cpu_count() or 1)
        return arenas if ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas) == 1 else None
    except (OSError, AttributeError, ValueError):  # no mallopt in this process's C library
        return None


#: The malloc arena limit tfmeta set at import (two per core), or None where it set none.
MALLOC_ARENAS = _limit_malloc_arenas()

if "tensorflow" in sys.modules:
    logging.getLogger("tfmeta").debug(
        "TensorFlow was imported before tfmeta: oneDNN is as TensorFlow chose at its import "
        "(%s=%r); tfmeta.core.runtime.onednn_enabled() tells which.", ONEDNN_VARIABLE, os.environ.get(ONEDNN_VARIABLE))
elif _X86_64 and ONEDNN_VARIABLE not in os.environ:
    os.environ[ONEDNN_VARIABLE] = "1"
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") not in ("", "0"):
        _import_tensorflow_quietly()

import keras  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(
        "tfmeta needs Keras' TensorFlow backend, but KERAS_BACKEND="
        f"{keras.backend.backend()!r}; unset it or set KERAS_BACKEND=tensorflow."
    )


def onednn_enabled() -> bool:
    """Whether TensorFlow's oneDNN CPU kernels are in effect in this process (as TensorFlow decided)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # pragma: no cover - other TensorFlow layouts
        return os.environ.get(ONEDNN_VARIABLE, "").lower() in ("1", "true")
    return bool(_pywrap_util_port.IsMklEnabled())
