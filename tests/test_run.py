"""`attnprobe run`: the whole job in one folder, without labels; every stage reused when nothing changed,
only the affected stages redone when a setting changed, and a killed run continued to the same student."""
import json
import shutil

import pytest
import torch

from attnprobe.app.cli import main
from attnprobe.io.checkpoints import read_checkpoint

from .conftest import TINY_STUDENT, cli, kill_after_first_epoch


def run_argv(image_root, teacher_ckpt, out, *extra, epochs=3):
    arch, kw = TINY_STUDENT
    return ["run", "--teacher", str(teacher_ckpt), "--wild", str(image_root / "wild"), "--out", str(out),
            "--num-select", "24", "--student", arch, "--model-kwargs", *[f"{k}={v}" for k, v in kw.items()],
            "--epochs", str(epochs), "--batch-size", "8", "--workers", "0", "--no-progress", "--seed", "3", *extra]


def files_and_mtimes(folder):
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_without_labels_then_again_reuses_everything(image_root, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_argv(image_root, teacher_ckpt, out, "--strategies", "attnprobe", "random")) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["test"] is None and config["strategies"] == ["attnprobe", "random"]
    assert config["distill"]["epochs"] == 3 and config["select"]["num_select"] == 24
    stages = json.loads((out / "stages.json").read_text())
    assert [s["stage"] for s in stages] == ["score", "select:attnprobe", "distill:attnprobe", "evaluate:attnprobe",
                                            "select:random", "distill:random", "evaluate:random", "report"]
    assert all(s["status"] == "done" for s in stages)
    for strategy in ("attnprobe", "random"):
        rows = read_jsonl(out / strategy / "student/metrics.jsonl")
        assert all("fidelity" in r and "test_top1" not in r for r in rows)
        info = read_checkpoint(out / strategy / "student/best.pt")["info"]
        best = max(range(len(rows)), key=lambda i: rows[i]["fidelity"])
        assert info["fidelity"] == rows[best]["fidelity"] and info["accuracy"] is None
        evaluation = json.loads((out / strategy / "evaluation.json").read_text())
        assert evaluation["student"]["fidelity"] == info["fidelity"] and evaluation["student"]["test_top1"] is None
        assert evaluation["student"]["params"] < evaluation["teacher"]["params"]
    assert (out / "report.html").is_file()

    before = files_and_mtimes(out)
    capsys.readouterr()
    assert main(run_argv(image_root, teacher_ckpt, out, "--strategies", "attnprobe", "random")) == 0
    assert files_and_mtimes(out) == before  # nothing rewritten
    # A changed distill setting redoes distill, evaluate and the report, and nothing before them.
    assert main(run_argv(image_root, teacher_ckpt, out, "--strategies", "attnprobe", "random", epochs=2)) == 0
    after = files_and_mtimes(out)
    for same in ("scores.parquet", "attnprobe/selection.parquet", "random/selection.json"):
        assert after[same] == before[same], same
    for redone in ("attnprobe/student/best.pt", "random/evaluation.json", "report.html"):
        assert after[redone] != before[redone], redone
    assert len(read_jsonl(out / "attnprobe/student/metrics.jsonl")) == 2


def test_run_with_test_set_measures_it_without_choosing_on_it(image_root, teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    assert main(run_argv(image_root, teacher_ckpt, out, "--test", str(image_root / "data/val"))) == 0
    rows = read_jsonl(out / "attnprobe-rank/student/metrics.jsonl")  # the default selection
    info = read_checkpoint(out / "attnprobe-rank/student/best.pt")["info"]
    assert all("test_top1" in r and "fidelity" in r for r in rows)
    assert info["fidelity"] == max(r["fidelity"] for r in rows) and info["selected_on"] == "fidelity"
    evaluation = json.loads((out / "attnprobe-rank/evaluation.json").read_text())
    assert 0 <= evaluation["student"]["test_top1"] <= 1 and 0 <= evaluation["teacher"]["test_top1"] <= 1


def test_run_killed_during_distill_continues_to_the_uninterrupted_student(image_root, teacher_ckpt, tmp_path):
    epochs = 8
    whole = cli(run_argv(image_root, teacher_ckpt, tmp_path / "whole", epochs=epochs))
    killed = cli(run_argv(image_root, teacher_ckpt, tmp_path / "killed", epochs=epochs))
    metrics = tmp_path / "killed/attnprobe-rank/student/metrics.jsonl"
    kill_after_first_epoch(killed, metrics)
    first_rows = metrics.read_text().splitlines()
    assert len(first_rows) < epochs, "the run finished before it was killed; make the epochs longer"
    for proc in (whole, cli(run_argv(image_root, teacher_ckpt, tmp_path / "killed", epochs=epochs))):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert "distill:attnprobe-rank: continuing" in err and "score: reused" in err
    a = read_checkpoint(tmp_path / "whole/attnprobe-rank/student/last.pt")
    b = read_checkpoint(tmp_path / "killed/attnprobe-rank/student/last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = metrics.read_text().splitlines()
    assert rows[:len(first_rows)] == first_rows  # the finished epochs stay as they were
    strip = lambda rs: [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(rows) == strip((tmp_path / "whole/attnprobe-rank/student/metrics.jsonl").read_text().splitlines())



@pytest.fixture(scope="module")
def finished_run(image_root, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(run_argv(image_root, teacher_ckpt, out, epochs=1)) == 0
    return out


@pytest.mark.parametrize("damaged", ["stages.json", "config.json"])
def test_run_and_report_refuse_a_damaged_side_file_in_one_line(image_root, teacher_ckpt, finished_run, tmp_path,
                                                              capsys, damaged):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    path = out / damaged
    path.write_text(path.read_text()[:9])  # torn mid-write
    before = files_and_mtimes(out)
    capsys.readouterr()
    for argv in (run_argv(image_root, teacher_ckpt, out, epochs=1), ["report", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(path) in err[0] and "damaged" in err[0], err
        assert files_and_mtimes(out) == before  # nothing rewritten, nothing cleared


def test_a_damaged_evaluation_is_refused_by_report_and_redone_by_run(image_root, teacher_ckpt, finished_run,
                                                                    tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    path = out / "attnprobe-rank/evaluation.json"
    path.write_text(path.read_text()[:9])  # torn mid-write
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "damaged" in err[0], err
    assert main(run_argv(image_root, teacher_ckpt, out, epochs=1)) == 0
    err = capsys.readouterr().err
    assert "evaluate:attnprobe-rank: evaluation.json is damaged, evaluating again" in err, err
    assert "distill:attnprobe-rank: reused" in err
    assert json.loads(path.read_text())["student"]["params"] > 0
