"""Step 1a of the method: the scoring pass. One teacher forward per wild image gives its row of the
score table (path, pred, outlier = -log max softmax, probe_<b>, and probs when there are at most
256 classes); select.py reads the table and picks the K best.

The pass is built for large, dirty pools:

- Robust: an unreadable file (truncated, empty, not an image, decompression bomb, ...) is skipped
  and listed with its reason in `<out stem>.skipped.csv`; every readable one is scored. The CSV is
  UTF-8: bytes of a file name that are not UTF-8 are written as backslash escapes (`\\xe9`).
- One writer: a second `score` on the same `out` while one runs is refused (a lock on
  `<out>.parts/.lock`, released when the process ends, however it ends).
- Resumable: the sorted pool is cut into fixed chunks (`chunk_size` images). Each finished chunk is
  written atomically as `<out>.parts/<chunk>.parquet` (with its skipped list in the file's metadata);
  a restart with the same command skips finished chunks. `settings.json` in the parts folder ties
  the parts to one teacher, pool, block list, head reduction and resize mode. At the end the parts
  are merged in order into the table (temporary file, then rename) and the parts folder is removed.
- Shardable: under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) unfinished chunks are
  dealt round-robin to the ranks; rank 0 merges. Chunks, and hence batches, do not depend on the
  number of processes, so the table does not either.
- Flat memory: the path list is one byte buffer (PathList); results are kept per chunk only, and
  the merge streams part by part.
"""
from __future__ import annotations

import csv
import json
import math
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ..errors import AttnprobeError
from ..io.checkpoints import file_sha256, load_checkpoint
from ..io.datasets import ImageList, collate_skipping, make_loader
from ..io.folders import PathList
from ..io.images import RESIZE_MODES, eval_transform
from ..io.outputs import parts_dir, skipped_path, with_path
from ..io.tables import META_KEY, PART_KEY
from ..method.probe import (
    HEAD_REDUCTIONS,
    BlockTaps,
    check_blocks,
    default_probe_blocks,
)
from ..models import geometry
from ..training import distributed

CHUNK_SIZE = 2048
MAX_STORED_CLASSES = 256  # keep per-image softmax up to this many classes (1.28M x 256 float32 ~ 1.3 GB)
SETTINGS = "settings.json"
GUARDED = ("teacher_sha256", "wild", "pool_size", "pool_sha256", "blocks", "heads", "chunk_size", "amp", "resize")
GUARDED_DEFAULTS = {"resize": "crop"}  # what a settings.json written before the key existed ran with
MERGE_ROWS = 65536  # rows per row group of the merged table


# ---------------------------------------------------------------- scoring

def _chunk_range(c: int, n: int, chunk_size: int) -> range:
    return range(c * chunk_size, min((c + 1) * chunk_size, n))


class ChunkBatches:
    """Batch sampler: the given chunks in order, each cut into batches of `batch_size` that never cross
    a chunk boundary (so a chunk's batches, and its results, are the same in every run)."""

    def __init__(self, chunks: list[int], n: int, chunk_size: int, batch_size: int):
        self.chunks, self.n, self.chunk_size, self.batch_size = list(chunks), n, chunk_size, batch_size

    def __iter__(self):
        for c in self.chunks:
            r = _chunk_range(c, self.n, self.chunk_size)
            for start in range(r.start, r.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, r.stop)))

    def __len__(self):
        return sum(math.ceil(len(_chunk_range(c, self.n, self.chunk_size)) / self.batch_size) for c in self.chunks)


def table_schema(blocks: list[int], keep_probs: bool) -> pa.Schema:
    fields = [pa.field("path", pa.string()), pa.field("pred", pa.int32()), pa.field("outlier", pa.float32())]
    fields += [pa.field(f"probe_{b}", pa.float32()) for b in blocks]
    if keep_probs:
        fields.append(pa.field("probs", pa.list_(pa.float32())))
    return pa.schema(fields)


