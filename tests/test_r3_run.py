"""Issue 20, part F: `attnprobe run` and `score` trust content, not names. A pool rewritten in place redoes the
scoring; a resumed `score` rescores a finished part whose files changed; one `run` per folder at a time; an
--out inside the pool or holding someone else's files is refused; a stage is reused only when its outputs
verify; settings that cannot change a result redo nothing; what can fail before the first stage does, and
writes nothing."""
import io
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from attnprobe.app.cli import main
from attnprobe.app.run_files import pool_identity
from attnprobe.io.checkpoints import read_checkpoint

from .conftest import CLASSES, CLI_ENV, TINY_STUDENT
from .test_run import files_and_mtimes


def argv(wild, teacher, out, *extra, kwargs=None):
    arch, kw = TINY_STUDENT
    kw = {**kw, **(kwargs or {})}
    return ["run", "--teacher", str(teacher), "--wild", str(wild), "--out", str(out), "--num-select", "12",
            "--student", arch, "--model-kwargs", *[f"{k}={v}" for k, v in kw.items()], "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--no-progress", "--seed", "3", *extra]


def rewrite(path, seed):
    """The same name, new pixels (an in-place rewrite), and a later modification time."""
    st = path.stat()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(path, format="JPEG")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def pool(image_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("r3pool") / "wild"
    shutil.copytree(image_root / "wild", root)
    return root


@pytest.fixture(scope="module")
def finished(pool, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("r3run") / "run"
    assert main(argv(pool, teacher_ckpt, out)) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ---------------------------------------------------------------- content identity


def test_a_pool_rewritten_in_place_is_scored_again(image_root, teacher_ckpt, tmp_path, capsys):
    wild = tmp_path / "wild"
    shutil.copytree(image_root / "wild", wild)
    out = tmp_path / "run"
    assert main(argv(wild, teacher_ckpt, out)) == 0
    before = pd.read_parquet(out / "scores.parquet").set_index("path")
    rewrite(wild / "noise/n3.jpg", seed=99)
    capsys.readouterr()
    assert main(argv(wild, teacher_ckpt, out)) == 0
    err = capsys.readouterr().err
    assert "score: running" in err and "score: reused" not in err, err
    after = pd.read_parquet(out / "scores.parquet").set_index("path")
    assert not np.allclose(before.loc["noise/n3.jpg", "outlier"], after.loc["noise/n3.jpg", "outlier"])


def test_the_pool_identity_follows_content_not_names(image_root, tmp_path):
    shard = tmp_path / "00000.tar"

    def write_shard(order):
        with tarfile.open(shard, "w") as tar:
            for name in order:
                data = (image_root / "data/val/hbar/0.png").read_bytes() if name == "a.png" else \
                    (image_root / "data/val/vbar/0.png").read_bytes()
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    write_shard(["a.png", "b.png"])
    first, size = pool_identity(str(shard)), shard.stat().st_size
    st = shard.stat()
    write_shard(["b.png", "a.png"])  # the same members in another order: the same size, other offsets
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert shard.stat().st_size == size and pool_identity(str(shard)) != first
    folder = tmp_path / "folder"
    shutil.copytree(image_root / "wild/noise", folder)
    ident = pool_identity(folder)
    assert pool_identity(folder) == ident
    rewrite(folder / "n1.jpg", seed=7)
    assert pool_identity(folder) != ident


def test_a_resumed_score_rescores_a_finished_part_whose_files_changed(image_root, teacher_ckpt, tmp_path,
                                                                      monkeypatch):
    from attnprobe import api
    from attnprobe.stages import score_parts
    wild = tmp_path / "wild"
    shutil.copytree(image_root / "wild", wild)
    kw = dict(chunk_size=8, workers=0, progress=False, device="cpu")
    merge = score_parts.merge_parts

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(score_parts, "merge_parts", stop)
    with pytest.raises(KeyboardInterrupt):  # stopped after every part was written, before the merge
        api.score(teacher_ckpt, wild, tmp_path / "scores.parquet", **kw)
    assert len(list((tmp_path / "scores.parquet.parts").glob("*.parquet"))) == 4
    monkeypatch.setattr(score_parts, "merge_parts", merge)
    rewrite(wild / "noise/n0.jpg", seed=5)  # in chunk 0, already finished
    summary = api.score(teacher_ckpt, wild, tmp_path / "scores.parquet", **kw)
    assert summary["resumed_chunks"] == 3  # the three unchanged parts, not the changed one
    api.score(teacher_ckpt, wild, tmp_path / "fresh.parquet", **kw)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "scores.parquet"),
                                  pd.read_parquet(tmp_path / "fresh.parquet"))


