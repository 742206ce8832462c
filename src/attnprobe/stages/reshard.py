"""`attnprobe reshard`: the selected samples of a shard pool, all their members (.jpg, .txt, .json, ...),
copied into new plain tar shards with img2dataset's `_stats.json`: the selected set as a pool of its own,
for other tools, or read back from remote or compressed shards as plain local ones.

    OUT/00000.tar, 00000_stats.json, ...   `shard_size` samples each, in pool order, member names kept
    OUT/selection.parquet (+ .json)        the selection with `path`, `offset`, `size` pointing into OUT

The source shards are streamed (tar_members.TarSamples: plain or compressed, nothing extracted). OUT is
built whole beside its place and renamed into it at the end (io.atomic.replacing_dir), so a stopped run
leaves no shard behind; OUT must be a new or empty folder. A sample key met twice in one new shard (pools
whose keys repeat across shards) is made unique by prefixing its members with the source shard's stem. Within
one source shard a member is its name and a sample its key: TarSamples reads the first of each (as scoring
does), and each row's recorded offset must be that member's, so no two rows ever point at one new member.
"""
from __future__ import annotations

import io
import math
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..errors import AttnprobeError
from ..io.atomic import remove_stale, replacing_dir, write_json
from ..io.jsonfiles import read_json
from ..io.lock import hold
from ..io.shards import list_shards
from ..io.tables import read_table, write_table
from ..io.tar_members import TarSamples, sample_key

if TYPE_CHECKING:
    from ..settings import ReshardSettings


class ShardWriter:
    """New plain tar shards `folder/NNNNN.tar` of `shard_size` samples each, with `NNNNN_stats.json`."""

    def __init__(self, folder: Path, shard_size: int, width: int = 5):
        self.folder, self.shard_size, self.width = folder, shard_size, width
        self.count, self.tar, self.keys, self.stems = 0, None, set(), []

    def _next(self) -> None:
        self.close()
        stem = f"{len(self.stems):0{self.width}d}"
        self.stems.append(stem)
        self.tar, self.keys = tarfile.open(self.folder / f"{stem}.tar", "w", format=tarfile.PAX_FORMAT), set()

    def add(self, source_stem: str, sample) -> list[tuple[str, str, int, int]]:
        """Write one sample; returns (source member name, new row path, data offset, size) per member."""
        if self.tar is None or len(self.keys) == self.shard_size:
            self._next()
        prefix, n = "", 0
        while prefix + sample.key in self.keys:  # a key met in another source shard: prefix its stem (and a count)
            n += 1
            prefix = f"{source_stem}_" if n == 1 else f"{source_stem}_{n}_"
        self.keys.add(prefix + sample.key)
        placed = []
        for m in sample.members:
            info = tarfile.TarInfo(prefix + m.name)
            info.size, info.mode, info.mtime = len(m.data), 0o644, 0  # the same bytes on every run
            self.tar.addfile(info, io.BytesIO(m.data))
            blocks = math.ceil(info.size / tarfile.BLOCKSIZE)
            placed.append((m.name, f"{self.stems[-1]}/{info.name}", self.tar.offset - blocks * tarfile.BLOCKSIZE,
                           info.size))
        return placed

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        n = len(self.keys)
        stats = {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0, "status": "success",
                 "written_by": "attnprobe reshard"}
        write_json(self.folder / f"{self.stems[-1]}_stats.json", stats, sync=False)  # in replacing_dir's folder
        self.tar = None


