"""Datasets and transforms: the wild-folder reader, labeled class folders checked against the
teacher's classes, and the teacher-normalised transforms every image goes through."""
from __future__ import annotations

import functools
import numbers
import os
import warnings
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import datasets, transforms

from .errors import AttnprobeError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def is_hidden(name: str) -> bool:
    """Names starting with '.' (.ipynb_checkpoints, .DS_Store, macOS's ._x.jpg) are never classes or images."""
    return name.startswith(".")


def class_folders(root) -> list[str]:
    """The class names of a folder of class folders: its sub-folders, sorted, hidden ones left out."""
    return sorted(d.name for d in Path(root).iterdir() if d.is_dir() and not is_hidden(d.name))


def iter_images(root) -> Iterator[str]:
    """Image files under root, recursively, as '/'-separated paths relative to root, in sorted order.
    Hidden files and folders (names starting with '.') are left out.

    A sub-folder that cannot be listed (no permission, or a symlink back to a folder above it) does not end
    the walk: it is yielded as 'rel/' (trailing slash), and the pass that reads the files reports it with
    the reason among the skipped files (ImageList). Walks with os.scandir in sorted order so a million-file
    tree streams without a second copy."""
    root = os.fspath(root)

    def walk(rel, above):
        try:
            with os.scandir(os.path.join(root, rel) if rel else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if not rel:
                raise AttnprobeError(f"image folder {root} cannot be listed ({e.strerror or e}); "
                                     "check its permissions") from None
            yield f"{rel}/"
            return
        for e in entries:
            if is_hidden(e.name):
                continue
            path = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir(follow_symlinks=True):
                try:
                    st = os.stat(e.path)
                    key = (st.st_dev, st.st_ino)
                except OSError:
                    yield f"{path}/"
                    continue
                if key in above:  # a symlink back to a folder above: would never end
                    yield f"{path}/"
                    continue
                yield from walk(path, above | {key})
            elif is_image_file(e.name):
                yield path
    try:
        st = os.stat(root)
        top = {(st.st_dev, st.st_ino)}
    except OSError:
        top = set()
    yield from walk("", top)


def _folder_failure(path) -> None:
    """Raise the reason why a folder entry of `iter_images` ('rel/') was not read."""
    with os.scandir(path):  # raises the listing's own error (PermissionError ...) if it still fails
        pass
    raise OSError("folder not read: it could not be listed, or it links back to a folder above it (symlink loop)")


def _check_root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise AttnprobeError(f"image folder {root} {'is a file, not a folder' if root.exists() else 'does not exist'}; pass the folder that holds the images")
    return root


def _no_images(root):
    if any(Path(root).glob("*.tar")):  # a pool of tar shards: they are named by a pattern, not by their folder
        return AttnprobeError(f"image folder {root} holds tar shards, not images; pass the shards: "
                              f"--wild '{os.path.join(root, '*.tar')}'")
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


# Decode limits, checked on the size a file declares in its header, before anything is decoded. Pillow's
# own guard looks only at the pixel count; a 1 x 100000 strip passes it, and the shorter-side resize then
# makes it 224 x 22,400,000. Larger or more elongated images are skipped as unreadable, with the reason.
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit (about 9459 x 9459)
MAX_IMAGE_SIDE = 40_000  # pixels, either side
MAX_ASPECT = 100  # longer side / shorter side


class ImageSizeError(ValueError):
    """An image whose declared size is outside the decode limits (not decoded)."""


def check_declared_size(size) -> None:
    """Raise ImageSizeError if an image of `size` (width, height) is outside the decode limits."""
    w, h = size
    if (min(w, h) < 1 or max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS
            or max(w, h) > MAX_ASPECT * min(w, h)):
        raise ImageSizeError(f"declares {w} x {h} px, outside the decode limits (sides 1..{MAX_IMAGE_SIDE} px, "
                             f"at most {MAX_IMAGE_PIXELS} px, aspect ratio at most {MAX_ASPECT}:1); not decoded")


# EXIF orientation (tag 0x0112) -> the transpose that shows the image upright (as ImageOps.exif_transpose)
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block does not make the pixels unreadable: show them as stored
        return 1


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

    Palettes, alpha (composited on black), CMYK, 16-bit and float images are converted properly; the
    EXIF orientation is applied (the image comes out upright, as ImageOps.exif_transpose). A
    decompression-bomb-sized image raises PIL's DecompressionBombError and one outside the decode limits
    (check_declared_size: side, pixel count, aspect ratio) raises ImageSizeError, both before anything is
    decoded; truncated or corrupt files raise as PIL does. JPEGs much larger than needed are decoded at
    reduced scale (draft mode: the result keeps both sides >= size_hint), the exact resize follows."""
    mode = "L" if in_chans == 1 else "RGB"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img_file = Image.open(path)
        except Image.DecompressionBombWarning as e:
            raise Image.DecompressionBombError(str(e)) from None
    with img_file as img:
        check_declared_size(img.size)
        if size_hint and img.format == "JPEG":
            img.draft(mode, (size_hint, size_hint))
        if img.mode in _WIDE_MODES:
            img = _to_8bit(img)
        elif img.mode in ("P", "LA", "RGBA", "PA", "La", "RGBa") or "transparency" in img.info:
            img = img.convert("RGBA")  # resolve palettes and keep alpha for compositing below
            background = Image.new("RGBA", img.size, (0, 0, 0, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert(mode)
        method = _ORIENT.get(_orientation(img_file))
        return img.transpose(method) if method is not None else img


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


class Unreadable:
    """What a dataset yields instead of (image, target) for a file it could not read: the path and the
    reason. `collate_robust` takes them out of the batch; the engine's loops count and report them."""
    __slots__ = ("path", "reason")

    def __init__(self, path, reason: str):
        self.path, self.reason = os.fspath(path), reason

    def __reduce__(self):
        return Unreadable, (self.path, self.reason)

    def __repr__(self):
        return f"Unreadable({self.path!r}, {self.reason!r})"


def collate_robust(batch):
    """default_collate for batches that may hold Unreadable items: without any, exactly default_collate's
    [images, targets]; with some, [images, targets, [Unreadable, ...]] of the readable ones ([None, None,
    [...]] when none is), so one bad file never ends an epoch."""
    failed = [b for b in batch if isinstance(b, Unreadable)]
    if not failed:
        return default_collate(batch)
    good = [b for b in batch if not isinstance(b, Unreadable)]
    return [*(default_collate(good) if good else (None, None)), failed]


class ImageList(Dataset):
    """Images given by path (relative to `root` if given); yields (tensor, index). Labels are ignored.
    A file that cannot be read yields Unreadable(path, reason) instead (see collate_robust).

    With `skip_bad=True` (the wild pool) it yields (tensor or None, index, reason): an unreadable file
    gives None and the reason instead of raising; `collate_skipping` drops those from the batch."""

    def __init__(self, paths, root=None, transform=None, in_chans: int = 3, size_hint=None,
                 skip_bad: bool = False, cache: bool = False, loader: ImageLoader | None = None):
        self.paths, self.root, self.transform, self.skip_bad = paths, root, transform, skip_bad
        # `loader`: another source of the images by path (shards.MemberLoader: members of tar shards)
        self.loader = loader if loader is not None else ImageLoader(in_chans, size_hint, cache)

    def __len__(self):
        return len(self.paths)

    def _path(self, i):
        return os.path.join(self.root, self.paths[i]) if self.root is not None else self.paths[i]

    def _read(self, path):
        if os.fspath(path).endswith(("/", os.sep)):  # a folder iter_images could not list
            _folder_failure(path)
        return self.loader(path)

    def _load(self, i):
        img = self._read(self._path(i))
        return self.transform(img) if self.transform else img

    def __getitem__(self, i):
        if not self.skip_bad:
            path = self._path(i)
            try:
                img = self._read(path)
            except Exception as e:  # one bad file must not end the run: skipped and reported
                return Unreadable(path, failure_reason(e))
            return (self.transform(img) if self.transform else img), i
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


def _visible_image(root: str, path: str) -> bool:
    """An image file with no hidden part (name starting with '.') below `root`."""
    rel = os.path.relpath(path, root)
    return is_image_file(path) and not any(is_hidden(part) for part in Path(rel).parts)


class LabeledFolder(datasets.ImageFolder):
    """ImageFolder without hidden classes or files; a file that cannot be read yields Unreadable(path,
    reason) instead of (image, target), so that collate_robust drops it and the epoch goes on."""

    def find_classes(self, directory):
        classes = class_folders(directory)
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {c: i for i, c in enumerate(classes)}

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            img = self.loader(path)
        except Exception as e:  # one bad file must not end the run: skipped and reported
            return Unreadable(path, failure_reason(e))
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def labeled_folder(root, classes: list[str], transform, in_chans: int, cache: bool = False) -> datasets.ImageFolder:
    """An ImageFolder whose class folders must be exactly the teacher's classes; targets are the
    teacher's class indices. Hidden folders and files (names starting with '.') are left out; an
    unreadable image is skipped (LabeledFolder). `cache`: keep the decoded images in memory (see ImageLoader)."""
    root = Path(root)
    if not root.is_dir():
        raise AttnprobeError(f"labeled folder {root} does not exist; pass a folder of class folders")
    found = class_folders(root)
    if sorted(found) != sorted(classes):
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise AttnprobeError(f"classes of {root} are not the model's (missing {missing[:5]}, unexpected {extra[:5]}); "
                             "pass a folder with one sub-folder per class of the teacher")
    try:
        ds = LabeledFolder(root, transform=transform, loader=ImageLoader(in_chans, cache=cache),
                           is_valid_file=functools.partial(_visible_image, os.fspath(root)))
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
    workers, a seeded generator, collate_robust (unreadable files dropped from their batch) unless
    `collate_fn` is given. With `batch_sampler`, batch_size/shuffle/drop_last/sampler are unused."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    collate_fn = collate_fn or collate_robust
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn,
                          pin_memory=pin, persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, drop_last=drop_last, pin_memory=pin, collate_fn=collate_fn,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
