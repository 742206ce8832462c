"""The scoring pass over a pool of tar shards (shards.py reads them): the same rows and values as scoring
the same image bytes extracted to a folder, with the shard as the unit of work.

- Rows: one per image member, `path` = `<shard stem>/<member>`, plus `uid` (the sample's .json `uid`, null
  without one), and the member's `offset` (of its data in the tar stream) and `size` in bytes, which let
  distill read it back by offset.
- Resumable: each finished shard is written atomically as `<out>.parts/<shard index>.parquet`; its metadata
  is the shard's commit marker (stem, size, modification time). A rerun skips the shards whose part is
  there and whose file is unchanged, and rescores any other.
- Shardable: under torchrun the unfinished shards are dealt to the ranks, balanced by the sample counts of
  their `_stats.json` (shards.deal_shards). Batches never cross a shard, so a shard's rows do not depend on
  the number of processes or workers, and neither does the table. A rank without a shard goes straight to
  the merge barrier.
- Streaming: DataLoader workers each read whole shards in order (tarfile `r|*`), decode and batch them;
  a member that does not decode, and a shard that is cut short (`truncated`) or unreadable, are listed in
  the skipped CSV; the readable members of a cut-off shard are scored.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ..io.checkpoints import load_checkpoint
from ..io.datasets import failure_reason
from ..io.folders import is_image_file
from ..io.images import eval_transform, load_image
from ..io.outputs import parts_dir
from ..io.shards import Shard, deal_shards, list_shards, listing_digest, shard_weights
from ..io.tar_members import MemberFile, TarSamples
from ..training import distributed
from . import score_parts
from .scoring import ChunkResult, ScoringForward, keeps_probs, prepare_model, probe_blocks, table_schema

if TYPE_CHECKING:
    from ..settings import ScoreSettings

SHARD_COLUMNS = (pa.field("uid", pa.string()), pa.field("offset", pa.int64()), pa.field("size", pa.int64()))


def shard_table_schema(blocks: list[int], keep_probs: bool) -> pa.Schema:
    """The score table's schema with `uid`, `offset` and `size` after `path`."""
    schema = table_schema(blocks, keep_probs)
    for i, f in enumerate(SHARD_COLUMNS, start=1):
        schema = schema.insert(i, f)
    return schema


class ShardBatches(IterableDataset):
    """Batches of the given shards, each worker reading whole shards (worker k of n: shards k, k + n, ...).

    Yields (shard index, images or None, members [(name, uid, offset, size)] of the images, failed [(name,
    reason)], problem (None, or why the shard ended: `truncated`, ...), last batch of the shard?). A shard's
    batches hold `batch_size` images except its last one, and are the same whoever reads it."""

    def __init__(self, shards: list[tuple[int, str, str]], transform, in_chans: int, size_hint: int, batch_size: int):
        self.shards, self.transform, self.in_chans = shards, transform, in_chans
        self.size_hint, self.batch_size = size_hint, batch_size

    def _image(self, member, stem: str):
        member.name.encode("utf-8")  # the table stores UTF-8: a name that is not is a failure too
        file = MemberFile(member.data, f"{stem}/{member.name}")
        return self.transform(load_image(file, self.in_chans, self.size_hint))

    def __iter__(self):
        worker = get_worker_info()
        k, n = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index, path, stem in self.shards[k::n]:
            stream = TarSamples(path, keep=_image_or_json)
            images, members, failed = [], [], []
            for sample in stream:
                uid = sample.uid()
                for m in sample.members:
                    if not is_image_file(m.name):
                        continue
                    try:
                        images.append(self._image(m, stem))
                        members.append((m.name, uid, m.offset, m.size))
                    except Exception as e:  # one bad member must not end the run: skipped and listed
                        failed.append((m.name, failure_reason(e)))
                    if len(images) == self.batch_size:
                        yield index, torch.stack(images), members, failed, None, False
                        images, members, failed = [], [], []
            yield index, torch.stack(images) if images else None, members, failed, stream.problem, True


def _image_or_json(name: str) -> bool:
    return is_image_file(name) or name.lower().endswith(".json")


def _as_is(batch):
    return batch