def _check_out(out: Path, shards) -> None:
    if any(Path(s.path).resolve().parent == out.resolve() for s in shards):
        raise AttnprobeError(f"--out {out} holds the shards being read; pass a new folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:
        tars = [n for n in held if n.endswith(".tar")]
        what = (f"{len(tars)} .tar shards" if tars else "selection.parquet" if "selection.parquet" in held
                else f"{len(held)} file(s), e.g. {held[0]}")
        raise AttnprobeError(f"--out {out} already holds {what}; pass a new or empty folder, or delete them to "
                             "reshard again")


def _wanted(df, selection, wild, shards) -> dict[str, set[str]]:
    """{shard stem: sample keys} of the selection's rows; a row in no shard of `wild` is refused, and so is a
    row path listed twice (a table scored before repeated members were left out: two rows, one member name)."""
    by_stem = {s.stem for s in shards}
    twice = df["path"][df["path"].duplicated()]
    if len(twice):
        stem, _, member = twice.iat[0].partition("/")
        raise AttnprobeError(f"{selection} lists {len(twice)} row path(s) twice (first: {twice.iat[0]}): shard {stem} "
                             f"repeats the member name or sample key {sample_key(member)}, and a row must name one "
                             "member; rescore the pool (the first of each repeated member is scored) and select again")
    wanted: dict[str, set[str]] = {}
    for path in df["path"]:
        stem, _, member = path.partition("/")
        if stem not in by_stem or not member:
            raise AttnprobeError(f"row {path} of {selection} is in no shard that --wild {os.fspath(wild)} names; pass "
                                 "the --wild pattern that was scored")
        wanted.setdefault(stem, set()).add(sample_key(member))
    return wanted


def reshard(*, selection, wild, out, settings: ReshardSettings) -> dict:
    """Copy the samples of `selection` (a score or selection table of the shard pool `wild`) into new shards of
    settings.shard_size samples in the new folder `out`; returns {shards, samples, members, out, selection}."""
    df, meta = read_table(selection)
    if "path" not in df.columns or df.empty:
        raise AttnprobeError(f"{selection} has no rows to copy; pass the output of `attnprobe select`")
    summary_path = Path(selection).with_suffix(".json")
    summary = read_json(summary_path, what="the selection's summary", missing={},
                        fix=f"rerun `attnprobe select` to write {Path(selection).name} and its summary again")
    shards, out = list_shards(wild), Path(out)
    wanted = _wanted(df, selection, wild, shards)
    # one reshard into `out` at a time: another would clear this one's folder in the making (remove_stale)
    lock = hold(out.with_name(f".{out.name}.lock"), f"reshard into {out}",
                "wait for it to finish, or pass another --out")
    try:
        _check_out(out, shards)
        return _copy(df, meta, summary, summary_path, selection, wild, out, shards, wanted, settings)
    finally:
        lock.release(remove=True)


def _copy(df, meta, summary, summary_path, selection, wild, out: Path, shards, wanted, settings) -> dict:
    remove_stale(out)  # left by a stopped run
    n_samples = sum(len(keys) for keys in wanted.values())
    width = max(5, len(str(math.ceil(n_samples / settings.shard_size) - 1)))
    moved, members = {}, 0
    with replacing_dir(out) as tmp:
        writer = ShardWriter(tmp, settings.shard_size, width)
        try:
            for shard in tqdm([s for s in shards if s.stem in wanted], desc="reshard", unit="shard",
                              disable=not settings.progress or None):
                for sample in TarSamples(shard.path, wanted=wanted[shard.stem].__contains__):
                    sources = {m.name: m.offset for m in sample.members}
                    for name, path, offset, size in writer.add(shard.stem, sample):
                        moved[f"{shard.stem}/{name}"] = (path, offset, size, sources[name])
                        members += 1
        finally:
            writer.close()
        missing = [p for p in df["path"] if p not in moved]
        if missing:
            raise AttnprobeError(f"{len(missing)} selected members were not found in their shards (e.g. {missing[0]}): "
                                 "the shards changed or are cut short since they were scored; pass the --wild that "
                                 "was scored")
        if "offset" in df.columns:  # each row names its member by offset too: the one that was scored
            moved_from = [p for p, o in zip(df["path"], df["offset"]) if moved[p][3] != int(o)]
            if moved_from:
                raise AttnprobeError(f"{len(moved_from)} selected members are at another offset in their shard than "
                                     f"{selection} records (e.g. {moved_from[0]}): the shard was rewritten since it "
                                     "was scored; rescore it and select again")
        old = df["path"].tolist()
        df["path"] = [moved[p][0] for p in old]
        df["offset"] = [moved[p][1] for p in old]
        df["size"] = [moved[p][2] for p in old]
        write_table(df, tmp / "selection.parquet", {**meta, "resharded_from": {"selection": os.path.abspath(selection),
                                                                               "wild": os.path.abspath(wild)}})
        if summary_path.is_file():
            write_json(tmp / "selection.json", summary, sync=False)
    return {"shards": len(writer.stems), "samples": n_samples, "members": members, "out": os.fspath(out),
            "selection": os.fspath(out / "selection.parquet")}
