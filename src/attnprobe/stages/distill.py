"""Distillation: a student trained from scratch on the selected wild images, the teacher its only
supervision. The epoch kept (best.pt) is chosen without labels: by fidelity, the student's top-1
agreement with the teacher on a fixed, seeded part of the selection held out from training. A test set,
when given, is measured every epoch for the record; choosing on it (`select_on="test"`) is optimistic.

(Named `distillation`, not `distill`: a submodule `attnprobe.distill` would shadow the package's
`attnprobe.distill` function once imported. `from attnprobe.train import distill` keeps working.)"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset

from ..errors import AttnprobeError
from ..io.checkpoints import file_sha256, load_checkpoint
from ..io.datasets import ImageList, labeled_folder, per_class_subset, split_holdout
from ..io.images import RESIZE_MODES, eval_transform, train_transform
from ..io.shards import is_shard_pool
from ..io.tables import read_table
from ..io.tar_members import MemberLoader, member_index
from ..method.losses import NoiseAdaptation
from ..method.probe import check_blocks, default_distill_blocks, map_blocks
from ..models import build_model, describe, geometry, resolve_model
from ..training.distributed import init_distributed, is_main, rank
from ..training.engine import DistillModel, distill_one_epoch, fidelity, predict
from ..training.loop import (
    RunDir,
    _class_dir,
    _ddp,
    _eval_loader,
    _fit,
    _measure_top1,
    _restore_rng,
    _resume_state,
    _train_loader,
    batches_per_epoch,
    lr_schedule,
    recorded_settings,
    seed_everything,
)

SELECT_ON = ("fidelity", "test")


def _student(student: str, model_kwargs: dict | None, t_info: dict, teacher, probe_on: bool):
    """The student as a timm model with the teacher's classes and input geometry: a preset's own img_size
    and in_chans are replaced by the teacher's; only img_size/in_chans given in `model_kwargs` override."""
    arch, kwargs = resolve_model(student, model_kwargs, input_from=t_info)
    net = build_model(arch, kwargs, t_info["num_classes"])
    s_geo, t_geo = geometry(net), geometry(teacher)
    if (s_geo["img_size"], s_geo["in_chans"]) != (t_geo["img_size"], t_geo["in_chans"]):
        given = " ".join(f"{k}={(model_kwargs or {})[k]!r}" for k in ("img_size", "in_chans") if k in (model_kwargs or {}))
        raise AttnprobeError(f"student input {s_geo['img_size']}px x{s_geo['in_chans']} differs from the teacher's "
                             f"{t_geo['img_size']}px x{t_geo['in_chans']}; drop --model-kwargs {given} (the student "
                             "takes the teacher's input)")
    # Each model's CLS token is compared with its own patch tokens, so the prefix tokens may differ (a
    # distilled DeiT teacher has two); the patch grids must match token for token.
    if probe_on and s_geo["grid_size"] != t_geo["grid_size"]:
        raise AttnprobeError(f"student token grid {s_geo['grid_size']} differs from the teacher's {t_geo['grid_size']}; "
                             "use the teacher's patch_size or turn the probe loss off with --probe-weight 0")
    return net, arch, kwargs


def selected_paths(selection, wild, teacher_sha256: str | None = None) -> tuple[list[str], dict]:
    """The selection's paths (checked to exist under the wild folder) and its JSON summary. With
    `teacher_sha256`, a selection whose table records the teacher that scored it (score's metadata, carried
    over by select) must have been scored by this teacher; a selection without the record passes."""
    paths, summary, _ = _selection(selection, wild, teacher_sha256)
    return paths, summary


def _selection(selection, wild, teacher_sha256: str | None = None) -> tuple[list[str], dict, dict | None]:
    """selected_paths, and for a pool of tar shards the members' index (shards.member_index; None for a
    folder), built from the same reading of the table and listing of the shards."""
    df, meta = read_table(selection)
    if "path" not in df.columns or df.empty:
        raise AttnprobeError(f"{selection} has no selected paths; pass the output of `attnprobe select`")
    scored_by = meta.get("teacher_sha256") if isinstance(meta, dict) else None
    if teacher_sha256 and scored_by and scored_by != teacher_sha256:
        raise AttnprobeError(f"{selection} was scored with another teacher (sha256 {scored_by[:12]}..., this one is "
                             f"{teacher_sha256[:12]}...); rescore with this teacher, or pass the teacher that scored "
                             f"it{_scored_by(meta)}")
    summary_path = Path(selection).with_suffix(".json")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if is_shard_pool(wild):  # members of tar shards: each in a shard that `wild` names, readable by offset
        return df["path"].tolist(), summary, member_index(df, wild, selection)
    wild = Path(wild)
    if not wild.is_dir():
        what = "is a file, not a folder" if wild.exists() else "does not exist"
        raise AttnprobeError(f"wild folder {wild} {what}; pass the folder of images that was scored")
    paths = df["path"].tolist()
    missing = [p for p in paths if not (wild / p).is_file()]
    if missing:
        raise AttnprobeError(f"{len(missing)} selected paths are not under {wild} (e.g. {missing[0]}); "
                             "pass the same --wild folder that was scored")
    return paths, summary, None


