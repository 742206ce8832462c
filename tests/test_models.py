"""Presets, --model-kwargs parsing and self-describing checkpoints."""
import pytest
import torch

from attnprobe import AttnprobeError, load_checkpoint, save_checkpoint
from attnprobe.models import build_model, describe, parse_model_kwargs, resolve_model


@pytest.mark.parametrize("name,params", [("ap_teacher_32", 21.3e6), ("ap_student_32", 2.38e6)])
def test_paper_presets_have_the_paper_sizes(name, params):
    model = build_model(*resolve_model(name), num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.01
    assert model.patch_embed.num_patches == 64


def test_model_kwargs_parse_as_literals():
    assert parse_model_kwargs(["img_size=32", "mlp_ratio=2.5", "qk_norm=True", "act_layer=gelu", "x=(1, 2)"]) == \
        {"img_size": 32, "mlp_ratio": 2.5, "qk_norm": True, "act_layer": "gelu", "x": (1, 2)}
    with pytest.raises(AttnprobeError, match="key=value"):
        parse_model_kwargs(["depth"])


def test_overrides_reach_timm():
    arch, kwargs = resolve_model("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2})
    model = build_model(arch, kwargs, 7)
    assert len(model.blocks) == 2 and model.head.out_features == 7 and model.patch_embed.grid_size == (8, 8)
    with pytest.raises(AttnprobeError, match="unknown model"):
        resolve_model("not_a_model")
    with pytest.raises(AttnprobeError, match="CLS token"):
        build_model("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "class_token": False,
                                             "global_pool": "avg"}, 3)


def test_checkpoint_round_trip(tmp_path):
    arch, kwargs = resolve_model("ap_digits_student")
    model = build_model(arch, kwargs, 10)
    info = describe(model, arch, kwargs, [str(i) for i in range(10)], [0.5], [0.5], accuracy=0.9)
    save_checkpoint(tmp_path / "m.pt", model, info)
    loaded, got = load_checkpoint(tmp_path / "m.pt")
    assert not loaded.training
    for key in ("arch", "model_kwargs", "num_classes", "classes", "img_size", "in_chans", "mean", "std", "accuracy"):
        assert got[key] == info[key]
    assert got["img_size"] == 28 and got["in_chans"] == 1
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"hello")
    with pytest.raises(AttnprobeError, match="not a readable attnprobe checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(AttnprobeError, match="not an attnprobe checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(AttnprobeError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
