"""import-teacher: every source format, built from tiny real models and saved the way each library saves
them, comes back as the same model (same logits), with its classes, normalisation and accuracy."""
import argparse
import os

import pytest
import timm
import torch

from attnprobe import AttnprobeError, evaluate, import_teacher, load_checkpoint
from attnprobe.app.cli import main
from attnprobe.stages.import_teacher import CIFAR100, known_classes

from .conftest import CLASSES, TINY_TEACHER

SMALL = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
SMALL_ARGS = [f"{k}={v}" for k, v in SMALL.items()]


def randomised(model):
    """Perturb every parameter (LayerNorms included), so that any mapping mistake changes the logits."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def timm_model(arch="vit_tiny_patch16_224", num_classes=3, **kw):
    return randomised(timm.create_model(arch, pretrained=False, num_classes=num_classes, **{**SMALL, **kw}))


def logits_diff(out, reference, size=16, in_chans=3):
    model, _ = load_checkpoint(out)
    x = torch.randn(4, in_chans, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = reference(x)
        ref = ref.logits if hasattr(ref, "logits") else ref
        return (model(x) - ref).abs().max().item()


def test_deit_checkpoint_takes_model_by_default_and_ema_on_request(tmp_path):
    net, ema = timm_model(), timm_model()
    with torch.no_grad():
        ema.head.bias.add_(1.0)
    args = argparse.Namespace(model="vit_tiny_patch16_224", input_size=16, lr=5e-4, data_set="CIFAR")
    torch.save({"model": net.state_dict(), "model_ema": ema.state_dict(), "epoch": 299,
                "optimizer": torch.optim.AdamW(net.parameters()).state_dict(), "args": args}, tmp_path / "deit.pth")
    info = import_teacher(tmp_path / "deit.pth", out=tmp_path / "t.pt", model_kwargs=SMALL, accuracy=0.9665)
    assert logits_diff(tmp_path / "t.pt", net) < 1e-5
    assert info["source_kind"] == "DeiT-style checkpoint" and info["accuracy"] == 0.9665
    assert info["classes"] == ["0", "1", "2"] and info["weights"] == "model"
    import_teacher(tmp_path / "deit.pth", out=tmp_path / "e.pt", model_kwargs=SMALL, ema=True)
    assert logits_diff(tmp_path / "e.pt", ema) < 1e-5


def test_timm_train_checkpoint_says_its_architecture_size_and_normalisation(tmp_path):
    net = timm_model()
    args = argparse.Namespace(model="vit_tiny_patch16_224", model_kwargs={k: v for k, v in SMALL.items()
                                                                          if k != "img_size"},
                              img_size=16, in_chans=None, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    prefixed = {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}  # DDP around torch.compile
    torch.save({"epoch": 9, "arch": "vit_tiny_patch16_224", "state_dict": prefixed, "state_dict_ema": {},
                "args": args, "version": 2}, tmp_path / "model_best.pth.tar")
    info = import_teacher(tmp_path / "model_best.pth.tar", out=tmp_path / "t.pt")
    assert logits_diff(tmp_path / "t.pt", net) < 1e-5
    assert info["mean"] == pytest.approx([0.1, 0.2, 0.3]) and info["std"] == pytest.approx([0.4, 0.5, 0.6])
    assert info["img_size"] == 16 and info["accuracy"] is None


def test_bare_state_dict_and_safetensors_are_recognised_by_content(tmp_path):
    from safetensors.torch import save_file
    net = timm_model()
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "weights.bin")
    save_file(net.state_dict(), tmp_path / "weights.pth")  # a safetensors file with a misleading name
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nbird\n")
    for src in ("weights.bin", "weights.pth"):
        info = import_teacher(tmp_path / src, out=tmp_path / f"{src}.pt", model="vit_tiny_patch16_224",
                              model_kwargs=SMALL, classes=str(names), mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
        assert logits_diff(tmp_path / f"{src}.pt", net) < 1e-5
        assert info["classes"] == ["cat", "dog", "bird"] and info["std"] == pytest.approx([0.2] * 3)
    # With no normalisation given, timm's default for the architecture (vit_tiny: 0.5 / 0.5).
    info = import_teacher(tmp_path / "weights.bin", out=tmp_path / "d.pt", model="vit_tiny_patch16_224",
                          model_kwargs=SMALL)
    assert info["mean"] == pytest.approx(list(timm.get_pretrained_cfg("vit_tiny_patch16_224").mean))


def test_timm_folder_from_save_for_hf(tmp_path):
    from timm.models import save_for_hf
    net = timm_model(num_classes=4)
    save_for_hf(net, tmp_path / "folder", model_config={"label_names": ["a", "b", "c", "d"]},
                data_config={"mean": (0.3, 0.3, 0.3), "std": (0.1, 0.2, 0.3)}, safe_serialization=True)
    info = import_teacher(tmp_path / "folder", out=tmp_path / "t.pt")
    assert logits_diff(tmp_path / "t.pt", net) < 1e-5
    assert info["classes"] == ["a", "b", "c", "d"] and info["std"] == pytest.approx([0.1, 0.2, 0.3])


def test_hf_hub_name_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants
    from timm.models import save_for_hf
    net = timm_model()
    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--cifar-vit" / "snapshots" / ("0" * 40)
    save_for_hf(net, snapshot, safe_serialization=True)
    (cache / "models--someorg--cifar-vit" / "refs").mkdir()
    (cache / "models--someorg--cifar-vit" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    import_teacher("hf-hub:someorg/cifar-vit", out=tmp_path / "t.pt")
    assert logits_diff(tmp_path / "t.pt", net) < 1e-5
    with pytest.raises(AttnprobeError, match="not in the local Hugging Face cache"):
        import_teacher("hf-hub:someorg/not-downloaded", out=tmp_path / "u.pt")
    assert not (tmp_path / "u.pt").exists()


@pytest.mark.parametrize("kind", ["vit", "deit", "deit-with-teacher"])
def test_transformers_folders_give_the_same_logits(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    config_cls = transformers.ViTConfig if kind == "vit" else transformers.DeiTConfig
    model_cls = {"vit": transformers.ViTForImageClassification, "deit": transformers.DeiTForImageClassification,
                 "deit-with-teacher": transformers.DeiTForImageClassificationWithTeacher}[kind]
    config = config_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=16, patch_size=4, num_labels=3, id2label={0: "plane", 1: "car", 2: "bird"},
                        label2id={"plane": 0, "car": 1, "bird": 2})
    net = randomised(model_cls(config))
    net.save_pretrained(tmp_path / "hf")
    transformers.ViTImageProcessor(image_mean=[0.49, 0.48, 0.45], image_std=[0.25, 0.24, 0.26]).save_pretrained(
        tmp_path / "hf")
    info = import_teacher(tmp_path / "hf", out=tmp_path / "t.pt")
    assert logits_diff(tmp_path / "t.pt", net) < 1e-4
    assert info["classes"] == ["plane", "car", "bird"] and info["layer_norm_eps"] == 1e-12
    assert info["mean"] == pytest.approx([0.49, 0.48, 0.45]) and info["std"] == pytest.approx([0.25, 0.24, 0.26])
    model, _ = load_checkpoint(tmp_path / "t.pt")
    assert model.num_prefix_tokens == (1 if kind == "vit" else 2)


def test_val_measures_accuracy_as_evaluate_does_and_names_the_classes(teacher_ckpt, image_root, tmp_path):
    """A trained teacher's bare state dict, imported with --val, has the accuracy `evaluate` measures."""
    model, _ = load_checkpoint(teacher_ckpt)
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    arch, kw = TINY_TEACHER
    info = import_teacher(tmp_path / "sd.pth", out=tmp_path / "t.pt", model=arch, model_kwargs=kw,
                          val=image_root / "data" / "val", workers=0, progress=False)
    expected = evaluate(teacher_ckpt, image_root / "data" / "val", workers=0, progress=False)
    assert info["classes"] == CLASSES and info["accuracy"] == expected["top1"]
    assert "measured on" in info["accuracy_source"]


