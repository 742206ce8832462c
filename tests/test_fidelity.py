"""Model selection without labels: the student's epoch is chosen on fidelity (top-1 agreement with the teacher
on a held-out part of the selection), the teacher's on a validation split; a test set is only reported."""
import json
import os
import re

import pandas as pd
import pytest
import torch

import attnprobe
from attnprobe import load_checkpoint
from attnprobe.app.cli import main
from attnprobe.errors import AttnprobeError
from attnprobe.io.checkpoints import read_checkpoint
from attnprobe.io.datasets import (
    HOLDOUT_MAX,
    holdout_count,
    labeled_folder,
    split_holdout,
    stratified_split,
)
from attnprobe.io.images import eval_transform, load_image
from attnprobe.io.tables import write_table
from attnprobe.stages import distill_data as distillation
from attnprobe.training import loop as train_mod

from .conftest import CLASSES, TINY_STUDENT, TINY_TEACHER

pytestmark = pytest.mark.usefixtures("one_thread")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def first_argmax(rows, key):
    return max(range(len(rows)), key=lambda e: (rows[e][key], -e))


@pytest.fixture(scope="module")
def selection(image_root, tmp_path_factory):
    """Every wild image once (30)."""
    wild = image_root / "wild"
    paths = sorted(p.relative_to(wild).as_posix() for p in wild.rglob("*")
                   if p.suffix.lower() in (".png", ".jpg", ".bmp"))
    out = tmp_path_factory.mktemp("sel") / "sel.parquet"
    write_table(pd.DataFrame({"path": paths}), out, {})
    return out, paths


def run_distill(image_root, teacher_ckpt, sel, out, **kw):
    arch, kwargs = TINY_STUDENT
    kw = {"epochs": 3, "batch_size": 8, "lr": 3e-3, "workers": 0, "progress": False, **kw}
    return attnprobe.distill(teacher_ckpt, image_root / "wild", sel, student=arch, model_kwargs=kwargs, out=out, **kw)


@pytest.fixture(scope="module")
def with_test(image_root, teacher_ckpt, selection, tmp_path_factory):
    out = tmp_path_factory.mktemp("fid") / "run"
    info = run_distill(image_root, teacher_ckpt, selection[0], out, test=image_root / "data/val", holdout=0.3,
                       resize="stretch", seed=5)
    return out, info


def test_fidelity_is_agreement_with_the_teacher_on_the_holdout(with_test, image_root, teacher_ckpt, selection):
    out, info = with_test
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(r["fidelity_n"] == 9 and r["test_n"] == 24 for r in rows)  # 30% of 30; every val image
    student, s_info = load_checkpoint(out / "best.pt")
    teacher, t_info = load_checkpoint(teacher_ckpt)
    # by hand: the held-out images loaded independently, seen as the teacher sees them (stretched here)
    _, held = split_holdout([os.path.join(image_root / "wild", p) for p in selection[1]], 0.3, 5)
    assert len(held) == 9
    x = torch.stack([eval_transform(t_info, resize="stretch")(load_image(p, 3)) for p in held])
    with torch.no_grad():
        agree = (student(x).argmax(1) == teacher(x).argmax(1)).sum().item() / len(held)
    assert s_info["fidelity"] == agree
    # best.pt is the best-fidelity epoch; its test top-1 is recorded, not used
    best = first_argmax(rows, "fidelity")
    assert s_info["best_epoch"] == s_info["epoch"] == best == info["best_epoch"]
    assert s_info["selected_on"] == "fidelity" and s_info["holdout"] == 9
    assert s_info["fidelity"] == rows[best]["fidelity"] and s_info["accuracy"] == rows[best]["test_top1"]
    assert {k: info[k] for k in ("fidelity", "accuracy", "holdout", "selected_on")} == \
        {k: s_info[k] for k in ("fidelity", "accuracy", "holdout", "selected_on")}
    last = load_checkpoint(out / "last.pt")[1]
    assert last["epoch"] == 2 and last["best_epoch"] == best


def scripted(monkeypatch, fidelities, tests):
    """Fidelity and test top-1 of each epoch as given (the training itself is real)."""
    from attnprobe.training.engine import evaluate as real_evaluate
    from attnprobe.training.engine import fidelity as real_fidelity
    f_iter, t_iter = iter(fidelities), iter(tests)

    def fake_fidelity(*a, **k):
        return {**real_fidelity(*a, **k), "fidelity": next(f_iter)}

    def fake_evaluate(*a, **k):
        return {**real_evaluate(*a, **k), "top1": next(t_iter)}
    monkeypatch.setattr(distillation, "fidelity", fake_fidelity)
    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)


