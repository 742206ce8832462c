"""The GPU check, prepared for the first time a GPU is at hand: one script, at most ~7 minutes on one GPU,
printing one JSON object (also written to --json):

- `score`: images/s of `attnprobe score` on a synthetic DeiT-S/224 pool (img2dataset-style tar shards of
  224..320 px JPEGs, random-init deit_small_patch16_224, 1000 classes) in fp32 and with --amp,
  --channels-last and --compile; each against a bare forward of the same model, batch and flags on random
  tensors already on the GPU (`bare_images_per_s`, `ratio` = score / bare). `images_per_s` is the steady
  rate, from the end of the first batch to the end of the last (what compiling and loading cost is in
  `wall_s`, the whole call).
- `distill_step`: ms per step of attnprobe's distillation step (engine.distill_one_epoch on one batch:
  DeiT-S teacher, DeiT-Ti student, KD + noise adaptation + probe loss, AdamW + Adam) under bf16 autocast,
  against its floor (teacher forward, student forward and backward, plain KD, AdamW; same autocast).
- `distill_epoch`: a distillation epoch against its floor at 32 px (bench_distill_epoch.epoch_vs_floor: the
  paper's CIFAR pair ap_teacher_32 / ap_student_32 on --epoch-images camera-sized 480x360 JPEGs): seconds
  per epoch of engine.distill_one_epoch over ready batches on the GPU (`floor_s`), of `attnprobe distill` from
  the decoded selection (`decoded_s`, --decoded-on auto: on the GPU when it fits) and with --no-decode-cache
  (`no_decode_cache_s`), `floor_over_decoded` (goal >= 0.9) and `no_decode_over_decoded`.
- `peak_memory_gib`: torch.cuda.max_memory_allocated, per part and over the check.
- `nccl`: a one-process NCCL process group around `score`, `select` and a one-epoch `distill` from the shards,
  each run to the end (`ok`, or the error).

Without a CUDA GPU it prints one line saying so on stderr and exits 0, nothing measured. `--cpu-smoke`
runs the same code on the CPU (tiny pool, Gloo instead of NCCL, no --compile): a check of the check.

    python benchmarks/gpu_check.py [--images 4096] [--batch-size 256] [--workers 8] [--epoch-images 4096]
        [--json gpu_check.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shards import build_pool  # noqa: E402  (the same synthetic pool)

TEACHER, STUDENT, CLASSES = "deit_small_patch16_224", "deit_tiny_patch16_224", 1000
BUDGET_S = 270  # compile runs are left out past this (the distill epoch past +60 s): the check stays within ~7 min
SCORE_FLAGS = {"fp32": {}, "amp": {"amp": True}, "channels_last": {"channels_last": True}, "compile": {"compile": True}}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def teacher_checkpoint(path: Path):
    from attnprobe.io.checkpoints import save_checkpoint
    from attnprobe.models import build_model, describe, resolve_model
    torch.manual_seed(0)
    arch, kw = resolve_model(TEACHER)
    model = build_model(arch, kw, CLASSES)
    save_checkpoint(path, model, describe(model, arch, kw, [f"c{i}" for i in range(CLASSES)], [0.485, 0.456, 0.406],
                                          [0.229, 0.224, 0.225], accuracy=0.8))
    return model


def timed_score(teacher, wild, out, device, flags: dict, batch_size: int, workers: int) -> dict:
    """`attnprobe score` end to end; the steady rate from the batch times seen by ScoringForward.scores."""
    from attnprobe import score
    from attnprobe.stages.scoring import ScoringForward
    ends, original = [], ScoringForward.scores

    def scores(self, images, keep_probs=True):
        result = original(self, images, keep_probs)  # returns numpy: the GPU work of the batch is done
        ends.append((time.perf_counter(), len(images)))
        return result
    ScoringForward.scores = scores
    reset_peak(device)
    try:
        t0 = time.perf_counter()
        summary = score(teacher, wild, out, batch_size=batch_size, workers=workers, device=device.type,
                        progress=False, **flags)
        wall = time.perf_counter() - t0
    finally:
        ScoringForward.scores = original
    steady = sum(n for _, n in ends[1:]) / (ends[-1][0] - ends[0][0]) if len(ends) > 1 else None
    return {"images": summary["scored"], "wall_s": round(wall, 2),
            "images_per_s": round(steady, 1) if steady else None, "peak_memory_gib": peak_gib(device)}


@torch.inference_mode()
def bare_forward(model, device, flags: dict, batch_size: int, iters: int) -> float:
    """Images/s of the model's forward alone on one random batch on the device, with the score run's flags."""
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    net = model.to(device).eval()
    if flags.get("channels_last"):
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    fwd = torch.compile(net, dynamic=False) if flags.get("compile") else net
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(flags.get("amp"))):
        for _ in range(3):
            fwd(x)
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            fwd(x).float().cpu()  # the logits come back to the host, as in the score pass
        sync(device)
    return batch_size * iters / (time.perf_counter() - t)


def distill_step(device, batch_size: int, steps: int) -> dict:
    """ms per step: attnprobe's distillation step and its floor, both under bf16 autocast, interleaved."""
    from attnprobe.method.losses import NoiseAdaptation, kd_loss
    from attnprobe.method.probe import default_distill_blocks
    from attnprobe.models import build_model, resolve_model
    from attnprobe.training.engine import DistillModel, distill_one_epoch
    torch.manual_seed(0)
    teacher = build_model(*resolve_model(TEACHER), CLASSES).to(device).eval().requires_grad_(False)
    student = build_model(*resolve_model(STUDENT), CLASSES).to(device)
    noise = NoiseAdaptation(CLASSES, 0.8).to(device)
    model = DistillModel(student, noise)
    opt = torch.optim.AdamW(student.parameters(), lr=7.5e-4, weight_decay=0.025)
    q_opt = torch.optim.Adam(noise.parameters(), lr=1e-3)
    blocks = default_distill_blocks(12)
    images = torch.randn(batch_size, 3, 224, 224, device=device)
    batch = [(images, torch.arange(batch_size))]
    bf16 = dict(device_type=device.type, dtype=torch.bfloat16)

    def floor():
        with torch.autocast(**bf16):
            with torch.no_grad():
                t_logits = teacher(images)
            loss = kd_loss(student(images).float(), t_logits.float(), 4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    def ours():
        with torch.autocast(**bf16):
            distill_one_epoch(model, teacher, batch, [opt, q_opt], device, temperature=4.0, noise_weight=1.0,
                              probe_weight=0.8, teacher_blocks=blocks, student_blocks=blocks, progress=False)

    reset_peak(device)
    times = {"floor": [], "ours": []}
    for step in range(steps + 2):
        for name, fn in (("floor", floor), ("ours", ours)):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if step >= 2:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch_size, "ours_ms": round(med["ours"] * 1000, 2), "floor_ms": round(med["floor"] * 1000, 2),
            "ratio_floor_over_ours": round(med["floor"] / med["ours"], 3), "peak_memory_gib": peak_gib(device)}


