"""DAFL (Chen et al., ICCV 2019, "Data-Free Learning of Student Networks"): Table 1's no-data row. A
generator G turns noise into images the frozen teacher T finds class-like; the student learns by KD on G's
images in the same step. No image is read at all (a test set, when given, is only measured). The generator
and its losses are method/dafl.py.

The facts below are DAFL's official code (DAFL/DAFL-train.py): its MNIST defaults (120 iterations per
epoch, Adam for both networks, lr_G 0.2, lr_S 2e-3, latent 100, oh 1, a 0.1, ie 5, KD as KL at temperature
1 on the teacher's logits of the detached images)."""
from __future__ import annotations

import os
import types

import torch
from torch import nn

from ..errors import AttnprobeError
from ..io.checkpoints import file_sha256, load_checkpoint
from ..io.datasets import labeled_folder
from ..io.folders import class_dir
from ..io.images import eval_transform
from ..method.dafl import Generator, generator_loss, teacher_outputs, top1_agreement
from ..method.losses import kd_loss
from ..models import build_student, describe, geometry
from ..training.distributed import world_size
from ..training.engine import Mean, progress_bar
from ..training.loop import RunDir, eval_loader, fit, lr_schedule, measure_top1, pick_device
from ..training.resume import recorded_settings, restore_rng, resume_state, seed_everything

# ---- one epoch: G and S updated on each iteration -----------------------------------------------------

def dafl_one_epoch(generator: Generator, teacher: nn.Module, student: nn.Module, optimizers: dict, latents, *,
                   iters: int, batch_size: int, device, temperature: float, w_oh: float, w_a: float, w_ie: float,
                   progress: bool) -> dict:
    """`iters` iterations, each: z ~ N(0, I) from `latents` (a torch.Generator on the CPU, saved in
    last.pt), G's loss through the frozen teacher (one forward: logits and feature), and the student's
    KD(temperature) on the detached images against the same forward's detached logits; one step each of
    `optimizers["generator"]` and `optimizers["student"]`. Returns the epoch's mean of each term."""
    generator.train()
    student.train()
    teacher.eval()
    meter = Mean(device)
    for _ in progress_bar(range(iters), "dafl", progress):
        z = torch.randn(batch_size, generator.latent_dim, generator=latents).to(device)
        images = generator(z)
        t_logits, t_features = teacher_outputs(teacher, images)
        g = generator_loss(t_logits, t_features, w_oh=w_oh, w_a=w_a, w_ie=w_ie)
        kd = kd_loss(student(images.detach()), t_logits.detach(), temperature)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        (g["generator"] + kd).backward()  # two disjoint graphs: G's through T, S's from the detached images
        for opt in optimizers.values():
            opt.step()
        meter.add(batch_size, loss=g["generator"] + kd, kd=kd, **g)
    return meter.result()


@torch.no_grad()
def generated_fidelity(generator: Generator, teacher: nn.Module, student: nn.Module, fixed_z: torch.Tensor, *,
                       batch_size: int, device) -> dict:
    """Top-1 agreement of student and teacher on the images the current generator makes, in eval mode
    (its BatchNorm running statistics), of the fixed latent vectors: the label-free, data-free choice of
    the epoch. The latents are fixed; the images follow the generator as it trains."""
    generator.eval()
    student.eval()
    agree = 0
    for z in fixed_z.split(batch_size):
        images = generator(z.to(device))
        agree += int(top1_agreement(student(images), teacher(images)))
    generator.train()
    return {"fidelity": agree / len(fixed_z), "fidelity_n": len(fixed_z)}


# ---- the command ------------------------------------------------------------------------------------------

