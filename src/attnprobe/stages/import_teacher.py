"""`import-teacher`: turn a teacher trained elsewhere into a self-describing attnprobe checkpoint.

The contract is the same model: the checkpoint gives the source model's logits on the same input. One rule
for what the user states and the file records (classes, mean, std, model kwargs such as img_size and
in_chans): what only one of them gives is used, the same value from both is fine, different values are
refused in one line naming what the file records. What neither gives is filled in: classes from the class
folders of --val, else 0..N-1; normalisation by the convention of the program that wrote the file (DeiT's
main.py: ImageNet's; transformers: its image processors' 0.5; else timm's default for the architecture),
and the info's `assumed` list says so. Accuracy (noise adaptation's alpha) is measured on --val, or given
as --accuracy.
"""
from __future__ import annotations

import math
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
    Returns the checkpoint's info, with `assumed`: what the source did not say and was filled in by the
    convention of the program that wrote it. Nothing is written unless every check passes."""
    s = settings
    model, accuracy, val = s.model, s.accuracy, s.val
    src = read_source(source, ema=s.ema)
    name = model or src.arch
    if name is None:
        raise AttnprobeError(f"{source} ({src.kind}) does not name its architecture; pass --model (a timm name, or "
                             "ap_teacher_32 for the reference's CIFAR teachers) and --model-kwargs if it was changed")
    # The file's constructor arguments describe the file's architecture: they hold unless --model replaces
    # it; its input size and channels describe the data, and hold either way.
    recorded = src.model_kwargs if not model else {k: v for k, v in src.model_kwargs.items() if k in GEOMETRY}
    kwargs = dict(recorded)
    for key, value in s.model_kwargs.items():
        kwargs[key] = stated_or_recorded(f"--model-kwargs {key}={value}", f"{key}={value} from --model-kwargs",
                                         value, recorded.get(key), key, src.records.get(key), source)
    arch, kwargs = resolve_model(name, kwargs)
    head = src.state.get("head.weight")
    if head is None:
        raise AttnprobeError(f"{source} has no classifier (head.weight); import a model with its classification head")
    net = build_model(arch, kwargs, head.shape[0], layer_norm_eps=src.layer_norm_eps)
    _load_weights(net, src.state, name, source)
    in_chans = geometry(net)["in_chans"]
    assumed: list[str] = []
    names = _classes(src, s.classes, val, head.shape[0], source, assumed)
    mean, std = _normalisation(src, s, arch, in_chans, source, assumed)
    info = describe(net, arch, kwargs, names, mean, std, accuracy=accuracy, role="teacher",
                    source=str(source) if str(source).startswith("hf-hub:") else os.path.abspath(source),
                    source_kind=src.kind, weights="ema" if s.ema else "model", assumed=assumed,
                    layer_norm_eps=src.layer_norm_eps, accuracy_source="given" if accuracy is not None else None)
    if val is not None:
        from .evaluate import evaluate_model
        result = evaluate_model(net, info, val, settings=EvaluateSettings.build(
            batch_size=s.batch_size, workers=s.workers, device=s.device, progress=s.progress))
        info.update(accuracy=result["top1"], accuracy_source=f"measured on {os.path.abspath(val)} "
                                                             f"({result['n']} images)")
    save_checkpoint(out, net.cpu(), info)
    return info


GEOMETRY = ("img_size", "in_chans")


def _same(a, b) -> bool:
    """Equal values, numbers within float noise; an int image size equals the square pair."""
    if isinstance(a, (list, tuple)) and isinstance(b, int) or isinstance(b, (list, tuple)) and isinstance(a, int):
        a, b = ([a, a] if isinstance(a, int) else list(a)), ([b, b] if isinstance(b, int) else list(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7)
    return a == b


def _show(value) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 6:
        return "[" + ", ".join(map(str, value[:6])) + f", ... ({len(value)} in all)]"
    return str(list(value) if isinstance(value, tuple) else value)


def stated_or_recorded(flag: str, drop: str, stated, recorded, what: str, where: str | None, source):
    """The one rule for a value both the user and the file may give: what only one of them gives is used;
    both the same is fine; both different is refused in one line saying what the file records."""
    if recorded is None:
        return stated
    if stated is None or _same(stated, recorded):
        return recorded
    at = f" ({where})" if where else ""
    raise AttnprobeError(f"{flag}: {source} records {what} {_show(recorded)}{at}; drop {drop}, or correct the "
                         "file if it is wrong")


def _normalisation(src, s, arch: str, in_chans: int, source, assumed: list) -> tuple[list, list]:
    if src.convention is not None:
        c_mean, c_std, who = src.convention
        if in_chans != len(c_mean):  # a one-channel model: the channel average, as default_norm does
            c_mean, c_std = [sum(c_mean) / len(c_mean)] * in_chans, [sum(c_std) / len(c_std)] * in_chans
    else:
        (c_mean, c_std), who = default_norm(arch, in_chans), f"timm's default for {arch}"
    values = []
    for key, stated, recorded, fill in (("mean", s.mean, src.mean, c_mean), ("std", s.std, src.std, c_std)):
        value = stated_or_recorded(f"--{key} {' '.join(map(str, stated or []))}", f"--{key}", stated, recorded,
                                   key, src.records.get(key), source)
        if value is None:
            value = fill
            assumed.append(f"{key} {_show([round(v, 4) for v in fill])} ({who}; {source} records none)")
        values.append(value)
    mean, std = values
    if len(mean) != in_chans or len(std) != in_chans or min(std) <= 0:
        raise AttnprobeError(f"mean {mean} / std {std} do not fit a {in_chans}-channel input with std > 0; "
                             f"give {in_chans} values each to --mean and --std")
    return mean, std


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


def _classes(src, classes: str | None, val, num_classes: int, source, assumed: list) -> list[str]:
    recorded = src.classes
    if recorded is not None and len(recorded) != num_classes:
        where = f" ({src.records['classes']})" if "classes" in src.records else ""
        raise AttnprobeError(f"{source} records {len(recorded)} class names{where} but its head has {num_classes} "
                             "outputs; correct the file's class names, or delete them and pass --classes")
    if recorded is not None:
        _unique(recorded, f"{source} records")
    stated = None
    if classes:
        stated = known_classes(classes)
        if stated is None:
            path = Path(classes)
            if not path.is_file():
                raise AttnprobeError(f"--classes {classes!r} is neither a file nor one of cifar10, cifar100, imagenet")
            stated = [line.strip() for line in _read_text(path, "--classes").splitlines() if line.strip()]
        if len(stated) != num_classes:
            raise AttnprobeError(f"--classes gives {len(stated)} names but the teacher's head has {num_classes} "
                                 "outputs; pass one name per class, in index order")
        _unique(stated, f"--classes {classes}")
    names = stated_or_recorded(f"--classes {classes}", "--classes", stated, recorded, "classes",
                               src.records.get("classes"), source)
    if names is not None:
        return list(names)
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
    assumed.append(f"classes 0..{num_classes - 1} (the source names none; pass --classes to name them)")
    return [str(i) for i in range(num_classes)]


def _unique(names: list[str], where: str) -> None:
    seen = set()
    for i, n in enumerate(names):
        if n in seen:
            raise AttnprobeError(f"{where}: class name {n!r} is given twice (index {names.index(n)} and {i}); "
                                 "each class needs its own name")
        seen.add(n)


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AttnprobeError(f"{flag} {path} cannot be read as text ({type(e).__name__}); pass a UTF-8 file with "
                             "one class name per line") from None
