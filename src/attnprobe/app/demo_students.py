"""`attnprobe demo --students`: other students on the digits benchmark, what they cost and what they give.

A small CNN configured for 28-px digits (the `ap_digits_resnet` preset: resnet18 with one block per stage and
narrow stages) and a ViT with half the teacher's token-grid side (the demo's ViT student with 14-px patches:
2 x 2 tokens where the teacher has 4 x 4), each by KD and noise adaptation on the default selection, without
and with the probe loss across grids (method/probe_maps.py); the CNN also by KD on the original images (like
the table's `kd-original` row); and the demo's own ViT student on the default selection with the full method,
for comparison. Every row trains as the table's rows do: the same seeds, optimizer steps, batch size and
learning rate, its epoch chosen on fidelity to the teacher, the test set measured once on that checkpoint.

The cost of each model (parameters, FLOPs per image, images/s) is measured at the end, when no training runs:
the teacher and every row's checkpoint one after another in the same process, on one CPU thread, in rounds
(each model's best round kept), so that a student's throughput against the teacher's is a fair ratio.
"""
from __future__ import annotations

from pathlib import Path

from ..io.checkpoints import load_checkpoint
from ..io.tables import read_table
from ..method.probe_maps import feature_stages, stage_grids
from ..models import geometry, input_shape, is_cls_vit
from .demo_rows import PROBE_WEIGHT, mean_sd, selection_file

# name: what the row is. student: a preset (its own constructor kwargs) or None for the demo's ViT student, whose
# kwargs `model_kwargs` then overrides; on_original: KD on the original training images, else the default selection.
_CNN, _KD, _NA = "ap_digits_resnet", "KD", "KD + noise adaptation"
STUDENT_ROWS = {
    "cnn-kd-original": dict(student=_CNN, model_kwargs={}, on_original=True, kind="reference",
                            distill=dict(noise_adaptation=False, probe_weight=0.0),
                            data="original training set, no labels", method=_KD),
    "cnn-kd": dict(student=_CNN, model_kwargs={}, on_original=False, kind="selection",
                   distill=dict(probe_weight=0.0), method=_NA),
    "cnn-probe": dict(student=_CNN, model_kwargs={}, on_original=False, kind="selection",
                      distill=dict(probe_weight=PROBE_WEIGHT), method=_NA + " + probe (across grids)"),
    "vit-2x2-kd": dict(student=None, model_kwargs={"patch_size": 14}, on_original=False, kind="selection",
                       distill=dict(probe_weight=0.0), method=_NA),
    "vit-2x2-probe": dict(student=None, model_kwargs={"patch_size": 14}, on_original=False, kind="selection",
                          distill=dict(probe_weight=PROBE_WEIGHT), method=_NA + " + probe (across grids)"),
    "vit-4x4-probe": dict(student=None, model_kwargs={}, on_original=False, kind="selection",
                          distill=dict(probe_weight=PROBE_WEIGHT), method=_NA + " + probe (the full method)"),
}
# What a --students run changes in the demo's RUNS: the students' settings (none: the same as the table's rows), and
# how each model is timed: seconds per round, rounds, images per forward pass. Batches of 256 (distill's and run's
# evaluate default) measure throughput: at 32 a forward of these tiny models is mostly per-layer overhead, and the
# CNN's lead over the teacher shrinks (one thread, a busy 2-core machine: 2.4x at 256, 1.4x at 32, 1.8x at 1).
STUDENT_RUNS = {"full": dict(student={}, cost=dict(seconds=1.0, rounds=3, batch_size=256)),
                "quick": dict(student={}, cost=dict(seconds=0.1, rounds=2, batch_size=256))}
# The pool's slowest jobs first, so that the processes end together.
JOB_ORDER = ["vit-4x4-probe", "cnn-probe", "cnn-kd", "vit-2x2-probe", "cnn-kd-original", "vit-2x2-kd"]


def student_config(name: str, demo_student: dict) -> dict:
    """The row's student settings: the demo's (steps, batch size, lr, ...) with its architecture."""
    spec = STUDENT_ROWS[name]
    if spec["student"] is None:
        return dict(demo_student, model_kwargs={**demo_student["model_kwargs"], **spec["model_kwargs"]})
    return dict(demo_student, student=spec["student"], model_kwargs=dict(spec["model_kwargs"]))


def student_jobs(base: dict, seeds: list[int], out: Path, selection: str) -> list[dict]:
    """One train_row job per (row, seed): the default selection's file (`selection` names it) or the original
    images, the row's student and its DistillSettings."""
    jobs = []
    for name in JOB_ORDER:
        spec = STUDENT_ROWS[name]
        for s in seeds:
            file = out / "select-original.parquet" if spec["on_original"] else selection_file(out, selection, s)
            jobs.append(dict(base, row=name, seed=s, student=student_config(name, base["student"]),
                             distill=dict(spec["distill"]), on_original=spec["on_original"], selection=str(file)))
    return jobs


