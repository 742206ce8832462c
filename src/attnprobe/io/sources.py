"""Read a teacher saved by another tool, recognised by content rather than by file name.

Each reader returns a `Source`: the weights as a timm state dict plus whatever the file says about the
model (architecture, constructor arguments, classes, normalisation). Nothing is unpickled but tensors,
plain containers and the `argparse.Namespace` that DeiT and timm training checkpoints carry.

    DeiT / reference   {'model', 'model_ema', 'optimizer', 'epoch', 'args': Namespace}
    timm train.py      {'state_dict', 'state_dict_ema', 'arch', 'args': Namespace, ...}
    bare state dict    .pth / .bin / .safetensors, maybe with module. / _orig_mod. prefixes
    timm folder        config.json (architecture, model_args, label_names, pretrained_cfg) + weights
    transformers       config.json (model_type vit/deit) + weights + preprocessor_config.json
    hf-hub:ORG/NAME    either folder, from the local Hugging Face cache
"""
from __future__ import annotations

import argparse
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import AttnprobeError
from .convert import transformers_to_timm
from .jsonfiles import field as json_field
from .jsonfiles import read_json

# The reference code's names for its CIFAR (32 px) and MNIST (28 px, one channel) models, as timm
# architectures with the same weights: its TeacherVisionTransformer is timm's ViT with its keys.
_REF_SIZES = {"tiny": dict(embed_dim=128, depth=12, num_heads=2), "small": dict(embed_dim=192, depth=12, num_heads=2),
              "base": dict(embed_dim=384, depth=12, num_heads=3)}
REFERENCE_ALIASES = {
    f"deit_{size}_patch4_{px}_teacher": ("vit_small_patch16_224", {"img_size": px, "patch_size": 4,
                                                                   "in_chans": 3 if px == 32 else 1, **dims})
    for size, dims in _REF_SIZES.items() for px in (32, 28)}
_PREFIXES = ("module.", "_orig_mod.", "model.")  # DataParallel/DDP, torch.compile, Lightning-style wrappers
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


@dataclass
class Source:
    state: dict
    kind: str  # a few words for the user and the checkpoint's `source` record
    arch: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    classes: list[str] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    layer_norm_eps: float | None = None
    # Where the file records each value it states ({'mean': 'config.json pretrained_cfg.mean', ...}), for
    # a refusal to name; and the normalisation of the program that wrote the file, where the file records
    # none: (mean, std, 'who says so'), or None for timm's default for the architecture.
    records: dict = field(default_factory=dict)
    convention: tuple | None = None


def read_source(source, *, ema: bool = False) -> Source:
    """The teacher weights and what the file says about them, from any supported format."""
    text = str(source)
    if text.startswith("hf-hub:"):
        return _read_folder(hub_folder(text[len("hf-hub:"):]), ema)
    if not text:
        raise AttnprobeError("the teacher source is empty; pass a checkpoint file, a model folder or hf-hub:ORG/NAME")
    path = Path(source)
    if path.is_dir():
        return _read_folder(path, ema)
    if not path.exists():
        raise AttnprobeError(f"teacher source {path} does not exist; pass a checkpoint file, a model folder "
                             "or hf-hub:ORG/NAME")
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise AttnprobeError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    if _is_safetensors(head):
        if ema:
            raise AttnprobeError(f"{path} holds one set of weights; drop --ema")
        return Source(state=_strip_prefixes(_load_safetensors(path)), kind="safetensors state dict")
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch's zip format, or a legacy pickle
        return _from_torch_dict(load_torch(path), path, ema)
    raise AttnprobeError(f"{path} is not a PyTorch or safetensors file (it starts with {head[:8]!r}); "
                         "pass the teacher's checkpoint")


def hub_folder(repo_id: str) -> Path:
    """The local snapshot of a Hugging Face Hub repository. Never downloads: this tool runs offline."""
    if "@" in repo_id:
        name = repo_id.split("@", 1)[0] or "ORG/NAME"
        raise AttnprobeError(f"hf-hub:{repo_id}: a revision is not supported from the local cache (attnprobe reads "
                             f"the cached main snapshot); pass hf-hub:{name}, or the snapshot folder itself "
                             "(HF_HUB_CACHE/models--ORG--NAME/snapshots/REVISION)")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise AttnprobeError(f"hf-hub:{repo_id} is not a Hub model name; pass hf-hub:ORG/NAME (e.g. "
                             "hf-hub:google/vit-base-patch16-224) or the model folder")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:
        raise AttnprobeError(f"hf-hub:{repo_id} is not in the local Hugging Face cache ({type(e).__name__}) and "
                             f"attnprobe does not download; run `hf download {repo_id}` where there is a network, "
                             "or pass the model folder") from None


