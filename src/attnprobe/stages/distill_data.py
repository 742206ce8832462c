"""What distill trains and measures on: the training batches and the held-out fidelity measure, either from
the decoded selection (io/decoded.py: each selected image decoded once at the teacher's input size, then
gathered and augmented in batches on the device) or, with --no-decode-cache, as before: every image decoded
and augmented again in every epoch by the DataLoader's workers."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from ..errors import AttnprobeError
from ..io.datasets import ImageList, Unreadable, labeled_folder, per_class_subset, split_holdout
from ..io.decoded import DecodedStore, row_sources
from ..io.folders import class_dir
from ..io.images import ImageLoader, eval_transform, train_transform
from ..io.tar_members import MemberLoader
from ..training.decoded_batches import DecodedBatches, DecodedEval
from ..training.distributed import barrier, is_main, rank, world_size
from ..training.engine import fidelity, predict, skipped_line
from ..training.loop import eval_loader, train_loader
from ..training.resume import rng_state, set_rng_state

DEVICE_SHARE = 0.25  # --decoded-on auto: to a GPU when the decoded images take under this share of its free memory


@dataclasses.dataclass
class DistillData:
    """`n`: the training images (one per selected row, repeats kept, unreadable ones dropped on the decoded
    path); `held`: the held-out images as split (the count a checkpoint records); `loader()`: the training
    batches (made after the data streams are seeded); `measure(teacher)`: measure(student) -> {fidelity,
    fidelity_n} on the held-out images, the teacher's predictions computed once, here."""
    n: int
    held: int
    loader: object
    measure: object


def distill_data(s, *, t_info: dict, wild, selection, paths: list[str], members: dict | None, device,
                 progress: bool) -> DistillData:
    """The data of a distillation (`s`: its DistillSettings): the decoded selection, or today's path."""
    if s.no_decode_cache:
        return _decoding(s, t_info, wild, paths, members, device, progress)
    return _decoded(s, t_info, wild, selection, paths, members, device, progress)


def _labeled_paths(s, t_info: dict) -> list[str]:
    """The labeled `per_class` images mixed in (--labeled --per-class), or none."""
    if not (s.labeled and s.per_class > 0):
        return []
    labeled_ds = labeled_folder(class_dir(s.labeled, t_info["classes"], "train"), t_info["classes"], None,
                                t_info["in_chans"])
    return per_class_subset(labeled_ds, s.per_class, s.seed)


# ---- today's path: decode and augment every image in every epoch ----------------------------------------------

def _decoding(s, t_info, wild, paths, members, device, progress) -> DistillData:
    # a shard pool's members are read by offset from their tar files; a folder's images by their paths
    wild_loader = MemberLoader(members, t_info["in_chans"], cache=s.cache_images) if members is not None else None
    train_paths, held = split_holdout(paths if wild_loader else [os.path.join(wild, p) for p in paths], s.holdout,
                                      s.seed)
    train_ds = ImageList(train_paths, transform=train_transform(t_info, s.flip, s.affine, resize=s.resize),
                         in_chans=t_info["in_chans"], cache=s.cache_images, loader=wild_loader)
    labeled = _labeled_paths(s, t_info)
    if labeled:  # used like wild images (teacher-supervised, same augmentation), but always cropped, not stretched
        mixed = ImageList(labeled, transform=train_transform(t_info, s.flip, s.affine), in_chans=t_info["in_chans"],
                          cache=s.cache_images)
        train_ds = ConcatDataset([train_ds, mixed])

    def measure(teacher_net):
        ds = ImageList(held, transform=eval_transform(t_info, resize=s.resize), in_chans=t_info["in_chans"],
                       cache=s.cache_images, loader=wild_loader)
        return _fidelity(teacher_net, eval_loader(ds, s.batch_size, s.workers), device, progress)

    return DistillData(len(train_ds), len(held), lambda: train_loader(train_ds, s.batch_size, s.workers, s.seed),
                       measure)


def _fidelity(teacher_net, loader, device, progress):
    """measure(student) on `loader`'s images, seen as the teacher sees them; its predictions computed once."""
    teacher_pred = predict(teacher_net, loader, device, progress)

    def measure(student) -> dict:
        f = fidelity(student, loader, teacher_pred, device, progress)
        return {"fidelity": f["fidelity"], "fidelity_n": f["n"]}
    return measure


# ---- the decoded selection --------------------------------------------------------------------------------------

def decode_cache_dir(s, selection) -> Path:
    """--decode-cache, or SEL.decoded/ beside the selection SEL.parquet."""
    return Path(s.decode_cache) if s.decode_cache else Path(selection).with_suffix(".decoded")


