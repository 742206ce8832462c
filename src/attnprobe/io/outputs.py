"""Every command's outputs, checked before any work starts, and the environmental errors of writing them.

`check_out` is the one check of an output path, used by every command (CLI and Python API): an empty
path, a folder where a file is expected (or the reverse), a path under a file, a folder nobody may write
to, the wrong suffix, and an output that would replace one of the command's own inputs (or the sidecar
files written beside it). `check_run_folder` refuses a run folder that already holds a run unless the
user asked to continue it (`--resume`) or to start over (`--overwrite`). `environment_error` turns the
expected OSErrors (no space, no permission, read-only file system, symlink loops, too many open files,
a name too long, a missing device) into one line naming the path; other errors keep their tracebacks.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import AttnprobeError

RUN_FILES = ("metrics.jsonl", "best.pt", "last.pt")  # what a training run folder holds

# errno -> what to do about it (the line's fix)
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota exceeded)",
    errno.EACCES: "fix the permissions",
    errno.EPERM: "fix the permissions",
    errno.EROFS: "the file system is read-only: use a writable location",
    errno.ELOOP: "fix the symbolic link loop",
    errno.EMFILE: "raise the open-file limit (ulimit -n) or lower --workers",
    errno.ENFILE: "raise the system's open-file limit or lower --workers",
    errno.ENAMETOOLONG: "shorten the path",
    errno.ENODEV: "reconnect the device (or use another location)",
    errno.ENXIO: "reconnect the device (or use another location)",
    errno.ESTALE: "remount the network file system",
}


def _abs(path) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


def _same(a, b) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_path_type(flag: str, path) -> None:
    """A path given at the Python API is text or os.PathLike (or None): anything else is a TypeError naming it."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{flag} takes a path (text or os.PathLike), not a {type(path).__name__}: {path!r}")


def check_out(path, *, flag: str = "--out", kind: str = "file", suffix: str | None = None,
              writes=(), inputs: dict | None = None, example: str = "out") -> Path:
    """Check an output path before any work starts; return it as a Path. One AttnprobeError line otherwise.

    kind: "file" (a file is written there), "dir" (a folder, new or existing, gets files) or "new" (a file
    or folder that the command itself refuses to replace, e.g. export). suffix: the file's required suffix.
    writes: the other paths the command writes (sidecars; for a folder, the files in it). inputs: the
    command's inputs as {flag: path}; an output that is one of them is refused."""
    check_path_type(flag, path)
    text = os.fspath(path) if path is not None else ""
    if not text.strip():
        raise AttnprobeError(f"{flag} is empty; name the {'folder' if kind == 'dir' else 'file'} to write, "
                             f"e.g. {flag} {example}")
    p = Path(text)
    if kind == "file" and p.is_dir():
        raise AttnprobeError(f"{flag} {p} is a folder; name a file, e.g. {flag} {p / example}")
    if kind == "dir" and (p.exists() or p.is_symlink()) and not p.is_dir():
        raise AttnprobeError(f"{flag} {p} is a file; pass a folder (new or existing) for the run")
    if suffix and p.suffix.lower() != suffix:
        raise AttnprobeError(f"{flag} {p} must end in {suffix}, e.g. {flag} {p.with_suffix(suffix).name}")
    # the nearest folder that exists: it must be a folder, and writable
    here = _abs(p) if kind == "dir" and p.is_dir() else _abs(p).parent
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise AttnprobeError(f"{flag} {p}: {here} is a file, so nothing can be written under it; "
                             "pass a path in a folder")
    if not os.access(here, os.W_OK | os.X_OK):
        raise AttnprobeError(f"{flag} {p}: folder {here} is not writable (read-only or no permission); "
                             f"pass a {flag} you can write to, or fix its permissions")
    written = [p, *(Path(w) for w in writes)]
    for in_flag, in_path in (inputs or {}).items():
        if in_path is None or not os.fspath(in_path).strip():
            continue
        for w in written:
            if _same(in_path, w):
                if w == p:
                    raise AttnprobeError(f"{flag} {p} is also {in_flag}: writing it would replace that input; "
                                         f"pass another {flag}")
                raise AttnprobeError(f"{flag} {p} would replace {in_flag} {in_path} ({w} is written with it); "
                                     f"pass another {flag}")
    return p


