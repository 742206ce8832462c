"""Orchestration: train a teacher on labeled data, evaluate a checkpoint, and the run machinery both
training commands share (RUN/best.pt, RUN/last.pt, RUN/metrics.jsonl, resuming, sharded loaders).
Distillation lives in distillation.py; `from attnprobe.train import distill` still works."""
from __future__ import annotations

import json
import math
import numbers
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..errors import AttnprobeError
from ..io.atomic import write_text
from ..io.checkpoints import load_checkpoint, read_checkpoint, save_checkpoint
from ..io.datasets import collate_robust, labeled_folder, make_loader, stratified_split
from ..io.folders import class_folders, split_dir
from ..io.images import eval_transform, train_transform
from ..models import build_model, default_norm, describe, geometry, resolve_model
from .distributed import (
    all_gather_object,
    barrier,
    init_distributed,
    is_main,
    rank,
    world_size,
)
from .engine import evaluate, train_one_epoch

SCHEDULES = ("cosine", "step")


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_schedule(optimizer, schedule: str, epochs: int, warmup_epochs: int = 0, milestones=(200, 300)):
    """Per-epoch LR factor (LambdaLR, stepped once per epoch; `epoch` below is the 0-based index of the
    epoch being trained, as in metrics.jsonl): linear warmup, then cosine to zero, or `step`: x0.1 from
    the epoch numbered `m` counted from 1, for each m in `milestones`. That is the reference's schedule
    (its epochs run 1, 2, ... and it multiplies by 0.1 when epoch >= 200 and >= 300): 0-based epochs
    0..198 train at 1x, 199..298 at 0.1x, 299.. at 0.01x."""
    if schedule not in SCHEDULES:
        raise AttnprobeError(f"--schedule {schedule!r} is not one of {SCHEDULES}")

    def factor(epoch):
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        if schedule == "step":
            return 0.1 ** sum(epoch + 1 >= m for m in milestones)  # epoch + 1: the reference's 1-based count
        t = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
        return 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class RunDir:
    """RUN/: checkpoints and one JSON object per epoch in metrics.jsonl. Only the main process (rank 0)
    writes; on the others every method is a no-op. Checkpoints are written whole or not at all (temp
    file, fsync, rename) and each metrics row is appended with one write of one whole line."""

    def __init__(self, out, resume: bool = False, overwrite: bool = False):
        """A folder that already holds a run (metrics.jsonl, best.pt or last.pt) is refused unless `resume`
        (continue it) or `overwrite` (start over: its metrics and checkpoints are removed here)."""
        from ..io.outputs import RUN_FILES, check_run_folder
        self.path = Path(out)
        self.main = is_main()
        self.metrics = self.path / "metrics.jsonl"
        check_run_folder(self.path, resume=resume, overwrite=overwrite)  # on every rank: all refuse alike
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            if not resume:
                for name in RUN_FILES:
                    (self.path / name).unlink(missing_ok=True)
            for stale in self.path.glob(".*.pt.tmp*"):  # left by a run killed while saving a checkpoint
                stale.unlink(missing_ok=True)

    def log(self, row: dict) -> None:
        if not self.main:
            return
        fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite(self, rows: list[dict]) -> None:
        """Replace metrics.jsonl with these rows (on resume: the epochs the checkpoint has seen)."""
        if self.main:
            write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def save(self, name: str, model, info: dict, **state) -> None:
        if self.main:
            save_checkpoint(self.path / name, model, info, **state)


# ---- resumable state: RNG streams and the training objects -------------------------------------

