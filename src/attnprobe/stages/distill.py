"""Distillation: a student trained from scratch on the selected wild images, the teacher its only
supervision. The epoch kept (best.pt) is chosen without labels: by fidelity, the student's top-1
agreement with the teacher on a fixed, seeded part of the selection held out from training. A test set,
when given, is measured every epoch for the record; choosing on it (`select_on="test"`) is optimistic."""
from __future__ import annotations

import os

import torch

from ..errors import AttnprobeError
from ..io.checkpoints import file_sha256, load_checkpoint
from ..io.datasets import labeled_folder
from ..io.folders import class_dir
from ..io.images import eval_transform
from ..io.jsonfiles import field
from ..io.selection import read_selection, selected_paths, summary_path
from ..method.losses import NoiseAdaptation
from ..method.probe import check_blocks, default_distill_blocks
from ..method.probe_maps import DEFAULT_PROBE_WEIGHT, student_probe_layers
from ..models import build_student, describe, geometry, input_shape, student_kind
from ..training.distributed import init_distributed, is_main, rank
from ..training.engine import DistillModel, distill_one_epoch
from ..training.loop import RunDir, batches_per_epoch, ddp, eval_loader, fit, lr_schedule, measure_top1
from ..training.resume import recorded_settings, restore_rng, resume_state, seed_everything
from .distill_data import distill_data

__all__ = ["distill", "selected_paths"]  # selected_paths: io.selection's, kept importable from here