def check_run_folder(out, *, resume=None, overwrite: bool = False) -> None:
    """A run folder holding a run (metrics.jsonl, best.pt or last.pt) is refused unless the user passes
    --resume (continue it) or --overwrite (start over)."""
    if resume and overwrite:
        raise AttnprobeError("--resume continues a run and --overwrite starts it over; pass one of them")
    if resume or overwrite:
        return
    p = Path(out)
    held = [n for n in RUN_FILES if (p / n).exists()]
    if held:
        cont = f"--resume {p / 'last.pt'} to continue it, " if "last.pt" in held else ""
        raise AttnprobeError(f"--out {p} already holds a run ({', '.join(held)}); pass {cont}--overwrite to start "
                             "over (replacing it), or another --out")


def environment_error(e: BaseException) -> str | None:
    """The fix for an expected environmental OSError (see ENVIRONMENT_ERRNOS); None for anything else."""
    if not isinstance(e, OSError):
        return None
    if e.errno in ENVIRONMENT_ERRNOS:
        return ENVIRONMENT_ERRNOS[e.errno]
    if e.errno is None:  # e.g. pyarrow's errors: only the message says what happened
        for code, fix in ENVIRONMENT_ERRNOS.items():
            if os.strerror(code) in str(e):
                return fix
    return None


def describe_oserror(e: OSError) -> str:
    """`No space left on device: PATH` (the path where known)."""
    what = e.strerror or str(e)
    name = e.filename if e.filename is not None else None
    if e.filename2 is not None:
        return f"{what}: {name} -> {e.filename2}"
    return f"{what}: {name}" if name is not None else what


def with_path(e: OSError, path) -> OSError:
    """The same error, naming `path` when it named none (a failed write() does not)."""
    if e.filename is not None:
        return e
    code = e.errno
    if code is None:  # pyarrow's errors carry the reason in the message only
        code = next((c for c in ENVIRONMENT_ERRNOS if os.strerror(c) in str(e)), None)
    if code is None:
        return e
    return OSError(code, os.strerror(code), os.fspath(path))


def default_mode(mode: int = 0o666) -> int:
    """`mode` with the process umask applied (what open() gives a new file; mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


# ---- the outputs of each command -----------------------------------------------------------------

def parts_dir(out) -> Path:
    """Where `score` keeps its finished chunks until the table is merged."""
    return Path(f"{os.fspath(out)}.parts")


def skipped_path(out) -> Path:
    """`score`'s list of unreadable files, beside the table."""
    out = Path(out)
    return out.with_name(f"{out.stem}.skipped.csv")


def uids_path(out) -> Path:
    """`select`'s DataComp subset file (a shard pool's selected uids), beside the selection."""
    out = Path(out)
    return out.with_name(f"{out.stem}.uids.npy")


def _given(out) -> bool:
    return out is not None and bool(os.fspath(out).strip())


def check_score_out(out, *, teacher=None, wild=None) -> Path:
    """score --out: a .parquet file; its sidecars OUT.parts/ and STEM.skipped.csv replace no input."""
    return check_out(out, suffix=".parquet", example="scores.parquet",
                     writes=(skipped_path(out), parts_dir(out)) if _given(out) else (),
                     inputs={"--teacher": teacher, "--wild": wild})


def check_select_out(out, *, scores=None) -> Path:
    """select --out: a .parquet file, its summary STEM.json beside it; neither may be --scores."""
    return check_out(out, suffix=".parquet", example="selection.parquet",
                     writes=(Path(out).with_suffix(".json"), uids_path(out)) if _given(out) else (),
                     inputs={"--scores": scores})


def check_train_out(out, *, resume=None, overwrite: bool = False, inputs: dict | None = None) -> Path:
    """train-teacher/distill --out: a writable run folder that is none of the inputs, and that holds no run
    unless it is resumed or overwritten."""
    out = check_out(out, kind="dir", example="RUN", writes=[Path(out, n) for n in RUN_FILES] if _given(out) else (),
                    inputs=inputs)
    check_run_folder(out, resume=resume, overwrite=overwrite)
    return out
