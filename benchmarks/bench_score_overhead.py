"""Scoring throughput / bare teacher forward throughput, on the same batches and model.

The scoring forward is attnprobe.stages.scoring.ScoringForward (the pass's per-batch work: one forward with
hooks on the probed blocks, the CLS attention rows, -log max softmax, softmax, copies to the host).
Image decoding is excluded: both sides see the same in-memory batches. Timings alternate between the
two sides, and the ratio is of medians.

    python benchmarks/bench_score_overhead.py [--batches 4] [--batch-size 32] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from attnprobe.method.probe import default_probe_blocks
from attnprobe.models import build_model, resolve_model
from attnprobe.stages.scoring import ScoringForward


def machine(device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), device {device} ({name})")


def bench(label, model, img_size, batches, batch_size, device, amp, reps):
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch_size, 3, img_size, img_size, generator=gen) for _ in range(batches)]
    blocks = default_probe_blocks(len(model.blocks))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.inference_mode()
    def bare():
        for x in xs:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                model(x.to(device, non_blocking=True)).float().cpu()
        sync()

    with ScoringForward(model, blocks, "first", device, amp) as fwd:
        def scoring():
            for x in xs:
                fwd.scores(x)
            sync()
        bare(), scoring()  # warm-up
        times = {"bare": [], "score": []}
        for _ in range(reps):
            for name, fn in (("bare", bare), ("score", scoring)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    n = batches * batch_size
    tb, ts = statistics.median(times["bare"]), statistics.median(times["score"])
    print(f"{label}: bare forward {n / tb:8.1f} img/s | scoring {n / ts:8.1f} img/s | "
          f"ratio scoring/bare {tb / ts:.3f}  ({reps} reps of {batches} x {batch_size}, probe blocks {blocks})")
    return tb / ts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, default=None, help="batches per timing (default: 4 on CPU, 20 on GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 256 on GPU")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--amp", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batches = args.batches or (20 if gpu else 4)
    bs = args.batch_size or (256 if gpu else 32)
    print(machine(device))
    torch.manual_seed(0)
    arch, kw = resolve_model("ap_teacher_32")
    bench("ap_teacher_32 (32x32, 65 tokens, random init)", build_model(arch, kw, 10), 32, batches, bs, device,
          args.amp, args.reps)
    bench("deit_small_patch16_224 (224x224, 197 tokens, random init)",
          build_model("deit_small_patch16_224", {}, 1000), 224, batches, max(bs // 4, 8), device, args.amp,
          args.reps)


if __name__ == "__main__":
    main()
