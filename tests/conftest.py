"""Shared fixtures: a tiny generated image set and a tiny teacher trained on it (seconds on a CPU)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

CLASSES = ["hbar", "square", "vbar"]
TINY_TEACHER = ["vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 3,
                                          "num_heads": 2}]
TINY_STUDENT = ["vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2}]


CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cli(argv, **kw) -> subprocess.Popen:
    """`attnprobe ARGV` in a subprocess on one thread (so that it can be killed), output captured."""
    return subprocess.Popen([sys.executable, "-m", "attnprobe.cli", *argv], env=CLI_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def kill_after_first_epoch(proc: subprocess.Popen, metrics, timeout: float = 180) -> None:
    """SIGKILL `proc` as soon as `metrics` (a metrics.jsonl) holds one finished epoch."""
    deadline = time.time() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 1):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def shape_image(rng, cls: str, size: int = 16) -> Image.Image:
    """A bright bar or square on a dark noisy background: three easily learnt classes."""
    a = rng.normal(20, 8, (size, size)).clip(0, 255)
    at = int(rng.integers(2, size - 5))
    if cls == "hbar":
        a[at:at + 3, :] = 230
    elif cls == "vbar":
        a[:, at:at + 3] = 230
    else:
        a[4:size - 4, 4:size - 4] = 200
    return Image.fromarray(a.astype(np.uint8)).convert("RGB")


@pytest.fixture
def one_thread():
    """In-process runs on one thread: tiny models run faster so, and two threads per run oversubscribe a
    shared 2-core machine. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def image_root(tmp_path_factory):
    """data/{train,val}/<class>/*.png and wild/ (shapes in nested folders, odd extensions, noise JPEGs)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8)):
        for cls in CLASSES:
            os.makedirs(root / "data" / split / cls)
            for i in range(n):
                shape_image(rng, cls).save(root / "data" / split / cls / f"{i}.png")
    (root / "wild" / "shapes" / "deep").mkdir(parents=True)
    (root / "wild" / "noise").mkdir(parents=True)
    for i in range(18):
        ext = [".png", ".PNG", ".bmp"][i % 3]
        shape_image(rng, CLASSES[i % 3]).save(root / "wild" / "shapes" / ("deep" if i % 2 else "") / f"s{i}{ext}")
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / "wild" / "noise" / f"n{i}.jpg")
    (root / "wild" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def teacher_ckpt(image_root, tmp_path_factory):
    from attnprobe import train_teacher
    out = tmp_path_factory.mktemp("teacher")
    arch, kwargs = TINY_TEACHER
    train_teacher(image_root / "data", out=out, model=arch, model_kwargs=kwargs, epochs=4, batch_size=16, lr=2e-3,
                  workers=0, progress=False)
    return out / "best.pt"


@pytest.fixture(scope="session")
def wild_selection(teacher_ckpt, image_root, tmp_path_factory):
    """20 images of the wild pool selected by the tiny teacher (the default strategy)."""
    from attnprobe import api
    d = tmp_path_factory.mktemp("wild_selection")
    api.score(teacher_ckpt, image_root / "wild", d / "scores.parquet", workers=0, progress=False, device="cpu")
    api.select(d / "scores.parquet", out=d / "sel.parquet", num_select=20)
    return d / "sel.parquet"
