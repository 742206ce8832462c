"""Issue 11, outputs: every output checked before any work starts, run folders never silently replaced, one
writer per score table, environmental errors as one line, modes as any new file, a UTF-8 skipped list.

Each refusal: exit status 2, exactly one line on stderr with the key words, and no file changed, lost or
left half-written (the folder's files, bytes and mtimes are the same before and after)."""
from __future__ import annotations

import errno
import importlib
import os
import shutil
import stat
import subprocess
import sys

import pandas as pd
import pytest

from attnprobe.app import cli, commands
from attnprobe.errors import AttnprobeError

from .conftest import TINY_STUDENT


def snapshot(*folders) -> dict:
    files = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            for name in names + dirs:
                p = os.path.join(root, name)
                st = os.lstat(p)
                files[p] = (st.st_mtime_ns, st.st_mode, open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None)
    return files


def messages(err: str) -> list[str]:
    """The command's own lines on stderr (per-epoch progress lines aside)."""
    lines = [line for line in err.strip().splitlines() if line.startswith("attnprobe ")]
    assert lines and err.strip().splitlines()[-1] == lines[-1], err
    return lines


def refused(capsys, argv, *words, folders=()) -> str:
    before = snapshot(*folders)
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = messages(err)
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert snapshot(*folders) == before
    return lines[0]


@pytest.fixture(scope="module")
def scored(image_root, teacher_ckpt, tmp_path_factory):
    """A score table and a selection of it, made once."""
    d = tmp_path_factory.mktemp("scored")
    assert cli.main(["score", "--teacher", str(teacher_ckpt), "--wild", str(image_root / "wild"), "--out",
                     str(d / "scores.parquet"), "--workers", "0", "--no-progress"]) == 0
    assert cli.main(["select", "--scores", str(d / "scores.parquet"), "--num-select", "12", "--out",
                     str(d / "sel.parquet")]) == 0
    return d


def _score(teacher_ckpt, image_root, out, *extra):
    return ["score", "--teacher", teacher_ckpt, "--wild", image_root / "wild", "--out", out, "--workers", "0",
            "--no-progress", *extra]


def _distill(teacher_ckpt, image_root, scored, out, *extra):
    arch, kw = TINY_STUDENT
    return ["distill", "--teacher", teacher_ckpt, "--wild", image_root / "wild", "--selection", scored / "sel.parquet",
            "--out", out, "--student", arch, "--model-kwargs", *[f"{k}={v}" for k, v in kw.items()], "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--no-progress", *extra]


def _teacher(image_root, out, *extra):
    return ["train-teacher", "--data", image_root / "data", "--out", out, "--model", "vit_tiny_patch16_224",
            "--model-kwargs", "img_size=16", "patch_size=4", "embed_dim=16", "depth=1", "num_heads=2",
            "--epochs", "2", "--batch-size", "16", "--workers", "0", "--no-progress", *extra]


# ---- 1. outputs checked before any work starts -------------------------------------------------------

def test_bad_outputs_are_refused_before_any_work(image_root, teacher_ckpt, scored, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    (tmp_path / "folder").mkdir()
    keep = (tmp_path, scored)
    sc = scored / "scores.parquet"
    cases = [
        (_score(teacher_ckpt, image_root, tmp_path / "folder"), ("is a folder", "--out")),
        (_score(teacher_ckpt, image_root, ""), ("--out is empty",)),
        (_score(teacher_ckpt, image_root, a_file / "x.parquet"), ("is a file", "nothing can be written under it")),
        (_score(teacher_ckpt, image_root, tmp_path / "scores.csv"), ("must end in .parquet",)),
        (["select", "--scores", sc, "--num-select", "3", "--out", tmp_path / "x.json"], ("must end in .parquet",)),
        (["select", "--scores", sc, "--num-select", "3", "--out", sc], ("is also --scores",)),
        (["select", "--scores", sc, "--num-select", "3", "--out", a_file], ("must end in .parquet",)),
        (["select", "--scores", sc, "--num-select", "3", "--out", tmp_path / "folder"], ("is a folder",)),
        (_teacher(image_root, a_file), ("is a file", "pass a folder")),
        (_teacher(image_root, ""), ("--out is empty",)),
        (_distill(teacher_ckpt, image_root, scored, a_file / "run"), ("is a file", "under it")),
        (_distill(teacher_ckpt, image_root, scored, teacher_ckpt.parent), ("would replace --teacher",)),
        (["run", "--teacher", teacher_ckpt, "--wild", image_root / "wild", "--out", a_file, "--num-select", "3",
          "--epochs", "1"], ("is a file",)),
        (["run", "--teacher", teacher_ckpt, "--wild", image_root / "wild", "--out", image_root / "wild",
          "--num-select", "3", "--epochs", "1"], ("is also --wild",)),
        (["evaluate", "--model", teacher_ckpt, "--data", image_root / "data", "--json", tmp_path / "folder"],
         ("--json", "is a folder")),
        (["evaluate", "--model", teacher_ckpt, "--data", image_root / "data", "--json", a_file / "e.json"],
         ("--json", "is a file")),
        (["import-teacher", teacher_ckpt, "--out", tmp_path / "folder"], ("is a folder",)),
        (["import-teacher", teacher_ckpt, "--out", teacher_ckpt], ("is also source",)),
        (["export", teacher_ckpt, "--format", "onnx", "--out", a_file / "m.onnx"], ("is a file",)),
    ]
    for argv, words in cases:
        refused(capsys, argv, *words, folders=keep)


def test_unwritable_folder_is_refused(image_root, teacher_ckpt, scored, tmp_path, capsys, monkeypatch):
    from attnprobe.io import outputs
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)  # as a read-only folder (root may write all)
    refused(capsys, _score(teacher_ckpt, image_root, tmp_path / "s.parquet"), "not writable", str(tmp_path),
            folders=(tmp_path,))
    refused(capsys, _teacher(image_root, tmp_path / "run"), "not writable", folders=(tmp_path,))


