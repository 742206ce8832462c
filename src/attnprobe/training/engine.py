"""One epoch of teacher training, one epoch of distillation, evaluation (as DeiT's engine.py), and
fidelity: the student's top-1 agreement with the teacher's predictions, the label-free model selection.

The loops are the same for one process and for many (torchrun + DistributedDataParallel): epoch
statistics and evaluation counts are summed over processes at the end, so every rank returns the
same numbers. Per-step values stay on the device until the end of the epoch (no sync per step).

Unreadable images (data.Unreadable, dropped from their batch by data.collate_robust) never end a loop: the
loops count the readable ones only, and the first time a loader meets a file it cannot read, one line on
stderr names it ("skipped 1 unreadable image: PATH (REASON)"); the same files are skipped silently in
later epochs. A set in which no image at all can be read is an error."""
from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import AttnprobeError
from ..io.datasets import Unreadable
from ..method.losses import NoiseAdaptation, kd_loss, probe_distill_loss
from ..method.probe_maps import ProbeTaps
from .distributed import all_gather_object, all_reduce_sum, is_main


def progress_bar(loader, desc, progress):
    """tqdm over `loader` when `progress` (and a terminal or notebook is there to show it)."""
    return tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress or None)


def _batches(loader, desc, progress, failed: list):
    """(images, targets-or-indices) of each batch with at least one readable image; the Unreadable items
    of collate_robust's batches go to `failed`."""
    for batch in progress_bar(loader, desc, progress):
        if len(batch) == 3 and isinstance(batch[2], list) and batch[2] and isinstance(batch[2][0], Unreadable):
            failed.extend(batch[2])
            if batch[0] is None:
                continue
        yield batch[0], (batch[1] if len(batch) > 1 else None)


def skipped_line(failed: list) -> str:
    """'skipped 1 unreadable image: PATH (REASON)'; with more, the first three and how many more."""
    n = len(failed)
    shown = "; ".join(f"{f.path} ({f.reason})" for f in failed[:3])
    more = f"; and {n - 3} more" if n > 3 else ""
    return f"skipped {n} unreadable image{'s' if n != 1 else ''}: {shown}{more}"


def _report_skipped(loader, failed: list, n_read: int) -> None:
    """Gather the files this loop could not read from every process; print, on the main one, the files
    this loader had not met before (once per run: later epochs meet the same ones); raise if no image at
    all could be read. Every process calls it at the same point (it is a collective under torchrun)."""
    every = [f for part in all_gather_object([(f.path, f.reason) for f in failed]) for f in part]
    if n_read == 0 and every:
        path, reason = every[0]
        raise AttnprobeError(f"none of the {len(every)} images could be read (e.g. {path}: {reason}); "
                             "check the folder's files")
    state = getattr(loader, "__dict__", {})  # a DataLoader keeps what it reported; a plain list of batches cannot
    reported = state.setdefault("_attnprobe_skipped", set())
    new = {p: r for p, r in every if p not in reported}
    if new:
        reported.update(new)
        if is_main():
            print(skipped_line([Unreadable(p, r) for p, r in sorted(new.items())]), file=sys.stderr, flush=True)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


