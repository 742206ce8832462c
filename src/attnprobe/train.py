"""Orchestration: train a teacher on labeled data, distill a student from it on selected wild
images, evaluate a checkpoint. Each writes RUN/best.pt, RUN/last.pt and RUN/metrics.jsonl."""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, Subset

from .data import (RESIZE_MODES, ImageList, eval_transform, labeled_folder, make_loader, per_class_subset,
                   split_dir, train_transform)
from .distributed import all_gather_object, barrier, init_distributed, is_main, rank, world_size
from .engine import DistillModel, distill_one_epoch, evaluate, train_one_epoch
from .errors import AttnprobeError
from .losses import NoiseAdaptation
from .models import (atomic_write_text, build_model, default_norm, describe, geometry, load_checkpoint,
                     read_checkpoint, resolve_model, save_checkpoint)
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

    def __init__(self, out, resume: bool = False):
        self.path = Path(out)
        self.main = is_main()
        self.metrics = self.path / "metrics.jsonl"
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            if not resume and self.metrics.exists():
                self.metrics.unlink()
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
            atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

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


def _resume_state(resume, run: RunDir, objects: dict) -> dict:
    """Restore model/optimizer/scheduler/noise state from RUN/last.pt into `objects` and put back
    metrics.jsonl as the checkpoint saw it (each finished epoch once).

    Returns {"start": next epoch, "best": best score so far, "history": metrics rows, "rng": per-rank
    RNG states or None}; a fresh run when `resume` is falsy."""
    if not resume:
        return {"start": 0, "best": -1.0, "history": [], "rng": None}
    ckpt = read_checkpoint(resume)
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
    return {"start": done + 1, "best": ckpt["best_top1"], "history": history, "rng": ckpt.get("rng")}


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


def _checkpoint_state(resumed: dict, epoch: int, best: float, loader_generator, objects: dict) -> dict:
    """Everything last.pt needs to continue the run: gathers the RNG states of every process."""
    rngs = all_gather_object(rng_state(loader_generator))
    return {**{name: getattr(obj, "module", obj).state_dict() for name, obj in objects.items() if name != "model"},
            "epoch": epoch, "best_top1": best, "metrics": resumed["history"], "rng": rngs}


# ---- loaders: one process or a shard per process -----------------------------------------------

def _train_loader(dataset, batch_size: int, workers: int, seed: int):
    """Shuffled training batches of this process's shard (DistributedSampler with world size 1 in a single
    process), so the order is a function of (seed, epoch, rank) alone. Workers are not persistent: each
    epoch draws their seeds from the loader's generator, which a checkpoint saves, so that a resumed run
    augments exactly as an uninterrupted one."""
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
    generator = torch.Generator().manual_seed(seed + rank())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=len(sampler) > batch_size, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, generator=generator)


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


def _fit(run: "RunDir", info: dict, objects: dict, resumed: dict, epochs: int, train_loader, eval_loader, device,
         progress: bool, split: str, one_epoch) -> float:
    """The epochs left: train (`one_epoch()`), step the schedule, evaluate, keep best.pt and last.pt, log a
    metrics row (`<split>_top1`, ...). Returns the best top-1."""
    net, optimizer, scheduler = objects["model"], objects["optimizer"], objects["scheduler"]
    best = resumed["best"]
    for epoch in range(resumed["start"], epochs):
        t0 = time.time()
        lr_now = optimizer.param_groups[0]["lr"]
        train_loader.sampler.set_epoch(epoch)
        stats = one_epoch()
        scheduler.step()
        acc = evaluate(net, eval_loader, device, progress)
        if acc["top1"] > best:
            best = acc["top1"]
            run.save("best.pt", net, {**info, "accuracy": best, "epoch": epoch})
        row = {"epoch": epoch, **stats, f"{split}_top1": acc["top1"], f"{split}_top5": acc["top5"],
               f"{split}_n": acc["n"], "lr": lr_now, "seconds": round(time.time() - t0, 3)}
        resumed["history"].append(row)
        run.save("last.pt", net, {**info, "accuracy": acc["top1"], "epoch": epoch},
                 **_checkpoint_state(resumed, epoch, best, train_loader.generator, objects))
        run.log(row)
    barrier()
    return best


