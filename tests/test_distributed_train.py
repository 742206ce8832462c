"""Two-process Gloo runs on the CPU through torchrun: the same flags as one process, rank 0 alone writes,
evaluation is sharded and counts every test image once, and the replicas (student and noise adaptation's
Q) stay identical."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from attnprobe import load_checkpoint
from attnprobe.io.checkpoints import read_checkpoint
from attnprobe.io.datasets import split_holdout
from attnprobe.io.images import eval_transform, load_image
from attnprobe.io.tables import read_table, write_table

from .conftest import TINY_STUDENT, TINY_TEACHER

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("RANK", None), ENV.pop("WORLD_SIZE", None), ENV.pop("LOCAL_RANK", None)


def torchrun(*args, timeout=240):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def kwargs_args(kwargs):
    return ["--model-kwargs", *[f"{k}={v}" for k, v in kwargs.items()]]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def odd_test_set(image_root, tmp_path_factory):
    """The 24 val images plus one: 25, so that two shards differ in size (no padding may be counted)."""
    root = tmp_path_factory.mktemp("odd") / "val"
    shutil.copytree(image_root / "data/val", root)
    shutil.copy(image_root / "data/val/hbar/0.png", root / "hbar" / "extra.png")
    return root


def select_whole_pool(wild, selection) -> list[str]:
    """A selection of every image in the pool, written to `selection`; its paths."""
    paths = sorted(p.relative_to(wild).as_posix() for p in wild.rglob("*")
                   if p.suffix.lower() in (".png", ".jpg", ".bmp"))
    write_table(pd.DataFrame({"path": paths}), selection, {})
    return paths


def test_distill_two_processes_and_resume(image_root, teacher_ckpt, odd_test_set, tmp_path):
    wild = image_root / "wild"
    paths = select_whole_pool(wild, tmp_path / "sel.parquet")
    out = tmp_path / "run"
    s_arch, s_kw = TINY_STUDENT
    argv = lambda epochs, *x: ["-m", "attnprobe.cli", "distill", "--teacher", str(teacher_ckpt),  # noqa: E731
                               "--wild", str(wild), "--selection", str(tmp_path / "sel.parquet"),
                               "--test", str(odd_test_set), "--student", s_arch, *kwargs_args(s_kw),
                               "--epochs", str(epochs), "--out", str(out), "--batch-size", "4", "--workers", "0",
                               "--device", "cpu", "--schedule", "step", "--no-progress", *x]
    proc = torchrun(*argv(1))
    assert proc.stdout.count("student: epoch 1 of 1 chosen on fidelity") == 1  # printed by rank 0 only
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]
    last = read_checkpoint(out / "last.pt")
    assert last["epoch"] == 0 and len(last["rng"]) == 2  # both ranks' random streams, for --resume
    assert last["rng"][0]["loader"].tolist() != last["rng"][1]["loader"].tolist()  # distinct per rank
    torchrun(*argv(2, "--resume", str(out / "last.pt")))  # continues on 2 processes, each with its own state
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1]  # one row per epoch: rank 1 wrote none
    assert all(r["test_n"] == 25 for r in rows)  # sharded evaluation counts each test image once
    assert all(r["fidelity_n"] == 3 for r in rows)  # 10% of 30, split over the two processes, each counted once
    model, info = load_checkpoint(out / "best.pt")
    assert read_checkpoint(out / "last.pt")["epoch"] == 1
    assert info["holdout"] == 3 and info["selected_on"] == "fidelity"
    assert info["best_epoch"] == max(range(2), key=lambda e: (rows[e]["fidelity"], -e))
    assert info["fidelity"] == rows[info["best_epoch"]]["fidelity"]
    assert info["accuracy"] == rows[info["best_epoch"]]["test_top1"]
    # the held-out images are those one process holds out (seeded, not by rank): fidelity recomputed on them
    teacher, t_info = load_checkpoint(teacher_ckpt)
    _, held = split_holdout([str(wild / p) for p in paths], 0.1, 0)
    x = torch.stack([eval_transform(t_info)(load_image(p, 3)) for p in held])
    with torch.no_grad():
        agree = (model(x).argmax(1) == teacher(x).argmax(1)).sum().item() / len(held)
    assert info["fidelity"] == agree


def test_train_teacher_two_processes(image_root, odd_test_set, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(image_root / "data/train", data / "train")
    os.symlink(odd_test_set, data / "val")
    arch, kw = TINY_TEACHER
    torchrun("-m", "attnprobe.cli", "train-teacher", "--data", str(data), "--model", arch, *kwargs_args(kw),
             "--epochs", "1", "--out", str(tmp_path / "run"), "--batch-size", "8", "--workers", "0", "--no-progress")
    rows = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0] and rows[0]["val_n"] == 25
    load_checkpoint(tmp_path / "run/last.pt")


REPLICAS = textwrap.dedent("""
    # Each rank distills on different random images; afterwards every parameter (student and Q) must be
    # identical on both ranks, i.e. DDP averaged all gradients, Q's included.
    import sys, torch, timm
    from attnprobe.training import distributed as d
    from attnprobe.training.engine import DistillModel, distill_one_epoch
    from attnprobe.method.losses import NoiseAdaptation
    device = d.init_distributed("cpu")
    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, num_classes=3, depth=2, num_heads=2)
    teacher = timm.create_model("vit_tiny_patch16_224", embed_dim=32, **kw).eval().requires_grad_(False)
    student = timm.create_model("vit_tiny_patch16_224", embed_dim=16, **kw)
    model = torch.nn.parallel.DistributedDataParallel(DistillModel(student, NoiseAdaptation(3, 0.9)))
    g = torch.Generator().manual_seed(100 + d.rank())
    batches = [(torch.randn(4, 3, 16, 16, generator=g),) for _ in range(3)]
    opts = [torch.optim.AdamW(student.parameters(), lr=1e-2),
            torch.optim.Adam(model.module.noise.parameters(), lr=1e-1)]
    stats = distill_one_epoch(model, teacher, batches, opts, device, teacher_blocks=[0, 1], student_layers=[0, 1],
                              progress=False)
    flat = torch.cat([p.detach().flatten() for p in model.module.parameters()])
    everyone = d.all_gather_object((flat, stats))
    if d.is_main():
        assert torch.equal(everyone[0][0], everyone[1][0]), "replicas diverged"
        assert everyone[0][1] == everyone[1][1], "epoch statistics differ between ranks"
        assert not torch.equal(model.module.noise.q, torch.zeros_like(model.module.noise.q))
        open(sys.argv[1], "w").write("ok")
    d.cleanup()
