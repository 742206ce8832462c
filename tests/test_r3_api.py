"""Issue 20, part H: numbers and types at the API (seeds in numpy's range, numpy numbers recorded as Python
ones), --help without noise, and torch threads chosen for a shared machine (training/threads.py)."""
from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np
import pytest

import attnprobe
from attnprobe.app.cli import build_parser
from attnprobe.errors import AttnprobeError
from attnprobe.settings import (DaflSettings, DemoSettings, DistillSettings, SelectSettings, TeacherSettings)
from attnprobe.training import threads

from .conftest import TINY_TEACHER
from .test_robust_args import refused

SEED_CLASSES = {SelectSettings: dict(num_select=1), TeacherSettings: dict(epochs=1), DistillSettings: dict(epochs=1),
                DaflSettings: dict(epochs=1), DemoSettings: {}}


# ---- 1. seeds: 0 .. 2**32 - 1, numpy's range, for every command that has one -------------------------------

@pytest.mark.parametrize("cls", SEED_CLASSES)
def test_every_seed_outside_numpys_range_is_refused(cls):
    for bad in (-1, 2**32 if cls is not DemoSettings else 2**32 - 2, 2**64):
        with pytest.raises(AttnprobeError, match=f"--seed {bad}: must be a whole number from 0 to ") as e:
            cls(seed=bad, **SEED_CLASSES[cls])
        assert len(str(e.value).splitlines()) == 1
    top = 2**32 - 1 if cls is not DemoSettings else 2**32 - 3  # the demo's students use seed + 1, seed + 2
    assert cls(seed=top, **SEED_CLASSES[cls]).seed == top
    assert cls(seed=0, **SEED_CLASSES[cls]).seed == 0


@pytest.mark.parametrize("argv", [["select", "--scores", "S", "--out", "OUT/sel.parquet", "--num-select", "2"],
                                  ["train-teacher", "--data", "DATA", "--out", "OUT/t", "--epochs", "1"],
                                  ["distill", "--teacher", "T", "--wild", "W", "--selection", "S", "--out", "OUT/d",
                                   "--epochs", "1"],
                                  ["dafl", "--teacher", "T", "--out", "OUT/d", "--epochs", "1"],
                                  ["demo", "--out", "OUT/demo", "--quick"],
                                  ["run", "--teacher", "T", "--wild", "W", "--out", "OUT/run", "--num-select", "2",
                                   "--epochs", "1"]])
@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_cli_refuses_a_bad_seed_before_any_work(argv, seed, image_root, teacher_ckpt, tmp_path, capsys):
    """Every command with a seed: exit 2, one line naming --seed, nothing written (run: before scoring)."""
    names = {"S": teacher_ckpt, "DATA": image_root / "data", "T": teacher_ckpt, "W": image_root / "wild",
             "OUT": tmp_path}
    argv = [str(names[a]) if a in names else re.sub("^OUT", str(tmp_path), a) for a in argv]
    line = refused([*argv, "--seed", seed], capsys, f"--seed {seed}", "numpy's seed range", keep=(tmp_path,))
    assert "Traceback" not in line
    assert list(tmp_path.iterdir()) == []


# ---- 2. types at the Python API: one line naming the parameter; numpy numbers become Python numbers ---------

def test_wrong_types_name_the_parameter():
    cases = [(lambda: TeacherSettings(epochs=1, mean="0.5"), "--mean '0.5': expected a list of numbers"),
             (lambda: TeacherSettings(epochs=[3]), "--epochs [3]: expected a whole number"),
             (lambda: TeacherSettings(epochs=1, model=["x"]), "--model ['x']: expected text"),
             (lambda: SelectSettings(num_select=1, seed="1"), "--seed '1': expected a whole number"),
             (lambda: DistillSettings(epochs=1, labeled=["a"], per_class=1), "--labeled ['a']: expected text")]
    for make, words in cases:
        with pytest.raises(AttnprobeError, match=re.escape(words)) as e:
            make()
        assert len(str(e.value).splitlines()) == 1
    for wrong in ({"epochs": 1}, SelectSettings(num_select=1), TeacherSettings):
        with pytest.raises(TypeError, match="settings= takes a TeacherSettings"):
            TeacherSettings.build(wrong)