def test_evaluate_json_creates_its_folder(image_root, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "eval.json"
    assert cli.main(["evaluate", "--model", str(teacher_ckpt), "--data", str(image_root / "data"), "--json", str(out),
                     "--workers", "0", "--no-progress"]) == 0
    assert '"top1"' in out.read_text()


# ---- 2. a run folder that holds a run ---------------------------------------------------------------

def test_run_folder_with_a_run_is_refused_unless_resume_or_overwrite(image_root, teacher_ckpt, scored, tmp_path,
                                                                     capsys):
    run = tmp_path / "run"
    assert cli.main([str(a) for a in _teacher(image_root, run, "--epochs", "1")]) == 0
    refused(capsys, _teacher(image_root, run), "already holds a run", "--resume", "--overwrite", folders=(tmp_path,))
    refused(capsys, _distill(teacher_ckpt, image_root, scored, run), "already holds a run", "--overwrite",
            folders=(tmp_path,))
    refused(capsys, _teacher(image_root, run, "--resume", run / "last.pt", "--overwrite"), "pass one of them",
            folders=(tmp_path,))
    before = (run / "best.pt").read_bytes()
    assert cli.main([str(a) for a in _teacher(image_root, run, "--overwrite")]) == 0  # starts over: 2 epochs
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "best.pt").read_bytes() != before
    with pytest.raises(AttnprobeError, match="already holds a run"):  # the class itself, for direct callers
        from attnprobe.training.loop import RunDir
        RunDir(run)


# ---- 3. one writer per score table ------------------------------------------------------------------

HOLD = """
import sys, time
from attnprobe.io.lock import hold
lock = hold(sys.argv[1], "holder", "")
print("held", flush=True)
time.sleep(120)
"""


def test_second_score_on_the_same_out_is_refused(image_root, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "s.parquet"
    parts = tmp_path / "s.parquet.parts"
    parts.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(parts / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # as a running `score` holds it
        refused(capsys, _score(teacher_ckpt, image_root, out), "another `attnprobe score`", "is running", str(out),
                f"pid {holder.pid}", folders=(tmp_path,))
    finally:
        holder.kill()  # released: the same command now runs
        holder.wait()
    assert cli.main([str(a) for a in _score(teacher_ckpt, image_root, out)]) == 0
    assert out.is_file() and not parts.exists()


# ---- 4. environmental errors: one line, what is kept, how to continue --------------------------------

def test_full_disk_while_scoring_keeps_parts_and_rerun_continues(image_root, teacher_ckpt, tmp_path, capsys,
                                                                 monkeypatch):
    score_parts = importlib.import_module("attnprobe.stages.score_parts")
    real, calls = score_parts.write_part, []

    def write_part(parts, c, table, skipped, marker=None):
        calls.append(c)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(score_parts.part_path(parts, c)))
        real(parts, c, table, skipped, marker)
    monkeypatch.setattr(score_parts, "write_part", write_part)
    out = tmp_path / "s.parquet"
    line = refused(capsys, _score(teacher_ckpt, image_root, out, "--chunk-size", "8"), "No space left on device",
                   "000001.parquet", "free some space", "kept in", "rerun the same command")
    assert line.startswith("attnprobe score: error:")
    assert sorted(p.name for p in (tmp_path / "s.parquet.parts").glob("*.parquet")) == ["000000.parquet"]
    monkeypatch.setattr(score_parts, "write_part", real)
    assert cli.main([str(a) for a in _score(teacher_ckpt, image_root, out, "--chunk-size", "8")]) == 0
    assert out.is_file()


def test_full_disk_while_training_says_resume(image_root, tmp_path, capsys, monkeypatch):
    from attnprobe.io import checkpoints as models
    real, saves = models.torch.save, []

    def save(obj, f, *a, **k):
        saves.append(f)
        if len(saves) == 3:  # epoch 1's best.pt: epoch 0's checkpoints are on disk
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name
        return real(obj, f, *a, **k)
    monkeypatch.setattr(models.torch, "save", save)
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli.main([str(a) for a in _teacher(image_root, run)]) == 2
    lines = messages(capsys.readouterr().err)
    assert len(lines) == 1 and "No space left on device" in lines[0] and str(run) in lines[0]
    assert f"--resume {run / 'last.pt'}" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]  # no temp file left
    monkeypatch.setattr(models.torch, "save", real)
    models.read_checkpoint(run / "best.pt")  # whole


