"""The side files of an `attnprobe run` folder as `run` and the report read them back: config.json,
stages.json, <strategy>/selection.json, <strategy>/evaluation.json, <strategy>/student/metrics.jsonl.
A damaged one (torn, edited, mistyped) is one line naming it, never a traceback nor a silent redo."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import AttnprobeError
from ..io.jsonfiles import read_json

RUN_KIND = "attnprobe-run"
FIX = "delete it and run `attnprobe run` again: the stage that wrote it is redone"
STAGES_FIX = "delete it to redo every stage of the run, or pass another --out"
CONFIG_FIX = "delete it and run `attnprobe run` again to rewrite it from the flags"


def run_json(path: Path, what: str, missing, *, kind: type = dict, fix: str = FIX):
    """A JSON side file of the run, `missing` when it is not there yet; damaged: one line naming it."""
    return read_json(path, what=what, fix=fix, kind=kind, missing=missing)


def read_stages(run: Path) -> list:
    """RUN/stages.json: one row per stage ([] before the first)."""
    return run_json(run / "stages.json", "the stage record of an `attnprobe run`", [], kind=list, fix=STAGES_FIX)


def read_evaluation(path: Path, missing=None) -> dict | None:
    """<strategy>/evaluation.json, {"student": {...}, "teacher": {...}}; `missing` before the evaluate stage."""
    what = "the evaluation of a student and its teacher"
    ev = run_json(path, what, missing)
    if ev is not missing and not all(isinstance(ev.get(k, {}), dict) for k in ("student", "teacher")):
        raise AttnprobeError(f"{path}: {what} is damaged (its 'student' or 'teacher' is not a mapping); {FIX}")
    return ev


def read_jsonl(path: Path) -> list[dict]:
    """A JSON-lines file (metrics.jsonl) as a list of rows, [] when it is not there yet."""
    if not path.is_file():
        return []
    what = "the epochs of a distillation are damaged"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError) as e:
        raise AttnprobeError(f"{path}: {what} (not JSON lines: {type(e).__name__}); {FIX}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise AttnprobeError(f"{path}: {what} (a line is not a mapping); {FIX}")
    return rows


def read_config(run: Path) -> dict:
    """RUN/config.json, checked to be an `attnprobe run` config."""
    path = run / "config.json"
    if not path.is_file():
        raise AttnprobeError(f"{run} has no config.json; pass the folder of an `attnprobe run`")
    cfg = read_json(path, what="the config of an `attnprobe run`", fix="rerun `attnprobe run` to rewrite it")
    if cfg.get("kind") != RUN_KIND:
        raise AttnprobeError(f"{path} is not the config of an `attnprobe run` (no kind {RUN_KIND!r}); "
                             "pass the run's own folder, or rerun `attnprobe run`")
    missing = [k for k in ("teacher", "wild", "strategies") if not cfg.get(k)]
    if missing:
        raise AttnprobeError(f"{path} lacks {', '.join(missing)}; rerun `attnprobe run` to rewrite it")
    return cfg


# ------------------------------------------------------------ what a run trusts: content, not names


def pool_identity(wild) -> str:
    """The content identity of a pool (io.folders.stat_identity): each image's relative path, size and mtime_ns,
    or each tar shard's stem, size and mtime_ns. An image or shard rewritten in place changes it."""
    from ..io.folders import PathList, files_identity, stat_identity
    from ..io.shards import is_shard_pool, list_shards
    if is_shard_pool(wild):
        return stat_identity((s.stem, s.bytes, s.mtime_ns) for s in list_shards(wild))
    return files_identity(wild, PathList.from_dir(wild))


def folder_identity(root) -> str | None:
    """The content identity of a labeled folder (--test): its image files, recursively; None without one."""
    from ..io.folders import files_identity, iter_images
    return None if root is None else files_identity(root, iter_images(root))


def check_run_out(out: Path, wild: Path) -> None:
    """Before any work: `--out` must not lie inside the `--wild` folder (the report's figures would join the
    pool), and an existing folder must be an `attnprobe run`'s (its config.json) or hold nothing yet."""
    out_abs = Path(out).resolve()
    if wild.is_dir() and (out_abs == wild or wild in out_abs.parents):
        raise AttnprobeError(f"--out {out} lies inside --wild {wild}: the run's report and files would join the "
                             "pool on the next run; pass an --out outside the pool")
    if not out_abs.is_dir():
        return
    if not (out_abs / "config.json").is_file():
        foreign = sorted(p.name for p in out_abs.iterdir() if p.name != ".lock")
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise AttnprobeError(f"--out {out} is not an attnprobe run folder (it holds {shown} and no config.json); "
                                 "pass a new or empty folder, or the folder of an earlier `attnprobe run`")
        return
    config = run_json(out_abs / "config.json", "the config of an `attnprobe run`", {}, fix=CONFIG_FIX)
    if config.get("kind") != RUN_KIND:
        raise AttnprobeError(f"--out {out}: {out / 'config.json'} is not the config of an `attnprobe run` (no kind "
                             f"{RUN_KIND!r}); pass a new or empty folder, or the folder of an earlier run")


def table_problem(path: Path, *, rows: int | None = None, full: bool = True) -> str | None:
    """Why the table at `path` cannot be trusted (missing, unreadable, not `rows` rows), or None. `full=False`
    reads the footer only (a torn file has none): enough for a score table of millions of rows."""
    from ..io.tables import META_KEY, read_table
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        if full:
            n = len(read_table(path)[0])
        else:
            import pyarrow.parquet as pq
            md = pq.read_metadata(path)
            if META_KEY not in (md.metadata or {}):
                return f"{path.name} is not an attnprobe table"
            n = md.num_rows
    except AttnprobeError:
        return f"{path.name} is damaged"
    except Exception:  # pyarrow's errors on a torn footer
        return f"{path.name} is damaged"
    if rows is not None and n != rows:
        return f"{path.name} has {n} rows where its summary says {rows}"
    return None


def selection_problem(selection: Path) -> str | None:
    """Why a finished select stage cannot be reused: its table or its summary is missing or damaged."""
    if not selection.with_suffix(".json").is_file():
        return f"{selection.with_suffix('.json').name} is missing"
    try:
        summary = run_json(selection.with_suffix(".json"), "a selection's summary", {})
    except AttnprobeError:
        return f"{selection.with_suffix('.json').name} is damaged"
    k = summary.get("num_select")
    return table_problem(selection, rows=k if isinstance(k, int) and not isinstance(k, bool) else None)


def checkpoint_problem(path: Path) -> str | None:
    """Why a finished distill stage cannot be reused: best.pt missing or not a readable attnprobe checkpoint."""
    from ..io.checkpoints import read_checkpoint
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        read_checkpoint(path)
    except (AttnprobeError, OSError, RuntimeError, ValueError, EOFError):
        return f"{path.name} is damaged"
    return None


def evaluation_problem(path: Path) -> str | None:
    """Why a finished evaluate stage cannot be reused: evaluation.json missing or damaged."""
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        ev = read_evaluation(path, {})
    except AttnprobeError:
        return f"{path.name} is damaged"
    if not all(isinstance(ev.get(k), dict) for k in ("student", "teacher")):
        return f"{path.name} is damaged"
    return None
