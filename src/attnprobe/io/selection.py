"""A selection read back against its pool: the selected paths, each checked to resolve inside the pool
that was scored (--wild), the summary JSON beside the table, and for tar shards the members' index."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ..errors import AttnprobeError
from .jsonfiles import read_json
from .shards import is_shard_pool
from .tables import read_table
from .tar_members import member_index


def summary_path(selection) -> Path:
    """The selection's JSON summary (class weights, strategy, ...): same stem, beside the table."""
    return Path(selection).with_suffix(".json")


def read_selection(selection, wild, *, teacher_sha256: str | None = None) -> tuple[list[str], dict, dict | None]:
    """(paths, summary, members): the selection's paths, its summary ({} when there is none) and, for a
    pool of tar shards, the members' index (tar_members.member_index; None for a folder). Every path must
    lie inside the pool: in a folder, a relative path without `..` (links inside the pool are members); in
    shards, a member of one of the shards --wild names. With `teacher_sha256`, a selection whose table
    records the teacher that scored it must have been scored by this teacher (no record: it passes)."""
    df, meta = read_table(selection)
    if "path" not in df.columns or df.empty:
        raise AttnprobeError(f"{selection} has no selected paths; pass the output of `attnprobe select`")
    scored_by = meta.get("teacher_sha256") if isinstance(meta, dict) else None
    if teacher_sha256 and scored_by and scored_by != teacher_sha256:
        teacher = meta.get("teacher")
        named = f" ({teacher})" if isinstance(teacher, str) and teacher else ""
        raise AttnprobeError(f"{selection} was scored with another teacher (sha256 {scored_by[:12]}..., this one is "
                             f"{teacher_sha256[:12]}...); rescore with this teacher, or pass the teacher that scored "
                             f"it{named}")
    summary = read_json(summary_path(selection), what="the selection's summary",
                        fix="rerun attnprobe select to write it again, or remove it", kind=dict, missing={})
    paths = [str(p) for p in df["path"].tolist()]
    if is_shard_pool(wild):  # members of tar shards: each in a shard that `wild` names, readable by offset
        return paths, summary, member_index(df, wild, selection)
    check_folder_paths(paths, wild)
    return paths, summary, None


def selected_paths(selection, wild, teacher_sha256: str | None = None) -> tuple[list[str], dict]:
    """read_selection without the members' index: (paths, summary)."""
    paths, summary, _ = read_selection(selection, wild, teacher_sha256=teacher_sha256)
    return paths, summary


def check_folder_paths(paths: list[str], wild) -> None:
    """Each path names a file under the folder `wild`: relative and without `..` (a table may come from anywhere;
    distill must not read files outside the pool). A symlink inside the pool is a member, as `score` saw it: a
    pool of links to images kept elsewhere is common, and score follows the links too."""
    folder = Path(wild)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise AttnprobeError(f"wild folder {folder} {what}; pass the folder of images that was scored")
    outside = [p for p in paths if escapes(p)]
    if outside:
        raise AttnprobeError(f"{len(outside)} selected paths point outside --wild {os.fspath(wild)} (e.g. {outside[0]}); "
                             "pass the selection scored from this --wild")
    missing = [p for p in paths if not (folder / p).is_file()]
    if missing:
        raise AttnprobeError(f"{len(missing)} selected paths are not under {folder} (e.g. {missing[0]}); "
                             "pass the same --wild folder that was scored")


def escapes(path: str) -> bool:
    """A table's path that does not name something inside its pool's folder: absolute, or with a `..` part."""
    posix = PurePosixPath(path.replace(os.sep, "/"))
    return os.path.isabs(path) or posix.is_absolute() or ".." in posix.parts
