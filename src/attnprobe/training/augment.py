"""The training augmentation of io.images.train_transform, applied to a whole uint8 batch on its device.

Today's path augments each decoded PIL image on the host: RandomCrop(size, padding=4) (zeros around the
image, then a window at offsets drawn uniformly in 0..8 on each axis) or, with `--affine`, RandomAffine(10
degrees, translate 0.08, scale 0.9..1.1; nearest, fill 0), then RandomHorizontalFlip (p 0.5), then ToTensor
and Normalize. Here the parameters of a batch are drawn first, on the CPU, from one generator (the loader
generator a checkpoint saves, so that a resumed run draws what an uninterrupted one draws, on any device),
and the batch is then warped by batched tensor ops on its device: a padded crop is a row selection and a
gather (the flip folded into the column index), the affine warp one grid_sample (torchvision's tensor affine,
batched), the normalisation the same float ops as ToTensor and Normalize (so a crop is equal, pixel for
pixel, to today's PIL path with the same offsets; the affine warp to torchvision's tensor warp, which differs
from PIL's nearest sampling at a few pixels on the rounding edge)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PAD = 4                      # RandomCrop(size, padding=4)
DEGREES = 10.0               # RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1))
TRANSLATE = 0.08
SCALE = (0.9, 1.1)


def draw_augmentation(n: int, *, size: tuple[int, int], flip: bool, affine: bool,
                      generator: torch.Generator) -> dict:
    """CPU tensors of the augmentation of `n` images of `size` (H, W), drawn from `generator`:
    `crop` int64 [n, 2] (dy, dx) uniform in 0..2*PAD (the window in the padded image), or, with `affine`,
    `angle` float32 [n] U[-10, 10] degrees, `translate` int64 [n, 2] (tx, ty) = round(U[-0.08 W, 0.08 W]),
    round(U[-0.08 H, 0.08 H]) as RandomAffine rounds them (half to even), `scale` float32 [n] U[0.9, 1.1];
    and `flip` bool [n] (p 0.5) when `flip`."""
    H, W = size
    params: dict = {}
    if affine:
        params["angle"] = torch.empty(n).uniform_(-DEGREES, DEGREES, generator=generator)
        tx = torch.empty(n).uniform_(-TRANSLATE * W, TRANSLATE * W, generator=generator)
        ty = torch.empty(n).uniform_(-TRANSLATE * H, TRANSLATE * H, generator=generator)
        params["translate"] = torch.stack([tx, ty], dim=1).round().long()
        params["scale"] = torch.empty(n).uniform_(*SCALE, generator=generator)
    else:
        params["crop"] = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator)
    if flip:
        params["flip"] = torch.rand(n, generator=generator) < 0.5
    return params


def _stats(values, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)


def normalise(x: torch.Tensor, *, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] (or floats holding 0..255) -> float32 (x / 255 - mean) / std, the same float ops
    as ToTensor then Normalize (so the same values to the bit)."""
    out = x.to(torch.float32).div_(255) if x.dtype != torch.float32 else x.div(255)
    return out.sub_(_stats(mean, x)).div_(_stats(std, x))


def _crop(x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """The H x W window at (dy, dx) of each image padded with PAD zeros on every side (flipped left-right
    where `flip`): whole rows picked by index_select (row copies), then the columns by one gather."""
    B, C, H, W = x.shape
    Hp, Wp = H + 2 * PAD, W + 2 * PAD
    padded = F.pad(x, (PAD, PAD, PAD, PAD))                      # constant 0, any dtype
    dev = x.device
    planes = torch.arange(B * C, device=dev).view(B, C, 1) * Hp  # first padded row of each (image, channel)
    rows = planes + crop[:, 0].view(B, 1, 1) + torch.arange(H, device=dev).view(1, 1, H)
    picked = padded.view(B * C * Hp, Wp).index_select(0, rows.view(-1)).view(B, C, H, Wp)
    cols = torch.arange(W, device=dev).view(1, W)
    if flip is not None:                                         # crop then flip: column j <- W - 1 - j
        cols = torch.where(flip.view(B, 1), W - 1 - cols, cols)
    cols = cols + crop[:, 1].view(B, 1)                          # [B, W]
    return picked.gather(3, cols.view(B, 1, 1, W).expand(B, C, H, W))


def _inverse_matrices(params: dict) -> torch.Tensor:
    """float32 [B, 2, 3]: torchvision's _get_inverse_affine_matrix (centre 0, no shear) of each image,
    computed in float64 as torchvision computes it in Python floats."""
    rot = params["angle"].double() * (math.pi / 180)
    scale = params["scale"].double()
    tx, ty = params["translate"][:, 0].double(), params["translate"][:, 1].double()
    cos, sin = rot.cos(), rot.sin()
    m0, m1, m3, m4 = cos / scale, sin / scale, -sin / scale, cos / scale
    m2 = m0 * -tx + m1 * -ty
    m5 = m3 * -tx + m4 * -ty
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3).float()


def _affine(x: torch.Tensor, params: dict) -> torch.Tensor:
    """RandomAffine's warp of each image (nearest, zeros outside) as torchvision's tensor affine does it
    (its grid: pixel centres, align_corners=False), batched: floats holding 0..255."""
    B, C, H, W = x.shape
    theta = _inverse_matrices(params).to(x.device)
    base = torch.empty(1, H, W, 3, dtype=torch.float32, device=x.device)
    base[..., 0].copy_(torch.linspace(-W * 0.5 + 0.5, W * 0.5 - 0.5, steps=W, device=x.device))
    base[..., 1].copy_(torch.linspace(-H * 0.5 + 0.5, H * 0.5 - 0.5, steps=H, device=x.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * W, 0.5 * H], dtype=torch.float32, device=x.device)
    grid = base.view(1, H * W, 3).expand(B, H * W, 3).bmm(scaled).view(B, H, W, 2)
    return F.grid_sample(x.to(torch.float32), grid, mode="nearest", padding_mode="zeros", align_corners=False)


def apply_augmentation(x: torch.Tensor, params: dict, *, mean, std) -> torch.Tensor:
    """x uint8 [B, C, H, W] on its device, params from draw_augmentation -> float32 normalised: the padded
    crop (or the affine warp), then the flips, then (x / 255 - mean) / std. Batched ops only."""
    flip = params.get("flip")
    flip = flip.to(x.device) if flip is not None else None
    if "crop" in params:
        out = _crop(x, params["crop"].to(x.device), flip)
    else:
        out = _affine(x, params)
        if flip is not None:
            out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
    return normalise(out, mean=mean, std=std)
