"""Command line: argument parsing only; every command calls the Python API."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from ..errors import AttnprobeError
from ..settings import (
    DaflSettings,
    DistillSettings,
    ReshardSettings,
    RunSettings,
    ScoreSettings,
    SelectSettings,
    TeacherSettings,
    add_flags,
    from_args,
)

D = argparse.ArgumentDefaultsHelpFormatter
WILD_HELP = ("folder of unlabeled images (recursive), or tar shards (img2dataset/WebDataset): "
             "'pool/{00000..00099}.tar', 'pool/*.tar' (quoted) or one .tar")


def _common(p, batch_size, batch_help="images per batch (per process)"):
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when there is one)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


# Under torchrun (python -m torch.distributed.run --nproc_per_node N -m attnprobe.cli ...) the same flags hold.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnprobe", description="Distill a ViT in the wild with the attention probe.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", formatter_class=D, help="official CIFAR/Tiny-ImageNet layout -> ImageFolder tree")
    p.add_argument("kind", choices=("cifar10", "cifar100", "tinyimagenet"))
    p.add_argument("src", help="the official archive or its extracted folder")
    p.add_argument("out", help="new folder for train/<class>/ and val/<class>/")
    p.add_argument("--no-progress", dest="progress", action="store_false")

    p = sub.add_parser("train-teacher", formatter_class=D, help="train a ViT teacher on an ImageFolder root")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and val/ (or no val/ and --val-split)")
    p.add_argument("--out", required=True, help="run folder: best.pt, last.pt, metrics.jsonl")
    p.add_argument("--test", default=None, help="labeled folder of the classes, measured every epoch "
                                                "(test_top1) and never used to choose the epoch")
    add_flags(p, TeacherSettings)

    p = sub.add_parser("score", formatter_class=D, help="score every wild image with one teacher pass")
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    p.add_argument("--wild", required=True, help=WILD_HELP)
    p.add_argument("--out", required=True, help="score table (.parquet)")
    add_flags(p, ScoreSettings)

    p = sub.add_parser("select", formatter_class=D, help="pick the K best-scoring wild images")
    p.add_argument("--scores", required=True)
    p.add_argument("--out", required=True, help="selection table (.parquet); summary written beside as .json")
    add_flags(p, SelectSettings)

    p = sub.add_parser("reshard", formatter_class=D, help="copy the selected samples of a tar-shard pool (all their "
                                                          "members) into new shards")
    p.add_argument("--selection", required=True, help="selection (or score table) of a shard pool")
    p.add_argument("--wild", required=True, help="the shards that were scored: 'pool/{00000..00099}.tar', "
                                                 "'pool/*.tar' (quoted) or one .tar")
    p.add_argument("--out", required=True, help="new folder: NNNNN.tar + NNNNN_stats.json, and selection.parquet "
                                                "pointing into them")
    add_flags(p, ReshardSettings)

    p = sub.add_parser("run", formatter_class=D, help="score, select, distill, evaluate and report in one folder; "
                                                      "reuses finished stages and continues stopped ones")
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    p.add_argument("--wild", required=True, help=WILD_HELP)
    p.add_argument("--out", required=True, help="run folder: config.json, stages.json, scores, one folder per "
                                                "strategy, report.html")
    p.add_argument("--test", default=None, help="labeled folder of the teacher's classes: measured, never used to "
                                                "choose (unless --select-on test)")
    seen = set()
    add_flags(p, RunSettings, seen=seen)
    add_flags(p, SelectSettings, skip=("strategy",), seen=seen)
    add_flags(p, DistillSettings, skip=("resume", "overwrite"), seen=seen)
    add_flags(p, ScoreSettings, seen=seen)

    p = sub.add_parser("distill", formatter_class=D, help="distill a student on the selected wild images")
    p.add_argument("--teacher", required=True)
    p.add_argument("--wild", required=True, help=WILD_HELP)
    p.add_argument("--selection", required=True)
    p.add_argument("--out", required=True, help="run folder: best.pt, last.pt, metrics.jsonl")
    p.add_argument("--test", default=None, help="labeled folder of the teacher's classes (e.g. ROOT/val): measured "
                                                "every epoch, used to choose only with --select-on test")
    add_flags(p, DistillSettings)

    p = sub.add_parser("dafl", formatter_class=D, help="DAFL: a student from the teacher alone, on images a "
                                                       "generator learns to make (no data)")
    p.add_argument("--teacher", required=True)
    p.add_argument("--out", required=True, help="run folder: best.pt, last.pt, metrics.jsonl")
    p.add_argument("--test", default=None, help="labeled folder of the teacher's classes (e.g. ROOT/val): measured "
                                                "every epoch, never used to choose")
    add_flags(p, DaflSettings)

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
    p.add_argument("--json", default=None, help="write {top1, top5, n} here (a missing folder is created)")
    _common(p, 256)

    p = sub.add_parser("demo", formatter_class=D, help="the whole method on bundled digits in the wild, with a report")
    p.add_argument("--out", default="demo-out", help="run folder: results.json, report.html, figures/, runs")
    p.add_argument("--quick", action="store_true", help="a smaller run for the test suite (57 s measured on an "
                                                        "idle 2-core machine with the benchmark cached; the full "
                                                        "run: 15.5 min, 13.5 min with its teacher cached)")
    p.add_argument("--cache", default=None, help="where the benchmark images are built and reused "
                   "(default: $XDG_CACHE_HOME/attnprobe)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: the 28x28 images decode "
                   "faster in the training process than in workers on a small CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the benchmark and the teacher; the students "
                   "use this seed and the next ones")
    p.add_argument("--jobs", type=int, default=None, help="student trainings at once (default: one per CPU core, "
                   "at most 8), each with its share of the cores")

    p = sub.add_parser("report", formatter_class=D, help="rebuild report.html of a demo or `attnprobe run` folder")
    p.add_argument("run_dir")
    return parser


def check_outputs(args) -> None:
    """Every command's outputs, checked before any work starts (and before the heavy imports): see outputs.py."""
    from ..io import outputs as o
    cmd = args.command
    if cmd == "train-teacher":
        o.check_train_out(args.out, resume=args.resume, overwrite=args.overwrite,
                          inputs={"--data": args.data, "--test": args.test})
    elif cmd == "distill":
        o.check_train_out(args.out, resume=args.resume, overwrite=args.overwrite,
                          inputs={"--teacher": args.teacher, "--wild": args.wild, "--selection": args.selection,
                                  "--test": args.test})
    elif cmd == "dafl":
        o.check_train_out(args.out, resume=args.resume, overwrite=args.overwrite,
                          inputs={"--teacher": args.teacher, "--test": args.test})
    elif cmd == "score":
        o.check_score_out(args.out, teacher=args.teacher, wild=args.wild)
    elif cmd == "select":
        o.check_select_out(args.out, scores=args.scores)
    elif cmd == "reshard":
        o.check_out(args.out, kind="dir", example="resharded", inputs={"--selection": args.selection})
    elif cmd == "run":
        o.check_out(args.out, kind="dir", example="RUN",
                    inputs={"--teacher": args.teacher, "--wild": args.wild, "--test": args.test})
    elif cmd == "evaluate" and args.json is not None:
        o.check_out(args.json, flag="--json", example="evaluation.json",
                    inputs={"--model": args.model, "--data": args.data})
    elif cmd == "import-teacher":
        o.check_out(args.out, example="teacher.pt", inputs={"source": args.source, "--classes": args.classes,
                                                            "--val": args.val})
    elif cmd == "export":
        o.check_out(args.out, kind="new", example="model.onnx" if args.format == "onnx" else args.format,
                    inputs={"checkpoint": args.checkpoint})
    elif cmd == "demo":
        o.check_out(args.out, kind="dir", example="demo-out")


