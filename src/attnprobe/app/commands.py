"""Running a parsed command: the settings from its flags, the Python API (the one boundary: it checks the
paths and the settings before any work), its result line, and the one-line errors of `main`."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from .. import settings as cfg  # the settings classes, one per command
from ..errors import AttnprobeError
from ..settings import from_args


def execute(args) -> None:
    """Run the command `args.command` and print its result line(s)."""
    from .. import api  # heavy imports only once the arguments are known to parse

    cmd, out = args.command, getattr(args, "out", None)
    if cmd == "prepare":
        import json
        print(json.dumps(api.prepare(args.kind, args.src, out, settings=from_args(cfg.PrepareSettings, args))))
    elif cmd == "train-teacher":
        with _distributed():
            info = api.train_teacher(args.data, out=out, test=args.test, settings=from_args(cfg.TeacherSettings, args))
        if _rank0():
            print(_teacher_line(info, args))
    elif cmd == "score":
        with _distributed():
            summary = api.score(args.teacher, args.wild, out, settings=from_args(cfg.ScoreSettings, args))
        if summary["rank"] == 0:
            print(f"scored {summary['scored']} images, skipped {summary['skipped']} unreadable "
                  f"(listed in {summary['skipped_csv']}) -> {out}")
    elif cmd == "select":
        summary = api.select(args.scores, out=out, settings=from_args(cfg.SelectSettings, args))
        left = (f"; {summary['uids_missing']} selected rows have no uid and are not in it"
                if summary.get("uids_missing") else "")
        uids = f" (uids: {summary['uids_npy']}{left})" if summary.get("uids_npy") else ""
        print(f"selected {summary['num_select']} of {summary['pool_size']} ({args.strategy}) -> {out}{uids}")
    elif cmd == "reshard":
        r = api.reshard(args.selection, args.wild, out=out, settings=from_args(cfg.ReshardSettings, args))
        print(f"copied {r['samples']} samples ({r['members']} members) into {r['shards']} shards -> {r['out']} "
              f"(selection: {r['selection']})")
    elif cmd == "run":
        _run(args)
    elif cmd == "distill":
        with _distributed():
            info = api.distill(args.teacher, args.wild, args.selection, out=out, test=args.test,
                               settings=from_args(cfg.DistillSettings, args))
        if _rank0():
            print(_student_line(info, args))
    elif cmd == "dafl":
        info = api.dafl(args.teacher, out=out, test=args.test, settings=from_args(cfg.DaflSettings, args))
        print(f"{_student_line(info, args)} ({info['steps']} student steps)")
    elif cmd == "import-teacher":
        info = api.import_teacher(args.source, out=out, settings=from_args(cfg.ImportSettings, args))
        acc = "no accuracy (pass --teacher-acc to distill)" if info["accuracy"] is None else \
            f"accuracy {info['accuracy']:.4f} ({info['accuracy_source']})"
        assumed = f"; assumed {'; '.join(info['assumed'])}" if info.get("assumed") else ""
        print(f"teacher: {info['source_kind']} -> {info['arch']}, {info['params']:,} parameters, "
              f"{info['num_classes']} classes, {acc} -> {out}{assumed}")
    elif cmd == "export":
        result = api.export(args.checkpoint, out=out, settings=from_args(cfg.ExportSettings, args))
        diff = "" if result["max_abs_diff"] is None else f", max |logit difference| {result['max_abs_diff']:.2e}"
        print(f"exported {args.format}{diff} -> {out}")
    elif cmd == "evaluate":
        with _distributed():
            result = api.evaluate(args.model, args.data, json=args.json, settings=from_args(cfg.EvaluateSettings, args))
        if _rank0():
            print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  (n={result['n']})")
    elif cmd == "demo":
        settings = from_args(cfg.DemoSettings, args)
        _check_app_out(out, "demo-out")
        from .demo import run_demo
        run_demo(out=out, settings=settings)
    elif cmd == "report":
        from .report import write_report
        print(f"report -> {write_report(args.run_dir)}")


def _run(args) -> None:
    """`attnprobe run`: every stage with the settings its flags give (a shared flag for every stage)."""
    settings = {"run_settings": from_args(cfg.RunSettings, args),
                "score_settings": from_args(cfg.ScoreSettings, args),
                "select_settings": from_args(cfg.SelectSettings, args, strategy=args.strategies[0]),
                "distill_settings": from_args(cfg.DistillSettings, args)}
    _check_app_out(args.out, "RUN", {"--teacher": (args.teacher, "checkpoint"), "--wild": (args.wild, "pool"),
                                     "--test": (args.test, "dir")})
    from .run import run as run_all
    result = run_all(args.teacher, args.wild, args.out, test=args.test, **settings)
    if _rank0():
        for strategy, ev in result["strategies"].items():
            s = (ev or {}).get("student", {})
            test = "" if s.get("test_top1") is None else f", test top-1 {s['test_top1']:.4f}"
            fidelity = "n/a" if s.get("fidelity") is None else f"{s['fidelity']:.4f}"
            print(f"{strategy}: fidelity {fidelity}{test} -> {args.out}/{strategy}/student/best.pt")
        print(f"report -> {args.out}/report.html")


def _check_app_out(out, example: str, inputs: dict | None = None) -> None:
    """`run` and `demo` are app functions, not API ones: their paths are checked here, before any work."""
    from ..io.inputs import check_inputs
    from ..io.outputs import check_out
    check_inputs(inputs or {})
    check_out(out, kind="dir", example=example, inputs={flag: path for flag, (path, _) in (inputs or {}).items()})


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


def _say(line: str) -> None:
    """One line on stderr, from rank 0 only under torchrun (every rank meets the same bad input)."""
    if _rank0():
        print(line, file=sys.stderr, flush=True)


def how_to_continue(args) -> str:
    """What a stopped command kept, and the command that continues it."""
    cmd, out = args.command, getattr(args, "out", None)
    if cmd == "score":
        return f"finished chunks are kept in {out}.parts/; rerun the same command to continue from them"
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
    and its summary names rank 0 as the root cause); stopped or not, they exit with the same code. Rank 0
    waits a moment first, so that a slower rank reaches the same line before torchrun stops it."""
    import signal
    import time
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return code
    if _rank0():
        time.sleep(1)
        return code
    signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
    time.sleep(10)
    return code


def _stopped_with_rank0() -> None:
    """Under torchrun, before a rank joins the process group (training.distributed resets this), torchrun's
    SIGTERM means rank 0 refused input that every rank shares and exited 2: exit 2 as well, not by the signal."""
    if not _rank0() and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        import signal
        signal.signal(signal.SIGTERM, lambda *_: os._exit(2))


def main(args) -> int:
    """Run parsed `args`: bad input and expected environmental errors are one line and exit 2 (see cli.main)."""
    _stopped_with_rank0()
    try:
        execute(args)
    except AttnprobeError as e:
        _say(f"attnprobe {args.command}: error: {e}")
        return _after_rank0(2)
    except KeyboardInterrupt:
        _say(f"attnprobe {args.command}: interrupted; {how_to_continue(args)}")
        return 130
    except OSError as e:
        from ..io.outputs import describe_oserror, environment_error
        fix = environment_error(e)
        if fix is None:
            raise
        print(f"attnprobe {args.command}: error: {describe_oserror(e)}; {fix}. {how_to_continue(args)}",
              file=sys.stderr, flush=True)  # on every rank that meets it: ranks write different files
        return 2
    return 0
