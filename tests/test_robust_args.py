"""Issue 11, arguments and runs: each refusal is exit 2 with one stderr line that names the problem, and it
changes, loses or half-writes no file. Also: the student takes the teacher's geometry (presets too), a
selection knows its teacher, a resumed run keeps its settings, and training prints one line per epoch."""
import contextlib
import hashlib
import importlib
import io
import math

import pandas as pd
import pytest

from attnprobe.app.cli import main
from attnprobe.errors import AttnprobeError
from attnprobe.io.checkpoints import load_checkpoint, read_checkpoint
from attnprobe.io.tables import write_table
from attnprobe.settings import DistillSettings, SelectSettings, TeacherSettings

from .conftest import TINY_TEACHER

pytestmark = pytest.mark.usefixtures("one_thread")


def kw(kwargs):
    return ["--model-kwargs", *[f"{k}={v}" for k, v in kwargs.items()]]


def snapshot(*roots):
    """Every file under the roots (or the file itself): its bytes' hash; folders too, as None."""
    seen = {}
    for root in roots:
        if root.is_file():
            seen[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for p in sorted(root.rglob("*")) if root.exists() else []:
            seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return seen


def refused(argv, capsys, *words, keep=()):
    """Exit 2, exactly one stderr line holding each of `words`, and no file under `keep` changed."""
    capsys.readouterr()
    before = snapshot(*keep)
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    for w in words:
        assert w in lines[0], lines[0]
    assert snapshot(*keep) == before
    return lines[0]


def epoch_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("epoch ")]


def teacher_argv(image_root, out, epochs=1, *extra):
    arch, kwargs = TINY_TEACHER
    return ["train-teacher", "--data", image_root / "data", "--model", arch, *kw(kwargs), "--epochs", epochs,
            "--out", out, "--batch-size", 16, "--lr", "0.002", "--workers", 0, "--no-progress", *extra]


@pytest.fixture(scope="module")
def scored(image_root, teacher_ckpt, tmp_path_factory):
    """The wild pool scored with the teacher (the table records its sha256) and 16 images selected from it."""
    folder = tmp_path_factory.mktemp("scored")
    assert main(["score", "--teacher", str(teacher_ckpt), "--wild", str(image_root / "wild"), "--out",
                 str(folder / "scores.parquet"), "--workers", "0", "--no-progress"]) == 0
    assert main(["select", "--scores", str(folder / "scores.parquet"), "--out", str(folder / "sel.parquet"),
                 "--num-select", "16"]) == 0
    return folder


def distill_argv(image_root, teacher, selection, out, epochs=2, *extra):
    """The default student (ap_digits_student: 28 px, one channel as a preset) from the 16 px RGB teacher."""
    return ["distill", "--teacher", teacher, "--wild", image_root / "wild", "--selection", selection, "--out", out,
            "--epochs", epochs, "--batch-size", 8, "--workers", 0, "--holdout", 4, "--no-progress", *extra]


@pytest.fixture(scope="module")
def distilled(image_root, teacher_ckpt, scored, tmp_path_factory):
    out = tmp_path_factory.mktemp("distilled") / "run"
    err = io.StringIO()  # capsys is function-scoped: the module's run captures its own stderr
    with contextlib.redirect_stderr(err):
        assert main([str(a) for a in distill_argv(image_root, teacher_ckpt, scored / "sel.parquet", out)]) == 0
    return out, err.getvalue()


# ---- 1. arguments checked where they enter ----------------------------------------------------------------

@pytest.mark.parametrize("extra, words", [
    (["--model-kwargs", "embed_dim=32", "num_heads=3"], ["embed_dim 32 is not divisible by num_heads 3"]),
    (["--model-kwargs", "embed_dim=abc"], ["--model-kwargs embed_dim='abc': expected a number"]),
    (["--model-kwargs", "depth=0"], ["depth=0", "at least 1"]),
    (["--model-kwargs", "mlp_ratio=1e999"], ["mlp_ratio=inf", "finite"]),
    (["--model-kwargs", "num_classes=5"], ["num_classes", "drop it"]),
    (["--model-kwargs", "depth=2", "depth=3"], ["depth is given twice"]),
    (["--lr", "nan"], ["--lr nan", "finite"]),
    (["--weight-decay", "inf"], ["--weight-decay inf", "finite"]),
    (["--label-smoothing", "nan"], ["--label-smoothing", "finite"]),
    (["--std", "0.5", "inf", "0.5"], ["--std", "finite"]),
])
def test_train_teacher_arguments_refused_before_any_work(image_root, tmp_path, capsys, extra, words):
    refused(teacher_argv(image_root, tmp_path / "T", 1, *extra), capsys, *words, keep=[tmp_path])
    assert not (tmp_path / "T").exists()


