"""Datasets over images: a list of paths (wild images, tar members), labeled class folders checked against the
teacher's classes, and the teacher-normalised transforms every image goes through."""
from __future__ import annotations

import functools
import numbers
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import datasets

from ..errors import AttnprobeError
from .folders import class_folders, folder_failure, is_hidden, is_image_file
from .images import ImageLoader


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
            folder_failure(path)
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
