"""Orchestration: train a teacher on labeled data, distill a student from it on selected wild
images, evaluate a checkpoint. Each writes RUN/best.pt, RUN/last.pt and RUN/metrics.jsonl."""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from .data import (ImageList, eval_transform, labeled_folder, make_loader, per_class_subset, split_dir,
                   train_transform)
from .engine import distill_one_epoch, evaluate, train_one_epoch
from .errors import AttnprobeError
from .losses import NoiseAdaptation
from .models import (build_model, default_norm, describe, geometry, load_checkpoint, read_checkpoint,
                     resolve_model, save_checkpoint)
from .probe import check_blocks, default_distill_blocks, map_blocks
from .select import read_table

SCHEDULES = ("cosine", "step")


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_schedule(optimizer, schedule: str, epochs: int, warmup_epochs: int = 0, milestones=(200, 300)):
    """Per-epoch LR factor: linear warmup, then cosine to zero, or the reference's x0.1 steps."""
    if schedule not in SCHEDULES:
        raise AttnprobeError(f"--schedule {schedule!r} is not one of {SCHEDULES}")

    def factor(epoch):
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        if schedule == "step":
            return 0.1 ** sum(epoch >= m for m in milestones)
        t = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
        return 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class RunDir:
    """RUN/: checkpoints and one JSON object per epoch in metrics.jsonl."""

    def __init__(self, out, resume: bool = False):
        self.path = Path(out)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics = self.path / "metrics.jsonl"
        if not resume and self.metrics.exists():
            self.metrics.unlink()

    def log(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _resume_state(resume, run: RunDir, objects: dict) -> tuple[int, float]:
    """Restore model/optimizer/scheduler/... state from RUN/last.pt; returns (next epoch, best top-1)."""
    if not resume:
        return 0, -1.0
    ckpt = read_checkpoint(resume)
    for name, obj in objects.items():
        if name not in ckpt:
            raise AttnprobeError(f"{resume} has no {name} state to resume from; pass the last.pt of the same kind of run")
        getattr(obj, "module", obj).load_state_dict(ckpt[name])
    # Keep only the epochs before the resumed one, so metrics.jsonl has each epoch once.
    if run.metrics.exists():
        rows = [r for r in run.metrics.read_text().splitlines() if r and json.loads(r)["epoch"] < ckpt["epoch"] + 1]
        run.metrics.write_text("".join(r + "\n" for r in rows))
    return ckpt["epoch"] + 1, ckpt["best_top1"]


def train_teacher(data, model: str = "ap_digits_teacher", model_kwargs: dict | None = None, epochs: int = 10,
                  out="runs/teacher", batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
                  schedule: str = "cosine", warmup_epochs: int = 0, label_smoothing: float = 0.0,
                  flip: bool = True, affine: bool = False, mean=None, std=None, workers: int = 2,
                  device: str | None = None, seed: int = 0, resume=None, progress: bool = True) -> dict:
    """Supervised training on DATA/train, evaluated on DATA/val every epoch. Returns the best info."""
    seed_everything(seed)
    device = pick_device(device)
    train_dir, val_dir = split_dir(data, "train"), split_dir(data, "val")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise AttnprobeError(f"{train_dir} has no class folders; expected train/<class>/<image>")
    arch, kwargs = resolve_model(model, model_kwargs)
    net = build_model(arch, kwargs, len(classes)).to(device)
    in_chans = geometry(net)["in_chans"]
    d_mean, d_std = default_norm(arch, in_chans)
    info = describe(net, arch, kwargs, classes, mean or d_mean, std or d_std, role="teacher")
    train_ds = labeled_folder(train_dir, classes, train_transform(info, flip, affine), in_chans)
    val_ds = labeled_folder(val_dir, classes, eval_transform(info), in_chans)
    train_loader = make_loader(train_ds, batch_size, True, workers, seed, drop_last=len(train_ds) > batch_size)
    val_loader = make_loader(val_ds, batch_size, False, workers)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = lr_schedule(optimizer, schedule, epochs, warmup_epochs)
    run = RunDir(out, resume=bool(resume))
    start, best = _resume_state(resume, run, {"model": net, "optimizer": optimizer, "scheduler": scheduler})
    for epoch in range(start, epochs):
        t0 = time.time()
        lr_now = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(net, train_loader, optimizer, device, label_smoothing, progress)
        scheduler.step()
        acc = evaluate(net, val_loader, device, progress)
        if acc["top1"] > best:
            best = acc["top1"]
            save_checkpoint(run.path / "best.pt", net, {**info, "accuracy": best, "epoch": epoch})
        save_checkpoint(run.path / "last.pt", net, {**info, "accuracy": acc["top1"], "epoch": epoch},
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch,
                        best_top1=best)
        run.log({"epoch": epoch, **stats, "val_top1": acc["top1"], "val_top5": acc["top5"], "lr": lr_now,
                 "seconds": round(time.time() - t0, 3)})
    return {**info, "accuracy": best}


def _student(student: str, model_kwargs: dict | None, t_info: dict, teacher, probe_on: bool):
    """The student as a timm model with the teacher's classes and input geometry (unless overridden)."""
    arch, kwargs = resolve_model(student, model_kwargs)
    kwargs.setdefault("img_size", t_info["img_size"])
    kwargs.setdefault("in_chans", t_info["in_chans"])
    net = build_model(arch, kwargs, t_info["num_classes"])
    s_geo, t_geo = geometry(net), geometry(teacher)
    if (s_geo["img_size"], s_geo["in_chans"]) != (t_geo["img_size"], t_geo["in_chans"]):
        raise AttnprobeError(f"student input {s_geo['img_size']}px x{s_geo['in_chans']} differs from the teacher's "
                             f"{t_geo['img_size']}px x{t_geo['in_chans']}; drop the img_size/in_chans overrides")
    if probe_on and (s_geo["grid_size"], s_geo["num_prefix_tokens"]) != (t_geo["grid_size"], t_geo["num_prefix_tokens"]):
        raise AttnprobeError(f"student token grid {s_geo['grid_size']} differs from the teacher's {t_geo['grid_size']}; "
                             "use the teacher's patch_size or turn the probe loss off with --probe-weight 0")
    return net, arch, kwargs


def _class_dir(path, classes, split: str) -> Path:
    """A folder of class folders, or an ImageFolder root whose `split`/ is one."""
    path = Path(path)
    if path.is_dir() and not {d.name for d in path.iterdir() if d.is_dir()} & set(classes) and (path / split).is_dir():
        return path / split
    return path


def selected_paths(selection, wild) -> tuple[list[str], dict]:
    """The selection's paths (checked to exist under the wild folder) and its JSON summary."""
    df, _ = read_table(selection)
    if "path" not in df.columns or df.empty:
        raise AttnprobeError(f"{selection} has no selected paths; pass the output of `attnprobe select`")
    wild = Path(wild)
    if not wild.is_dir():
        raise AttnprobeError(f"wild folder {wild} does not exist; pass the folder that was scored")
    paths = df["path"].tolist()
    missing = [p for p in paths if not (wild / p).is_file()]
    if missing:
        raise AttnprobeError(f"{len(missing)} selected paths are not under {wild} (e.g. {missing[0]}); "
                             "pass the same --wild folder that was scored")
    summary_path = Path(selection).with_suffix(".json")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return paths, summary


def distill(teacher, wild, selection, test, student: str = "ap_digits_student", model_kwargs: dict | None = None,
            epochs: int = 10, out="runs/student", batch_size: int = 256, lr: float = 7.5e-4,
            weight_decay: float = 0.025, schedule: str = "cosine", warmup_epochs: int = 0,
            temperature: float = 4.0, probe_weight: float = 0.8, probe_blocks: list[int] | None = None,
            probe_variant: str = "cosine", noise_adaptation: bool = True, noise_weight: float = 1.0,
            noise_lr: float = 1e-3, robust: bool = False, teacher_acc: float | None = None,
            labeled=None, per_class: int = 0, flip: bool = True, workers: int = 2, device: str | None = None,
            seed: int = 0, resume=None, progress: bool = True) -> dict:
    """Train a student from scratch on the selected wild images with the teacher as the only supervision."""
    seed_everything(seed)
    device = pick_device(device)
    teacher_net, t_info = load_checkpoint(teacher, device)
    for p in teacher_net.parameters():
        p.requires_grad_(False)
    t_depth = geometry(teacher_net)["depth"]
    t_blocks = check_blocks(probe_blocks if probe_blocks else default_distill_blocks(t_depth), t_depth,
                            "--probe-blocks") if probe_weight > 0 else []
    net, arch, kwargs = _student(student, model_kwargs, t_info, teacher_net, probe_weight > 0)
    net = net.to(device)
    s_blocks = map_blocks(t_blocks, t_depth, geometry(net)["depth"])

    paths, summary = selected_paths(selection, wild)
    paths = [os.path.join(wild, p) for p in paths]
    if labeled and per_class > 0:
        labeled_ds = labeled_folder(_class_dir(labeled, t_info["classes"], "train"), t_info["classes"], None,
                                    t_info["in_chans"])
        paths += per_class_subset(labeled_ds, per_class, seed)  # used like wild images: teacher-supervised
    train_ds = ImageList(paths, transform=train_transform(t_info, flip), in_chans=t_info["in_chans"])
    test_ds = labeled_folder(_class_dir(test, t_info["classes"], "val"), t_info["classes"], eval_transform(t_info),
                             t_info["in_chans"])
    train_loader = make_loader(train_ds, batch_size, True, workers, seed, drop_last=len(train_ds) > batch_size)
    test_loader = make_loader(test_ds, batch_size, False, workers)

    alpha = teacher_acc if teacher_acc is not None else t_info.get("accuracy")
    if noise_adaptation and not (alpha and 0 < alpha <= 1):
        raise AttnprobeError("the teacher checkpoint has no measured accuracy; pass --teacher-acc (a fraction)")
    noise = NoiseAdaptation(t_info["num_classes"], alpha).to(device) if noise_adaptation else None
    weights = None
    if robust:
        if "class_weights" not in summary:
            raise AttnprobeError(f"--robust needs the class weights in {Path(selection).with_suffix('.json')}; "
                                 "rerun attnprobe select")
        weights = torch.tensor(summary["class_weights"], dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    optimizers = [optimizer] + ([torch.optim.Adam(noise.parameters(), lr=noise_lr)] if noise else [])
    scheduler = lr_schedule(optimizer, schedule, epochs, warmup_epochs)
    info = describe(net, arch, kwargs, t_info["classes"], t_info["mean"], t_info["std"], role="student",
                    teacher=os.path.abspath(teacher), selection=os.path.abspath(selection),
                    teacher_accuracy=t_info.get("accuracy"))
    run = RunDir(out, resume=bool(resume))
    state = {"model": net, "optimizer": optimizer, "scheduler": scheduler}
    if noise:
        state.update(noise=noise, noise_optimizer=optimizers[1])
    start, best = _resume_state(resume, run, state)
    for epoch in range(start, epochs):
        t0 = time.time()
        lr_now = optimizer.param_groups[0]["lr"]
        stats = distill_one_epoch(net, teacher_net, train_loader, optimizers, device, temperature=temperature,
                                  noise=noise, noise_weight=noise_weight, class_weights=weights,
                                  probe_weight=probe_weight, teacher_blocks=t_blocks, student_blocks=s_blocks,
                                  probe_variant=probe_variant, progress=progress)
        scheduler.step()
        acc = evaluate(net, test_loader, device, progress)
        if acc["top1"] > best:
            best = acc["top1"]
            save_checkpoint(run.path / "best.pt", net, {**info, "accuracy": best, "epoch": epoch})
        extra = {"noise": noise.state_dict(), "noise_optimizer": optimizers[1].state_dict()} if noise else {}
        save_checkpoint(run.path / "last.pt", net, {**info, "accuracy": acc["top1"], "epoch": epoch},
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch,
                        best_top1=best, **extra)
        run.log({"epoch": epoch, **stats, "test_top1": acc["top1"], "test_top5": acc["top5"], "lr": lr_now,
                 "seconds": round(time.time() - t0, 3)})
    return {**info, "accuracy": best}


def evaluate_checkpoint(model, data, batch_size: int = 256, workers: int = 2, device: str | None = None,
                        progress: bool = True) -> dict:
    """Top-1/top-5 of a checkpoint on a labeled folder with its classes (or an ImageFolder root's val/)."""
    device = pick_device(device)
    net, info = load_checkpoint(model, device)
    ds = labeled_folder(_class_dir(data, info["classes"], "val"), info["classes"], eval_transform(info),
                        info["in_chans"])
    return evaluate(net, make_loader(ds, batch_size, False, workers), device, progress)
