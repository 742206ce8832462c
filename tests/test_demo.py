"""The quick demo end to end on the bundled digits, and `attnprobe report` rebuilding its report."""
import importlib.util
import json

import pytest

from attnprobe import evaluate
from attnprobe.app.cli import main


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """One cache for the module's demos: the benchmark and the teacher are built once, by the first."""
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def demo_run(demo_root):
    root = demo_root
    assert main(["demo", "--quick", "--out", str(root / "run"), "--cache", str(root / "cache"), "--workers", "0"]) == 0
    return root / "run"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_demo_results(demo_run):
    from attnprobe.method.selection import DEFAULT_SELECTION
    results = json.loads((demo_run / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    paper = ["labels", "kd-original", "dafl", "dfnd", "attnprobe", "probe", "random"]
    extra = [] if DEFAULT_SELECTION["name"] in paper else [DEFAULT_SELECTION["name"]]
    assert names == paper + extra + ["all"] and results["default_selection"] == DEFAULT_SELECTION["name"]
    pool = results["pool"]
    assert pool["size"] == 1800 and pool["digits"] == 900
    teacher = results["teacher"]
    assert teacher["selected_on"] == "val" and teacher["test_top1"] == teacher["top1"]
    t_rows = read_jsonl(demo_run / "teacher/metrics.jsonl")
    assert all("test_top1" not in r for r in t_rows)
    val_n = {r["val_n"] for r in t_rows}  # 15% of each digit's training images: about 225 of the 1,500
    assert len(val_n) == 1 and 220 <= val_n.pop() <= 230
    best = max(range(len(t_rows)), key=lambda e: (t_rows[e]["val_top1"], -e))  # chosen on val, never on test
    assert teacher["best_epoch"] == best and teacher["val_top1"] == t_rows[best]["val_top1"]
    assert teacher["test_top1"] == evaluate(demo_run / "teacher/best.pt", pool["test_dir"], workers=0,
                                            progress=False)["top1"]
    steps = results["config"]["student"]["steps"]
    for r in results["rows"]:
        assert r["seeds"] == [0, 1] and len(r["test_top1"]) == 2
        assert r["top1"] == pytest.approx(sum(r["test_top1"]) / 2)
        assert r["top1_sd"] == pytest.approx(abs(r["test_top1"][0] - r["test_top1"][1]) / 2 ** 0.5)
        assert r["relative_top1"] == pytest.approx(r["top1"] / teacher["top1"])
        if r["name"] != "labels":  # equal compute: every run without labels takes the same optimizer steps
            assert r["steps"] == steps
        key = "val_top1" if r["name"] == "labels" else "fidelity"
        assert r["selected_on"] == ("val" if r["name"] == "labels" else "fidelity")
        for k, seed in enumerate(r["seeds"]):
            run = demo_run / f"student-{r['name']}" / f"seed{seed}"
            rows = read_jsonl(run / "metrics.jsonl")
            assert r["best_epoch"][k] == max(range(len(rows)), key=lambda e: (rows[e][key], -e))
            assert all("test_top1" not in x for x in rows)  # the test set plays no part in training or choosing
            if r["kind"] == "selection":
                assert all(x["fidelity_n"] == 40 for x in rows)  # 10% of the 400 selected
        # ... and is measured once, on the chosen checkpoint
        assert r["test_top1"][1] == evaluate(run / "best.pt", pool["test_dir"], workers=0, progress=False)["top1"]
        if r["kind"] == "selection":
            assert sum(r["composition"].values()) == results["config"]["num_select"]
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["all"]["composition"] == pool["by_source"]  # no selection: the whole pool
    assert len(rows["random"]["selection"]) == 2 and len(rows["probe"]["selection"]) == 1  # random moves with the seed
    digits = sum(n for s, n in rows["probe"]["composition"].items() if s in ("mnist_heldout", "sklearn_digits"))
    assert rows["probe"]["precision"] == pytest.approx(digits / results["config"]["num_select"])
    assert results["student_params"] == 116_938 and results["teacher"]["params"] == 205_066


def test_report_is_self_contained_and_rebuilds(demo_run, capsys):
    html = (demo_run / "report.html").read_text()
    n_figs = 4 + sum(r["kind"] == "selection" for r in json.loads((demo_run / "results.json").read_text())["rows"])
    # score terms, a ranking per selection, heatmaps, top-1, class histograms
    assert "<table>" in html and html.count("data:image/png;base64,") == n_figs
    assert "src='http" not in html and 'src="http' not in html
    for name in ("score_terms", "attention_probe", "top1", "class_histograms", "ranked_attnprobe"):
        assert (demo_run / "figures" / f"{name}.png").stat().st_size > 1000
    (demo_run / "report.html").unlink()
    assert main(["report", str(demo_run)]) == 0
    assert (demo_run / "report.html").read_text().count("data:image/png;base64,") == n_figs


def test_demo_without_its_extra_is_one_line(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert main(["demo", "--quick", "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "attnprobe[demo]"' in err[0] and "scikit-learn" in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_demo_jobs_checked_before_any_work(tmp_path, capsys):
    assert main(["demo", "--quick", "--jobs", "0", "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--jobs 0: must be at least 1" in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def test_report_of_a_folder_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


@pytest.mark.parametrize("damage,message", [
    (lambda r: "{not json", "results.json: the results of a demo run is damaged (not JSON"),
    (lambda r: "[]", "results.json: the results of a demo run is damaged (a JSON list"),
    (lambda r: "{}", "results.json: the results of a demo run is damaged or incomplete (KeyError: 'pool')"),
    (lambda r: json.dumps({**r, "pool": {**r["pool"], "wild_dir": "/nonexistent/wild"}}), "the cache moved"),
])
def test_report_of_a_damaged_or_moved_demo_is_one_line(demo_run, tmp_path, capsys, damage, message):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(demo_run, run)
    (run / "report.html").unlink()
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(damage(results))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (run / "report.html").exists()


def test_quick_students(demo_root, capsys):
    """`demo --quick --students`: the student rows only, 2 seeds each, their probe weights, architectures and grids
    as the checkpoints record them, their costs beside the teacher's, and the report's table."""
    from attnprobe.app.demo_students import STUDENT_ROWS
    from attnprobe.io.checkpoints import read_checkpoint
    run = demo_root / "students"
    assert main(["demo", "--quick", "--students", "--out", str(run), "--cache", str(demo_root / "cache"),
                 "--workers", "0"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["students"] and [r["name"] for r in results["rows"]] == list(STUDENT_ROWS)
    assert not (run / "student-labels").exists() and not (run / "select-random-seed0.parquet").exists()
    t = results["teacher"]["cost"]
    assert t["params"] == results["teacher"]["params"] and t["flops"] > 0 and t["images_per_s"] > 0
    for r in results["rows"]:
        assert r["seeds"] == [0, 1] and len(r["test_top1"]) == 2 and r["steps"] == results["config"]["student"]["steps"]
        assert r["top1"] == pytest.approx(sum(r["test_top1"]) / 2) and r["selected_on"] == "fidelity"
        assert r["cost"]["params"] > 0 and r["cost"]["flops"] > 0 and r["cost"]["images_per_s"] > 0
        assert r["teacher"] == t and r["vs_teacher"]["images_per_s"] == pytest.approx(
            r["cost"]["images_per_s"] / t["images_per_s"])
        probe = 0.8 if r["name"].endswith("-probe") else 0.0
        assert r["probe_weight"] == [probe, probe]
        for seed in r["seeds"]:
            info = read_checkpoint(run / f"student-{r['name']}" / f"seed{seed}" / "best.pt")["info"]
            assert info["probe"]["weight"] == probe and info["settings"]["probe_weight"] == probe
            assert info["steps"] == r["steps"] and info["arch"] == r["student"]
            assert info["params"] == r["cost"]["params"]
            assert info["arch"] == ("resnet18" if r["name"].startswith("cnn") else "vit_tiny_patch16_224")
            assert info["settings"]["noise_adaptation"] == (r["name"] != "cnn-kd-original")
            assert info["selection"].endswith("select-original.parquet" if r["name"] == "cnn-kd-original"
                                              else "select-attnprobe-rank.parquet")
            if r["name"] == "vit-2x2-probe":
                assert info["probe"]["student_grids"] and all(g == [2, 2] for g in info["probe"]["student_grids"])
            if r["name"] == "vit-4x4-probe":
                assert all(g == [4, 4] for g in info["probe"]["student_grids"])
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["cnn-kd"]["cost"]["params"] == 126_066 and rows["vit-4x4-probe"]["cost"]["params"] == 116_938
    assert rows["vit-2x2-kd"]["structure"]["grid"] == [2, 2] and rows["cnn-kd"]["structure"]["kind"] == "CNN"
    html = (run / "report.html").read_text()
    assert "Students against the teacher" in html and html.count("<table>") == 1
    assert all(f"<td>{name}</td>" in html for name in STUDENT_ROWS) and "images/s x teacher" in html
    assert html.count("data:image/png;base64,") == 2 and "the probe loss" in html
    (run / "report.html").unlink()
    assert main(["report", str(run)]) == 0 and (run / "report.html").read_text().count("<td>cnn-probe</td>") == 1
