"""The attention probe against an eager full-attention computation on real timm ViTs."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from attnprobe.method.probe_maps import ProbeTaps
from attnprobe.method.probe import (
    cls_attention,
    cls_patch_similarity,
    default_distill_blocks,
    default_probe_blocks,
    map_blocks,
    probe_scores,
    reduce_heads,
    uniform_cosine,
)


def tiny_vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=4,
                             embed_dim=48, depth=4, num_heads=3, **kw).eval()


def eager_cls_probe_cosine(model, x, block):
    """Full N x N attention of `block` recomputed from its (normed) input; CLS row, patch part, cosine
    to a uniform vector, per head."""
    kept = {}
    blk = model.blocks[block]
    h = blk.norm1.register_forward_hook(lambda m, a, out: kept.__setitem__("x", out))
    model(x)
    h.remove()
    a = blk.attn
    B, N, C = kept["x"].shape
    qkv = a.qkv(kept["x"]).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
    attn = (q @ k.transpose(-2, -1) * a.scale).softmax(-1)  # (B, H, N, N)
    probe = attn[:, :, 0, 1:]
    uniform = torch.full_like(probe, 1.0 / probe.shape[-1])
    return F.cosine_similarity(probe, uniform, dim=-1)  # (B, H)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_probe_matches_eager_attention(qk_norm):
    model = tiny_vit(qk_norm=qk_norm)
    if qk_norm:  # make the norms non-trivial so that skipping them would be caught
        for blk in model.blocks:
            torch.nn.init.normal_(blk.attn.q_norm.weight, 1.0, 0.5)
            torch.nn.init.normal_(blk.attn.k_norm.bias, 0.0, 0.5)
    x = torch.randn(3, 3, 16, 16)
    logits, probes = probe_scores(model, x, [1, 3], heads="first")
    logits_mean, probes_mean = probe_scores(model, x, [1, 3], heads="mean")
    torch.testing.assert_close(logits, model(x))  # the hooks leave the forward unchanged
    for j, b in enumerate([1, 3]):
        eager = eager_cls_probe_cosine(model, x, b)
        torch.testing.assert_close(probes[:, j], eager[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probes_mean[:, j], eager.mean(1), atol=1e-5, rtol=1e-5)
    # heads really differ, so `first` and `mean` are distinguishable
    assert not torch.allclose(probes, probes_mean)


def test_uniform_cosine_by_hand():
    # CLS row over [cls, p1, p2]: patch part (0.2, 0.6) -> cos = 0.8 / (sqrt(0.4) * sqrt(2))
    row = torch.tensor([[[0.2, 0.2, 0.6], [0.0, 0.5, 0.5]]])
    got = uniform_cosine(row)
    torch.testing.assert_close(got, torch.tensor([[0.8 / (math.sqrt(0.4) * math.sqrt(2)), 1.0]]))
    assert reduce_heads(got, "first").item() == pytest.approx(0.8 / (math.sqrt(0.4) * math.sqrt(2)))
    assert reduce_heads(got, "mean").item() == pytest.approx((0.8 / (math.sqrt(0.4) * math.sqrt(2)) + 1) / 2)


def test_cls_attention_is_only_the_cls_row():
    torch.manual_seed(1)
    B, N, H, D = 2, 5, 2, 4
    qkv = torch.randn(B, N, 3 * H * D)
    row = cls_attention(qkv, H, D ** -0.5)
    q, k, _ = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    full = (q @ k.transpose(-2, -1) * D ** -0.5).softmax(-1)
    torch.testing.assert_close(row, full[:, :, 0])
    torch.testing.assert_close(row.sum(-1), torch.ones(B, H))


def test_cls_patch_similarity_cosine_and_reference():
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])  # CLS, two patches
    cos = cls_patch_similarity(tokens)
    torch.testing.assert_close(cos, torch.tensor([[1 / math.sqrt(2), 0.0]]))
    # reference: normalise each channel over tokens; channel 0 norm sqrt(2), channel 1 norm sqrt(5)
    ref = cls_patch_similarity(tokens, variant="reference")
    torch.testing.assert_close(ref, torch.tensor([[1 / 2 + 0.0, 0.0 + 0.0]]))


def test_probe_taps_maps_match_manual_block_outputs():
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    with ProbeTaps(model, [0, 2]) as taps:
        model(x)
        maps = taps.maps()
    grid = tuple(model.patch_embed.grid_size)
    assert all(m.shape == (2, *grid) for m in maps)
    sims = [m.flatten(1) for m in maps]  # row-major over the grid: token order
    t = model.patch_drop(model.norm_pre(model._pos_embed(model.patch_embed(x))))
    outs = []
    for blk in model.blocks:
        t = blk(t)
        outs.append(t)
    for s, b in zip(sims, [0, 2]):
        manual = F.cosine_similarity(outs[b][:, :1], outs[b][:, 1:], dim=-1)
        torch.testing.assert_close(s, manual, atol=1e-5, rtol=1e-5)
    assert not model.blocks[0]._forward_hooks  # hooks removed on exit


def test_default_blocks():
    assert default_probe_blocks(12) == [3, 7]
    assert default_distill_blocks(12) == [3, 7, 11]
    assert default_distill_blocks(6) == [1, 3, 5]
    assert map_blocks([3, 7, 11], 12, 6) == [1, 3, 5]
    assert map_blocks([3, 7, 11], 12, 12) == [3, 7, 11]
