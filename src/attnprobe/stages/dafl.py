"""DAFL (Chen et al., ICCV 2019, "Data-Free Learning of Student Networks"): Table 1's no-data row. A
generator G turns noise into images the frozen teacher T finds class-like; the student learns by KD on G's
images in the same step. No image is read at all (a test set, when given, is only measured).

Generator loss, from one teacher forward of G(z) (logits and the feature the head reads):
    w_oh * CE(logits, argmax logits)          one-hot: T should be sure of each image
  + w_a  * -mean |feature|                    activation: real images excite T's features strongly
  + w_ie * sum_c pbar_c log10 pbar_c          information entropy (negated): pbar, the batch mean of
                                              softmax(logits), should spread over the classes
For a ViT the feature is the pre-head CLS token (timm: forward_head(forward_features(x), pre_logits=True)).
The facts below are DAFL's official code (DAFL/DAFL-train.py): its generator, its MNIST defaults (120
iterations per epoch, Adam for both networks, lr_G 0.2, lr_S 2e-3, latent 100, oh 1, a 0.1, ie 5, KD as
KL at temperature 1 on the teacher's logits of the detached images), and log base 10 in the entropy term.

(Named `datafree`, not `dafl`: a submodule `attnprobe.dafl` would shadow the package's `attnprobe.dafl`
function once imported, as distillation.py explains for `distill`.)"""
from __future__ import annotations

import math
import os
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AttnprobeError
from ..io.checkpoints import file_sha256, load_checkpoint
from ..io.datasets import labeled_folder
from ..io.images import eval_transform
from ..method.losses import kd_loss
from ..models import describe, geometry
from ..training.distributed import world_size
from ..training.engine import _bar, _Mean
from ..training.loop import (
    RunDir,
    _class_dir,
    _eval_loader,
    _fit,
    _measure_top1,
    _restore_rng,
    _resume_state,
    lr_schedule,
    pick_device,
    recorded_settings,
    seed_everything,
)
from .distill import _student

SCHEDULES = ("constant", "cosine")


# ---- the generator ------------------------------------------------------------------------------------

