"""Batches from a decoded selection (io/decoded.py): the uint8 images at the teacher's input size, gathered
a batch at a time and augmented on the device (augment.py). They stand in for training.loop's train_loader
and eval_loader: the same order of images per (seed, epoch, rank), the same `.sampler` and `.generator`
that training.loop.fit and a checkpoint use, so that resuming works as it does with the DataLoaders."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import AttnprobeError
from .augment import apply_augmentation, draw_augmentation, normalise


class EpochOrder:
    """The order of DistributedSampler(shuffle=True, seed, drop_last=False) over n items: a permutation
    drawn from seed + epoch, padded by its own start to a multiple of `world`, this rank's share
    rank::world. Tensor ops (no Python list of the rows)."""

    def __init__(self, n: int, *, seed: int, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise AttnprobeError(f"rank {rank} is not in [0, {world})")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.num_samples = -(-n // world)
        self.total_size = self.num_samples * world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def order(self) -> torch.Tensor:
        """int64 [num_samples]: positions 0..n-1 of this rank's items, in this epoch's order."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        pad = self.total_size - self.n
        if pad:
            perm = torch.cat([perm, perm.repeat(-(-pad // self.n))[:pad]])
        return perm[self.rank:self.total_size:self.world]

    def __iter__(self):
        return iter(self.order().tolist())


def _rows(rows, *, empty_ok: bool = False) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) == 0 and not empty_ok:
        raise AttnprobeError("no images to read from the decoded selection")
    if (rows < 0).any():
        raise AttnprobeError(f"{int((rows < 0).sum())} rows of the decoded selection are unreadable images "
                             "(-1); drop them before making batches")
    return rows


def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if x.device == device:
        return x
    if device.type == "cuda" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


class DecodedBatches:
    """Training batches for training.loop.fit: iterating yields [images (float32, normalised, augmented, on
    `device`), None]; `len()` is the batches per epoch (as training.loop.batches_per_epoch);
    `.sampler.set_epoch(e)` / `.sampler.epoch`, and `.generator` (a CPU generator seeded with seed + rank,
    from which each batch's augmentation is drawn and whose state a checkpoint saves), as train_loader's.

    `gather(index)`: uint8 [B, C, H, W] of the store rows `index` (int64 numpy): a store's gather, or a
    tensor already on the device (`lambda i: t[torch.as_tensor(i, device=t.device)]`). `rows`: the store
    rows of the training images. The order per epoch is DistributedSampler(shuffle=True, seed)'s over
    len(rows); a short last batch is dropped unless it is the only one, as train_loader does."""

    def __init__(self, gather, rows: np.ndarray, *, batch_size: int, seed: int, device, flip: bool,
                 affine: bool, mean, std, size, rank: int = 0, world: int = 1):
        self.gather, self.rows = gather, _rows(rows)
        self.batch_size, self.device = batch_size, torch.device(device)
        self.flip, self.affine, self.mean, self.std = flip, affine, mean, std
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.sampler = EpochOrder(len(self.rows), seed=seed, rank=rank, world=world)
        self.generator = torch.Generator().manual_seed(seed + rank)
        per_process = len(self.sampler)
        self.drop_last = per_process > batch_size
        self.batches = per_process // batch_size if self.drop_last else 1

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        order = self.sampler.order().numpy()
        for b in range(self.batches):
            index = self.rows[order[b * self.batch_size:(b + 1) * self.batch_size]]
            params = draw_augmentation(len(index), size=self.size, flip=self.flip, affine=self.affine,
                                       generator=self.generator)
            x = _on(self.gather(index), self.device)
            yield [apply_augmentation(x, params, mean=self.mean, std=self.std), None]


class DecodedEval:
    """Held-out images (the fidelity set) from a decoded selection, as training.loop.eval_loader: this rank's
    share rank, rank + world, ... (no padding) in order, yielding [normalised images on `device`, index]
    where index (int64, CPU) is each image's position in `rows` (the dataset index engine.predict and
    engine.fidelity key the teacher's predictions by)."""

    def __init__(self, gather, rows, *, batch_size, device, mean, std, rank=0, world=1):
        self.gather, self.rows = gather, _rows(rows, empty_ok=True)  # no held-out images: no batches
        self.batch_size, self.device, self.mean, self.std = batch_size, torch.device(device), mean, std
        self.positions = np.arange(rank, len(self.rows), world, dtype=np.int64)

    def __len__(self) -> int:
        return -(-len(self.positions) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.positions), self.batch_size):
            pos = self.positions[start:start + self.batch_size]
            x = _on(self.gather(self.rows[pos]), self.device)
            yield [normalise(x, mean=self.mean, std=self.std), torch.from_numpy(pos)]
