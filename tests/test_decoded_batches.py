"""Batches from a decoded selection, augmented in batches (training/augment.py, training/decoded_batches.py),
against today's per-image path (io.images.train_transform: PIL RandomCrop(padding=4) or RandomAffine, the
flip, ToTensor, Normalize) and today's loaders (DistributedSampler's order, the resumable generator)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from attnprobe.errors import AttnprobeError
from attnprobe.io.images import train_transform
from attnprobe.training.augment import apply_augmentation, draw_augmentation, normalise
from attnprobe.training.decoded_batches import DecodedBatches, DecodedEval, EpochOrder

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
INFO = {"img_size": 32, "mean": MEAN, "std": STD}


def images(n=16, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8))


def pil(x: torch.Tensor) -> Image.Image:
    a = x.permute(1, 2, 0).numpy()
    return Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)


def today(img: Image.Image, mean, std) -> torch.Tensor:
    return transforms.Normalize(mean, std)(transforms.ToTensor()(img))


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


# ---- the drawn parameters ---------------------------------------------------------------------

def test_crop_offsets_uniform_over_0_to_8_and_flip_rate_half():
    p = draw_augmentation(40_000, size=(32, 32), flip=True, affine=False, generator=torch.Generator().manual_seed(1))
    crop = p["crop"].numpy()
    assert crop.min() == 0 and crop.max() == 8 and p["crop"].dtype == torch.int64
    # chi-square of each axis (9 cells, 8 dof: 0.1% critical value 26.1) and of the pair (81 cells, 80 dof: 124.8)
    for axis in (0, 1):
        assert chi_square(np.bincount(crop[:, axis], minlength=9)) < 26.1
    assert chi_square(np.bincount(crop[:, 0] * 9 + crop[:, 1], minlength=81)) < 124.8
    # today's RandomCrop draws from the same range: torch.randint(0, h + 8 - h + 1)
    i, j, h, w = transforms.RandomCrop(32, padding=4).get_params(Image.new("RGB", (40, 40)), (32, 32))
    assert 0 <= i <= 8 and 0 <= j <= 8 and (h, w) == (32, 32)
    rate = p["flip"].float().mean().item()
    assert abs(rate - 0.5) < 4 * (0.25 / 40_000) ** 0.5  # four standard errors
    assert "flip" not in draw_augmentation(4, size=(32, 32), flip=False, affine=False,
                                           generator=torch.Generator())


def test_affine_parameter_ranges():
    H, W = 24, 40
    p = draw_augmentation(20_000, size=(H, W), flip=False, affine=True, generator=torch.Generator().manual_seed(2))
    assert "crop" not in p and "flip" not in p
    angle, scale, (tx, ty) = p["angle"], p["scale"], p["translate"].T
    assert -10 <= angle.min() < -9.9 and 9.9 < angle.max() <= 10
    assert 0.9 <= scale.min() < 0.901 and 1.099 < scale.max() <= 1.1
    # translate: round(U[-0.08 W, 0.08 W]) = -3..3 for W = 40 (3.2), -2..2 for H = 24 (1.92), as RandomAffine
    assert set(tx.tolist()) == set(range(-3, 4)) and set(ty.tolist()) == set(range(-2, 3))
    assert abs(angle.mean().item()) < 0.2 and abs(scale.mean().item() - 1) < 0.002
    # RandomAffine's own draws cover the same ranges
    a, (dx, dy), s, shear = transforms.RandomAffine(10, (0.08, 0.08), (0.9, 1.1)).get_params(
        [-10.0, 10.0], [0.08, 0.08], [0.9, 1.1], None, [W, H])
    assert -10 <= a <= 10 and -3 <= dx <= 3 and -2 <= dy <= 2 and 0.9 <= s <= 1.1 and shear == (0.0, 0.0)


def test_draws_come_from_the_generator_alone():
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed + 99)  # the global stream plays no part
        return draw_augmentation(64, size=(32, 32), flip=True, affine=False, generator=g)
    a, b = draw(5), draw(5)
    assert torch.equal(a["crop"], b["crop"]) and torch.equal(a["flip"], b["flip"])
    assert not torch.equal(a["crop"], draw(6)["crop"])


# ---- the pixels -------------------------------------------------------------------------------

@pytest.mark.parametrize("c,h,w", [(3, 32, 32), (1, 28, 28), (3, 24, 40)])
def test_crop_and_flip_equal_todays_pil_path_pixel_for_pixel(c, h, w):
    x = images(24, c, h, w, seed=c + h)
    mean, std = MEAN[:c], STD[:c]
    p = draw_augmentation(len(x), size=(h, w), flip=True, affine=False, generator=torch.Generator().manual_seed(3))
    out = apply_augmentation(x, p, mean=mean, std=std)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for k in range(len(x)):  # RandomCrop(size, padding=4): pad with 0, crop at (i, j); then the flip
        dy, dx = p["crop"][k].tolist()
        img = TF.crop(TF.pad(pil(x[k]), 4, fill=0), dy, dx, h, w)
        if p["flip"][k]:
            img = TF.hflip(img)
        assert torch.equal(out[k], today(img, mean, std)), k
    assert p["flip"].any() and not p["flip"].all()


def test_padding_is_filled_as_today():
    x = torch.full((9, 3, 32, 32), 200, dtype=torch.uint8)  # a batch of one constant image
    p = {"crop": torch.tensor([[dy, dx] for dy in (0, 4, 8) for dx in (0, 4, 8)])}
    out = apply_augmentation(x, p, mean=MEAN, std=STD)
    zero, value = today(Image.new("RGB", (1, 1), 0), MEAN, STD), today(Image.new("RGB", (1, 1), (200,) * 3), MEAN, STD)
    top_left, centre, bottom_right = out[0], out[4], out[8]
    assert torch.equal(top_left[:, :4, :], zero.expand(3, 4, 32))
    assert torch.equal(top_left[:, :, :4], zero.expand(3, 32, 4))
    assert torch.equal(top_left[:, 4:, 4:], value.expand(3, 28, 28))
    assert torch.equal(centre, value.expand(3, 32, 32))
    assert torch.equal(bottom_right[:, -4:, :], zero.expand(3, 4, 32))
    # today's transform of that image: each pixel is the image's value or the padding's, the same two
    torch.manual_seed(0)
    const = Image.new("RGB", (32, 32), (200,) * 3)
    corners = torch.stack([train_transform(INFO, flip=False)(const)[:, 0, 0] for _ in range(40)])
    assert {tuple(v) for v in corners.tolist()} == {tuple(zero.flatten().tolist()), tuple(value.flatten().tolist())}


def test_affine_equals_torchvision_affine_of_each_image():
    x = images(16, 3, 32, 32, seed=7)
    p = draw_augmentation(len(x), size=(32, 32), flip=True, affine=True, generator=torch.Generator().manual_seed(4))
    out = apply_augmentation(x, p, mean=MEAN, std=STD)
    mismatched = 0
    for k in range(len(x)):
        tx, ty = p["translate"][k].tolist()
        ref = TF.affine(x[k], angle=float(p["angle"][k]), translate=[tx, ty], scale=float(p["scale"][k]),
                        shear=[0.0, 0.0], interpolation=transforms.InterpolationMode.NEAREST, fill=0)
        if p["flip"][k]:
            ref = TF.hflip(ref)
        want = normalise(ref.unsqueeze(0), mean=MEAN, std=STD)[0]
        mismatched += int((out[k] != want).any(dim=0).sum())
        # and today's PIL warp: nearest sampling differs only at a few pixels on the rounding edge
        pil_ref = TF.affine(pil(x[k]), angle=float(p["angle"][k]), translate=[tx, ty], scale=float(p["scale"][k]),
                            shear=[0.0, 0.0], interpolation=transforms.InterpolationMode.NEAREST, fill=0)
        if p["flip"][k]:
            pil_ref = TF.hflip(pil_ref)
        assert (out[k] != today(pil_ref, MEAN, STD)).any(dim=0).float().mean() < 0.02, k
    assert mismatched == 0  # the same float32 grid as torchvision builds, batched


def test_affine_fills_zero_outside():
    x = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    p = {"angle": torch.tensor([0.0]), "translate": torch.tensor([[3, 2]]), "scale": torch.tensor([1.0])}
    out = apply_augmentation(x, p, mean=MEAN, std=STD)[0]
    zero, white = normalise(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), mean=MEAN, std=STD)[0], \
        normalise(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), mean=MEAN, std=STD)[0]
    assert torch.equal(out[:, :2, :], zero.expand(3, 2, 32)) and torch.equal(out[:, :, :3], zero.expand(3, 32, 3))
    assert torch.equal(out[:, 2:, 3:], white.expand(3, 30, 29))


def test_normalise_equals_totensor_normalize():
    x = images(4, 3, 8, 8, seed=9)
    out = normalise(x, mean=MEAN, std=STD)
    for k in range(len(x)):
        assert torch.equal(out[k], today(pil(x[k]), MEAN, STD))


# ---- the order and the streams --------------------------------------------------------------------

@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (7, 4), (2, 5), (1, 3)])
def test_epoch_order_is_distributed_samplers(n, world):
    from torch.utils.data import DistributedSampler
    for rank in range(world):
        mine = EpochOrder(n, seed=11, rank=rank, world=world)
        theirs = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=11)
        assert len(mine) == len(theirs)
        for epoch in (0, 1, 5):
            mine.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(mine) == list(theirs) and mine.epoch == epoch


def store(n=50, c=3, size=32):
    """A stand-in for a decoded store: uint8 rows, with the gather a store gives (index -> tensor)."""
    t = images(n, c, size, size, seed=1)
    calls = []

    def gather(index):
        calls.append(np.asarray(index).copy())
        return t[torch.as_tensor(index)]
    return t, gather, calls


def batches(gather, rows, **kw):
    args = dict(batch_size=8, seed=3, device="cpu", flip=True, affine=False, mean=MEAN, std=STD, size=32)
    return DecodedBatches(gather, rows, **{**args, **kw})


def test_batches_follow_the_samplers_order_and_count():
    from attnprobe.training.loop import batches_per_epoch  # one process: world_size() == 1
    t, gather, calls = store()
    rows = np.arange(40, 2, -1)  # store rows of the training images: not 0..n-1
    assert len(batches(gather, rows)) == batches_per_epoch(len(rows), 8)
    for world in (1, 2, 3):
        for rank in range(world):
            calls.clear()
            b = batches(gather, rows, rank=rank, world=world)
            b.sampler.set_epoch(2)
            got = list(b)
            assert len(got) == len(b) == -(-len(rows) // world) // 8
            sampler = EpochOrder(len(rows), seed=3, rank=rank, world=world)
            sampler.set_epoch(2)
            order = sampler.order().numpy()
            assert np.array_equal(np.concatenate(calls), rows[order[:len(b) * 8]])
            assert all(img.shape == (8, 3, 32, 32) and img.dtype == torch.float32 and none is None
                       for img, none in got)


def test_a_single_short_batch_is_kept_and_a_short_last_one_dropped():
    t, gather, _ = store()
    assert [len(x) for x, _ in batches(gather, np.arange(5))] == [5]            # the only batch
    assert [len(x) for x, _ in batches(gather, np.arange(21))] == [8, 8]        # 21 = 8 + 8 + 5: dropped
    with pytest.raises(AttnprobeError, match="unreadable"):
        batches(gather, np.array([0, -1, 2]))
    with pytest.raises(AttnprobeError, match="no images"):
        batches(gather, np.array([], dtype=np.int64))


def test_two_seeded_iterations_are_equal_and_seeds_differ():
    t, gather, _ = store()
    rows = np.arange(50)

    def run(seed, affine=False):
        b = batches(gather, rows, seed=seed, affine=affine)
        out = []
        for epoch in range(2):
            b.sampler.set_epoch(epoch)
            out += [x for x, _ in b]
        return torch.stack(out)
    assert torch.equal(run(3), run(3)) and torch.equal(run(3, affine=True), run(3, affine=True))
    assert not torch.equal(run(3), run(4))


def test_generator_state_resumes_the_same_stream():
    t, gather, _ = store()
    rows = np.arange(50)
    whole = batches(gather, rows)
    epochs = []
    saved = None
    for epoch in range(3):
        whole.sampler.set_epoch(epoch)
        epochs.append(torch.stack([x for x, _ in whole]))
        if epoch == 0:
            saved = whole.generator.get_state()  # what last.pt keeps after epoch 0
    resumed = batches(gather, rows)
    resumed.generator.set_state(saved)
    for epoch in (1, 2):
        resumed.sampler.set_epoch(epoch)
        assert torch.equal(torch.stack([x for x, _ in resumed]), epochs[epoch])
    assert not torch.equal(epochs[1], epochs[2])


def test_batches_from_a_tensor_on_the_device():
    t, _, _ = store()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on = t.to(dev)
    a = batches(lambda i: on[torch.as_tensor(i, device=on.device)], np.arange(50), device=dev)
    b = batches(lambda i: t[torch.as_tensor(i)], np.arange(50), device="cpu")
    for (x, _), (y, _) in zip(a, b):
        assert x.device.type == dev.type
        torch.testing.assert_close(x.cpu(), y, rtol=0, atol=1e-6)


def test_eval_batches_share_by_rank_and_yield_positions():
    t, gather, _ = store()
    rows = np.array([7, 3, 9, 0, 1, 5, 8])
    whole = list(DecodedEval(gather, rows, batch_size=3, device="cpu", mean=MEAN, std=STD))
    assert [len(i) for _, i in whole] == [3, 3, 1]
    assert torch.equal(torch.cat([i for _, i in whole]), torch.arange(7))
    assert torch.equal(torch.cat([x for x, _ in whole]), normalise(t[rows], mean=MEAN, std=STD))
    seen = []
    for rank in range(3):
        e = DecodedEval(gather, rows, batch_size=2, device="cpu", mean=MEAN, std=STD, rank=rank, world=3)
        got = list(e)
        assert len(got) == len(e)
        for x, i in got:
            assert torch.equal(x, normalise(t[rows[i.numpy()]], mean=MEAN, std=STD))
            seen += i.tolist()
    assert sorted(seen) == list(range(7))  # each image once over the ranks, no padding
    empty = DecodedEval(gather, np.array([], dtype=np.int64), batch_size=2, device="cpu", mean=MEAN, std=STD)
    assert len(empty) == 0 and list(empty) == []
