"""Datasets and transforms: the wild-folder reader, labeled class folders checked against the
teacher's classes, and the teacher-normalised transforms every image goes through."""
from __future__ import annotations

import numbers
import os
import warnings
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from .errors import AttnprobeError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def iter_images(root) -> Iterator[str]:
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


def _check_root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise AttnprobeError(f"image folder {root} does not exist; pass a directory of images")
    return root


def _no_images(root):
    return AttnprobeError(f"image folder {root} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                          "point to the folder that contains them")


def list_images(root) -> list[str]:
    root = _check_root(root)
    paths = list(iter_images(root))
    if not paths:
        raise _no_images(root)
    return paths


class PathList:
    """A compact, read-only sequence of relative paths: one UTF-8 byte buffer plus offsets (numpy).

    A million-file pool costs a few tens of MB and no per-path Python objects, so DataLoader workers
    (forked) do not copy it page by page as they touch reference counts."""

    def __init__(self, paths=()):
        buf, offsets = bytearray(), array("q", [0])
        for p in paths:
            buf += p.encode("utf-8", "surrogateescape")  # names that are not UTF-8 survive the round trip
            offsets.append(len(buf))
        self._buf = np.frombuffer(bytes(buf), dtype=np.uint8)
        self._offsets = np.frombuffer(offsets, dtype=np.int64).copy()

    @classmethod
    def from_dir(cls, root) -> "PathList":
        """The images under root in `iter_images` order, or the same errors as `list_images`."""
        root = _check_root(root)
        paths = cls(iter_images(root))
        if not len(paths):
            raise _no_images(root)
        return paths

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._buf[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def digest(self) -> str:
        """sha256 of the list (order included): identifies a pool listing."""
        import hashlib
        h = hashlib.sha256(self._offsets.tobytes())
        h.update(self._buf.tobytes())
        return h.hexdigest()


# Modes holding more than 8 bits per sample, and the value that maps to white in each.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": None}


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (I;16*), 32-bit integer (I, as Pillow opens some 16-bit files) and float (F) images to L,
    scaled so that the format's full range maps to 0..255 (Pillow's own convert clips instead)."""
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        top = 1.0 if a.size and a.max() <= 1.0 else 255.0  # floats in 0..1, else already in 0..255
        out = np.rint(np.clip(a, 0, top) * (255.0 / top))
    else:
        a = np.clip(a.astype(np.int64), 0, 65535)
        out = (a * 255 + 32767) // 65535  # round(a * 255 / 65535): 0 -> 0, 65535 -> 255, 257 k -> k
    return Image.fromarray(out.astype(np.uint8), mode="L")


def load_image(path, in_chans: int, size_hint: int | None = None) -> Image.Image:
    """Open an image as RGB (3 channels) or L (1 channel), whatever its mode.

    Palettes, alpha (composited on black), CMYK, 16-bit and float images are converted properly; a
    decompression-bomb-sized image raises PIL's DecompressionBombError before anything is decoded,
    and truncated or corrupt files raise as PIL does. JPEGs much larger than needed are decoded at
    reduced scale (draft mode: the result keeps both sides >= size_hint), the exact resize follows."""
    mode = "L" if in_chans == 1 else "RGB"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img_file = Image.open(path)
        except Image.DecompressionBombWarning as e:
            raise Image.DecompressionBombError(str(e)) from None
    with img_file as img:
        if size_hint and img.format == "JPEG":
            img.draft(mode, (size_hint, size_hint))
        if img.mode in _WIDE_MODES:
            img = _to_8bit(img)
        elif img.mode in ("P", "LA", "RGBA", "PA", "La", "RGBa") or "transparency" in img.info:
            img = img.convert("RGBA")  # resolve palettes and keep alpha for compositing below
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        return img.convert(mode)


def _size(info) -> int:
    size = info["img_size"]
    return size if isinstance(size, int) else tuple(size)


def _normalize(info):
    return [transforms.ToTensor(), transforms.Normalize(info["mean"], info["std"])]


RESIZE_MODES = ("crop", "stretch")


def _geometry(size, resize: str) -> list:
    """The steps that bring any image to the model's input size.

    `crop`: resize the shorter side to the input size, then centre crop (the aspect ratio is kept, the
    ends of the longer side are lost). `stretch`: resize the whole image to the input size (the whole
    picture is kept, its aspect ratio is not), as the reference code does with every wild image."""
    if resize == "crop":
        return [transforms.Resize(size), transforms.CenterCrop(size)]
    if resize == "stretch":
        return [transforms.Resize((size, size) if isinstance(size, int) else size)]
    raise AttnprobeError(f"--resize {resize!r} is not one of {RESIZE_MODES}")


def eval_transform(info: dict, *, resize: str = "crop"):
    """Bring the image to the model's input size (`resize`: `crop` = shorter side then centre crop,
    `stretch` = the whole image to the square input), normalise with the teacher's stats."""
    return transforms.Compose([*_geometry(_size(info), resize), *_normalize(info)])


def train_transform(info: dict, flip: bool = True, affine: bool = False, *, resize: str = "crop"):
    """Eval geometry (`resize` as in eval_transform), then a random crop with 4-pixel padding (CIFAR
    style) or, with `affine`, a small affine jitter instead (digits: the padded crop shifts a 28-pixel
    digit too far and slows learning), then a horizontal flip unless `flip` is off (digits, text)."""
    size = _size(info)
    steps = _geometry(size, resize)
    if affine:
        steps.append(transforms.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1)))
    else:
        steps.append(transforms.RandomCrop(size, padding=4))
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + _normalize(info))