def rng_state(loader_generator: torch.Generator | None = None) -> dict:
    """This process's random streams: torch (CPU and current GPU), numpy, python, the loader's generator.

    Kept as plain values and tensors so that checkpoints still load with weights_only=True."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state: dict, loader_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])


def recorded_settings(cls, values: dict) -> dict:
    """The settings of `cls` (a settings.py dataclass) that change the training, from `values` (a training
    function's arguments): what a checkpoint records as info["settings"] and a resume must repeat."""
    from dataclasses import fields
    recorded = {f.name: _plain(values[f.name]) for f in fields(cls)
                if not f.metadata.get("runtime") and f.name in values}
    if recorded.get("model_kwargs", {}) is None:  # None and {} both mean: no overrides
        recorded["model_kwargs"] = {}
    return recorded


def _plain(value):
    """Plain Python values, recursively (what a checkpoint's info holds, so that it loads with weights_only,
    and compares): tuples as lists, paths as strings, numpy numbers as int/float."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (bool, str, type(None))):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _setting_text(name: str, value) -> str:
    """A recorded setting as the user wrote it: `--lr 0.001`, `--model-kwargs depth=3`, `noise adaptation off`."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return f"{name.replace('_', ' ')} {'on' if value else 'off'}"
    if value is None:
        return f"no {flag}"
    if isinstance(value, dict):
        return f"{flag} " + (" ".join(f"{k}={v!r}" for k, v in value.items()) or "(none)")
    if isinstance(value, list):
        return f"{flag} " + " ".join(map(str, value))
    return f"{flag} {value}"


def _check_resumed_settings(resume, old: dict, new: dict, done: int) -> None:
    """A resumed run keeps the settings it was started with: any recorded setting that differs is refused,
    naming the setting and its old value. --epochs may change only where the learning rate does not depend
    on it (the step schedule; a cosine schedule is laid out over the run's epochs, so extending a finished
    cosine run would restart from lr 0), and never to no more than the epochs already trained."""
    for name, now in new.items():
        if name == "epochs" or name not in old or _plain(old[name]) == _plain(now):
            continue
        raise AttnprobeError(f"{resume} was run with {_setting_text(name, old[name])}, this run has "
                             f"{_setting_text(name, now)}; a resumed run keeps its settings: pass the same ones, "
                             "or start a new run in another --out")
    before, epochs = old.get("epochs"), new.get("epochs")
    if before is None or epochs is None or before == epochs:
        return
    if new.get("schedule", "cosine") == "cosine":
        raise AttnprobeError(f"{resume} is a {before}-epoch run whose cosine schedule ends at epoch {before}: "
                             f"--epochs must stay {before} on resume; to train longer, start a new run in another "
                             "--out with more --epochs (or --schedule step, which does not depend on --epochs)")
    if epochs <= done:
        raise AttnprobeError(f"{resume} has already trained {done + 1} epochs; --epochs {epochs} leaves none to "
                             f"train: pass more than {done + 1}, or {before} as the run was started")


def _resume_state(resume, run: RunDir, objects: dict, same: dict | None = None, settings: dict | None = None) -> dict:
    """Restore model/optimizer/scheduler/noise state from RUN/last.pt into `objects` and put back
    metrics.jsonl as the checkpoint saw it (each finished epoch once). `same`: settings (info keys) that
    must not change on resume, as {key: (value now, the flag that sets it)}; checkpoints without a key pass.
    `settings` (recorded_settings): compared with the ones the checkpoint records (info["settings"]), see
    _check_resumed_settings; checkpoints from before settings were recorded are compared on `same` alone.

    Returns {"start": next epoch, "history": metrics rows, "rng": per-rank RNG states or None}; a fresh
    run when `resume` is falsy. The best epoch so far is found again in the history (see _best_row)."""
    if not resume:
        return {"start": 0, "history": [], "rng": None}
    ckpt = read_checkpoint(resume)
    old_settings = ckpt.get("info", {}).get("settings")
    if (settings is not None and isinstance(old_settings, dict) and isinstance(ckpt.get("epoch"), int)
            and (set(old_settings) <= set(settings) or set(settings) <= set(old_settings))):
        # the same kind of run, perhaps of a version with fewer settings (a teacher's last.pt is refused below)
        _check_resumed_settings(resume, old_settings, settings, ckpt["epoch"])
    for name, obj in objects.items():
        if name not in ckpt or "epoch" not in ckpt:
            raise AttnprobeError(f"{resume} has no {name} state to resume from; pass the last.pt of the same kind "
                                 "of run")
        try:
            getattr(obj, "module", obj).load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AttnprobeError(f"{resume}: its {name} state does not fit this run ({first}); resume with the "
                                 "same model and options as the stopped run") from None
    for key, (now, flag) in (same or {}).items():
        before = ckpt.get("info", {}).get(key)
        if before is not None and before != now:
            if key.endswith("sha256"):  # a file's identity: the start of the hash is enough to tell them apart
                before, now = f"sha256 {before[:12]}...", f"sha256 {str(now)[:12]}..."
            raise AttnprobeError(f"{resume} was run with {flag} {before}, this run has {now}; resume with the "
                                 "same setting")
    done = ckpt["epoch"]
    if "metrics" in ckpt:
        history = [dict(r) for r in ckpt["metrics"] if r["epoch"] <= done]
    else:  # checkpoints from before the history was stored: keep the file's rows up to the checkpoint
        history = []
        if run.metrics.exists():
            for line in run.metrics.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line
                if row.get("epoch", done + 1) <= done:
                    history.append(row)
    run.rewrite(history)
    return {"start": done + 1, "history": history, "rng": ckpt.get("rng")}


def _restore_rng(resumed: dict, seed: int, loader_generator: torch.Generator) -> None:
    """Continue the random streams of the stopped run; if it ran with another number of processes,
    reseed from (seed, epoch, rank) instead (the data order then differs from an uninterrupted run)."""
    rngs = resumed["rng"]
    if rngs is not None and len(rngs) == world_size():
        set_rng_state(rngs[rank()], loader_generator)
    elif resumed["start"] > 0:
        if is_main():
            warnings.warn("the resumed run used another number of processes (or stored no random state): "
                          "reseeding, so data order and augmentation differ from an uninterrupted run")
        s = seed + 1_000_003 * resumed["start"] + rank()
        seed_everything(s)
        loader_generator.manual_seed(s)


def _checkpoint_state(resumed: dict, epoch: int, best: dict, criterion: str, loader_generator,
                      objects: dict) -> dict:
    """Everything last.pt needs to continue the run: gathers the RNG states of every process. The best
    epoch so far is recorded for reading (best_on, best_score, best_epoch); a resumed run finds it again
    in the metrics rows, on the criterion it runs with."""
    rngs = all_gather_object(rng_state(loader_generator))
    return {**{name: getattr(obj, "module", obj).state_dict() for name, obj in objects.items() if name != "model"},
            "epoch": epoch, "best_on": criterion, "best_score": best[criterion], "best_epoch": best["epoch"],
            "metrics": resumed["history"], "rng": rngs}


# ---- loaders: one process or a shard per process -----------------------------------------------

def _train_loader(dataset, batch_size: int, workers: int, seed: int):
    """Shuffled training batches of this process's shard (DistributedSampler with world size 1 in a single
    process), so the order is a function of (seed, epoch, rank) alone. Workers are not persistent: each
    epoch draws their seeds from the loader's generator, which a checkpoint saves, so that a resumed run
    augments exactly as an uninterrupted one."""
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
    generator = torch.Generator().manual_seed(seed + rank())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=_drops_last(len(sampler), batch_size), pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, generator=generator, collate_fn=collate_robust)


