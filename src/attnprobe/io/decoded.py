"""The decoded selection: selected images decoded once, brought to the teacher's input by the deterministic
geometry (io.images.decode_transform: `crop` or `stretch`, no augmentation, no normalisation), and kept on
disk as uint8 [C, H, W] rows, so that the epochs of a distillation read bytes instead of decoding JPEGs.

A store is the folder `DIR/<geometry key>/`; the key is sha256 of (H, W, C, resize), so one DIR holds the
stores of several geometries. It holds chunks: `chunk-<id>.npy` (uint8 [rows, C, H, W]) and, written after
it, `chunk-<id>.json` (its rows: `[{"key", "identity", "ok", "reason"}, ...]`); both are written whole or not
at all (io.atomic), and a chunk exists once its .json does. A row is known by its key (the path the table
names) and its identity (a file's size and mtime_ns; a shard member's shard, offset, size and the shard's
mtime_ns): a file rewritten gets a new identity and is decoded again, into a later chunk, which supersedes
the earlier row. Unreadable images are kept as rows too (ok false, with the reason, zero bytes), so they are
tried once. So the build resumes chunk by chunk after kill -9, and one store serves every selection,
strategy and run of the same pool and geometry: each decodes only the rows the store lacks.

Chunk names are unique to their writer (time and a random token), so concurrent writers never collide;
io.lock on `.lock` keeps a second command from decoding the same rows meanwhile (it waits for the first).
Under torchrun the ranks deal the missing rows' chunks between them (ensure).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import AttnprobeError, first_line
from .atomic import replacing, write_json
from .datasets import failure_reason
from .folders import file_stats
from .images import decode_transform
from .jsonfiles import read_json
from .lock import FileLock
from .outputs import default_mode

FORMAT = 1  # of the chunks' bytes and index; part of the geometry key
CHUNK_BYTES = 256 << 20  # a chunk holds at most this many bytes of images (and at most chunk_rows rows)
DECODE_BATCH = 64  # images per DataLoader batch while decoding


@dataclass(frozen=True)
class RowSource:
    """One image to decode: `key`, the row's path as the table names it (a folder's relative path, a shard
    member's `<stem>/<member>`); `identity`, what changes when its bytes do (a file: (size, mtime_ns); a member:
    (shard stem, offset, size, shard mtime_ns)); `open_path`, what the loader opens (the file's path, or the
    member path for a tar_members.MemberLoader)."""
    key: str
    identity: tuple
    open_path: str


def row_sources(paths, *, wild, members=None) -> list[RowSource]:
    """The RowSources of a selection's rows: files under the folder `wild` (a path that is already absolute,
    such as a labeled image's, is taken as it is; identity from os.stat, (-1, -1) for a file that is gone), or,
    with `members` (tar_members.member_index's {row path: (shard file, offset, size)}), tar-shard members."""
    out = []
    if members is not None:
        mtimes: dict[str, int] = {}
        for p in paths:
            file, offset, size = members[p]
            if file not in mtimes:
                mtimes[file] = next(file_stats("", [file]))[2]
            out.append(RowSource(p, (p.split("/", 1)[0], int(offset), int(size), mtimes[file]), p))
        return out
    root = os.fspath(wild)
    for p, size, mtime_ns in file_stats(root, paths):
        out.append(RowSource(p, (int(size), int(mtime_ns)), os.path.join(root, p)))
    return out


def input_size(info: dict) -> tuple[int, int]:
    size = info["img_size"]
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def geometry_key(info: dict, resize: str) -> str:
    """The store folder's name: sha256 of (H, W, C, resize) and the format, first 16 hex digits."""
    H, W = input_size(info)
    text = json.dumps(["attnprobe decoded selection", FORMAT, H, W, int(info["in_chans"]), resize])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Decoding(Dataset):
    """(uint8 [C, H, W] tensor or None, index, reason or None) of each RowSource."""

    def __init__(self, rows: list[RowSource], loader, transform):
        self.rows, self.loader, self.transform = rows, loader, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        try:
            return self.transform(self.loader(self.rows[i].open_path)), i, None
        except Exception as e:  # one bad image must not end the build: kept as an unreadable row
            return None, i, failure_reason(e)


def _collate(batch):
    """(the readable images stacked, or None; the indices; the reasons, None for a readable one): one tensor
    per batch crosses from a worker, not one per image."""
    good = [x for x, _, _ in batch if x is not None]
    return torch.stack(good) if good else None, [i for _, i, _ in batch], [r for _, _, r in batch]


class DecodedStore:
    """The decoded store of one geometry under a folder DIR (see the module). `ensure` decodes what a selection
    needs and gives each row's store row; `gather` and `tensor` read store rows as uint8 [B, C, H, W]. Store
    rows are numbered over the chunks in the order this object first read them, so the numbers `ensure`
    returns stay valid for the object's life, whatever other writers add."""

    def __init__(self, folder: Path, info: dict, resize: str):
        self.folder, self.resize = Path(folder), resize
        H, W = input_size(info)
        self.shape = (int(info["in_chans"]), H, W)
        self.nbytes_per_image = int(np.prod(self.shape))
        self.transform = decode_transform(info, resize=resize)  # refuses an unknown resize
        self._names: list[str] = []  # chunks read, in order
        self._starts: list[int] = []  # each chunk's first store row
        self._rows = 0
        self._index: dict[tuple, tuple[int, bool, str | None]] = {}  # (key, identity) -> (store row, ok, reason)
        self._arrays: dict[int, np.ndarray] = {}  # memory maps, opened when first read

    @classmethod
    def at(cls, folder, *, info: dict, resize: str) -> DecodedStore:
        """The store of `info`'s geometry (img_size, in_chans) and `resize` under `folder` (DIR/<key>/, made
        if needed) with the chunks it holds now."""
        key = geometry_key(info, resize)
        store = cls(Path(folder) / key, info, resize)
        try:
            store.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AttnprobeError(f"cannot write the decoded selection in {store.folder} ({first_line(e)}); pass "
                                 "--decode-cache DIR on a writable disk, or --no-decode-cache") from None
        store.refresh()
        return store

    def __getstate__(self):  # memory maps are not sent to other processes: they reopen them
        return {**self.__dict__, "_arrays": {}}

    # ---- reading -------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the chunks written since the last reading (their .json; their .npy headers checked)."""
        known = set(self._names)
        for path in sorted(self.folder.glob("chunk-*.json")):
            name = path.name[:-len(".json")]
            if name in known:
                continue
            rows = self._chunk_rows_of(path)
            array = self._check_npy(name, len(rows))
            first = self._rows
            self._arrays[len(self._names)] = array
            self._names.append(name)
            self._starts.append(first)
            self._rows += len(rows)
            for j, r in enumerate(rows):  # later chunks supersede earlier ones
                self._index[(r["key"], tuple(r["identity"]))] = (first + j, bool(r["ok"]), r.get("reason"))

    def _damaged(self, path, why: str) -> AttnprobeError:
        stem = Path(path).name.rsplit(".", 1)[0]
        return AttnprobeError(f"{path}: a decoded chunk is damaged ({why}); delete {self.folder / stem}.npy and "
                              ".json (its images are decoded again)")

    def _chunk_rows_of(self, path: Path) -> list[dict]:
        stem = path.name[:-len(".json")]
        rows = read_json(path, what="a decoded chunk's index", kind=list,
                         fix=f"delete {self.folder / stem}.npy and .json (its images are decoded again)")
        for r in rows:
            if not (isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("identity"), list)
                    and isinstance(r.get("ok"), bool)):
                raise self._damaged(path, f"a row is {str(r)[:80]}")
        if not rows:
            raise self._damaged(path, "no rows")
        return rows

    def _check_npy(self, name: str, n: int) -> np.ndarray:
        """The chunk's images, memory-mapped, checked against its index."""
        path = self.folder / f"{name}.npy"
        try:
            a = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise self._damaged(path, first_line(e)) from None
        if a.shape != (n, *self.shape) or a.dtype != np.uint8:
            raise self._damaged(path, f"holds {a.dtype} {a.shape}, its index {n} rows of uint8 {self.shape}")
        return a

    def _array(self, c: int) -> np.ndarray:
        a = self._arrays.get(c)
        if a is None:
            a = self._arrays[c] = np.load(self.folder / f"{self._names[c]}.npy", mmap_mode="r")
        return a

    def _entry(self, row: RowSource):
        return self._index.get((row.key, tuple(row.identity)))

    def missing(self, rows) -> list[RowSource]:
        """The distinct rows the store lacks (or holds only with another identity), in order."""
        seen, out = set(), []
        for r in rows:
            k = (r.key, tuple(r.identity))
            if k not in seen and k not in self._index:
                seen.add(k)
                out.append(r)
        return out

    def rows_of(self, rows) -> np.ndarray:
        """The store row of each of `rows` (int64; -1 for an unreadable one). Every row must be in the store."""
        out = np.empty(len(rows), dtype=np.int64)
        for i, r in enumerate(rows):
            e = self._entry(r)
            if e is None:
                raise AttnprobeError(f"{r.key} is not in the decoded selection {self.folder}: it was not decoded "
                                     "(is the folder shared by every process?); run the command again")
            out[i] = e[0] if e[1] else -1
        return out

    def unreadable(self, rows) -> list[tuple[str, str]]:
        """(key, reason) of each distinct row of `rows` that could not be decoded, in order."""
        seen, out = set(), []
        for r in rows:
            e = self._entry(r)
            if e is not None and not e[1] and r.key not in seen:
                seen.add(r.key)
                out.append((r.key, e[2] or "unreadable"))
        return out

    def gather(self, index: np.ndarray) -> torch.Tensor:
        """uint8 [B, C, H, W] of the store rows `index`, read from the memory-mapped chunks."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        out = np.empty((len(index), *self.shape), dtype=np.uint8)
        if len(index) == 0:
            return torch.from_numpy(out)
        if index.min() < 0 or index.max() >= self._rows:
            raise IndexError(f"store rows {index.min()}..{index.max()} outside 0..{self._rows - 1} of {self.folder}")
        starts = np.asarray(self._starts, dtype=np.int64)
        chunk = np.searchsorted(starts, index, side="right") - 1
        if len(self._starts) == 1 or chunk[0] == chunk[-1] and (chunk == chunk[0]).all():
            out[:] = self._array(int(chunk[0]))[index - starts[chunk[0]]]
            return torch.from_numpy(out)
        order = np.argsort(chunk, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk[order])) + 1
        for part in np.split(order, bounds):
            c = int(chunk[part[0]])
            out[part] = self._array(c)[index[part] - starts[c]]
        return torch.from_numpy(out)

    def tensor(self, index: np.ndarray) -> torch.Tensor:
        """uint8 [N, C, H, W] of the store rows `index` at once (e.g. a whole training set, to place on a
        device). `gather` already reads each chunk's rows in one pass, so this is that, named for its use."""
        return self.gather(index)

    def __len__(self) -> int:
        return self._rows

    # ---- building ------------------------------------------------------------------------------------

    def ensure(self, rows: list[RowSource], *, loader, workers: int, progress: bool, chunk_rows: int = 4096,
               rank: int = 0, world: int = 1, barrier=lambda: None) -> np.ndarray:
        """Decode the rows the store lacks (or holds with another identity) and return the store row of each of
        `rows` (int64; -1 for an unreadable one; see `unreadable`).

        `loader`: path -> PIL image in the teacher's channels (io.images.ImageLoader(in_chans), or a
        tar_members.MemberLoader), applied to each row's open_path by a DataLoader with `workers` processes.
        Under torchrun every rank calls it with the same `rows` and the process group's `barrier`: rank 0 takes
        the lock, all read the store after a barrier (so all see the same missing rows), each decodes the
        chunks dealt to it (rank, rank + world, ...), and after a second barrier all read the result. A chunk
        holds at most `chunk_rows` rows (and CHUNK_BYTES bytes); a killed build keeps its finished chunks."""
        lock = self._lock(progress) if rank == 0 else None
        try:
            if lock is not None:
                self._remove_leftovers()
                about = self.folder / "geometry.json"  # for whoever looks into the folder
                if not about.exists():
                    C, H, W = self.shape
                    write_json(about, {"height": H, "width": W, "channels": C, "resize": self.resize, "format": FORMAT})
            barrier()
            self.refresh()
            missing = self.missing(rows)
            per = max(1, min(int(chunk_rows), CHUNK_BYTES // self.nbytes_per_image))
            chunks = [missing[i:i + per] for i in range(0, len(missing), per)]
            self._decode(chunks[rank::world], loader, workers, progress)
            barrier()
        finally:
            if lock is not None:
                lock.release()
        self.refresh()
        left = self.missing(rows)
        if left:  # a folder not shared with the ranks that decoded them (a node's own disk): decode them here
            with self._lock(progress):
                self.refresh()
                left = self.missing(rows)
                self._decode([left[i:i + per] for i in range(0, len(left), per)], loader, workers, progress)
            self.refresh()
        return self.rows_of(rows)

    def _lock(self, progress: bool) -> FileLock:
        """The store's lock, waited for while another command holds it (it decodes rows this one may need)."""
        lock, told = FileLock(self.folder / ".lock"), False
        while not lock.acquire():
            if progress and not told:
                holder = lock.holder()
                print(f"waiting for another process decoding into {self.folder}{' (' + holder + ')' if holder else ''}",
                      file=sys.stderr, flush=True)
                told = True
            time.sleep(0.5)
        return lock

    def _remove_leftovers(self) -> None:
        """The temporary files of killed writers (only the lock's holder calls this: no one else is writing)."""
        for leftover in self.folder.glob(".chunk-*.tmp*"):
            leftover.unlink(missing_ok=True)

    def _decode(self, chunks: list[list[RowSource]], loader, workers: int, progress: bool) -> None:
        """Decode `chunks` (lists of rows) in order, writing each as it is complete."""
        chunks = [c for c in chunks if c]
        if not chunks:
            return
        from tqdm.auto import tqdm
        flat = [r for c in chunks for r in c]
        starts = np.cumsum([0] + [len(c) for c in chunks])
        batches = [list(range(s + i, s + min(i + DECODE_BATCH, len(c))))
                   for s, c in zip(starts[:-1].tolist(), chunks) for i in range(0, len(c), DECODE_BATCH)]
        dl = DataLoader(_Decoding(flat, loader, self.transform), batch_sampler=batches, num_workers=workers,
                        collate_fn=_collate)
        bar = tqdm(total=len(flat), desc="decode", unit="img", leave=False, disable=not progress or None)
        c, filled, arr, meta = 0, 0, np.zeros((len(chunks[0]), *self.shape), np.uint8), [None] * len(chunks[0])
        try:
            for images, index, reasons in dl:
                if images is not None and tuple(images.shape[1:]) != self.shape:
                    raise AttnprobeError(f"{flat[index[0]].key} decodes to {tuple(images.shape[1:])}, not the "
                                         f"teacher's input {self.shape}: the loader gives another channel count")
                good = [i - int(starts[c]) for i, reason in zip(index, reasons) if reason is None]
                if good:
                    arr[good] = images.numpy()
                for i, reason in zip(index, reasons):
                    r = flat[i]
                    meta[i - int(starts[c])] = {"key": r.key, "identity": list(r.identity), "ok": reason is None,
                                                "reason": reason}
                filled += len(index)
                bar.update(len(index))
                if filled == len(chunks[c]):
                    self._write_chunk(arr, meta)
                    c, filled = c + 1, 0
                    if c < len(chunks):
                        arr, meta = np.zeros((len(chunks[c]), *self.shape), np.uint8), [None] * len(chunks[c])
        finally:
            bar.close()

    def _write_chunk(self, arr: np.ndarray, meta: list[dict]) -> None:
        """The .npy, then its .json (the chunk exists from then on); both whole or not at all."""
        name = f"chunk-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        with replacing(self.folder / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.chmod(tmp, default_mode())
        write_json(self.folder / f"{name}.json", meta, indent=None)
