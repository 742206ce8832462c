"""Wild pools as tar shards (the WebDataset / img2dataset layout), read in place.

A pool is `00000.tar` ... `NNNNN.tar`; each sample is KEY.jpg + KEY.txt + KEY.json (with a `uid`), and
`NNNNN_stats.json` beside a shard says how many samples it holds. `--wild` names the shards with a brace
pattern (`pool/{00000..01023}.tar`, expanded here), a glob (`pool/*.tar`) or one file.

- Listing: `list_shards` (the shards in pattern order, each with its size and its stats' sample count);
  `deal_shards` hands unfinished shards to torchrun ranks, balanced by those counts.
- Streaming: `TarSamples` reads one shard's members in order with tarfile's `r|*` (plain, gzip, bz2, xz),
  grouped into samples by key, nothing extracted to disk; it records why a shard ended early
  (`truncated`, as an interrupted download leaves it) instead of raising.
- Random access: `MemberLoader` reads a selected member by the byte offset the score table recorded
  (os.pread: no shared file position, so DataLoader workers may share it). Offsets of a compressed shard
  are offsets in its uncompressed stream: such a shard cannot be read by offset (reshard it to plain tar).
- DataComp's selection format: `write_uids`, a sorted `uids.npy` of (u8, u8) halves of each 32-hex uid.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import ImageLoader, failure_reason, is_hidden, load_image
from .errors import AttnprobeError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: tarfile's r|* reads them all
MAX_OPEN_SHARDS = 64  # file descriptors a MemberLoader keeps open per process


# ---------------------------------------------------------------- naming the shards

def is_shard_pool(wild) -> bool:
    """`wild` names tar shards (a file ending in .tar, .tar.gz or .tgz, or a brace or glob pattern: its matches
    of those), not a folder of images."""
    text = os.fspath(wild)
    pattern = glob.has_magic(text) or _BRACE.search(text) is not None
    return (pattern or text.lower().endswith(SHARD_SUFFIXES)) and not os.path.isdir(text)


def shard_stem(path) -> str:
    """`pool/00003.tar` -> `00003` (also for .tar.gz and .tgz): the first part of every row's path."""
    name = os.path.basename(os.fspath(path))
    for suffix in SHARD_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """The shell's brace expansion, as attnprobe needs it: `{00000..00012}` (numbers; zero-padded to the
    wider end when either end has a leading zero) and `{a,b,c}`, any number of them, in order."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        a, b = numbers.groups()
        width = max(len(a), len(b)) if (a[0] == "0" and len(a) > 1) or (b[0] == "0" and len(b) > 1) else 0
        step = 1 if int(a) <= int(b) else -1
        items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        raise AttnprobeError(f"--wild {pattern}: {{{body}}} is neither a range like {{00000..00099}} nor a list "
                             "like {a,b}; fix the pattern")
    return [p for item in items for p in expand_braces(head + item + tail)]


@dataclass(frozen=True)
class Shard:
    """One tar shard of the pool: its file, the stem its rows start with, its size and modification time
    (what a finished part records, to tell whether the file changed since), and its stats' sample count."""
    path: str
    stem: str
    bytes: int
    mtime_ns: int
    samples: int | None

    def marker(self) -> dict:
        """What a finished part of this shard records: a part is trusted only while the file still matches."""
        return {"shard": self.stem, "shard_bytes": self.bytes, "shard_mtime_ns": self.mtime_ns}


def stats_path(path) -> Path:
    """img2dataset's `NNNNN_stats.json` beside shard `NNNNN.tar`."""
    path = Path(path)
    return path.with_name(f"{shard_stem(path)}_stats.json")


