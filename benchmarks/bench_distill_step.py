"""Overhead of one attnprobe distillation step over a bare distillation step, on the same batch.

ours: engine.distill_one_epoch on one batch = teacher forward under no_grad with the probe taps, student
      forward/backward with the probe taps, KD + noise adaptation + probe-distillation losses, the
      student's AdamW step and Q's Adam step, epoch statistics.
bare: teacher forward under no_grad, student forward, plain KD loss, backward, AdamW step.

Paper's CIFAR sizes (presets ap_teacher_32 / ap_student_32, random init), batch 64, 32x32 RGB.
The two are timed interleaved (bare, ours, bare, ours, ...) so that load on the machine hits both alike;
the ratio of medians bare / ours is printed (goal: >= 0.9, i.e. under ~10% overhead).

    python benchmarks/bench_distill_step.py [--steps 8] [--batch-size 64] [--device cpu] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from attnprobe.method.losses import NoiseAdaptation, kd_loss
from attnprobe.method.probe import default_distill_blocks
from attnprobe.models import build_model, resolve_model
from attnprobe.training.engine import DistillModel, distill_one_epoch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of each kind (after 2 warm-up steps)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = build_model(*resolve_model("ap_teacher_32"), 10).to(device).eval().requires_grad_(False)
    student = build_model(*resolve_model("ap_student_32"), 10).to(device)
    noise = NoiseAdaptation(10, 0.9665).to(device)
    model = DistillModel(student, noise)
    opt = torch.optim.AdamW(student.parameters(), lr=7.5e-4, weight_decay=0.025)
    q_opt = torch.optim.Adam(noise.parameters(), lr=1e-3)
    blocks = default_distill_blocks(12)  # 3, 7, 11 for teacher and student (both depth 12)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)
    batch = [(images, torch.arange(args.batch_size))]

    def bare():
        with torch.no_grad():
            t_logits = teacher(images)
        loss = kd_loss(student(images), t_logits, 4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    def ours():
        distill_one_epoch(model, teacher, batch, [opt, q_opt], device, temperature=4.0, noise_weight=1.0,
                          probe_weight=0.8, teacher_blocks=blocks, student_blocks=blocks, progress=False)

    times = {"bare": [], "ours": []}
    for step in range(args.steps + 2):
        for name, fn in (("bare", bare), ("ours", ours)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs | torch {torch.__version__} ({torch.get_num_threads()} threads) | device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    t_params = sum(p.numel() for p in teacher.parameters()) / 1e6
    s_params = sum(p.numel() for p in student.parameters()) / 1e6
    print(f"teacher ap_teacher_32 {t_params:.2f}M, student ap_student_32 {s_params:.2f}M, batch {args.batch_size}, "
          f"{args.steps} timed steps each, interleaved")
    for name in ("bare", "ours"):
        v = times[name]
        print(f"{name}: median {med[name] * 1000:.1f} ms/step  (min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f})")
    print(f"ratio bare/ours = {med['bare'] / med['ours']:.3f}  (goal >= 0.9; overhead "
          f"{(med['ours'] / med['bare'] - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
