"""The quick demo end to end on the bundled digits, and `attnprobe report` rebuilding its report."""
import importlib.util
import json

import pytest

from attnprobe.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(root / "run"), "--cache", str(root / "cache"), "--workers", "0"]) == 0
    return root / "run"


def test_quick_demo_results(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    names = [r["name"] for r in results["rows"]]
    assert names == ["labels", "kd-original", "attnprobe", "dfnd", "probe", "random", "attnprobe-rank"]
    pool = results["pool"]
    assert pool["size"] == 1800 and pool["digits"] == 900
    teacher = results["teacher"]
    assert teacher["selected_on"] == "val" and teacher["test_top1"] == teacher["top1"]
    t_rows = [json.loads(line) for line in (demo_run / "teacher/metrics.jsonl").read_text().splitlines()]
    assert all(r["test_n"] == 500 for r in t_rows)
    val_n = {r["val_n"] for r in t_rows}  # 10% of each digit's training images: about 150 of the 1,500
    assert len(val_n) == 1 and 145 <= val_n.pop() <= 155
    best = max(range(len(t_rows)), key=lambda e: (t_rows[e]["val_top1"], -e))  # chosen on val, never on test
    assert teacher["best_epoch"] == best and teacher["val_top1"] == t_rows[best]["val_top1"]
    assert teacher["test_top1"] == t_rows[best]["test_top1"]
    for r in results["rows"]:
        assert 0.0 <= r["top1"] <= 1.0
        rows = [json.loads(line) for line in (demo_run / f"student-{r['name']}/metrics.jsonl").read_text().splitlines()]
        key = "val_top1" if r["name"] == "labels" else "fidelity"
        assert r["selected_on"] == ("val" if r["name"] == "labels" else "fidelity")
        assert r["best_epoch"] == max(range(len(rows)), key=lambda e: (rows[e][key], -e))
        assert r["top1"] == rows[r["best_epoch"]]["test_top1"]  # reported at the chosen epoch
        if r["kind"] == "selection":
            assert all(x["fidelity_n"] == 40 for x in rows)  # 10% of the 400 selected
        assert r["relative_top1"] == pytest.approx(r["top1"] / results["teacher"]["top1"])
        if r["kind"] == "selection":
            assert sum(r["composition"].values()) == results["config"]["num_select"]
            digits = sum(n for s, n in r["composition"].items() if s in ("mnist_heldout", "sklearn_digits"))
            assert r["precision"] == pytest.approx(digits / results["config"]["num_select"])
    # a dozen epochs on 1,500 digits is far from trained (a ViT learns slowly), but well above chance (0.1)
    assert results["teacher"]["top1"] > 0.25
    assert results["student_params"] < results["teacher"]["params"] / 5


def test_report_is_self_contained_and_rebuilds(demo_run, capsys):
    html = (demo_run / "report.html").read_text()
    assert "<table>" in html and html.count("data:image/png;base64,") == 9  # terms, 5 rankings, heatmaps, top-1, classes
    assert "src='http" not in html and 'src="http' not in html
    for name in ("score_terms", "attention_probe", "top1", "class_histograms", "ranked_attnprobe"):
        assert (demo_run / "figures" / f"{name}.png").stat().st_size > 1000
    (demo_run / "report.html").unlink()
    assert main(["report", str(demo_run)]) == 0
    assert (demo_run / "report.html").read_text().count("data:image/png;base64,") == 9


def test_demo_without_its_extra_is_one_line(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert main(["demo", "--quick", "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "attnprobe[demo]"' in err[0] and "scikit-learn" in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_report_of_a_folder_without_results(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


@pytest.mark.parametrize("damage,message", [
    (lambda r: "{not json", "damaged or incomplete (JSONDecodeError"),
    (lambda r: "{}", "damaged or incomplete (KeyError: 'pool')"),
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