class _Chunk:
    """Results of one chunk, batch by batch, then one arrow table."""

    def __init__(self, index: int):
        self.index, self.rows, self.preds, self.outliers, self.probes, self.probs = index, [], [], [], [], []
        self.skipped: list[tuple[int, str]] = []

    def add(self, rows: np.ndarray, scores: tuple) -> None:
        """One batch: the pool rows it covers and ScoringForward.scores' (pred, outlier, probe, probs)."""
        pred, outlier, probe, probs = scores
        self.rows.append(rows)
        self.preds.append(pred)
        self.outliers.append(outlier)
        self.probes.append(probe)
        if probs is not None:
            self.probs.append(probs)

    def table(self, paths, schema: pa.Schema, blocks: list[int]) -> pa.Table:
        def cat(xs, shape, dtype):
            return np.concatenate(xs).astype(dtype) if xs else np.zeros(shape, dtype)
        rows = cat(self.rows, (0,), np.int64)
        probe = cat(self.probes, (0, len(blocks)), np.float32)
        cols = {"path": pa.array([paths[i] for i in rows], pa.string()),
                "pred": pa.array(cat(self.preds, (0,), np.int32)),
                "outlier": pa.array(cat(self.outliers, (0,), np.float32))}
        for j, b in enumerate(blocks):
            cols[f"probe_{b}"] = pa.array(probe[:, j])
        if "probs" in schema.names:
            probs = cat(self.probs, (0, 0), np.float32)
            offsets = np.arange(len(rows) + 1, dtype=np.int32) * (probs.shape[1] if len(rows) else 0)
            cols["probs"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(probs.reshape(-1)))
        return pa.table(cols, schema=schema)


class ScoringForward:
    """The per-batch computation of the scoring pass, as a context manager (hooks on the probed blocks'
    qkv projections stay registered for the whole pass, which torch.compile needs).

    `scores(images)` -> numpy (pred, outlier, probe (B, len(blocks)), probs or None): one teacher
    forward; outlier = -log max softmax; probe = probe.probe_scores' cosine-to-uniform of the CLS
    attention row of each block, reduced over heads."""

    def __init__(self, model, blocks, heads="first", device="cpu", amp=False, channels_last=False,
                 compile=False, batch_size=None):
        self.model, self.blocks, self.heads, self.device = model, list(blocks), heads, torch.device(device)
        self.amp, self.channels_last, self.batch_size = amp, channels_last, batch_size
        self.compile = compile
        self._taps = BlockTaps(model, qkv_blocks=self.blocks)

    def __enter__(self):
        taps = self._taps.__enter__()
        model, heads = self.model, self.heads

        def forward(images):
            logits = model(images)  # the hooks keep the probed blocks' qkv for taps.probes
            return logits, taps.probes(heads)
        # one static shape when compiled: partial batches are padded to batch_size, so no recompiles
        self._fwd = torch.compile(forward, dynamic=False) if self.compile else forward
        return self

    def __exit__(self, *exc):
        self._taps.__exit__(*exc)

    @torch.inference_mode()
    def scores(self, images: torch.Tensor, keep_probs: bool = True):
        x = images.to(self.device, non_blocking=True)
        n = len(x)
        if self.compile and self.batch_size and n < self.batch_size:
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits, probe = self._fwd(x)
        logits, probe = logits[:n], probe[:n]
        log_p = logits.float().log_softmax(dim=1)
        top = log_p.max(dim=1)
        return (top.indices.cpu().numpy(), (-top.values).cpu().numpy(), probe.float().cpu().numpy(),
                log_p.exp().cpu().numpy() if keep_probs else None)


