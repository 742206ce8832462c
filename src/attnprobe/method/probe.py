"""The attention probe and the CLS-to-patch similarity.

Pure tensor functions hold the math; `BlockTaps` is the thin layer of forward hooks
that collects their inputs from one ordinary forward pass of a timm ViT.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnprobeError
from .choices import HEAD_REDUCTIONS



def default_probe_blocks(depth: int) -> list[int]:
    """Blocks at 1/3 and 2/3 of the depth (0-based): 3 and 7 of 12, as the reference."""
    return sorted({max(depth * k // 3 - 1, 0) for k in (1, 2)})


def default_distill_blocks(depth: int) -> list[int]:
    """Block outputs at 1/3, 2/3 and the end of the depth (0-based): 3, 7 and 11 of 12."""
    return sorted({max(depth * k // 3 - 1, 0) for k in (1, 2, 3)})


def map_blocks(blocks: list[int], from_depth: int, to_depth: int) -> list[int]:
    """Map block indices proportionally between depths (block b of 12 -> the same fraction of 6)."""
    return [max(round((b + 1) * to_depth / from_depth) - 1, 0) for b in blocks]


def check_blocks(blocks: list[int], depth: int, flag: str = "--blocks") -> list[int]:
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise AttnprobeError(f"{flag} {bad} past the model's depth {depth}; use block indices 0..{depth - 1}")
    return list(blocks)


def cls_attention(qkv: torch.Tensor, num_heads: int, scale: float,
                  q_norm: nn.Module | None = None, k_norm: nn.Module | None = None) -> torch.Tensor:
    """The CLS row of each head's attention matrix, from a block's qkv projection output.

    qkv: (B, N, 3 * H * D) as produced by timm's `Attention.qkv`. Returns (B, H, N) in float32:
    softmax(q_cls . K^T * scale) over all N tokens. Only the CLS query row is formed, never N x N.
    """
    B, N, _ = qkv.shape
    qkv = qkv.reshape(B, N, 3, num_heads, -1)
    q = qkv[:, :1, 0].transpose(1, 2)  # (B, H, 1, D)
    k = qkv[:, :, 1].transpose(1, 2)   # (B, H, N, D)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    logits = (q.float() * scale) @ k.float().transpose(-2, -1)  # (B, H, 1, N)
    return logits.squeeze(2).softmax(dim=-1)


def uniform_cosine(cls_attn: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Cosine between the probe (CLS attention over patches, not renormalised) and uniform. (B, H, N) -> (B, H).

    cos(p, u) with u constant = sum(p) / (|p| * sqrt(P)). Low means attention is peaked on few patches.
    """
    probe = cls_attn[..., num_prefix_tokens:]
    return probe.sum(-1) / (probe.norm(dim=-1).clamp_min(1e-12) * math.sqrt(probe.shape[-1]))


def reduce_heads(per_head: torch.Tensor, heads: str = "first") -> torch.Tensor:
    """(B, H) -> (B,): head 0 as the reference (`first`), or the mean over heads (`mean`)."""
    if heads == "first":
        return per_head[:, 0]
    if heads == "mean":
        return per_head.mean(dim=1)
    raise AttnprobeError(f"--heads {heads!r} is not one of {HEAD_REDUCTIONS}")


def cls_patch_similarity(tokens: torch.Tensor, num_prefix_tokens: int = 1,
                         variant: str = "cosine") -> torch.Tensor:
    """Similarity of the CLS token to each patch token of a block output. (B, N, C) -> (B, N - prefix).

    `cosine`: true cosine along the channel axis. `reference`: the reference code's variant, which
    L2-normalises along the token axis before the dot product.
    """
    if variant == "cosine":
        x = F.normalize(tokens.float(), dim=-1)
    elif variant == "reference":
        x = F.normalize(tokens.float(), dim=1)
    else:
        raise AttnprobeError(f"probe variant {variant!r} is not one of ('cosine', 'reference')")
    return (x[:, :1] * x[:, num_prefix_tokens:]).sum(-1)


class BlockTaps:
    """Forward hooks that keep, for one forward pass, the qkv projection of chosen blocks (for the probe; the
    block outputs probe distillation compares are kept by probe_maps.ProbeTaps). Use as a context manager."""

    def __init__(self, model: nn.Module, qkv_blocks=()):
        self.model = getattr(model, "module", model)
        self.qkv_blocks = list(qkv_blocks)
        self.qkv: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        blocks = self.model.blocks
        for b in self.qkv_blocks:
            self._handles.append(blocks[b].attn.qkv.register_forward_hook(self._keep(self.qkv, b)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _keep(store, b):
        def hook(module, args, output):
            store[b] = output
        return hook

    def cls_attention(self, b: int) -> torch.Tensor:
        """(B, H, N) CLS row of block b's attention, from the kept qkv."""
        attn = self.model.blocks[b].attn
        return cls_attention(self.qkv[b], attn.num_heads, attn.scale, attn.q_norm, attn.k_norm)

    def probe_cosines(self, b: int) -> torch.Tensor:
        """(B, H) cosine-to-uniform of block b's CLS attention over patches."""
        return uniform_cosine(self.cls_attention(b), getattr(self.model, "num_prefix_tokens", 1))

    def probes(self, heads: str = "first") -> torch.Tensor:
        """(B, len(qkv_blocks)) probe term of each tapped block, heads reduced."""
        return torch.stack([reduce_heads(self.probe_cosines(b), heads) for b in self.qkv_blocks], dim=1)


@torch.no_grad()
def probe_scores(model: nn.Module, images: torch.Tensor, blocks: list[int], heads: str = "first"):
    """One teacher forward -> (logits (B, C), probe (B, len(blocks)) cosine-to-uniform per block)."""
    with BlockTaps(model, qkv_blocks=blocks) as taps:
        logits = model(images)
        return logits, taps.probes(heads)
