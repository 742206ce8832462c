"""`score` from tar shards against `score` of the same images as files, in one run.

Builds a pool of JPEGs (random sizes, --min-side..--max-side px) twice: as files in a folder (one folder
per shard, as extracted) and as img2dataset-style tar shards (KEY.jpg + KEY.txt + KEY.json, `_stats.json`
beside). A tiny random-init ViT (32 px input, depth 2, width 32) scores both in this process, through the
same API call (attnprobe.stages.score), so that the forward costs little and reading + decoding dominate. The two are timed
interleaved (files, shards, files, shards, ...; the page cache warm for both after the warm-up) and the
ratio of medians files / shards is printed: >= 1.0 means shards are at least as fast (goal).

    python benchmarks/bench_shards.py [--images 4096] [--shard-size 512] [--workers 2] [--reps 3]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attnprobe import score
from attnprobe.io.checkpoints import save_checkpoint
from attnprobe.io.tables import read_table
from attnprobe.models import build_model, describe, resolve_model

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def build_pool(root: Path, images: int, shard_size: int, sides: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    (root / "pool").mkdir(parents=True)
    for s in range(0, images, shard_size):
        stem = f"{s // shard_size:05d}"
        (root / "files" / stem).mkdir(parents=True)
        with tarfile.open(root / "pool" / f"{stem}.tar", "w") as tar:
            for i in range(s, min(s + shard_size, images)):
                w, h = (int(x) for x in rng.integers(sides[0], sides[1] + 1, 2))
                small = rng.integers(0, 255, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, "JPEG", quality=90)
                key = f"{stem}{i % shard_size:04d}"
                (root / "files" / stem / f"{key}.jpg").write_bytes(buf.getvalue())
                for suffix, data in ((".jpg", buf.getvalue()), (".txt", f"caption {i}".encode()),
                                     (".json", json.dumps({"uid": f"{i:032x}", "key": key}).encode())):
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        n = min(shard_size, images - s)
        (root / "pool" / f"{stem}_stats.json").write_text(json.dumps({"count": n, "successes": n}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--min-side", type=int, default=64)
    p.add_argument("--max-side", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), device cpu")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        build_pool(d, args.images, args.shard_size, (args.min_side, args.max_side))
        torch.manual_seed(0)
        arch, kw = resolve_model("vit_tiny_patch16_224", TINY)
        model = build_model(arch, kw, 10)
        teacher = d / "teacher.pt"
        save_checkpoint(teacher, model, describe(model, arch, kw, [str(c) for c in range(10)], [0.5] * 3, [0.25] * 3))
        common = dict(batch_size=args.batch_size, workers=args.workers, progress=False, device="cpu")
        last = (args.images - 1) // args.shard_size
        sources = {"files": d / "files", "shards": f"{d}/pool/{{00000..{last:05d}}}.tar"}
        times = {k: [] for k in sources}
        for rep in range(args.reps + 1):  # the first round warms the page cache and the imports
            for name, wild in sources.items():
                out = d / f"{name}{rep}.parquet"
                t = time.perf_counter()
                summary = score(teacher, wild, out, **common)
                if rep:
                    times[name].append(time.perf_counter() - t)
                assert summary["scored"] == args.images, summary
        a, b = read_table(d / "files1.parquet")[0], read_table(d / "shards1.parquet")[0]
        diff = float(np.abs(a.outlier.to_numpy() - b.outlier.to_numpy()).max())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.images} JPEGs of {args.min_side}..{args.max_side} px, shards of {args.shard_size}, tiny ViT "
          f"(random init), batch {args.batch_size}, {args.workers} workers, {args.reps} timed rounds, interleaved")
    for name in sources:
        print(f"{name}: median {med[name]:.2f} s ({args.images / med[name]:.0f} img/s)  "
              f"[{', '.join(f'{t:.2f}' for t in times[name])}]")
    print(f"ratio files/shards = {med['files'] / med['shards']:.3f}  (goal >= 1.0); same paths "
          f"{list(a.path) == list(b.path)}, max |outlier difference| {diff:.1e}")


if __name__ == "__main__":
    main()