def train_teacher(data, model: str = "ap_digits_teacher", model_kwargs: dict | None = None, epochs: int = 10,
                  out="runs/teacher", batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
                  schedule: str = "cosine", warmup_epochs: int = 0, label_smoothing: float = 0.0,
                  flip: bool = True, affine: bool = False, mean=None, std=None, workers: int = 2,
                  device: str | None = None, seed: int = 0, resume=None, progress: bool = True,
                  cache_images: bool = False) -> dict:
    """Supervised training on DATA/train, evaluated on DATA/val every epoch. Returns the best info.
    `cache_images`: keep the decoded images in memory after the first epoch (small data sets, workers=0).

    Under torchrun each process trains on its shard of DATA/train with `batch_size` images per step
    (DistributedDataParallel); rank 0 alone writes RUN/."""
    device = init_distributed(device)
    progress = progress and is_main()
    seed_everything(seed)
    train_dir, val_dir = split_dir(data, "train"), split_dir(data, "val")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise AttnprobeError(f"{train_dir} has no class folders; expected train/<class>/<image>")
    arch, kwargs = resolve_model(model, model_kwargs)
    net = build_model(arch, kwargs, len(classes)).to(device)
    in_chans = geometry(net)["in_chans"]
    d_mean, d_std = default_norm(arch, in_chans)
    info = describe(net, arch, kwargs, classes, mean or d_mean, std or d_std, role="teacher")
    train_ds = labeled_folder(train_dir, classes, train_transform(info, flip, affine), in_chans, cache_images)
    val_ds = labeled_folder(val_dir, classes, eval_transform(info), in_chans, cache_images)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = lr_schedule(optimizer, schedule, epochs, warmup_epochs)
    run = RunDir(out, resume=bool(resume))
    objects = {"model": net, "optimizer": optimizer, "scheduler": scheduler}
    resumed = _resume_state(resume, run, objects)
    seed_everything(seed + rank())  # the data streams: distinct per process, fixed by the seed
    train_loader = _train_loader(train_ds, batch_size, workers, seed)
    val_loader = _eval_loader(val_ds, batch_size, workers)
    _restore_rng(resumed, seed, train_loader.generator)
    model_ddp = _ddp(net, device)
    best = _fit(run, info, objects, resumed, epochs, train_loader, val_loader, device, progress, "val",
                lambda: train_one_epoch(model_ddp, train_loader, optimizer, device, label_smoothing, progress))
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
    # Each model's CLS token is compared with its own patch tokens, so the prefix tokens may differ (a
    # distilled DeiT teacher has two); the patch grids must match token for token.
    if probe_on and s_geo["grid_size"] != t_geo["grid_size"]:
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
            seed: int = 0, resume=None, progress: bool = True, cache_images: bool = False, *,
            resize: str = "crop") -> dict:
    """Train a student from scratch on the selected wild images with the teacher as the only supervision.

    `resize`: how a wild image is brought to the teacher's input before the augmentation: `crop`
    (shorter side, centre crop) or `stretch` (the whole image to the square input, as the reference).
    The labeled images (the mixed-in `per_class` ones and the test set) are always cropped.

    Under torchrun each process distills on its shard of the selection with `batch_size` images per step;
    the student and the noise-adaptation matrix are trained as one DistributedDataParallel module, the
    teacher runs unwrapped on each process, and rank 0 alone writes RUN/."""
    if resize not in RESIZE_MODES:
        raise AttnprobeError(f"--resize {resize!r} is not one of {RESIZE_MODES}")
    device = init_distributed(device)
    progress = progress and is_main()
    seed_everything(seed)
    teacher_net, t_info = load_checkpoint(teacher, device)
    teacher_net.eval().requires_grad_(False)
    t_depth = geometry(teacher_net)["depth"]
    t_blocks = check_blocks(probe_blocks if probe_blocks else default_distill_blocks(t_depth), t_depth,
                            "--probe-blocks") if probe_weight > 0 else []
    net, arch, kwargs = _student(student, model_kwargs, t_info, teacher_net, probe_weight > 0)
    net = net.to(device)
    s_blocks = map_blocks(t_blocks, t_depth, geometry(net)["depth"])

    paths, summary = selected_paths(selection, wild)
    paths = [os.path.join(wild, p) for p in paths]
    train_ds = ImageList(paths, transform=train_transform(t_info, flip, resize=resize), in_chans=t_info["in_chans"],
                         cache=cache_images)
    if labeled and per_class > 0:
        labeled_ds = labeled_folder(_class_dir(labeled, t_info["classes"], "train"), t_info["classes"], None,
                                    t_info["in_chans"])
        # used like wild images (teacher-supervised, same augmentation), but always cropped, not stretched
        mixed = ImageList(per_class_subset(labeled_ds, per_class, seed), transform=train_transform(t_info, flip),
                          in_chans=t_info["in_chans"], cache=cache_images)
        train_ds = ConcatDataset([train_ds, mixed])
    # Test images of another size or colour mode are resized and converted to the teacher's geometry.
    test_ds = labeled_folder(_class_dir(test, t_info["classes"], "val"), t_info["classes"], eval_transform(t_info),
                             t_info["in_chans"], cache_images)

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
                    teacher_accuracy=t_info.get("accuracy"), resize=resize)
    run = RunDir(out, resume=bool(resume))
    objects = {"model": net, "optimizer": optimizer, "scheduler": scheduler}
    if noise:
        objects.update(noise=noise, noise_optimizer=optimizers[1])
    resumed = _resume_state(resume, run, objects)
    seed_everything(seed + rank())  # the data streams: distinct per process, fixed by the seed
    train_loader = _train_loader(train_ds, batch_size, workers, seed)
    test_loader = _eval_loader(test_ds, batch_size, workers)
    _restore_rng(resumed, seed, train_loader.generator)
    model = _ddp(DistillModel(net, noise), device)
    best = _fit(run, info, objects, resumed, epochs, train_loader, test_loader, device, progress, "test",
                lambda: distill_one_epoch(model, teacher_net, train_loader, optimizers, device,
                                          temperature=temperature, noise_weight=noise_weight, class_weights=weights,
                                          probe_weight=probe_weight, teacher_blocks=t_blocks,
                                          student_blocks=s_blocks, probe_variant=probe_variant, progress=progress))
    return {**info, "accuracy": best}


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