# ---------------------------------------------------------------- one run per folder


def test_a_second_run_is_refused_at_once_and_a_killed_one_frees_the_folder(pool, teacher_ckpt, run_copy, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from attnprobe.io.lock import hold; "
                               "hold(sys.argv[1], 'x', 'y'); print('held', flush=True); time.sleep(120)",
                               str(run_copy / ".lock")], env=CLI_ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = files_and_mtimes(run_copy)
        capsys.readouterr()
        assert main(argv(pool, teacher_ckpt, run_copy)) == 2
        line = one_error_line(capsys)
        assert "another `attnprobe run`" in line and str(run_copy / ".lock") in line, line
        assert files_and_mtimes(run_copy) == before
    finally:
        holder.kill()  # SIGKILL: the record lock dies with its process
        holder.wait()
    assert main(argv(pool, teacher_ckpt, run_copy)) == 0
    assert "distill:attnprobe-rank: reused" in capsys.readouterr().err
    assert not (run_copy / ".lock").exists()


def test_two_real_runs_into_one_folder_the_second_refused_then_the_killed_one_continued(pool, teacher_ckpt,
                                                                                        tmp_path, capsys):
    import time
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "attnprobe.cli", *argv(pool, teacher_ckpt, out)], env=CLI_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists():  # written once the lock is held
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.01)
        capsys.readouterr()
        assert main(argv(pool, teacher_ckpt, out)) == 2
        assert "another `attnprobe run`" in one_error_line(capsys)
        assert first.poll() is None, "the first run ended before the second was tried; make it longer"
    finally:
        first.kill()
        first.communicate()
    assert main(argv(pool, teacher_ckpt, out)) == 0  # right after kill -9: the same command goes ahead
    assert read_checkpoint(out / "attnprobe-rank/student/best.pt")["info"]["fidelity"] is not None


# ---------------------------------------------------------------- --out


def test_out_inside_the_pool_is_refused_and_writes_nothing(pool, teacher_ckpt, capsys):
    before = files_and_mtimes(pool)
    assert main(argv(pool, teacher_ckpt, pool / "runs/mine")) == 2
    assert "inside --wild" in one_error_line(capsys)
    assert files_and_mtimes(pool) == before and not (pool / "runs").exists()


def test_out_holding_someone_elses_files_is_refused(pool, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "scores.parquet").write_text("my own table")
    (out / "report.html").write_text("<p>my report</p>")
    before = files_and_mtimes(out)
    assert main(argv(pool, teacher_ckpt, out)) == 2
    assert "not an attnprobe run folder" in one_error_line(capsys)
    assert files_and_mtimes(out) == before
    assert (out / "scores.parquet").read_text() == "my own table"


# ---------------------------------------------------------------- outputs verified, not assumed


def test_a_stage_whose_outputs_do_not_verify_is_done_again(pool, teacher_ckpt, run_copy, capsys):
    (run_copy / "attnprobe-rank/student/best.pt").unlink()
    sel = run_copy / "attnprobe-rank/selection.parquet"
    sel.write_bytes(sel.read_bytes()[:100])  # torn
    capsys.readouterr()
    assert main(argv(pool, teacher_ckpt, run_copy)) == 0
    err = capsys.readouterr().err
    assert "score: reused" in err
    assert "select:attnprobe-rank: selection.parquet is damaged, selecting again" in err, err
    assert "distill:attnprobe-rank: best.pt is missing, training again" in err, err
    assert read_checkpoint(run_copy / "attnprobe-rank/student/best.pt")["info"]["fidelity"] is not None
    assert len(pd.read_parquet(sel)) == 12
    scores = run_copy / "scores.parquet"
    scores.write_bytes(scores.read_bytes()[:-20])  # torn footer
    assert main(argv(pool, teacher_ckpt, run_copy)) == 0
    err = capsys.readouterr().err
    assert "score: scores.parquet is damaged, scoring again" in err, err
    assert len(pd.read_parquet(scores)) > 0


