"""Run directories: one process at a time.

`RunLock` takes an exclusive, non-blocking `fcntl` lock on ``RUNDIR/.lock`` for as long as a run
writes there, so a second `tfmeta train --out RUNDIR` (or `--resume RUNDIR`) is refused instead of
interleaving its checkpoints with the first one's. A clean exit removes ``.lock``; the lock dies
with its process (kill -9 included), so a stale ``.lock`` file never blocks a later resume.
"""

from __future__ import annotations

import fcntl
import os


class RunDirectoryInUse(RuntimeError):
    """Another process holds the run directory's lock."""


class RunLock:
    """Context manager holding ``run_dir/.lock`` exclusively.

    Example:
        >>> with RunLock("runs/omni"):
        ...     trainer.fit(...)
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, ".lock")
        self._fd = None

    def __enter__(self):
        os.makedirs(self.run_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                break
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._fd = fd
                return self
            # the holder removed this .lock file on exit between our open and flock: take a new one
            os.close(fd)
        os.close(fd)
        holder = ""
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = f.read().strip()
        except OSError:
            pass
        raise RunDirectoryInUse(
            f"run directory {self.run_dir!r} is in use by another process"
            + (f" (pid {holder})" if holder else "") + "; wait for it or choose another --out."
        ) from None

    def __exit__(self, *exc):
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still locked: a waiting opener re-checks the inode
            except FileNotFoundError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        return False
