"""`import-teacher`: turn a teacher trained elsewhere into a self-describing attnprobe checkpoint.

The contract is the same model: the checkpoint gives the source model's logits on the same input. What the
source does not say is filled in, in this order: classes from the source, else --classes, else the class
folders of --val; normalisation from the source, else --mean/--std, else timm's default for the
architecture; accuracy (noise adaptation's alpha) measured on --val, or given as --accuracy.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import AttnprobeError
from ..io.checkpoints import save_checkpoint
from ..io.sources import read_source
from ..models import build_model, default_norm, describe, geometry, resolve_model
from ..settings import EvaluateSettings, ImportSettings

CIFAR10 = "airplane automobile bird cat deer dog frog horse ship truck".split()
CIFAR100 = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree
motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy
porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale
willow_tree wolf woman worm""".split()  # the fine label names of cifar-100-python's meta, in index order


def known_classes(name: str) -> list[str] | None:
    """A named class list (as `attnprobe prepare` names the folders), or None."""
    if name == "cifar10":
        return list(CIFAR10)
    if name == "cifar100":
        return list(CIFAR100)
    if name == "imagenet":  # WordNet ids, the folder names of ImageNet's train/ and val/
        from timm.data import ImageNetInfo
        return list(ImageNetInfo().label_names())
    return None


def import_teacher(*, source, out, settings: ImportSettings) -> dict:
    """Read a teacher from a DeiT/reference, timm or transformers checkpoint or folder, a bare state dict,
    safetensors or hf-hub:ORG/NAME (local cache only); write it to `out` as an attnprobe checkpoint.
    Returns the checkpoint's info. Nothing is written unless every check passes."""
    s = settings
    model, accuracy, val = s.model, s.accuracy, s.val
    src = read_source(source, ema=s.ema)
    name = model or src.arch
    if name is None:
        raise AttnprobeError(f"{source} ({src.kind}) does not name its architecture; pass --model (a timm name, or "
                             "ap_teacher_32 for the reference's CIFAR teachers) and --model-kwargs if it was changed")
    # The file's constructor arguments describe the file's architecture: they hold unless --model replaces it.
    arch, kwargs = resolve_model(name, {**({} if model else src.model_kwargs), **s.model_kwargs})
    head = src.state.get("head.weight")
    if head is None:
        raise AttnprobeError(f"{source} has no classifier (head.weight); import a model with its classification head")
    net = build_model(arch, kwargs, head.shape[0], layer_norm_eps=src.layer_norm_eps)
    _load_weights(net, src.state, name, source)
    in_chans = geometry(net)["in_chans"]
    names = _classes(src.classes, s.classes, val, head.shape[0])
    d_mean, d_std = default_norm(arch, in_chans)
    mean, std = src.mean or s.mean or d_mean, src.std or s.std or d_std
    if len(mean) != in_chans or len(std) != in_chans or min(std) <= 0:
        raise AttnprobeError(f"mean {mean} / std {std} do not fit a {in_chans}-channel input with std > 0; "
                             f"give {in_chans} values each to --mean and --std")
    info = describe(net, arch, kwargs, names, mean, std, accuracy=accuracy, role="teacher",
                    source=str(source) if str(source).startswith("hf-hub:") else os.path.abspath(source),
                    source_kind=src.kind, weights="ema" if s.ema else "model",
                    layer_norm_eps=src.layer_norm_eps, accuracy_source="given" if accuracy is not None else None)
    if val is not None:
        from .evaluate import evaluate_model
        result = evaluate_model(net, info, val, settings=EvaluateSettings.build(
            batch_size=s.batch_size, workers=s.workers, device=s.device, progress=s.progress))
        info.update(accuracy=result["top1"], accuracy_source=f"measured on {os.path.abspath(val)} "
                                                             f"({result['n']} images)")
    save_checkpoint(out, net.cpu(), info)
    return info


def _load_weights(net, state: dict, name: str, source) -> None:
    """Load strictly; a state dict that does not fit says how far off it is and names one key."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        example = f"missing e.g. {missing[0]}" if missing else f"unexpected e.g. {unexpected[0]}"
        raise AttnprobeError(f"the weights of {source} do not fit {name}: {len(missing)} keys missing, "
                             f"{len(unexpected)} unexpected ({example}); pass the --model/--model-kwargs it was "
                             "trained with")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise AttnprobeError(f"the weights of {source} do not fit {name}: {len(wrong)} tensors differ in shape, e.g. "
                             f"{k} {got} vs {want}; pass the --model-kwargs it was trained with (img_size, "
                             "patch_size, embed_dim, depth, ...)")
    net.load_state_dict(state)


def _classes(from_source, classes: str | None, val, num_classes: int) -> list[str]:
    if from_source:
        if len(from_source) != num_classes:
            raise AttnprobeError(f"the source names {len(from_source)} classes but its head has {num_classes}")
        return list(from_source)
    if classes:
        names = known_classes(classes)
        if names is None:
            path = Path(classes)
            if not path.is_file():
                raise AttnprobeError(f"--classes {classes!r} is neither a file nor one of cifar10, cifar100, imagenet")
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) != num_classes:
            raise AttnprobeError(f"--classes gives {len(names)} names but the teacher's head has {num_classes} "
                                 "outputs; pass one name per class, in index order")
        return names
    if val is not None:
        root = Path(val)
        if (root / "val").is_dir() and (root / "train").is_dir():
            root = root / "val"
        folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if root.is_dir() else []
        if len(folders) != num_classes:
            raise AttnprobeError(f"--val {val} has {len(folders)} class folders but the teacher's head has "
                                 f"{num_classes} outputs; pass --classes (a file or cifar10/cifar100/imagenet)")
        return folders
    return [str(i) for i in range(num_classes)]
