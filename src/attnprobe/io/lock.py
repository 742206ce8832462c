"""The one lock: one writer per output (a score table's parts, a run folder, a shared cache, an export).

A POSIX record lock (fcntl.lockf) on a lock file. Unlike flock, a record lock belongs to the process
that took it: forked children (DataLoader workers) do not inherit it, so it is freed the moment its
process dies, even on kill -9 while workers are still exiting, and the same command can go ahead at
once. The lock file records the holder's pid for the message of whoever is refused. The descriptor is
close-on-exec, and it is the only one this process opens on the file (closing any descriptor of a
file drops a process's record locks on it).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import AttnprobeError


class FileLock:
    """An exclusive lock on `path`, taken with `acquire()` (False when another process holds it) and
    released with `release()` or on leaving a `with` block; the lock file itself is left in place unless
    `remove=True` (for a lock file inside a folder that is removed afterwards)."""

    def __init__(self, path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # no record locks (Windows): no guard
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EACCES or EAGAIN: held by another process
                os.close(fd)
                return False
            if self._still_named(fd):
                break
            os.close(fd)  # its holder removed the file as we opened it: lock the new one instead
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def _still_named(self, fd: int) -> bool:
        """Whether the file we locked is still the one at `path` (a holder releasing with remove=True unlinks
        it; a lock on the unlinked file would guard nothing)."""
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def holder(self) -> str:
        """`pid N` of the process that wrote the lock file last (for messages), or ''."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return ""
        return f"pid {text}" if text.isdigit() else ""

    def release(self, *, remove: bool = False) -> None:
        if self.fd is None:
            return
        try:
            if remove:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def hold(path, what: str, fix: str) -> FileLock:
    """The lock on `path`, or one AttnprobeError line: `another {what} is running (it holds {path}, pid N); {fix}`."""
    lock = FileLock(path)
    if not lock.acquire():
        holder = lock.holder()
        raise AttnprobeError(f"another {what} is running (it holds {lock.path}{', ' + holder if holder else ''}); "
                             f"{fix}")
    return lock