def test_numpy_numbers_are_recorded_as_python_numbers():
    s = DistillSettings(epochs=np.int64(2), seed=np.uint32(7), lr=np.float32(0.5), probe_blocks=[np.int64(1)],
                        holdout=np.float64(0.25))
    assert [type(v) for v in (s.epochs, s.seed, s.lr, s.probe_blocks[0], s.holdout)] == [int, int, float, int, float]
    json.dumps(s.asdict())  # config.json of `attnprobe run` and the checkpoints record them


def test_select_with_numpy_settings_writes_its_summary(image_root, teacher_ckpt, tmp_path):
    scores = tmp_path / "scores.parquet"
    attnprobe.score(teacher_ckpt, image_root / "wild", scores, workers=0, progress=False, device="cpu")
    out = tmp_path / "sel.parquet"
    attnprobe.select(scores, out=out, num_select=np.int64(3), strategy="random", seed=np.int64(5))
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["seed"] == 5


# ---- 3. --help: a default only where it says something ------------------------------------------------------

def _helps():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p.format_help() for name, p in sub.choices.items()}


def test_help_shows_no_default_beside_switches_or_none():
    helps = _helps()
    for name, text in helps.items():
        flat = re.sub(r"\s+", " ", text)
        for noise in ("(default: True)", "(default: False)", "(default: None)", "(default: [", "(default: {"):
            assert noise not in flat, (name, noise)
        for flag_help in re.split(r" (?=--?[a-z])", flat):
            assert flag_help.count("default") <= 1, (name, flag_help)
    flat = {n: re.sub(r"\s+", " ", t) for n, t in helps.items()}
    assert "--no-flip no horizontal flips (turn off for digits, text) --" in flat["train-teacher"]
    assert "(default: $XDG_CACHE_HOME/attnprobe) --workers" in flat["demo"]
    assert "(default: attnprobe-rank) --num-select" in flat["run"]
    assert "--lr LR peak learning rate (AdamW) (default: 0.00075)" in flat["distill"]
    assert "run_dir the folder of a demo or of `attnprobe run`" in flat["report"]


# ---- 4. threads: attnprobe's own jobs never oversubscribe, others' load counts, the user's choice wins -------

def test_fair_threads_rule():
    f = threads.fair_threads
    assert f(n_cores=8, jobs=1, load=0, own=0, running=0)[0] == 8
    assert f(n_cores=8, jobs=3, load=0, own=0, running=0)[0] == 2  # torchrun: cores // LOCAL_WORLD_SIZE
    assert f(n_cores=8, share=2, load=0, own=0, running=0)[0] == 2  # the demo's cores // jobs
    assert f(n_cores=2, load=2.0, own=0, running=0)[0] == 1  # two busy processes on 2 cores
    assert f(n_cores=2, load=0.1, own=0, running=4)[0] == 1  # just started: seen runnable, not yet averaged
    assert f(n_cores=8, load=3.2, own=0, running=0)[0] == 5
    assert f(n_cores=8, load=3.2, own=3.0, running=0)[0] == 8  # its own past work is not others' load
    assert f(n_cores=2, load=50, own=0, running=50)[0] == 1  # at least 1
    n, why = f(n_cores=4, load=3, own=0, running=0)
    assert n == 1 and "others' load is 3.0" in why


@pytest.fixture
def torch_threads(monkeypatch):
    import torch
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_STATE", {"share": None, "ours": None})
    yield torch
    torch.set_num_threads(before)