# ---------------------------------------------------------------- what cannot change a result


def test_chunk_size_redoes_nothing_and_a_test_set_redoes_only_evaluate_and_report(image_root, pool, teacher_ckpt,
                                                                                   run_copy, capsys):
    before = files_and_mtimes(run_copy)
    capsys.readouterr()
    assert main(argv(pool, teacher_ckpt, run_copy, "--chunk-size", "5")) == 0
    assert capsys.readouterr().err.count(": reused") == 5
    after = files_and_mtimes(run_copy)
    assert {k for k in after if after[k] != before.get(k)} == {"config.json"}
    assert main(argv(pool, teacher_ckpt, run_copy, "--test", str(image_root / "data/val"))) == 0
    err = capsys.readouterr().err
    for reused in ("score", "select:attnprobe-rank", "distill:attnprobe-rank"):
        assert f"{reused}: reused" in err, err
    for redone in ("evaluate:attnprobe-rank", "report"):
        assert f"{redone}: running" in err, err
    import json
    ev = json.loads((run_copy / "attnprobe-rank/evaluation.json").read_text())
    assert 0 <= ev["student"]["test_top1"] <= 1


# ---------------------------------------------------------------- refused before the first stage


def gz_pool(root, image_root):
    root.mkdir()
    with tarfile.open(root / "00000.tar.gz", "w:gz") as tar:
        for i, cls in enumerate(CLASSES):
            tar.add(image_root / f"data/val/{cls}/0.png", arcname=f"{i:06d}.png")
    return str(root / "*.tar.gz")


@pytest.mark.parametrize("case", ["student input", "test file", "compressed", "num select", "probe blocks"])
def test_what_can_fail_before_the_first_stage_fails_before_it(case, image_root, pool, teacher_ckpt, tmp_path,
                                                               capsys):
    out, wild, extra, kwargs = tmp_path / "run", pool, [], None
    if case == "student input":  # convnext_atto downsamples the 16-px input to nothing
        kwargs, expect = {"drop_rate": 0.0}, "cannot take the teacher's 16x16 x3 input"
    elif case == "test file":
        extra, expect = ["--test", str(image_root / "data/val/hbar/0.png")], "not a folder"
    elif case == "num select":
        extra, expect = ["--num-select", "500"], "--num-select 500 is more than the 30 images"
    elif case == "probe blocks":
        extra, expect = ["--probe-blocks", "7"], "--probe-blocks"
    else:
        wild, expect = gz_pool(tmp_path / "gz", image_root), "compressed"
    args = argv(wild, teacher_ckpt, out, *extra, kwargs=kwargs)
    if case == "student input":
        args[args.index("--student") + 1] = "convnext_atto"
        del args[args.index("--model-kwargs") + 1:args.index("drop_rate=0.0")]
    assert main(args) == 2
    assert expect in one_error_line(capsys)
    assert not out.exists()


def test_a_shard_pools_table_records_each_shard_as_it_was_scored(image_root, teacher_ckpt, tmp_path):
    from attnprobe import api
    from attnprobe.io.tables import read_table
    root = tmp_path / "pool"
    root.mkdir()
    for s in range(2):
        with tarfile.open(root / f"0000{s}.tar", "w") as tar:
            for i, cls in enumerate(CLASSES):
                tar.add(image_root / f"data/val/{cls}/{s}.png", arcname=f"{s}{i:05d}.png")
    api.score(teacher_ckpt, str(root / "*.tar"), tmp_path / "scores.parquet", workers=0, progress=False,
              device="cpu")
    meta = read_table(tmp_path / "scores.parquet")[1]
    assert meta["shard_files"] == {f"0000{s}": [(root / f"0000{s}.tar").stat().st_size,
                                               (root / f"0000{s}.tar").stat().st_mtime_ns] for s in range(2)}
    api.select(tmp_path / "scores.parquet", out=tmp_path / "sel.parquet", num_select=2)
    assert read_table(tmp_path / "sel.parquet")[1]["shard_files"] == meta["shard_files"]
