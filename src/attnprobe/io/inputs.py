"""Every path a user hands in, checked by kind before any work starts: one line naming the flag otherwise.

`check_inputs({"--teacher": (path, "checkpoint"), ...})` is called by every API function before its stage
runs (and before io.outputs checks the outputs against these inputs). Kinds:

    checkpoint  an existing file (a run folder is refused with a hint to its best.pt)
    table       an existing file (a score or selection table)
    file        an existing file
    dir         an existing folder
    archive     an existing file or folder (an official data set's archive or its extracted folder)
    pool        an existing folder of images, or tar shards: one .tar or a brace/glob pattern of them
    source      an existing file or folder, or hf-hub:ORG/NAME

None values are skipped (an optional input not given). A list, a number or anything but text or a path is
refused with a TypeError naming the parameter: it is a programming error at the Python API.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import AttnprobeError
from .outputs import check_path_type

KINDS = ("checkpoint", "table", "file", "dir", "archive", "pool", "source")


def check_inputs(inputs: dict) -> None:
    """Check each `{flag: (path, kind)}`; the first problem is one AttnprobeError (or TypeError) line."""
    for flag, (path, kind) in inputs.items():  # types first: a programming error outranks a missing file
        if kind not in KINDS:
            raise ValueError(f"unknown input kind {kind!r} of {flag}; one of {', '.join(KINDS)}")
        check_path_type(flag, path)
    for flag, (path, kind) in inputs.items():
        if path is not None:
            _check_one(flag, os.fspath(path), kind)


def _check_one(flag: str, text: str, kind: str) -> None:
    if not text.strip():
        raise AttnprobeError(f"{flag} is empty; pass {_WHAT[kind]}")
    p = Path(text)
    if kind == "source" and text.startswith("hf-hub:"):
        return  # looked up in the local Hugging Face cache by the reader, which says what is missing
    if kind == "pool" and not p.is_dir():
        from .shards import is_shard_pool  # the tar-shard reader lists them and says what is missing
        if is_shard_pool(text):
            return
    if kind == "checkpoint":
        if p.is_dir():
            best = p / "best.pt"
            hint = f"e.g. {flag} {best}" if best.is_file() else "a run's best.pt or last.pt"
            raise AttnprobeError(f"{flag} {p} is a folder, not a checkpoint file; pass the checkpoint file, {hint}")
        if not p.exists():
            # the wording `evaluate` and `score` have always used
            raise AttnprobeError(f"checkpoint {p} does not exist; pass the best.pt or last.pt of a run")
    if not p.exists():
        raise AttnprobeError(f"{flag} {p} does not exist; pass {_WHAT[kind]}")
    if kind in ("checkpoint", "table", "file") and not p.is_file():
        raise AttnprobeError(f"{flag} {p} is not a file; pass {_WHAT[kind]}")
    if kind in ("dir", "pool") and not p.is_dir():
        raise AttnprobeError(f"{flag} {p} is a file, not a folder; pass {_WHAT[kind]}")


_WHAT = {
    "checkpoint": "an attnprobe checkpoint, e.g. RUN/best.pt",
    "table": "a table written by attnprobe (.parquet)",
    "file": "an existing file",
    "dir": "an existing folder",
    "archive": "the official archive or its extracted folder",
    "pool": "a folder of images, or tar shards ('pool/{00000..00099}.tar', 'pool/*.tar' or one .tar)",
    "source": "a checkpoint file, a timm or transformers model folder, or hf-hub:ORG/NAME",
}