def score_chunks(model, info: dict, root, paths, chunks: list[int], chunk_size: int, blocks: list[int],
                 heads: str = "first", batch_size: int = 256, workers: int = 2, device="cpu", amp: bool = False,
                 channels_last: bool = False, compile: bool = False, progress: bool = True, on_chunk=None, *,
                 resize: str = "crop"):
    """Score the images of `chunks` (indices into the sorted pool `paths`), in order. After each chunk,
    `on_chunk(index, table, skipped)` receives its arrow table (rows in pool order, unreadable files
    left out) and its skipped list [(path, reason), ...].

    One teacher forward per image: the logits and, through hooks on the probed blocks' qkv
    projections, the CLS attention row of those blocks (probe.probe_scores' math). `resize`: how each
    image is brought to the teacher's input (data.eval_transform: `crop` or the reference's `stretch`)."""
    device = torch.device(device)
    keep_probs = info["num_classes"] <= MAX_STORED_CLASSES
    schema = table_schema(blocks, keep_probs)
    sampler = ChunkBatches(chunks, len(paths), chunk_size, batch_size)
    if not sampler.chunks:
        return
    size = info["img_size"] if isinstance(info["img_size"], int) else max(info["img_size"])
    ds = ImageList(paths, root=os.fspath(root), transform=eval_transform(info, resize=resize),
                   in_chans=info["in_chans"], size_hint=size, skip_bad=True)
    loader = make_loader(ds, 1, False, workers, batch_sampler=sampler, collate_fn=collate_skipping,
                         pin_memory=device.type == "cuda")
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    total = sum(len(_chunk_range(c, len(paths), chunk_size)) for c in sampler.chunks)
    bar = tqdm(total=total, desc="score", unit="img", disable=not progress or None)

    with ScoringForward(model, blocks, heads, device, amp, channels_last, compile, batch_size) as fwd:
        def finish(chunk):
            skipped = [(paths[i], reason) for i, reason in chunk.skipped]
            if on_chunk is not None:
                on_chunk(chunk.index, chunk.table(paths, schema, blocks), skipped)

        chunk = None
        for images, rows, failed in loader:
            first = min([*rows.tolist()[:1], *(i for i, _ in failed)])
            c = first // chunk_size
            if chunk is None or chunk.index != c:
                if chunk is not None:
                    finish(chunk)
                chunk = _Chunk(c)
            chunk.skipped += failed
            if images is not None:
                chunk.add(rows.numpy(), fwd.scores(images, keep_probs))
            bar.update(len(rows) + len(failed))
        if chunk is not None:
            finish(chunk)
    bar.close()


def _setup(teacher_model, info: dict, blocks, heads: str, chunk_size: int, resize: str = "crop"):
    depth = geometry(teacher_model)["depth"]
    blocks = check_blocks(blocks if blocks else default_probe_blocks(depth), depth)
    if heads not in HEAD_REDUCTIONS:
        raise AttnprobeError(f"--heads {heads!r} is not one of {HEAD_REDUCTIONS}")
    if chunk_size < 1:
        raise AttnprobeError(f"--chunk-size {chunk_size} must be at least 1")
    if resize not in RESIZE_MODES:
        raise AttnprobeError(f"--resize {resize!r} is not one of {RESIZE_MODES}")
    return blocks


def score_pool(teacher, info: dict, wild_dir, blocks: list[int] | None = None, heads: str = "first",
               batch_size: int = 256, workers: int = 4, device="cpu", amp: bool = False, progress: bool = True,
               chunk_size: int = CHUNK_SIZE, channels_last: bool = False,
               compile: bool = False, *, resize: str = "crop") -> tuple[pd.DataFrame, dict]:
    """In memory, one process: (score table, metadata). Unreadable files are left out of the table and
    listed in meta['skipped_files'] as [path, reason]; `score` is the resumable, sharded version."""
    blocks = _setup(teacher, info, blocks, heads, chunk_size, resize)
    paths = PathList.from_dir(wild_dir)
    tables, skipped = [], []

    def keep(c, table, chunk_skipped):
        tables.append(table)
        skipped.extend([p, r] for p, r in chunk_skipped)
    n_chunks = math.ceil(len(paths) / chunk_size)
    score_chunks(teacher, info, wild_dir, paths, list(range(n_chunks)), chunk_size, blocks, heads, batch_size,
                 workers, device, amp, channels_last, compile, progress, keep, resize=resize)
    df = pa.concat_tables(tables).to_pandas()
    meta = {"num_classes": info["num_classes"], "classes": info["classes"], "blocks": blocks, "heads": heads,
            "resize": resize, "wild": os.path.abspath(wild_dir), "scored": len(df), "skipped": len(skipped),
            "skipped_files": skipped}
    return df, meta


