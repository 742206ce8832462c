"""Imported teachers work wherever a trained one does: a transformers DeiT with a distillation token (two
prefix tokens) and a 224-pixel DeiT-Base distilled into a DeiT-Tiny (the paper's ImageNet setting)."""
import argparse
import math

import pytest
import timm
import torch

from attnprobe import load_checkpoint
from attnprobe.app.cli import main
from attnprobe.io.images import eval_transform, load_image
from attnprobe.io.tables import read_table

from .conftest import CLASSES, TINY_STUDENT

COMMON = ["--workers", "0", "--no-progress"]


def eager_probe(model, x, block):
    """The probe recomputed the long way: the full attention matrix of `block`, its CLS row, the patch part
    (past every prefix token), cosine to the uniform vector; head 0."""
    captured = {}
    handle = model.blocks[block].norm1.register_forward_hook(lambda m, a, out: captured.update(x=out))
    with torch.no_grad():
        model(x)
    handle.remove()
    attn = model.blocks[block].attn
    B, N, C = captured["x"].shape
    q, k, _ = attn.qkv(captured["x"]).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    full = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)  # (B, H, N, N)
    probe = full[:, 0, 0, model.num_prefix_tokens:]
    return probe.sum(-1) / (probe.norm(dim=-1) * math.sqrt(probe.shape[-1]))


def test_transformers_deit_with_distillation_token_runs_every_command(image_root, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                     image_size=16, patch_size=4, num_labels=3,
                                     id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    torch.manual_seed(0)
    transformers.DeiTForImageClassificationWithTeacher(config).save_pretrained(tmp_path / "hf")
    data, wild = image_root / "data", image_root / "wild"
    teacher = tmp_path / "teacher.pt"
    assert main(["import-teacher", str(tmp_path / "hf"), "--out", str(teacher), "--val", str(data / "val"),
                 *COMMON]) == 0
    assert main(["score", "--teacher", str(teacher), "--wild", str(wild), "--out", str(tmp_path / "s.parquet"),
                 "--blocks", "1", *COMMON]) == 0
    df, _ = read_table(tmp_path / "s.parquet")
    model, info = load_checkpoint(teacher)
    assert model.num_prefix_tokens == 2 and info["classes"] == CLASSES
    rows = df.set_index("path").loc[["shapes/s0.png", "noise/n1.jpg"]]
    x = torch.stack([eval_transform(info)(load_image(wild / p, 3)) for p in rows.index])
    assert eager_probe(model, x, 1).tolist() == pytest.approx(rows["probe_1"].tolist(), abs=1e-5)

    assert main(["select", "--scores", str(tmp_path / "s.parquet"), "--num-select", "12",
                 "--out", str(tmp_path / "sel.parquet")]) == 0
    arch, kw = TINY_STUDENT
    assert main(["distill", "--teacher", str(teacher), "--wild", str(wild), "--selection", str(tmp_path / "sel.parquet"),
                 "--student", arch, "--model-kwargs", *[f"{k}={v}" for k, v in kw.items()], "--test", str(data / "val"),
                 "--epochs", "1", "--batch-size", "6", "--out", str(tmp_path / "student"), *COMMON]) == 0
    assert main(["evaluate", "--model", str(tmp_path / "student/best.pt"), "--data", str(data / "val"), *COMMON]) == 0


def test_deit_base_224_teacher_distils_into_a_deit_tiny(image_root, tmp_path):
    """A DeiT checkpoint of a full-size DeiT-Base/16 at 224 px (random weights, 3 classes) as released by DeiT."""
    torch.manual_seed(0)
    base = timm.create_model("deit_base_patch16_224", pretrained=False, num_classes=3).eval()
    torch.save({"model": base.state_dict(), "epoch": 299,
                "args": argparse.Namespace(model="deit_base_patch16_224", input_size=224)}, tmp_path / "deit_base.pth")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    teacher = tmp_path / "teacher.pt"
    assert main(["import-teacher", str(tmp_path / "deit_base.pth"), "--out", str(teacher), "--classes",
                 str(tmp_path / "classes.txt"), "--accuracy", "0.81", *COMMON]) == 0
    model, info = load_checkpoint(teacher)
    assert info["img_size"] == 224 and info["arch"] == "deit_base_patch16_224" and info["accuracy"] == 0.81
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - base(x)).abs().max() < 1e-5

    wild = image_root / "wild" / "shapes"  # 18 images; each is resized to 224 px
    assert main(["score", "--teacher", str(teacher), "--wild", str(wild), "--out", str(tmp_path / "s.parquet"),
                 "--batch-size", "9", *COMMON]) == 0
    assert main(["select", "--scores", str(tmp_path / "s.parquet"), "--num-select", "4",
                 "--out", str(tmp_path / "sel.parquet")]) == 0
    assert main(["distill", "--teacher", str(teacher), "--wild", str(wild), "--selection", str(tmp_path / "sel.parquet"),
                 "--student", "deit_tiny_patch16_224", "--test", str(image_root / "data" / "val" ), "--epochs", "1",
                 "--batch-size", "4", "--out", str(tmp_path / "student"), *COMMON]) == 0
    student, s_info = load_checkpoint(tmp_path / "student/best.pt")
    assert s_info["img_size"] == 224 and s_info["arch"] == "deit_tiny_patch16_224"
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in model.parameters()) / 10