def _stats_samples(path) -> int | None:
    """The samples a shard holds, by its `_stats.json` (`successes`, img2dataset's count of samples written)."""
    try:
        n = json.loads(stats_path(path).read_text()).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def list_shards(wild) -> list[Shard]:
    """The shards `wild` names, in pattern order (a glob's matches sorted), each once. A pattern naming
    shards that are not there, no shard at all, or two shards with one stem is one AttnprobeError line."""
    text = os.fspath(wild)
    if "://" in text or text.startswith("pipe:"):
        raise AttnprobeError(f"--wild {text}: attnprobe reads local shards only; copy or mount them here and pass "
                             "their local path")
    paths, missing = [], []
    for item in expand_braces(text):
        if glob.has_magic(item):
            paths += sorted(glob.glob(item))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            missing.append(item)
    if missing:
        raise AttnprobeError(f"--wild {text}: {len(missing)} shard(s) do not exist (first: {missing[0]}); fix the "
                             f"pattern, or name the shards that are there with a glob ('{os.path.dirname(text) or '.'}"
                             "/*.tar')")
    paths = [p for p in dict.fromkeys(paths) if p.lower().endswith(SHARD_SUFFIXES) and os.path.isfile(p)]
    if not paths:
        raise AttnprobeError(f"--wild {text} matches no .tar shard; check the folder and the pattern")
    shards, stems = [], {}
    for p in paths:
        stem = shard_stem(p)
        if stem in stems:
            raise AttnprobeError(f"--wild {text}: shards {stems[stem]} and {p} share the stem {stem!r}, which every "
                                 "row's path starts with; pass shards with distinct names")
        stems[stem] = p
        st = os.stat(p)
        shards.append(Shard(p, stem, st.st_size, st.st_mtime_ns, _stats_samples(p)))
    return shards


def listing_digest(shards: list[Shard]) -> str:
    """sha256 of the shards' names in order: identifies the pool's listing (a changed file is caught by the
    marker of its part, not here)."""
    return hashlib.sha256("\n".join(s.stem for s in shards).encode("utf-8", "surrogateescape")).hexdigest()


def content_digest(wild) -> str:
    """sha256 of the shards' names and sizes: what `attnprobe run` keys its score stage on."""
    lines = "\n".join(f"{s.stem}\t{s.bytes}" for s in list_shards(wild))
    return hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()


