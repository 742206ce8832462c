"""The run machinery every training command shares: RUN/ (best.pt, last.pt, metrics.jsonl), the learning-rate
schedule, sharded loaders, and `fit`, the epochs with their checkpoints. Resuming is resume.py; the
commands are stages/train_teacher.py, stages/distill.py and stages/dafl.py."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from ..errors import AttnprobeError
from ..method.choices import SCHEDULES
from ..io.atomic import remove_stale, write_text
from ..io.checkpoints import save_checkpoint
from ..io.datasets import collate_robust, make_loader
from ..io.outputs import RUN_FILES, check_run_folder
from .distributed import barrier, is_main, rank, world_size
from .engine import evaluate
from .resume import checkpoint_state
from .threads import use_fair_threads


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


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
        self.path = Path(out)
        self.main = is_main()
        self.metrics = self.path / "metrics.jsonl"
        check_run_folder(self.path, resume=resume, overwrite=overwrite)  # on every rank: all refuse alike
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            if not resume:
                for name in RUN_FILES:
                    (self.path / name).unlink(missing_ok=True)
            for name in RUN_FILES:  # what a run killed while saving left beside its files
                remove_stale(self.path / name)

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


# ---- loaders: one process or a shard per process -----------------------------------------------

def train_loader(dataset, batch_size: int, workers: int, seed: int):
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
    """Optimizer steps per epoch of train_loader over n images, on each process (DistributedSampler pads
    the shards to equal length)."""
    per_process = -(-n // world_size())
    return per_process // batch_size if _drops_last(per_process, batch_size) else 1


def eval_loader(dataset, batch_size: int, workers: int):
    """This process's shard of an evaluation set: images rank, rank + world, ... (no padding, so that the
    counts summed over processes cover each image exactly once)."""
    if world_size() > 1:
        dataset = Subset(dataset, range(rank(), len(dataset), world_size()))
    return make_loader(dataset, batch_size, False, workers)


def ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `module` under torchrun; the module itself in a single process."""
    if world_size() == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def best_row(rows: list[dict], criterion: str) -> dict | None:
    """The metrics row of the epoch best.pt holds: the first with the highest `criterion` (a later epoch
    must beat it); rows without the criterion (a run resumed on another one) do not count."""
    best = None
    for row in rows:
        if row.get(criterion) is not None and (best is None or row[criterion] > best[criterion]):
            best = row
    return best


def measure_top1(loaders: dict, net, device, progress: bool) -> dict:
    """`<split>_top1`, `<split>_top5`, `<split>_n` of each labeled evaluation loader ({split: loader})."""
    row = {}
    for split, loader in loaders.items():
        acc = evaluate(net, loader, device, progress)
        row.update({f"{split}_top1": acc["top1"], f"{split}_top5": acc["top5"], f"{split}_n": acc["n"]})
    return row


def fit(run: "RunDir", info: dict, objects: dict, resumed: dict, epochs: int, train_loader, one_epoch, measure,
         criterion: str, chosen) -> dict:
    """The epochs left: train (`one_epoch()`), step the schedule, measure (`measure()`: the metrics of the
    row), keep best.pt (the epoch with the highest row[criterion]) and last.pt, log the metrics row.
    `chosen(row)`: the info fields a checkpoint of that epoch records. Returns the info of the best epoch."""
    net, optimizer, scheduler = objects["model"], objects["optimizer"], objects["scheduler"]
    # this process's share of the cores (threads.py); a resumed run keeps the count it started with
    use_fair_threads(next(iter(net.parameters())).device, keep=resumed.get("threads"))
    best = best_row(resumed["history"], criterion)
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
                 **checkpoint_state(resumed, epoch, best, criterion, train_loader.generator, objects))
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
