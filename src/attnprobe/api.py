"""The public API: one function per command, each taking and writing files as the CLI does.

Each function is the one boundary of its command: it builds and checks the settings (an instance and/or
keyword arguments), checks every input path (io.inputs) and every output (io.outputs) before any work,
and only then imports and calls the stage function (stages/), which reads `settings.x`.
"""
from __future__ import annotations

import os

from .io.atomic import write_json
from .io.inputs import check_inputs
from .io.outputs import check_out, check_score_out, check_select_out, check_train_out
from .settings import (DaflSettings, DistillSettings, EvaluateSettings, ExportSettings, ImportSettings,
    PrepareSettings, ReshardSettings, ScoreSettings, SelectSettings, TeacherSettings)

__all__ = ["prepare", "train_teacher", "score", "select", "distill", "dafl", "reshard", "evaluate", "import_teacher",
           "export"]


def prepare(kind, src, out, *, settings: PrepareSettings | None = None, **overrides) -> dict:
    """Convert an official CIFAR-10/100 or Tiny-ImageNet archive or folder (`kind`: cifar10, cifar100,
    tinyimagenet) into an ImageFolder tree at `out`. Settings: `PrepareSettings` (kind, progress)."""
    s = PrepareSettings.build(settings, **({} if kind is None else {"kind": kind}), **overrides)
    check_inputs({"SRC": (src, "archive")})
    check_out(out, flag="OUT", kind="new", example="data", inputs={"SRC": src})
    from .stages.prepare import prepare as run_stage
    return run_stage(src=src, out=out, settings=s)


def score(teacher, wild, out, *, settings: ScoreSettings | None = None, **overrides) -> dict:
    """Score every image under `wild` with the teacher; write the table to `out` (parquet) and the files
    that could not be read to `<out stem>.skipped.csv` (path, reason). Settings: `ScoreSettings` (blocks,
    heads, resize, amp, chunk_size, batch_size, ...), given as an instance and/or keyword arguments.

    Resumable: a stopped run leaves finished chunks of `chunk_size` images in `<out>.parts/`, and the
    same call continues from them. Under torchrun the chunks are shared among the processes. Returns
    the table's metadata plus `scored`, `skipped`, `rows` (= scored) and `skipped_csv`."""
    s = ScoreSettings.build(settings, **overrides)
    check_inputs({"--teacher": (teacher, "checkpoint"), "--wild": (wild, "pool")})
    check_score_out(out, teacher=teacher, wild=wild)
    from .stages.score import score as run_stage
    return run_stage(teacher=teacher, wild=wild, out=out, settings=s)


def select(scores, *, out, settings: SelectSettings | None = None, **overrides) -> dict:
    """Select the K best rows of a score table; write them to `out` (.parquet) and a JSON summary (same
    stem) beside. Settings: `SelectSettings` (num_select, strategy, w_attn, w_out, normalize, seed)."""
    s = SelectSettings.build(settings, **overrides)
    check_inputs({"--scores": (scores, "table")})
    check_select_out(out, scores=scores)
    from .stages.select import select as run_stage
    return run_stage(scores=scores, out=out, settings=s)


def reshard(selection, wild, *, out, settings: ReshardSettings | None = None, **overrides) -> dict:
    """Copy the selected samples of the shard pool `wild` (all their members) into new tar shards in the folder
    `out`, with `_stats.json` and the selection re-pointed at them (OUT/selection.parquet). Settings:
    `ReshardSettings` (shard_size). Returns {shards, samples, members, out, selection}."""
    s = ReshardSettings.build(settings, **overrides)
    check_inputs({"--selection": (selection, "table"), "--wild": (wild, "pool")})
    check_out(out, kind="dir", example="resharded", inputs={"--selection": selection})
    from .stages.reshard import reshard as run_stage
    return run_stage(selection=selection, wild=wild, out=out, settings=s)


def train_teacher(data, *, out, test=None, settings: TeacherSettings | None = None, **overrides) -> dict:
    """Train a teacher on DATA/train, choosing the epoch on DATA/val (or a --val-split of train/); `test` is
    measured every epoch, never used to choose. Settings: `TeacherSettings` (model, epochs, lr, ...).
    Writes OUT/best.pt, last.pt, metrics.jsonl; returns the chosen epoch's checkpoint info."""
    s = TeacherSettings.build(settings, **overrides)
    check_inputs({"--data": (data, "dir"), "--test": (test, "dir")})
    check_train_out(out, resume=s.resume, overwrite=s.overwrite, inputs={"--data": data, "--test": test})
    from .stages.train_teacher import train_teacher as run_stage
    return run_stage(data=data, out=out, test=test, settings=s)


