"""The report of an `attnprobe run` folder, built from a real tiny run, and model_cost against a hand count."""
import json
import re
import shutil

import pytest
import timm
import torch

from attnprobe import evaluate, load_checkpoint
from attnprobe.app.cli import main
from attnprobe.app.report import write_report
from attnprobe.app.report_run import write_run_report
from attnprobe.app.report_sections import pct, seconds
from attnprobe.errors import AttnprobeError
from attnprobe.io.datasets import labeled_folder
from attnprobe.io.images import eval_transform
from attnprobe.training.measure import model_cost

from .conftest import TINY_STUDENT

STRATEGIES = ["attnprobe", "dfnd"]
STAGES = [("score", 12.34, "done"), ("select:attnprobe", 0.42, "done"), ("select:dfnd", 0.37, "reused"),
          ("distill:attnprobe", 7.81, "done"), ("distill:dfnd", 6.55, "done"), ("evaluate:attnprobe", 1.26, "done"),
          ("evaluate:dfnd", 1.19, "done"), ("report", None, "started")]  # the report stage is running


pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def _fidelity(student, teacher, info, folder):
    ds = labeled_folder(folder, info["classes"], eval_transform(info), info["in_chans"])
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    return (student(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()


@pytest.fixture(scope="module")
def run(image_root, teacher_ckpt, tmp_path_factory):
    """score -> select (two strategies) -> distill each through the CLI, then the files `attnprobe run` adds."""
    out = tmp_path_factory.mktemp("run")
    wild, data = out / "wild", image_root / "data"
    shutil.copytree(image_root / "wild", wild)
    (wild / "broken").mkdir()
    (wild / "broken" / "text.jpg").write_bytes(b"not an image at all")
    (wild / "broken" / "empty.png").write_bytes(b"")
    common = ["--workers", "0", "--no-progress"]
    t = str(teacher_ckpt)
    assert main(["score", "--teacher", t, "--wild", str(wild), "--out", str(out / "scores.parquet"),
                 "--batch-size", "8", *common]) == 0
    s_arch, s_kw = TINY_STUDENT
    for strategy in STRATEGIES:
        assert main(["select", "--scores", str(out / "scores.parquet"), "--num-select", "12", "--strategy", strategy,
                     "--out", str(out / strategy / "selection.parquet")]) == 0
        assert main(["distill", "--teacher", t, "--wild", str(wild), "--selection",
                     str(out / strategy / "selection.parquet"), "--student", s_arch, "--model-kwargs",
                     *[f"{k}={v}" for k, v in s_kw.items()], "--test", str(data / "val"), "--epochs", "2",
                     "--out", str(out / strategy / "student"), "--batch-size", "8", *common]) == 0
    teacher, t_info = load_checkpoint(teacher_ckpt)
    t_acc = evaluate(teacher_ckpt, data / "val", workers=0, progress=False)
    t_eval = {**model_cost(teacher, t_info, seconds=0.05), "test_top1": t_acc["top1"], "test_top5": t_acc["top5"]}
    for strategy in STRATEGIES:
        student, info = load_checkpoint(out / strategy / "student" / "best.pt")
        acc = evaluate(out / strategy / "student" / "best.pt", data / "val", workers=0, progress=False)
        ev = {**model_cost(student, info, seconds=0.05), "fidelity": _fidelity(student, teacher, info, data / "val"),
              "test_top1": acc["top1"], "test_top5": acc["top5"]}
        (out / strategy / "evaluation.json").write_text(json.dumps({"student": ev, "teacher": t_eval}))
    # the attnprobe student stands for a run of before fidelity was measured every epoch; dfnd's rows have it
    for strategy, fidelity in (("attnprobe", None), ("dfnd", [0.5, 0.625])):
        metrics = out / strategy / "student" / "metrics.jsonl"
        rows = [{k: v for k, v in json.loads(line).items() if not k.startswith("fidelity")}
                for line in metrics.read_text().splitlines()]
        rows = [{**r, "fidelity": f, "fidelity_n": 8} for r, f in zip(rows, fidelity)] if fidelity else rows
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"kind": "attnprobe-run", "version": 1, "teacher": t, "wild": str(wild), "test": str(data / "val"),
              "strategies": STRATEGIES, "score": {"blocks": None, "heads": "first", "resize": "crop"},
              "select": {"num_select": 12, "w_attn": 0.05, "w_out": 0.9, "normalize": "none", "seed": 0},
              "distill": {"student": s_arch, "epochs": 2}}
    (out / "config.json").write_text(json.dumps(config))
    (out / "stages.json").write_text(json.dumps([{"stage": s, "seconds": sec, "status": st} for s, sec, st in STAGES]))
    write_run_report(out)
    return out


def test_report_is_self_contained(run):
    html = (run / "report.html").read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", html)
    imgs = re.findall(r"<img[^>]*>", html)
    assert links and not [u for u in links if u.startswith(("http:", "https:", "//", "file:"))]
    assert len(imgs) == 7 and all("src='data:image/png;base64," in tag for tag in imgs)
    assert "<link" not in html and "<script" not in html and "@import" not in html and "url(" not in html
    for name in ("score_terms", "selected_classes", "ranking_attnprobe", "ranking_dfnd", "attention_top",
                 "attention_bottom", "learning_curves"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 5000, name


def test_report_numbers_come_from_the_run(run):
    html = (run / "report.html").read_text()
    _, t_info = load_checkpoint(json.loads((run / "config.json").read_text())["teacher"])
    assert t_info["arch"] in html and f"{t_info['params']:,}" in html
    assert f"{pct(t_info['accuracy'])} on training validation" in html
    assert "Pool: <b>32</b>" in html and "30 scored, 2 skipped" in html  # 30 images + 2 unreadable files
    assert "broken/text.jpg" in html and "UnidentifiedImageError" in html
    for s in STRATEGIES:
        assert f"student ({s})" in html and f"Ranking of {s}" in html
        rows = [json.loads(line) for line in (run / s / "student" / "metrics.jsonl").read_text().splitlines()]
        assert f"<td>{pct(rows[-1]['test_top1'])}</td>" in html  # last epoch's test top-1, training table
        ev = json.loads((run / s / "evaluation.json").read_text())
        assert f"{ev['student']['images_per_s']:,.0f}" in html and pct(ev["student"]["fidelity"]) in html
    assert f"<td>{pct(0.625)} (8 held out)</td>" in html  # dfnd's last-epoch fidelity from metrics.jsonl
    for stage, sec, status in STAGES:
        assert f"<td>{stage}</td><td>{status}</td><td>{seconds(sec)}</td>" in html
    assert "<td>report</td><td>started</td><td>—</td>" in html
    assert f"<b>{seconds(sum(s or 0 for _, s, _ in STAGES))}</b>" in html


def test_report_tolerates_a_run_in_progress(run, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(run, part, ignore=shutil.ignore_patterns("*.pt", "figures", "report.html"))
    for s in STRATEGIES:
        (part / s / "evaluation.json").unlink()
    (part / "dfnd" / "student" / "metrics.jsonl").unlink()
    (part / "stages.json").unlink()
    html = write_report(part).read_text()  # dispatched on config.json
    last = json.loads((part / "attnprobe" / "student" / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"{pct(last['test_top1'])}*" in html  # from the last epoch, marked
    assert "Fewer than two strategies" in html


@pytest.mark.parametrize("content, match", [(None, "no results.json"), ("{not json", "config.json: the config of an `attnprobe run` is damaged"),
                                            ("{}", "not the config"), ('{"kind": "attnprobe-run"}', "lacks")])
def test_bad_run_folders(tmp_path, content, match):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(AttnprobeError, match=match) as e:
        write_report(tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("damaged", ["stages.json", "attnprobe/evaluation.json", "dfnd/selection.json",
                                     "attnprobe/student/metrics.jsonl"])
def test_report_of_a_damaged_side_file_is_one_line(run, tmp_path, capsys, damaged):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("figures", "report.html"))
    (copy / damaged).write_text((copy / damaged).read_text()[:7])  # torn mid-write
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(copy / damaged) in err[0] and "damaged" in err[0], err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before  # nothing written


def _vit(depth, **kw):
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=depth,
                             num_heads=2, num_classes=3, **kw)


def test_model_cost_matches_a_hand_count():
    info = {"img_size": 16, "in_chans": 3}
    model = _vit(3)
    cost = model_cost(model, info, batch_size=4, seconds=0.05)
    N, P, C, M = 17, 16, 32, 128  # tokens (16 patches + CLS), patches, width, MLP hidden
    block = 2 * N * C * 3 * C + 2 * N * C * C + 2 * 2 * N * C * M + 2 * 2 * N * N * C  # qkv, proj, MLP, QK^T and AV
    hand = 3 * block + 2 * P * (3 * 4 * 4) * C + 2 * C * 3  # blocks, patch embedding, head
    assert cost["flops"] == pytest.approx(hand, rel=0.01)
    assert cost["params"] == sum(p.numel() for p in model.parameters())
    assert cost["images_per_s"] > 0 and model.training  # train mode restored
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))  # restored after counting
    f = {d: model_cost(_vit(d), info, batch_size=2, seconds=0.01)["flops"] for d in (2, 3, 5)}
    assert f[5] - f[3] == 2 * (f[3] - f[2]) == 2 * block
