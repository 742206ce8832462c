"""Datasets and transforms: the wild-folder reader, labeled class folders checked against the
teacher's classes, and the teacher-normalised transforms every image goes through."""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from .errors import AttnprobeError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def iter_images(root) -> "iterator[str]":
    """Image files under root, recursively, as '/'-separated paths relative to root, in sorted order.

    Walks with os.scandir in sorted order so a million-file tree streams without a second copy."""
    root = os.fspath(root)

    def walk(rel):
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            path = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=True):
                yield from walk(path)
            elif is_image_file(e.name):
                yield path
    yield from walk("")


def list_images(root) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise AttnprobeError(f"image folder {root} does not exist; pass a directory of images")
    paths = list(iter_images(root))
    if not paths:
        raise AttnprobeError(f"image folder {root} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                             "point to the folder that contains them")
    return paths


def load_image(path, in_chans: int, size_hint: int | None = None) -> Image.Image:
    """Open an image as RGB (3 channels) or L (1 channel). JPEGs are decoded at reduced scale
    (draft mode) when they are much larger than needed: the exact resize follows anyway."""
    mode = "L" if in_chans == 1 else "RGB"
    with Image.open(path) as img:
        if size_hint and img.format == "JPEG":
            img.draft(mode, (size_hint, size_hint))
        if img.mode in ("P", "LA", "RGBA", "PA"):
            img = img.convert("RGBA")  # resolve palettes and keep alpha for compositing below
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        return img.convert(mode)


def _size(info) -> int:
    size = info["img_size"]
    return size if isinstance(size, int) else tuple(size)


def _normalize(info):
    return [transforms.ToTensor(), transforms.Normalize(info["mean"], info["std"])]


def eval_transform(info: dict):
    """Resize the shorter side to the model's input size, centre crop, normalise with the teacher's stats."""
    size = _size(info)
    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), *_normalize(info)])


def train_transform(info: dict, flip: bool = True, affine: bool = False):
    """Eval geometry plus random crop with 4-pixel padding, horizontal flip (off for digits), and an
    optional small affine jitter."""
    size = _size(info)
    steps = [transforms.Resize(size), transforms.CenterCrop(size), transforms.RandomCrop(size, padding=4)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    if affine:
        steps.append(transforms.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1)))
    return transforms.Compose(steps + _normalize(info))


class ImageList(Dataset):
    """Images given by path (relative to `root` if given); yields (tensor, index). Labels are ignored."""

    def __init__(self, paths: list[str], root=None, transform=None, in_chans: int = 3, size_hint=None):
        self.paths, self.root, self.transform = paths, root, transform
        self.in_chans, self.size_hint = in_chans, size_hint

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = os.path.join(self.root, self.paths[i]) if self.root is not None else self.paths[i]
        img = load_image(path, self.in_chans, self.size_hint)
        return (self.transform(img) if self.transform else img), i


def labeled_folder(root, classes: list[str], transform, in_chans: int) -> datasets.ImageFolder:
    """An ImageFolder whose class folders must be exactly the teacher's classes; targets are the
    teacher's class indices."""
    root = Path(root)
    if not root.is_dir():
        raise AttnprobeError(f"labeled folder {root} does not exist; pass a folder of class folders")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if sorted(found) != sorted(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise AttnprobeError(f"classes of {root} are not the model's (missing {missing[:5]}, unexpected {extra[:5]}); "
                             "pass a folder with one sub-folder per class of the teacher")
    try:
        ds = datasets.ImageFolder(root, transform=transform,
                                  loader=partial(load_image, in_chans=in_chans), is_valid_file=is_image_file)
    except FileNotFoundError as e:
        raise AttnprobeError(f"{root}: {e}; every class folder needs at least one image") from None
    index = {c: i for i, c in enumerate(classes)}
    remap = [index[c] for c in ds.classes]
    ds.samples = [(p, remap[t]) for p, t in ds.samples]
    ds.targets = [t for _, t in ds.samples]
    ds.class_to_idx, ds.classes = index, list(classes)
    return ds


def split_dir(root, split: str) -> Path:
    """`root/split` of an ImageFolder root, or a clear error naming the expected layout."""
    path = Path(root) / split
    if not path.is_dir():
        raise AttnprobeError(f"{root} has no {split}/ folder; expected an ImageFolder root with train/<class>/ "
                             "and val/<class>/ (attnprobe prepare makes one)")
    return path


def per_class_subset(ds: datasets.ImageFolder, per_class: int, seed: int) -> list[str]:
    """`per_class` image paths drawn per class with a fixed seed (the reference's pos_num mixing)."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[str]] = {}
    for p, t in ds.samples:
        by_class.setdefault(t, []).append(p)
    chosen = []
    for t in sorted(by_class):
        paths = by_class[t]
        order = torch.randperm(len(paths), generator=g)[:per_class].tolist()
        chosen += [paths[i] for i in sorted(order)]
    return chosen


def make_loader(dataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0,
                drop_last: bool = False, sampler=None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, drop_last=drop_last, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
