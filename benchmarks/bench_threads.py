"""A small train-teacher on a shared machine: torch's old thread choice against attnprobe's (training/threads.py).

The same small training (the digits teacher preset, 28x28 images, --workers 0, images cached) runs for a few
epochs, each in a fresh process:

- alone;
- beside two busy pure-Python processes;
- beside two torch processes doing matmuls with 2 threads each;

once with the old choice (torch's default, every core: the run is given OMP_NUM_THREADS=<cores>, which
attnprobe leaves alone as the user's choice) and once with the new one (attnprobe's fair share). Printed: the
median epoch seconds (from metrics.jsonl: training plus the validation pass), the threads the run used, and
the ratios to the same choice alone and old/new. The load starts a few seconds before the training, as a
user's other work would; before the runs alone the benchmark waits (--settle) for the load average to fall.
The numbers are only meaningful on a machine with nothing else running.

    python benchmarks/bench_threads.py [--epochs 3] [--images 120]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY_PYTHON = "while True:\n    pass\n"
BUSY_TORCH = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(384, 384)\n"
              "while True:\n    a = torch.tanh(a @ a)\n")
TRAIN = """
import json, sys, torch
from attnprobe import train_teacher
data, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
train_teacher(data, out=out, model="ap_digits_teacher", epochs=epochs, batch_size=64, workers=0, device="cpu",
              cache_images=True, val_split=0.2, progress=False)
print(json.dumps({"threads": torch.get_num_threads()}))
"""


def make_data(root: Path, per_class: int) -> Path:
    """ROOT/train/<digit>/*.png: ten classes of 28x28 images, each a bright bar at its own place plus noise."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(10):
        folder = root / "train" / str(c)
        folder.mkdir(parents=True)
        for i in range(per_class):
            x = rng.integers(0, 80, (28, 28, 3), dtype=np.uint8)
            x[2 + 2 * c:6 + 2 * c, 4:24] = 255
            Image.fromarray(x).save(folder / f"{i}.png")
    return root


def start_load(kind: str) -> list[subprocess.Popen]:
    code = {"none": None, "python": BUSY_PYTHON, "torch": BUSY_TORCH}[kind]
    if code is None:
        return []
    return [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(2)]


def settle(limit: float) -> None:
    """Let the load of earlier runs (and of whatever ran before) leave the 1-minute average, which the new
    choice reads: the runs alone are meant alone."""
    end = time.time() + limit
    while os.getloadavg()[0] >= 0.5 and time.time() < end:
        time.sleep(2)


def train(data: Path, out: Path, epochs: int, old: bool) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    if old:
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)  # torch's default, kept as the user's choice
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", TRAIN, str(data), str(out), str(epochs)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": [r["seconds"] for r in rows], "load": load, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still stops its load (finally)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=120, help="training images per class")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds the load runs before the training")
    parser.add_argument("--settle", type=float, default=60.0, help="before the runs alone: wait at most this long "
                                                                   "for the 1-minute load average to fall below 0.5")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data", args.images)
        for load in ("none", "python", "torch"):
            for old in (True, False):
                if load == "none":
                    settle(args.settle)
                procs = start_load(load)
                try:
                    time.sleep(args.warmup if procs else 0)
                    out = Path(tmp) / f"run-{load}-{'old' if old else 'new'}"
                    results[load, old] = r = train(data, out, args.epochs, old)
                finally:
                    for p in procs:
                        p.kill()
                        p.wait()
                print(f"  {load:6s} {'old' if old else 'new'}: {' '.join(f'{s:.1f}' for s in r['seconds'])} s, "
                      f"{r['threads']} threads (load average at its start: {r['load']:.2f})", file=sys.stderr,
                      flush=True)
    cores = os.cpu_count()
    print(f"\n{cores} cores, {args.epochs} epochs each; median epoch seconds (x: ratio to the same choice alone)")
    print(f"{'beside':28s} {'old (torch default)':>22s} {'new (fair share)':>22s} {'old/new':>8s}")
    label = {"none": "nothing", "python": "2 busy Python processes", "torch": "2 torch processes, 2 threads"}
    for load in ("none", "python", "torch"):
        cells = []
        for old in (True, False):
            r, alone = results[load, old], results["none", old]
            m = statistics.median(r["seconds"])
            cells.append(f"{m:6.1f} s x{m / statistics.median(alone['seconds']):4.1f} ({r['threads']} thr)")
        ratio = statistics.median(results[load, True]["seconds"]) / statistics.median(results[load, False]["seconds"])
        print(f"{label[load]:28s} {cells[0]:>22s} {cells[1]:>22s} {ratio:8.2f}")


if __name__ == "__main__":
    main()