def _decoded(s, t_info, wild, selection, paths, members, device, progress) -> DistillData:
    train_paths, held = split_holdout(paths, s.holdout, s.seed)  # the split of today's path: same distinct order
    labeled = [os.path.abspath(p) for p in _labeled_paths(s, t_info)]  # keyed by their absolute paths
    wild_sources = row_sources(list(dict.fromkeys(paths)), wild=wild, members=members)
    labeled_sources = row_sources(list(dict.fromkeys(labeled)), wild=s.labeled) if labeled else []
    groups = {s.resize: list(wild_sources)}
    groups.setdefault("crop", []).extend(labeled_sources)
    row_loader = RowLoader(members, t_info["in_chans"])
    where, stores, failed = {}, [], []  # row key -> (its store's number in `stores`, store row)
    folder = decode_cache_dir(s, selection)
    state = rng_state()  # decoding or not (a store built earlier) leaves the random streams as they were
    for resize, sources in groups.items():
        if not sources:
            continue
        store = DecodedStore.at(folder, info=t_info, resize=resize)  # refuses an unwritable folder
        rows = store.ensure(sources, loader=row_loader, workers=s.workers, progress=progress, rank=rank(),
                            world=world_size(), barrier=barrier)
        where.update((src.key, (len(stores), int(r))) for src, r in zip(sources, rows, strict=True))
        stores.append(store)
        failed += store.unreadable(sources)
    set_rng_state(state)
    if failed and is_main():  # listed once, as the DataLoaders of today's path list them
        shown = [Unreadable(key if members is not None or os.path.isabs(key) else os.path.join(wild, key), reason)
                 for key, reason in sorted(failed)]
        print(skipped_line(shown), file=sys.stderr, flush=True)
    train_keys = [p for p in train_paths + labeled if where[p][1] >= 0]
    held_keys = [p for p in held if where[p][1] >= 0]
    for keys, what, n in ((train_keys, "training", len(train_paths) + len(labeled)),
                          (held_keys, "held-out", len(held))):
        if not keys:
            raise AttnprobeError(f"none of the {n} {what} images could be read (e.g. {failed[0][0]}: {failed[0][1]}); "
                                 "check the pool's files")
    gather, position = _place(s, stores, [where[k] for k in dict.fromkeys(train_keys + held_keys)], device)
    train_rows = np.array([position[where[k]] for k in train_keys], dtype=np.int64)
    held_rows = np.array([position[where[k]] for k in held_keys], dtype=np.int64)
    norm = {"mean": t_info["mean"], "std": t_info["std"]}
    size = t_info["img_size"]

    def loader():
        return DecodedBatches(gather, train_rows, batch_size=s.batch_size, seed=s.seed, device=device, flip=s.flip,
                              affine=s.affine, size=size, rank=rank(), world=world_size(), **norm)

    def measure(teacher_net):
        held_batches = DecodedEval(gather, held_rows, batch_size=s.batch_size, device=device, rank=rank(),
                                   world=world_size(), **norm)
        return _fidelity(teacher_net, held_batches, device, progress)

    return DistillData(len(train_rows), len(held), loader, measure)


class RowLoader:
    """A row's image by its open_path: a tar member by offset (shard pools), or a file (folders, labeled images)."""

    def __init__(self, members: dict | None, in_chans: int):
        self.members = MemberLoader(members, in_chans) if members is not None else None
        self.files = ImageLoader(in_chans)

    def __call__(self, path):
        if self.members is not None and path in self.members.index:
            return self.members(path)
        return self.files(path)


def _place(s, stores: list, pairs: list[tuple[int, int]], device) -> tuple:
    """(gather, position): the distinct (store number, store row) pairs numbered 0..n-1 (`position`), and
    gather(index) -> uint8 [B, C, H, W] of those numbers: from the memory-mapped stores (host), or from one tensor
    of them all in the device's memory (--decoded-on device, or auto on a GPU where they fit comfortably)."""
    position = {pair: i for i, pair in enumerate(pairs)}
    part = np.array([k for k, _ in pairs], dtype=np.int64)
    store_row = np.array([r for _, r in pairs], dtype=np.int64)
    device = torch.device(device)
    nbytes = sum(stores[k].nbytes_per_image for k, _ in pairs)
    if s.decoded_on == "device" or (s.decoded_on == "auto" and device.type == "cuda"
                                    and nbytes < DEVICE_SHARE * torch.cuda.mem_get_info(device)[0]):
        mine = [np.nonzero(part == k)[0] for k in range(len(stores))]
        whole = torch.cat([stores[k].tensor(store_row[m]) for k, m in enumerate(mine)])
        if len(stores) > 1:  # back in the order of the positions
            whole = whole[torch.from_numpy(np.argsort(np.concatenate(mine), kind="stable"))]
        whole = whole.to(device)
        return (lambda index: whole[torch.as_tensor(index, device=whole.device)]), position

    def gather(index) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64)
        if len(stores) == 1:
            return stores[0].gather(store_row[index])
        out = None
        for k, store in enumerate(stores):
            mine = np.nonzero(part[index] == k)[0]
            if len(mine):
                x = store.gather(store_row[index[mine]])
                if out is None:
                    out = torch.empty((len(index), *x.shape[1:]), dtype=torch.uint8)
                out[torch.from_numpy(mine)] = x
        return out
    return gather, position