def structure(net, info: dict) -> dict:
    """What a model is, in words and numbers: a ViT's depth, width and token grid; a CNN's stages (channels and
    grid of each feature stage at the input size)."""
    if is_cls_vit(net):
        g = geometry(net)
        patch = net.patch_embed.patch_size
        h, w = g["grid_size"]
        return {"kind": "ViT", "grid": [h, w], "depth": g["depth"], "width": int(net.embed_dim),
                "text": f"ViT, {g['depth']} blocks of width {net.embed_dim}, {h}x{w} tokens of {patch[0]} px"}
    stages = feature_stages(net)
    grids = stage_grids(net, stages, input_shape(info))
    chans = {f["module"]: int(f["num_chs"]) for f in net.feature_info}
    text = ", ".join(f"{chans[s]}@{grids[s][0]}x{grids[s][1]}" for s in stages)
    return {"kind": "CNN", "stages": [[s, chans[s], list(grids[s])] for s in stages],
            "text": f"CNN, stages (channels@grid) {text}"}


def measure_costs(checkpoints: dict[str, Path], *, seconds: float, rounds: int = 3, batch_size: int = 256) -> dict:
    """{name: model_cost of the checkpoint, with its arch and structure}: every model loaded first, then timed
    one after another on one CPU thread, `rounds` times in turn; each keeps its fastest round (the one least
    disturbed by whatever else ran on the machine)."""
    import torch

    from ..training.measure import model_cost
    models = {name: load_checkpoint(path) for name, path in checkpoints.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best: dict[str, dict] = {}
    try:
        for _ in range(rounds):
            for name, (net, info) in models.items():
                cost = model_cost(net, info, device="cpu", batch_size=batch_size, seconds=seconds)
                if name not in best or cost["images_per_s"] > best[name]["images_per_s"]:
                    best[name] = cost
    finally:
        torch.set_num_threads(threads)
    return {name: {**best[name], "rounds": rounds, "arch": info["arch"], "model_kwargs": info["model_kwargs"],
                   "structure": structure(net, info)} for name, (net, info) in models.items()}


def _side(cost: dict) -> dict:
    return {k: cost[k] for k in ("arch", "params", "flops", "images_per_s")}


def summarize_students(out: Path, results: list[dict], costs: dict, teacher_info: dict, sources, bench: dict,
                       cfg: dict, quick: bool, seeds: list[int], seconds: float, selection: str) -> dict:
    """results.json of a --students run: per row its student (architecture, structure, probe plan), data and
    method, the per-seed test top-1 at the epoch chosen on fidelity, mean and sd, relative to the teacher, steps,
    and its cost beside the teacher's (params, FLOPs per image, images/s, and their ratios)."""
    teacher_test, t_cost = teacher_info["test_top1"], costs["teacher"]
    sel_file = selection_file(out, selection, seeds[0])
    picked = read_table(sel_file)[0]["path"]
    source_of = dict(zip(sources["path"], sources["source"]))
    digit = dict(zip(sources["path"], sources["label"] >= 0))
    table = []
    for name, spec in STUDENT_ROWS.items():
        runs = sorted((r for r in results if r["row"] == name), key=lambda r: r["seed"])
        top1 = [r["test_top1"] for r in runs]
        mean, sd = mean_sd(top1)
        probe = runs[0]["probe"] or {}
        cost = costs[name]
        table.append({
            "name": name, "kind": spec["kind"], "student": cost["arch"], "structure": cost["structure"],
            "model_kwargs": cost["model_kwargs"],
            "data": spec.get("data", f"wild selection ({selection})"), "method": spec["method"],
            "probe_weight": [(r["probe"] or {}).get("weight") for r in runs], "probe_kind": probe.get("kind"),
            "student_grids": probe.get("student_grids"), "seeds": [r["seed"] for r in runs], "test_top1": top1,
            "top1": mean, "top1_sd": sd, "relative_top1": mean / teacher_test, "steps": runs[0]["steps"],
            "selected_on": runs[0]["selected_on"], "best_epoch": [r["best_epoch"] for r in runs],
            "fidelity": [r["fidelity"] for r in runs], "seconds": [r["seconds"] for r in runs],
            "checkpoint": f"student-{name}/seed{seeds[0]}/best.pt",
            "cost": {k: cost[k] for k in ("params", "flops", "images_per_s")}, "teacher": _side(t_cost),
            "vs_teacher": {"params": cost["params"] / t_cost["params"], "flops": cost["flops"] / t_cost["flops"],
                           "images_per_s": cost["images_per_s"] / t_cost["images_per_s"]}})
    return {
        "students": True, "quick": quick, "seconds": round(seconds, 1), "config": cfg, "seeds": seeds,
        "default_selection": selection,
        "selection": {"file": sel_file.name, "size": int(len(picked)),
                      "precision": sum(digit[p] for p in picked) / len(picked),
                      "composition": {s: int(n) for s, n in picked.map(source_of).value_counts().items()}},
        "cost_measured": {k: t_cost[k] for k in ("device", "threads", "batch_size", "rounds")},
        "teacher": {"top1": teacher_test, "test_top1": teacher_test, "val_top1": teacher_info["val_top1"],
                    "selected_on": "val", "best_epoch": teacher_info["best_epoch"], "params": teacher_info["params"],
                    "checkpoint": "teacher/best.pt", "structure": t_cost["structure"], "cost": _side(t_cost)},
        "pool": {"size": int(len(sources)), "digits": int((sources["label"] >= 0).sum()),
                 "by_source": {s: int(n) for s, n in sources["source"].value_counts().items()},
                 "wild_dir": str(bench["wild_dir"]), "sources_csv": str(bench["sources_csv"]),
                 "test_dir": str(bench["test_dir"])},
        "rows": table,
    }