def distill(*, teacher, wild, selection, out, test=None, settings) -> dict:
    """Train a student from scratch on the selected wild images with the teacher as the only supervision
    (`settings`: a DistillSettings).

    `holdout`: the part of the selection held out to measure fidelity (top-1 agreement with the teacher)
    every epoch and never trained on: a fraction in (0, 1) of the distinct selected images (at most
    10,000) or a number of images; drawn with `seed` alone. The labeled `per_class` images are never held
    out. `test` (optional): a labeled folder of the teacher's classes, measured every epoch (test_top1,
    test_top5). `select_on`: which epoch best.pt keeps, `fidelity` (no labels) or `test` (needs `test`;
    optimistic, the reference's habit). Returns the chosen epoch's info: selected_on, fidelity, accuracy
    (its test top-1, or None without `test`), holdout (the count), best_epoch.

    `steps`: when given, train for exactly that many optimizer steps instead of `epochs` (as many epochs as
    that takes, the last one cut short): equal compute for selections of different sizes. The info records
    `epochs` and `steps` either way.

    `resize`: how a wild image is brought to the teacher's input before the augmentation: `crop`
    (shorter side, centre crop) or `stretch` (the whole image to the square input, as the reference).
    The labeled images (the mixed-in `per_class` ones and the test set) are always cropped.

    The images (distill_data.py): unless `no_decode_cache`, each distinct selected image (and mixed-in labeled
    one) is decoded once, at the teacher's input size after the deterministic `resize`, into the decoded
    selection (`decode_cache`, default SEL.decoded/ beside the selection; io/decoded.py), which later epochs,
    runs and strategies reuse; each epoch gathers uint8 batches from it and augments and normalises them on the
    device (`decoded_on`: the whole set in device memory, or memory-mapped from disk). Unreadable images are
    listed once and left out. With `no_decode_cache`, today's path: every image decoded and augmented again in
    every epoch by the DataLoader's workers.

    Under torchrun each process distills on its shard of the selection with `batch_size` images per step;
    the student and the noise-adaptation matrix are trained as one DistributedDataParallel module, the
    teacher runs unwrapped on each process, the held-out and test images are sharded and their counts
    summed, and rank 0 alone writes RUN/."""
    s = settings
    if s.select_on == "test" and test is None:
        raise AttnprobeError("--select-on test chooses the epoch on the test set and needs --test; "
                             "without one, choose on fidelity")
    recorded = recorded_settings(s)
    device = init_distributed(s.device)
    progress = s.progress and is_main()
    seed_everything(s.seed)
    teacher_net, t_info = load_checkpoint(teacher, device, teacher=True)
    teacher_sha256 = file_sha256(teacher)
    teacher_net.eval().requires_grad_(False)
    net, arch, kwargs = build_student(s.student, s.model_kwargs, teacher_info=t_info, teacher_model=teacher_net)
    net = net.to(device)
    probe = probe_plan(s, teacher_net, net, t_info)

    paths, summary, members = read_selection(selection, wild, teacher_sha256=teacher_sha256)
    weights = None
    if s.robust:  # checked before any file is written
        if "class_weights" not in summary:
            raise AttnprobeError(f"--robust needs the class weights in {summary_path(selection)}; rerun attnprobe select")
        weights = field(summary, "class_weights", list, path=summary_path(selection), what="the selection's summary",
                        fix="--robust needs its class weights: rerun attnprobe select")
    noise = _noise_adaptation(s, t_info, device)  # refused (no teacher accuracy) before any decoding
    data = distill_data(s, t_info=t_info, wild=wild, selection=selection, paths=paths, members=members,
                        device=device, progress=progress)
    # Test images of another size or colour mode are resized and converted to the teacher's geometry.
    test_ds = None if test is None else labeled_folder(class_dir(test, t_info["classes"], "val"), t_info["classes"],
                                                       eval_transform(t_info), t_info["in_chans"], s.cache_images)

    if weights is not None:
        weights = torch.tensor(weights, dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    optimizers = [optimizer] + ([torch.optim.Adam(noise.parameters(), lr=s.noise_lr)] if noise else [])
    per_epoch = batches_per_epoch(data.n, s.batch_size)
    epochs = -(-s.steps // per_epoch) if s.steps is not None else s.epochs
    steps = s.steps if s.steps is not None else epochs * per_epoch
    scheduler = lr_schedule(optimizer, s.schedule, epochs, s.warmup_epochs)
    info = describe(net, arch, kwargs, t_info["classes"], t_info["mean"], t_info["std"], role="student",
                    teacher=os.path.abspath(teacher), selection=os.path.abspath(selection),
                    teacher_accuracy=t_info.get("accuracy"), resize=s.resize, selected_on=s.select_on,
                    holdout=data.held, teacher_sha256=teacher_sha256, settings=recorded, epochs=epochs, steps=steps,
                    input_from=t_info, probe=probe)
    run = RunDir(out, resume=bool(s.resume), overwrite=s.overwrite)
    objects = {"model": net, "optimizer": optimizer, "scheduler": scheduler}
    if noise:
        objects.update(noise=noise, noise_optimizer=optimizers[1])
    resumed = resume_state(s.resume, run, objects, same={"holdout": (data.held, "--holdout"),
                                                         "selected_on": (s.select_on, "--select-on"),
                                                         "teacher_sha256": (teacher_sha256, "--teacher")},
                           settings=recorded)
    seed_everything(s.seed + rank())  # the data streams: distinct per process, fixed by the seed
    loader = data.loader()  # DataLoader or decoded batches: the same .sampler and .generator
    measure_fidelity = data.measure(teacher_net)
    restore_rng(resumed, s.seed, loader.generator)
    model = ddp(DistillModel(net, noise), device)

    test_loaders = {} if test_ds is None else {"test": eval_loader(test_ds, s.batch_size, s.workers)}
    return fit(run, info, objects, resumed, epochs, loader,
               lambda: distill_one_epoch(model, teacher_net, loader, optimizers, device,
                                         temperature=s.temperature, noise_weight=s.noise_weight, class_weights=weights,
                                         probe_weight=probe["weight"], teacher_blocks=probe["teacher_blocks"],
                                         student_layers=probe["student_layers"], probe_variant=s.probe_variant,
                                         progress=progress,
                                         max_batches=steps - loader.sampler.epoch * per_epoch),
               lambda: {**measure_fidelity(net), **measure_top1(test_loaders, net, device, progress)},
               "fidelity" if s.select_on == "fidelity" else "test_top1",
               lambda row: {"fidelity": row.get("fidelity"), "accuracy": row.get("test_top1")})


def probe_plan(s, teacher_net, student, t_info: dict) -> dict:
    """What the probe term compares: its weight (--probe-weight, or the default for this kind of student), the
    teacher blocks, the student layer matched to each (ViT blocks or CNN stages, method/probe_maps.py) and the
    grid of each student map. Refuses what cannot be compared, before any image is decoded."""
    t_geo = geometry(teacher_net)
    kind = student_kind(student, teacher_net)
    weight = s.probe_weight if s.probe_weight is not None else DEFAULT_PROBE_WEIGHT[kind]
    plan = {"kind": kind, "weight": weight, "teacher_blocks": [], "student_layers": [], "student_grids": [],
            "teacher_grid": list(t_geo["grid_size"])}
    if weight <= 0:
        return plan
    if kind == "no-cls" and s.probe_variant != "cosine":
        raise AttnprobeError(f"--probe-variant {s.probe_variant} normalises along a ViT's tokens; a student without "
                             "a CLS token has only the cosine map: drop --probe-variant")
    depth = t_geo["depth"]
    blocks = check_blocks(s.probe_blocks if s.probe_blocks else default_distill_blocks(depth), depth, "--probe-blocks")
    layers, grids = student_probe_layers(student, blocks, depth, input_shape(t_info), vit=kind != "no-cls")
    return {**plan, "teacher_blocks": blocks, "student_layers": layers, "student_grids": [list(g) for g in grids]}


def _noise_adaptation(s, t_info: dict, device) -> NoiseAdaptation | None:
    """DFND's noise adaptation with alpha = --teacher-acc or the teacher's recorded accuracy (None when off)."""
    if not s.noise_adaptation:
        return None
    alpha = s.teacher_acc if s.teacher_acc is not None else t_info.get("accuracy")
    if not (alpha and 0 < alpha <= 1):
        if alpha is None:
            raise AttnprobeError("the teacher checkpoint has no measured accuracy; pass --teacher-acc (a fraction, "
                                 "e.g. 0.9665) or --no-noise-adaptation")
        raise AttnprobeError(f"the teacher checkpoint's accuracy {alpha} is not a fraction in (0, 1] that noise "
                             "adaptation can use; pass --teacher-acc (e.g. 0.9665) or --no-noise-adaptation")
    return NoiseAdaptation(t_info["num_classes"], alpha).to(device)
