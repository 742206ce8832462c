"""The parts folder of a resumable score run (`<out>.parts/`), whatever its parts are (chunks of a folder
pool, tar shards):

- One writer: the one lock (io.lock) on `<out>.parts/.lock`; a second `score` on the same `out` is refused.
  It is a record lock, so DataLoader workers do not keep it: the same command may go ahead at once after
  a kill -9.
- Each finished part is written whole (io.atomic) as `<out>.parts/<index>.parquet`, with its skipped list
  (and a shard's marker) in the file's metadata; a rerun skips the finished ones.
- `settings.json` ties the parts to one teacher, pool, block list, head reduction, chunk size, amp and
  resize mode; a rerun with other settings is refused in one line.
- At the end rank 0 merges the parts in order into the table and `<stem>.skipped.csv` and removes the folder.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import AttnprobeError
from ..io.atomic import remove_stale, replacing, write_json
from ..io.checkpoints import file_sha256
from ..io.jsonfiles import read_json
from ..io.lock import hold
from ..io.outputs import parts_dir, skipped_path
from ..io.tables import META_KEY, PART_KEY
from ..training import distributed

if TYPE_CHECKING:
    from ..settings import ScoreSettings

SETTINGS = "settings.json"
LOCK = ".lock"
GUARDED = ("teacher_sha256", "wild", "pool_size", "pool_sha256", "blocks", "heads", "chunk_size", "amp", "resize")
GUARDED_DEFAULTS = {"resize": "crop"}  # what a settings.json written before the key existed ran with
MERGE_ROWS = 65536  # rows per row group of the merged table


def run_settings(teacher, wild, *, blocks: list[int], settings: ScoreSettings, pool_size: int,
                 pool_sha256: str, chunk_size: int | None) -> dict:
    """What the parts folder's settings.json records (GUARDED: what parts may not mix)."""
    return {"format": 1, "teacher": os.path.abspath(teacher), "teacher_sha256": file_sha256(teacher),
            "wild": os.path.abspath(wild), "pool_size": pool_size, "pool_sha256": pool_sha256, "blocks": blocks,
            "heads": settings.heads, "chunk_size": chunk_size, "amp": bool(settings.amp), "resize": settings.resize}


def table_meta(info: dict, recorded: dict) -> dict:
    """The score table's metadata (before the merge adds `scored` and `skipped`)."""
    keys = ("blocks", "heads", "resize", "wild", "teacher", "teacher_sha256")
    return {"num_classes": info["num_classes"], "classes": info["classes"], **{k: recorded[k] for k in keys}}


@contextlib.contextmanager
def joined(settings: ScoreSettings):
    """The processes of a torchrun run joined for the pass (a long timeout: rank 0 merges while the others
    wait), and left at the end when joined here; yields this process's device."""
    joined_here = not distributed.is_distributed()
    device = distributed.init_distributed(settings.device, timeout=timedelta(hours=3))
    try:
        yield device
    finally:
        if joined_here:
            distributed.cleanup()


def run_summary(meta: dict, resumed: int, n_parts: int, out) -> dict:
    """What `score` returns: the table's metadata, with `rows`, the parts resumed and made, and this rank."""
    return {**meta, "rows": meta["scored"], "resumed_chunks": resumed, "chunks": n_parts,
            "skipped_csv": os.fspath(skipped_path(out)), "rank": distributed.rank(),
            "world_size": distributed.world_size()}


def part_path(parts: Path, c: int) -> Path:
    return Path(parts) / f"{c:06d}.parquet"


def write_part(parts: Path, c: int, table: pa.Table, skipped, marker: dict | None = None) -> None:
    """Part `c`, whole or not at all; `marker`: what else it records of its input (a shard's size and time).
    Both passes call it as `score_parts.write_part`, so that one replacement reaches both."""
    meta = {PART_KEY: json.dumps({"chunk": c, "skipped": [list(s) for s in skipped], **(marker or {})}).encode()}
    with replacing(part_path(parts, c), sync=False) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)