def dafl(*, teacher, out, test=None, settings) -> dict:
    """Train a student from the teacher alone with DAFL (`settings`: a DaflSettings): no images are read.

    Each of the epochs x iters_per_epoch iterations draws batch_size latent vectors (latent_dim), steps the
    generator (DAFL's, generator_width channels wide; Adam, generator_lr, constant) on DAFL's loss (w_oh,
    w_a, w_ie) and the student (AdamW, lr, weight_decay; schedule constant or cosine over the epochs) on
    kd_loss at `temperature` against the teacher's logits of the same, detached images. Defaults are
    DAFL's MNIST ones (120 iterations, lr_S 2e-3 with Adam = AdamW without weight decay, latent 100, oh 1,
    a 0.1, ie 5; temperature 1 is DAFL's KL exactly) but for two: the batch, 256 instead of 512 for two CPU
    cores, and lr_G 0.02, DAFL's CIFAR value: its MNIST 0.2 saturates the generator's tanh against a ViT
    teacher (ap_digits_teacher) within ten steps, after which every image is the same constant.

    best.pt is chosen by fidelity: the student's top-1 agreement with the teacher on fidelity_images
    images generated at each epoch's end, by the generator in eval mode, from latent vectors fixed by the
    seed (drawn before, and apart from, the training stream). `test` (a labeled folder of the teacher's
    classes) is measured every epoch (test_top1) and never chooses. last.pt holds the generator, both
    optimizers and the latent stream, so a resumed run equals an uninterrupted one.

    Returns the chosen epoch's info: selected_on ("fidelity"), fidelity, accuracy (its test top-1, or
    None), best_epoch, steps (the run's student optimizer steps, epochs x iters_per_epoch), method."""
    s = settings
    if world_size() > 1:
        raise AttnprobeError("attnprobe dafl runs in one process; launch it without torchrun")
    recorded = recorded_settings(s)
    device = pick_device(s.device)
    seed_everything(s.seed)
    teacher_net, t_info = load_checkpoint(teacher, device, teacher=True)
    teacher_sha256 = file_sha256(teacher)
    teacher_net.eval().requires_grad_(False)
    net, arch, kwargs = build_student(s.student, s.model_kwargs, teacher_info=t_info, teacher_model=teacher_net)
    net = net.to(device)
    t_geo = geometry(teacher_net)
    generator = Generator(img_size=t_geo["img_size"], in_chans=t_geo["in_chans"], latent_dim=s.latent_dim,
                          width=s.generator_width).to(device)
    test_ds = None if test is None else labeled_folder(class_dir(test, t_info["classes"], "val"), t_info["classes"],
                                                       eval_transform(t_info), t_info["in_chans"])

    optimizer = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=s.generator_lr)
    scheduler = (lr_schedule(optimizer, "cosine", s.epochs) if s.schedule == "cosine"
                 else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0))
    steps = s.epochs * s.iters_per_epoch
    info = describe(net, arch, kwargs, t_info["classes"], t_info["mean"], t_info["std"], role="student",
                    method="dafl", teacher=os.path.abspath(teacher), teacher_accuracy=t_info.get("accuracy"),
                    selected_on="fidelity", fidelity_images=s.fidelity_images, steps=steps,
                    teacher_sha256=teacher_sha256, settings=recorded, input_from=t_info)
    run = RunDir(out, resume=bool(s.resume), overwrite=s.overwrite)
    objects = {"model": net, "optimizer": optimizer, "scheduler": scheduler, "generator": generator,
               "generator_optimizer": g_optimizer}
    resumed = resume_state(s.resume, run, objects, same={"method": ("dafl", "attnprobe dafl"),
                                                         "teacher_sha256": (teacher_sha256, "--teacher")},
                           settings=recorded)
    latents = torch.Generator().manual_seed(s.seed)
    fixed_z = torch.randn(s.fidelity_images, s.latent_dim, generator=latents)  # the training stream continues after
    # what fit expects of a training loader: a sampler told the epoch, the random stream last.pt keeps
    stream = types.SimpleNamespace(sampler=types.SimpleNamespace(set_epoch=lambda epoch: None), generator=latents)
    restore_rng(resumed, s.seed, latents)
    done = {"steps": resumed["start"] * s.iters_per_epoch}

    def one_epoch() -> dict:
        stats = dafl_one_epoch(generator, teacher_net, net, {"generator": g_optimizer, "student": optimizer},
                               latents, iters=s.iters_per_epoch, batch_size=s.batch_size, device=device,
                               temperature=s.temperature, w_oh=s.w_oh, w_a=s.w_a, w_ie=s.w_ie, progress=s.progress)
        done["steps"] += s.iters_per_epoch
        return {**stats, "steps": done["steps"]}

    test_loaders = {} if test_ds is None else {"test": eval_loader(test_ds, s.batch_size, s.workers)}
    return fit(run, info, objects, resumed, s.epochs, stream, one_epoch,
               lambda: {**generated_fidelity(generator, teacher_net, net, fixed_z, batch_size=s.batch_size,
                                             device=device),
                        **measure_top1(test_loaders, net, device, s.progress)},
               "fidelity", lambda row: {"fidelity": row.get("fidelity"), "accuracy": row.get("test_top1")})