@pytest.mark.parametrize("select_on, best", [("fidelity", 1), ("test", 0)])
def test_choice_follows_fidelity_unless_test_is_asked(image_root, teacher_ckpt, selection, tmp_path, monkeypatch,
                                                      select_on, best):
    """Best test top-1 at epoch 0, best fidelity at epoch 1: the choice follows --select-on."""
    scripted(monkeypatch, [0.5, 0.9, 0.7], [0.9, 0.5, 0.7])
    info = run_distill(image_root, teacher_ckpt, selection[0], tmp_path, test=image_root / "data/val",
                       select_on=select_on)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["fidelity"] for r in rows] == [0.5, 0.9, 0.7] and [r["test_top1"] for r in rows] == [0.9, 0.5, 0.7]
    saved = load_checkpoint(tmp_path / "best.pt")[1]
    assert saved["best_epoch"] == saved["epoch"] == info["best_epoch"] == best
    assert saved["selected_on"] == select_on
    assert (saved["fidelity"], saved["accuracy"]) == (rows[best]["fidelity"], rows[best]["test_top1"])
    assert not torch.equal(*(torch.cat([v.flatten() for v in read_checkpoint(tmp_path / f)["model"].values()])
                             for f in ("best.pt", "last.pt")))


def test_resumed_best_is_found_on_the_same_criterion(image_root, teacher_ckpt, selection, tmp_path, monkeypatch):
    """Epoch 0 has the best test top-1, epoch 1 the best fidelity; resumed after epoch 1, epoch 2 (fidelity 0.7)
    must not replace best.pt."""
    scripted(monkeypatch, [0.5, 0.9], [0.9, 0.5])
    # the step schedule: a finished run may be extended (a cosine run must keep its --epochs)
    run_distill(image_root, teacher_ckpt, selection[0], tmp_path, test=image_root / "data/val", epochs=2,
                schedule="step")
    scripted(monkeypatch, [0.7], [0.95])
    info = run_distill(image_root, teacher_ckpt, selection[0], tmp_path, test=image_root / "data/val", epochs=3,
                       resume=tmp_path / "last.pt", schedule="step")
    assert info["best_epoch"] == 1 and load_checkpoint(tmp_path / "best.pt")[1]["best_epoch"] == 1
    with pytest.raises(AttnprobeError, match="--select-on"):
        run_distill(image_root, teacher_ckpt, selection[0], tmp_path, test=image_root / "data/val", epochs=4,
                    resume=tmp_path / "last.pt", select_on="test", schedule="step")
    with pytest.raises(AttnprobeError, match="--holdout"):
        run_distill(image_root, teacher_ckpt, selection[0], tmp_path, epochs=4, resume=tmp_path / "last.pt",
                    holdout=5, schedule="step")


def test_without_test_set_through_the_cli(image_root, teacher_ckpt, selection, tmp_path, capsys):
    arch, kw = TINY_STUDENT
    argv = ["distill", "--teacher", str(teacher_ckpt), "--wild", str(image_root / "wild"), "--selection",
            str(selection[0]), "--student", arch, "--model-kwargs", *[f"{k}={v}" for k, v in kw.items()],
            "--epochs", "2", "--batch-size", "8", "--workers", "0", "--no-progress", "--holdout", "6"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"student: epoch [12] of 2 chosen on fidelity [01]\.\d{4} -> " + re.escape(f"{tmp_path}/a/best.pt"),
                        out), out
    rows = read_jsonl(tmp_path / "a/metrics.jsonl")
    assert all("test_top1" not in r and r["fidelity_n"] == 6 for r in rows)
    info = load_checkpoint(tmp_path / "a/best.pt")[1]
    assert info["accuracy"] is None and info["holdout"] == 6 and info["best_epoch"] == first_argmax(rows, "fidelity")
    # with a test set: measured, named as not used; --select-on test: named optimistic
    assert main([*argv, "--out", str(tmp_path / "b"), "--test", str(image_root / "data/val")]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"student: epoch [12] of 2 chosen on fidelity [01]\.\d{4} \(test top-1 [01]\.\d{4}, "
                        r"not used to choose\) -> .*/best.pt", out), out
    assert main([*argv, "--out", str(tmp_path / "c"), "--test", str(image_root / "data/val"),
                 "--select-on", "test"]) == 0
    assert "chosen on test top-1" in capsys.readouterr().out and "optimistic" in distill_help()


def distill_help():
    from attnprobe.app.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["distill"].format_help().replace("\n", " ")


