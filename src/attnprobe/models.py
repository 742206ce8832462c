"""Named model presets and self-describing checkpoints.

Every model is a timm VisionTransformer with a CLS token. A checkpoint carries the
architecture, its constructor arguments, the class names, the input geometry and
the normalisation, so that no later command has to be told them again.
"""
from __future__ import annotations

import ast
import hashlib
import os
import tempfile
from pathlib import Path

import timm
import torch
from torch import nn

from .errors import AttnprobeError

CHECKPOINT_FORMAT = "attnprobe-checkpoint"
CHECKPOINT_VERSION = 1

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
}


def parse_model_kwargs(pairs: list[str] | None) -> dict:
    """`key=value` strings to a dict, values read as Python literals (as timm's train.py)."""
    kwargs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AttnprobeError(f"--model-kwargs: {pair!r} is not key=value; write e.g. embed_dim=128")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def resolve_model(name: str, overrides: dict | None = None) -> tuple[str, dict]:
    """A preset or timm name plus overrides -> (timm architecture, constructor kwargs)."""
    arch, kwargs = PRESETS.get(name, (name, {}))
    if arch not in timm.list_models():
        raise AttnprobeError(
            f"unknown model {name!r}; use a preset ({', '.join(PRESETS)}) or a timm ViT name such as vit_tiny_patch16_224")
    return arch, {**kwargs, **(overrides or {})}


def build_model(arch: str, model_kwargs: dict, num_classes: int, *, layer_norm_eps: float | None = None) -> nn.Module:
    """A timm model from its architecture and constructor kwargs, checked to be a CLS-token ViT.

    `layer_norm_eps` overrides every LayerNorm's eps: teachers imported from transformers use 1e-12 where
    timm uses 1e-6, and timm's constructor has no plain-value argument for it."""
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_kwargs)
    except TypeError as e:
        raise AttnprobeError(f"model {arch!r} does not take these --model-kwargs ({e}); fix the key names") from e
    check_vit(model, arch)
    if layer_norm_eps is not None:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(layer_norm_eps)
    return model


def check_vit(model: nn.Module, name: str = "model") -> None:
    ok = (getattr(model, "cls_token", None) is not None and hasattr(model, "blocks")
          and all(hasattr(b, "attn") and hasattr(b.attn, "qkv") for b in model.blocks))
    if not ok:
        raise AttnprobeError(f"{name} is not a timm VisionTransformer with a CLS token; pick a vit_*/deit_* model "
                             "with class_token=True")


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


def default_norm(arch: str, in_chans: int) -> tuple[list[float], list[float]]:
    """timm's pretrained_cfg mean/std for the architecture, averaged down to one channel if needed."""
    cfg = timm.get_pretrained_cfg(arch)
    mean, std = list(getattr(cfg, "mean", (0.5, 0.5, 0.5))), list(getattr(cfg, "std", (0.5, 0.5, 0.5)))
    if in_chans != len(mean):
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return mean, std


def describe(model: nn.Module, arch: str, model_kwargs: dict, classes: list[str], mean, std,
             accuracy: float | None = None, **extra) -> dict:
    """The info dict a checkpoint carries (plain Python values only, so loading stays weights_only)."""
    geo = geometry(model)
    return {
        "arch": arch, "model_kwargs": dict(model_kwargs), "num_classes": len(classes), "classes": list(classes),
        "img_size": geo["img_size"], "in_chans": geo["in_chans"], "mean": [float(m) for m in mean],
        "std": [float(s) for s in std], "accuracy": accuracy,
        "params": sum(p.numel() for p in model.parameters()), **extra,
    }


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save whole or not at all: write a temporary file in the same folder, fsync it, rename it over
    `path`, fsync the folder. A kill at any point leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    """Write a text file whole or not at all: temp file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes (a teacher's identity in score tables and run keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path, model: nn.Module, info: dict, **state) -> None:
    """Write model weights and info; `state` holds resumable training state (optimizer, epoch, ...)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "info": info,
                 "model": model.state_dict(), **state}, path)


def read_checkpoint(path) -> dict:
    """The raw checkpoint dict, after checking that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise AttnprobeError(f"checkpoint {path} does not exist; pass the best.pt or last.pt of a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and truncation errors all mean the same thing here
        raise AttnprobeError(f"{path} is not a readable attnprobe checkpoint ({type(e).__name__}); "
                             "pass a file written by train-teacher or distill") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise AttnprobeError(f"{path} is not an attnprobe checkpoint; pass a file written by train-teacher or distill")
    return ckpt


def load_checkpoint(path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(timm model in eval mode, info dict) from a checkpoint written by attnprobe."""
    ckpt = read_checkpoint(path)
    info = ckpt["info"]
    model = build_model(info["arch"], info["model_kwargs"], info["num_classes"],
                        layer_norm_eps=info.get("layer_norm_eps"))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), info
