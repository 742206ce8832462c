"""Wild pools as tar shards (the WebDataset / img2dataset layout), read in place.

A pool is `00000.tar` ... `NNNNN.tar`; each sample is KEY.jpg + KEY.txt + KEY.json (with a `uid`), and
`NNNNN_stats.json` beside a shard says how many samples it holds. `--wild` names the shards with a brace
pattern (`pool/{00000..01023}.tar`, expanded here), a glob (`pool/*.tar`) or one file.

- Listing: `list_shards` (the shards in pattern order, each with its size and its stats' sample count);
  `deal_shards` hands unfinished shards to torchrun ranks, balanced by those counts. A pattern matching tars
  and images together is refused; an existing file is taken literally (`a[1].tar` is that file).
- Streaming: `TarSamples` reads one shard's members in order with tarfile's `r|*` (plain, gzip, bz2, xz),
  grouped into samples by key, nothing extracted to disk; it records why a shard ended early
  (`truncated`, as an interrupted download leaves it) instead of raising. A repeated member name or sample
  key is read once, the first, and noted as the shard's problem (score lists it among the skipped).
- Random access: `MemberLoader` reads a selected member by the byte offset the score table recorded
  (os.pread: no shared file position, so DataLoader workers may share it), checking that the tar header just
  before it is that member's (a shard rewritten since it was scored is refused, not misread). Offsets of a
  compressed shard are offsets in its uncompressed stream: such a shard cannot be read by offset (reshard it
  to plain tar).
- DataComp's selection format: `write_uids`, a sorted `uids.npy` of (u8, u8) halves of each 32-hex uid.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AttnprobeError
from .atomic import replacing
from .folders import is_image_file
from .jsonfiles import read_json
from .outputs import uids_path

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: tarfile's r|* reads them all




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
    """The samples a shard holds, by its `_stats.json` (`successes`, img2dataset's count of samples written).
    Only a hint for dealing shards to ranks: a missing or damaged stats file counts as unknown."""
    try:
        n = read_json(stats_path(path), what="img2dataset's shard stats", fix="", missing={}).get("successes")
    except (AttnprobeError, OSError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def list_shards(wild) -> list[Shard]:
    """The shards `wild` names, in pattern order (a glob's matches sorted), each once. A pattern naming
    shards that are not there, no shard at all, or two shards with one stem is one AttnprobeError line."""
    text = os.fspath(wild)
    if "://" in text or text.startswith("pipe:"):
        raise AttnprobeError(f"--wild {text}: attnprobe reads local shards only; copy or mount them here and pass "
                             "their local path")
    paths, missing, images = [], [], []
    for item in ([text] if os.path.isfile(text) else expand_braces(text)):  # an existing file is taken literally
        if glob.has_magic(item) and not os.path.isfile(item):  # `a[1].tar` that exists is that file
            matches = sorted(glob.glob(item))
            paths += matches
            images += [m for m in matches if is_image_file(m) and os.path.isfile(m)]
        elif os.path.isfile(item):
            paths.append(item)
        else:
            missing.append(item)
    if missing:
        raise AttnprobeError(f"--wild {text}: {len(missing)} shard(s) do not exist (first: {missing[0]}); fix the "
                             f"pattern, or name the shards that are there with a glob ('{os.path.dirname(text) or '.'}"
                             "/*.tar')")
    paths = [p for p in dict.fromkeys(paths) if p.lower().endswith(SHARD_SUFFIXES) and os.path.isfile(p)]
    if images:
        folder = os.path.dirname(images[0]) or "."
        what = f"{len(paths)} .tar shard(s) and {len(images)} image(s)" if paths else f"{len(images)} image(s)"
        fix = (f"pass the shards alone (--wild '{folder}/*.tar') or a folder of images (--wild {folder}), not both"
               if paths else f"pass their folder (--wild {folder}); a pattern names tar shards")
        raise AttnprobeError(f"--wild {text} matches {what}, e.g. {images[0]}; {fix}")
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


def is_compressed(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith(COMPRESSED_MAGIC)


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
    """Write `datacomp_uids(uids)` to `path` (whole or not at all: io.atomic); the count written, or None (and
    nothing written, an older file at `path` removed) when the uids are not DataComp's."""
    path = Path(path)
    array = datacomp_uids(uids)
    if array is None or not len(array):
        path.unlink(missing_ok=True)  # a stale list from an earlier selection would not match this one
        return None
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return len(array)


def write_selection_uids(selected, out) -> dict:
    """Beside selection `out`: `<stem>.uids.npy` (DataComp's subset file) when the selected rows have DataComp
    uids. Returns {"uids_npy": the file's path or None (and no such file left from an earlier selection),
    "uids_missing": how many selected rows have no uid and so are not in the file (None without a file)}."""
    path = uids_path(out)
    if "uid" not in selected.columns:
        path.unlink(missing_ok=True)
        return {"uids_npy": None, "uids_missing": None}
    if not write_uids(selected["uid"], path):
        return {"uids_npy": None, "uids_missing": None}
    missing = int(sum(u is None or (isinstance(u, float) and u != u) for u in selected["uid"]))
    return {"uids_npy": os.path.abspath(path), "uids_missing": missing}