def test_holdout_split_is_seeded_disjoint_and_held_out_of_training(image_root, teacher_ckpt, selection, tmp_path,
                                                                   monkeypatch):
    paths = [f"p{i}.png" for i in range(50)]
    train, held = split_holdout(paths, 0.1, 3)
    assert len(held) == 5 and not set(train) & set(held) and sorted(train + held) == sorted(paths)
    assert split_holdout(paths, 0.1, 3) == (train, held) and split_holdout(paths, 0.1, 4)[1] != held
    assert held == [p for p in paths if p in held]  # kept in the selection's order
    assert len(split_holdout(paths, 7, 3)[1]) == 7 and split_holdout(paths, 7.0, 3) == split_holdout(paths, 7, 3)
    train2, held2 = split_holdout(paths + paths[:10], 0.1, 3)  # a repeated path is held out with all its rows
    assert not set(train2) & set(held2) and len(held2) == 5
    assert holdout_count(0.1, 10 ** 6) == HOLDOUT_MAX == 10_000 and holdout_count(0.001, 100) == 1
    for bad in (0, -1, 0.0, 1.5, True, "0.1", float("nan")):
        with pytest.raises(AttnprobeError, match="--holdout"):
            holdout_count(bad, 100)
    with pytest.raises(AttnprobeError, match="leaves none"):
        holdout_count(100, 100)
    # in a run: the held-out images are the same in two runs, not trained on; the --per-class images never held
    made = []
    real = distillation.ImageList

    def spy(paths, *a, **k):
        made.append(list(paths))
        return real(paths, *a, **k)
    monkeypatch.setattr(distillation, "ImageList", spy)
    for name in ("a", "b"):
        run_distill(image_root, teacher_ckpt, selection[0], tmp_path / name, epochs=1, labeled=image_root / "data",
                    per_class=2, no_decode_cache=True)  # the same split on the decoded path: test_decoded_distill.py
    (wild_a, mixed_a, held_a), (wild_b, mixed_b, held_b) = made[:3], made[3:]
    assert (wild_a, mixed_a, held_a) == (wild_b, mixed_b, held_b)
    assert len(held_a) == 3 and len(wild_a) == 27 and len(mixed_a) == 6
    assert not set(held_a) & (set(wild_a) | set(mixed_a))
    assert all(str(image_root / "data" / "train") in p for p in mixed_a)
    selected = {os.path.join(image_root / "wild", p) for p in selection[1]}
    assert set(held_a) | set(wild_a) == selected


@pytest.fixture(scope="module")
def train_only(image_root, tmp_path_factory):
    """An ImageFolder root with train/ and no val/."""
    root = tmp_path_factory.mktemp("trainonly")
    os.symlink(image_root / "data/train", root / "train")
    return root


def test_train_teacher_val_split(image_root, train_only, tmp_path):
    arch, kw = TINY_TEACHER
    info = attnprobe.train_teacher(train_only, model=arch, model_kwargs=kw, epochs=2, out=tmp_path / "t", batch_size=16,
                                   lr=2e-3, workers=0, progress=False, seed=1, val_split=0.25, test=image_root / "data/val")
    rows = read_jsonl(tmp_path / "t/metrics.jsonl")
    assert all(r["val_n"] == 18 and r["test_n"] == 24 for r in rows)  # 6 of each class's 24; every test image
    saved = load_checkpoint(tmp_path / "t/best.pt")
    best = first_argmax(rows, "val_top1")
    assert saved[1]["best_epoch"] == info["best_epoch"] == best and saved[1]["selected_on"] == "val"
    assert saved[1]["accuracy"] == saved[1]["val_top1"] == rows[best]["val_top1"]
    assert saved[1]["test_top1"] == rows[best]["test_top1"] and saved[1]["val_split"] == 0.25
    # the split: stratified, disjoint, seeded; val_top1 recomputed by hand on it
    ds = labeled_folder(train_only / "train", CLASSES, None, 3)
    train_idx, val_idx = stratified_split(ds.targets, 0.25, 1)
    assert stratified_split(ds.targets, 0.25, 1) == (train_idx, val_idx)
    assert stratified_split(ds.targets, 0.25, 2)[1] != val_idx
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == len(ds)
    assert [sum(ds.targets[i] == c for i in val_idx) for c in range(3)] == [6, 6, 6]
    model, t_info = saved
    x = torch.stack([eval_transform(t_info)(load_image(ds.samples[i][0], 3)) for i in val_idx])
    with torch.no_grad():
        hits = (model(x).argmax(1) == torch.tensor([ds.targets[i] for i in val_idx])).float().mean().item()
    assert saved[1]["val_top1"] == pytest.approx(hits)
    assert len(stratified_split([0, 0, 1, 1, 1, 2], 0.1, 0)[1]) == 2  # one per class of two or more images
    assert stratified_split([0, 1, 1], 0.5, 0)[1] in ([1], [2])
    with pytest.raises(AttnprobeError, match="takes no image"):
        stratified_split([0, 1, 2], 0.5, 0)


