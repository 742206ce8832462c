"""train-teacher: supervised training of a teacher on labeled data, the epoch chosen on a validation split."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Subset

from ..errors import AttnprobeError
from ..io.datasets import labeled_folder, stratified_split
from ..io.folders import class_dir, class_folders, split_dir
from ..io.images import eval_transform, train_transform
from ..models import build_model, default_norm, describe, geometry, resolve_model
from ..training.distributed import init_distributed, is_main, rank
from ..training.engine import train_one_epoch
from ..training.loop import RunDir, batches_per_epoch, ddp, eval_loader, fit, lr_schedule, measure_top1, train_loader
from ..training.resume import recorded_settings, restore_rng, resume_state, seed_everything


def train_teacher(*, data, out, test=None, settings) -> dict:
    """Supervised training on DATA/train (`settings`: a TeacherSettings); best.pt is the epoch with the best
    top-1 on DATA/val, or with val_split (when there is no val/) on that fraction of DATA/train, held out
    per class with the seed. `test`: a labeled folder of the classes measured every epoch (test_top1,
    test_top5) and never used to choose. Returns the chosen epoch's info: accuracy = val_top1 (noise
    adaptation's alpha), test_top1 (or None), best_epoch. cache_images: keep the decoded images in memory
    (small data sets, workers=0).

    Under torchrun each process trains on its shard of DATA/train with batch_size images per step
    (DistributedDataParallel); rank 0 alone writes RUN/."""
    s = settings
    recorded = recorded_settings(s)
    device = init_distributed(s.device)
    progress = s.progress and is_main()
    seed_everything(s.seed)
    train_dir = split_dir(data, "train")
    classes = class_folders(train_dir)
    if not classes:
        raise AttnprobeError(f"{train_dir} has no class folders; expected train/<class>/<image>")
    arch, kwargs = resolve_model(s.model, s.model_kwargs)
    net = build_model(arch, kwargs, len(classes)).to(device)
    in_chans = geometry(net)["in_chans"]
    d_mean, d_std = default_norm(arch, in_chans)
    info = describe(net, arch, kwargs, classes, s.mean or d_mean, s.std or d_std, role="teacher",
                    val_split=s.val_split, settings=recorded)
    train_ds, val_ds = _train_val(data, classes, train_transform(info, s.flip, s.affine), eval_transform(info),
                                  in_chans, s.cache_images, s.val_split, s.seed)
    test_ds = None if test is None else labeled_folder(class_dir(test, classes, "val"), classes, eval_transform(info),
                                                       in_chans, s.cache_images)
    info.update(epochs=s.epochs, steps=s.epochs * batches_per_epoch(len(train_ds), s.batch_size))
    optimizer = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scheduler = lr_schedule(optimizer, s.schedule, s.epochs, s.warmup_epochs)
    run = RunDir(out, resume=bool(s.resume), overwrite=s.overwrite)
    objects = {"model": net, "optimizer": optimizer, "scheduler": scheduler}
    resumed = resume_state(s.resume, run, objects, same={"val_split": (s.val_split, "--val-split")},
                           settings=recorded)
    seed_everything(s.seed + rank())  # the data streams: distinct per process, fixed by the seed
    loader = train_loader(train_ds, s.batch_size, s.workers, s.seed)
    eval_loaders = {"val": eval_loader(val_ds, s.batch_size, s.workers)}
    if test_ds is not None:
        eval_loaders["test"] = eval_loader(test_ds, s.batch_size, s.workers)
    restore_rng(resumed, s.seed, loader.generator)
    model_ddp = ddp(net, device)
    return fit(run, info, objects, resumed, s.epochs, loader,
               lambda: train_one_epoch(model_ddp, loader, optimizer, device, s.label_smoothing, progress),
               lambda: measure_top1(eval_loaders, net, device, progress), "val_top1",
               lambda row: {"accuracy": row.get("val_top1"), "val_top1": row.get("val_top1"),
                            "test_top1": row.get("test_top1"), "selected_on": "val"})


def _train_val(data, classes, train_tf, eval_tf, in_chans: int, cache: bool, val_split, seed: int):
    """(training set, validation set): DATA/train and DATA/val, or with `val_split` a seeded per-class split
    of DATA/train (when there is no val/; the two are not combined)."""
    train_dir, val_dir = split_dir(data, "train"), Path(data) / "val"
    if val_split is None:
        if not val_dir.is_dir():
            raise AttnprobeError(f"{data} has no val/ folder to choose the epoch on; add val/<class>/ or pass "
                                 "--val-split 0.1 to hold out part of train/ (per class)")
        return (labeled_folder(train_dir, classes, train_tf, in_chans, cache),
                labeled_folder(val_dir, classes, eval_tf, in_chans, cache))
    if val_dir.is_dir():
        raise AttnprobeError(f"{data} has a val/ folder and --val-split {val_split} was given; use one or the other")
    train_ds = labeled_folder(train_dir, classes, train_tf, in_chans, cache)
    train_idx, val_idx = stratified_split(train_ds.targets, val_split, seed)
    return Subset(train_ds, train_idx), Subset(labeled_folder(train_dir, classes, eval_tf, in_chans, cache), val_idx)