class ShardResult(ChunkResult):
    """One shard's results (as scoring.ChunkResult), plus its members' uid, offset and size."""

    def __init__(self, index: int):
        super().__init__(index)
        self.members: list[tuple] = []

    def shard_table(self, stem: str, schema: pa.Schema, blocks: list[int]) -> pa.Table:
        names, uids, offsets, sizes = zip(*self.members) if self.members else ((), (), (), ())
        base = pa.schema([f for f in schema if f.name not in {c.name for c in SHARD_COLUMNS}])
        table = self.table([f"{stem}/{n}" for n in names], base, blocks)
        columns = (pa.array(uids, pa.string()), pa.array(offsets, pa.int64()), pa.array(sizes, pa.int64()))
        for i, (f, column) in enumerate(zip(SHARD_COLUMNS, columns), start=1):
            table = table.add_column(i, f, column)
        return table.cast(schema)


def score_shard_list(model, info: dict, *, shards: list[Shard], mine: list[int], blocks: list[int],
                     settings: ScoreSettings, device, progress: bool, on_shard) -> None:
    """Score the shards `mine` (indices into `shards`). After each shard, `on_shard(index, table, skipped)`
    receives its arrow table (rows in member order) and its skipped list [(path, reason), ...]."""
    if not mine:
        return
    device = torch.device(device)
    keep_probs = keeps_probs(info)
    schema = shard_table_schema(blocks, keep_probs)
    size = info["img_size"] if isinstance(info["img_size"], int) else max(info["img_size"])
    ds = ShardBatches([(i, shards[i].path, shards[i].stem) for i in mine],
                      eval_transform(info, resize=settings.resize), info["in_chans"], size, settings.batch_size)
    loader = DataLoader(ds, batch_size=None, num_workers=min(settings.workers, len(mine)), collate_fn=_as_is,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    model = prepare_model(model, device, settings.channels_last)
    counts = [shards[i].samples for i in mine]
    bar = tqdm(total=sum(counts) if None not in counts else None, desc="score", unit="img",
               disable=not progress or None)
    results: dict[int, ShardResult] = {}
    with ScoringForward.of(model, blocks, settings, device) as fwd:
        for index, images, members, failed, problem, last in loader:
            r = results.setdefault(index, ShardResult(index))
            stem = shards[index].stem
            r.skipped += [(f"{stem}/{name}", reason) for name, reason in failed]
            if images is not None:
                r.add(np.arange(len(r.members), len(r.members) + len(members)), fwd.scores(images, keep_probs))
                r.members += members
            bar.update(len(members) + len(failed))
            if last:
                if problem is not None:
                    r.skipped.append((shards[index].path, problem))
                del results[index]
                on_shard(index, r.shard_table(stem, schema, blocks), r.skipped)
    bar.close()


def finished_shards(parts: Path, shards: list[Shard]) -> set[int]:
    """The shards whose part is written and whose marker still matches the shard's file (size, time); an
    unreadable part is scored again, and replaced."""
    return score_parts.finished_matching(parts, len(shards), lambda i: shards[i].marker())


def score_shards(*, teacher, wild, out, settings: ScoreSettings) -> dict:
    """`score` of a pool of tar shards (`wild`: a brace pattern, a glob or one .tar): the table at `out`,
    the skipped members and shards beside it. Resumable and shardable by shard (see the module's text).
    Returns the table's metadata with `scored`, `skipped`, `rows`, `skipped_csv`, `rank`, `shards`."""
    with score_parts.joined(settings) as device:
        rank = distributed.rank()
        model, info = load_checkpoint(teacher, "cpu", teacher=True)
        blocks = probe_blocks(model, settings.blocks)
        shards = list_shards(wild)
        parts = parts_dir(out)
        recorded = score_parts.run_settings(teacher, wild, blocks=blocks, settings=settings, pool_size=len(shards),
                                            pool_sha256=listing_digest(shards), chunk_size=None)
        meta = {**score_parts.table_meta(info, recorded), "shards": len(shards)}
        weights = shard_weights(shards)

        def write(i, table, skipped):  # through the module: tests replace it
            score_parts.write_part(parts, i, table, skipped, marker=shards[i].marker())

        def score_mine(mine):
            score_shard_list(model, info, shards=shards, mine=mine, blocks=blocks, settings=settings, device=device,
                             progress=settings.progress and rank == 0, on_shard=write)
        schema = shard_table_schema(blocks, keeps_probs(info))
        meta, resumed = score_parts.score_in_parts(out, recorded, meta, schema, len(shards), score_mine,
                                                   finished=lambda p, n: finished_shards(p, shards),
                                                   deal=lambda todo, w: deal_shards(todo, weights, w))
        return score_parts.run_summary(meta, resumed, len(shards), out)