def _drops_last(per_process: int, batch_size: int) -> bool:
    return per_process > batch_size  # a short last batch is dropped unless it is the only one


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps per epoch of _train_loader over n images, on each process (DistributedSampler pads
    the shards to equal length)."""
    per_process = -(-n // world_size())
    return per_process // batch_size if _drops_last(per_process, batch_size) else 1


def _eval_loader(dataset, batch_size: int, workers: int):
    """This process's shard of an evaluation set: images rank, rank + world, ... (no padding, so that the
    counts summed over processes cover each image exactly once)."""
    if world_size() > 1:
        dataset = Subset(dataset, range(rank(), len(dataset), world_size()))
    return make_loader(dataset, batch_size, False, workers)


def _ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `module` under torchrun; the module itself in a single process."""
    if world_size() == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def _best_row(rows: list[dict], criterion: str) -> dict | None:
    """The metrics row of the epoch best.pt holds: the first with the highest `criterion` (a later epoch
    must beat it); rows without the criterion (a run resumed on another one) do not count."""
    best = None
    for row in rows:
        if row.get(criterion) is not None and (best is None or row[criterion] > best[criterion]):
            best = row
    return best


def _measure_top1(loaders: dict, net, device, progress: bool) -> dict:
    """`<split>_top1`, `<split>_top5`, `<split>_n` of each labeled evaluation loader ({split: loader})."""
    row = {}
    for split, loader in loaders.items():
        acc = evaluate(net, loader, device, progress)
        row.update({f"{split}_top1": acc["top1"], f"{split}_top5": acc["top5"], f"{split}_n": acc["n"]})
    return row


