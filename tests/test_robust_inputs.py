"""Bad input files never end a run and never come out wrong: EXIF orientation is applied, every decode is
bounded by the size the file declares, unreadable images in labeled sets and in the distillation set are
skipped and reported in one line, hidden folders are neither classes nor pool images, and an unreadable
folder in the pool is listed among the skipped files."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from attnprobe.app.cli import main
from attnprobe.io.checkpoints import load_checkpoint
from attnprobe.io.datasets import split_holdout
from attnprobe.io.folders import PathList, class_folders
from attnprobe.io.images import (
    MAX_ASPECT,
    ImageSizeError,
    check_declared_size,
    load_image,
)
from attnprobe.io.tables import read_table

from .conftest import CLASSES, TINY_STUDENT, TINY_TEACHER, shape_image

COMMON = ["--workers", "0", "--no-progress"]


def kwargs_args(kwargs):
    return ["--model-kwargs", *[f"{k}={v}" for k, v in kwargs.items()]]


def skipped_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("skipped ")]


def corrupt(path, kind="garbage"):
    """A file that is not a readable image: random bytes, or a real PNG cut in half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        path.write_bytes(b"\x00not an image\xff" * 20)
    else:
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])


def read_skipped(out):
    with open(out.with_name(f"{out.stem}.skipped.csv"), newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.reader(f))
    return {p: r for p, r in rows[1:]}


# ---------------------------------------------------------------- the loader