class ImageLoader:
    """`load_image` with a fixed channel count, optionally keeping every decoded image in memory so that
    epochs after the first read no files (`cache=True`: for image sets that fit in RAM, with
    `--workers 0`; a worker process would keep its own copy and lose it at the end of the epoch)."""

    def __init__(self, in_chans: int, size_hint: int | None = None, cache: bool = False):
        self.in_chans, self.size_hint = in_chans, size_hint
        self.cache: dict | None = {} if cache else None

    def __call__(self, path) -> Image.Image:
        if self.cache is None:
            return load_image(path, self.in_chans, self.size_hint)
        img = self.cache.get(path)
        if img is None:  # transforms return new images, so the cached one is never changed
            img = self.cache[path] = load_image(path, self.in_chans, self.size_hint)
        return img


class ImageList(Dataset):
    """Images given by path (relative to `root` if given); yields (tensor, index). Labels are ignored.

    With `skip_bad=True` (the wild pool) it yields (tensor or None, index, reason): an unreadable file
    gives None and the reason instead of raising; `collate_skipping` drops those from the batch."""

    def __init__(self, paths, root=None, transform=None, in_chans: int = 3, size_hint=None,
                 skip_bad: bool = False, cache: bool = False):
        self.paths, self.root, self.transform, self.skip_bad = paths, root, transform, skip_bad
        self.loader = ImageLoader(in_chans, size_hint, cache)

    def __len__(self):
        return len(self.paths)

    def _load(self, i):
        path = os.path.join(self.root, self.paths[i]) if self.root is not None else self.paths[i]
        img = self.loader(path)
        return self.transform(img) if self.transform else img

    def __getitem__(self, i):
        if not self.skip_bad:
            return self._load(i), i
        try:
            self.paths[i].encode("utf-8")  # the score table stores UTF-8: a name that is not is a failure too
            return self._load(i), i, ""
        except Exception as e:  # one bad file must not end the run: report it instead
            return None, i, failure_reason(e)


def failure_reason(e: BaseException) -> str:
    """One line naming why a file could not be used, e.g. 'UnidentifiedImageError: cannot identify ...'."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def collate_skipping(batch):
    """Collate (image or None, index, reason) triples -> (images or None, indices, [(index, reason), ...]).

    Failed items are dropped from the batch; `images` is None when every item failed."""
    good = [(x, i) for x, i, _ in batch if x is not None]
    failed = [(i, reason) for x, i, reason in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.long), failed


def labeled_folder(root, classes: list[str], transform, in_chans: int, cache: bool = False) -> datasets.ImageFolder:
    """An ImageFolder whose class folders must be exactly the teacher's classes; targets are the
    teacher's class indices. `cache`: keep the decoded images in memory (see ImageLoader)."""
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
                                  loader=ImageLoader(in_chans, cache=cache), is_valid_file=is_image_file)
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


HOLDOUT_MAX = 10_000  # a fractional holdout takes at most this many images


def holdout_count(holdout, n: int) -> int:
    """How many of `n` distinct selected images `holdout` means: a fraction in (0, 1) of them (rounded, at
    least 1, at most HOLDOUT_MAX) or a whole number >= 1 (500 or 500.0). At least one must be left to train on."""
    number = isinstance(holdout, numbers.Real) and not isinstance(holdout, bool)
    count = number and holdout >= 1 and float(holdout).is_integer()  # 500 or 500.0
    if not count and not (number and 0 < holdout < 1):
        raise AttnprobeError(f"--holdout {holdout} is neither a fraction in (0, 1) nor a whole number of images "
                             ">= 1; write e.g. 0.1 or 500")
    k = int(holdout) if count else min(HOLDOUT_MAX, max(1, round(holdout * n)))
    if k >= n:
        raise AttnprobeError(f"--holdout {holdout} holds out {k} of the {n} selected images and leaves none to train "
                             "on; hold out fewer")
    return k


def split_holdout(paths: list[str], holdout, seed: int) -> tuple[list[str], list[str]]:
    """(training paths, held-out paths) of a selection: a fixed part held out to measure the student's
    fidelity to the teacher, drawn from the distinct paths by a generator seeded with `seed` alone, so the
    split is the same on resume and under any number of processes. A path listed more than once is held out
    with all its rows; the training paths keep the selection's order and repeats, the held-out ones its order."""
    distinct = list(dict.fromkeys(paths))
    k = holdout_count(holdout, len(distinct))
    g = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(len(distinct), generator=g)[:k].tolist())
    held_paths = [p for i, p in enumerate(distinct) if i in held]
    held_set = set(held_paths)
    return [p for p in paths if p not in held_set], held_paths


def stratified_split(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, validation indices): `fraction` of each class's items (rounded; at least one, and
    at least one left for training, where the class has two or more) drawn with a generator seeded by `seed`."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
        raise AttnprobeError(f"--val-split {fraction} is not a fraction in (0, 1); write e.g. 0.1")
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    val = []
    for t in sorted(by_class):
        items = by_class[t]
        k = min(max(1, round(fraction * len(items))), len(items) - 1)
        val += [items[i] for i in torch.randperm(len(items), generator=g)[:k].tolist()]
    if not val:
        raise AttnprobeError(f"--val-split {fraction} takes no image: no class has two or more; add a val/ folder")
    held = set(val)
    return [i for i in range(len(targets)) if i not in held], sorted(val)


def make_loader(dataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0,
                drop_last: bool = False, sampler=None, batch_sampler=None, collate_fn=None,
                pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader with our defaults: pinned memory when CUDA is there (or as told), persistent
    workers, a seeded generator. With `batch_sampler`, batch_size/shuffle/drop_last/sampler are unused."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn,
                          pin_memory=pin, persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, drop_last=drop_last, pin_memory=pin, collate_fn=collate_fn,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