def test_known_class_sets():
    assert known_classes("cifar10")[0] == "airplane" and len(known_classes("cifar10")) == 10
    assert len(CIFAR100) == 100 and CIFAR100 == sorted(CIFAR100)  # cifar-100's fine names are alphabetical
    assert len(known_classes("imagenet")) == 1000 and known_classes("imagenet")[0] == "n01440764"


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/attnprobe-pwned",))


def _bad_sources(tmp_path):
    net = timm_model()
    torch.save({"model": net.state_dict(), "args": _Payload()}, tmp_path / "evil.pth")
    torch.save(net.state_dict(), tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("these are not weights\n")
    (tmp_path / "two.txt").write_text("a\nb\n")
    return tmp_path


@pytest.mark.parametrize("source,extra,message", [
    ("evil.pth", ["--model", "vit_tiny_patch16_224"], "refusing to unpickle code"),
    ("truncated.pth", ["--model", "vit_tiny_patch16_224"], "truncated"),
    ("notes.txt", ["--model", "vit_tiny_patch16_224"], "not a PyTorch or safetensors file"),
    ("good.pth", ["--model", "vit_small_patch16_224"], "keys missing"),
    ("good.pth", [], "does not name its architecture; pass --model"),
    ("good.pth", ["--model", "vit_tiny_patch16_224", "--model-kwargs", *SMALL_ARGS, "--classes", "TWO"],
     "--classes gives 2 names but the teacher's head has 3"),
    ("good.pth", ["--model", "vit_tiny_patch16_224", "--model-kwargs", *SMALL_ARGS, "--accuracy", "96.6"],
     "a fraction"),
])
def test_bad_sources_get_one_line_and_write_nothing(tmp_path, capsys, source, extra, message):
    root = _bad_sources(tmp_path)
    extra = [str(root / "two.txt") if a == "TWO" else a for a in extra]
    code = main(["import-teacher", str(root / source), "--out", str(root / "t.pt"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "t.pt").exists() and not os.path.exists("/tmp/attnprobe-pwned")


def test_val_of_other_classes_is_refused(teacher_ckpt, tmp_path, capsys):
    model, _ = load_checkpoint(teacher_ckpt)
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    for name in ("cat", "dog", "bird"):
        (tmp_path / "val" / name).mkdir(parents=True)
    (tmp_path / "names.txt").write_text("hbar\nsquare\nvbar\n")
    arch, kw = TINY_TEACHER
    code = main(["import-teacher", str(tmp_path / "sd.pth"), "--out", str(tmp_path / "t.pt"), "--model", arch,
                 "--model-kwargs", *[f"{k}={v}" for k, v in kw.items()], "--classes", str(tmp_path / "names.txt"),
                 "--val", str(tmp_path / "val"), "--no-progress", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "are not the model's" in err and not (tmp_path / "t.pt").exists(), err


def test_reference_checkpoint_names_its_model_by_the_reference_alias(tmp_path):
    """The reference's CIFAR teacher (`deit_base_patch4_32_teacher`, saved by DeiT's main.py) needs no --model."""
    from attnprobe.models import build_model, resolve_model
    net = randomised(build_model(*resolve_model("ap_teacher_32"), num_classes=10))
    args = argparse.Namespace(model="deit_base_patch4_32_teacher", input_size=32, nb_classes=10)
    torch.save({"model": net.state_dict(), "args": args, "epoch": 299}, tmp_path / "checkpoint.pth")
    info = import_teacher(tmp_path / "checkpoint.pth", out=tmp_path / "t.pt", classes="cifar10",
                          mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], accuracy=0.9665)
    assert logits_diff(tmp_path / "t.pt", net, size=32) < 1e-5
    assert info["params"] == sum(p.numel() for p in net.parameters()) and info["classes"][0] == "airplane"