class Generator(nn.Module):
    """DAFL's generator: latent -> linear -> 128 x (H/4) x (W/4) map -> BatchNorm -> x2 upsample -> conv
    block -> upsample to H x W -> conv block -> tanh -> BatchNorm without affine. The last BatchNorm puts
    each channel at mean 0, std 1 over the batch: images in the teacher's normalised input space, what
    it is fed after its own mean/std. Sides that are not multiples of 4 start at ceil(side / 4)."""

    def __init__(self, *, img_size: int | tuple[int, int], in_chans: int, latent_dim: int = 100, width: int = 128):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.init_size = tuple(math.ceil(s / 4) for s in self.img_size)
        self.width, self.latent_dim = width, latent_dim
        self.project = nn.Linear(latent_dim, width * self.init_size[0] * self.init_size[1])
        self.norm0 = nn.BatchNorm2d(width)
        # eps=0.8 in the middle BatchNorms is DAFL's (a positional 0.8 there is eps, not momentum)
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, eps=0.8),
                                    nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2, eps=0.8),
                                    nn.LeakyReLU(0.2), nn.Conv2d(width // 2, in_chans, 3, padding=1), nn.Tanh(),
                                    nn.BatchNorm2d(in_chans, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(len(z), self.width, *self.init_size)
        x = F.interpolate(self.norm0(x), scale_factor=2)
        x = F.interpolate(self.block1(x), size=self.img_size)
        return self.block2(x)


# ---- the math: pure functions of the teacher's outputs --------------------------------------------------

def one_hot_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits against their own argmax, averaged over the batch."""
    logits = logits.float()
    return F.cross_entropy(logits, logits.argmax(dim=1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """-mean |feature| over batch and channels: lower when the teacher's features respond strongly."""
    return -features.float().abs().mean()


def information_entropy_loss(logits: torch.Tensor, *, base: float = 10.0) -> torch.Tensor:
    """sum_c pbar_c log pbar_c (the negated entropy of pbar, the batch mean of softmax(logits)): lowest,
    -log(C), when the batch covers the C classes evenly. Base 10 as DAFL's code (torch.log10), so that
    w_ie means what its --ie means; base e gives nats."""
    p_mean = logits.float().softmax(dim=1).mean(dim=0)
    return torch.xlogy(p_mean, p_mean).sum() / math.log(base)  # xlogy: 0 log 0 = 0


def generator_loss(logits: torch.Tensor, features: torch.Tensor, *, w_oh: float = 1.0, w_a: float = 0.1,
                   w_ie: float = 5.0) -> dict:
    """DAFL's generator objective and its terms: {"generator", "one_hot", "activation", "entropy"}."""
    terms = {"one_hot": one_hot_loss(logits), "activation": activation_loss(features),
             "entropy": information_entropy_loss(logits)}
    return {"generator": w_oh * terms["one_hot"] + w_a * terms["activation"] + w_ie * terms["entropy"], **terms}


def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """How many of the rows have the same argmax in both (a count, to be summed over batches)."""
    return (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).sum()


def teacher_outputs(teacher: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pre-head feature) from one pass through the blocks: for a timm ViT the pooled, normed CLS
    token the head reads. Both come from forward_head, so a distilled DeiT's averaged heads are kept."""
    tokens = teacher.forward_features(images)
    return teacher.forward_head(tokens), teacher.forward_head(tokens, pre_logits=True)


# ---- one epoch: G and S updated on each iteration -----------------------------------------------------

def dafl_one_epoch(generator: Generator, teacher: nn.Module, student: nn.Module, optimizers: dict, latents, *,
                   iters: int, batch_size: int, device, temperature: float = 1.0, w_oh: float = 1.0,
                   w_a: float = 0.1, w_ie: float = 5.0, progress: bool = True) -> dict:
    """`iters` iterations, each: z ~ N(0, I) from `latents` (a torch.Generator on the CPU, saved in
    last.pt), G's loss through the frozen teacher (one forward: logits and feature), and the student's
    KD(temperature) on the detached images against the same forward's detached logits; one step each of
    `optimizers["generator"]` and `optimizers["student"]`. Returns the epoch's mean of each term."""
    generator.train()
    student.train()
    teacher.eval()
    meter = _Mean(device)
    for _ in _bar(range(iters), "dafl", progress):
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

def dafl(teacher, *, out, test=None, student: str = "ap_digits_student", model_kwargs: dict | None = None,
         epochs: int = 10, iters_per_epoch: int = 120, batch_size: int = 256, lr: float = 2e-3,
         weight_decay: float = 0.0, schedule: str = "constant", generator_lr: float = 0.02, latent_dim: int = 100,
         generator_width: int = 128, temperature: float = 1.0, w_oh: float = 1.0, w_a: float = 0.1, w_ie: float = 5.0,
         fidelity_images: int = 1024, workers: int = 2, device: str | None = None, seed: int = 0, resume=None,
         progress: bool = True, overwrite: bool = False) -> dict:
    """Train a student from the teacher alone with DAFL: no images are read.

    Each of the `epochs` x `iters_per_epoch` iterations draws `batch_size` latent vectors (`latent_dim`),
    steps the generator (DAFL's, `generator_width` channels wide; Adam, `generator_lr`, constant) on DAFL's
    loss (`w_oh`, `w_a`, `w_ie`) and the student (AdamW, `lr`, `weight_decay`; `schedule` constant or cosine
    over the epochs) on kd_loss at `temperature` against the teacher's logits of the same, detached images.
    Defaults are DAFL's MNIST ones (120 iterations, lr_S 2e-3 with Adam = AdamW without weight decay, latent 100, oh 1, a 0.1, ie 5;
    temperature 1 is DAFL's KL exactly) but for two: the batch, 256 instead of 512 for two CPU cores, and
    lr_G 0.02, DAFL's CIFAR value: its MNIST 0.2 saturates the generator's tanh against a ViT teacher
    (ap_digits_teacher) within ten steps, after which every image is the same constant.

    best.pt is chosen by fidelity: the student's top-1 agreement with the teacher on `fidelity_images`
    images generated at each epoch's end, by the generator in eval mode, from latent vectors fixed by
    `seed` (drawn before, and apart from, the training stream). `test` (a labeled folder of the teacher's
    classes) is measured every epoch (test_top1) and never chooses. last.pt holds the generator, both
    optimizers and the latent stream, so a resumed run equals an uninterrupted one.

    Returns the chosen epoch's info: selected_on ("fidelity"), fidelity, accuracy (its test top-1, or
    None), best_epoch, steps (the run's student optimizer steps, epochs x iters_per_epoch), method."""
    if world_size() > 1:
        raise AttnprobeError("attnprobe dafl runs in one process; launch it without torchrun")
    if schedule not in SCHEDULES:
        raise AttnprobeError(f"--schedule {schedule!r} is not one of {SCHEDULES}")
    from ..settings import DaflSettings
    settings = recorded_settings(DaflSettings, dict(locals()))  # the arguments, before any is reassigned
    device = pick_device(device)
    seed_everything(seed)
    teacher_net, t_info = load_checkpoint(teacher, device)
    teacher_sha256 = file_sha256(teacher)
    teacher_net.eval().requires_grad_(False)
    net, arch, kwargs = _student(student, model_kwargs, t_info, teacher_net, False)
    net = net.to(device)
    t_geo = geometry(teacher_net)
    generator = Generator(img_size=t_geo["img_size"], in_chans=t_geo["in_chans"], latent_dim=latent_dim,
                          width=generator_width).to(device)
    test_ds = None if test is None else labeled_folder(_class_dir(test, t_info["classes"], "val"), t_info["classes"],
                                                       eval_transform(t_info), t_info["in_chans"])

    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=generator_lr)
    scheduler = (lr_schedule(optimizer, "cosine", epochs) if schedule == "cosine"
                 else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0))
    steps = epochs * iters_per_epoch
    info = describe(net, arch, kwargs, t_info["classes"], t_info["mean"], t_info["std"], role="student",
                    method="dafl", teacher=os.path.abspath(teacher), teacher_accuracy=t_info.get("accuracy"),
                    selected_on="fidelity", fidelity_images=fidelity_images, steps=steps,
                    teacher_sha256=teacher_sha256, settings=settings)
    run = RunDir(out, resume=bool(resume), overwrite=overwrite)
    objects = {"model": net, "optimizer": optimizer, "scheduler": scheduler, "generator": generator,
               "generator_optimizer": g_optimizer}
    resumed = _resume_state(resume, run, objects, same={"method": ("dafl", "attnprobe dafl"),
                                                        "teacher_sha256": (teacher_sha256, "--teacher")},
                            settings=settings)
    latents = torch.Generator().manual_seed(seed)
    fixed_z = torch.randn(fidelity_images, latent_dim, generator=latents)  # the training stream continues after
    # what _fit expects of a training loader: a sampler told the epoch, the random stream last.pt keeps
    stream = types.SimpleNamespace(sampler=types.SimpleNamespace(set_epoch=lambda epoch: None), generator=latents)
    _restore_rng(resumed, seed, latents)
    done = {"steps": resumed["start"] * iters_per_epoch}

    def one_epoch() -> dict:
        stats = dafl_one_epoch(generator, teacher_net, net, {"generator": g_optimizer, "student": optimizer},
                               latents, iters=iters_per_epoch, batch_size=batch_size, device=device,
                               temperature=temperature, w_oh=w_oh, w_a=w_a, w_ie=w_ie, progress=progress)
        done["steps"] += iters_per_epoch
        return {**stats, "steps": done["steps"]}

    test_loaders = {} if test_ds is None else {"test": _eval_loader(test_ds, batch_size, workers)}
    return _fit(run, info, objects, resumed, epochs, stream, one_epoch,
                lambda: {**generated_fidelity(generator, teacher_net, net, fixed_z, batch_size=batch_size,
                                              device=device),
                         **_measure_top1(test_loaders, net, device, progress)},
                "fidelity", lambda row: {"fidelity": row.get("fidelity"), "accuracy": row.get("test_top1")})
