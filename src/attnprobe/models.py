"""Named model presets, and building a checked timm model from a name and its constructor arguments.

A teacher is a timm VisionTransformer with a CLS token (the probe reads its attention). A student is any timm
image classifier: a ViT on the teacher's patch grid or another, or a network without a CLS token (a ResNet, a
MobileNet, a ConvNeXt). A checkpoint carries the architecture, its constructor arguments, the class names, the
input geometry and the normalisation, so that no later command has to be told them again.
"""
from __future__ import annotations

import ast
import math

import timm
import torch
from torch import nn

from .errors import AttnprobeError, first_line

# The paper's sizes at 32x32 with 4x4 patches (65 tokens) and their 28x28 one-channel
# variants (50 tokens). Each is a timm architecture plus constructor overrides.
_VIT_32 = dict(img_size=32, patch_size=4, in_chans=3)
_VIT_28 = dict(img_size=28, patch_size=4, in_chans=1)
_TEACHER = dict(embed_dim=384, depth=12, num_heads=3)
_STUDENT = dict(embed_dim=128, depth=12, num_heads=2)
PRESETS: dict[str, tuple[str, dict]] = {
    "ap_teacher_32": ("vit_small_patch16_224", {**_VIT_32, **_TEACHER}),
    "ap_student_32": ("vit_tiny_patch16_224", {**_VIT_32, **_STUDENT}),
    "ap_teacher_28": ("vit_small_patch16_224", {**_VIT_28, **_TEACHER}),
    "ap_student_28": ("vit_tiny_patch16_224", {**_VIT_28, **_STUDENT}),
    # Small enough to train on two CPU cores in minutes (the digits demo).
    "ap_digits_teacher": ("vit_tiny_patch16_224", {**_VIT_28, "embed_dim": 64, "depth": 4, "num_heads": 2}),
    "ap_digits_student": ("vit_tiny_patch16_224", {**_VIT_28, "embed_dim": 24, "depth": 4, "num_heads": 2, "mlp_ratio": 2.0}),
    # A ResNet for 28-px digits (the demo's CNN student): one block per stage and narrow stages; its 3-conv stem
    # and max-pool leave 7 x 7 positions to the first stage, 4 x 4 and 2 x 2 to the next two.
    "ap_digits_resnet": ("resnet18", {"layers": (1, 1, 1, 1), "channels": (16, 32, 48, 64), "stem_type": "deep",
                                      "stem_width": 8}),
}


def parse_model_kwargs(pairs: list[str] | None) -> dict:
    """`key=value` strings to a dict, values read as Python literals (as timm's train.py)."""
    kwargs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AttnprobeError(f"--model-kwargs: {pair!r} is not key=value; write e.g. embed_dim=128")
        if key in kwargs:
            raise AttnprobeError(f"--model-kwargs: {key} is given twice ({key}={kwargs[key]!r} and {pair}); keep one")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


# Constructor arguments of timm's VisionTransformer that take numbers, checked before timm sees them: timm
# asserts, divides by zero or fails in the first forward instead of naming the argument.
_WHOLE_KWARGS = {"img_size": 1, "patch_size": 1, "in_chans": 1, "embed_dim": 1, "depth": 1, "num_heads": 1,
                 "reg_tokens": 0}  # name: smallest value
_RATE_KWARGS = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                "drop_path_rate")  # in [0, 1)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_model_kwargs(kwargs: dict) -> None:
    """Constructor kwargs checked where they enter: numbers where timm takes numbers, in range, and embed_dim
    divisible by num_heads; one line naming the argument and the fix. Other keys are left to timm."""
    def bad(key, what):
        return AttnprobeError(f"--model-kwargs {key}={kwargs[key]!r}: {what}")
    if "num_classes" in kwargs:
        raise bad("num_classes", "the class count comes from the data's class folders (a student takes its "
                                 "teacher's); drop it")
    for key, least in _WHOLE_KWARGS.items():
        if key not in kwargs:
            continue
        value = kwargs[key]
        values = list(value) if key in ("img_size", "patch_size") and isinstance(value, (tuple, list)) else [value]
        if not values or len(values) > 2 or not all(_whole(v) for v in values):
            raise bad(key, f"expected a number (whole, e.g. {key}={max(least, 2) if key != 'embed_dim' else 128})")
        if any(v < least for v in values):
            raise bad(key, f"must be at least {least}" + (" (a ViT needs one block or more)" if key == "depth" else ""))
    for key in ("mlp_ratio", "init_values", *_RATE_KWARGS):
        value = kwargs.get(key)
        if value is None:
            continue
        if not _number(value):
            raise bad(key, "expected a number")
        if not math.isfinite(value):
            raise bad(key, "must be a finite number")
        if key == "mlp_ratio" and value <= 0:
            raise bad(key, "must be greater than 0")
        if key in _RATE_KWARGS and not 0 <= value < 1:
            raise bad(key, "must be a rate in [0, 1)")
    embed, heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    if _whole(embed) and _whole(heads) and embed % heads:
        divisors = [d for d in range(1, embed + 1) if embed % d == 0]
        near = sorted(divisors, key=lambda d: (abs(d - heads), d))[:2]
        raise AttnprobeError(f"--model-kwargs: embed_dim {embed} is not divisible by num_heads {heads}; use a "
                             f"num_heads that divides it (e.g. {' or '.join(map(str, sorted(near)))}) or another "
                             "embed_dim")


