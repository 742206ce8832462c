"""Students for deployment: any timm classifier as the student, and probe distillation across token grids.

The cross-grid map and loss against hand computations; a CNN and a coarse-grid ViT student each distilled for
one epoch with the probe term on, their probe plans checked against the stages and grids they must use."""
from __future__ import annotations

import math

import pytest
import torch

from attnprobe.errors import AttnprobeError
from attnprobe.method.losses import probe_distill_loss
from attnprobe.method.probe_maps import ProbeTaps, area_resize, coarser_grid, pooled_cosine_map, student_probe_layers

from .conftest import TINY_TEACHER

# A ResNet for 16-px inputs: stem 8x8, pool 4x4, then 4x4, 2x2, 1x1, 1x1 (one block per stage, narrow).
CNN = ("resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16], "stem_type": "deep", "stem_width": 4})
COARSE_VIT = ("vit_tiny_patch16_224", {"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2})


def test_pooled_cosine_map_by_hand():
    # C=2, a 1x2 map: F(0) = (1, 0), F(1) = (1, 2); pooled mean (1, 1).
    f = torch.tensor([[[[1.0, 1.0]], [[0.0, 2.0]]]])
    got = pooled_cosine_map(f)
    assert got.shape == (1, 1, 2)
    expected = [1 / math.sqrt(2), 3 / (math.sqrt(5) * math.sqrt(2))]
    assert got[0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_area_resize_averages_the_cells_each_coarse_cell_overlaps():
    m = torch.arange(9.0).reshape(1, 3, 3)  # 3x3 -> 2x2: bins rows/cols [0, 1] and [1, 2] (they overlap)
    got = area_resize(m, (2, 2))
    expected = [[(0 + 1 + 3 + 4) / 4, (1 + 2 + 4 + 5) / 4], [(3 + 4 + 6 + 7) / 4, (4 + 5 + 7 + 8) / 4]]
    assert got[0].flatten().tolist() == pytest.approx([v for row in expected for v in row])
    four = torch.arange(16.0).reshape(1, 4, 4)  # 4x4 -> 2x2: disjoint 2x2 blocks
    assert area_resize(four, (2, 2))[0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert area_resize(four, (4, 4)) is four
    assert coarser_grid((4, 4), (2, 7)) == (2, 4)


def test_cross_grid_probe_loss_by_hand():
    # teacher 4x4, student 2x2: the teacher's map is averaged down to 2x2, then MSE with the student's.
    t = torch.arange(16.0).reshape(1, 4, 4) / 16  # 2x2 block means: 2.5, 4.5, 10.5, 12.5 (/16)
    s = torch.tensor([[[0.0, 0.5], [0.5, 1.0]]])
    means = [2.5 / 16, 4.5 / 16, 10.5 / 16, 12.5 / 16]
    by_hand = sum((a - b) ** 2 for a, b in zip(means, [0.0, 0.5, 0.5, 1.0])) / 4
    assert probe_distill_loss([t], [s]).item() == pytest.approx(by_hand)
    # a student finer than the teacher is averaged down instead; the two layers' terms are averaged
    fine = torch.zeros(1, 8, 8)
    fine[:, :4, :4] = 1.0  # its 4x4 area means: 1 in the top-left quarter, else 0
    ref = torch.zeros(1, 4, 4)
    assert probe_distill_loss([t, ref], [s, fine]).item() == pytest.approx((by_hand + 4 / 16) / 2)
    # on one grid it is the plain MSE of today (vectors or maps)
    assert probe_distill_loss([t.flatten(1)], [t.flatten(1) + 0.5]).item() == pytest.approx(0.25)


def test_student_stages_mapped_to_teacher_blocks_skip_1x1_maps():
    import timm
    net = timm.create_model(CNN[0], num_classes=3, in_chans=3, **CNN[1])
    layers, grids = student_probe_layers(net, [0, 1, 2], 3, (3, 16, 16), vit=False)
    # feature stages act1 8x8, layer1 4x4, layer2 2x2, layer3 1x1, layer4 1x1: the 1x1 ones carry no map
    assert layers == ["act1", "layer1", "layer2"]
    assert grids == [(8, 8), (4, 4), (2, 2)]
    with ProbeTaps(net, layers) as taps:
        net(torch.randn(2, 3, 16, 16))
        maps = taps.maps()
        by_hand = pooled_cosine_map(taps.outputs["layer1"])
    assert [tuple(m.shape) for m in maps] == [(2, 8, 8), (2, 4, 4), (2, 2, 2)]
    assert torch.equal(maps[1], by_hand)
    assert student_probe_layers(net, [0, 1, 2], 3, (3, 16, 16), vit=False)[0] == layers
    assert net.training  # the grids' forward pass left the student in training mode


def _distill(teacher_ckpt, image_root, selection, out, student, **kw):
    from attnprobe import api
    arch, kwargs = student
    return api.distill(teacher_ckpt, image_root / "wild", selection, out=out, test=image_root / "data/val",
                       student=arch, model_kwargs=kwargs, epochs=1, batch_size=8, lr=1e-3, workers=0,
                       progress=False, device="cpu", **kw)




@pytest.mark.parametrize("student,kind,layers,grids", [
    (CNN, "no-cls", ["act1", "layer1", "layer2"], [[8, 8], [4, 4], [2, 2]]),
    (COARSE_VIT, "vit-other-grid", [0, 0, 1], [[2, 2]] * 3),  # blocks 0, 1, 2 of 3 -> 0, 0, 1 of 2
])
def test_a_cnn_and_a_coarse_vit_student_distil_with_the_probe_term(student, kind, layers, grids, teacher_ckpt,
                                                                    image_root, wild_selection, tmp_path):
    from attnprobe.io.checkpoints import load_checkpoint
    info = _distill(teacher_ckpt, image_root, wild_selection, tmp_path / "run", student, probe_weight=0.8)
    model, saved = load_checkpoint(tmp_path / "run" / "best.pt")
    assert saved["arch"] == student[0] and saved["img_size"] == 16 and saved["in_chans"] == 3
    probe = saved["probe"]
    assert (probe["kind"], probe["weight"], probe["teacher_blocks"]) == (kind, 0.8, [0, 1, 2])
    assert probe["student_layers"] == layers and probe["student_grids"] == grids
    assert probe["teacher_grid"] == [4, 4]
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]
    import json
    first = json.loads(rows[0])
    assert first["probe"] > 0 and math.isfinite(first["probe"])
    assert first["loss"] == pytest.approx(first["kd"] + first["noise"] + 0.8 * first["probe"], rel=1e-5)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    assert 0 <= info["accuracy"] <= 1


def test_a_teacher_must_be_a_vit_and_a_student_must_fit_the_input(teacher_ckpt, image_root, wild_selection,
                                                                   tmp_path):
    _distill(teacher_ckpt, image_root, wild_selection, tmp_path / "cnn", CNN, probe_weight=0.0)
    from attnprobe import api
    with pytest.raises(AttnprobeError, match="not a ViT with a CLS token; a teacher must be one"):
        api.score(tmp_path / "cnn" / "best.pt", image_root / "wild", tmp_path / "s.parquet", workers=0,
                  progress=False)
    # ConvNeXt's stem and three stride-2 stages leave nothing of a 16-px input to its last downsampling conv
    with pytest.raises(AttnprobeError, match="cannot take the teacher's 16x16 x3 input"):
        _distill(teacher_ckpt, image_root, wild_selection, tmp_path / "convnext", ("convnext_atto", {}))
    with pytest.raises(AttnprobeError, match="--probe-variant reference normalises along a ViT's tokens"):
        _distill(teacher_ckpt, image_root, wild_selection, tmp_path / "ref", CNN, probe_variant="reference",
                 probe_weight=0.8)
    assert not (tmp_path / "convnext").exists() and not (tmp_path / "ref").exists()
    assert TINY_TEACHER[1]["patch_size"] == 4  # the teacher's 4x4 grid the plans above are compared with


def test_run_takes_a_cnn_student_and_the_report_shows_its_cost(image_root, teacher_ckpt, tmp_path):
    import json

    from attnprobe.app.cli import main
    arch, kw = CNN
    out = tmp_path / "run"
    assert main(["run", "--teacher", str(teacher_ckpt), "--wild", str(image_root / "wild"), "--out", str(out),
                 "--num-select", "20", "--student", arch, "--model-kwargs", *[f"{k}={v}" for k, v in kw.items()],
                 "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress",
                 "--test", str(image_root / "data/val")]) == 0
    evaluation = json.loads((out / "attnprobe-rank" / "evaluation.json").read_text())
    student, teacher = evaluation["student"], evaluation["teacher"]
    assert student["params"] == sum(p.numel() for p in _built(CNN).parameters())
    assert 0 < student["flops"] < teacher["flops"] and student["images_per_s"] > 0
    from attnprobe.io.checkpoints import read_checkpoint
    probe = read_checkpoint(out / "attnprobe-rank" / "student" / "best.pt")["info"]["probe"]
    assert (probe["kind"], probe["weight"]) == ("no-cls", 0.0)  # unset: off for a CNN (it did not help, README)
    html = (out / "report.html").read_text()
    assert "student against teacher" in html.lower() and ">resnet18<" in html
    assert "<td>off (no CLS token)</td>" in html  # the distillation table's probe term
    assert f"{student['params']:,}" in html


def _built(student):
    import timm
    arch, kwargs = student
    return timm.create_model(arch, num_classes=3, in_chans=3, **kwargs)


def test_unset_probe_weight_is_the_papers_for_a_vit_on_the_teachers_grid(teacher_ckpt, image_root, wild_selection,
                                                                           tmp_path):
    from attnprobe.io.checkpoints import load_checkpoint
    same_grid = ("vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2})
    _distill(teacher_ckpt, image_root, wild_selection, tmp_path / "vit", same_grid)
    probe = load_checkpoint(tmp_path / "vit" / "best.pt")[1]["probe"]
    assert (probe["kind"], probe["weight"], probe["student_grids"]) == ("vit", 0.8, [[4, 4]] * 3)
    _distill(teacher_ckpt, image_root, wild_selection, tmp_path / "coarse", COARSE_VIT)
    assert load_checkpoint(tmp_path / "coarse" / "best.pt")[1]["probe"]["weight"] == 0.0


def test_dafl_takes_a_cnn_student(teacher_ckpt, image_root, tmp_path):
    from attnprobe import api
    from attnprobe.io.checkpoints import load_checkpoint
    arch, kwargs = CNN
    api.dafl(teacher_ckpt, out=tmp_path / "dafl", student=arch, model_kwargs=kwargs, epochs=1, iters_per_epoch=2,
             batch_size=8, fidelity_images=12, workers=0, progress=False, device="cpu")
    model, info = load_checkpoint(tmp_path / "dafl" / "best.pt")
    assert (info["arch"], info["img_size"], info["in_chans"], info["method"]) == ("resnet18", 16, 3, "dafl")
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