def test_other_errors_keep_their_traceback(image_root, teacher_ckpt, tmp_path, monkeypatch):
    score_parts = importlib.import_module("attnprobe.stages.score_parts")

    def broken(*a, **k):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(score_parts, "write_part", broken)
    with pytest.raises(OSError, match="Input/output"):
        cli.main([str(a) for a in _score(teacher_ckpt, image_root, tmp_path / "s.parquet")])

    def bug(*a, **k):
        raise ValueError("a bug")
    monkeypatch.setattr(score_parts, "write_part", bug)
    with pytest.raises(ValueError):
        cli.main([str(a) for a in _score(teacher_ckpt, image_root, tmp_path / "s.parquet")])


def test_interrupted_says_how_to_continue(image_root, teacher_ckpt, tmp_path, capsys, monkeypatch):
    score_parts = importlib.import_module("attnprobe.stages.score_parts")

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(score_parts, "write_part", interrupt)
    capsys.readouterr()
    assert cli.main([str(a) for a in _score(teacher_ckpt, image_root, tmp_path / "s.parquet")]) == 130
    err = messages(capsys.readouterr().err)
    assert len(err) == 1 and "interrupted" in err[0] and "rerun the same command" in err[0]
    args = cli.build_parser().parse_args([str(a) for a in _teacher(tmp_path / "d", tmp_path / "run")])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    assert f"--resume {tmp_path / 'run' / 'last.pt'}" in commands.how_to_continue(args)


# ---- 6. modes honour the umask; 7. the skipped list is UTF-8 ------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_honour_the_umask(scored, tmp_path, umask):
    from attnprobe import api
    from attnprobe.io.atomic import write_text
    from attnprobe.io.checkpoints import atomic_save
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.json", "{}\n")
        atomic_save({"x": 1}, tmp_path / "b.pt")
        api.select(scored / "scores.parquet", out=tmp_path / "sel.parquet", num_select=3)
    finally:
        os.umask(old)
    for name in ("a.json", "b.pt", "sel.parquet", "sel.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


def test_skipped_list_is_utf8_with_escapes(image_root, teacher_ckpt, tmp_path):
    wild = tmp_path / "wild"
    shutil.copytree(image_root / "wild" / "shapes", wild)
    with open(os.path.join(os.fsencode(wild), b"caf\xe9.jpg"), "wb") as f:
        f.write(b"not an image")
    assert cli.main(["score", "--teacher", str(teacher_ckpt), "--wild", str(wild), "--out",
                     str(tmp_path / "s.parquet"), "--workers", "0", "--no-progress"]) == 0
    skipped = pd.read_csv(tmp_path / "s.skipped.csv")
    assert "caf\\xe9.jpg" in skipped["path"].tolist()


# ---- 5. under torchrun: rank 0's line once, exit 2 on every rank -------------------------------------

def test_torchrun_bad_input_one_line_every_rank_exits_2(teacher_ckpt, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "attnprobe.cli",
                        "score", "--teacher", str(teacher_ckpt), "--wild", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "s.parquet"), "--device", "cpu", "--workers", "0"],
                       capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("attnprobe score: error:")]
    assert len(lines) == 1 and str(tmp_path / "missing") in lines[0], r.stderr
    # torchrun's own summary: both ranks exited 2 (none killed by a signal), rank 0 the root cause
    assert r.stderr.count("exitcode  : 2 ") == 2 and "SIGTERM)" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