def _fit(run: "RunDir", info: dict, objects: dict, resumed: dict, epochs: int, train_loader, one_epoch, measure,
         criterion: str, chosen) -> dict:
    """The epochs left: train (`one_epoch()`), step the schedule, measure (`measure()`: the metrics of the
    row), keep best.pt (the epoch with the highest row[criterion]) and last.pt, log the metrics row.
    `chosen(row)`: the info fields a checkpoint of that epoch records. Returns the info of the best epoch."""
    net, optimizer, scheduler = objects["model"], objects["optimizer"], objects["scheduler"]
    best = _best_row(resumed["history"], criterion)
    for epoch in range(resumed["start"], epochs):
        t0 = time.time()
        lr_now = optimizer.param_groups[0]["lr"]
        train_loader.sampler.set_epoch(epoch)
        stats = one_epoch()
        scheduler.step()
        row = {"epoch": epoch, **stats, **measure(), "lr": lr_now, "seconds": round(time.time() - t0, 3)}
        if best is None or row[criterion] > best[criterion]:
            best = row
            run.save("best.pt", net, {**info, **chosen(row), "epoch": epoch, "best_epoch": epoch})
        resumed["history"].append(row)
        run.save("last.pt", net, {**info, **chosen(row), "epoch": epoch, "best_epoch": best["epoch"]},
                 **_checkpoint_state(resumed, epoch, best, criterion, train_loader.generator, objects))
        run.log(row)
        if is_main():  # one line per epoch, with or without progress bars (as timm and DeiT)
            print(epoch_line(row, epochs, best is row), file=sys.stderr, flush=True)
    barrier()
    if best is None:  # no epoch was run
        return {**info, **chosen({}), "epoch": None, "best_epoch": None}
    return {**info, **chosen(best), "epoch": best["epoch"], "best_epoch": best["epoch"]}


_LOSSES = (("train_loss", "loss"), ("loss", "loss"), ("kd", "kd"), ("noise", "noise"), ("probe", "probe"))
_SCORES = (("fidelity", "fidelity"), ("val_top1", "val top-1"), ("test_top1", "test top-1"))


def epoch_line(row: dict, epochs: int, best: bool = False) -> str:
    """e.g. `epoch 3/10  loss 1.2340  kd 0.5012  fidelity 0.9120  test top-1 0.8500  lr 1.20e-04  12.3 s  -> best.pt`"""
    parts = [f"epoch {row['epoch'] + 1}/{epochs}"]
    parts += [f"{label} {row[key]:.4f}" for key, label in _LOSSES + _SCORES if row.get(key) is not None]
    parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f} s"]
    return "  ".join(parts) + ("  -> best.pt" if best else "")


