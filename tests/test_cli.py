"""Every command end to end through the CLI on a tiny generated image set, and each bad input."""
import json
import subprocess
import sys

import pytest

from attnprobe import load_checkpoint
from attnprobe.app.cli import main
from attnprobe.io.images import eval_transform, load_image
from attnprobe.io.tables import read_table

from .conftest import CLASSES, TINY_STUDENT, TINY_TEACHER


def kwargs_args(kwargs):
    return ["--model-kwargs", *[f"{k}={v}" for k, v in kwargs.items()]]


@pytest.fixture(scope="module")
def pipeline(image_root, tmp_path_factory):
    """train-teacher -> score -> select -> distill through the CLI; returns the run folder."""
    out = tmp_path_factory.mktemp("pipeline")
    data, wild = image_root / "data", image_root / "wild"
    arch, kw = TINY_TEACHER
    common = ["--workers", "0", "--no-progress"]
    assert main(["train-teacher", "--data", str(data), "--model", arch, *kwargs_args(kw), "--epochs", "3",
                 "--out", str(out / "teacher"), "--batch-size", "16", "--lr", "2e-3", *common]) == 0
    assert main(["score", "--teacher", str(out / "teacher/best.pt"), "--wild", str(wild),
                 "--out", str(out / "scores.parquet"), "--batch-size", "7", *common]) == 0
    assert main(["select", "--scores", str(out / "scores.parquet"), "--num-select", "20",
                 "--out", str(out / "sel.parquet")]) == 0
    s_arch, s_kw = TINY_STUDENT
    assert main(["distill", "--teacher", str(out / "teacher/best.pt"), "--wild", str(wild),
                 "--selection", str(out / "sel.parquet"), "--student", s_arch, *kwargs_args(s_kw),
                 "--test", str(data / "val"), "--epochs", "2", "--out", str(out / "student"), "--batch-size", "8",
                 "--robust", "--labeled", str(data / "train"), "--per-class", "2", *common]) == 0
    return out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_teacher_outputs(pipeline):
    rows = read_jsonl(pipeline / "teacher/metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert {"epoch", "train_loss", "val_top1", "val_top5", "lr", "seconds"} <= set(rows[0])
    model, info = load_checkpoint(pipeline / "teacher/best.pt")
    assert info["classes"] == CLASSES and info["num_classes"] == 3 and info["img_size"] == 16
    assert info["in_chans"] == 3 and len(info["mean"]) == 3 and info["arch"] == "vit_tiny_patch16_224"
    assert info["accuracy"] == info["val_top1"] == max(r["val_top1"] for r in rows)
    assert info["test_top1"] is None and info["selected_on"] == "val" and info["val_split"] is None


def test_score_table(pipeline, image_root):
    df, meta = read_table(pipeline / "scores.parquet")
    files = sorted(p.relative_to(image_root / "wild").as_posix() for p in (image_root / "wild").rglob("*")
                   if p.suffix.lower() in (".png", ".jpg", ".bmp"))
    assert sorted(df.path) == files and len(df) == 30  # notes.txt is not an image
    assert "shapes/deep/s1.PNG" in set(df.path)
    assert [c for c in df.columns if c.startswith("probe_")] == ["probe_0", "probe_1"]  # 1/3, 2/3 of depth 3
    # one row recomputed by hand: the teacher's prediction and -log max softmax
    model, info = load_checkpoint(pipeline / "teacher/best.pt")
    row = df.iloc[5]
    x = eval_transform(info)(load_image(image_root / "wild" / row.path, 3))[None]
    log_p = model(x).log_softmax(1)[0]
    assert row.pred == log_p.argmax().item()
    assert row.outlier == pytest.approx(-log_p.max().item(), abs=1e-5)
    assert 0 < df.probe_0.min() and df.probe_0.max() <= 1.0 + 1e-6
    assert meta["blocks"] == [0, 1] and meta["heads"] == "first"


def test_selection_outputs(pipeline):
    sel, _ = read_table(pipeline / "sel.parquet")
    summary = json.loads((pipeline / "sel.json").read_text())
    assert len(sel) == 20 and sel.score.is_monotonic_increasing
    assert summary["strategy"] == "attnprobe-rank"  # the default
    assert summary["num_select"] == 20 and summary["pool_size"] == 30
    assert sum(summary["pred_histogram"]) == 20 and sum(summary["class_weights"]) == pytest.approx(3)


def test_distill_outputs(pipeline):
    rows = read_jsonl(pipeline / "student/metrics.jsonl")
    assert len(rows) == 2
    assert {"epoch", "fidelity", "fidelity_n", "test_top1", "test_top5", "lr", "seconds", "kd", "noise",
            "probe"} <= set(rows[0])
    assert all(r["fidelity_n"] == 2 for r in rows)  # 10% of the 20 selected; the --per-class images are not held out
    model, info = load_checkpoint(pipeline / "student/best.pt")
    # chosen on fidelity, the test set only reported
    assert info["selected_on"] == "fidelity" and info["holdout"] == 2
    assert info["best_epoch"] == max(range(2), key=lambda e: (rows[e]["fidelity"], -e))
    assert (info["fidelity"], info["accuracy"]) == (rows[info["best_epoch"]]["fidelity"],
                                                    rows[info["best_epoch"]]["test_top1"])
    assert info["classes"] == CLASSES and info["img_size"] == 16  # geometry taken from the teacher
    teacher_info = load_checkpoint(pipeline / "teacher/best.pt")[1]
    assert info["mean"] == teacher_info["mean"] and info["std"] == teacher_info["std"]
    assert info["params"] < teacher_info["params"] / 3


def test_evaluate_json(pipeline, image_root, capsys):
    out = pipeline / "eval.json"
    assert main(["evaluate", "--model", str(pipeline / "teacher/best.pt"), "--data", str(image_root / "data"),
                 "--json", str(out), "--workers", "0", "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 24 and result["top1"] == pytest.approx(load_checkpoint(pipeline / "teacher/best.pt")[1]["accuracy"])
    assert "top-1" in capsys.readouterr().out


def expect_error(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_inputs(pipeline, image_root, tmp_path, capsys):
    t = str(pipeline / "teacher/best.pt")
    q = ["--workers", "0", "--no-progress"]
    expect_error(["score", "--teacher", t, "--wild", str(tmp_path / "nope"), "--out", str(tmp_path / "s.parquet"),
                  *q], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    expect_error(["score", "--teacher", t, "--wild", str(tmp_path / "empty"), "--out", str(tmp_path / "s.parquet"),
                  *q], capsys, "holds no images")
    (tmp_path / "junk.pt").write_text("junk")
    expect_error(["score", "--teacher", str(tmp_path / "junk.pt"), "--wild", str(image_root / "wild"),
                  "--out", str(tmp_path / "s.parquet"), *q], capsys, "not a readable attnprobe checkpoint")
    expect_error(["score", "--teacher", t, "--wild", str(image_root / "wild"), "--out", str(tmp_path / "s.parquet"),
                  "--blocks", "5", *q], capsys, "past the model's depth")
    assert not (tmp_path / "s.parquet").exists()
    for k in ("0", "31"):
        expect_error(["select", "--scores", str(pipeline / "scores.parquet"), "--num-select", k,
                      "--out", str(tmp_path / "sel.parquet")], capsys, "num-select")
    other = tmp_path / "other"
    for c in ("cat", "dog", "hbar"):
        (other / c).mkdir(parents=True)
    expect_error(["evaluate", "--model", t, "--data", str(other), *q], capsys, "not the model's")
    def distill(*extra, wild=image_root / "wild", test=image_root / "data/val", patch=4):
        return ["distill", "--teacher", t, "--wild", str(wild), "--selection", str(pipeline / "sel.parquet"),
                "--test", str(test), "--epochs", "1", "--out", str(tmp_path / "st"), "--student",
                "vit_tiny_patch16_224", "--model-kwargs", f"patch_size={patch}", "embed_dim=16", "depth=2",
                "num_heads=2", *q, *extra]
    convnext = distill()
    convnext[convnext.index("vit_tiny_patch16_224")] = "convnext_atto"
    del convnext[convnext.index("--model-kwargs"):convnext.index("num_heads=2") + 1]
    expect_error(convnext, capsys, "cannot take the teacher's 16x16 x3 input")
    expect_error(distill("--probe-blocks", "9"), capsys, "past the model's depth")
    expect_error(distill(test=other), capsys, "not the model's")
    expect_error(distill(wild=tmp_path / "elsewhere"), capsys, "does not exist")
    expect_error(distill(wild=image_root / "data/val"), capsys, "not under")
    assert not (tmp_path / "st" / "best.pt").exists()


def test_console_script_reports_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "attnprobe.cli", "evaluate", "--model", str(tmp_path / "x.pt"),
                           "--data", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"attnprobe evaluate: error: checkpoint {tmp_path / 'x.pt'} "
                                                "does not exist; pass the best.pt or last.pt of a run"]
