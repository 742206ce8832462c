"""`attnprobe demo`: the paper's Table 1 on real digits in the wild, measured, on a CPU.

Teacher on MNIST digits; a wild pool of held-out MNIST, scikit-learn's 8x8 digits (a shifted domain)
and as many non-digits (photo crops, faces, noise); one score pass; the same K selected by each
strategy; then every row of Table 1 (demo_rows.ROWS), each with several seeds and the same number of
optimizer steps; then report.html and results.json. Every number in the report comes from this run.

With `--students` (demo_students.py) the same benchmark, teacher and score pass, but only the default
selection and other students instead of the table's rows: a small CNN and a ViT on a coarser token grid, with
and without the probe loss, against the demo's ViT student, and what each costs against the teacher.

No epoch is chosen on the test set: the teacher and the labels row on a validation split of the
training images, every distilled student on its fidelity to the teacher (held-out selected images,
or generated ones for DAFL). The test set is measured every epoch and only reported.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from .. import api
from ..training.threads import cores as available_cores
from ..errors import AttnprobeError
from ..io.atomic import remove_stale, replacing_dir, write_json
from ..io.checkpoints import load_checkpoint
from ..io.jsonfiles import read_json
from ..io.lock import hold
from ..io.tables import read_table, write_table
from ..method.selection import DEFAULT_SELECTION
from ..settings import DemoSettings, EvaluateSettings, ScoreSettings, SelectSettings, TeacherSettings
from ..training.loop import batches_per_epoch
from .demo_rows import FULL_METHOD, ROWS, mean_sd, run_jobs, selection_file
from .demo_students import STUDENT_ROWS, STUDENT_RUNS, measure_costs, student_jobs, summarize_students

# The two sizes of run; each stage's settings as the API takes them. The models are the digits presets
# with 7x7 patches (16 tokens: a teacher step costs 2.3 times less than with 4x4 patches). The teacher
# takes batches of 32 (a ViT this small learns in steps, not epochs) and a small affine jitter; 15% of
# its training digits choose its epoch. The student is the smallest we measured that learns the task to
# 0.95 of the teacher by KD on the original images within the steps a CPU affords (1,000): 117K
# parameters reached 0.97, 53K only 0.92. Its lr is raised for short schedules (the paper's 7.5e-4 is
# for 250+ epochs).
_TEACHER = dict(model="ap_digits_teacher", model_kwargs={"patch_size": 7}, batch_size=32, lr=1e-3, warmup_epochs=1,
                flip=False, affine=True, val_split=0.15)
_STUDENT = dict(student="ap_digits_student", model_kwargs={"patch_size": 7, "embed_dim": 48, "mlp_ratio": 4.0},
                batch_size=64, lr=2e-3, warmup_epochs=1, holdout=0.1, affine=True)
# DAFL's generator at a quarter of its width: at 128 channels its convolutions cost 20 student steps each
_DAFL = dict(generator_width=32)
RUNS = {
    "full": dict(teacher=dict(_TEACHER, epochs=80), student=dict(_STUDENT, steps=1000), num_select=1500, seeds=3,
                 dafl=dict(_DAFL, epochs=10, fidelity_images=1000)),
    "quick": dict(teacher=dict(_TEACHER, epochs=12), student=dict(_STUDENT, steps=60), num_select=400, seeds=2,
                  dafl=dict(_DAFL, epochs=2, fidelity_images=200)),
}
# Wall time of the teacher and of a DAFL run in student runs (the others), for the time-left estimate.
COST = {"teacher": 8, "dafl": 3}
# The `demo` extra: import name -> distribution (what build_digits_benchmark needs).
DEMO_EXTRA = {"mlxtend": "mlxtend", "sklearn": "scikit-learn", "skimage": "scikit-image"}


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnprobe"


def selections() -> dict[str, dict]:
    """The wild rows' select() settings: the paper's strategies, and the project's default when it is none
    of them (README: which selection to use)."""
    out = {"dfnd": dict(strategy="dfnd"), "attnprobe": dict(strategy="attnprobe"), "probe": dict(strategy="probe"),
           "random": dict(strategy="random")}
    if DEFAULT_SELECTION["name"] not in out:
        out[DEFAULT_SELECTION["name"]] = DEFAULT_SELECTION["settings"]
    return out


class Clock:
    """`[i/n] what (elapsed M:SS, about M:SS left)`, the time left from the pace of the finished units."""

    def __init__(self, total_units: float, quiet: bool = False):
        self.total, self.done, self.quiet, self.start = total_units, 0.0, quiet, time.time()

    def __call__(self, what: str, units: float = 0.0) -> None:
        self.done += units
        elapsed = time.time() - self.start
        left = (f", about {_mmss(elapsed / self.done * (self.total - self.done))} left"
                if self.done and elapsed > 5 and self.done < self.total else "")
        if not self.quiet:
            print(f"{what}  (elapsed {_mmss(elapsed)}{left})", flush=True)


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def check_demo_extra() -> None:
    """One line naming the install command when the `demo` extra is missing (checked without importing it)."""
    missing = [dist for name, dist in DEMO_EXTRA.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise AttnprobeError(f"the demo needs the demo extra ({', '.join(missing)} not installed): "
                             'pip install "attnprobe[demo]"')


def _train_only_root(out: Path, train_dir: Path) -> Path:
    """OUT/data/train -> the benchmark's training images: a root without val/, for train_teacher's val_split
    (the benchmark's val/ is the test set, never used to choose). A link, or a copy where links fail."""
    root = out / "data"
    link = root / "train"
    if link.is_symlink() and link.resolve() == train_dir.resolve():
        return root
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    root.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(train_dir.resolve(), target_is_directory=True)
    except OSError:
        copy_folder(train_dir, link)
    return root


def copy_folder(src: Path, dst: Path) -> None:
    """A copy of the folder `src` at `dst` (which must not exist), there whole or not at all."""
    remove_stale(dst)  # what a killed copy left
    with replacing_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _teacher(out: Path, cache: Path, labeled: Path, test: Path, settings: dict, seed: int, bench: dict,
             common: dict, clock) -> dict:
    """OUT/teacher, trained, or copied from the cache where a teacher of the same settings, seed and
    benchmark was trained before (CACHE/teacher-<key>). Its epoch is chosen on the validation split; the
    test set is measured once, on that checkpoint. Returns its best.pt info with test_top1."""
    key = hashlib.sha256(json.dumps([settings, seed, bench["counts"]], sort_keys=True).encode()).hexdigest()[:16]
    cached = cache / f"teacher-{key}"
    if (cached / "best.pt").is_file():
        shutil.rmtree(out / "teacher", ignore_errors=True)
        copy_folder(cached, out / "teacher")
        how = "reused from the cache (same settings)"
        clock.total -= COST["teacher"]  # no time spent: the time left is paced on the students alone
    else:
        api.train_teacher(labeled, out=out / "teacher", settings=TeacherSettings.build(seed=seed, **settings, **common))
        shutil.rmtree(cached, ignore_errors=True)  # a copy without best.pt (an older, killed version's)
        copy_folder(out / "teacher", cached)
        how = "trained"
    info = load_checkpoint(out / "teacher" / "best.pt")[1]
    info["test_top1"] = api.evaluate(out / "teacher" / "best.pt", test, settings=EvaluateSettings(
        workers=common["workers"], device="cpu", progress=False))["top1"]
    clock(f"teacher {how}: test top-1 {info['test_top1']:.4f} at the epoch chosen on validation "
          f"({info['val_top1']:.4f})", COST["teacher"] if how == "trained" else 0)
    return info


def _all_paths_selection(paths: list[str], out: Path, meta: dict) -> None:
    """A 'selection' of every given path (the KD-on-original and no-selection rows)."""
    import pandas as pd
    write_table(pd.DataFrame({"path": paths}), out, meta)


def run_demo(*, out, settings: DemoSettings, progress: bool = False, quiet: bool = False) -> dict:
    """Run the benchmark end to end and write OUT/results.json and OUT/report.html. `settings.jobs`: student
    trainings run at once (default: one per CPU core, at most 8), each with its share of the cores.
    `progress` shows the bars of every stage, `quiet` drops the stage lines."""
    if not isinstance(settings, DemoSettings):
        raise TypeError(f"settings= must be a DemoSettings, not {type(settings).__name__}")
    check_demo_extra()
    quick = settings.quick
    cache = Path(settings.cache) if settings.cache else default_cache() / ("digits-quick" if quick else "digits")
    # one demo per cache: another would rebuild or replace the benchmark and the teacher while this one reads them
    with hold(cache / ".lock", f"attnprobe demo on the cache {cache}",
              "wait for it to finish, or pass --cache DIR to use another cache"):
        return _run_demo(Path(out), settings, cache, progress, quiet)


def _run_demo(out: Path, settings: DemoSettings, cache: Path, progress: bool, quiet: bool) -> dict:
    quick, workers, seed = settings.quick, settings.workers, settings.seed
    from ..io.folders import list_images
    from .demo_data import build_digits_benchmark, load_sources
    from .report import write_report

    size = "quick" if quick else "full"
    cfg = RUNS[size]
    out.mkdir(parents=True, exist_ok=True)
    cores = available_cores()  # affinity and a container's CPU quota, not the host's count
    jobs = settings.jobs or min(cores, 8)
    seeds = [seed + k for k in range(cfg["seeds"])]
    if settings.students:  # only the default selection and the student rows (demo_students.py)
        picks = {n: kw for n, kw in selections().items() if n == DEFAULT_SELECTION["name"]}
        rows = {n: (spec["kind"], "", spec["method"]) for n, spec in STUDENT_ROWS.items()}
        cfg = dict(cfg, student=dict(cfg["student"], **STUDENT_RUNS[size]["student"]), cost=STUDENT_RUNS[size]["cost"])
    else:
        picks = selections()
        rows = {**{n: ROWS[n] for n in ("labels", "kd-original", "dafl")},
                **{n: ROWS.get(n, ("selection", f"wild selection ({n})", FULL_METHOD)) for n in picks},
                "all": ROWS["all"]}
    clock = Clock(COST["teacher"] + 1 + sum(COST.get(n, 1) for n in rows) * len(seeds), quiet)
    t0 = time.time()

    bench = build_digits_benchmark(cache, quick=quick, seed=seed, progress=progress)
    test, wild = Path(bench["test_dir"]), Path(bench["wild_dir"])
    labeled = _train_only_root(out, Path(bench["train_dir"]))  # chosen on a split of it, never on test
    # The whole benchmark is ~10 MB decoded: each image is read from disk once, not once per epoch.
    # overwrite: a rerun of the demo redoes its runs from scratch
    common = dict(workers=workers, device="cpu", progress=progress, cache_images=workers == 0, overwrite=True)
    clock("[1/4] teacher")
    teacher_info = _teacher(out, cache, labeled, test, cfg["teacher"], seed, bench, common, clock)
    teacher = out / "teacher" / "best.pt"

    clock("[2/4] score and select")
    api.score(teacher, wild, out / "scores.parquet",
              settings=ScoreSettings(batch_size=256, workers=workers, device="cpu", progress=progress))
    scores, meta = read_table(out / "scores.parquet")
    for name, kw in picks.items():
        for s in (seeds if name == "random" else seeds[:1]):
            api.select(out / "scores.parquet", out=selection_file(out, name, s),
                       settings=SelectSettings.build(num_select=cfg["num_select"], **{**kw, "seed": s}))
    _all_paths_selection(scores["path"].tolist(), out / "select-all.parquet", meta)
    original_train = Path(bench["original_dir"]) / "train"
    originals = list_images(original_train)
    _all_paths_selection(originals, out / "select-original.parquet",
                         {"classes": teacher_info["classes"]})
    clock("selections written", 1)

    steps = cfg["student"]["steps"]
    n_labeled = round(len(originals) * (1 - cfg["teacher"]["val_split"]))  # less the val split
    labels_epochs = max(1, round(steps / batches_per_epoch(n_labeled, cfg["student"]["batch_size"])))
    dafl_cfg = dict(student=cfg["student"]["student"], model_kwargs=cfg["student"]["model_kwargs"],
                    batch_size=cfg["student"]["batch_size"], lr=cfg["student"]["lr"],
                    iters_per_epoch=steps // cfg["dafl"]["epochs"], **cfg["dafl"])
    base = dict(out=str(out), teacher=str(teacher), test=str(test), wild=str(wild), original_train=str(original_train),
                workers=workers, threads=max(1, cores // jobs), student=cfg["student"], dafl=dafl_cfg,
                val_split=cfg["teacher"]["val_split"], labels_epochs=labels_epochs)
    order = ["dafl"] + [n for n in rows if n != "dafl"]  # the slowest first, so the pool ends together
    todo = (student_jobs(base, seeds, out, DEFAULT_SELECTION["name"]) if settings.students else
            [dict(base, row=n, seed=s, selection=str(out / "select-original.parquet" if n == "kd-original"
                                                      else selection_file(out, n, s)))
             for n in order for s in seeds])
    clock(f"[3/4] {len(todo)} students ({len(rows)} rows x {len(seeds)} seeds, {steps} steps each), {jobs} at a time")
    results = run_jobs(todo, jobs, lambda r: clock(f"  {r['row']} seed {r['seed']}: test top-1 {r['test_top1']:.4f} "
                                                   f"({r['seconds']:.0f} s)", COST.get(r["row"], 1)))

    clock("[4/4] report")
    if settings.students:  # the models' costs measured side by side, now that no training runs
        costs = measure_costs({"teacher": teacher, **{n: out / f"student-{n}" / f"seed{seeds[0]}" / "best.pt"
                                                      for n in rows}}, **cfg["cost"])
        summary = summarize_students(out, results, costs, teacher_info, load_sources(cache), bench, cfg, quick,
                                     seeds, time.time() - t0, DEFAULT_SELECTION["name"])
    else:
        summary = summarize(out, rows, results, teacher_info, load_sources(cache), bench, cfg, quick, seeds,
                            time.time() - t0)
    write_json(out / "results.json", summary)
    write_report(out)
    if not quiet:
        print(f"done in {_mmss(time.time() - t0)}: {out / 'report.html'}")
    return summary


def summarize(out: Path, rows: dict, results: list[dict], teacher_info: dict, sources, bench, cfg, quick, seeds,
              seconds) -> dict:
    """results.json: per row its kind, data and method, the per-seed test top-1 (at the epoch chosen without
    the test set), mean and sd, top-1 relative to the teacher, optimizer steps, and for each wild row the
    precision (fraction of digits) and composition by source of its selection(s)."""
    source_of = dict(zip(sources["path"], sources["source"]))
    digit = dict(zip(sources["path"], sources["label"] >= 0))
    teacher_test = teacher_info["test_top1"]
    table = []
    for name, (kind, data, method) in rows.items():
        runs = sorted((r for r in results if r["row"] == name), key=lambda r: r["seed"])
        top1 = [r["test_top1"] for r in runs]
        mean, sd = mean_sd(top1)
        row = {"name": name, "kind": kind, "data": data, "method": method, "seeds": [r["seed"] for r in runs],
               "test_top1": top1, "top1": mean, "top1_sd": sd, "relative_top1": mean / teacher_test,
               "steps": runs[0]["steps"], "selected_on": runs[0]["selected_on"],
               "best_epoch": [r["best_epoch"] for r in runs], "seconds": [r["seconds"] for r in runs]}
        if runs[0]["selected_on"] == "val":
            row["val_top1"] = [r["val_top1"] for r in runs]
        else:
            row["fidelity"] = [r["fidelity"] for r in runs]
        if kind in ("selection", "wild"):
            files = sorted({selection_file(out, name, s) for s in seeds})
            picked = [read_table(f)[0]["path"] for f in files]
            row["selection"] = [f.name for f in files]
            row["precision"] = statistics.fmean(sum(digit[p] for p in sel) / len(sel) for sel in picked)
            row["composition"] = {s: int(n) for s, n in picked[0].map(source_of).value_counts().items()}
            if name != "all":
                summary = read_json(files[0].with_suffix(".json"), what="a selection's summary",
                                    fix=f"run `attnprobe demo --out {out}` again")
                row["settings"] = {k: summary[k] for k in ("strategy", "w_attn", "w_out", "normalize")}
        table.append(row)
    return {
        "quick": quick, "seconds": round(seconds, 1), "config": cfg, "seeds": seeds,
        "default_selection": DEFAULT_SELECTION["name"],
        "teacher": {"top1": teacher_test, "test_top1": teacher_test, "val_top1": teacher_info["val_top1"],
                    "selected_on": "val", "best_epoch": teacher_info["best_epoch"], "params": teacher_info["params"],
                    "checkpoint": "teacher/best.pt"},
        "student_params": load_checkpoint(out / "student-all" / f"seed{seeds[0]}" / "best.pt")[1]["params"],
        "pool": {"size": int(len(sources)), "digits": int((sources["label"] >= 0).sum()),
                 "by_source": {s: int(n) for s, n in sources["source"].value_counts().items()},
                 "wild_dir": str(bench["wild_dir"]), "sources_csv": str(bench["sources_csv"]),
                 "test_dir": str(bench["test_dir"])},
        "rows": table,
    }