def test_distill_select_score_arguments(image_root, teacher_ckpt, scored, tmp_path, capsys):
    sel = scored / "sel.parquet"
    keep = [tmp_path, scored]
    for extra, words in [(["--temperature", "nan"], ["--temperature nan", "finite"]),
                         (["--noise-weight", "inf"], ["--noise-weight inf", "finite"]),
                         (["--teacher-acc", "2"], ["--teacher-acc 2.0", "must be a fraction"]),
                         (["--holdout", "nan"], ["--holdout", "finite"]),
                         (["--model-kwargs", "embed_dim=24", "num_heads=5"], ["not divisible by num_heads 5"])]:
        refused(distill_argv(image_root, teacher_ckpt, sel, tmp_path / "S", 1, *extra), capsys, *words, keep=keep)
    refused(["select", "--scores", scored / "scores.parquet", "--out", tmp_path / "s.parquet", "--num-select", 4,
             "--w-attn", "nan"], capsys, "--w-attn nan", "finite", keep=keep)
    score = ["score", "--teacher", teacher_ckpt, "--wild", image_root / "wild", "--out", tmp_path / "t.parquet",
             "--workers", 0, "--no-progress"]
    refused(score + ["--blocks", "-1"], capsys, "--blocks -1", "0 or more", keep=keep)
    # a path of the wrong kind says what it is and what is expected
    refused(score[:4] + [image_root / "data/train/hbar/0.png"] + score[5:], capsys, "is a file, not a folder",
            keep=keep)
    refused(["score", "--teacher", teacher_ckpt.parent] + score[3:], capsys, "is a folder, not a checkpoint",
            "best.pt", keep=keep)
    refused(distill_argv(image_root, teacher_ckpt, sel, tmp_path / "S", 1)[:4] + [image_root / "data/train/hbar/0.png"]
            + distill_argv(image_root, teacher_ckpt, sel, tmp_path / "S", 1)[5:], capsys, "is a file, not a folder",
            keep=keep)


def test_settings_check_types_and_finiteness_from_python():
    for bad, words in [(dict(epochs=2.5), "expected a whole number"), (dict(epochs=True), "expected a whole number"),
                       (dict(lr=float("nan")), "finite"), (dict(lr="0.1"), "expected a number"),
                       (dict(flip="no"), "expected True or False"), (dict(model_kwargs={"embed_dim": "abc"}),
                                                                     "expected a number"),
                       (dict(model_kwargs={"depth": 0}), "at least 1"), (dict(model="nope"), "unknown model")]:
        with pytest.raises(AttnprobeError, match=words):
            TeacherSettings.build(**{"epochs": 1, **bad})
    with pytest.raises(AttnprobeError, match="finite"):
        SelectSettings.build(num_select=3, w_out=math.inf)
    assert DistillSettings.build(epochs=1, probe_blocks=(0, 1)).probe_blocks == [0, 1]  # a tuple is a list