def distill_epoch(device, d: Path, args) -> dict:
    """bench_distill_epoch's epoch against its floor, on this device (fp32, as `attnprobe distill` runs)."""
    from bench_distill_epoch import CIFAR_STUDENT, CIFAR_TEACHER, epoch_vs_floor
    bench = argparse.Namespace(workers=args.workers, epochs=2 if device.type == "cuda" else 1,
                               rounds=2 if device.type == "cuda" else 1, batch_size=args.distill_batch)
    reset_peak(device)
    result = epoch_vs_floor(d / "distill_epoch", "gpu", CIFAR_TEACHER, CIFAR_STUDENT, args.epoch_images, bench,
                            device=device.type)
    result["peak_memory_gib"] = peak_gib(device)
    return result


def one_process_group(device, teacher, wild, d: Path, args) -> dict:
    """score, select and a one-epoch distill, each to the end, inside a one-process NCCL (Gloo on the CPU)
    process group: every collective of the multi-GPU path runs."""
    from attnprobe import distill, score, select
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    result = {"backend": backend}
    try:
        for name, work in (
                ("score", lambda: score(teacher, wild, d / "pg_scores.parquet", batch_size=args.batch_size,
                                        workers=args.workers, device=device.type, progress=False)),
                ("select", lambda: select(d / "pg_scores.parquet", out=d / "pg_sel.parquet",
                                          num_select=max(args.images // 4, 16))),
                ("distill", lambda: distill(teacher, wild, d / "pg_sel.parquet", out=d / "pg_student", student=STUDENT,
                                            epochs=1, batch_size=args.distill_batch, workers=args.workers,
                                            device=device.type, progress=False, holdout=8))):
            t = time.perf_counter()
            try:
                work()
                result[name] = {"ok": True, "s": round(time.perf_counter() - t, 2)}
            except Exception as e:  # the others still run; the JSON says what failed
                result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        dist.destroy_process_group()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--distill-batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--epoch-images", type=int, default=4096, help="480x360 JPEGs of the distill-epoch part")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--cpu-smoke", action="store_true", help="run the check's code on the CPU (tiny, no compile)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.images, args.batch_size, args.distill_batch, args.epoch_images = 48, 8, 8, 48
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured: run it on a "
              "machine with one", file=sys.stderr)
        return 0
    else:
        device = torch.device("cuda", 0)
    start = time.perf_counter()
    result = {"machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (--cpu-smoke)",
              "images": args.images, "batch_size": args.batch_size, "workers": args.workers}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        build_pool(d, args.images, 512, (224, 320))
        wild = f"{d}/pool/*.tar"
        teacher = d / "teacher.pt"
        model = teacher_checkpoint(teacher)
        result["score"] = {}
        for name, flags in SCORE_FLAGS.items():
            if flags.get("compile") and (device.type == "cpu" or time.perf_counter() - start > BUDGET_S):
                result["score"][name] = {"skipped": "cpu smoke" if device.type == "cpu" else "over the time budget"}
                continue
            try:
                row = timed_score(teacher, wild, d / f"{name}.parquet", device, flags, args.batch_size, args.workers)
                row["bare_images_per_s"] = round(bare_forward(model, device, flags, args.batch_size,
                                                              3 if device.type == "cpu" else 20), 1)
                row["ratio"] = round(row["images_per_s"] / row["bare_images_per_s"], 3) if row["images_per_s"] else None
            except Exception as e:
                row = {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()[-1500:]}
            result["score"][name] = row
        try:
            result["distill_step"] = distill_step(device, args.distill_batch, 2 if device.type == "cpu" else 10)
        except Exception as e:
            result["distill_step"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if time.perf_counter() - start > BUDGET_S + 60:
            result["distill_epoch"] = {"skipped": "over the time budget"}
        else:
            try:
                result["distill_epoch"] = distill_epoch(device, d, args)
            except Exception as e:
                result["distill_epoch"] = {"error": f"{type(e).__name__}: {e}"[:500],
                                           "trace": traceback.format_exc()[-1500:]}
        result["nccl"] = one_process_group(device, teacher, wild, d, args)
    parts = [r.get("peak_memory_gib") for r in [*result["score"].values(), result["distill_step"],
                                                 result["distill_epoch"]]]
    result["peak_memory_gib"] = max([x for x in parts if x is not None] + [peak_gib(device) or 0]) \
        if device.type == "cuda" else None  # the largest of the parts' peaks (each part resets the counter)
    result["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
