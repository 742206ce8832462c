"""A distillation epoch against its floor, and the data path that feeds it, side by side in one run.

On N camera-sized JPEGs (480x360, smooth random colour fields with grain, quality 90, written here) and a
32-px teacher (random init, 10 classes), selected by `attnprobe score` + `select` (all N):

- data path, images/s per core (one process, one torch thread, at 32 px):
  * decode: today's path, ImageList + train_transform (decode, resize, centre crop, padded random crop,
    flip, normalise) through a DataLoader without workers;
  * decoded: DecodedBatches over a DecodedStore of the same images (gather the uint8 rows from the
    memory-mapped chunks, crop and flip in batches, normalise), and the same from one in-memory tensor
    (what `--decoded-on device` does on a GPU); the store's build (DataLoader workers) is timed apart.
- an epoch against its floor, for a tiny pair (N images) and for the paper's CIFAR pair ap_teacher_32 /
  ap_student_32 (--cifar-images), each round interleaved (floor, decoded, --no-decode-cache):
  * floor: engine.distill_one_epoch over the same number of ready float batches already in memory (teacher
    forward with the probe taps, student forward and backward, KD + noise adaptation + probe loss, AdamW +
    Adam), plus the held-out fidelity forward on ready batches, as the epoch of `distill` does;
  * decoded: `attnprobe.distill` from the decoded selection (built before timing: the build is what the
    first, cold call spends outside its epochs less what a warm call does); seconds per epoch from its
    metrics.jsonl;
  * --no-decode-cache: `attnprobe.distill` decoding and augmenting every image in every epoch.

Goals printed: decoded epoch / floor >= 0.75 on 1,200 images with the tiny pair (the issue's CPU goal: 0.9),
decoded >= 2x --no-decode-cache, data path >= 50,000 images/s per core at 32 px. The numbers mean most on
a quiet machine; medians of interleaved rounds damp, but do not remove, the load of other jobs.

    python benchmarks/bench_distill_epoch.py [--images 1200] [--cifar-images 256] [--rounds 2] [--epochs 2]
        [--batch-size 64] [--workers 2] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

TINY_TEACHER = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 3,
                                         "num_heads": 2})
TINY_STUDENT = ("vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2})
CIFAR_TEACHER = ("ap_teacher_32", {})
CIFAR_STUDENT = ("ap_student_32", {})
CLASSES = 10
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


# ---- inputs ----------------------------------------------------------------------------------------------

def make_jpegs(folder: Path, n: int, size=(480, 360), seed: int = 0) -> list[str]:
    """n camera-sized JPEGs (quality 90): a smooth random colour field (a 12 x 9 grid upsampled bicubically)
    with a little grain. Returns their paths relative to `folder`."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = size
    names = []
    for i in range(n):
        sub = f"{i // 1000:03d}"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        base = Image.fromarray(rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        a = np.asarray(base, dtype=np.int16) + rng.normal(0, 4, (h, w, 3)).astype(np.int16)
        names.append(f"{sub}/{i:06d}.jpg")
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(folder / names[-1], quality=90)
    return names


def make_teacher(path: Path, name: str, kwargs: dict) -> dict:
    """A random-init teacher checkpoint (accuracy recorded as 0.9, for noise adaptation); returns its info."""
    import torch
    from attnprobe.io.checkpoints import save_checkpoint
    from attnprobe.models import build_model, describe, resolve_model
    torch.manual_seed(0)
    arch, kw = resolve_model(name, kwargs or None)
    model = build_model(arch, kw, CLASSES)
    info = describe(model, arch, kw, [f"c{i}" for i in range(CLASSES)], MEAN, STD, accuracy=0.9)
    save_checkpoint(path, model, info)
    return info


def make_selection(teacher: Path, wild: Path, d: Path, n: int, workers: int, device: str = "cpu") -> Path:
    """Every one of the n pool images, selected through the public API (score, then select all)."""
    from attnprobe import score, select
    score(str(teacher), str(wild), str(d / "scores.parquet"), batch_size=128, workers=workers, device=device,
          progress=False)
    select(str(d / "scores.parquet"), out=str(d / "sel.parquet"), num_select=n)
    return d / "sel.parquet"


# ---- the floor ---------------------------------------------------------------------------------------------

def floor_epoch(teacher: Path, student: tuple, *, n_train: int, n_held: int, batch_size: int, device) -> callable:
    """epoch() -> seconds of one floor epoch: distill_one_epoch over the batches an epoch of `distill` has
    (batches_per_epoch of n_train), already in memory as float tensors on `device`, then the fidelity forward
    over n_held ready images. The models and optimizers are built as the distill stage builds them."""
    import torch
    from attnprobe.io.checkpoints import load_checkpoint
    from attnprobe.method.losses import NoiseAdaptation
    from attnprobe.method.probe import default_distill_blocks, map_blocks
    from attnprobe.models import build_student, geometry
    from attnprobe.training.engine import DistillModel, distill_one_epoch, fidelity
    from attnprobe.training.loop import batches_per_epoch
    teacher_net, info = load_checkpoint(teacher, device)
    teacher_net.eval().requires_grad_(False)
    net, _, _ = build_student(student[0], student[1] or None, teacher_info=info, teacher_model=teacher_net,
                              probe_on=True)
    net = net.to(device)
    t_depth = geometry(teacher_net)["depth"]
    t_blocks = default_distill_blocks(t_depth)
    s_blocks = map_blocks(t_blocks, t_depth, geometry(net)["depth"])
    noise = NoiseAdaptation(info["num_classes"], 0.9).to(device)
    model = DistillModel(net, noise)
    opt = torch.optim.AdamW(net.parameters(), lr=7.5e-4, weight_decay=0.025)
    q_opt = torch.optim.Adam(noise.parameters(), lr=1e-3)
    c, size = info["in_chans"], info["img_size"]
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(0)
    steps = batches_per_epoch(n_train, batch_size)
    train = [(torch.randn(batch_size, c, h, w, generator=g).to(device), None) for _ in range(steps)]
    held = [(torch.randn(len(ix), c, h, w, generator=g).to(device), torch.as_tensor(ix))
            for ix in (list(range(s, min(s + batch_size, n_held))) for s in range(0, n_held, batch_size))]
    teacher_pred = torch.zeros(max(n_held, 1), dtype=torch.long)

    def epoch() -> float:
        sync(device)
        t0 = time.perf_counter()
        distill_one_epoch(model, teacher_net, train, [opt, q_opt], device, temperature=4.0, noise_weight=1.0,
                          probe_weight=0.8, teacher_blocks=t_blocks, student_blocks=s_blocks, progress=False)
        if held:
            fidelity(net, held, teacher_pred, device, progress=False)
        sync(device)
        return time.perf_counter() - t0
    return epoch


def sync(device) -> None:
    import torch
    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


# ---- distill through the public API ------------------------------------------------------------------------

def api_epochs(teacher: Path, wild: Path, selection: Path, out: Path, student: tuple, **kw) -> dict:
    """One `attnprobe.distill` call: its wall time and the `seconds` of each epoch in metrics.jsonl."""
    from attnprobe import distill
    t0 = time.perf_counter()
    distill(str(teacher), str(wild), str(selection), out=str(out), student=student[0], model_kwargs=student[1],
            progress=False, **kw)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"wall": wall, "seconds": [r["seconds"] for r in rows]}


