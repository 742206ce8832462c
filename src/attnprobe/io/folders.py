"""Folders of images: listing a wild pool (recursively, sorted, hidden names left out, a million files
in one compact PathList) and the class folders of labeled data."""
from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import AttnprobeError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def is_hidden(name: str) -> bool:
    """Names starting with '.' (.ipynb_checkpoints, .DS_Store, macOS's ._x.jpg) are never classes or images."""
    return name.startswith(".")


def class_folders(root) -> list[str]:
    """The class names of a folder of class folders: its sub-folders, sorted, hidden ones left out."""
    return sorted(d.name for d in Path(root).iterdir() if d.is_dir() and not is_hidden(d.name))


def iter_images(root) -> Iterator[str]:
    """Image files under root, recursively, as '/'-separated paths relative to root, in sorted order.
    Hidden files and folders (names starting with '.') are left out.

    A sub-folder that cannot be listed (no permission, or a symlink back to a folder above it) does not end
    the walk: it is yielded as 'rel/' (trailing slash), and the pass that reads the files reports it with
    the reason among the skipped files (ImageList). Walks with os.scandir in sorted order so a million-file
    tree streams without a second copy."""
    root = os.fspath(root)

    def walk(rel, above):
        try:
            with os.scandir(os.path.join(root, rel) if rel else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if not rel:
                raise AttnprobeError(f"image folder {root} cannot be listed ({e.strerror or e}); "
                                     "check its permissions") from None
            yield f"{rel}/"
            return
        for e in entries:
            if is_hidden(e.name):
                continue
            path = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=True):
                try:
                    st = os.stat(e.path)
                    key = (st.st_dev, st.st_ino)
                except OSError:
                    yield f"{path}/"
                    continue
                if key in above:  # a symlink back to a folder above: would never end
                    yield f"{path}/"
                    continue
                yield from walk(path, above | {key})
            elif is_image_file(e.name):
                yield path
    try:
        st = os.stat(root)
        top = {(st.st_dev, st.st_ino)}
    except OSError:
        top = set()
    yield from walk("", top)


def folder_failure(path) -> None:
    """Raise the reason why a folder entry of `iter_images` ('rel/') was not read."""
    with os.scandir(path):  # raises the listing's own error (PermissionError ...) if it still fails
        pass
    raise OSError("folder not read: it could not be listed, or it links back to a folder above it (symlink loop)")


def _check_root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise AttnprobeError(f"image folder {root} {'is a file, not a folder' if root.exists() else 'does not exist'}; pass the folder that holds the images")
    return root


def _no_images(root):
    if any(Path(root).glob("*.tar")):  # a pool of tar shards: they are named by a pattern, not by their folder
        return AttnprobeError(f"image folder {root} holds tar shards, not images; pass the shards: "
                              f"--wild '{os.path.join(root, '*.tar')}'")
    return AttnprobeError(f"image folder {root} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                          "point to the folder that contains them")


def list_images(root) -> list[str]:
    root = _check_root(root)
    paths = list(iter_images(root))
    if not paths:
        raise _no_images(root)
    return paths


class PathList:
    """A compact, read-only sequence of relative paths: one UTF-8 byte buffer plus offsets (numpy).

    A million-file pool costs a few tens of MB and no per-path Python objects, so DataLoader workers
    (forked) do not copy it page by page as they touch reference counts."""

    def __init__(self, paths=()):
        buf, offsets = bytearray(), array("q", [0])
        for p in paths:
            buf += p.encode("utf-8", "surrogateescape")  # names that are not UTF-8 survive the round trip
            offsets.append(len(buf))
        self._buf = np.frombuffer(bytes(buf), dtype=np.uint8)
        self._offsets = np.frombuffer(offsets, dtype=np.int64).copy()

    @classmethod
    def from_dir(cls, root) -> "PathList":
        """The images under root in `iter_images` order, or the same errors as `list_images`."""
        root = _check_root(root)
        paths = cls(iter_images(root))
        if not len(paths):
            raise _no_images(root)
        return paths

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._buf[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def digest(self) -> str:
        """sha256 of the list (order included): identifies a pool listing."""
        import hashlib
        h = hashlib.sha256(self._offsets.tobytes())
        h.update(self._buf.tobytes())
        return h.hexdigest()


def stat_identity(entries) -> str:
    """The content identity of a set of files: sha256 over each entry's (name, size, mtime_ns), in order.
    A file rewritten in place, even to the same size and under the same name, gets a new mtime_ns and so a
    new identity; a file that cannot be stat'ed counts as (name, -1, -1). The one rule for "did these files
    change": `attnprobe run`'s stage keys and `score`'s finished parts both use it."""
    h = hashlib.sha256()
    for name, size, mtime_ns in entries:
        h.update(f"{name}\t{size}\t{mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def file_stats(root, rels) -> Iterator[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of each file `rels` names under `root`; (rel, -1, -1) when it is gone."""
    root = os.fspath(root)
    for rel in rels:
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            yield rel, -1, -1
        else:
            yield rel, st.st_size, st.st_mtime_ns


def files_identity(root, rels) -> str:
    """`stat_identity` of the files `rels` (relative paths, e.g. a PathList or a slice of it) under `root`."""
    return stat_identity(file_stats(root, rels))


def split_dir(root, split: str) -> Path:
    """`root/split` of an ImageFolder root, or a clear error naming the expected layout."""
    path = Path(root) / split
    if not path.is_dir():
        raise AttnprobeError(f"{root} has no {split}/ folder; expected an ImageFolder root with train/<class>/ "
                             "and val/<class>/ (attnprobe prepare makes one)")
    return path


def class_dir(path, classes, split: str) -> Path:
    """A folder of class folders, or an ImageFolder root whose `split`/ is one."""
    path = Path(path)
    if path.is_dir() and not {d.name for d in path.iterdir() if d.is_dir()} & set(classes) and (path / split).is_dir():
        return path / split
    return path
