"""Equal compute: `distill --steps N` trains for exactly N optimizer steps, whatever the selection's size
(the epochs are as many as that takes, the last one cut short)."""
import json

import pandas as pd
import pytest

import attnprobe
from attnprobe.app.cli import main
from attnprobe.io.checkpoints import read_checkpoint
from attnprobe.io.tables import write_table
from attnprobe.training.loop import batches_per_epoch

from .conftest import TINY_STUDENT

pytestmark = pytest.mark.usefixtures("one_thread")


def wild_selection(image_root, tmp_path, n):
    wild = image_root / "wild"
    paths = sorted(p.relative_to(wild).as_posix() for p in wild.rglob("*") if p.suffix.lower() in (".png", ".bmp"))
    write_table(pd.DataFrame({"path": paths[:n]}), tmp_path / f"sel{n}.parquet", {})
    return tmp_path / f"sel{n}.parquet"


def test_batches_per_epoch_matches_the_loader():
    assert batches_per_epoch(21, 8) == 2  # the short last batch is dropped
    assert batches_per_epoch(24, 8) == 3
    assert batches_per_epoch(5, 8) == 1  # ... unless it is the only one


@pytest.mark.parametrize("n,epochs", [(10, 5), (18, 3)])  # 9 or 16 trained images: 1 or 2 batches of 8 per epoch
def test_steps_are_the_same_for_selections_of_any_size(image_root, teacher_ckpt, tmp_path, n, epochs):
    arch, kwargs = TINY_STUDENT
    out = tmp_path / "run"
    info = attnprobe.distill(teacher_ckpt, image_root / "wild", wild_selection(image_root, tmp_path, n), out=out,
                             student=arch, model_kwargs=kwargs, steps=5, batch_size=8, holdout=0.1, workers=0,
                             progress=False, teacher_acc=0.9)
    assert (info["steps"], info["epochs"]) == (5, epochs)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == epochs
    optimizer = read_checkpoint(out / "last.pt")["optimizer"]["state"]
    assert {int(s["step"]) for s in optimizer.values()} == {5}  # AdamW stepped 5 times, not epochs * batches


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "2", "--steps", "5"], "give one of them, not both"),
    ([], "--epochs N or for --steps N"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
])
def test_epochs_or_steps_one_line(image_root, teacher_ckpt, tmp_path, capsys, flags, message):
    sel = wild_selection(image_root, tmp_path, 10)
    code = main(["distill", "--teacher", str(teacher_ckpt), "--wild", str(image_root / "wild"), "--selection", str(sel),
                 "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()
