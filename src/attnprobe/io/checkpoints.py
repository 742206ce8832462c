"""Self-describing checkpoints: the model's weights with everything needed to rebuild and use it
(architecture and constructor arguments, classes, input geometry, normalisation, measured accuracy, and
a run's settings), written whole or not at all and read back with checks."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..errors import AttnprobeError
from ..models import build_model, is_cls_vit
from .atomic import replacing

CHECKPOINT_FORMAT = "attnprobe-checkpoint"
CHECKPOINT_VERSION = 1


def atomic_save(obj, path) -> None:
    """torch.save whole or not at all (io.atomic's writer)."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes (a teacher's identity in score tables and run keys)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(path, model: nn.Module, info: dict, **state) -> None:
    """Write model weights and info; `state` holds resumable training state (optimizer, epoch, ...)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    atomic_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "info": info,
                 "model": model.state_dict(), **state}, path)


def read_checkpoint(path) -> dict:
    """The raw checkpoint dict, after checking that it is one of ours."""
    path = Path(path)
    if path.is_dir():
        hint = next((f" such as {path / n}" for n in ("best.pt", "last.pt") if (path / n).is_file()), "")
        raise AttnprobeError(f"checkpoint {path} is a folder, not a checkpoint file; pass a file{hint} (the best.pt "
                             "or last.pt of a run)")
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


def load_checkpoint(path, device: str | torch.device = "cpu", *, teacher: bool = False) -> tuple[nn.Module, dict]:
    """(timm model in eval mode, info dict) from a checkpoint written by attnprobe. With `teacher`, the model
    must be a CLS-token ViT (the probe reads its attention); a student may be any timm classifier."""
    ckpt = read_checkpoint(path)
    info = ckpt["info"]
    model = build_model(info["arch"], info["model_kwargs"], info["num_classes"],
                        layer_norm_eps=info.get("layer_norm_eps"), vit=False)
    if teacher and not is_cls_vit(model):
        raise AttnprobeError(f"{path} holds a {info['arch']} {info.get('role', 'model')}, not a ViT with a CLS token; "
                             "a teacher must be one (the probe reads its attention): pass a ViT checkpoint")
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), info