def run(args) -> None:
    check_outputs(args)
    from .. import api  # heavy imports only once the arguments are known to parse

    cmd = args.command
    if cmd == "prepare":
        print(json.dumps(api.prepare(args.kind, args.src, args.out, progress=args.progress)))
    elif cmd == "train-teacher":
        with _distributed():
            info = api.train_teacher(args.data, out=args.out, test=args.test, settings=from_args(TeacherSettings, args))
        if _rank0():
            print(_teacher_line(info, args))
    elif cmd == "score":
        with _distributed():
            summary = api.score(args.teacher, args.wild, args.out, settings=from_args(ScoreSettings, args))
        if summary["rank"] == 0:
            print(f"scored {summary['scored']} images, skipped {summary['skipped']} unreadable "
                  f"(listed in {summary['skipped_csv']}) -> {args.out}")
    elif cmd == "select":
        summary = api.select(args.scores, out=args.out, settings=from_args(SelectSettings, args))
        uids = f" (uids: {summary['uids_npy']})" if summary.get("uids_npy") else ""
        print(f"selected {summary['num_select']} of {summary['pool_size']} ({args.strategy}) -> {args.out}{uids}")
    elif cmd == "reshard":
        r = api.reshard(args.selection, args.wild, out=args.out, settings=from_args(ReshardSettings, args))
        print(f"copied {r['samples']} samples ({r['members']} members) into {r['shards']} shards -> {r['out']} "
              f"(selection: {r['selection']})")
    elif cmd == "run":
        from .run import run as run_all
        result = run_all(args.teacher, args.wild, args.out, test=args.test, run_settings=from_args(RunSettings, args),
                         score_settings=from_args(ScoreSettings, args),
                         select_settings=from_args(SelectSettings, args, strategy=args.strategies[0]),
                         distill_settings=from_args(DistillSettings, args))
        if _rank0():
            for strategy, ev in result["strategies"].items():
                s = (ev or {}).get("student", {})
                test = "" if s.get("test_top1") is None else f", test top-1 {s['test_top1']:.4f}"
                fidelity = "n/a" if s.get("fidelity") is None else f"{s['fidelity']:.4f}"
                print(f"{strategy}: fidelity {fidelity}{test} -> {args.out}/{strategy}/student/best.pt")
            print(f"report -> {args.out}/report.html")
    elif cmd == "distill":
        with _distributed():
            info = api.distill(args.teacher, args.wild, args.selection, out=args.out, test=args.test,
                               settings=from_args(DistillSettings, args))
        if _rank0():
            print(_student_line(info, args))
    elif cmd == "dafl":
        info = api.dafl(args.teacher, out=args.out, test=args.test, settings=from_args(DaflSettings, args))
        print(f"{_student_line(info, args)} ({info['steps']} student steps)")
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
        run_demo(args.out, quick=args.quick, cache=args.cache, workers=args.workers, seed=args.seed, jobs=args.jobs)
    elif cmd == "report":
        from .report import write_report
        print(f"report -> {write_report(args.run_dir)}")
    elif cmd == "evaluate":
        with _distributed():
            result = api.evaluate(args.model, args.data, args.batch_size, args.workers, args.device, args.progress)
        if _rank0():
            print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  (n={result['n']})")
            if args.json:
                from ..io.atomic import write_text
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # created, as --json's help says
                write_text(args.json, json.dumps(result) + "\n")


