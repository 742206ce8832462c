"""The scoring core: one teacher forward per wild image gives its row of the score table (path, pred,
outlier = -log max softmax, probe_<b>, and probs when there are at most 256 classes).

Shared by the folder pass (score.py) and the tar-shard pass (score_shards.py): the table's schema, the
per-batch forward (ScoringForward), the per-chunk results (ChunkResult), and the pass over a folder's
chunks (score_chunks; score_pool keeps the whole table in memory). Chunks, and hence batches, are fixed
by the sorted pool and `chunk_size`, never by the number of processes or workers.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from ..io.datasets import ImageList, collate_skipping, make_loader
from ..io.folders import PathList
from ..io.images import eval_transform
from ..method.probe import BlockTaps, check_blocks, default_probe_blocks
from ..models import geometry

if TYPE_CHECKING:
    from ..settings import ScoreSettings

MAX_STORED_CLASSES = 256  # keep per-image softmax up to this many classes (1.28M x 256 float32 ~ 1.3 GB)


def chunk_range(c: int, n: int, chunk_size: int) -> range:
    """The pool rows of chunk `c` of a pool of `n` images."""
    return range(c * chunk_size, min((c + 1) * chunk_size, n))


class ChunkBatches:
    """Batch sampler: the given chunks in order, each cut into batches of `batch_size` that never cross
    a chunk boundary (so a chunk's batches, and its results, are the same in every run)."""

    def __init__(self, chunks: list[int], n: int, chunk_size: int, batch_size: int):
        self.chunks, self.n, self.chunk_size, self.batch_size = list(chunks), n, chunk_size, batch_size

    def __iter__(self):
        for c in self.chunks:
            r = chunk_range(c, self.n, self.chunk_size)
            for start in range(r.start, r.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, r.stop)))

    def __len__(self):
        return sum(math.ceil(len(chunk_range(c, self.n, self.chunk_size)) / self.batch_size) for c in self.chunks)


def table_schema(blocks: list[int], keep_probs: bool) -> pa.Schema:
    fields = [pa.field("path", pa.string()), pa.field("pred", pa.int32()), pa.field("outlier", pa.float32())]
    fields += [pa.field(f"probe_{b}", pa.float32()) for b in blocks]
    if keep_probs:
        fields.append(pa.field("probs", pa.list_(pa.float32())))
    return pa.schema(fields)


def keeps_probs(info: dict) -> bool:
    """Whether the table stores each image's softmax (few enough classes)."""
    return info["num_classes"] <= MAX_STORED_CLASSES


def probe_blocks(teacher_model, blocks: list[int] | None) -> list[int]:
    """The blocks to probe: `blocks` checked against the teacher's depth, or the default (1/3, 2/3 depth)."""
    depth = geometry(teacher_model)["depth"]
    return check_blocks(blocks if blocks else default_probe_blocks(depth), depth)


class ChunkResult:
    """Results of one chunk (or shard), batch by batch, then one arrow table."""

    def __init__(self, index: int):
        self.index, self.rows, self.preds, self.outliers, self.probes, self.probs = index, [], [], [], [], []
        self.skipped: list[tuple] = []

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

    @classmethod
    def of(cls, model, blocks, settings: ScoreSettings, device) -> ScoringForward:
        """The pass's forward as `settings` (heads, amp, channels_last, compile, batch_size) ask."""
        return cls(model, blocks, settings.heads, device, settings.amp, settings.channels_last, settings.compile,
                   settings.batch_size)

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


def prepare_model(model, device: torch.device, channels_last: bool):
    """The teacher on `device`, in eval mode, in the memory format the pass feeds it."""
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def score_chunks(model, info: dict, *, root, paths, chunks: list[int], blocks: list[int], settings: ScoreSettings,
                 device, progress: bool, on_chunk) -> None:
    """Score the images of `chunks` (indices into the sorted pool `paths`, cut by settings.chunk_size), in
    order. After each chunk, `on_chunk(index, table, skipped)` receives its arrow table (rows in pool order,
    unreadable files left out) and its skipped list [(path, reason), ...].

    One teacher forward per image: the logits and, through hooks on the probed blocks' qkv projections,
    the CLS attention row of those blocks (probe.probe_scores' math). settings.resize: how each image is
    brought to the teacher's input (io.images.eval_transform: `crop` or the reference's `stretch`)."""
    device, chunk_size = torch.device(device), settings.chunk_size
    keep_probs = keeps_probs(info)
    schema = table_schema(blocks, keep_probs)
    sampler = ChunkBatches(chunks, len(paths), chunk_size, settings.batch_size)
    if not sampler.chunks:
        return
    size = info["img_size"] if isinstance(info["img_size"], int) else max(info["img_size"])
    ds = ImageList(paths, root=os.fspath(root), transform=eval_transform(info, resize=settings.resize),
                   in_chans=info["in_chans"], size_hint=size, skip_bad=True)
    loader = make_loader(ds, 1, False, settings.workers, batch_sampler=sampler, collate_fn=collate_skipping,
                         pin_memory=device.type == "cuda")
    model = prepare_model(model, device, settings.channels_last)
    total = sum(len(chunk_range(c, len(paths), chunk_size)) for c in sampler.chunks)
    bar = tqdm(total=total, desc="score", unit="img", disable=not progress or None)

    with ScoringForward.of(model, blocks, settings, device) as fwd:
        def finish(chunk):
            skipped = [(paths[i], reason) for i, reason in chunk.skipped]
            on_chunk(chunk.index, chunk.table(paths, schema, blocks), skipped)

        chunk = None
        for images, rows, failed in loader:
            first = min([*rows.tolist()[:1], *(i for i, _ in failed)])
            c = first // chunk_size
            if chunk is None or chunk.index != c:
                if chunk is not None:
                    finish(chunk)
                chunk = ChunkResult(c)
            chunk.skipped += failed
            if images is not None:
                chunk.add(rows.numpy(), fwd.scores(images, keep_probs))
            bar.update(len(rows) + len(failed))
        if chunk is not None:
            finish(chunk)
    bar.close()


def score_pool(teacher, info: dict, wild_dir, *, settings: ScoreSettings) -> tuple[pd.DataFrame, dict]:
    """In memory, one process: (score table, metadata). Unreadable files are left out of the table and
    listed in meta['skipped_files'] as [path, reason]; score.score is the resumable, sharded version."""
    blocks = probe_blocks(teacher, settings.blocks)
    paths = PathList.from_dir(wild_dir)
    tables, skipped = [], []

    def keep(c, table, chunk_skipped):
        tables.append(table)
        skipped.extend([p, r] for p, r in chunk_skipped)
    n_chunks = math.ceil(len(paths) / settings.chunk_size)
    score_chunks(teacher, info, root=wild_dir, paths=paths, chunks=list(range(n_chunks)), blocks=blocks,
                 settings=settings, device=settings.device or "cpu", progress=settings.progress, on_chunk=keep)
    df = pa.concat_tables(tables).to_pandas()
    meta = {"num_classes": info["num_classes"], "classes": info["classes"], "blocks": blocks,
            "heads": settings.heads, "resize": settings.resize, "wild": os.path.abspath(wild_dir),
            "scored": len(df), "skipped": len(skipped), "skipped_files": skipped}
    return df, meta
