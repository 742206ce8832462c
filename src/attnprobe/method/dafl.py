"""DAFL's generator and losses (Chen et al., ICCV 2019, "Data-Free Learning of Student Networks"): pure
functions of the frozen teacher's outputs on generated images. The command is stages/dafl.py.

Generator loss, from one teacher forward of G(z) (logits and the feature the head reads):
    w_oh * CE(logits, argmax logits)          one-hot: T should be sure of each image
  + w_a  * -mean |feature|                    activation: real images excite T's features strongly
  + w_ie * sum_c pbar_c log10 pbar_c          information entropy (negated): pbar, the batch mean of
                                              softmax(logits), should spread over the classes
For a ViT the feature is the pre-head CLS token (timm: forward_head(forward_features(x), pre_logits=True)).
The generator and log base 10 in the entropy term are DAFL's official code (DAFL/DAFL-train.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Generator(nn.Module):
    """DAFL's generator: latent -> linear -> 128 x (H/4) x (W/4) map -> BatchNorm -> x2 upsample -> conv
    block -> upsample to H x W -> conv block -> tanh -> BatchNorm without affine. The last BatchNorm puts
    each channel at mean 0, std 1 over the batch: images in the teacher's normalised input space, what
    it is fed after its own mean/std. Sides that are not multiples of 4 start at ceil(side / 4)."""

    def __init__(self, *, img_size: int | tuple[int, int], in_chans: int, latent_dim: int = 100, width: int = 128):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.init_size = tuple(math.ceil(s / 4) for s in self.img_size)
        self.width, self.latent_dim = width, latent_dim
        self.project = nn.Linear(latent_dim, width * self.init_size[0] * self.init_size[1])
        self.norm0 = nn.BatchNorm2d(width)
        # eps=0.8 in the middle BatchNorms is DAFL's (a positional 0.8 there is eps, not momentum)
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, eps=0.8),
                                    nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2, eps=0.8),
                                    nn.LeakyReLU(0.2), nn.Conv2d(width // 2, in_chans, 3, padding=1), nn.Tanh(),
                                    nn.BatchNorm2d(in_chans, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(len(z), self.width, *self.init_size)
        x = F.interpolate(self.norm0(x), scale_factor=2)
        x = F.interpolate(self.block1(x), size=self.img_size)
        return self.block2(x)


# ---- the math: pure functions of the teacher's outputs --------------------------------------------------

def one_hot_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits against their own argmax, averaged over the batch."""
    logits = logits.float()
    return F.cross_entropy(logits, logits.argmax(dim=1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """-mean |feature| over batch and channels: lower when the teacher's features respond strongly."""
    return -features.float().abs().mean()


def information_entropy_loss(logits: torch.Tensor, *, base: float = 10.0) -> torch.Tensor:
    """sum_c pbar_c log pbar_c (the negated entropy of pbar, the batch mean of softmax(logits)): lowest,
    -log(C), when the batch covers the C classes evenly. Base 10 as DAFL's code (torch.log10), so that
    w_ie means what its --ie means; base e gives nats."""
    p_mean = logits.float().softmax(dim=1).mean(dim=0)
    return torch.xlogy(p_mean, p_mean).sum() / math.log(base)  # xlogy: 0 log 0 = 0


def generator_loss(logits: torch.Tensor, features: torch.Tensor, *, w_oh: float = 1.0, w_a: float = 0.1,
                   w_ie: float = 5.0) -> dict:
    """DAFL's generator objective and its terms: {"generator", "one_hot", "activation", "entropy"}."""
    terms = {"one_hot": one_hot_loss(logits), "activation": activation_loss(features),
             "entropy": information_entropy_loss(logits)}
    return {"generator": w_oh * terms["one_hot"] + w_a * terms["activation"] + w_ie * terms["entropy"], **terms}


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """How many of the rows have the same argmax in both (a count, to be summed over batches)."""
    return (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).sum()


def teacher_outputs(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pre-head feature) from one pass through the blocks: for a timm ViT the pooled, normed CLS
    token the head reads. Both come from forward_head, so a distilled DeiT's averaged heads are kept."""
    tokens = teacher.forward_features(images)
    return teacher.forward_head(tokens), teacher.forward_head(tokens, pre_logits=True)
