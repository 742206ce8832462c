"""`attnprobe score` under torchrun with N processes vs 1, on the CPU: the tables must match, and the
throughput ratio is printed.

Builds a pool of small JPEGs (CIFAR-like 32..48 px) and a random-init ap_teacher_32 checkpoint (or one
given by --teacher), then runs `score` once in one process (torch's default threads) and once under
`python -m torch.distributed.run --standalone --nproc_per_node N` (OMP_NUM_THREADS = CPUs / N each).
Times are wall clock of the whole command (interpreter start, listing, scoring, merge).

    python benchmarks/bench_score_torchrun.py [--images 1024] [--nproc 2] [--workers 0]
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attnprobe.io.checkpoints import save_checkpoint
from attnprobe.io.tables import read_table
from attnprobe.models import build_model, describe, resolve_model


def run(cmd, env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--teacher", default=None)
    args = p.parse_args()
    cpus = os.cpu_count()
    print(f"{platform.platform()}, {cpus} CPUs, torch {torch.__version__}, device cpu")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        rng = np.random.default_rng(0)
        for i in range(args.images):
            s = int(rng.integers(32, 49))
            (d / "wild" / f"{i % 16:02d}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)).save(d / "wild" / f"{i % 16:02d}" / f"{i}.jpg")
        teacher = args.teacher
        if teacher is None:
            torch.manual_seed(0)
            arch, kw = resolve_model("ap_teacher_32")
            model = build_model(arch, kw, 10)
            teacher = d / "teacher.pt"
            save_checkpoint(teacher, model, describe(model, arch, kw, [str(c) for c in range(10)],
                                                     [0.5] * 3, [0.25] * 3))
        common = ["score", "--teacher", str(teacher), "--wild", str(d / "wild"), "--batch-size",
                  str(args.batch_size), "--chunk-size", str(args.chunk_size), "--workers", str(args.workers),
                  "--no-progress", "--device", "cpu"]
        env1 = {**os.environ}
        env1.pop("OMP_NUM_THREADS", None)
        t1 = run([sys.executable, "-m", "attnprobe.cli", *common, "--out", str(d / "one.parquet")], env1)
        envn = {**os.environ, "OMP_NUM_THREADS": str(max(cpus // args.nproc, 1))}
        tn = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                  str(args.nproc), "-m", "attnprobe.cli", *common, "--out", str(d / "many.parquet")], envn)
        a, b = read_table(d / "one.parquet")[0], read_table(d / "many.parquet")[0]
        same_rows = list(a.path) == list(b.path)
        same_pred = bool((a.pred.to_numpy() == b.pred.to_numpy()).all())
        cols = [c for c in a.columns if c == "outlier" or c.startswith("probe_")]
        diff = max(float(np.abs(a[c].to_numpy() - b[c].to_numpy()).max()) for c in cols)
        diff = max(diff, float(np.abs(np.stack(a.probs) - np.stack(b.probs)).max()))
        print(f"{args.images} images, ap_teacher_32 (random init), batch {args.batch_size}, chunk {args.chunk_size}, "
              f"workers {args.workers}")
        print(f"1 process: {t1:.1f} s ({args.images / t1:.1f} img/s) | torchrun {args.nproc} processes: {tn:.1f} s "
              f"({args.images / tn:.1f} img/s) | throughput ratio {t1 / tn:.2f}")
        print(f"tables: same rows and order {same_rows}, same pred {same_pred}, max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
