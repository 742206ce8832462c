"""Reading one image, upright, in the model's channels, within decode limits; and the transforms that
bring it to the teacher's input (the deterministic geometry, the training augmentation, the
teacher's normalisation)."""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image
from torchvision import transforms

from ..errors import AttnprobeError
from ..method.choices import RESIZE_MODES

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


class CoverResize:
    """Resize so that the image covers H x W with its aspect ratio kept (scale = max(H/h, W/w)); a centre
    crop of H x W follows. For a square size this is torchvision's shorter-side Resize(size)."""

    def __init__(self, size):
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        H, W = self.size
        w, h = img.size
        scale = max(H / h, W / w)
        new = [max(H, round(h * scale)), max(W, round(w * scale))]
        return transforms.functional.resize(img, new, antialias=True)

    def __repr__(self) -> str:
        return f"CoverResize(size={self.size})"


def _geometry(size, resize: str) -> list:
    """The steps that bring any image to the model's input size (an int, or (H, W)).

    `crop`: resize so the image covers the input size with its aspect ratio kept (for a square input: the
    shorter side to the size), then centre crop (the ends of the longer side are lost). `stretch`: resize
    the whole image to the input size (the whole picture is kept, its aspect ratio is not), as the
    reference code does with every wild image."""
    if resize == "crop":
        if isinstance(size, int):
            return [transforms.Resize(size), transforms.CenterCrop(size)]
        return [CoverResize(size), transforms.CenterCrop(size)]
    if resize == "stretch":
        return [transforms.Resize((size, size) if isinstance(size, int) else size)]
    raise AttnprobeError(f"--resize {resize!r} is not one of {RESIZE_MODES}")


def eval_transform(info: dict, *, resize: str = "crop"):
    """Bring the image to the model's input size (`resize`: `crop` = cover the input with the aspect ratio
    kept, then centre crop; `stretch` = the whole image to the input size), normalise with the teacher's
    stats."""
    return transforms.Compose([*_geometry(_size(info), resize), *_normalize(info)])


def decode_transform(info: dict, *, resize: str):
    """The deterministic part of every transform, kept by a decoded selection (io.decoded): the eval geometry
    (`resize` as in eval_transform), then PILToTensor: a PIL image -> uint8 [C, H, W], not normalised. The
    training augmentation and the teacher's normalisation follow on batches (ToTensor's x / 255 of these bytes)."""
    return transforms.Compose([*_geometry(_size(info), resize), transforms.PILToTensor()])


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