def expect_error(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_inputs(image_root, teacher_ckpt, selection, train_only, tmp_path, capsys):
    q = ["--workers", "0", "--no-progress", "--epochs", "1"]
    arch, kw = TINY_STUDENT
    distill = ["distill", "--teacher", str(teacher_ckpt), "--wild", str(image_root / "wild"), "--selection",
               str(selection[0]), "--student", arch, "--model-kwargs", *[f"{k}={v}" for k, v in kw.items()],
               "--out", str(tmp_path / "st"), *q]
    for holdout, match in (("0", "--holdout 0.0: must be a fraction"), ("-0.2", "must be a fraction"),
                           ("1.5", "or a whole number"), ("30", "leaves none to train on")):
        expect_error([*distill, "--holdout", holdout], capsys, match)
    expect_error([*distill, "--select-on", "test"], capsys, "needs --test")
    assert not (tmp_path / "st").exists()
    t_arch, t_kw = TINY_TEACHER
    teacher = ["train-teacher", "--model", t_arch, "--model-kwargs", *[f"{k}={v}" for k, v in t_kw.items()],
               "--out", str(tmp_path / "t"), *q]
    for split in ("0", "1", "1.5", "-0.1"):
        expect_error([*teacher, "--data", str(train_only), "--val-split", split], capsys, "must be a fraction in (0, 1)")
    expect_error([*teacher, "--data", str(image_root / "data"), "--val-split", "0.1"], capsys, "use one or the other")
    expect_error([*teacher, "--data", str(train_only)], capsys, "--val-split")
    assert not (tmp_path / "t").exists()


def escaping_pool(image_root, tmp_path):
    """A pool of four wild images, a file beside it, a symlink inside it to that file and one to a folder outside."""
    pool, outside = tmp_path / "pool", tmp_path / "outside"
    pool.mkdir()
    outside.mkdir()
    images = sorted(p for p in (image_root / "wild").rglob("*.png"))[:4]
    for i, src in enumerate(images):
        (pool / f"{i}.png").write_bytes(src.read_bytes())
    (tmp_path / "outside.png").write_bytes(images[0].read_bytes())
    (outside / "x.png").write_bytes(images[0].read_bytes())
    os.symlink(tmp_path / "outside.png", pool / "link.png")
    os.symlink(outside, pool / "linkdir")
    return pool, [f"{i}.png" for i in range(4)]


@pytest.mark.parametrize("escape", ["../outside.png", "ABSOLUTE", "./../pool/../outside.png", "linkdir/../../outside.png"])
def test_selected_paths_outside_the_pool_are_refused(image_root, teacher_ckpt, tmp_path, capsys, escape):
    pool, inside = escaping_pool(image_root, tmp_path)
    escape = str(tmp_path / "outside.png") if escape == "ABSOLUTE" else escape
    sel = tmp_path / "sel.parquet"
    write_table(pd.DataFrame({"path": inside + [escape]}), sel, {})
    arch, kw = TINY_STUDENT
    expect_error(["distill", "--teacher", str(teacher_ckpt), "--wild", str(pool), "--selection", str(sel),
                  "--student", arch, "--model-kwargs", *[f"{k}={v}" for k, v in kw.items()], "--epochs", "1",
                  "--workers", "0", "--no-progress", "--teacher-acc", "0.9", "--out", str(tmp_path / "run")],
                 capsys, f"1 selected paths point outside --wild {pool} (e.g. {escape})")
    assert not (tmp_path / "run").exists()


def test_links_inside_the_pool_are_members(image_root, teacher_ckpt, tmp_path):
    """A pool of links to images kept elsewhere (score follows them too): the links are selected and trained on."""
    pool, inside = escaping_pool(image_root, tmp_path)
    sel = tmp_path / "sel.parquet"
    write_table(pd.DataFrame({"path": inside + ["link.png", "linkdir/x.png"]}), sel, {})
    arch, kw = TINY_STUDENT
    info = attnprobe.distill(teacher_ckpt, pool, sel, out=tmp_path / "run", student=arch, model_kwargs=kw, epochs=1,
                             workers=0, progress=False, teacher_acc=0.9, holdout=2, batch_size=4)
    assert info["holdout"] == 2 and (tmp_path / "run" / "best.pt").is_file()


def test_damaged_selection_summary_is_one_line(image_root, teacher_ckpt, selection, tmp_path, capsys):
    sel = tmp_path / "sel.parquet"
    write_table(pd.DataFrame({"path": selection[1]}), sel, {})
    (tmp_path / "sel.json").write_text('{"class_weights": [1.0, 1.0')  # cut short while being written
    arch, kw = TINY_STUDENT
    expect_error(["distill", "--teacher", str(teacher_ckpt), "--wild", str(image_root / "wild"), "--selection", str(sel),
                  "--student", arch, "--model-kwargs", *[f"{k}={v}" for k, v in kw.items()], "--epochs", "1",
                  "--workers", "0", "--no-progress", "--robust", "--out", str(tmp_path / "run")],
                 capsys, f"{tmp_path / 'sel.json'}: the selection's summary is damaged (not JSON")
    assert not (tmp_path / "run").exists()