def resolve_model(name: str, overrides: dict | None = None, *, input_from: dict | None = None) -> tuple[str, dict]:
    """A preset or timm name plus overrides -> (timm architecture, constructor kwargs).

    `input_from` ({img_size, in_chans}, e.g. a teacher's info) replaces the preset's own input geometry: a
    student takes its teacher's input; img_size/in_chans given in `overrides` still win. img_size is passed only
    to architectures built for one input size (timm's `fixed_input_size`, e.g. a ViT's position embedding): a
    CNN takes any size and has no such argument."""
    if not isinstance(name, str) or not name:
        raise AttnprobeError(f"model {name!r}: expected a preset ({', '.join(PRESETS)}) or a timm model name")
    arch, kwargs = PRESETS.get(name, (name, {}))
    if arch not in timm.list_models():
        raise AttnprobeError(f"unknown model {name!r}; use a preset ({', '.join(PRESETS)}) or a timm model name such "
                             "as vit_tiny_patch16_224 or resnet18 (timm.list_models() lists them)")
    keys = ("img_size", "in_chans") if fixed_input_size(arch) else ("in_chans",)
    geometry_from = {k: input_from[k] for k in keys if input_from and k in input_from}
    return arch, {**kwargs, **geometry_from, **(overrides or {})}


def fixed_input_size(arch: str) -> bool:
    """Whether timm builds the architecture for one input size (its pretrained_cfg's fixed_input_size)."""
    return bool(getattr(timm.get_pretrained_cfg(arch), "fixed_input_size", False))


def build_model(arch: str, model_kwargs: dict, num_classes: int, *, layer_norm_eps: float | None = None,
                vit: bool = True) -> nn.Module:
    """A timm model from its architecture and constructor kwargs; with `vit` (a teacher), checked to be a
    CLS-token ViT.

    `layer_norm_eps` overrides every LayerNorm's eps: teachers imported from transformers use 1e-12 where
    timm uses 1e-6, and timm's constructor has no plain-value argument for it."""
    check_model_kwargs(model_kwargs)
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_kwargs)
    except TypeError as e:
        raise AttnprobeError(f"model {arch!r} does not take these --model-kwargs ({first_line(e)}); fix the key "
                             "names") from None
    except (ValueError, AssertionError, KeyError, IndexError, ZeroDivisionError) as e:  # timm's own checks
        shown = " ".join(f"{k}={v!r}" for k, v in model_kwargs.items())
        raise AttnprobeError(f"model {arch!r} cannot be built with --model-kwargs {shown} ({first_line(e)}); "
                             "fix the values") from None
    if vit:
        check_vit(model, arch)
    if layer_norm_eps is not None:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(layer_norm_eps)
    return model


def is_cls_vit(model: nn.Module) -> bool:
    """A timm VisionTransformer with a CLS token: what the attention probe reads."""
    return (getattr(model, "cls_token", None) is not None and hasattr(model, "blocks")
            and all(hasattr(b, "attn") and hasattr(b.attn, "qkv") for b in model.blocks))


def student_kind(student: nn.Module, teacher: nn.Module) -> str:
    """"vit" (a CLS-token ViT on the teacher's patch grid), "vit-other-grid", or "no-cls" (e.g. a CNN)."""
    student = getattr(student, "module", student)
    if not is_cls_vit(student):
        return "no-cls"
    return "vit" if geometry(student)["grid_size"] == geometry(teacher)["grid_size"] else "vit-other-grid"


def check_vit(model: nn.Module, name: str = "model") -> None:
    if not is_cls_vit(model):
        raise AttnprobeError(f"{name} is not a timm VisionTransformer with a CLS token; a teacher must be one (the "
                             "probe reads its attention): pick a vit_*/deit_* model with class_token=True")
    if len(model.blocks) < 1:
        raise AttnprobeError(f"{name} has no transformer blocks (depth 0); a ViT needs depth 1 or more, e.g. "
                             "--model-kwargs depth=4")
    pe = getattr(model, "patch_embed", None)
    grid = list(getattr(pe, "grid_size", None) or [])
    if grid and min(grid) < 1:
        raise AttnprobeError(f"{name}: patch_size {list(pe.patch_size)} is larger than img_size {list(pe.img_size)}, "
                             "so there are no patches; use a smaller patch_size or a larger img_size")