def load_torch(path) -> dict:
    """torch.load with weights_only, allowing argparse.Namespace (DeiT/timm `args`) and nothing else."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global|GLOBAL)[:\s]+(?:GLOBAL\s+)?([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise AttnprobeError(f"{path} holds Python objects beyond tensors and argparse.Namespace{what}; refusing "
                             "to unpickle code. Save the teacher's state_dict() and import that") from None
    except Exception as e:  # zip, EOF and storage errors all mean a damaged or foreign file
        if _foreign_zip(path):
            raise AttnprobeError(f"{path} is a zip archive but not a PyTorch checkpoint (it holds no data.pkl); "
                                 "pass the teacher's checkpoint, not an archive of it") from None
        raise AttnprobeError(f"{path} cannot be read as a PyTorch checkpoint ({type(e).__name__}); it may be "
                             "truncated: copy it again") from None
    if not isinstance(obj, dict):
        raise AttnprobeError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def _foreign_zip(path) -> bool:
    """A complete zip archive without torch.save's data.pkl (a damaged torch zip is not readable as a zip)."""
    try:
        with zipfile.ZipFile(path) as z:
            return not any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_safetensors(head: bytes) -> bool:
    """safetensors starts with a little-endian u64 header length and then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 100_000_000


def _load_safetensors(path) -> dict:
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise AttnprobeError(f"{path} cannot be read as safetensors ({type(e).__name__}); it may be truncated") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(state: dict) -> dict:
    """Remove wrapper prefixes shared by every key, repeatedly (DDP inside torch.compile, ...)."""
    while True:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {k[len(prefix):]: v for k, v in state.items()}


def _pick_weights(ckpt: dict, key: str, ema_key: str, ema: bool, path) -> dict:
    chosen = ema_key if ema else key
    state = ckpt.get(chosen)
    if not _is_state_dict(state):
        raise AttnprobeError(f"{path} has no {chosen!r} weights" + ("; drop --ema" if ema else ""))
    return _strip_prefixes(state)


def _from_torch_dict(ckpt: dict, path, ema: bool) -> Source:
    if ckpt.get("format") == "attnprobe-checkpoint":
        raise AttnprobeError(f"{path} is already an attnprobe checkpoint; pass it as --teacher directly")
    if "state_dict" in ckpt and ("arch" in ckpt or "args" in ckpt):  # timm train.py
        return _from_timm_train(ckpt, path, ema)
    if "model" in ckpt and isinstance(ckpt["model"], dict):  # DeiT / the reference
        args = vars(ckpt.get("args") or argparse.Namespace())
        arch, kwargs = REFERENCE_ALIASES.get(args.get("model"), (args.get("model"), {}))
        records = {k: f"args.model {args.get('model')}" for k in kwargs}
        if isinstance(args.get("input_size"), int):
            kwargs, records["img_size"] = {**kwargs, "img_size": args["input_size"]}, "args.input_size"
        return Source(state=_pick_weights(ckpt, "model", "model_ema", ema, path), kind="DeiT-style checkpoint",
                      arch=arch, model_kwargs=kwargs, records=records,
                      convention=(list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD),
                                  "ImageNet's, as DeiT's main.py always normalises"))
    for key in ("state_dict", "model_state_dict", "model_state"):  # generic wrappers
        if _is_state_dict(ckpt.get(key)):
            return Source(state=_strip_prefixes(ckpt[key]), kind=f"checkpoint ({key})")
    if _is_state_dict(ckpt):
        if ema:
            raise AttnprobeError(f"{path} is a bare state dict without EMA weights; drop --ema")
        return Source(state=_strip_prefixes(ckpt), kind="state dict")
    raise AttnprobeError(f"{path} is a dict of {sorted(ckpt)[:6]}, none of them model weights; pass a DeiT, "
                         "timm or bare state-dict checkpoint")


def _from_timm_train(ckpt: dict, path, ema: bool) -> Source:
    """timm train.py: the model is create_model(model, in_chans=..., **model_kwargs); in_chans is args.in_chans,
    else args.input_size[0] (C, H, W); the data's size is args.img_size, else args.input_size[1:]."""
    args = vars(ckpt.get("args") or argparse.Namespace())
    kwargs, records = dict(args.get("model_kwargs") or {}), {}
    records.update({k: "args.model_kwargs" for k in kwargs})
    size = args.get("input_size")
    size = list(size) if isinstance(size, (list, tuple)) and len(size) == 3 else None
    found = {"img_size": (args.get("img_size"), "args.img_size"), "in_chans": (args.get("in_chans"), "args.in_chans")}
    if size is not None:
        hw = size[1] if size[1] == size[2] else size[1:]
        found = {"img_size": found["img_size"] if found["img_size"][0] else (hw, "args.input_size"),
                 "in_chans": found["in_chans"] if found["in_chans"][0] else (size[0], "args.input_size")}
    for key, (value, where) in found.items():
        if value and key not in kwargs:
            kwargs[key], records[key] = value, where
    mean, std = _floats(args.get("mean")), _floats(args.get("std"))
    records.update({"mean": "args.mean"} if mean else {}, **({"std": "args.std"} if std else {}))
    return Source(state=_pick_weights(ckpt, "state_dict", "state_dict_ema", ema, path),
                  kind="timm training checkpoint", arch=ckpt.get("arch") or args.get("model"),
                  model_kwargs=kwargs, mean=mean, std=std, records=records)


