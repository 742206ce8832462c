"""One epoch of teacher training, one epoch of distillation, and evaluation (as DeiT's engine.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .losses import NoiseAdaptation, kd_loss, probe_distill_loss
from .probe import BlockTaps


def _bar(loader, desc, progress):
    return tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress or None)


class _Mean:
    """Running sample-weighted means of named scalars."""

    def __init__(self):
        self.sums, self.n = {}, 0

    def add(self, n: int, **values):
        self.n += n
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n

    def result(self) -> dict:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}


def train_one_epoch(model: nn.Module, loader, optimizer, device, label_smoothing: float = 0.0,
                    progress: bool = True, desc: str = "train") -> dict:
    """Supervised cross-entropy epoch (the teacher, or the labeled-data reference rows)."""
    model.train()
    meter = _Mean()
    for images, targets in _bar(loader, desc, progress):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = F.cross_entropy(model(images), targets, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        meter.add(len(images), train_loss=loss.item())
    return meter.result()


def distill_one_epoch(student: nn.Module, teacher: nn.Module, loader, optimizers: list, device, *,
                      temperature: float = 4.0, noise: NoiseAdaptation | None = None, noise_weight: float = 1.0,
                      class_weights: torch.Tensor | None = None, probe_weight: float = 0.8,
                      teacher_blocks=(), student_blocks=(), probe_variant: str = "cosine",
                      progress: bool = True) -> dict:
    """loss = KD(T) [robust: weighted by the class weight of the teacher's argmax]
            + noise_weight * noise adaptation NLL + probe_weight * probe-distillation MSE.

    `optimizers`: the student's, and the noise-adaptation matrix's own Adam when it is on."""
    student.train()
    teacher.eval()
    use_probe = probe_weight > 0 and len(teacher_blocks) > 0
    meter = _Mean()
    for batch in _bar(loader, "distill", progress):
        images = batch[0].to(device, non_blocking=True)
        with torch.no_grad(), BlockTaps(teacher, output_blocks=teacher_blocks if use_probe else ()) as t_taps:
            t_logits = teacher(images).float()
            t_sims = t_taps.similarities(probe_variant) if use_probe else []
        t_pred = t_logits.argmax(dim=1)
        with BlockTaps(student, output_blocks=student_blocks if use_probe else ()) as s_taps:
            s_logits = student(images)
            s_sims = s_taps.similarities(probe_variant) if use_probe else []
        weights = class_weights[t_pred] if class_weights is not None else None
        terms = {"kd": kd_loss(s_logits, t_logits, temperature, weights)}
        loss = terms["kd"]
        if noise is not None:
            terms["noise"] = noise(s_logits, t_pred)
            loss = loss + noise_weight * terms["noise"]
        if use_probe:
            terms["probe"] = probe_distill_loss(t_sims, s_sims)
            loss = loss + probe_weight * terms["probe"]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        meter.add(len(images), loss=loss.item(), **{k: v.item() for k, v in terms.items()})
    return meter.result()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, progress: bool = True) -> dict:
    """Top-1 and top-5 accuracy (fractions) and the sample count. Top-5 is top-C when C < 5."""
    model.eval()
    correct1 = correct5 = n = 0
    for images, targets in _bar(loader, "eval", progress):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += len(targets)
    return {"top1": correct1 / max(n, 1), "top5": correct5 / max(n, 1), "n": n}
