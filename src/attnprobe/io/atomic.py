"""The one atomic writer: every file and folder attnprobe writes appears whole or not at all.

A file is written to a temporary sibling (`.NAME.tmpPID`), flushed to disk, renamed over its final name,
and the rename made durable by syncing the folder. A kill at any point leaves the old file or the new
one, never a torn one; the leftovers of a killed writer are hidden names that `remove_stale` clears.
A folder (an export, a prepared data set, a cached benchmark) is built under `.NAME.partialPID` and
renamed into place the same way.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .outputs import default_mode, with_path


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """`.NAME.tmpPID` beside `path`: hidden (never a pool member or class), unique to this process."""
    return path.with_name(f".{path.name}.{kind}{os.getpid()}")


def remove_stale(path) -> None:
    """Remove what killed writers of `path` left beside it (`.NAME.tmp*`, `.NAME.partial*`)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for kind in ("tmp", "partial"):
        for leftover in path.parent.glob(f".{path.name}.{kind}*"):
            _remove(leftover)


def fsync_dir(folder) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path, *, sync: bool = True):
    """Yield a temporary path beside `path` to write the file to; on a clean exit it is flushed to disk
    (`sync`) and renamed over `path`. On any error the temporary file is removed and an OSError is raised
    naming `path` (a failed write() names no file). The file gets the usual mode of a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and with_path(e, path) is not e:
            raise with_path(e, path) from None
        raise
    if sync:
        fsync_dir(path.parent)


def write_text(path, text: str, *, sync: bool = True) -> None:
    """A UTF-8 text file, whole or not at all (bytes of names that are not UTF-8 as backslash escapes)."""
    with replacing(path, sync=sync) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace", newline="") as f:
            f.write(text)
        os.chmod(tmp, default_mode())


def write_json(path, obj, *, indent: int | None = 1, sync: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n", sync=sync)


@contextlib.contextmanager
def replacing_dir(path):
    """Yield a new temporary folder beside `path` to build a folder in; on a clean exit it is renamed to
    `path` (which must not exist, or be an empty folder). On any error the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, "partial")
    _remove(tmp)  # a leftover of a killed writer with the same pid
    try:
        tmp.mkdir()
        yield tmp
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and with_path(e, path) is not e:
            raise with_path(e, path) from None
        raise
    fsync_dir(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
