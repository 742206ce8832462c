"""One settings dataclass per command: each field is a flag, an API keyword, a recorded setting and its check.

A new flag is one new field here, plus its use in the stage (`settings.name`). Fields marked `runtime`
(workers, device, progress bars, resume) do not change a stage's result: `run` ignores them when it
decides whether a finished stage can be reused.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass

from ..errors import AttnprobeError
from ..method.choices import HEAD_REDUCTIONS, NORMALIZATIONS, PROBE_VARIANTS, RESIZE_MODES, SCHEDULES, STRATEGIES
from .base import Settings, check_device, setting

_POSITIVE = (lambda v: v > 0, "greater than 0")
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_NOT_NEGATIVE = (lambda v: v >= 0, "0 or more")
_FRACTION = (lambda v: 0 < v <= 1, "a fraction in (0, 1], e.g. 0.9665")
_BLOCK = (lambda v: v >= 0, "0 or more: blocks are counted from 0")
SEED_MAX = 2**32 - 1  # numpy's seed range: every command's seed is one numpy, torch and random all take
_SEED = (lambda v: 0 <= v <= SEED_MAX, f"a whole number from 0 to {SEED_MAX} (numpy's seed range)")
DECODED_ON = ("auto", "host", "device")  # where distill keeps the decoded selection
DEMO_SEEDS = 3  # the demo's students use --seed and the next ones: the last of them must be a seed too


# Fields several stages share: functions, so that each dataclass gets a field of its own.
def _workers():
    return setting(2, "DataLoader worker processes", check=_NOT_NEGATIVE, runtime=True, shared=True)


def _device():
    return setting(None, "cuda, cuda:1 or cpu (default: cuda when there is one)", runtime=True, shared=True,
                   check=(check_device, "a device of this machine"))


def _progress():
    return setting(True, "progress bars", runtime=True, shared=True)


def _resize():
    return setting("crop", "wild images to the teacher's input: crop = shorter side, centre crop; stretch = the "
                           "whole image to the square input (the reference)", choices=RESIZE_MODES,
                   shared=True)


_TRAIN_BATCH_HELP = ("images per step on each process: under torchrun the global batch is this times the number "
                     "of processes (the learning rate is not rescaled)")


@dataclass(kw_only=True)
class ScoreSettings(Settings):
    blocks: list[int] | None = setting(None, "0-based blocks to probe (default: 1/3, 2/3 depth)",
                                       check=_BLOCK, unique=True)
    heads: str = setting("first", "head reduction of the probe: head 0 (the reference) or the mean",
                         choices=HEAD_REDUCTIONS)
    resize: str = _resize()
    amp: bool = setting(False, "bf16 autocast (GPU)")
    channels_last: bool = setting(False, "channels-last memory format (GPU)", runtime=True)
    compile: bool = setting(False, "torch.compile the teacher forward (GPU)", runtime=True)
    chunk_size: int = setting(2048, "images per resumable part (<out>.parts/); a rerun continues from "
                                    "finished parts", check=_AT_LEAST_1)
    batch_size: int = setting(256, "images per batch (per process)", check=_AT_LEAST_1, runtime=True, shared=True)
    workers: int = _workers()
    device: str | None = _device()
    progress: bool = _progress()


@dataclass(kw_only=True)
class SelectSettings(Settings):
    num_select: int = setting(MISSING, "K: how many images to select", check=_AT_LEAST_1, metavar="K")
    strategy: str = setting("attnprobe-rank", "attnprobe-rank: 0.3 x the probe terms' rank + 0.7 x the outlier's "
                                              "rank in the pool (README: which selection to use); attnprobe: "
                                              "w_attn * sum of probes + w_out * outlier (the paper); dfnd: outlier "
                                              "alone; probe: probes alone; random",
                            choices=STRATEGIES)
    w_attn: float = setting(0.05, "weight of the summed probe terms (attnprobe)")
    w_out: float = setting(0.9, "weight of the outlier term (attnprobe)")
    normalize: str = setting("none", "put the terms on one scale before weighting (none = the paper)",
                             choices=NORMALIZATIONS)
    seed: int = setting(0, "seed of the random strategy", shared=True, check=_SEED)


@dataclass(kw_only=True)
class _TrainSettings(Settings):
    model_kwargs: dict = setting({}, "constructor overrides, values as Python literals, e.g. embed_dim=128 depth=6",
                                 metavar="K=V")
    epochs: int = setting(MISSING, "epochs to train", check=_AT_LEAST_1)
    lr: float = setting(1e-3, "peak learning rate (AdamW)", check=_POSITIVE)
    weight_decay: float = setting(0.05, "AdamW weight decay", check=_NOT_NEGATIVE)
    schedule: str = setting("cosine", "cosine to zero, or x0.1 at epochs 200 and 300 counted from 1 (the "
                                      "reference)", choices=SCHEDULES)
    warmup_epochs: int = setting(0, "linear warmup epochs", check=_NOT_NEGATIVE)
    flip: bool = setting(True, "horizontal flips (turn off for digits, text)")
    affine: bool = setting(False, "small random affine jitter (rotation, shift, scale) instead of the padded "
                                  "random crop (digits: the 4-pixel crop shifts them too far)")
    seed: int = setting(0, "seed of the initialisation, data order and augmentation", shared=True,
                        check=_SEED)
    batch_size: int = setting(128, _TRAIN_BATCH_HELP, check=_AT_LEAST_1)
    cache_images: bool = setting(False, "keep decoded images in memory after the first epoch (data that fits "
                                        "in RAM, --workers 0)", runtime=True)
    resume: str | None = setting(None, "continue a stopped run where it stopped: weights, optimizer, LR schedule, "
                                       "noise adaptation, best score, random state; with the same seed the result "
                                       "equals an uninterrupted run", runtime=True, metavar="RUN/last.pt")
    overwrite: bool = setting(False, "start over in a --out folder that already holds a run (its metrics.jsonl, "
                                     "best.pt and last.pt are replaced); without it (or --resume) such a folder "
                                     "is refused", runtime=True)
    workers: int = _workers()
    device: str | None = _device()
    progress: bool = _progress()


@dataclass(kw_only=True)
class TeacherSettings(_TrainSettings):
    model: str = setting("ap_digits_teacher", "preset or timm ViT name (a ViT with a CLS token: the probe reads its "
                                              "attention)")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy",
                                     check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    mean: list[float] | None = setting(None, "normalisation mean (default: timm's for the architecture)")
    std: list[float] | None = setting(None, "normalisation std", check=_POSITIVE)
    val_split: float | None = setting(None, "carve this fraction of train/ (per class, seeded) out as the "
                                            "validation split, when there is no val/",
                                      check=(lambda v: 0 < v < 1, "a fraction in (0, 1)"))

    def __post_init__(self):
        super().__post_init__()
        _check_model(self.model, self.model_kwargs)


def _check_model(name: str, model_kwargs: dict) -> None:
    """The model name known and its constructor kwargs (the preset's merged with --model-kwargs) consistent,
    before any work starts; build_model checks them again with the final input geometry."""
    from ..models import (  # lazy: models imports torch and timm
        check_model_kwargs,
        resolve_model,
    )
    check_model_kwargs(resolve_model(name, model_kwargs)[1])


_STUDENT_HELP = ("preset or timm model name: a ViT on the teacher's patch grid or another, or any timm image "
                 "classifier (tried at 32 and 224 px: resnet18, mobilenetv3_small_100/large_100, efficientnet_b0, "
                 "convnext_atto, efficientvit_b0, regnetx_002, ghostnet_100, mobilevit_xxs, "
                 "swin_tiny_patch4_window7_224, deit_tiny_patch16_224, vit_small_patch32_224; README)")


@dataclass(kw_only=True)
class DistillSettings(_TrainSettings):
    student: str = setting("ap_digits_student", _STUDENT_HELP)
    epochs: int | None = setting(None, "epochs to train (or --steps)", check=_AT_LEAST_1)
    lr: float = setting(7.5e-4, "peak learning rate (AdamW)", check=_POSITIVE)
    weight_decay: float = setting(0.025, "AdamW weight decay", check=_NOT_NEGATIVE)
    batch_size: int = setting(256, _TRAIN_BATCH_HELP, check=_AT_LEAST_1, shared=True)
    cache_images: bool = setting(False, "with --no-decode-cache: keep decoded images in memory after the first "
                                        "epoch (data that fits in RAM, --workers 0); the decoded selection does "
                                        "not need it", runtime=True)
    temperature: float = setting(4.0, "KD temperature", check=_POSITIVE)
    probe_weight: float | None = setting(None, "weight of the probe-distillation loss (0: off). Unset: 0.8 for a ViT "
                                               "student on the teacher's token grid, 0 for other students (a CNN, a "
                                               "ViT on another grid), whom it did not help in the digits demo (README)",
                                         check=_NOT_NEGATIVE)
    probe_blocks: list[int] | None = setting(None, "teacher blocks (0-based) whose outputs are matched; the "
                                                   "student's blocks (a ViT) or feature stages (a CNN) mapped "
                                                   "proportionally", check=_BLOCK,
                                            unique=True)
    probe_variant: str = setting("cosine", "CLS-to-patch similarity: cosine (channel axis) or reference (the "
                                           "reference code's token-axis normalisation)",
                                 choices=PROBE_VARIANTS)
    noise_adaptation: bool = setting(True, "DFND's noise adaptation")
    noise_weight: float = setting(1.0, "weight of the noise-adaptation loss", check=_NOT_NEGATIVE)
    noise_lr: float = setting(1e-3, "Adam learning rate of the noise-adaptation matrix", check=_POSITIVE)
    robust: bool = setting(False, "weight KD by DFND's class weights")
    teacher_acc: float | None = setting(None, "alpha of noise adaptation (default: the teacher's accuracy)",
                                        check=_FRACTION)
    labeled: str | None = setting(None, "original training set to mix in (folder of class folders)")
    per_class: int = setting(0, "labeled images per class to mix in", check=_NOT_NEGATIVE)
    resize: str = _resize()
    holdout: float = setting(0.1, "part of the selection held out (never trained on) to measure fidelity, the "
                                  "student's top-1 agreement with the teacher: a fraction (at most 10,000 images) "
                                  "or a number of images; seeded by --seed", metavar="F|N",
                             check=(lambda v: 0 < v < 1 or (v >= 1 and v == int(v)),
                                    "a fraction in (0, 1) or a whole number of images"))
    select_on: str = setting("fidelity", "which epoch best.pt keeps: fidelity (no labels needed), or test: the "
                                         "test set chooses, which is optimistic (the reference's habit)",
                             choices=("fidelity", "test"))
    steps: int | None = setting(None, "train for exactly this many optimizer steps (per process) instead of "
                                      "--epochs: the epochs are as many as needed, the last one cut short, so that "
                                      "selections of different sizes get equal compute", check=_AT_LEAST_1)
    decode_cache: str | None = setting(None, "where the decoded selection is kept (default: SEL.decoded/ beside the "
                                             "selection; in run: RUN/decoded/, shared by its strategies): each "
                                             "selected image decoded once, at the teacher's input size, C x H x W "
                                             "bytes (650,000 images: 2 GB at 32 px, 98 GB at 224 px), reused by "
                                             "every epoch, run and strategy; turn it off (--no-decode-cache) when "
                                             "the disk cannot hold it", runtime=True, metavar="DIR")
    no_decode_cache: bool = setting(False, "today's path: decode and augment every image in every epoch, on the "
                                           "host's workers (for comparison, and for pools too big for the disk)")
    decoded_on: str = setting("auto", "where the decoded training images live: device = all of them in the "
                                      "device's memory (no host I/O in an epoch), host = memory-mapped from disk, "
                                      "auto = device when it is a GPU and they take under a quarter of its free "
                                      "memory", choices=DECODED_ON, runtime=True)

    def __post_init__(self):
        super().__post_init__()
        if (self.per_class > 0) != (self.labeled is not None):
            raise AttnprobeError("--labeled and --per-class go together: pass both (a folder and a count per class) "
                                 "or neither")
        if (self.epochs is None) == (self.steps is None):
            raise AttnprobeError("distill trains for --epochs N or for --steps N (equal compute across selections); "
                                 "give one of them" + (", not both" if self.steps is not None else ""))
        _check_model(self.student, self.model_kwargs)


@dataclass(kw_only=True)
class DaflSettings(Settings):
    """DAFL (attnprobe dafl): DAFL's MNIST defaults but for the batch (halved) and lr_G (see datafree.py)."""
    student: str = setting("ap_digits_student", _STUDENT_HELP)
    model_kwargs: dict = setting({}, "student constructor overrides, values as Python literals, e.g. embed_dim=128",
                                 metavar="K=V")
    epochs: int = setting(MISSING, "epochs to train", check=_AT_LEAST_1)
    iters_per_epoch: int = setting(120, "generator and student steps per epoch (DAFL: 120)", check=_AT_LEAST_1)
    batch_size: int = setting(256, "generated images per step (DAFL: 512 for MNIST)", check=_AT_LEAST_1)
    lr: float = setting(2e-3, "student learning rate (AdamW; DAFL's MNIST lr_S with Adam)", check=_POSITIVE)
    weight_decay: float = setting(0.0, "student AdamW weight decay (0: Adam, as DAFL)", check=_NOT_NEGATIVE)
    schedule: str = setting("constant", "student learning rate over the epochs: constant (DAFL's MNIST) or cosine "
                                        "to zero", choices=("constant", "cosine"))
    generator_lr: float = setting(0.02, "generator learning rate (Adam, constant; DAFL's CIFAR lr_G: its MNIST 0.2 "
                                        "collapses the generator against a ViT)", check=_POSITIVE)
    latent_dim: int = setting(100, "generator noise dimension", check=_AT_LEAST_1)
    generator_width: int = setting(128, "channels of the generator's first map (DAFL: 128; its convolutions cost "
                                        "most of a step on a CPU, 32 is 16 times cheaper)", check=(lambda v: v >= 2,
                                                                                                  "at least 2"))
    temperature: float = setting(1.0, "KD temperature of the student's loss (1: DAFL's KL)", check=_POSITIVE)
    w_oh: float = setting(1.0, "weight of the one-hot loss", check=_NOT_NEGATIVE)
    w_a: float = setting(0.1, "weight of the feature activation loss", check=_NOT_NEGATIVE)
    w_ie: float = setting(5.0, "weight of the information entropy loss (log base 10, as DAFL)", check=_NOT_NEGATIVE)
    fidelity_images: int = setting(1024, "generated images (from fixed, seeded noise) on which fidelity, the "
                                         "student's top-1 agreement with the teacher, chooses best.pt",
                                   check=_AT_LEAST_1)
    seed: int = setting(0, "seed of the initialisation and the noise", check=_SEED)
    resume: str | None = setting(None, "continue a stopped run from its last.pt (student, generator, optimizers, "
                                       "noise stream)", runtime=True, metavar="RUN/last.pt")
    overwrite: bool = setting(False, "start over in a --out folder that already holds a run", runtime=True)
    workers: int = _workers()
    device: str | None = _device()
    progress: bool = _progress()

    def __post_init__(self):
        super().__post_init__()
        _check_model(self.student, self.model_kwargs)


@dataclass(kw_only=True)
class RunSettings(Settings):
    strategies: list[str] = setting(["attnprobe-rank"], "one student per selection strategy, compared in the report "
                                                   "(e.g. attnprobe dfnd random)",
                                    choices=STRATEGIES, unique=True)


@dataclass(kw_only=True)
class ReshardSettings(Settings):
    shard_size: int = setting(10000, "samples per new shard", check=_AT_LEAST_1)
    progress: bool = _progress()


@dataclass(kw_only=True)
class EvaluateSettings(Settings):
    batch_size: int = setting(256, "images per batch (per process)", check=_AT_LEAST_1, runtime=True)
    workers: int = _workers()
    device: str | None = _device()
    progress: bool = _progress()


@dataclass(kw_only=True)
class ExportSettings(Settings):
    format: str = setting(MISSING, "what to write: a timm folder, a transformers folder or an ONNX file",
                          choices=("timm", "transformers", "onnx"))
    check: bool = setting(True, "check: load the export back with its own library and compare its logits")


@dataclass(kw_only=True)
class ImportSettings(Settings):
    model: str | None = setting(None, "preset or timm name, where the source does not say it (DeiT/reference "
                                      "checkpoints, bare state dicts, .safetensors)")
    model_kwargs: dict = setting({}, "constructor overrides the teacher was built with, e.g. img_size=32 "
                                     "patch_size=4", metavar="K=V")
    classes: str | None = setting(None, "class names where the source has none: a file (one per line, in index "
                                        "order) or a known set", metavar="FILE|cifar10|cifar100|imagenet")
    mean: list[float] | None = setting(None, "normalisation mean where the source has none (default: timm's for "
                                             "the architecture)")
    std: list[float] | None = setting(None, "normalisation std where the source has none", check=_POSITIVE)
    val: str | None = setting(None, "labeled folder of the teacher's classes: measure its accuracy (noise "
                                    "adaptation's alpha) as `attnprobe evaluate` does")
    accuracy: float | None = setting(None, "the teacher's accuracy as a fraction, e.g. 0.9665", check=_FRACTION)
    ema: bool = setting(False, "take the EMA weights (model_ema / state_dict_ema)")
    batch_size: int = setting(256, "images per batch (per process) of --val", check=_AT_LEAST_1, runtime=True)
    workers: int = _workers()
    device: str | None = _device()
    progress: bool = _progress()

    def __post_init__(self):
        super().__post_init__()
        if self.val is not None and self.accuracy is not None:
            raise AttnprobeError("pass --val (measure the accuracy) or --accuracy (state it), not both")


@dataclass(kw_only=True)
class PrepareSettings(Settings):
    kind: str = setting(MISSING, "the official data set to convert", choices=("cifar10", "cifar100",
                                                                              "tinyimagenet"))
    progress: bool = _progress()


@dataclass(kw_only=True)
class DemoSettings(Settings):
    quick: bool = setting(False, "a smaller run for the test suite (57 s measured on an idle 2-core machine with "
                                 "the benchmark cached; the full run: 17 min on an empty cache, 3.8 of them the "
                                 "teacher's)")
    cache: str | None = setting(None, "where the benchmark images are built and reused (default: "
                                      "$XDG_CACHE_HOME/attnprobe)", runtime=True)
    workers: int = setting(0, "DataLoader workers (0: the 28x28 images decode faster in the training process "
                              "than in workers on a small CPU)", check=_NOT_NEGATIVE, runtime=True)
    seed: int = setting(0, "seed of the benchmark and the teacher; the students use this seed and the next ones",
                        check=(lambda v: 0 <= v <= SEED_MAX - (DEMO_SEEDS - 1),
                               f"a whole number from 0 to {SEED_MAX - (DEMO_SEEDS - 1)} (numpy's seed range, less "
                               f"the {DEMO_SEEDS - 1} seeds after it that the students use)"))
    jobs: int | None = setting(None, "student trainings at once (default: one per CPU core, at most 8), each "
                                     "with its share of the cores", check=_AT_LEAST_1, runtime=True)
    students: bool = setting(False, "instead of the table's rows, other students on the default selection: a small "
                                    "CNN for 28-px digits (ap_digits_resnet) by KD on the original images and with "
                                    "and without the probe loss, a ViT on half the teacher's grid side (2x2 tokens) "
                                    "with and without it, and the demo's ViT student with the full method; with "
                                    "their parameters, FLOPs and images/s against the teacher's (6.5 min measured "
                                    "on an idle 2-core machine with the teacher cached)")
