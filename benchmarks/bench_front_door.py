"""How fast the front door answers: `attnprobe --help` against `python -c "import torch"`, side by side.

Each (`--help`, a command's `--help`, an argument error) is run 5 times in a fresh interpreter (alternating, so that a busy machine slows both alike); the
medians and their ratio are printed. `attnprobe --help` imports no torch, so it should be a small fraction
of torch's import time.

    python benchmarks/bench_front_door.py
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

COMMANDS = {
    "attnprobe --help": [sys.executable, "-m", "attnprobe.cli", "--help"],
    "attnprobe run --help": [sys.executable, "-m", "attnprobe.cli", "run", "--help"],
    "attnprobe distill --lr x (error)": [sys.executable, "-m", "attnprobe.cli", "distill", "--lr", "x"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def seconds(argv) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(repeats: int = 5) -> None:
    for argv in COMMANDS.values():
        seconds(argv)  # warm the file cache
    times = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, argv in COMMANDS.items():
            times[name].append(seconds(argv))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"{name:34s} median {median * 1000:7.0f} ms over {repeats} runs")
    torch_s = medians.pop("python -c 'import torch'")
    for name, median in medians.items():
        print(f"ratio {name} / import torch: {median / torch_s:.2f}")


if __name__ == "__main__":
    main()