def _floats(values) -> list[float] | None:
    return [float(v) for v in values] if values else None


def _folder_weights(folder: Path) -> dict:
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded save_pretrained output
        fix = "re-save the model, or pass its complete folder"
        weight_map = json_field(read_json(index, what="the index of a sharded save", fix=fix), "weight_map", dict,
                           path=index, what="the index of a sharded save", fix=fix)
        shards = sorted(set(map(str, weight_map.values())))
        return {k: v for s in shards for k, v in _load_safetensors(folder / s).items()}
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            f = folder / name
            return _load_safetensors(f) if name.endswith(".safetensors") else load_torch(f)
    raise AttnprobeError(f"{folder} has no weights ({', '.join(_WEIGHT_FILES)})")


def _read_folder(folder: Path, ema: bool) -> Source:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise AttnprobeError(f"{folder} has no config.json; pass a timm (save_for_hf) or transformers model "
                             "folder, or the checkpoint file itself")
    config = read_json(config_file, what="the model's config", fix="re-save the model folder, or pass the "
                       "checkpoint file itself")
    if ema:
        raise AttnprobeError(f"{folder} holds one set of weights; drop --ema")
    state = _folder_weights(folder)
    if "architecture" in config:  # timm save_for_hf / push_to_hf_hub
        cfg = config.get("pretrained_cfg") or {}
        labels = config.get("label_names") or cfg.get("label_names")
        if isinstance(labels, dict):
            labels = [labels[k] for k in sorted(labels, key=int)]
        # The head's shape gives the class count; timm 1.0 folders repeat num_classes in model_args.
        kwargs = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}
        mean, std = _floats(cfg.get("mean")), _floats(cfg.get("std"))
        records = {**{k: "config.json model_args" for k in kwargs},
                   **({"classes": "config.json label_names"} if labels else {}),
                   **({"mean": "config.json pretrained_cfg.mean"} if mean else {}),
                   **({"std": "config.json pretrained_cfg.std"} if std else {})}
        return Source(state=_strip_prefixes(state), kind="timm folder", arch=config["architecture"],
                      model_kwargs=kwargs, classes=labels, mean=mean, std=std, records=records)
    if "model_type" in config:  # transformers save_pretrained
        arch, kwargs, timm_state, extras = transformers_to_timm(config, state)
        pre = folder / "preprocessor_config.json"
        pre = read_json(pre, what="the image processor's config", fix="re-save the model folder, or delete the "
                        "file and pass --mean and --std", missing={})
        mean, std = _floats(pre.get("image_mean")), _floats(pre.get("image_std"))
        records = {**{k: "config.json" for k in kwargs}, **({"classes": "config.json id2label"}
                                                            if extras["classes"] else {}),
                   **({"mean": "preprocessor_config.json image_mean"} if mean else {}),
                   **({"std": "preprocessor_config.json image_std"} if std else {})}
        return Source(state=timm_state, kind=f"transformers {config['model_type']} folder", arch=arch,
                      model_kwargs=kwargs, classes=extras["classes"], mean=mean, std=std,
                      layer_norm_eps=extras["layer_norm_eps"], records=records,
                      convention=([0.5] * 3, [0.5] * 3, "the default of transformers' ViT/DeiT image processors"))
    raise AttnprobeError(f"{config_file} names neither a timm architecture nor a transformers model_type")