def train_teacher(data, *, out, test=None, model: str = "ap_digits_teacher", model_kwargs: dict | None = None,
                  epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
                  schedule: str = "cosine", warmup_epochs: int = 0, label_smoothing: float = 0.0,
                  flip: bool = True, affine: bool = False, mean=None, std=None, workers: int = 2,
                  device: str | None = None, seed: int = 0, resume=None, progress: bool = True,
                  cache_images: bool = False, val_split: float | None = None, overwrite: bool = False) -> dict:
    """Supervised training on DATA/train; best.pt is the epoch with the best top-1 on DATA/val, or with
    `val_split` (when there is no val/) on that fraction of DATA/train, held out per class with `seed`.
    `test`: a labeled folder of the classes measured every epoch (test_top1, test_top5) and never used to
    choose. Returns the chosen epoch's info: accuracy = val_top1 (noise adaptation's alpha), test_top1 (or
    None), best_epoch. `cache_images`: keep the decoded images in memory (small data sets, workers=0).

    Under torchrun each process trains on its shard of DATA/train with `batch_size` images per step
    (DistributedDataParallel); rank 0 alone writes RUN/."""
    from ..settings import TeacherSettings
    settings = recorded_settings(TeacherSettings, dict(locals()))  # the arguments, before any is reassigned
    device = init_distributed(device)
    progress = progress and is_main()
    seed_everything(seed)
    train_dir = split_dir(data, "train")
    classes = class_folders(train_dir)
    if not classes:
        raise AttnprobeError(f"{train_dir} has no class folders; expected train/<class>/<image>")
    arch, kwargs = resolve_model(model, model_kwargs)
    net = build_model(arch, kwargs, len(classes)).to(device)
    in_chans = geometry(net)["in_chans"]
    d_mean, d_std = default_norm(arch, in_chans)
    info = describe(net, arch, kwargs, classes, mean or d_mean, std or d_std, role="teacher", val_split=val_split,
                    settings=settings)
    train_ds, val_ds = _train_val(data, classes, train_transform(info, flip, affine), eval_transform(info), in_chans,
                                  cache_images, val_split, seed)
    test_ds = None if test is None else labeled_folder(_class_dir(test, classes, "val"), classes, eval_transform(info),
                                                       in_chans, cache_images)
    info.update(epochs=epochs, steps=epochs * batches_per_epoch(len(train_ds), batch_size))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = lr_schedule(optimizer, schedule, epochs, warmup_epochs)
    run = RunDir(out, resume=bool(resume), overwrite=overwrite)
    objects = {"model": net, "optimizer": optimizer, "scheduler": scheduler}
    resumed = _resume_state(resume, run, objects, same={"val_split": (val_split, "--val-split")}, settings=settings)
    seed_everything(seed + rank())  # the data streams: distinct per process, fixed by the seed
    train_loader = _train_loader(train_ds, batch_size, workers, seed)
    eval_loaders = {"val": _eval_loader(val_ds, batch_size, workers)}
    if test_ds is not None:
        eval_loaders["test"] = _eval_loader(test_ds, batch_size, workers)
    _restore_rng(resumed, seed, train_loader.generator)
    model_ddp = _ddp(net, device)
    return _fit(run, info, objects, resumed, epochs, train_loader,
                lambda: train_one_epoch(model_ddp, train_loader, optimizer, device, label_smoothing, progress),
                lambda: _measure_top1(eval_loaders, net, device, progress), "val_top1",
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


def _class_dir(path, classes, split: str) -> Path:
    """A folder of class folders, or an ImageFolder root whose `split`/ is one."""
    path = Path(path)
    if path.is_dir() and not {d.name for d in path.iterdir() if d.is_dir()} & set(classes) and (path / split).is_dir():
        return path / split
    return path


def evaluate_checkpoint(model, data, batch_size: int = 256, workers: int = 2, device: str | None = None,
                        progress: bool = True) -> dict:
    """Top-1/top-5 of a checkpoint on a labeled folder with its classes (or an ImageFolder root's val/).

    Images of another size or colour mode than the model's are resized and converted to its geometry.
    Under torchrun the folder is sharded over the processes and the counts summed."""
    device = init_distributed(device)
    net, info = load_checkpoint(model, device)
    return evaluate_model(net, info, data, batch_size=batch_size, workers=workers, device=device, progress=progress)


def evaluate_model(net, info: dict, data, *, batch_size: int = 256, workers: int = 2, device=None,
                   progress: bool = True) -> dict:
    """Top-1/top-5 of a model described by `info` on a labeled folder of its classes (see evaluate_checkpoint)."""
    device = device or pick_device()
    ds = labeled_folder(_class_dir(data, info["classes"], "val"), info["classes"], eval_transform(info),
                        info["in_chans"])
    return evaluate(net.to(device), _eval_loader(ds, batch_size, workers), device, progress and is_main())
