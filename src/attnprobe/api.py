"""The Python API: one function per command, each taking and writing files as the CLI does."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import AttnprobeError
from .io.atomic import write_text
from .io.outputs import check_out, check_score_out, check_select_out, check_train_out
from .io.tables import read_table, write_table
from .method.selection import select_images
from .settings import (
    DaflSettings,
    DistillSettings,
    ReshardSettings,
    ScoreSettings,
    SelectSettings,
    TeacherSettings,
)
from .stages.dafl import dafl as _dafl
from .stages.distill import distill as _distill
from .stages.export import export
from .stages.import_teacher import import_teacher
from .training.loop import evaluate_checkpoint as evaluate
from .training.loop import train_teacher as _train_teacher

__all__ = ["prepare", "train_teacher", "score", "select", "distill", "dafl", "reshard", "evaluate", "import_teacher",
           "export"]


def prepare(kind: str, src, out, progress: bool = True) -> dict:
    """Convert an official CIFAR-10/100 or Tiny-ImageNet archive or folder into an ImageFolder tree."""
    from .stages.prepare import prepare as _prepare
    return _prepare(kind, src, out, progress=progress)


def score(teacher, wild, out, *, settings: ScoreSettings | None = None, **overrides) -> dict:
    """Score every image under `wild` with the teacher; write the table to `out` (parquet) and the files
    that could not be read to `<out stem>.skipped.csv` (path, reason). Settings: `ScoreSettings` (blocks,
    heads, resize, amp, chunk_size, batch_size, ...), given as an instance and/or keyword arguments.

    Resumable: a stopped run leaves finished chunks of `chunk_size` images in `<out>.parts/`, and the
    same call continues from them. Under torchrun the chunks are shared among the processes. Returns
    the table's metadata plus `scored`, `skipped`, `rows` (= scored) and `skipped_csv`."""
    from .stages.score import score as _score
    s = ScoreSettings.build(settings, **overrides)
    check_score_out(out, teacher=teacher, wild=wild)
    return _score(teacher, wild, out, **s.asdict())


def select(scores, *, out, settings: SelectSettings | None = None, **overrides) -> dict:
    """Select the K best rows of a score table; write them to `out` (.parquet) and a JSON summary (same
    stem) beside. Settings: `SelectSettings` (num_select, strategy, w_attn, w_out, normalize, seed)."""
    s = SelectSettings.build(settings, **overrides)
    check_select_out(out, scores=scores)
    df, meta = read_table(scores)
    for col in ("path", "pred"):
        if col not in df.columns:
            raise AttnprobeError(f"{scores} has no {col!r} column; pass a table written by `attnprobe score`")
    selected, summary = select_images(df, s.num_select, s.strategy, s.w_attn, s.w_out, s.seed, s.normalize,
                                      meta.get("num_classes"))
    summary.update(scores=os.path.abspath(scores), classes=meta.get("classes"))
    out = Path(out)
    from .io.shards import write_selection_uids
    summary["uids_npy"] = write_selection_uids(selected, out)  # a shard pool's: DataComp's subset file
    write_table(selected, out, {**meta, "selection": summary})
    write_text(out.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    return summary


def reshard(selection, wild, *, out, settings: ReshardSettings | None = None, **overrides) -> dict:
    """Copy the selected samples of the shard pool `wild` (all their members) into new tar shards in the folder
    `out`, with `_stats.json` and the selection re-pointed at them (OUT/selection.parquet). Settings:
    `ReshardSettings` (shard_size). Returns {shards, samples, members, out, selection}."""
    from .stages.reshard import reshard as _reshard
    s = ReshardSettings.build(settings, **overrides)
    check_out(out, kind="dir", example="resharded", inputs={"--selection": selection})
    return _reshard(selection, wild, out, **s.asdict())


def train_teacher(data, *, out, test=None, settings: TeacherSettings | None = None, **overrides) -> dict:
    """Train a teacher on DATA/train, choosing the epoch on DATA/val (or a --val-split of train/); `test` is
    measured every epoch, never used to choose. Settings: `TeacherSettings` (model, epochs, lr, ...).
    Writes OUT/best.pt, last.pt, metrics.jsonl; returns the chosen epoch's checkpoint info."""
    s = TeacherSettings.build(settings, **overrides)
    check_train_out(out, resume=s.resume, overwrite=s.overwrite, inputs={"--data": data, "--test": test})
    return _train_teacher(data, out=out, test=test, **s.asdict())


def distill(teacher, wild, selection, *, out, test=None, settings: DistillSettings | None = None,
            **overrides) -> dict:
    """Distill a student on the selected wild images, choosing the epoch on fidelity to the teacher (or on
    `test` with select_on="test"). Settings: `DistillSettings` (student, epochs, lr, probe_weight, holdout,
    ...). Writes OUT/best.pt, last.pt, metrics.jsonl; returns the chosen epoch's checkpoint info."""
    s = DistillSettings.build(settings, **overrides)
    check_train_out(out, resume=s.resume, overwrite=s.overwrite,
                    inputs={"--teacher": teacher, "--wild": wild, "--selection": selection, "--test": test})
    return _distill(teacher, wild, selection, out=out, test=test, **s.asdict())


def dafl(teacher, *, out, test=None, settings: DaflSettings | None = None, **overrides) -> dict:
    """Train a student from the teacher alone with DAFL (no images): a generator trained against the teacher
    makes the student's KD batches. Settings: `DaflSettings` (student, epochs, iters_per_epoch, batch_size, lr,
    generator_lr, temperature, w_oh, w_a, w_ie, ...). Writes OUT/best.pt (chosen on fidelity on generated
    images), last.pt, metrics.jsonl; returns the chosen epoch's checkpoint info, with `steps`."""
    s = DaflSettings.build(settings, **overrides)
    check_train_out(out, resume=s.resume, overwrite=s.overwrite, inputs={"--teacher": teacher, "--test": test})
    return _dafl(teacher, out=out, test=test, **s.asdict())