def is_compressed(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith(COMPRESSED_MAGIC)


# ---------------------------------------------------------------- dealing shards to ranks

def shard_weights(shards: list[Shard]) -> list[float]:
    """Each shard's expected work: its stats' sample count; a shard without stats counts its bytes at the
    pool's bytes per sample (or its bytes alone, when no shard has stats)."""
    known = [s for s in shards if s.samples is not None]
    per_sample = sum(s.bytes for s in known) / max(1, sum(s.samples for s in known)) if known else 1.0
    return [float(s.samples) if s.samples is not None else s.bytes / max(per_sample, 1e-9) for s in shards]


def deal_shards(todo: list[int], weights: list[float], world: int) -> list[list[int]]:
    """The shards `todo` (indices into `weights`) dealt to `world` ranks: heaviest first, each to the rank with
    the least work so far (ties: the lower rank). While there are at least `world` shards every rank gets one;
    each rank's list is in pool order. Deterministic, so every rank computes the same deal."""
    load, hands = [0.0] * world, [[] for _ in range(world)]
    for i in sorted(todo, key=lambda i: (-weights[i], i)):
        r = min(range(world), key=lambda r: (load[r], len(hands[r]), r))
        hands[r].append(i)
        load[r] += weights[i]
    return [sorted(h) for h in hands]


# ---------------------------------------------------------------- streaming one shard

def sample_key(name: str) -> str:
    """WebDataset's sample key of a member: its path up to the first dot of its file name
    (`dir/000030005.jpg` -> `dir/000030005`); members with one key form one sample."""
    folder, base = posixpath.split(name)
    return posixpath.join(folder, base.split(".", 1)[0])


@dataclass
class Member:
    name: str
    offset: int  # of the data, in the (uncompressed) tar stream
    size: int
    data: bytes


@dataclass
class Sample:
    key: str
    members: list[Member]

    def uid(self) -> str | None:
        """The `uid` of the sample's .json member, as text (None when there is none)."""
        for m in self.members:
            if m.name.lower().endswith(".json"):
                try:
                    uid = json.loads(m.data).get("uid")
                except (ValueError, AttributeError):
                    return None
                return None if uid is None else str(uid)
        return None


_CUT_SHORT = ("unexpected end of data", "compressed file ended", "end-of-stream marker")


class TarSamples:
    """The samples of one shard, in order, read once with tarfile's streaming mode (`r|*`: plain, gzip, bz2 or
    xz; no seeks, nothing extracted). Hidden members (names starting with '.') and non-files are left out.

    `wanted(key)`: when given, only samples it accepts are read and yielded; `keep(member name)`: when given,
    only the members it accepts are read (scoring needs the images and the .json, not the captions).
    The shard is never the reason an iteration raises: after it, `problem` is None, `truncated` (the file
    ends inside a member or a header, or lacks the end-of-archive block, as an interrupted download leaves
    it; the complete members before were yielded) or why the file could not be read at all."""

    def __init__(self, path, wanted=None, keep=None):
        self.path, self.wanted, self.keep, self.problem = os.fspath(path), wanted, keep, None

    def __iter__(self):
        self.problem, sample = None, None
        try:
            with open(self.path, "rb") as f:
                compressed = f.read(6).startswith(COMPRESSED_MAGIC)
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r|*") as tar:
                    for info in tar:
                        if not info.isfile() or is_hidden(posixpath.basename(info.name)):
                            continue
                        key = sample_key(info.name)
                        if sample is None or sample.key != key:
                            if sample is not None and sample.members:
                                yield sample
                            sample = Sample(key, [])
                        wanted = self.wanted is None or self.wanted(key)
                        if wanted and (self.keep is None or self.keep(info.name)):
                            data = tar.extractfile(info).read()
                            sample.members.append(Member(info.name, info.offset_data, info.size, data))
                    end = tar.offset
                    whole = _compressed_stream_whole(tar) if compressed else _ends_with_zero_block(f, end)
                if sample is not None and sample.members:
                    yield sample
                sample = None
                if not whole:
                    self.problem = "truncated"
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            cut = isinstance(e, EOFError) or any(s in str(e).lower() for s in _CUT_SHORT)
            self.problem = "truncated" if cut else failure_reason(e)
            if sample is not None and sample.members:  # its members read whole before the cut
                yield sample


def _compressed_stream_whole(tar: tarfile.TarFile) -> bool:
    """Whether a compressed shard's stream, read to its end, ended where its compressor ended it (not cut
    short). tarfile's streaming reader keeps the decompressor as `fileobj.cmp` (gzip, bz2, xz alike)."""
    while tar.fileobj.read(1 << 16):  # the padding after the last member, to the end of the stream
        pass
    return getattr(getattr(tar.fileobj, "cmp", None), "eof", True)


def _ends_with_zero_block(f, end: int) -> bool:
    """Whether the plain tar file `f` has its end-of-archive zero block at `end`, where the members stopped."""
    f.seek(end)
    block = f.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


class MemberFile(io.BytesIO):
    """A member's bytes as the file PIL opens, named by its row path in PIL's messages (a plain BytesIO would
    put its memory address in the skipped list's reason: another one on every run)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __repr__(self):
        return repr(self.name)


# ---------------------------------------------------------------- random access for distill

def member_index(df, wild, selection="the selection") -> dict[str, tuple[str, int, int]]:
    """{row path: (shard file, offset, size)} of a score or selection table's rows, checked against the shards
    `wild` names: each row's shard among them, plain tar (not compressed), and long enough for the member."""
    missing_cols = [c for c in ("path", "offset", "size") if c not in df.columns]
    if missing_cols:
        raise AttnprobeError(f"{selection} has no {missing_cols[0]!r} column: it was scored from a folder, not from "
                             "tar shards; pass the --wild folder that was scored")
    by_stem = {s.stem: s for s in list_shards(wild)}
    index, absent, needed = {}, [], {}
    for path, offset, size in zip(df["path"], df["offset"], df["size"]):
        stem = path.split("/", 1)[0]
        shard = by_stem.get(stem)
        if shard is None:
            absent.append(path)
            continue
        needed[stem] = shard
        index[path] = (shard.path, int(offset), int(size))
    if absent:
        raise AttnprobeError(f"{len(absent)} rows of {selection} are in shards that --wild {os.fspath(wild)} does not "
                             f"name (e.g. {absent[0]}); pass the --wild pattern that was scored")
    for shard in needed.values():
        if is_compressed(shard.path):
            raise AttnprobeError(f"shard {shard.path} is compressed, so its members cannot be read by offset; copy "
                                 "the selection to plain tar shards first (attnprobe reshard --selection SEL --wild "
                                 "PATTERN --out DIR) and pass --wild 'DIR/*.tar' --selection DIR/selection.parquet")
    short = [p for p, (f, o, s) in index.items() if o + s > needed[p.split("/", 1)[0]].bytes]
    if short:
        raise AttnprobeError(f"{len(short)} rows of {selection} lie past the end of their shard (e.g. {short[0]}): the "
                             "shard changed since it was scored; rescore it")
    return index


class MemberLoader(ImageLoader):
    """ImageLoader for shard members: a row path (`<stem>/<member>`) -> its image, read by offset from the local
    tar file and decoded as `load_image` decodes a file (so a member gives the same tensor as its extracted
    file). Descriptors are opened lazily, at most MAX_OPEN_SHARDS at a time, and read with os.pread (no file
    position to share); a worker process started by spawn opens its own."""

    def __init__(self, index: dict[str, tuple[str, int, int]], in_chans: int, size_hint: int | None = None,
                 cache: bool = False):
        super().__init__(in_chans, size_hint, cache)
        self.index, self._fds = index, OrderedDict()

    def __getstate__(self):
        return {**self.__dict__, "_fds": OrderedDict()}

    def read(self, path) -> bytes:
        file, offset, size = self.index[path]
        fd = self._fds.pop(file, None)
        if fd is None:
            fd = os.open(file, os.O_RDONLY)
            while len(self._fds) >= MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[file] = fd  # most recently used last
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"{file} ends before member {path}: the shard changed since it was scored")
        return data

    def __call__(self, path):
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        img = load_image(MemberFile(self.read(path), path), self.in_chans, self.size_hint)
        if self.cache is not None:
            self.cache[path] = img
        return img

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