def test_user_choice_wins_torchruns_default_does_not(torch_threads, monkeypatch):
    torch = torch_threads
    monkeypatch.setattr(threads, "cores", lambda: 8)
    monkeypatch.setattr(threads, "_physical_cores", lambda: 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(threads, "fair_threads", lambda **kw: (threads.cores() // threads.local_jobs(), "test"))
    torch.set_num_threads(3)  # the user's torch.set_num_threads
    assert threads.use_fair_threads() == 3 and torch.get_num_threads() == 3
    torch.set_num_threads(8)  # torch's default: attnprobe chooses
    assert threads.use_fair_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.use_fair_threads() == 8  # the user's OMP_NUM_THREADS, even under torchrun
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(threads, "torchrun_set_omp", lambda: False)  # the user's 1 under torchrun
    assert threads.use_fair_threads() == torch.get_num_threads()
    monkeypatch.setattr(threads, "torchrun_set_omp", lambda: True)  # torchrun's 1, set where the user set none
    assert threads.use_fair_threads() == 2 and torch.get_num_threads() == 2
    assert threads.use_fair_threads() == 2  # its own earlier choice is not taken for the user's
    assert threads.use_fair_threads("cuda") == 2  # on a GPU nothing changes


def test_training_takes_its_fair_share_on_a_loaded_machine(torch_threads, image_root, tmp_path, monkeypatch):
    """A real train-teacher: on a machine whose every core is busy it trains on 1 thread, not on all."""
    torch = torch_threads
    if threads.cores() < 2:
        pytest.skip("one core: every choice is 1 thread")
    torch.set_num_threads(os.cpu_count())  # torch's default
    monkeypatch.setattr(threads, "running_now", lambda *a, **k: float(threads.cores()))
    arch, kwargs = TINY_TEACHER
    info = attnprobe.train_teacher(image_root / "data", out=tmp_path / "t", model=arch, model_kwargs=kwargs,
                                   epochs=1, batch_size=16, workers=0, progress=False, device="cpu")
    assert info["epoch"] == 0 and torch.get_num_threads() == 1


def test_a_resumed_run_keeps_its_thread_count(torch_threads, image_root, tmp_path, monkeypatch):
    """last.pt records the threads the run trained with, and --resume trains on as many, whatever the load is
    then: a CPU reduction's rounding depends on the thread count, and a resumed run must end as an
    uninterrupted one."""
    torch = torch_threads
    if threads.cores() < 2:
        pytest.skip("one core: every choice is 1 thread")
    torch.set_num_threads(os.cpu_count())  # torch's default: attnprobe chooses
    monkeypatch.setattr(threads, "running_now", lambda *a, **k: float(threads.cores()))  # every core busy
    arch, kwargs = TINY_TEACHER
    common = dict(model=arch, model_kwargs=kwargs, batch_size=16, workers=0, progress=False, device="cpu")
    attnprobe.train_teacher(image_root / "data", out=tmp_path / "t", epochs=1, schedule="step", **common)
    assert torch.load(tmp_path / "t" / "last.pt", weights_only=True)["threads"] == 1
    monkeypatch.setattr(threads, "fair_threads", lambda **kw: (2, "an idle machine now"))
    monkeypatch.setattr(threads, "_STATE", {"share": None, "ours": None})
    torch.set_num_threads(os.cpu_count())
    attnprobe.train_teacher(image_root / "data", out=tmp_path / "t", epochs=2, schedule="step",
                            resume=tmp_path / "t" / "last.pt", **common)
    assert torch.get_num_threads() == 1


def test_torchruns_own_omp_setting_is_told_from_the_users(monkeypatch, tmp_path):
    """torchrun sets OMP_NUM_THREADS=1 in its workers when its own environment has none: a worker tells the two
    apart by its parent's starting environment."""
    import subprocess
    import sys
    code = ("import os\nos.environ['LOCAL_WORLD_SIZE'] = '2'\nos.environ['OMP_NUM_THREADS'] = '1'\n"
            "from attnprobe.training.threads import torchrun_set_omp\nprint(torchrun_set_omp())")
    launcher = ("import subprocess, sys\nsys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    for launcher_env, expected in ((env, "True"), ({**env, "OMP_NUM_THREADS": "1"}, "False")):
        out = subprocess.run([sys.executable, "-c", launcher, code], env=launcher_env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == expected, launcher_env.get("OMP_NUM_THREADS")
