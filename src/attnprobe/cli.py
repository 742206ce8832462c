"""Command line: argument parsing only; every command calls the Python API."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .errors import AttnprobeError

D = argparse.ArgumentDefaultsHelpFormatter


def _common(p, batch_size, batch_help="images per batch (per process)"):
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when there is one)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _train_common(p, lr, wd):
    p.add_argument("--model-kwargs", nargs="*", default=None, metavar="K=V",
                   help="constructor overrides, values as Python literals, e.g. embed_dim=128 depth=6")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--out", required=True, help="run folder: best.pt, last.pt, metrics.jsonl")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--weight-decay", type=float, default=wd)
    p.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
                   help="cosine to zero, or x0.1 at epochs 200 and 300 (the reference)")
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flips (digits, text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-images", action="store_true",
                   help="keep decoded images in memory after the first epoch (data that fits in RAM, --workers 0)")
    p.add_argument("--resume", default=None, metavar="RUN/last.pt",
                   help="continue a stopped run where it stopped: weights, optimizer, LR schedule, noise adaptation, "
                        "best score, random state; with the same seed the result equals an uninterrupted run")


# Under torchrun (python -m torch.distributed.run --nproc_per_node N -m attnprobe.cli ...) the same flags hold.
_TRAIN_BATCH_HELP = ("images per step on each process: under torchrun the global batch is this times the number "
                     "of processes (the learning rate is not rescaled)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnprobe", description="Distill a ViT in the wild with the attention probe.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", formatter_class=D, help="official CIFAR/Tiny-ImageNet layout -> ImageFolder tree")
    p.add_argument("kind", choices=("cifar10", "cifar100", "tinyimagenet"))
    p.add_argument("src", help="the official archive or its extracted folder")
    p.add_argument("out", help="new folder for train/<class>/ and val/<class>/")
    p.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("train-teacher", formatter_class=D, help="train a ViT teacher on an ImageFolder root")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    p.add_argument("--model", default="ap_digits_teacher", help="preset or timm ViT name")
    _train_common(p, lr=1e-3, wd=0.05)
    p.add_argument("--affine", action="store_true",
                   help="small random affine jitter (rotation, shift, scale) instead of the padded random crop")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean (default: timm's for the arch)")
    p.add_argument("--std", type=float, nargs="+", default=None)
    _common(p, 128, _TRAIN_BATCH_HELP)

    p = sub.add_parser("score", formatter_class=D, help="score every wild image with one teacher pass")
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    p.add_argument("--wild", required=True, help="folder of unlabeled images (recursive)")
    p.add_argument("--out", required=True, help="score table (.parquet)")
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="0-based blocks to probe (default: 1/3, 2/3 depth)")
    p.add_argument("--heads", choices=("first", "mean"), default="first", help="head reduction of the probe")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher forward (GPU)")
    p.add_argument("--chunk-size", type=int, default=2048,
                   help="images per resumable part (<out>.parts/); a rerun continues from finished parts")
    p.add_argument("--resize", choices=("crop", "stretch"), default="crop",
                   help="wild images to the teacher's input: crop = shorter side, centre crop; "
                        "stretch = whole image to the square input (the reference)")
    _common(p, 256)

    p = sub.add_parser("select", formatter_class=D, help="pick the K best-scoring wild images")
    p.add_argument("--scores", required=True)
    p.add_argument("--num-select", type=int, required=True, metavar="K")
    p.add_argument("--strategy", choices=("attnprobe", "dfnd", "probe", "random"), default="attnprobe")
    p.add_argument("--w-attn", type=float, default=0.05, help="weight of the summed probe terms")
    p.add_argument("--w-out", type=float, default=0.9, help="weight of the outlier term")
    p.add_argument("--normalize", choices=("none", "rank", "zscore"), default="none",
                   help="put the terms on one scale before weighting (none = the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="selection table (.parquet); summary written beside as .json")

    p = sub.add_parser("distill", formatter_class=D, help="distill a student on the selected wild images")
    p.add_argument("--teacher", required=True)
    p.add_argument("--wild", required=True)
    p.add_argument("--selection", required=True)
    p.add_argument("--student", default="ap_digits_student", help="preset or timm ViT name")
    p.add_argument("--test", required=True, help="labeled folder of the teacher's classes (e.g. ROOT/val)")
    _train_common(p, lr=7.5e-4, wd=0.025)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--probe-weight", type=float, default=0.8, help="weight of the probe-distillation loss (0: off)")
    p.add_argument("--probe-blocks", type=int, nargs="+", default=None,
                   help="teacher blocks (0-based) whose outputs are matched; student blocks mapped proportionally")
    p.add_argument("--probe-variant", choices=("cosine", "reference"), default="cosine")
    p.add_argument("--no-noise-adaptation", dest="noise_adaptation", action="store_false")
    p.add_argument("--noise-weight", type=float, default=1.0)
    p.add_argument("--robust", action="store_true", help="weight KD by DFND's class weights")
    p.add_argument("--teacher-acc", type=float, default=None, help="alpha of noise adaptation (default: measured)")
    p.add_argument("--labeled", default=None, help="original training set to mix in (folder of class folders)")
    p.add_argument("--per-class", type=int, default=0, help="labeled images per class to mix in")
    p.add_argument("--resize", choices=("crop", "stretch"), default="crop",
                   help="wild images to the teacher's input: crop = shorter side, centre crop; "
                        "stretch = whole image to the square input (the reference)")
    _common(p, 256, _TRAIN_BATCH_HELP)

    p = sub.add_parser("import-teacher", formatter_class=D,
                       help="a teacher from DeiT, timm, transformers or a state dict -> attnprobe checkpoint")
    p.add_argument("source", help="checkpoint file (.pth/.pth.tar/.bin/.safetensors), timm or transformers model "
                                  "folder, or hf-hub:ORG/NAME from the local Hugging Face cache")
    p.add_argument("--out", required=True, help="the attnprobe checkpoint to write, e.g. teacher.pt")
    p.add_argument("--model", default=None, help="preset or timm name, where the source does not say it "
                                                 "(DeiT/reference checkpoints, bare state dicts, .safetensors)")
    p.add_argument("--model-kwargs", nargs="*", default=None, metavar="K=V",
                   help="constructor overrides the teacher was built with, e.g. img_size=32 patch_size=4")
    p.add_argument("--classes", default=None, metavar="FILE|cifar10|cifar100|imagenet",
                   help="class names where the source has none: a file (one per line, in index order) or a known set")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean where the source has none "
                                                                       "(default: timm's for the architecture)")
    p.add_argument("--std", type=float, nargs="+", default=None)
    acc = p.add_mutually_exclusive_group()
    acc.add_argument("--val", default=None, help="labeled folder of the teacher's classes: measure its accuracy "
                                                 "(noise adaptation's alpha) as `attnprobe evaluate` does")
    acc.add_argument("--accuracy", type=float, default=None, help="the teacher's accuracy as a fraction, e.g. 0.9665")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (model_ema / state_dict_ema)")
    _common(p, 256)

    p = sub.add_parser("export", formatter_class=D, help="a checkpoint -> timm or transformers folder, or ONNX")
    p.add_argument("checkpoint", help="an attnprobe checkpoint, e.g. RUN/best.pt")
    p.add_argument("--format", required=True, choices=("timm", "transformers", "onnx"))
    p.add_argument("--out", required=True, help="a new folder (timm, transformers) or .onnx file")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip loading the export back and comparing its logits")

    p = sub.add_parser("evaluate", formatter_class=D, help="top-1/top-5 of a checkpoint on a labeled folder")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="folder of class folders, or an ImageFolder root (uses val/)")
    p.add_argument("--json", default=None, help="write {top1, top5, n} here")
    _common(p, 256)

    p = sub.add_parser("demo", formatter_class=D, help="the whole method on bundled digits in the wild, with a report")
    p.add_argument("--out", default="demo-out", help="run folder: results.json, report.html, figures/, runs")
    p.add_argument("--quick", action="store_true", help="a smaller run (about 3 minutes on 2 CPU cores)")
    p.add_argument("--cache", default=None, help="where the benchmark images are built and reused "
                   "(default: $XDG_CACHE_HOME/attnprobe)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: the 28x28 images decode "
                   "faster in the training process than in workers on a small CPU)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("report", formatter_class=D, help="rebuild report.html of a finished demo run")
    p.add_argument("run_dir")
    return parser


def run(args) -> None:
    from . import api  # heavy imports only once the arguments are known to parse

    cmd = args.command
    if cmd == "prepare":
        print(json.dumps(api.prepare(args.kind, args.src, args.out, progress=args.progress)))
    elif cmd == "train-teacher":
        with _distributed():
            info = api.train_teacher(args.data, args.model, _kwargs(args), args.epochs, args.out, args.batch_size,
                                     args.lr, args.weight_decay, args.schedule, args.warmup_epochs,
                                     args.label_smoothing, args.flip, args.affine, args.mean, args.std, args.workers,
                                     args.device, args.seed, args.resume, args.progress, args.cache_images)
        if _rank0():
            print(f"teacher: best val top-1 {info['accuracy']:.4f}, {info['params']:,} parameters -> {args.out}/best.pt")
    elif cmd == "score":
        summary = api.score(args.teacher, args.wild, args.out, args.blocks, args.heads, args.batch_size, args.workers,
                            args.device, args.amp, args.progress, args.chunk_size, args.channels_last, args.compile,
                            resize=args.resize)
        if summary["rank"] == 0:
            print(f"scored {summary['scored']} images, skipped {summary['skipped']} unreadable "
                  f"(listed in {summary['skipped_csv']}) -> {args.out}")
    elif cmd == "select":
        summary = api.select(args.scores, args.num_select, args.strategy, args.w_attn, args.w_out, args.seed,
                             args.normalize, args.out)
        print(f"selected {summary['num_select']} of {summary['pool_size']} ({args.strategy}) -> {args.out}")
    elif cmd == "distill":
        with _distributed():
            info = api.distill(args.teacher, args.wild, args.selection, args.test, args.student, _kwargs(args),
                               args.epochs, args.out, args.batch_size, args.lr, args.weight_decay, args.schedule,
                               args.warmup_epochs, args.temperature, args.probe_weight, args.probe_blocks,
                               args.probe_variant, args.noise_adaptation, args.noise_weight, robust=args.robust,
                               teacher_acc=args.teacher_acc, labeled=args.labeled, per_class=args.per_class,
                               flip=args.flip, workers=args.workers, device=args.device, seed=args.seed,
                               resume=args.resume, progress=args.progress, cache_images=args.cache_images,
                               resize=args.resize)
        if _rank0():
            print(f"student: best test top-1 {info['accuracy']:.4f}, {info['params']:,} parameters -> {args.out}/best.pt")
    elif cmd == "import-teacher":
        info = api.import_teacher(args.source, out=args.out, model=args.model, model_kwargs=_kwargs(args),
                                  classes=args.classes, mean=args.mean, std=args.std, val=args.val,
                                  accuracy=args.accuracy, ema=args.ema, batch_size=args.batch_size,
                                  workers=args.workers, device=args.device, progress=args.progress)
        acc = "no accuracy (pass --teacher-acc to distill)" if info["accuracy"] is None else \
            f"accuracy {info['accuracy']:.4f} ({info['accuracy_source']})"
        print(f"teacher: {info['source_kind']} -> {info['arch']}, {info['params']:,} parameters, "
              f"{info['num_classes']} classes, {acc} -> {args.out}")
    elif cmd == "export":
        result = api.export(args.checkpoint, format=args.format, out=args.out, check=args.check)
        diff = "" if result["max_abs_diff"] is None else f", max |logit difference| {result['max_abs_diff']:.2e}"
        print(f"exported {args.format}{diff} -> {args.out}")
    elif cmd == "demo":
        from .demo import run_demo
        run_demo(args.out, args.quick, args.cache, args.workers, args.seed)
    elif cmd == "report":
        from .report import write_report
        print(f"report -> {write_report(args.run_dir)}")
    elif cmd == "evaluate":
        with _distributed():
            result = api.evaluate(args.model, args.data, args.batch_size, args.workers, args.device, args.progress)
        if _rank0():
            print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  (n={result['n']})")
            if args.json:
                Path(args.json).write_text(json.dumps(result) + "\n")


@contextlib.contextmanager
def _distributed():
    """Around a command that may run under torchrun: leave the process group (if it joined one) on exit."""
    try:
        yield
    finally:
        from .distributed import cleanup
        cleanup()


def _rank0() -> bool:
    """False in the other processes of a torchrun launch: only rank 0 prints results and writes files."""
    return os.environ.get("RANK", "0") in ("", "0")


def _kwargs(args):
    from .models import parse_model_kwargs
    return parse_model_kwargs(args.model_kwargs)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except AttnprobeError as e:
        print(f"attnprobe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnprobe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