# ---------------------------------------------------------------- DataComp's uids.npy

def datacomp_uids(uids) -> np.ndarray | None:
    """DataComp's subset array: each uid (32 hex digits) as its two 64-bit halves, dtype `u8,u8`, sorted,
    each once. Missing uids (None, NaN) are left out; None when any other uid is not 32 hex digits."""
    pairs = []
    for u in uids:
        if u is None or (isinstance(u, float) and u != u):
            continue
        if not isinstance(u, str) or not re.fullmatch(r"[0-9a-fA-F]{32}", u):
            return None
        pairs.append((int(u[:16], 16), int(u[16:], 16)))
    return np.unique(np.array(pairs, dtype=np.dtype("u8,u8")))


def write_uids(uids, path) -> int | None:
    """Write `datacomp_uids(uids)` to `path` (temporary file, then rename); the count written, or None (and
    nothing written, an older file at `path` removed) when the uids are not DataComp's."""
    path = Path(path)
    array = datacomp_uids(uids)
    if array is None or not len(array):
        path.unlink(missing_ok=True)  # a stale list from an earlier selection would not match this one
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(array)


def write_selection_uids(selected, out) -> str | None:
    """Beside selection `out`: `<stem>.uids.npy` (DataComp's subset file) when the selected rows have DataComp
    uids; the file's path, or None (and no such file left from an earlier selection)."""
    from .outputs import uids_path
    path = uids_path(out)
    if "uid" not in selected.columns:
        path.unlink(missing_ok=True)
        return None
    return os.path.abspath(path) if write_uids(selected["uid"], path) else None