# ---------------------------------------------------------------- parts and the merged table



def _part(parts: Path, c: int) -> Path:
    return parts / f"{c:06d}.parquet"


def _write_part(parts: Path, c: int, table: pa.Table, skipped, marker: dict | None = None) -> None:
    """Part `c`, whole or not at all; `marker`: what else it records of its input (a shard's size and time)."""
    meta = {PART_KEY: json.dumps({"chunk": c, "skipped": [list(s) for s in skipped], **(marker or {})}).encode()}
    tmp = parts / f".{c:06d}.parquet.tmp{os.getpid()}"
    try:
        pq.write_table(table.replace_schema_metadata(meta), tmp)
        os.replace(tmp, _part(parts, c))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise with_path(e, _part(parts, c)) from None


def _finished(parts: Path, n_chunks: int) -> set[int]:
    if not parts.is_dir():
        return set()
    names = {p.name for p in parts.iterdir()}
    return {c for c in range(n_chunks) if _part(parts, c).name in names}


LOCK = ".lock"


def _lock(parts: Path):
    """(fd holding an exclusive flock on PARTS/.lock or None when another run holds it, whether the folder
    was created here). The kernel drops the lock when the process ends, even on kill -9."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no guard
        return -1, False
    created = not parts.is_dir()
    parts.mkdir(parents=True, exist_ok=True)
    fd = os.open(parts / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, created
    return fd, created


def _unlock(parts: Path, fd, created: bool) -> None:
    """Release the lock; a parts folder this run created and left empty (it stopped early) is removed."""
    if fd is None or fd < 0:
        return
    try:
        if created and parts.is_dir() and {p.name for p in parts.iterdir()} <= {LOCK}:
            (parts / LOCK).unlink(missing_ok=True)
            parts.rmdir()
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_settings(parts: Path, settings: dict) -> None:
    path = parts / SETTINGS
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    diff = [k for k in GUARDED if old.get(k, GUARDED_DEFAULTS.get(k)) != settings[k]]
    if diff:
        changes = "; ".join(f"then {_guarded_text(k, old.get(k, GUARDED_DEFAULTS.get(k)))}, "
                            f"now {_guarded_text(k, settings[k])}" for k in diff)
        raise AttnprobeError(f"{parts} holds parts of an unfinished score run with other settings ({changes}); "
                             "rerun with that run's teacher, --wild, --blocks, --heads, --chunk-size, --amp and "
                             f"--resize to finish it, or delete {parts} to start over")


def _guarded_text(key: str, value) -> str:
    """A guarded setting of the parts folder as the user wrote it: `--chunk-size 64`, `teacher sha256 1a2b...`."""
    if value is None:
        return f"{key} (not recorded)"
    if key.endswith("sha256"):
        return f"{'teacher' if key.startswith('teacher') else 'pool'} sha256 {str(value)[:12]}..."
    if key == "pool_size":
        return f"a pool of {value} images"
    if isinstance(value, bool):
        return f"--{key.replace('_', '-')} {'on' if value else 'off'}"
    if isinstance(value, list):
        return f"--{key.replace('_', '-')} {' '.join(map(str, value))}"
    return f"--{key.replace('_', '-')} {value}"


def printable_path(path: str) -> str:
    """A file name as valid UTF-8 text for `<stem>.skipped.csv`: each byte of the name that is not UTF-8
    is written as a backslash escape (a Latin-1 `café.jpg` becomes the text `caf\\xe9.jpg`), so that
    pandas.read_csv and any UTF-8 reader open the file."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _atomic_text(path: Path, write) -> None:
    """A UTF-8 text file written whole or not at all (temporary file, then rename); mode as any new file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise with_path(e, path) from None


def merge_parts(parts: Path, n_chunks: int, out, meta: dict, schema: pa.Schema) -> dict:
    """Parts 0..n-1, in order -> the score table (temporary file, then rename) and `<stem>.skipped.csv`;
    then remove the parts folder. Streams: one part (plus one row group) in memory at a time."""
    out = Path(out)
    missing = [c for c in range(n_chunks) if not _part(parts, c).is_file()]
    if missing:
        raise AttnprobeError(f"{parts} lacks {len(missing)} finished chunk(s) (first: {missing[0]}); rerun the same "
                             "command to score them")
    for stale in (out, skipped_path(out)):  # temporary files of a run killed while it wrote these
        for p in stale.parent.glob(f".{stale.name}.tmp*"):
            p.unlink(missing_ok=True)
    scored = skipped = 0

    def write_skipped(f):
        nonlocal scored, skipped
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        for c in range(n_chunks):
            md = pq.read_metadata(_part(parts, c))
            scored += md.num_rows
            part = json.loads(md.metadata[PART_KEY])
            w.writerows([printable_path(p), reason] for p, reason in part["skipped"])
            skipped += len(part["skipped"])
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_text(skipped_path(out), write_skipped)

    meta = {**meta, "scored": scored, "skipped": skipped}
    schema = schema.with_metadata({META_KEY: json.dumps(meta).encode()})
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    buffer, rows = [], 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for c in range(n_chunks):
                t = pq.read_table(_part(parts, c)).replace_schema_metadata(None)
                buffer.append(t)
                rows += len(t)
                if rows >= MERGE_ROWS or c == n_chunks - 1:
                    writer.write_table(pa.concat_tables(buffer).cast(schema))
                    buffer, rows = [], 0
        os.replace(tmp, out)
    except OSError as e:  # the parts stay: a rerun merges again
        tmp.unlink(missing_ok=True)
        raise with_path(e, out) from None
    # remove the parts before the settings: a kill in between leaves a folder that still resumes correctly
    for c in range(n_chunks):
        _part(parts, c).unlink(missing_ok=True)
    for p in parts.iterdir():
        if p.name != SETTINGS:
            p.unlink()
    (parts / SETTINGS).unlink(missing_ok=True)
    parts.rmdir()
    return meta


def score(teacher, wild, out, *, blocks=None, heads: str = "first", batch_size: int = 256, workers: int = 2,
          device=None, amp: bool = False, progress: bool = True, chunk_size: int = CHUNK_SIZE,
          channels_last: bool = False, compile: bool = False, resize: str = "crop") -> dict:
    """Score every image under `wild`; write the table to `out` and the skipped files beside it.
    `resize`: `crop` (shorter side, centre crop) or `stretch` (whole image to the square input, as the
    reference); recorded in the table's metadata. `wild` may also name tar shards (score_shards.py).

    Resumes from `<out>.parts` when an earlier run with the same settings stopped; under torchrun,
    each process scores its share of the chunks and rank 0 writes the table. Returns the table's
    metadata with `scored`, `skipped`, `rows` (= scored), `skipped_csv` and `rank`."""
    from ..io.shards import is_shard_pool
    if is_shard_pool(wild):
        from .score_shards import score_shards
        return score_shards(teacher, wild, out, blocks=blocks, heads=heads, batch_size=batch_size, workers=workers,
                            device=device, amp=amp, progress=progress, channels_last=channels_last,
                            compile=compile, resize=resize)
    joined_here = not distributed.is_distributed()
    device = distributed.init_distributed(device, timeout=timedelta(hours=3))  # rank 0 merges while others wait
    rank, world = distributed.rank(), distributed.world_size()
    model, info = load_checkpoint(teacher, "cpu")
    blocks = _setup(model, info, blocks, heads, chunk_size, resize)
    paths = PathList.from_dir(wild)
    n_chunks = math.ceil(len(paths) / chunk_size)
    out = Path(out)
    parts = parts_dir(out)
    settings = {"format": 1, "teacher": os.path.abspath(teacher), "teacher_sha256": file_sha256(teacher),
                "wild": os.path.abspath(wild), "pool_size": len(paths), "pool_sha256": paths.digest(),
                "blocks": blocks, "heads": heads, "chunk_size": chunk_size, "amp": bool(amp),
                "resize": resize}
    meta = {"num_classes": info["num_classes"], "classes": info["classes"], "blocks": blocks, "heads": heads,
            "resize": resize, "wild": os.path.abspath(wild), "teacher": os.path.abspath(teacher),
            "teacher_sha256": settings["teacher_sha256"]}

    def score_mine(chunks):
        score_chunks(model, info, wild, paths, chunks, chunk_size, blocks, heads, batch_size, workers, device, amp,
                     channels_last, compile, progress and rank == 0,
                     on_chunk=lambda c, table, skipped: _write_part(parts, c, table, skipped), resize=resize)
    try:
        schema = table_schema(blocks, info["num_classes"] <= MAX_STORED_CLASSES)
        meta, resumed = score_in_parts(out, settings, meta, schema, n_chunks, score_mine)
    finally:
        if joined_here:
            distributed.cleanup()
    return {**meta, "rows": meta["scored"], "resumed_chunks": resumed, "chunks": n_chunks,
            "skipped_csv": os.fspath(skipped_path(out)), "rank": rank, "world_size": world}


def score_in_parts(out, settings: dict, meta: dict, schema: pa.Schema, n_parts: int, score_mine, *,
                   finished=_finished, deal=None) -> tuple[dict, int]:
    """The frame of a resumable score run under any number of processes, whatever its parts are (chunks of a
    folder, tar shards): one writer (the lock on the parts folder), parts tied to their guarded `settings`,
    the parts rank 0 finds `finished(parts, n_parts)` skipped, the others dealt to the ranks by
    `deal(todo, world)` (one list per rank; round-robin by default) and scored by `score_mine(my parts)` on
    each, which writes each finished part; then rank 0's merge. Returns (the table's metadata, parts resumed)."""
    rank, world = distributed.rank(), distributed.world_size()
    parts = parts_dir(out)
    lock, created = _lock(parts) if rank == 0 else (-1, False)
    try:
        if not distributed.all_gather_object(lock is not None)[0]:
            raise AttnprobeError(f"another `attnprobe score` is writing {out} (it holds {parts / LOCK}); wait for "
                                 "it to finish, or pass another --out")
        views = distributed.all_gather_object({k: settings[k] for k in GUARDED})
        if any(v != views[0] for v in views):
            raise AttnprobeError("the processes of this run see different teachers, pools or flags; give every "
                                 "process the same command and the same files")
        _check_settings(parts, settings)
        done = distributed.all_gather_object(finished(parts, n_parts))[0]  # rank 0's view: one deal for all
        if rank == 0:
            parts.mkdir(parents=True, exist_ok=True)
            for p in parts.glob(".*.tmp*"):  # left by a killed run; nobody writes before the barrier below
                p.unlink(missing_ok=True)
            if not (parts / SETTINGS).is_file():
                _atomic_text(parts / SETTINGS, lambda f: f.write(json.dumps(settings, indent=1) + "\n"))
        distributed.barrier()
        todo = [c for c in range(n_parts) if c not in done]
        score_mine(deal(todo, world)[rank] if deal is not None else todo[rank::world])
        distributed.barrier()
        if rank == 0:
            meta = merge_parts(parts, n_parts, out, meta, schema)
        meta = distributed.all_gather_object(meta)[0]  # every rank waits for the merge; rank 0's summary
    finally:
        if rank == 0:
            _unlock(parts, lock, created)
    return meta, len(done)
