"""Determinism, resuming after a SIGKILL, checkpoints that are never torn, and validation up front."""
import json
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from attnprobe import load_checkpoint
from attnprobe.app.cli import main
from attnprobe.io.checkpoints import read_checkpoint
from attnprobe.io.tables import write_table

from .conftest import (
    CLASSES,
    TINY_STUDENT,
    TINY_TEACHER,
    cli,
    kill_after_first_epoch,
    shape_image,
)
from .conftest import CLI_ENV as ENV


def kwargs_args(kwargs):
    return ["--model-kwargs", *[f"{k}={v}" for k, v in kwargs.items()]]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_selection(image_root, out, repeat=1):
    wild = image_root / "wild"
    paths = sorted(p.relative_to(wild).as_posix() for p in wild.rglob("*")
                   if p.suffix.lower() in (".png", ".jpg", ".bmp"))
    write_table(pd.DataFrame({"path": paths * repeat}), out, {})
    return out


@pytest.fixture(scope="module")
def selection(image_root, tmp_path_factory):
    """Every wild image, listed 4 times (a longer epoch, so that a kill lands mid-run)."""
    return write_selection(image_root, tmp_path_factory.mktemp("selection") / "sel.parquet", repeat=4)


def distill_argv(image_root, teacher_ckpt, selection, out, epochs, *extra):
    s_arch, s_kw = TINY_STUDENT
    return ["distill", "--teacher", str(teacher_ckpt), "--wild", str(image_root / "wild"),
            "--selection", str(selection), "--test", str(image_root / "data/val"), "--student", s_arch,
            *kwargs_args(s_kw), "--epochs", str(epochs), "--out", str(out), "--batch-size", "8", "--seed", "3",
            "--no-progress", *extra]


def finish(proc):
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return out


def same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def without_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_same_seed_same_distillation(image_root, teacher_ckpt, tmp_path):
    selection = write_selection(image_root, tmp_path / "sel.parquet")
    runs = []
    for name in ("a", "b"):
        assert main(distill_argv(image_root, teacher_ckpt, selection, tmp_path / name, 2, "--workers", "0")) == 0
        runs.append(read_checkpoint(tmp_path / name / "last.pt"))
    same_state(runs[0]["model"], runs[1]["model"])
    same_state(runs[0]["noise"], runs[1]["noise"])
    assert without_seconds(read_jsonl(tmp_path / "a/metrics.jsonl")) == \
        without_seconds(read_jsonl(tmp_path / "b/metrics.jsonl"))
    assert not torch.equal(runs[0]["noise"]["q"], torch.zeros_like(runs[0]["noise"]["q"]))  # Q is trained


def test_distill_resumed_after_sigkill_equals_uninterrupted(image_root, teacher_ckpt, selection, tmp_path):
    """Loader workers on (their seeds come from the loader generator the checkpoint saves)."""
    epochs = 4
    argv = lambda out, *x: distill_argv(image_root, teacher_ckpt, selection, tmp_path / out, epochs,  # noqa: E731
                                        "--workers", "2", *x)
    whole = cli(argv("whole"))
    killed = cli(argv("killed"))
    metrics = tmp_path / "killed/metrics.jsonl"
    kill_after_first_epoch(killed, metrics)
    stopped_at = read_checkpoint(tmp_path / "killed/last.pt")["epoch"]
    assert stopped_at < epochs - 1, "the run finished before it was killed; make the epochs longer"
    finish(whole)
    finish(cli(argv("killed", "--resume", str(tmp_path / "killed/last.pt"))))

    a, b = read_checkpoint(tmp_path / "whole/last.pt"), read_checkpoint(tmp_path / "killed/last.pt")
    same_state(a["model"], b["model"])
    same_state(a["noise"], b["noise"])
    assert (a["best_on"], a["best_score"], a["best_epoch"]) == (b["best_on"], b["best_score"], b["best_epoch"])
    assert a["best_on"] == "fidelity"
    rows_whole = read_jsonl(tmp_path / "whole/metrics.jsonl")
    best = load_checkpoint(tmp_path / "killed/best.pt")[1]
    assert best["best_epoch"] == max(range(epochs), key=lambda e: (rows_whole[e]["fidelity"], -e))
    assert best["fidelity"] == rows_whole[best["best_epoch"]]["fidelity"]
    same_state(read_checkpoint(tmp_path / "whole/best.pt")["model"], read_checkpoint(tmp_path / "killed/best.pt")["model"])
    rows = read_jsonl(metrics)
    assert [r["epoch"] for r in rows] == list(range(epochs))
    assert without_seconds(rows) == without_seconds(read_jsonl(tmp_path / "whole/metrics.jsonl"))
    assert not list((tmp_path / "killed").glob(".*tmp*"))  # no temp files left behind


