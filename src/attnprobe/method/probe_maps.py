"""Probe distillation across token grids and architectures.

The teacher's probe target at block b is its CLS-to-patch cosine map over its h_T x w_T patch grid:
s_T(j) = cos(cls_b, patch_b,j). A student gives the same kind of map:
- a ViT, its CLS-to-patch cosine at the mapped block, on its own patch grid;
- a network without a CLS token (a CNN), at a stage with feature map F (C x h x w), the cosine between its
  pooled feature and each position: s_S(j) = cos(mean_j' F(j'), F(j)).
Two maps on different grids are both brought to the coarser grid, axis by axis, by area interpolation (each
cell the mean of the finer cells it overlaps: adaptive average pooling, as F.interpolate(mode="area")), and
compared by MSE (losses.probe_distill_loss). Averaging down never invents detail that one of the two lacks.

Pure tensor functions for the maps; `ProbeTaps` is the thin layer of forward hooks that keeps their inputs
from one ordinary forward pass; `student_probe_layers` maps a student's layers to the teacher's blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnprobeError
from .probe import cls_patch_similarity, map_blocks


def grid_map(similarity: torch.Tensor, grid) -> torch.Tensor:
    """(B, h*w) CLS-to-patch similarities in token order -> (B, h, w) on the patch grid (row-major, as timm)."""
    h, w = (int(g) for g in grid)
    return similarity.reshape(similarity.shape[0], h, w)


def pooled_cosine_map(features: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h, w): cos(mean over positions of F, F(j)) at each position j, along channels."""
    f = features.float()
    pooled = F.normalize(f.mean(dim=(2, 3), keepdim=True), dim=1)
    return (F.normalize(f, dim=1) * pooled).sum(dim=1)


def coarser_grid(a, b) -> tuple[int, int]:
    """The grid both maps are compared on: the coarser of the two, axis by axis."""
    return min(int(a[0]), int(b[0])), min(int(a[1]), int(b[1]))


def area_resize(maps: torch.Tensor, grid) -> torch.Tensor:
    """(B, h, w) -> (B, *grid) by area interpolation; the same tensor when it is already on the grid."""
    grid = tuple(int(g) for g in grid)
    if tuple(maps.shape[-2:]) == grid:
        return maps
    return F.adaptive_avg_pool2d(maps.unsqueeze(1), grid).squeeze(1)


class ProbeTaps:
    """Forward hooks that keep, for one forward pass, what the probe maps are made of: the outputs of chosen
    blocks of a CLS-token ViT (`layers`: block indices) or of chosen stages of another network (`layers`:
    module names, as timm's feature_info names them). Use as a context manager; `maps()` after a forward."""

    def __init__(self, model: nn.Module, layers=(), variant: str = "cosine"):
        self.model = getattr(model, "module", model)
        self.layers, self.variant = list(layers), variant
        self.outputs: dict = {}
        self._handles = []

    def __enter__(self):
        for layer in dict.fromkeys(self.layers):  # a stage mapped to two teacher blocks is hooked once
            module = self.model.blocks[layer] if isinstance(layer, int) else self.model.get_submodule(layer)
            self._handles.append(module.register_forward_hook(self._keep(layer)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _keep(self, layer):
        def hook(module, args, output):
            self.outputs[layer] = output
        return hook

    def maps(self) -> list[torch.Tensor]:
        """The (B, h, w) probe map of each layer, in `layers` order."""
        return [self.map_of(self.outputs[layer], layer) for layer in self.layers]

    def map_of(self, output: torch.Tensor, layer) -> torch.Tensor:
        if isinstance(layer, int):  # a ViT block: (B, N, C) tokens
            prefix = int(getattr(self.model, "num_prefix_tokens", 1))
            return grid_map(cls_patch_similarity(output, prefix, self.variant), self.model.patch_embed.grid_size)
        if getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # e.g. timm's Swin stages
            output = output.permute(0, 3, 1, 2)
        return pooled_cosine_map(output)

    def clear(self) -> None:
        self.outputs.clear()


def feature_stages(model: nn.Module) -> list[str]:
    """The module names of a timm model's feature stages (what features_only returns), shallow to deep."""
    info = getattr(model, "feature_info", None)
    names = [f.get("module") for f in info] if isinstance(info, list) else []
    if not names or not all(isinstance(n, str) and n for n in names):
        raise AttnprobeError(f"{type(model).__name__} names no feature stages (timm's feature_info), so it has no "
                             "probe map; turn the probe loss off with --probe-weight 0")
    return names


@torch.no_grad()
def stage_grids(model: nn.Module, stages: list[str], input_shape) -> dict[str, tuple[int, int]]:
    """Each stage's spatial grid, from one forward pass of a zero input of `input_shape` (C, H, W) in eval
    mode (BatchNorm statistics untouched); a stage whose output is not a feature map is refused."""
    was_training = model.training
    param = next(model.parameters())
    taps = ProbeTaps(model, stages)
    try:
        with taps:
            model.eval()(torch.zeros(2, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    grids = {}
    for name in stages:
        out = taps.outputs[name]
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise AttnprobeError(f"stage {name} of {type(model).__name__} gives no spatial feature map, so it has no "
                                 "probe map; turn the probe loss off with --probe-weight 0")
        nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        grids[name] = tuple(out.shape[1:3] if nhwc else out.shape[2:4])
    return grids


def student_probe_layers(student: nn.Module, teacher_blocks: list[int], teacher_depth: int, input_shape, *,
                         vit: bool) -> tuple[list, list]:
    """(layers, grids): the student layer matched to each teacher block, and its probe map's grid.

    A CLS-token ViT: blocks mapped in proportion to depth (block 11 of 12 -> block 5 of 6). Another network:
    its feature stages with more than one position (a 1 x 1 map carries no spatial information: its cosine
    to its own mean is 1), mapped to the teacher's blocks in proportion to their count."""
    if vit:
        layers = map_blocks(teacher_blocks, teacher_depth, len(student.blocks))
        return layers, [tuple(student.patch_embed.grid_size)] * len(layers)
    grids = stage_grids(student, feature_stages(student), input_shape)
    spatial = [name for name, (h, w) in grids.items() if h * w > 1]
    if not spatial:
        raise AttnprobeError(f"every feature stage of {type(student).__name__} is 1 x 1 at this input size, so it "
                             "has no probe map; turn the probe loss off with --probe-weight 0")
    layers = [spatial[i] for i in map_blocks(teacher_blocks, teacher_depth, len(spatial))]
    return layers, [grids[name] for name in layers]


# The probe weight when none is given, by kind of student (models.student_kind): "vit" on the teacher's patch grid
# keeps the paper's 0.8. For "vit-other-grid" and "no-cls" (a network without a CLS token) the probe term did not
# help beyond the spread of three seeds on the digits benchmark (`attnprobe demo --students`, README: a ResNet
# -0.6 points, a ViT on a 2x2 grid +0.4), so it is off unless asked for.
DEFAULT_PROBE_WEIGHT = {"vit": 0.8, "vit-other-grid": 0.0, "no-cls": 0.0}