""")


def test_replicas_and_noise_matrix_stay_in_sync(tmp_path):
    script = tmp_path / "replicas.py"
    script.write_text(REPLICAS)
    torchrun(str(script), str(tmp_path / "ok"))
    assert (tmp_path / "ok").read_text() == "ok"


def test_run_two_processes_matches_one_process_and_finishes(image_root, teacher_ckpt, odd_test_set, tmp_path):
    """`attnprobe run` under torchrun: every stage ends (no process waits on another at rank 0's stages),
    and the score table and test figures equal a one-process run's."""
    s_arch, s_kw = TINY_STUDENT
    args = ["--teacher", str(teacher_ckpt), "--wild", str(image_root / "wild"), "--num-select", "20",
            "--student", s_arch, *kwargs_args(s_kw), "--epochs", "2", "--batch-size", "8", "--workers", "0",
            "--test", str(odd_test_set), "--no-progress"]
    torchrun("-m", "attnprobe.cli", "run", *args, "--out", str(tmp_path / "two"))
    one = subprocess.run([sys.executable, "-m", "attnprobe.cli", "run", *args, "--out", str(tmp_path / "one")],
                         env=ENV, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-4000:]
    two_scores, _ = read_table(tmp_path / "two/scores.parquet")
    one_scores, _ = read_table(tmp_path / "one/scores.parquet")
    assert two_scores.path.tolist() == one_scores.path.tolist()
    assert two_scores.outlier.tolist() == pytest.approx(one_scores.outlier.tolist(), abs=1e-5)
    two = json.loads((tmp_path / "two/attnprobe-rank/evaluation.json").read_text())
    one = json.loads((tmp_path / "one/attnprobe-rank/evaluation.json").read_text())
    assert two["teacher"]["test_top1"] == one["teacher"]["test_top1"]  # the 25 images counted once each
    assert (tmp_path / "two/report.html").is_file()


def test_distill_a_cnn_student_with_the_probe_term_on_two_processes(image_root, teacher_ckpt, odd_test_set,
                                                                     tmp_path):
    """A student with BatchNorm and no CLS token under DistributedDataParallel: stage hooks on the wrapped
    student, buffers broadcast from rank 0, the sharded evaluation of a model in eval mode."""
    from .test_students import CNN
    wild = image_root / "wild"
    select_whole_pool(wild, tmp_path / "sel.parquet")
    out = tmp_path / "run"
    arch, kw = CNN
    torchrun("-m", "attnprobe.cli", "distill", "--teacher", str(teacher_ckpt), "--wild", str(wild), "--selection",
             str(tmp_path / "sel.parquet"), "--test", str(odd_test_set), "--student", arch, *kwargs_args(kw),
             "--epochs", "1", "--out", str(out), "--batch-size", "4", "--workers", "0", "--device", "cpu",
             "--probe-weight", "0.8", "--no-progress")
    (row,) = read_jsonl(out / "metrics.jsonl")
    assert row["test_n"] == 25 and row["fidelity_n"] == 3 and row["probe"] > 0
    model, info = load_checkpoint(out / "best.pt")
    assert info["probe"]["student_layers"] == ["act1", "layer1", "layer2"] and info["arch"] == "resnet18"
    assert model.bn1.running_mean.abs().sum() > 0  # BatchNorm statistics were trained and saved
    from attnprobe import api
    alone = api.evaluate(out / "best.pt", odd_test_set, workers=0, progress=False, device="cpu")
    assert row["test_top1"] == info["accuracy"] == alone["top1"]  # the sharded count equals one process's
