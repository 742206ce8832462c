"""Export to timm, transformers and ONNX, each loaded back with its own library (tiny real models)."""
import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attnprobe import AttnprobeError, export, load_checkpoint, save_checkpoint
from attnprobe.models import build_model, describe

CLASSES = ["hbar", "square", "vbar"]
KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
MEAN, STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]


def _student(path, arch="vit_tiny_patch16_224", layer_norm_eps=None):
    """A student checkpoint whose every weight (LayerNorms, tokens, heads) is random, so a swapped or
    dropped tensor changes the logits."""
    torch.manual_seed(0)
    model = build_model(arch, KWARGS, 3, layer_norm_eps=layer_norm_eps)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    extra = {"layer_norm_eps": layer_norm_eps} if layer_norm_eps else {}
    info = describe(model, arch, KWARGS, CLASSES, MEAN, STD, accuracy=0.9, role="student", teacher="/x/teacher.pt",
                    selection="/x/sel.parquet", teacher_accuracy=0.95, **extra)
    save_checkpoint(path, model, info)
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return _student(tmp_path_factory.mktemp("ckpt") / "best.pt")


def _reference(ckpt, batch):
    model, _ = load_checkpoint(ckpt)
    x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        return x, model(x)


def _card(folder, library):
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and f"library_name: {library}\n" in card and "- attnprobe\n" in card
    assert "teacher.pt" in card and "/x/" not in card and "sel.parquet" in card
    assert "90.00%" in card and "95.00%" in card and "hbar, square, vbar" in card


def test_timm_folder_loads_with_timm_and_transformers(student, tmp_path):
    import timm
    from transformers import AutoModelForImageClassification
    out = tmp_path / "timm_model"
    result = export(student, format="timm", out=out)
    assert result["format"] == "timm" and result["max_abs_diff"] <= 1e-5
    assert sorted(Path(f).name for f in result["files"]) == ["README.md", "config.json", "model.safetensors"]
    x, want = _reference(student, 4)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, atol=1e-5, rtol=0)
    cfg = loaded.pretrained_cfg
    assert cfg["label_names"] == CLASSES and list(cfg["input_size"]) == [3, 16, 16]
    assert cfg["mean"] == MEAN and cfg["std"] == STD and cfg["interpolation"] == "bilinear"
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 3 and "num_classes" not in config["model_args"]
    assert "license" not in config["pretrained_cfg"] and "tag" not in config["pretrained_cfg"]
    # transformers wraps a timm folder as TimmWrapperForImageClassification
    wrapped = AutoModelForImageClassification.from_pretrained(out).eval()
    assert wrapped.config.id2label == dict(enumerate(CLASSES))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(pixel_values=x).logits, want, atol=1e-5, rtol=0)
    _card(out, "timm")


def test_transformers_folder(student, tmp_path):
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        ViTForImageClassification,
    )
    out = tmp_path / "hf"
    result = export(student, format="transformers", out=out)
    assert result["max_abs_diff"] <= 1e-5
    loaded = AutoModelForImageClassification.from_pretrained(out).eval()
    assert isinstance(loaded, ViTForImageClassification)
    assert loaded.config.id2label == dict(enumerate(CLASSES)) and loaded.config.label2id["vbar"] == 2
    x, want = _reference(student, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, want, atol=1e-5, rtol=0)
    processor = AutoImageProcessor.from_pretrained(out)
    assert list(processor.image_mean) == MEAN and list(processor.image_std) == STD
    assert (processor.size["height"], processor.size["width"]) == (16, 16) and int(processor.resample) == 2
    # the processor brings a PIL image to the model's normalised input: a uniform grey image of value v
    # becomes (v / 255 - mean) / std in every channel
    from PIL import Image
    pixels = processor(Image.new("RGB", (40, 30), (51, 51, 51)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16)
    torch.testing.assert_close(pixels[0, :, 5, 5], (0.2 - torch.tensor(MEAN)) / torch.tensor(STD), atol=1e-5, rtol=0)
    _card(out, "transformers")


def test_distilled_deit_to_transformers(tmp_path):
    from transformers import (
        AutoModelForImageClassification,
        DeiTForImageClassificationWithTeacher,
    )
    ckpt = _student(tmp_path / "deit.pt", arch="deit_tiny_distilled_patch16_224")
    export(ckpt, format="transformers", out=tmp_path / "hf")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(loaded, DeiTForImageClassificationWithTeacher)
    x, want = _reference(ckpt, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, want, atol=1e-5, rtol=0)


def test_onnx_file_has_a_dynamic_batch(student, tmp_path):
    import onnx
    import onnxruntime
    out = tmp_path / "model.onnx"
    result = export(student, format="onnx", out=out)
    assert result["files"] == [str(out)] and result["max_abs_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 5):
        x, want = _reference(student, batch)
        got = session.run(["logits"], {"pixel_values": x.numpy()})[0]
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == CLASSES and json.loads(props["mean"]) == MEAN


def test_check_false_skips_the_comparison(student, tmp_path):
    result = export(student, format="onnx", out=tmp_path / "m.onnx", check=False)
    assert result["max_abs_diff"] is None and (tmp_path / "m.onnx").is_file()


def test_bad_input_writes_nothing(student, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(AttnprobeError, match="exists; pass a new path or remove it"):
        export(student, format="timm", out=taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and (taken / "keep.txt").read_text() == "mine"
    with pytest.raises(AttnprobeError, match="timm, transformers, onnx"):
        export(student, format="keras", out=tmp_path / "k")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AttnprobeError, match="not a readable attnprobe checkpoint"):
        export(tmp_path / "junk.pt", format="onnx", out=tmp_path / "j.onnx")
    # imported from transformers: LayerNorm eps 1e-12, which a timm config cannot carry
    imported = _student(tmp_path / "imported.pt", layer_norm_eps=1e-12)
    with pytest.raises(AttnprobeError, match="--format transformers or onnx"):
        export(imported, format="timm", out=tmp_path / "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported.pt", "junk.pt", "taken"]


def test_imported_eps_survives_transformers_export(tmp_path):
    from transformers import AutoModelForImageClassification
    ckpt = _student(tmp_path / "imported.pt", layer_norm_eps=1e-12)
    export(ckpt, format="transformers", out=tmp_path / "hf")
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "hf").config.layer_norm_eps == 1e-12


def test_failed_check_leaves_nothing(student, tmp_path, monkeypatch):
    export_module = importlib.import_module("attnprobe.stages.export")
    monkeypatch.setitem(export_module._CHECKERS, "onnx", lambda model, info, path: 1.0)
    with pytest.raises(AttnprobeError, match="differ"):
        export(student, format="onnx", out=tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_library_is_named(student, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(AttnprobeError, match=r"needs onnxruntime: pip install 'attnprobe\[onnx\]'"):
        export(student, format="onnx", out=tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
