"""Command line: the parser. Every command's flags come from its settings dataclass (settings/); the paths
are the arguments here. Running a command and its result line: app/commands.py. Nothing heavy is imported
before the arguments parse: `attnprobe --help` and a mistyped flag answer at once."""
from __future__ import annotations

import argparse
import sys

from ..settings import (DaflSettings, DemoSettings, DistillSettings, EvaluateSettings, ExportSettings,
    ImportSettings, PrepareSettings, ReshardSettings, RunSettings, ScoreSettings, SelectSettings, TeacherSettings,
    add_flags)
from . import commands


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's help with its default, where the default says something: not beside an on/off flag (its name
    says what giving it does), not None (the help says what happens instead), not when the help already names
    its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        if isinstance(action.default, list):  # as it is typed: --strategies attnprobe dfnd
            return f"{text} (default: {' '.join(map(str, action.default))})".replace("%", "%%")
        return super()._get_help_string(action)


D = Help
WILD_HELP = ("folder of unlabeled images (recursive), or tar shards (img2dataset/WebDataset): "
             "'pool/{00000..00099}.tar', 'pool/*.tar' (quoted) or one .tar")
RUN_HELP = "run folder: best.pt, last.pt, metrics.jsonl"
TEACHER_HELP = "teacher checkpoint (RUN/best.pt of train-teacher, or import-teacher's)"
# Under torchrun (python -m torch.distributed.run --nproc_per_node N -m attnprobe.cli ...) the same flags hold.


def _paths(p, *, optional=(), **flags) -> None:
    """The command's path flags {name: help}: required, but for those named in `optional` (default None)."""
    for name, text in flags.items():
        p.add_argument("--" + name.replace("_", "-"), required=name not in optional, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnprobe", description="Distill a ViT in the wild with the attention probe.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", formatter_class=D, help="official CIFAR/Tiny-ImageNet layout -> ImageFolder tree")
    p.add_argument("kind", choices=PrepareSettings.__dataclass_fields__["kind"].metadata["choices"])
    p.add_argument("src", help="the official archive or its extracted folder")
    p.add_argument("out", help="new folder for train/<class>/ and val/<class>/")
    add_flags(p, PrepareSettings, skip=("kind",))

    p = sub.add_parser("train-teacher", formatter_class=D, help="train a ViT teacher on an ImageFolder root")
    _paths(p, optional=("test",), data="ImageFolder root with train/ and val/ (or no val/ and --val-split)",
           out=RUN_HELP,
           test=("labeled folder of the classes, measured every epoch (test_top1) and never used to choose the "
                 "epoch"))
    add_flags(p, TeacherSettings)

    p = sub.add_parser("score", formatter_class=D, help="score every wild image with one teacher pass")
    _paths(p, teacher=TEACHER_HELP, wild=WILD_HELP, out="score table (.parquet)")
    add_flags(p, ScoreSettings)

    p = sub.add_parser("select", formatter_class=D, help="pick the K best-scoring wild images")
    _paths(p, scores="score table of `attnprobe score`",
           out="selection table (.parquet); summary written beside as .json")
    add_flags(p, SelectSettings)

    p = sub.add_parser("reshard", formatter_class=D, help="copy the selected samples of a tar-shard pool (all their "
                                                          "members) into new shards")
    _paths(p, selection="selection (or score table) of a shard pool",
           wild="the shards that were scored: 'pool/{00000..00099}.tar', 'pool/*.tar' (quoted) or one .tar",
           out="new folder: NNNNN.tar + NNNNN_stats.json, and selection.parquet pointing into them")
    add_flags(p, ReshardSettings)

    p = sub.add_parser("run", formatter_class=D, help="score, select, distill, evaluate and report in one folder; "
                                                      "reuses finished stages and continues stopped ones")
    _paths(p, optional=("test",), teacher=TEACHER_HELP, wild=WILD_HELP,
           out="run folder: config.json, stages.json, scores, one folder per strategy, report.html",
           test=("labeled folder of the teacher's classes: measured, never used to choose (unless --select-on "
                 "test)"))
    seen = set()
    add_flags(p, RunSettings, seen=seen, run=True)
    add_flags(p, SelectSettings, skip=("strategy",), seen=seen, run=True)
    add_flags(p, DistillSettings, skip=("resume", "overwrite"), seen=seen, run=True)
    add_flags(p, ScoreSettings, seen=seen, run=True)

    test_help = ("labeled folder of the teacher's classes (e.g. ROOT/val): measured every epoch, used to choose only "
                 "with --select-on test")
    p = sub.add_parser("distill", formatter_class=D, help="distill a student on the selected wild images")
    _paths(p, optional=("test",), teacher=TEACHER_HELP, wild=WILD_HELP,
           selection="selection table of `attnprobe select`", out=RUN_HELP,
           test=test_help)
    add_flags(p, DistillSettings)

    p = sub.add_parser("dafl", formatter_class=D, help="DAFL: a student from the teacher alone, on images a "
                                                       "generator learns to make (no data)")
    _paths(p, optional=("test",), teacher=TEACHER_HELP, out=RUN_HELP,
           test=("labeled folder of the teacher's classes (e.g. ROOT/val): measured every epoch, never used to "
                 "choose"))
    add_flags(p, DaflSettings)

    p = sub.add_parser("import-teacher", formatter_class=D,
                       help="a teacher from DeiT, timm, transformers or a state dict -> attnprobe checkpoint")
    p.add_argument("source", help="checkpoint file (.pth/.pth.tar/.bin/.safetensors), timm or transformers model "
                                  "folder, or hf-hub:ORG/NAME from the local Hugging Face cache")
    _paths(p, out="the attnprobe checkpoint to write, e.g. teacher.pt")
    add_flags(p, ImportSettings)

    p = sub.add_parser("export", formatter_class=D, help="a checkpoint -> timm or transformers folder, or ONNX")
    p.add_argument("checkpoint", help="an attnprobe checkpoint, e.g. RUN/best.pt")
    _paths(p, out="a new folder (timm, transformers) or .onnx file")
    add_flags(p, ExportSettings)

    p = sub.add_parser("evaluate", formatter_class=D, help="top-1/top-5 of a checkpoint on a labeled folder")
    _paths(p, optional=("json",), model="an attnprobe checkpoint, e.g. RUN/best.pt",
           data="folder of class folders, or an ImageFolder root (uses val/)",
           json="write {top1, top5, n} here (a missing folder is created)")
    add_flags(p, EvaluateSettings)

    p = sub.add_parser("demo", formatter_class=D, help="the whole method on bundled digits in the wild, with a report")
    p.add_argument("--out", default="demo-out", help="run folder: results.json, report.html, figures/, runs")
    add_flags(p, DemoSettings)

    p = sub.add_parser("report", formatter_class=D, help="rebuild report.html of a demo or `attnprobe run` folder")
    p.add_argument("run_dir", help="the folder of a demo or of `attnprobe run` (its --out)")
    return parser


def main(argv=None) -> int:
    """Bad input (AttnprobeError) and the expected environmental errors (no space, no permission, ...)
    become one line on stderr and exit status 2; Ctrl-C says how to continue (130); anything else is a bug
    and keeps its traceback."""
    return commands.main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
