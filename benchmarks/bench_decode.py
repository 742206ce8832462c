"""JPEG decode + resize with draft mode (attnprobe.io.images.load_image with size_hint) vs full decode + resize.

Writes its own ImageNet-size photo-like JPEGs (500x375 to 1000x750, smooth colour fields with edges
and grain, quality 90), then times load_image(path, 3, size_hint=t) + Resize(t) + CenterCrop(t)
against a full decode (load_image without size_hint) + the same resize, at t = 32 and 224.

    python benchmarks/bench_decode.py [--images 48] [--reps 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision import transforms

from attnprobe.io.images import load_image

SIZES = [(500, 375), (640, 480), (800, 600), (1000, 750), (375, 500), (750, 1000)]


def photo(rng, w, h) -> Image.Image:
    base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(10, min(w, h) // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    a = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device cpu (decoding), "
          f"Pillow {Image.__version__}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(args.images):
            w, h = SIZES[i % len(SIZES)]
            paths.append(os.path.join(d, f"{i}.jpg"))
            photo(rng, w, h).save(paths[-1], quality=90)
        print(f"{len(paths)} JPEGs, sizes {sorted(set(SIZES[i % len(SIZES)] for i in range(args.images)))}")
        for t in (32, 224):
            resize = transforms.Compose([transforms.Resize(t), transforms.CenterCrop(t), transforms.PILToTensor()])

            def run(hint):
                return [resize(load_image(p, 3, hint)) for p in paths]
            run(t), run(None)  # warm the page cache
            times = {"draft": [], "full": []}
            for _ in range(args.reps):
                for name, hint in (("draft", t), ("full", None)):
                    start = time.perf_counter()
                    out = run(hint)
                    times[name].append(time.perf_counter() - start)
                    if name == "draft":
                        fast = out
                    else:
                        full = out
            diff = torch.stack([(a.float() - b.float()).abs().mean() for a, b in zip(fast, full)]).mean().item()
            td, tf = statistics.median(times["draft"]), statistics.median(times["full"])
            print(f"target {t:3d}: draft {len(paths) / td:7.1f} img/s | full {len(paths) / tf:7.1f} img/s | "
                  f"speed-up draft/full {tf / td:.2f}x | mean |draft - full| {diff:.2f} (of 255)")


if __name__ == "__main__":
    main()
