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


def check_side_files(run: Path, strategies: list[str]) -> None:
    """Read every side file a rerun of `run` reads back (those there), so that a damaged one is refused before
    any stage is reused, redone or cleared."""
    read_evaluation(run / "teacher-evaluation.json", {})
    for name in strategies:
        run_json(run / name / "selection.json", "a selection's summary", {})
        read_evaluation(run / name / "evaluation.json", {})