def test_train_teacher_resume_and_resume_when_done(image_root, tmp_path, capsys):
    """Stopped after 1 of 3 epochs (constant LR: the step schedule's milestones are far away), resumed to 3."""
    arch, kw = TINY_TEACHER
    argv = lambda out, epochs, *x: ["train-teacher", "--data", str(image_root / "data"), "--model", arch,  # noqa: E731
                                    *kwargs_args(kw), "--epochs", str(epochs), "--out", str(tmp_path / out),
                                    "--batch-size", "16", "--schedule", "step", "--workers", "0", "--no-progress", *x]
    assert main(argv("whole", 3)) == 0
    assert main(argv("parts", 1)) == 0
    assert main(argv("parts", 3, "--resume", str(tmp_path / "parts/last.pt"))) == 0
    a, b = read_checkpoint(tmp_path / "whole/last.pt"), read_checkpoint(tmp_path / "parts/last.pt")
    same_state(a["model"], b["model"])
    assert without_seconds(read_jsonl(tmp_path / "whole/metrics.jsonl")) == \
        without_seconds(read_jsonl(tmp_path / "parts/metrics.jsonl"))
    # already done: exits cleanly, nothing changes
    before = (tmp_path / "parts/metrics.jsonl").read_text(), (tmp_path / "parts/last.pt").read_bytes()
    capsys.readouterr()
    assert main(argv("parts", 3, "--resume", str(tmp_path / "parts/last.pt"))) == 0
    assert "best val top-1" in capsys.readouterr().out
    assert before == ((tmp_path / "parts/metrics.jsonl").read_text(), (tmp_path / "parts/last.pt").read_bytes())


SLOW_SAVE = textwrap.dedent("""
    import io, sys, time, torch
    from attnprobe.io.checkpoints import load_checkpoint, save_checkpoint
    model, info = load_checkpoint(sys.argv[1])
    real_save = torch.save
    def slow_save(obj, f, *args, **kwargs):  # half the bytes, then hang: killed mid-write
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print("half written", flush=True)
        time.sleep(120)
        f.write(data[len(data) // 2:])
    torch.save = slow_save
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(sys.argv[2], model, info)
""")


def test_kill_during_checkpoint_write_keeps_the_old_file(teacher_ckpt, tmp_path):
    target = tmp_path / "last.pt"
    shutil.copy(teacher_ckpt, target)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(teacher_ckpt), str(target)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "half written", proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert list(tmp_path.glob(".last.pt.tmp*"))  # the torn temp file is there, beside the intact target
    model, info = load_checkpoint(target)
    same_state(model.state_dict(), load_checkpoint(teacher_ckpt)[0].state_dict())


def expect_error(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_truncated_checkpoint_is_one_line_error(image_root, teacher_ckpt, selection, tmp_path, capsys):
    data = teacher_ckpt.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) * 2 // 3])
    q = ["--workers", "0", "--no-progress"]
    expect_error(["evaluate", "--model", str(cut), "--data", str(image_root / "data"), *q], capsys,
                 "not a readable attnprobe checkpoint")
    expect_error(distill_argv(image_root, cut, selection, tmp_path / "s1", 1, *q[:2]), capsys,
                 "not a readable attnprobe checkpoint")
    expect_error(distill_argv(image_root, teacher_ckpt, selection, tmp_path / "s2", 1, *q[:2], "--resume", str(cut)),
                 capsys, "not a readable attnprobe checkpoint")
    # a teacher's last.pt is not a student's: one line, not a traceback
    expect_error(distill_argv(image_root, teacher_ckpt, selection, tmp_path / "s3", 1, *q[:2], "--resume",
                              str(teacher_ckpt.parent / "last.pt")), capsys, "does not fit this run")


def test_grayscale_test_set_of_another_size_for_rgb_teacher(teacher_ckpt, tmp_path, capsys):
    """Test images are resized and colour-converted to the teacher's geometry (16 px RGB here)."""
    rng = np.random.default_rng(1)
    for cls in CLASSES:
        (tmp_path / "gray" / cls).mkdir(parents=True)
        for i in range(3):
            shape_image(rng, cls, size=24).convert("L").save(tmp_path / "gray" / cls / f"{i}.png")
    assert Image.open(tmp_path / "gray" / CLASSES[0] / "0.png").mode == "L"
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(teacher_ckpt), "--data", str(tmp_path / "gray"), "--json", str(out),
                 "--workers", "0", "--no-progress"]) == 0
    assert json.loads(out.read_text())["n"] == 9