class Mean:
    """Running sample-weighted means of named scalars, kept on the device and summed over processes."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, n: int, **values: torch.Tensor):
        self.n += n
        for k, v in values.items():
            v = v.detach().to(self.dtype) * n
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def result(self) -> dict:
        keys = sorted(self.sums)
        totals = torch.stack([self.sums[k] for k in keys] + [torch.tensor(float(self.n), dtype=self.dtype,
                                                                         device=self.device)])
        totals = all_reduce_sum(totals).tolist()
        self.total = int(totals[-1])
        n = max(totals[-1], 1.0)
        return {k: v / n for k, v in zip(keys, totals[:-1])}


def train_one_epoch(model: nn.Module, loader, optimizer, device, label_smoothing: float = 0.0,
                    progress: bool = True, desc: str = "train") -> dict:
    """Supervised cross-entropy epoch (the teacher, or the labeled-data reference rows)."""
    model.train()
    meter = Mean(device)
    failed = []
    for images, targets in _batches(loader, desc, progress, failed):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), targets, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.add(len(images), train_loss=loss)
    result = meter.result()
    _report_skipped(loader, failed, meter.total)
    return result


class DistillModel(nn.Module):
    """What distillation trains: the student and DFND's noise-adaptation matrix Q, as one module, so
    that DistributedDataParallel averages Q's gradient across processes together with the student's.

    forward(images, teacher_pred) -> (student logits, noise-adaptation NLL or None)."""

    def __init__(self, student: nn.Module, noise: NoiseAdaptation | None = None):
        super().__init__()
        self.student, self.noise = student, noise

    def forward(self, images: torch.Tensor, teacher_pred: torch.Tensor):
        logits = self.student(images)
        return logits, (self.noise(logits, teacher_pred) if self.noise is not None else None)


def distill_one_epoch(model: nn.Module, teacher: nn.Module, loader, optimizers: list, device, *,
                      temperature: float = 4.0, noise_weight: float = 1.0,
                      class_weights: torch.Tensor | None = None, probe_weight: float = 0.8,
                      teacher_blocks=(), student_layers=(), probe_variant: str = "cosine",
                      progress: bool = True, max_batches: int | None = None) -> dict:
    """loss = KD(T) [robust: weighted by the class weight of the teacher's argmax]
            + noise_weight * noise adaptation NLL + probe_weight * probe-distillation MSE.

    The probe term compares the teacher's CLS-to-patch map at each of `teacher_blocks` with the student's map at
    the matching entry of `student_layers` (ViT block indices, or stage module names of a network without a CLS
    token; method/probe_maps.py), on the coarser of their two grids.

    `model`: a DistillModel (student + optional noise adaptation), possibly wrapped in
    DistributedDataParallel. `teacher`: not trained (eval mode, no grad), never wrapped.
    `optimizers`: the student's, and the noise-adaptation matrix's own Adam when it is on. `max_batches`:
    stop after that many steps (the last epoch of a run counted in steps)."""
    model.train()
    teacher.eval()
    student = _unwrap(model).student
    use_probe = probe_weight > 0 and len(teacher_blocks) > 0
    meter = Mean(device)
    failed = []
    # The hooks are registered once for the epoch; each forward overwrites what they keep.
    with ProbeTaps(teacher, teacher_blocks if use_probe else (), probe_variant) as t_taps, \
            ProbeTaps(student, student_layers if use_probe else (), probe_variant) as s_taps:
        # islice stops before fetching the batch past the last step (None: the whole epoch)
        for images, _ in itertools.islice(_batches(loader, "distill", progress, failed), max_batches):
            images = images.to(device, non_blocking=True)
            with torch.no_grad():
                t_logits = teacher(images).float()
                t_maps = t_taps.maps() if use_probe else []
                t_pred = t_logits.argmax(dim=1)
            s_logits, noise_nll = model(images, t_pred)
            s_maps = s_taps.maps() if use_probe else []
            t_taps.clear()
            s_taps.clear()
            weights = class_weights[t_pred] if class_weights is not None else None
            terms = {"kd": kd_loss(s_logits, t_logits, temperature, weights)}
            loss = terms["kd"]
            if noise_nll is not None:
                terms["noise"] = noise_nll
                loss = loss + noise_weight * noise_nll
            if use_probe:
                terms["probe"] = probe_distill_loss(t_maps, s_maps)
                loss = loss + probe_weight * terms["probe"]
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            meter.add(len(images), loss=loss, **terms)
    result = meter.result()
    _report_skipped(loader, failed, meter.total)
    return result


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, progress: bool = True) -> dict:
    """Top-1 and top-5 accuracy (fractions) and the sample count. Top-5 is top-C when C < 5.
    Unreadable images are not counted (n is the number of images measured); they are reported once.

    Under torchrun each process passes its own shard of the test set; the counts are summed over
    processes, so every process returns the result for the whole set."""
    model = _unwrap(model)
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # top-1 hits, top-5 hits, n
    failed = []
    for images, targets in _batches(loader, "eval", progress, failed):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        counts[0] += hits[:, 0].sum()
        counts[1] += hits.any(dim=1).sum()
        counts[2] += len(targets)
    correct1, correct5, n = all_reduce_sum(counts).tolist()
    _report_skipped(loader, failed, n)
    return {"top1": correct1 / max(n, 1), "top5": correct5 / max(n, 1), "n": n}


@torch.no_grad()
def predict(model: nn.Module, loader, device, progress: bool = True) -> torch.Tensor:
    """The model's top-1 class of each image of this process's shard, on the CPU, at the dataset index the
    loader yields with the image (ImageList's (image, index)); -1 at indices outside the shard and at
    unreadable images."""
    model = _unwrap(model)
    model.eval()
    indices, preds, failed = [], [], []
    for images, index in _batches(loader, "predict", progress, failed):
        preds.append(model(images.to(device, non_blocking=True)).argmax(dim=1).cpu())
        indices.append(index)
    read = torch.tensor([sum(len(i) for i in indices)], dtype=torch.int64, device=device)
    _report_skipped(loader, failed, int(all_reduce_sum(read).item()))
    if not indices:
        return torch.empty(0, dtype=torch.long)
    index = torch.cat(indices)
    out = torch.full((int(index.max()) + 1,), -1, dtype=torch.long)
    out[index] = torch.cat(preds)
    return out


@torch.no_grad()
def fidelity(model: nn.Module, loader, teacher_pred: torch.Tensor, device, progress: bool = True) -> dict:
    """Top-1 agreement of the model with the teacher: the fraction of images whose top-1 class is the
    teacher's (`teacher_pred`, from `predict` on the same loader), and the count. No labels are used.

    Sharded as `evaluate`: each process passes its shard and the counts are summed over processes."""
    model = _unwrap(model)
    model.eval()
    teacher_pred = teacher_pred.to(device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # agreements, n
    failed = []
    for images, index in _batches(loader, "fidelity", progress, failed):
        pred = model(images.to(device, non_blocking=True)).argmax(dim=1)
        counts[0] += (pred == teacher_pred[index.to(device)]).sum()
        counts[1] += len(index)
    agree, n = all_reduce_sum(counts).tolist()
    _report_skipped(loader, failed, n)
    return {"fidelity": agree / max(n, 1), "n": n}
