"""Distillation losses: KD (optionally DFND's robust class weighting), DFND's noise
adaptation, and the paper's probe-distillation loss. Pure functions over logits and
similarity vectors, plus the one module that owns a learnable parameter."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .probe_maps import area_resize, coarser_grid


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
            sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, summed over classes, averaged over the batch.

    `sample_weights` (B,) weights each sample's term (DFND's robust KD: the class weight of the
    teacher's prediction) before the batch mean.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    per_sample = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature ** 2
    if sample_weights is not None:
        per_sample = per_sample * sample_weights
    return per_sample.mean()


class NoiseAdaptation(nn.Module):
    """DFND's label-noise model: the teacher's argmax is the true class with probability `alpha`
    (its accuracy on its original test set) and otherwise another class chosen by a learned
    row-wise softmax. Loss: NLL of log(softmax(student) @ M) against the teacher's argmax."""

    def __init__(self, num_classes: int, alpha: float):
        super().__init__()
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.num_classes, self.alpha = num_classes, float(alpha)
        self.q = nn.Parameter(torch.zeros(num_classes, num_classes - 1))  # zeros: uniform off-diagonal

    def transition_matrix(self) -> torch.Tensor:
        """M (C, C): alpha on the diagonal, softmax(Q_i) * (1 - alpha) off it in row i."""
        C = self.num_classes
        off = self.q.softmax(dim=1) * (1.0 - self.alpha)  # (C, C-1)
        M = torch.full((C, C), self.alpha, device=self.q.device, dtype=off.dtype)
        mask = ~torch.eye(C, dtype=torch.bool, device=self.q.device)
        return M.masked_scatter(mask, off)  # row-major fill skips the diagonal, row by row

    def forward(self, student_logits: torch.Tensor, teacher_pred: torch.Tensor) -> torch.Tensor:
        noisy = student_logits.float().softmax(dim=1) @ self.transition_matrix()
        return F.nll_loss(noisy.clamp_min(1e-12).log(), teacher_pred)


def probe_distill_loss(teacher_maps: list[torch.Tensor], student_maps: list[torch.Tensor]) -> torch.Tensor:
    """Mean squared difference of CLS-to-patch similarity maps over layers, batch and positions.

    Each pair is (B, P) vectors on one token grid, or (B, h, w) maps; maps on different grids are both
    brought to the coarser grid, axis by axis, by area interpolation first (probe_maps.py)."""
    if len(teacher_maps) != len(student_maps):
        raise ValueError("teacher and student must be tapped at the same number of layers")
    terms = []
    for t, s in zip(teacher_maps, student_maps):
        if t.shape != s.shape:
            if t.dim() != 3 or s.dim() != 3:
                raise ValueError(f"similarity vectors of different lengths ({t.shape}, {s.shape}): pass (B, h, w) maps")
            grid = coarser_grid(t.shape[-2:], s.shape[-2:])
            t, s = area_resize(t, grid), area_resize(s, grid)
        terms.append(F.mse_loss(s.float(), t.float()))
    return torch.stack(terms).mean()


def class_weights(prob_sums, num_classes: int) -> list[float]:
    """DFND's class weights: w_c proportional to 1 / (sum of softmax_c over the selected images),
    normalised to sum to the class count."""
    sums = torch.as_tensor(prob_sums, dtype=torch.float64).clamp_min(1e-12)
    inv = 1.0 / sums
    return (inv / inv.sum() * num_classes).tolist()
