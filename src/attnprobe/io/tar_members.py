"""The members of tar shards: reading samples in order from a shard (streaming, corrupt and cut-off
shards handled), and reading selected members back by offset for training."""
from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import AttnprobeError
from .datasets import failure_reason
from .folders import is_hidden
from .images import ImageLoader, load_image
from .shards import COMPRESSED_MAGIC, is_compressed, list_shards

MAX_OPEN_SHARDS = 64  # file descriptors a MemberLoader keeps open per process



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
    A member is named by its name: a member whose name, or whose sample key (in an earlier group of members:
    `a.jpg b.jpg a.txt`), was met before in the shard is left out and listed in `repeats`, so every reader
    (score, reshard) sees one member per row path and one sample per key, the first.
    The shard is never the reason an iteration raises: after it, `problem` is None, `truncated` (the file
    ends inside a member or a header, or lacks the end-of-archive block, as an interrupted download leaves
    it; the complete members before were yielded), why the file could not be read at all, or (also after
    either, joined by '; ') the `repeats_note` of the members left out."""

    def __init__(self, path, wanted=None, keep=None):
        self.path, self.wanted, self.keep, self.problem = os.fspath(path), wanted, keep, None
        self.repeats: list[str] = []

    def __iter__(self):
        self.problem, self.repeats, sample = None, [], None
        seen_keys, seen_names = set(), set()
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
                            if sample is not None:
                                seen_keys.add(sample.key)
                                if sample.members:
                                    yield sample
                            sample = Sample(key, [])
                        if key in seen_keys or info.name in seen_names:  # a member's identity is its name
                            self.repeats.append(info.name)
                            continue
                        seen_names.add(info.name)
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
        if self.repeats:
            note = repeats_note(self.repeats)
            self.problem = note if self.problem is None else f"{self.problem}; {note}"


def repeats_note(repeats: list[str]) -> str:
    """Why a shard's repeated members were left out (TarSamples reads the first of each name and key)."""
    first = repeats[0]
    return (f"repeated members: {len(repeats)} member(s) repeat a name or a sample key met earlier in the shard "
            f"(first: {first}, sample key {sample_key(first)}); only the first of each was read, the later ones "
            "left out; write the shard with unique sample keys")


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
    by_shard: dict[str, list[str]] = {}
    for p in index:
        by_shard.setdefault(index[p][0], []).append(p)
    for file, paths in by_shard.items():  # a few rows of each shard, spread over it: the rest at reading
        picks = sorted({paths[round(k * (len(paths) - 1) / max(1, CHECKED_ROWS - 1))] for k in range(CHECKED_ROWS)})
        with open(file, "rb") as f:
            moved = [p for p in picks if not member_here(f.fileno(), p, *index[p][1:])]
        if moved:
            raise AttnprobeError(f"row {moved[0]} of {selection} is not where shard {file} now holds it (offset "
                                 f"{index[moved[0]][1]}): the shard was rewritten since it was scored; rescore it and "
                                 "select again")
    return index


CHECKED_ROWS = 16  # rows per shard whose member header member_index reads before training


def member_here(fd: int, path: str, offset: int, size: int, head: bytes | None = None) -> bool:
    """Whether the tar header block just before `offset` in the open shard `fd` is that of the member `path`
    (`<stem>/<member name>`) of `size` bytes: a row's recorded offset still names its member. `head`: those
    512 bytes, when already read."""
    if offset < tarfile.BLOCKSIZE:
        return False
    head = os.pread(fd, tarfile.BLOCKSIZE, offset - tarfile.BLOCKSIZE) if head is None else head
    try:
        info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return info.size == size and _names_agree(info.name, path.split("/", 1)[1])


def _names_agree(header: str, name: str) -> bool:
    """A member's name as its own header block holds it: whole, or cut short (a longer name lives in the PAX or
    GNU header before it), with '?' for each non-ASCII letter (PAX)."""
    if header == name or (header and name.encode("utf-8", "surrogateescape").startswith(
            header.encode("utf-8", "surrogateescape"))):
        return True
    return 0 < len(header) <= len(name) and all(h in (n, "?") for h, n in zip(header, name))


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
        data = os.pread(fd, size + tarfile.BLOCKSIZE, offset - tarfile.BLOCKSIZE) if offset >= tarfile.BLOCKSIZE \
            else b""
        if len(data) != size + tarfile.BLOCKSIZE:
            raise OSError(f"{file} ends before member {path}: the shard changed since it was scored; rescore it")
        if not member_here(fd, path, offset, size, data[:tarfile.BLOCKSIZE]):  # its header, read in the same call
            raise OSError(f"{file} holds another member at {path}'s offset {offset}: the shard was rewritten since "
                          "it was scored; rescore it")
        return data[tarfile.BLOCKSIZE:]

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