def _halves(width=40, height=20) -> Image.Image:
    """Left half red, right half blue: every rotation and flip of it looks different."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, :width // 2] = (255, 0, 0)
    a[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(a)


@pytest.mark.parametrize("orientation,top,bottom", [(1, None, None), (6, "red", "blue"), (8, "blue", "red")])
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    _halves().save(path, quality=100, exif=exif.tobytes())
    img = load_image(path, 3)
    a = np.asarray(img, dtype=np.int64)
    if orientation == 1:
        assert img.size == (40, 20)
        return
    # 6: stored rotated 90 degrees counter-clockwise, shown turned clockwise: the stored left (red) on top
    assert img.size == (20, 40)
    colour = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    assert np.abs(a[:15].mean(axis=(0, 1)) - colour[top]).max() < 8
    assert np.abs(a[25:].mean(axis=(0, 1)) - colour[bottom]).max() < 8
    assert load_image(path, 1).size == (20, 40)  # the gray path too


def test_decode_bound_on_the_declared_size(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("L", (1, 200_000), 128).save(strip)  # tiny on disk, 1 x 200000 declared
    assert strip.stat().st_size < 5000
    with pytest.raises(ImageSizeError, match=r"declares 1 x 200000 px.*aspect ratio at most 100:1"):
        load_image(strip, 3)
    for size in [(MAX_ASPECT + 1, 1), (40_001, 1000), (0, 5)]:
        with pytest.raises(ImageSizeError):
            check_declared_size(size)
    for size in [(MAX_ASPECT, 1), (40_000, 1000), (1, 1)]:
        check_declared_size(size)
    # nothing is decoded: the guard runs on the header before load()
    calls = []
    real = Image.Image.load

    def spy(self):
        calls.append(self.size)
        return real(self)
    try:
        Image.Image.load = spy
        with pytest.raises(ImageSizeError):
            load_image(strip, 3)
    finally:
        Image.Image.load = real
    assert (1, 200_000) not in calls


# ---------------------------------------------------------------- the wild pool

def test_pool_skips_bounded_hidden_and_unlistable(image_root, teacher_ckpt, tmp_path, capsys, monkeypatch):
    wild = tmp_path / "wild"
    shutil.copytree(image_root / "wild" / "shapes", wild / "shapes")
    Image.new("L", (1, 200_000), 128).save(wild / "strip.png")
    (wild / ".ipynb_checkpoints").mkdir()
    shape_image(np.random.default_rng(1), "hbar").save(wild / ".ipynb_checkpoints" / "s0-checkpoint.png")
    corrupt(wild / "._s1.png")  # macOS AppleDouble: hidden, never listed
    (wild / "locked").mkdir()
    shape_image(np.random.default_rng(2), "vbar").save(wild / "locked" / "x.png")
    os.symlink("..", wild / "shapes" / "loop")  # a folder leading back above itself

    real_scandir = os.scandir

    def scandir(path="."):  # as chmod 000 would do (tests may run as root, where chmod does not block reads)
        if os.path.basename(os.path.normpath(os.fspath(path))) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)

    listed = list(PathList.from_dir(wild))
    assert not any(p.startswith(".") or "/." in p for p in listed)
    assert "locked/" in listed and "shapes/loop/" in listed
    out = tmp_path / "scores.parquet"
    assert main(["score", "--teacher", str(teacher_ckpt), "--wild", str(wild), "--out", str(out), *COMMON]) == 0
    assert "scored 18 images, skipped 3 unreadable" in capsys.readouterr().out
    df, _ = read_table(out)
    assert len(df) == 18 and "strip.png" not in set(df.path)
    skipped = read_skipped(out)
    assert set(skipped) == {"strip.png", "locked/", "shapes/loop/"}
    assert "declares 1 x 200000 px" in skipped["strip.png"]
    assert "Permission denied" in skipped["locked/"]
    assert "symlink loop" in skipped["shapes/loop/"]


def test_unlistable_pool_root_is_one_line(tmp_path, teacher_ckpt, capsys, monkeypatch):
    wild = tmp_path / "wild"
    wild.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.normpath(os.fspath(path)) == os.fspath(wild):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    assert main(["score", "--teacher", str(teacher_ckpt), "--wild", str(wild), "--out",
                 str(tmp_path / "s.parquet"), *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be listed (Permission denied)" in err[0]


# ---------------------------------------------------------------- labeled sets

@pytest.fixture(scope="module")
def dirty_data(image_root, tmp_path_factory):
    """The shapes data set with a corrupt image in train/ and in val/, hidden class folders and files."""
    root = tmp_path_factory.mktemp("dirty") / "data"
    shutil.copytree(image_root / "data", root)
    corrupt(root / "train" / "hbar" / "bad.png")
    shutil.copy(root / "val" / "square" / "0.png", root / "val" / "square" / "cut.png")
    corrupt(root / "val" / "square" / "cut.png", "truncate")
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
        shape_image(np.random.default_rng(3), "hbar").save(root / split / ".ipynb_checkpoints" / "0-checkpoint.png")
        corrupt(root / split / "vbar" / "._0.png")  # hidden file inside a class: never read
    return root


def test_class_folders_leave_hidden_out(dirty_data):
    assert class_folders(dirty_data / "train") == CLASSES


def test_train_teacher_skips_corrupt_and_hidden(dirty_data, tmp_path, capsys):
    arch, kw = TINY_TEACHER
    out = tmp_path / "teacher"
    assert main(["train-teacher", "--data", str(dirty_data), "--model", arch, *kwargs_args(kw), "--epochs", "2",
                 "--out", str(out), "--batch-size", "80", "--test", str(dirty_data / "val"), *COMMON]) == 0
    err = capsys.readouterr().err
    bad, cut = dirty_data / "train" / "hbar" / "bad.png", dirty_data / "val" / "square" / "cut.png"
    lines = skipped_lines(err)
    # once per run and set, not per epoch: the train set, then val (test is the same folder: its own loader)
    assert lines[0].startswith(f"skipped 1 unreadable image: {bad} (UnidentifiedImageError: ")
    assert lines[1:] == [lines[1]] * 2 and lines[1].startswith(f"skipped 1 unreadable image: {cut} (")
    assert "truncated" in lines[1]
    assert "Traceback" not in err
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["val_n"] == r["test_n"] == 3 * 8 for r in rows)  # 25 files, the cut one not counted
    _, info = load_checkpoint(out / "best.pt", "cpu")
    assert info["classes"] == CLASSES  # .ipynb_checkpoints is no class


def test_evaluate_skips_and_counts(dirty_data, teacher_ckpt, capsys, tmp_path):
    assert main(["evaluate", "--model", str(teacher_ckpt), "--data", str(dirty_data / "val"), *COMMON]) == 0
    captured = capsys.readouterr()
    assert "(n=24)" in captured.out  # 25 files, the cut one not counted
    assert len(skipped_lines(captured.err)) == 1 and "cut.png" in captured.err
    # a set of which nothing can be read is one line, exit 2
    broken = tmp_path / "broken"
    for c in CLASSES:
        corrupt(broken / c / "x.png")
    assert main(["evaluate", "--model", str(teacher_ckpt), "--data", str(broken), *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none of the 3 images could be read" in err[0]


# ---------------------------------------------------------------- distill: a selected file goes bad after select

@pytest.mark.parametrize("decoded", [True, False])
def test_distill_survives_files_corrupted_after_select(image_root, teacher_ckpt, tmp_path, capsys, decoded):
    wild = tmp_path / "wild"
    shutil.copytree(image_root / "wild", wild)
    scores, sel = tmp_path / "scores.parquet", tmp_path / "sel.parquet"
    assert main(["score", "--teacher", str(teacher_ckpt), "--wild", str(wild), "--out", str(scores), *COMMON]) == 0
    assert main(["select", "--scores", str(scores), "--num-select", "20", "--out", str(sel)]) == 0
    paths = read_table(sel)[0].path.tolist()
    train, held = split_holdout([os.path.join(wild, p) for p in paths], 0.2, 0)
    corrupt(type(wild)(train[0]), "truncate")
    corrupt(type(wild)(held[0]))
    capsys.readouterr()
    s_arch, s_kw = TINY_STUDENT
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher_ckpt), "--wild", str(wild), "--selection", str(sel),
                 "--student", s_arch, *kwargs_args(s_kw), "--epochs", "2", "--holdout", "0.2", "--out", str(out),
                 "--batch-size", "8", *COMMON, *([] if decoded else ["--no-decode-cache"])]) == 0
    lines = skipped_lines(capsys.readouterr().err)
    if decoded:  # decoded once, both listed in one line
        assert len(lines) == 1 and lines[0].startswith("skipped 2 unreadable images: ")
        assert f"{train[0]} (" in lines[0] and f"{held[0]} (" in lines[0]
    else:  # once per run: the training set's file, the held-out file
        assert len(lines) == 2
        assert any(line.startswith(f"skipped 1 unreadable image: {train[0]} (") for line in lines)
        assert any(line.startswith(f"skipped 1 unreadable image: {held[0]} (") for line in lines)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["fidelity_n"] == len(held) - 1 for r in rows)
    assert (out / "best.pt").is_file()
