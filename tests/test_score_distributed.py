"""`attnprobe score` under torchrun with two CPU processes (Gloo) gives the one-process table."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd

from attnprobe.app.cli import main
from attnprobe.io.outputs import parts_dir
from attnprobe.io.tables import read_table

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(nproc, argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "attnprobe.cli", *argv], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def assert_same_table(a: pd.DataFrame, b: pd.DataFrame):
    assert list(a.columns) == list(b.columns)
    assert list(a.path) == list(b.path)
    np.testing.assert_array_equal(a.pred.to_numpy(), b.pred.to_numpy())
    for c in a.columns:
        if c.startswith("probe_") or c == "outlier":
            np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.stack(a.probs), np.stack(b.probs), atol=1e-5, rtol=0)


def test_two_processes_equal_one(image_root, teacher_ckpt, tmp_path):
    wild = tmp_path / "wild"
    shutil.copytree(image_root / "wild", wild)
    (wild / "shapes" / "broken.png").write_bytes(b"")  # skipping must not shift rows between processes
    common = ["score", "--teacher", str(teacher_ckpt), "--wild", str(wild), "--chunk-size", "4",
              "--batch-size", "3", "--workers", "0", "--no-progress"]
    one = tmp_path / "one.parquet"
    assert main([*common, "--out", str(one)]) == 0

    two = tmp_path / "two.parquet"
    proc = torchrun(2, [*common, "--out", str(two)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("scored 30 images, skipped 1") == 1  # rank 0 reports, once
    a, meta_a = read_table(one)
    b, meta_b = read_table(two)
    assert_same_table(a, b)
    assert meta_a == meta_b
    assert not parts_dir(two).exists()


def test_two_processes_resume_a_one_process_run(image_root, teacher_ckpt, tmp_path, monkeypatch):
    """Chunks do not depend on the process count: a stopped one-process run is finished by two."""
    from attnprobe.stages import score_parts
    wild = image_root / "wild"
    common = ["score", "--teacher", str(teacher_ckpt), "--wild", str(wild), "--chunk-size", "4",
              "--batch-size", "3", "--workers", "0", "--no-progress"]
    out = tmp_path / "s.parquet"
    write, written = score_parts.write_part, []

    def stop_after_three(*a, **k):
        if len(written) == 3:
            raise KeyboardInterrupt
        write(*a, **k)
        written.append(a[1])
    monkeypatch.setattr(score_parts, "write_part", stop_after_three)
    assert main([*common, "--out", str(out)]) == 130
    monkeypatch.undo()
    assert sorted(p.name for p in parts_dir(out).glob("0*.parquet")) == ["000000.parquet", "000001.parquet",
                                                                          "000002.parquet"]
    proc = torchrun(2, [*common, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = tmp_path / "ref.parquet"
    assert main([*common, "--out", str(ref)]) == 0
    assert_same_table(read_table(out)[0], read_table(ref)[0])