def geometry(model: nn.Module) -> dict:
    """Input size, channels, token grid and prefix-token count of a timm ViT."""
    pe = model.patch_embed
    img_size = tuple(pe.img_size)
    return {
        "img_size": img_size[0] if img_size[0] == img_size[1] else list(img_size),
        "in_chans": pe.proj.in_channels,
        "grid_size": list(pe.grid_size),
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 1)),
        "depth": len(model.blocks),
    }


def input_shape(info: dict) -> tuple[int, int, int]:
    """(C, H, W) of a checkpoint's input."""
    size = info["img_size"]
    return (int(info["in_chans"]), *((size, size) if isinstance(size, int) else size))


def default_norm(arch: str, in_chans: int) -> tuple[list[float], list[float]]:
    """timm's pretrained_cfg mean/std for the architecture, averaged down to one channel if needed."""
    cfg = timm.get_pretrained_cfg(arch)
    mean, std = list(getattr(cfg, "mean", (0.5, 0.5, 0.5))), list(getattr(cfg, "std", (0.5, 0.5, 0.5)))
    if in_chans != len(mean):
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return mean, std


def describe(model: nn.Module, arch: str, model_kwargs: dict, classes: list[str], mean, std,
             accuracy: float | None = None, *, input_from: dict | None = None, **extra) -> dict:
    """The info dict a checkpoint carries (plain Python values only, so loading stays weights_only). A model
    that is not a ViT does not record its input size: `input_from` (its teacher's info) gives it."""
    geo = geometry(model) if is_cls_vit(model) else {k: input_from[k] for k in ("img_size", "in_chans")}
    return {
        "arch": arch, "model_kwargs": dict(model_kwargs), "num_classes": len(classes), "classes": list(classes),
        "img_size": geo["img_size"], "in_chans": geo["in_chans"], "mean": [float(m) for m in mean],
        "std": [float(s) for s in std], "accuracy": accuracy,
        "params": sum(p.numel() for p in model.parameters()), **extra,
    }


def build_student(name: str, model_kwargs: dict | None, *, teacher_info: dict, teacher_model: nn.Module
                  ) -> tuple[nn.Module, str, dict]:
    """(student, arch, kwargs): any timm image classifier with the teacher's classes and input. A preset's own
    img_size and in_chans are replaced by the teacher's; only img_size/in_chans given in `model_kwargs`
    override, and then must agree with the teacher's. Its token grid (a ViT's) or stages (a CNN's) may differ
    from the teacher's: the probe maps are compared on the coarser grid (method/probe_maps.py)."""
    arch, kwargs = resolve_model(name, model_kwargs, input_from=teacher_info)
    net = build_model(arch, kwargs, teacher_info["num_classes"], vit=False)
    t_geo = geometry(teacher_model)
    if is_cls_vit(net):
        check_vit(net, f"student {name}")
        s_geo = geometry(net)
        if (s_geo["img_size"], s_geo["in_chans"]) != (t_geo["img_size"], t_geo["in_chans"]):
            given = " ".join(f"{k}={(model_kwargs or {})[k]!r}" for k in ("img_size", "in_chans")
                             if k in (model_kwargs or {}))
            raise AttnprobeError(f"student input {s_geo['img_size']}px x{s_geo['in_chans']} differs from the "
                                 f"teacher's {t_geo['img_size']}px x{t_geo['in_chans']}; drop --model-kwargs {given} "
                                 "(the student takes the teacher's input)")
        return net, arch, kwargs
    _check_runs_on(net, name, input_shape(teacher_info))
    return net, arch, kwargs


@torch.no_grad()
def _check_runs_on(net: nn.Module, name: str, shape) -> None:
    """One forward of two zero images of the teacher's input, in eval mode: a network that downsamples a small
    input to nothing, or takes other channels, is refused here, not in the first training step."""
    try:
        out = net.eval()(torch.zeros(2, *shape))
    except RuntimeError as e:
        raise AttnprobeError(f"student {name} cannot take the teacher's {shape[1]}x{shape[2]} x{shape[0]} input "
                             f"({first_line(e)}); pick a model for inputs this size or change its --model-kwargs "
                             "(e.g. fewer stages or a smaller stem stride)") from None
    finally:
        net.train()
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        raise AttnprobeError(f"student {name} does not return one row of class logits per image; pick a timm image "
                             "classifier")