def _scored_by(meta: dict) -> str:
    teacher = meta.get("teacher")
    return f" ({teacher})" if isinstance(teacher, str) and teacher else ""


def _fidelity_measure(teacher_net, t_info: dict, held: list[str], resize: str, batch_size: int, workers: int,
                      device, progress: bool, cache: bool, loader=None):
    """measure(student) -> {fidelity, fidelity_n} on the held-out images, seen as the teacher sees them (its
    eval transform, the run's `resize`). The teacher's predictions are computed here, once, on this
    process's shard of the held-out images."""
    ds = ImageList(held, transform=eval_transform(t_info, resize=resize), in_chans=t_info["in_chans"], cache=cache,
                   loader=loader)
    loader = _eval_loader(ds, batch_size, workers)
    teacher_pred = predict(teacher_net, loader, device, progress)

    def measure(student) -> dict:
        f = fidelity(student, loader, teacher_pred, device, progress)
        return {"fidelity": f["fidelity"], "fidelity_n": f["n"]}
    return measure


def distill(teacher, wild, selection, *, out, test=None, student: str = "ap_digits_student",
            model_kwargs: dict | None = None, epochs: int = 10, batch_size: int = 256,
            lr: float = 7.5e-4, weight_decay: float = 0.025, schedule: str = "cosine", warmup_epochs: int = 0,
            temperature: float = 4.0, probe_weight: float = 0.8, probe_blocks: list[int] | None = None,
            probe_variant: str = "cosine", noise_adaptation: bool = True, noise_weight: float = 1.0,
            noise_lr: float = 1e-3, robust: bool = False, teacher_acc: float | None = None,
            labeled=None, per_class: int = 0, flip: bool = True, affine: bool = False, workers: int = 2,
            device: str | None = None, seed: int = 0, resume=None, progress: bool = True, cache_images: bool = False,
            resize: str = "crop", holdout: float | int = 0.1, select_on: str = "fidelity",
            overwrite: bool = False, steps: int | None = None) -> dict:
    """Train a student from scratch on the selected wild images with the teacher as the only supervision.

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

    Under torchrun each process distills on its shard of the selection with `batch_size` images per step;
    the student and the noise-adaptation matrix are trained as one DistributedDataParallel module, the
    teacher runs unwrapped on each process, the held-out and test images are sharded and their counts
    summed, and rank 0 alone writes RUN/."""
    if resize not in RESIZE_MODES:
        raise AttnprobeError(f"--resize {resize!r} is not one of {RESIZE_MODES}")
    if select_on not in SELECT_ON:
        raise AttnprobeError(f"--select-on {select_on!r} is not one of {SELECT_ON}")
    if select_on == "test" and test is None:
        raise AttnprobeError("--select-on test chooses the epoch on the test set and needs --test; "
                             "without one, choose on fidelity")
    from ..settings import DistillSettings
    settings = recorded_settings(DistillSettings, dict(locals()))  # the arguments, before any is reassigned
    device = init_distributed(device)
    progress = progress and is_main()
    seed_everything(seed)
    teacher_net, t_info = load_checkpoint(teacher, device)
    teacher_sha256 = file_sha256(teacher)
    teacher_net.eval().requires_grad_(False)
    t_depth = geometry(teacher_net)["depth"]
    t_blocks = check_blocks(probe_blocks if probe_blocks else default_distill_blocks(t_depth), t_depth,
                            "--probe-blocks") if probe_weight > 0 else []
    net, arch, kwargs = _student(student, model_kwargs, t_info, teacher_net, probe_weight > 0)
    net = net.to(device)
    s_blocks = map_blocks(t_blocks, t_depth, geometry(net)["depth"])

    paths, summary, members = _selection(selection, wild, teacher_sha256)
    # a shard pool's members are read by offset from their tar files; a folder's images by their paths
    wild_loader = MemberLoader(members, t_info["in_chans"], cache=cache_images) if members is not None else None
    train_paths, held = split_holdout(paths if wild_loader else [os.path.join(wild, p) for p in paths], holdout, seed)
    train_ds = ImageList(train_paths, transform=train_transform(t_info, flip, affine, resize=resize),
                         in_chans=t_info["in_chans"], cache=cache_images, loader=wild_loader)
    if labeled and per_class > 0:
        labeled_ds = labeled_folder(_class_dir(labeled, t_info["classes"], "train"), t_info["classes"], None,
                                    t_info["in_chans"])
        # used like wild images (teacher-supervised, same augmentation), but always cropped, not stretched
        mixed = ImageList(per_class_subset(labeled_ds, per_class, seed),
                          transform=train_transform(t_info, flip, affine),
                          in_chans=t_info["in_chans"], cache=cache_images)
        train_ds = ConcatDataset([train_ds, mixed])
    # Test images of another size or colour mode are resized and converted to the teacher's geometry.
    test_ds = None if test is None else labeled_folder(_class_dir(test, t_info["classes"], "val"), t_info["classes"],
                                                       eval_transform(t_info), t_info["in_chans"], cache_images)

    alpha = teacher_acc if teacher_acc is not None else t_info.get("accuracy")
    if noise_adaptation and not (alpha and 0 < alpha <= 1):
        if alpha is None:
            raise AttnprobeError("the teacher checkpoint has no measured accuracy; pass --teacher-acc (a fraction, "
                                 "e.g. 0.9665) or --no-noise-adaptation")
        raise AttnprobeError(f"the teacher checkpoint's accuracy {alpha} is not a fraction in (0, 1] that noise "
                             "adaptation can use; pass --teacher-acc (e.g. 0.9665) or --no-noise-adaptation")
    noise = NoiseAdaptation(t_info["num_classes"], alpha).to(device) if noise_adaptation else None
    weights = None
    if robust:
        if "class_weights" not in summary:
            raise AttnprobeError(f"--robust needs the class weights in {Path(selection).with_suffix('.json')}; "
                                 "rerun attnprobe select")
        weights = torch.tensor(summary["class_weights"], dtype=torch.float32, device=device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    optimizers = [optimizer] + ([torch.optim.Adam(noise.parameters(), lr=noise_lr)] if noise else [])
    per_epoch = batches_per_epoch(len(train_ds), batch_size)
    if steps is not None:
        epochs = -(-steps // per_epoch)
    steps = steps if steps is not None else epochs * per_epoch
    scheduler = lr_schedule(optimizer, schedule, epochs, warmup_epochs)
    info = describe(net, arch, kwargs, t_info["classes"], t_info["mean"], t_info["std"], role="student",
                    teacher=os.path.abspath(teacher), selection=os.path.abspath(selection),
                    teacher_accuracy=t_info.get("accuracy"), resize=resize, selected_on=select_on,
                    holdout=len(held), teacher_sha256=teacher_sha256, settings=settings, epochs=epochs, steps=steps)
    run = RunDir(out, resume=bool(resume), overwrite=overwrite)
    objects = {"model": net, "optimizer": optimizer, "scheduler": scheduler}
    if noise:
        objects.update(noise=noise, noise_optimizer=optimizers[1])
    resumed = _resume_state(resume, run, objects, same={"holdout": (len(held), "--holdout"),
                                                        "selected_on": (select_on, "--select-on"),
                                                        "teacher_sha256": (teacher_sha256, "--teacher")},
                            settings=settings)
    seed_everything(seed + rank())  # the data streams: distinct per process, fixed by the seed
    train_loader = _train_loader(train_ds, batch_size, workers, seed)
    measure_fidelity = _fidelity_measure(teacher_net, t_info, held, resize, batch_size, workers, device, progress,
                                         cache_images, wild_loader)
    _restore_rng(resumed, seed, train_loader.generator)
    model = _ddp(DistillModel(net, noise), device)

    test_loaders = {} if test_ds is None else {"test": _eval_loader(test_ds, batch_size, workers)}
    return _fit(run, info, objects, resumed, epochs, train_loader,
                lambda: distill_one_epoch(model, teacher_net, train_loader, optimizers, device,
                                          temperature=temperature, noise_weight=noise_weight, class_weights=weights,
                                          probe_weight=probe_weight, teacher_blocks=t_blocks,
                                          student_blocks=s_blocks, probe_variant=probe_variant, progress=progress,
                                          max_batches=steps - train_loader.sampler.epoch * per_epoch),
                lambda: {**measure_fidelity(net), **_measure_top1(test_loaders, net, device, progress)},
                "fidelity" if select_on == "fidelity" else "test_top1",
                lambda row: {"fidelity": row.get("fidelity"), "accuracy": row.get("test_top1")})
