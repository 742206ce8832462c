"""Step 1a of the method: the scoring pass (`attnprobe score`). One teacher forward per wild image gives
its row of the score table (scoring.py); select.py reads the table and picks the K best.

The pass is built for large, dirty pools:

- Robust: an unreadable file (truncated, empty, not an image, decompression bomb, ...) is skipped
  and listed with its reason in `<out stem>.skipped.csv`; every readable one is scored. The CSV is
  UTF-8: bytes of a file name that are not UTF-8 are written as backslash escapes (`\\xe9`).
- One writer, resumable (score_parts.py): the sorted pool is cut into fixed chunks (`chunk_size`
  images); each finished chunk is written whole as `<out>.parts/<chunk>.parquet`, a restart with the
  same command skips finished chunks whose files are unchanged (each part records its files' content
  identity: names, sizes, mtimes; io.folders.files_identity), and at the end the parts are merged in order.
- Shardable: under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) unfinished chunks are
  dealt round-robin to the ranks; rank 0 merges. Chunks, and hence batches, do not depend on the
  number of processes, so the table does not either.
- Flat memory: the path list is one byte buffer (PathList); results are kept per chunk only, and
  the merge streams part by part.

A pool of tar shards (`wild` a pattern or .tar) is handed to score_shards.py, with the shard as the part.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..io.checkpoints import load_checkpoint
from ..io.folders import PathList, files_identity
from ..io.outputs import parts_dir
from ..io.shards import is_shard_pool
from ..training import distributed
from . import score_parts
from .scoring import keeps_probs, probe_blocks, score_chunks, table_schema

if TYPE_CHECKING:
    from ..settings import ScoreSettings


def score(*, teacher, wild, out, settings: ScoreSettings) -> dict:
    """Score every image under `wild`; write the table to `out` and the skipped files beside it.
    settings.resize: `crop` (shorter side, centre crop) or `stretch` (whole image to the square input, as
    the reference); recorded in the table's metadata. `wild` may also name tar shards (score_shards.py).

    Resumes from `<out>.parts` when an earlier run with the same settings stopped; under torchrun,
    each process scores its share of the chunks and rank 0 writes the table. Returns the table's
    metadata with `scored`, `skipped`, `rows` (= scored), `skipped_csv` and `rank`."""
    if is_shard_pool(wild):
        from .score_shards import score_shards
        return score_shards(teacher=teacher, wild=wild, out=out, settings=settings)
    with score_parts.joined(settings) as device:
        rank = distributed.rank()
        model, info = load_checkpoint(teacher, "cpu", teacher=True)
        blocks = probe_blocks(model, settings.blocks)
        paths = PathList.from_dir(wild)
        n_chunks = math.ceil(len(paths) / settings.chunk_size)
        parts = parts_dir(out)
        recorded = score_parts.run_settings(teacher, wild, blocks=blocks, settings=settings, pool_size=len(paths),
                                            pool_sha256=paths.digest(), chunk_size=settings.chunk_size)

        def chunk_files(c) -> dict:
            """What a finished chunk records of its files: their content identity (names, sizes, mtimes)."""
            size = settings.chunk_size
            return {"files": files_identity(wild, paths[c * size:(c + 1) * size])}
        taken: dict[int, dict] = {}  # each chunk's identity, taken before its files are read

        def write(c, table, skipped):
            score_parts.write_part(parts, c, table, skipped, marker=taken.pop(c, None))  # tests replace it

        def score_mine(chunks):
            taken.update({c: chunk_files(c) for c in chunks})
            score_chunks(model, info, root=wild, paths=paths, chunks=chunks, blocks=blocks, settings=settings,
                         device=device, progress=settings.progress and rank == 0, on_chunk=write)
        schema = table_schema(blocks, keeps_probs(info))
        meta = score_parts.table_meta(info, recorded)
        meta, resumed = score_parts.score_in_parts(  # a finished chunk whose files changed since is scored again
            out, recorded, meta, schema, n_chunks, score_mine,
            finished=lambda p, n: score_parts.finished_matching(p, n, chunk_files))
        return score_parts.run_summary(meta, resumed, n_chunks, out)