def test_depth_0_teacher_refused_when_built(tmp_path):
    from attnprobe.models import build_model
    with pytest.raises(AttnprobeError, match="depth"):
        build_model("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 0}, 3)
    with pytest.raises(AttnprobeError, match="larger than img_size"):
        build_model("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 32}, 3)


# ---- 2. the student takes the teacher's geometry, presets too; 5. one line per epoch ------------------------

def test_default_student_preset_takes_the_teacher_geometry(distilled, teacher_ckpt):
    out, err = distilled
    _, t_info = load_checkpoint(teacher_ckpt)
    net, info = load_checkpoint(out / "best.pt")
    assert (t_info["img_size"], t_info["in_chans"]) == (16, 3)
    assert (info["img_size"], info["in_chans"]) == (16, 3)  # the preset itself is 28 px, one channel
    lines = epoch_lines(err)
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"], err
    assert all("kd " in line and "fidelity " in line and "lr " in line and line.split("  ")[-1] for line in lines)


def test_student_geometry_override_names_the_override(image_root, teacher_ckpt, scored, tmp_path, capsys):
    refused(distill_argv(image_root, teacher_ckpt, scored / "sel.parquet", tmp_path / "S", 1, "--model-kwargs",
                         "in_chans=1"), capsys, "drop --model-kwargs in_chans=1", keep=[tmp_path, scored])


# ---- 3. a selection knows its teacher ---------------------------------------------------------------------

def test_selection_of_another_teacher_refused(image_root, teacher_ckpt, scored, tmp_path, capsys):
    other = teacher_ckpt.parent / "last.pt"  # another file: another teacher for the selection
    for extra in ([], ["--robust"]):
        refused(distill_argv(image_root, other, scored / "sel.parquet", tmp_path / "S", 1, *extra), capsys,
                "scored with another teacher", "rescore with this teacher", keep=[tmp_path, scored,
                                                                                   teacher_ckpt.parent])
    # a selection without the record (older files, a hand-made list) is accepted
    write_table(pd.DataFrame({"path": ["shapes/s0.png", "shapes/s2.bmp", "shapes/deep/s1.PNG", "noise/n0.jpg",
                                       "noise/n1.jpg", "noise/n2.jpg"]}), tmp_path / "all.parquet", {})
    assert main([str(a) for a in distill_argv(image_root, other, tmp_path / "all.parquet", tmp_path / "S", 1,
                                              "--holdout", 2, "--model-kwargs", "depth=1")]) == 0


# ---- 4. a resumed run keeps its settings ------------------------------------------------------------------

def test_resumed_teacher_keeps_its_settings_and_epochs(image_root, tmp_path, capsys):
    run = tmp_path / "T"
    assert main([str(a) for a in teacher_argv(image_root, run, 1)]) == 0
    assert len(epoch_lines(capsys.readouterr().err)) == 1
    last = run / "last.pt"
    refused(teacher_argv(image_root, run, 3, "--resume", last), capsys, "--epochs must stay 1", "start a new run",
            keep=[tmp_path])
    refused(teacher_argv(image_root, run, 1, "--resume", last, "--lr", "0.01"), capsys, "was run with --lr 0.002",
            keep=[tmp_path])
    refused(teacher_argv(image_root, run, 1, "--resume", last, "--no-flip"), capsys, "was run with flip on",
            keep=[tmp_path])
    assert read_checkpoint(last)["info"]["settings"]["lr"] == 0.002
    # the step schedule does not depend on --epochs: a finished run may be extended, never shortened below it
    step = tmp_path / "step"
    assert main([str(a) for a in teacher_argv(image_root, step, 1, "--schedule", "step")]) == 0
    capsys.readouterr()
    refused(teacher_argv(image_root, step, 3, "--schedule", "step", "--resume", step / "last.pt", "--lr", "0.003"),
            capsys, "was run with --lr 0.002", keep=[tmp_path])
    assert main([str(a) for a in teacher_argv(image_root, step, 2, "--schedule", "step", "--resume",
                                              step / "last.pt")]) == 0
    assert [line.split()[1] for line in epoch_lines(capsys.readouterr().err)] == ["2/2"]
    refused(teacher_argv(image_root, step, 1, "--schedule", "step", "--resume", step / "last.pt"), capsys,
            "has already trained 2 epochs", keep=[tmp_path])


def test_resumed_student_keeps_its_settings(image_root, teacher_ckpt, scored, distilled, capsys):
    out, _ = distilled
    argv = distill_argv(image_root, teacher_ckpt, scored / "sel.parquet", out, 2, "--resume", out / "last.pt")
    refused(argv + ["--no-noise-adaptation"], capsys, "was run with noise adaptation on", keep=[out.parent])
    refused(argv + ["--temperature", "2"], capsys, "was run with --temperature 4.0", keep=[out.parent])
    assert main([str(a) for a in argv]) == 0  # the same settings: the finished run resumes (nothing to do)


def test_score_parts_of_another_chunk_size_give_the_old_value(image_root, teacher_ckpt, tmp_path, capsys,
                                                              monkeypatch):
    parts_mod = importlib.import_module("attnprobe.stages.score_parts")  # where the parts are merged
    out = tmp_path / "s.parquet"
    argv = ["score", "--teacher", teacher_ckpt, "--wild", image_root / "wild", "--out", out, "--workers", 0,
            "--no-progress"]

    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(parts_mod, "merge_parts", stop)
    assert main([str(a) for a in argv + ["--chunk-size", 8]]) == 130
    monkeypatch.undo()
    refused(argv + ["--chunk-size", 16], capsys, "then --chunk-size 8, now --chunk-size 16", keep=[tmp_path])