def error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]


def epoch_vs_floor(d: Path, label: str, teacher_spec: tuple, student: tuple, n: int, args, device="cpu",
                   seed: int = 2) -> dict:
    """A pool of n JPEGs, a teacher, a selection; then `rounds` x (floor, decoded, --no-decode-cache)."""
    import torch
    from attnprobe.io.datasets import holdout_count
    d.mkdir(parents=True)
    wild = d / "pool"
    t = time.perf_counter()
    make_jpegs(wild, n, seed=seed)
    make_teacher(d / "teacher.pt", *teacher_spec)
    sel = make_selection(d / "teacher.pt", wild, d, n, args.workers, str(device))
    print(f"[{label}] {n} JPEGs, teacher, selection: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    n_held = holdout_count(0.1, n)
    common = dict(epochs=args.epochs, batch_size=args.batch_size, workers=args.workers, device=str(device), seed=0,
                  holdout=0.1)
    result = {"images": n, "train_images": n - n_held, "held_out": n_held, "batch_size": args.batch_size,
              "epochs_per_call": args.epochs, "rounds": args.rounds}
    floor = floor_epoch(d / "teacher.pt", student, n_train=n - n_held, n_held=n_held, batch_size=args.batch_size,
                        device=torch.device(device))
    floor()  # warm-up (allocator, first-call costs)
    cache = d / "decoded"
    times = {"floor": [], "decoded": [], "no_decode_cache": []}
    decoded_error = None
    try:  # the cold call builds the decoded selection; build = its time outside the epochs less a warm call's
        cold = api_epochs(d / "teacher.pt", wild, sel, d / "cold", student, decode_cache=str(cache), **common)
    except Exception as e:  # the decoded path is not wired (yet): the floor and --no-decode-cache still run
        decoded_error, cold = error_line(e), None
    if cold is not None and not any(cache.rglob("*.npy")):
        decoded_error, cold = "distill ran but wrote no decoded selection (the decoded path is not wired yet)", None
    if decoded_error:
        print(f"[{label}] decoded path not measured: {decoded_error}", file=sys.stderr, flush=True)
    warm_walls = []
    for r in range(args.rounds):
        times["floor"] += [floor() for _ in range(args.epochs)]
        if cold is not None:
            warm = api_epochs(d / "teacher.pt", wild, sel, d / f"decoded{r}", student, decode_cache=str(cache),
                              **common)
            warm_walls.append(warm["wall"] - sum(warm["seconds"]))
            times["decoded"] += warm["seconds"]
        try:
            times["no_decode_cache"] += api_epochs(d / "teacher.pt", wild, sel, d / f"nocache{r}", student,
                                                   no_decode_cache=True, **common)["seconds"]
        except Exception as e:  # before Part R the flag does not exist: today's path is the default one
            if "no_decode_cache" not in str(e) and "no-decode-cache" not in str(e):
                raise
            times["no_decode_cache"] += api_epochs(d / "teacher.pt", wild, sel, d / f"nocache{r}", student,
                                                   **common)["seconds"]
            result["no_decode_cache_note"] = "flag absent: today's default path timed"
        print(f"[{label}] round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()
                                                                     if v), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) if v else None for k, v in times.items()}
    result.update({f"{k}_s": round(v, 3) if v else None for k, v in med.items()})
    result["samples_s"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
    if cold is not None:
        result["build_s"] = round(cold["wall"] - sum(cold["seconds"]) - statistics.median(warm_walls), 2)
        result["floor_over_decoded"] = round(med["floor"] / med["decoded"], 3)
        result["no_decode_over_decoded"] = round(med["no_decode_cache"] / med["decoded"], 2)
        cache_bytes = sum(f.stat().st_size for f in cache.rglob("*.npy"))
        result["decoded_selection_bytes"] = cache_bytes
    else:
        result["decoded_error"] = decoded_error
    result["floor_over_no_decode"] = round(med["floor"] / med["no_decode_cache"], 3)
    return result


# ---- the data path -------------------------------------------------------------------------------------------

def data_path(d: Path, n: int, args) -> dict:
    """Images/s per core of the decode path and of the decoded path (one process, one torch thread)."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from attnprobe.io.datasets import ImageList, collate_robust
    from attnprobe.io.images import ImageLoader, train_transform
    wild = d / "pool"
    names = make_jpegs(wild, n, seed=1)
    info = {"img_size": 32, "in_chans": 3, "mean": MEAN, "std": STD}
    bs = args.batch_size
    result = {"images": n, "batch_size": bs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n_dec = min(n, args.decode_images)
        ds = ImageList([str(wild / p) for p in names[:n_dec]], transform=train_transform(info, True, False),
                       in_chans=3)
        loader = DataLoader(ds, batch_size=bs, shuffle=True, num_workers=0, collate_fn=collate_robust)
        for _ in zip(range(1), loader):  # warm the page cache and the code paths
            pass
        t = time.perf_counter()
        seen = sum(len(b[0]) for b in loader)
        result["decode_images_per_s_per_core"] = round(seen / (time.perf_counter() - t), 1)
        result["decode_images"] = n_dec
        try:
            from attnprobe.io.decoded import DecodedStore, row_sources
            from attnprobe.training.decoded_batches import DecodedBatches
        except ImportError as e:
            result["decoded_error"] = error_line(e)
            return result
        torch.set_num_threads(threads)
        t = time.perf_counter()
        store = DecodedStore.at(d / "store", info=info, resize="crop")
        rows = store.ensure(row_sources(names, wild=str(wild)), loader=ImageLoader(3), workers=args.workers,
                            progress=False)
        build = time.perf_counter() - t
        torch.set_num_threads(1)
        result["build_s"] = round(build, 2)
        result["build_images_per_s"] = round(n / build, 1)
        result["build_workers"] = args.workers
        rows = rows[rows >= 0]
        in_memory = store.tensor(rows)

        def rate(gather, index) -> float:
            batches = DecodedBatches(gather, index, batch_size=bs, seed=0, device=torch.device("cpu"), flip=True,
                                     affine=False, mean=MEAN, std=STD, size=(32, 32))
            speeds = []
            for epoch in range(args.data_epochs + 1):
                batches.sampler.set_epoch(epoch)
                t = time.perf_counter()
                seen = sum(len(x) for x, _ in batches)
                if epoch:  # the first is a warm-up
                    speeds.append(seen / (time.perf_counter() - t))
            return statistics.median(speeds)
        result["decoded_images_per_s_per_core"] = round(rate(store.gather, rows), 1)
        result["in_memory_images_per_s_per_core"] = round(
            rate(lambda i: in_memory[torch.as_tensor(np.asarray(i))], np.arange(len(rows))), 1)
        result["decoded_over_decode"] = round(result["decoded_images_per_s_per_core"]
                                              / result["decode_images_per_s_per_core"], 1)
    finally:
        torch.set_num_threads(threads)
    return result


# ---- main ----------------------------------------------------------------------------------------------------

def goal(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def report(res: dict) -> None:
    print(f"machine: {res['machine']}")
    dp = res.get("data_path", {})
    print(f"\ndata path at 32 px, images/s per core (one process, one thread, batch {dp.get('batch_size')}):")
    print(f"  decode (ImageList + train_transform, DataLoader, {dp.get('decode_images')} 480x360 JPEGs): "
          f"{dp.get('decode_images_per_s_per_core')}")
    if "decoded_error" in dp:
        print(f"  decoded: not measured ({dp['decoded_error']})")
    elif "decoded_images_per_s_per_core" in dp:
        dec = dp["decoded_images_per_s_per_core"]
        print(f"  decoded (DecodedBatches: memory-mapped store, crop + flip + normalise in batches): {dec} "
              f"({dp['decoded_over_decode']}x decode)  goal >= 50,000: {goal(dec >= 50_000)}")
        print(f"  decoded from one in-memory tensor: {dp['in_memory_images_per_s_per_core']}")
        print(f"  store build: {dp['images']} images in {dp['build_s']} s ({dp['build_images_per_s']} images/s, "
              f"{dp['build_workers']} DataLoader workers)")
    for label, r in res["epochs"].items():
        print(f"\n{label}: {r['images']} images ({r['train_images']} trained, {r['held_out']} held out), batch "
              f"{r['batch_size']}, {r['rounds']} rounds x {r['epochs_per_call']} epochs; median seconds per epoch")
        if "error" in r:
            print(f"  failed: {r['error']}")
            continue
        print(f"  floor (ready batches in memory):   {r['floor_s']:.2f} s")
        judged = label == "tiny pair"  # the goals are the tiny pair's; the CIFAR pair is compute-bound on a CPU
        if r.get("decoded_s") is not None and not judged:
            print(f"  decoded selection:                 {r['decoded_s']:.2f} s   floor/decoded "
                  f"{r['floor_over_decoded']:.3f}")
            print(f"  --no-decode-cache:                 {r['no_decode_cache_s']:.2f} s   --no-decode-cache/decoded "
                  f"{r['no_decode_over_decoded']:.2f}x")
            print(f"  decoded selection built once in {r['build_s']:.1f} s ({r['decoded_selection_bytes']:,} bytes)")
        elif r.get("decoded_s") is not None:
            fd = r["floor_over_decoded"]
            print(f"  decoded selection:                 {r['decoded_s']:.2f} s   floor/decoded {fd:.3f}  "
                  f"goal >= 0.75: {goal(fd >= 0.75)} (issue's CPU goal 0.9: {goal(fd >= 0.9)})")
            print(f"  --no-decode-cache:                 {r['no_decode_cache_s']:.2f} s   --no-decode-cache/decoded "
                  f"{r['no_decode_over_decoded']:.2f}x  goal >= 2x: {goal(r['no_decode_over_decoded'] >= 2)}")
            print(f"  decoded selection built once in {r['build_s']:.1f} s ({r['decoded_selection_bytes']:,} bytes)")
        else:
            print(f"  decoded selection: not measured ({r.get('decoded_error')})")
            print(f"  --no-decode-cache:                 {r['no_decode_cache_s']:.2f} s   floor/that "
                  f"{r['floor_over_no_decode']:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1200, help="JPEGs of the tiny pair (and of the data path)")
    p.add_argument("--cifar-images", type=int, default=256, help="JPEGs of ap_teacher_32 / ap_student_32 (0: skip)")
    p.add_argument("--decode-images", type=int, default=400, help="images the decode path's rate is timed on")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (floor, decoded, --no-decode-cache)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per distill call (and floor epochs per round)")
    p.add_argument("--data-epochs", type=int, default=3, help="timed passes of the decoded data path")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers of distill")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the epochs")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    # The same threads for the floor and for every distill call (attnprobe's fair-share choice, which follows
    # the machine's load, would otherwise differ from call to call): the user's choice wins there.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    res = {"machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                      f"{args.threads} threads, {args.workers} workers, load average {os.getloadavg()[0]:.2f}",
           "epochs": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        res["data_path"] = data_path(tmp / "data_path", args.images, args)
        pairs = [("tiny pair", TINY_TEACHER, TINY_STUDENT, args.images)]
        if args.cifar_images:
            pairs.append(("ap_teacher_32 / ap_student_32", CIFAR_TEACHER, CIFAR_STUDENT, args.cifar_images))
        for i, (label, t_spec, s_spec, n) in enumerate(pairs):
            try:
                res["epochs"][label] = epoch_vs_floor(tmp / f"pair{i}", label, t_spec, s_spec, n, args, seed=2 + i)
            except Exception as e:
                res["epochs"][label] = {"images": n, "error": error_line(e), "train_images": "?", "held_out": "?",
                                        "batch_size": args.batch_size, "rounds": args.rounds,
                                        "epochs_per_call": args.epochs}
    res["seconds"] = round(time.perf_counter() - start, 1)
    res["load_average_end"] = round(os.getloadavg()[0], 2)
    report(res)
    print(f"\n{res['seconds']} s in all; load average {res['load_average_end']} at the end (a shared machine "
          "makes every figure noisy)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