def distill(teacher, wild, selection, *, out, test=None, settings: DistillSettings | None = None,
            **overrides) -> dict:
    """Distill a student on the selected wild images, choosing the epoch on fidelity to the teacher (or on
    `test` with select_on="test"). Settings: `DistillSettings` (student, epochs, lr, probe_weight, holdout,
    ...). Writes OUT/best.pt, last.pt, metrics.jsonl; returns the chosen epoch's checkpoint info."""
    s = DistillSettings.build(settings, **overrides)
    check_inputs({"--teacher": (teacher, "checkpoint"), "--wild": (wild, "pool"), "--selection": (selection, "table"),
                  "--test": (test, "dir"), "--labeled": (s.labeled, "dir")})
    check_train_out(out, resume=s.resume, overwrite=s.overwrite,
                    inputs={"--teacher": teacher, "--wild": wild, "--selection": selection, "--test": test})
    from .stages.distill import distill as run_stage
    return run_stage(teacher=teacher, wild=wild, selection=selection, out=out, test=test, settings=s)


def dafl(teacher, *, out, test=None, settings: DaflSettings | None = None, **overrides) -> dict:
    """Train a student from the teacher alone with DAFL (no images): a generator trained against the teacher
    makes the student's KD batches. Settings: `DaflSettings` (student, epochs, iters_per_epoch, batch_size, lr,
    generator_lr, temperature, w_oh, w_a, w_ie, ...). Writes OUT/best.pt (chosen on fidelity on generated
    images), last.pt, metrics.jsonl; returns the chosen epoch's checkpoint info, with `steps`."""
    s = DaflSettings.build(settings, **overrides)
    check_inputs({"--teacher": (teacher, "checkpoint"), "--test": (test, "dir")})
    check_train_out(out, resume=s.resume, overwrite=s.overwrite, inputs={"--teacher": teacher, "--test": test})
    from .stages.dafl import dafl as run_stage
    return run_stage(teacher=teacher, out=out, test=test, settings=s)


def evaluate(model, data, *, json=None, settings: EvaluateSettings | None = None, **overrides) -> dict:
    """Top-1/top-5 of the checkpoint `model` on `data` (a folder of class folders, or an ImageFolder root: its
    val/). Settings: `EvaluateSettings` (batch_size, workers, device, progress). `json`: also write
    {top1, top5, n} to this file (its folder is created). Returns {top1, top5, n}."""
    s = EvaluateSettings.build(settings, **overrides)
    check_inputs({"--model": (model, "checkpoint"), "--data": (data, "dir")})
    if json is not None:
        check_out(json, flag="--json", example="evaluation.json", inputs={"--model": model, "--data": data})
    from .stages.evaluate import evaluate as run_stage
    result = run_stage(model=model, data=data, settings=s)
    if json is not None and os.environ.get("RANK", "0") in ("", "0"):  # under torchrun: rank 0 writes
        write_json(json, result, indent=None)
    return result


def import_teacher(source, *, out, settings: ImportSettings | None = None, **overrides) -> dict:
    """Read a teacher from a DeiT/reference, timm or transformers checkpoint or folder, a bare state dict,
    safetensors or hf-hub:ORG/NAME (local cache only); write it to `out` as an attnprobe checkpoint.
    Settings: `ImportSettings` (model, model_kwargs, classes, mean, std, val, accuracy, ema, ...).
    Returns the checkpoint's info. Nothing is written unless every check passes."""
    s = ImportSettings.build(settings, **overrides)
    check_inputs({"source": (source, "source"), "--val": (s.val, "dir")})
    check_out(out, example="teacher.pt", inputs={"source": source, "--classes": s.classes, "--val": s.val})
    from .stages.import_teacher import import_teacher as run_stage
    return run_stage(source=source, out=out, settings=s)


def export(checkpoint, *, out, settings: ExportSettings | None = None, **overrides) -> dict:
    """Write `checkpoint` as a timm folder, a transformers folder or an ONNX file at `out` (a new path).
    Settings: `ExportSettings` (format, check: load the export back and compare its logits, above 1e-4 an
    error). Returns format, out, max_abs_diff (None without check) and the files written."""
    s = ExportSettings.build(settings, **overrides)
    check_inputs({"checkpoint": (checkpoint, "checkpoint")})
    check_out(out, kind="new", example="model.onnx" if s.format == "onnx" else s.format,
              inputs={"checkpoint": checkpoint})
    from .stages.export import export as run_stage
    return run_stage(checkpoint=checkpoint, out=out, settings=s)