def part_record(parts: Path, c: int) -> dict | None:
    """What part `c` records of itself (its chunk, skipped list, marker); None when it is unreadable."""
    try:
        record = json.loads(pq.read_metadata(part_path(parts, c)).metadata[PART_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def finished_parts(parts: Path, n_parts: int) -> set[int]:
    if not parts.is_dir():
        return set()
    names = {p.name for p in parts.iterdir()}
    return {c for c in range(n_parts) if part_path(parts, c).name in names}


def finished_matching(parts: Path, n_parts: int, expected) -> set[int]:
    """The finished parts whose record still matches `expected(c)` (a dict: what the part's input is now, e.g.
    its files' content identity). A part whose input changed since, or that is unreadable, is scored again."""
    done = finished_parts(parts, n_parts)
    records = {c: part_record(parts, c) for c in done}
    return {c for c, r in records.items() if r is not None and all(r.get(k) == v for k, v in expected(c).items())}


def check_settings(parts: Path, settings: dict) -> None:
    """The guarded settings of this run against those the parts folder was started with (if any)."""
    path = parts / SETTINGS
    if not path.is_file():
        return
    old = read_json(path, what="the settings of an unfinished score run", fix=f"delete {parts} to start over")
    diff = [k for k in GUARDED if old.get(k, GUARDED_DEFAULTS.get(k)) != settings[k]]
    if diff:
        changes = "; ".join(f"then {guarded_text(k, old.get(k, GUARDED_DEFAULTS.get(k)))}, "
                            f"now {guarded_text(k, settings[k])}" for k in diff)
        raise AttnprobeError(f"{parts} holds parts of an unfinished score run with other settings ({changes}); "
                             "rerun with that run's teacher, --wild, --blocks, --heads, --chunk-size, --amp and "
                             f"--resize to finish it, or delete {parts} to start over")


def guarded_text(key: str, value) -> str:
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


def _write_skipped(parts: Path, n_parts: int, path: Path) -> tuple[int, int, dict]:
    """`<stem>.skipped.csv` from the parts' records; returns (rows scored, files skipped, each shard's
    [size, mtime_ns] as its part recorded it: {} for a folder pool)."""
    scored = skipped = 0
    shard_files = {}
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        w = csv.writer(f)
        w.writerow(["path", "reason"])
        for c in range(n_parts):
            md = pq.read_metadata(part_path(parts, c))
            scored += md.num_rows
            part = json.loads(md.metadata[PART_KEY])
            w.writerows([printable_path(p), reason] for p, reason in part["skipped"])
            skipped += len(part["skipped"])
            if "shard" in part:
                shard_files[part["shard"]] = [part.get("shard_bytes"), part.get("shard_mtime_ns")]
    return scored, skipped, shard_files


def merge_parts(parts: Path, n_parts: int, out, meta: dict, schema: pa.Schema) -> dict:
    """Parts 0..n-1, in order -> the score table and `<stem>.skipped.csv` (each whole or not at all); then
    remove the parts folder. Streams: one part (plus one row group) in memory at a time."""
    out = Path(out)
    missing = [c for c in range(n_parts) if not part_path(parts, c).is_file()]
    if missing:
        raise AttnprobeError(f"{parts} lacks {len(missing)} finished chunk(s) (first: {missing[0]}); rerun the same "
                             "command to score them")
    for stale in (out, skipped_path(out)):  # temporary files of a run killed while it wrote these
        remove_stale(stale)
    scored, skipped, shard_files = _write_skipped(parts, n_parts, skipped_path(out))
    # a shard pool's table (and a selection from it) records what each shard was when it was scored, so that a
    # reader of members by offset can tell a shard rewritten since
    meta = {**meta, "scored": scored, "skipped": skipped, **({"shard_files": shard_files} if shard_files else {})}
    schema = schema.with_metadata({META_KEY: json.dumps(meta).encode()})
    buffer, rows = [], 0
    with replacing(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:  # on failure the parts stay
        for c in range(n_parts):
            t = pq.read_table(part_path(parts, c)).replace_schema_metadata(None)
            buffer.append(t)
            rows += len(t)
            if rows >= MERGE_ROWS or c == n_parts - 1:
                writer.write_table(pa.concat_tables(buffer).cast(schema))
                buffer, rows = [], 0
    # remove the parts before the settings: a kill in between leaves a folder that still resumes correctly
    for c in range(n_parts):
        part_path(parts, c).unlink(missing_ok=True)
    for p in parts.iterdir():
        if p.name != SETTINGS:
            p.unlink()
    (parts / SETTINGS).unlink(missing_ok=True)
    parts.rmdir()
    return meta


def score_in_parts(out, settings: dict, meta: dict, schema: pa.Schema, n_parts: int, score_mine, *,
                   finished=finished_parts, deal=None) -> tuple[dict, int]:
    """The frame of a resumable score run under any number of processes, whatever its parts are (chunks of a
    folder, tar shards): one writer (the lock on the parts folder), parts tied to their guarded `settings`,
    the parts rank 0 finds `finished(parts, n_parts)` skipped, the others dealt to the ranks by
    `deal(todo, world)` (one list per rank; round-robin by default) and scored by `score_mine(my parts)` on
    each, which writes each finished part; then rank 0's merge. Returns (the table's metadata, parts resumed)."""
    rank, world = distributed.rank(), distributed.world_size()
    parts = parts_dir(out)
    created, lock_created = not parts.is_dir(), not (parts / LOCK).exists()
    lock, refusal = None, None
    if rank == 0:
        try:
            lock = hold(parts / LOCK, f"`attnprobe score` of {out}", "wait for it to finish, or pass another --out")
        except AttnprobeError as e:
            refusal = e
    try:
        if not distributed.all_gather_object(refusal is None)[0]:
            raise refusal or AttnprobeError(f"another `attnprobe score` of {out} is running; wait for it to finish, "
                                            "or pass another --out")
        views = distributed.all_gather_object({k: settings[k] for k in GUARDED})
        if any(v != views[0] for v in views):
            raise AttnprobeError("the processes of this run see different teachers, pools or flags; give every "
                                 "process the same command and the same files")
        check_settings(parts, settings)
        done = distributed.all_gather_object(finished(parts, n_parts))[0]  # rank 0's view: one deal for all
        if rank == 0:
            for p in parts.glob(".*.tmp*"):  # left by a killed run; nobody writes before the barrier below
                p.unlink(missing_ok=True)
            if not (parts / SETTINGS).is_file():
                write_json(parts / SETTINGS, settings)
        distributed.barrier()
        todo = [c for c in range(n_parts) if c not in done]
        score_mine(deal(todo, world)[rank] if deal is not None else todo[rank::world])
        distributed.barrier()
        if rank == 0:
            meta = merge_parts(parts, n_parts, out, meta, schema)
        meta = distributed.all_gather_object(meta)[0]  # every rank waits for the merge; rank 0's summary
    finally:
        if lock is not None:
            _release(parts, lock, created, lock_created)
    return meta, len(done)


def _release(parts: Path, lock, created: bool, lock_created: bool) -> None:
    """Release the lock; what this run created and left empty is removed: the lock file, and the parts
    folder when it holds nothing else (the run stopped before its first part)."""
    lock.release(remove=lock_created)
    if created:
        try:
            parts.rmdir()  # only when empty
        except OSError:
            pass