def _chosen(info, epochs) -> str:
    return f"epoch {info['best_epoch'] + 1} of {epochs}"  # counted from 1 here; best_epoch is 0-based


def _teacher_line(info, args) -> str:
    if info["best_epoch"] is None:
        return f"teacher: no epoch run -> {args.out}/best.pt"
    test = "" if info["test_top1"] is None else f" (test top-1 {info['test_top1']:.4f}, not used to choose)"
    return (f"teacher: best val top-1 {info['val_top1']:.4f} at {_chosen(info, args.epochs)}{test}, "
            f"{info['params']:,} parameters -> {args.out}/best.pt")


def _student_line(info, args) -> str:
    """e.g. student: epoch 7 of 10 chosen on fidelity 0.9312 (test top-1 0.8810, not used to choose) -> RUN/best.pt"""
    if info["best_epoch"] is None:
        return f"student: no epoch run -> {args.out}/best.pt"
    fid, acc = f"{info['fidelity']:.4f}", None if info["accuracy"] is None else f"{info['accuracy']:.4f}"
    if info["selected_on"] == "test":
        how = f"chosen on test top-1 {acc} (optimistic: the test set chose it; fidelity {fid})"
    else:
        how = f"chosen on fidelity {fid}" + ("" if acc is None else f" (test top-1 {acc}, not used to choose)")
    return f"student: {_chosen(info, info.get('epochs') or args.epochs)} {how} -> {args.out}/best.pt"


@contextlib.contextmanager
def _distributed():
    """Around a command that may run under torchrun: leave the process group (if it joined one) on exit."""
    try:
        yield
    finally:
        from ..training.distributed import cleanup
        cleanup()


def _rank0() -> bool:
    """False in the other processes of a torchrun launch: only rank 0 prints results and writes files."""
    return os.environ.get("RANK", "0") in ("", "0")


def _kwargs(args):
    from ..models import parse_model_kwargs
    return parse_model_kwargs(args.model_kwargs)


def _say(line: str) -> None:
    """One line on stderr, from rank 0 only under torchrun (every rank meets the same bad input)."""
    if _rank0():
        print(line, file=sys.stderr, flush=True)


def _how_to_continue(args) -> str:
    """What a stopped command kept, and the command that continues it."""
    cmd, out = args.command, getattr(args, "out", None)
    if cmd == "score":
        return (f"finished chunks are kept in {out}.parts/; rerun the same command to continue from them")
    if cmd in ("train-teacher", "distill", "dafl"):
        last = Path(out) / "last.pt"
        if args.resume and Path(args.resume).resolve() == last.resolve():
            return f"the finished epochs are kept in {last}; rerun the same command to continue"
        if last.is_file():
            return f"the finished epochs are kept in {last}; rerun with --resume {last} to continue"
        return "no epoch had finished; rerun the same command to start again"
    if cmd == "run":
        return f"finished stages (and a stopped one's progress) are kept in {out}; rerun the same command to continue"
    return "outputs are written whole or not at all, so nothing is half-written; rerun the same command"


def _after_rank0(code: int) -> int:
    """Under torchrun, the other ranks let rank 0 print its line and exit first (torchrun then stops them,
    and its summary names rank 0 as the root cause); stopped or not, they exit with the same code."""
    if _rank0() or os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return code
    import signal
    import time
    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    time.sleep(10)
    return code


def main(argv=None) -> int:
    """Bad input (AttnprobeError) and the expected environmental errors (no space, no permission, ...)
    become one line on stderr and exit status 2; Ctrl-C says how to continue (130); anything else is a bug
    and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except AttnprobeError as e:
        _say(f"attnprobe {args.command}: error: {e}")
        return _after_rank0(2)
    except KeyboardInterrupt:
        _say(f"attnprobe {args.command}: interrupted; {_how_to_continue(args)}")
        return 130
    except OSError as e:
        from ..io.outputs import describe_oserror, environment_error
        fix = environment_error(e)
        if fix is None:
            raise
        print(f"attnprobe {args.command}: error: {describe_oserror(e)}; {fix}. {_how_to_continue(args)}",
              file=sys.stderr, flush=True)  # on every rank that meets it: ranks write different files
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
