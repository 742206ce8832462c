"""The rows of the demo's table: one student per (row, seed), trained in parallel processes.

Each row is a way to get a student from the teacher, as in the paper's Table 1: on the original
labels, by KD on the original images, by DAFL (no images at all), or by distillation on a wild
selection. Every row trains for the same number of optimizer steps (the reference gives each
selection the same compute, its epochs being 320000*512/K), at the same batch size. A row's seed
moves the student's initialisation, its data order and held-out split, and the random selection.

The jobs are independent, so they run in `jobs` processes of at most `threads` torch threads each (fewer
where other processes load the machine: training/threads.py): on a small CPU two single-threaded trainings
of these tiny models do more per second than one with two threads.
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

# name: (kind, what the student learns from, how). `dfnd` is DFND's method (its selection, KD and noise
# adaptation); the other selections are distilled with the full method (KD + noise adaptation + probe).
ROWS = {
    "labels": ("reference", "original training set, labels", "cross-entropy on the labels"),
    "kd-original": ("reference", "original training set, no labels", "KD"),
    "dafl": ("no data", "images generated against the teacher", "DAFL: generator + KD"),
    "dfnd": ("selection", "wild selection (DFND: outlier)", "KD + noise adaptation"),
    "attnprobe": ("selection", "wild selection (the paper's formula)", "KD + noise adaptation + probe"),
    "probe": ("selection", "wild selection (probe terms only)", "KD + noise adaptation + probe"),
    "random": ("selection", "wild selection (random)", "KD + noise adaptation + probe"),
    "all": ("wild", "every wild image, no selection", "KD + noise adaptation + probe"),
}
FULL_METHOD = "KD + noise adaptation + probe"
PROBE_WEIGHT = 0.8  # the paper's weight of the probe loss: every row sets it (0 or this), none takes the default


def distill_overrides(name: str) -> dict:
    """DistillSettings a table row sets beyond the student's: KD on the original images without noise
    adaptation or probe, DFND's method without the probe, the full method for the others."""
    if name == "kd-original":
        return dict(noise_adaptation=False, probe_weight=0.0)
    return dict(probe_weight=0.0 if name == "dfnd" else PROBE_WEIGHT)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample sd (0 for one value) of a row's per-seed results."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def selection_file(out: Path, name: str, seed: int) -> Path:
    """Where a row's selection is: one file per seed for `random`, one for the others."""
    return out / (f"select-{name}-seed{seed}.parquet" if name == "random" else f"select-{name}.parquet")


def train_row(job: dict) -> dict:
    """One (row, seed): train its student into OUT/student-<row>/seed<k> and return what results.json keeps.
    Runs in a worker process: everything it needs is in `job` (paths and settings as plain values). A distilled
    row's DistillSettings beyond `job["student"]` are `job["distill"]` (default: distill_overrides of the row), and
    `job["on_original"]` distills on the original training images instead of the wild pool.

    The test set is measured once, on the checkpoint the run chose (best.pt): it takes no part in training
    or choosing, and one measurement instead of one per epoch (48 of them for a selection of 1,500) saves
    time on a CPU."""
    from .. import api
    from ..settings import DaflSettings, DistillSettings, EvaluateSettings, TeacherSettings
    from ..training.threads import share_cores, use_fair_threads

    share_cores(job["threads"])  # the demo's cores // jobs: training takes at most that (training/threads.py)
    use_fair_threads()  # evaluate too
    name, seed, out = job["row"], job["seed"], Path(job["out"])
    run = out / f"student-{name}" / f"seed{seed}"
    common = dict(workers=job["workers"], device="cpu", seed=seed, progress=False, cache_images=job["workers"] == 0,
                  overwrite=True)
    student = {k: job["student"][k] for k in ("student", "model_kwargs", "batch_size", "lr", "warmup_epochs", "affine")}
    t0 = time.time()
    if name == "labels":
        settings = TeacherSettings.build(model=student.pop("student"), flip=False, val_split=job["val_split"],
                                         epochs=job["labels_epochs"], **student, **common)
        info = api.train_teacher(out / "data", out=run, settings=settings)
    elif name == "dafl":
        common.pop("cache_images")  # generated images: nothing to cache
        info = api.dafl(job["teacher"], out=run, settings=DaflSettings.build(**job["dafl"], **common))
    else:
        kw = dict(job["student"], flip=False, **common, **job.get("distill", distill_overrides(name)))
        wild = job["original_train"] if job.get("on_original", name == "kd-original") else job["wild"]
        info = api.distill(job["teacher"], wild, job["selection"], out=run, settings=DistillSettings.build(**kw))
    test_top1 = api.evaluate(run / "best.pt", job["test"], settings=EvaluateSettings(
        workers=job["workers"], device="cpu", progress=False))["top1"]
    return {"row": name, "seed": seed, "seconds": round(time.time() - t0, 1), "test_top1": test_top1, **chosen(info),
            "arch": info.get("arch"), "probe": info.get("probe")}


def chosen(info: dict) -> dict:
    """How a run chose its epoch: the labels row on its validation split, the others on fidelity to the
    teacher; never on the test set."""
    if info["selected_on"] == "val":
        return {"selected_on": "val", "val_top1": info["val_top1"], "best_epoch": info["best_epoch"],
                "steps": info["steps"]}
    return {"selected_on": info["selected_on"], "fidelity": info["fidelity"], "best_epoch": info["best_epoch"],
            "steps": info["steps"]}


def run_jobs(jobs: list[dict], processes: int, on_done) -> list[dict]:
    """Every job's result, in the order given; `on_done(result)` as each finishes. With one process the jobs
    run here, one after the other; with more, in a pool of fresh (spawned) processes."""
    if processes <= 1:
        results = []
        for job in jobs:
            results.append(train_row(job))
            on_done(results[-1])
        return results
    by_job = {}
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(train_row, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            by_job[futures[future]] = future.result()
            on_done(by_job[futures[future]])
    finally:  # on an error or ^C the jobs not started are dropped, not run to the end
        pool.shutdown(wait=True, cancel_futures=True)
    return [by_job[i] for i in range(len(jobs))]
