"""Export of students that are not the teacher's kind of ViT: a CNN and a coarse-grid ViT, each distilled for one
epoch, written as a timm folder, an ONNX file and a transformers folder (the CNN through transformers' timm
wrapper), and each loaded back here with its own library and compared with the checkpoint's logits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnprobe import AttnprobeError, api, load_checkpoint

from .conftest import CLASSES
from .test_students import CNN, COARSE_VIT

STUDENTS = {"cnn": CNN, "coarse_vit": COARSE_VIT}




@pytest.fixture(scope="module", params=list(STUDENTS))
def student(request, teacher_ckpt, image_root, wild_selection, tmp_path_factory):
    """(name, best.pt) of a student distilled for one epoch with the probe term."""
    arch, kwargs = STUDENTS[request.param]
    run = tmp_path_factory.mktemp(request.param) / "run"
    api.distill(teacher_ckpt, image_root / "wild", wild_selection, out=run, student=arch, model_kwargs=kwargs,
                epochs=1, batch_size=8, workers=0, progress=False, device="cpu", probe_weight=0.8)
    return request.param, run / "best.pt"


def _reference(ckpt):
    """A fixed seeded input and the checkpoint's own logits for it."""
    model, _ = load_checkpoint(ckpt)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return x, model(x)


def _max_diff(got, want) -> float:
    return (torch.as_tensor(np.asarray(got)) - want).abs().max().item()


def test_timm_folder_gives_the_checkpoints_logits(student, tmp_path):
    import timm
    name, ckpt = student
    out = tmp_path / "timm"
    result = api.export(ckpt, out=out, format="timm")
    assert result["max_abs_diff"] <= 1e-4
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x, want = _reference(ckpt)
    with torch.no_grad():
        assert _max_diff(loaded(x), want) < 1e-4
    assert loaded.pretrained_cfg["label_names"] == CLASSES and list(loaded.pretrained_cfg["input_size"]) == [3, 16, 16]
    args = json.loads((out / "config.json").read_text())["model_args"]
    assert {k: args[k] for k in STUDENTS[name][1]} == STUDENTS[name][1]  # rebuilt as distilled, not as timm's default
    card = (out / "README.md").read_text()
    if name == "cnn":
        assert "(timm `ResNet`, no CLS token)" in card and "runs on others too" in card
        assert ("against the pooled-feature cosine maps of the student's stages act1, layer1, layer2 (8x8, 4x4, "
                "2x2)") in card
    else:
        assert "(timm `VisionTransformer`, CLS token, 2 x 2 patch grid)" in card and "runs on others" not in card
        assert "against the CLS-to-patch cosine maps of the student's blocks 0, 0, 1 (2x2, 2x2, 2x2)" in card
    assert f'timm.create_model("local-dir:{out.name}", pretrained=True)' in card


def test_onnx_file_gives_the_checkpoints_logits_and_carries_the_classes(student, tmp_path):
    import onnx
    import onnxruntime
    _, ckpt = student
    out = tmp_path / "model.onnx"
    assert api.export(ckpt, out=out, format="onnx")["max_abs_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x, want = _reference(ckpt)
    assert _max_diff(session.run(["logits"], {"pixel_values": x.numpy()})[0], want) < 1e-4
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == CLASSES and props["arch"] == STUDENTS[student[0]][0]


def test_transformers_folder_gives_the_checkpoints_logits(student, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    name, ckpt = student
    out = tmp_path / "hf"
    assert api.export(ckpt, out=out, format="transformers")["max_abs_diff"] <= 1e-4
    loaded = AutoModelForImageClassification.from_pretrained(out).eval()
    # a CLS-token ViT becomes transformers' own ViT (its 2 x 2 grid kept); a CNN goes through the timm wrapper
    want_class, want_processor = {"cnn": ("TimmWrapperForImageClassification", "TimmWrapperImageProcessor"),
                                  "coarse_vit": ("ViTForImageClassification", "ViTImageProcessor")}[name]
    assert type(loaded).__name__ == want_class
    assert type(AutoImageProcessor.from_pretrained(out)).__name__ == want_processor
    assert loaded.config.id2label == dict(enumerate(CLASSES))
    if name == "coarse_vit":
        assert loaded.config.patch_size == 8 and loaded.config.image_size == 16
    x, want = _reference(ckpt)
    with torch.no_grad():
        assert _max_diff(loaded(pixel_values=x).logits, want) < 1e-4
    card = (out / "README.md").read_text()
    assert "library_name: transformers\n" in card
    assert f'AutoModelForImageClassification.from_pretrained("{out.name}")' in card
    assert ("TimmWrapperForImageClassification" in card) == (name == "cnn")
    if name == "cnn":
        _pipeline_scores_as_attnprobe(out, ckpt)


def _pipeline_scores_as_attnprobe(out, ckpt):
    """transformers' pipeline on the folder: the class names as labels, and the checkpoint's probabilities for an
    image brought to its input by attnprobe's own eval transform."""
    import transformers

    from attnprobe.io.images import eval_transform
    classify = transformers.pipeline("image-classification", model=str(out))
    # a non-square image: the wrapper's processor must resize and crop as attnprobe does, then normalise
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    got = {row["label"]: row["score"] for row in classify(image)}
    model, info = load_checkpoint(ckpt)
    with torch.no_grad():
        probs = model(eval_transform(info)(image)[None]).softmax(-1)[0]
    assert sorted(got) == sorted(CLASSES)
    assert [got[c] for c in CLASSES] == pytest.approx(probs.tolist(), abs=1e-5)




def test_only_a_student_without_a_cls_token_needs_transformers_timm_wrapper(student, tmp_path, monkeypatch):
    import importlib.util
    name, ckpt = student
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == "transformers.models.timm_wrapper" else real(mod, *a))
    out = tmp_path / "hf"
    if name == "cnn":
        with pytest.raises(AttnprobeError, match=r"timm wrapper, which this transformers lacks: pip install -U "
                                                 r"'transformers>=4.48'"):
            api.export(ckpt, out=out, format="transformers")
        assert list(tmp_path.iterdir()) == []
    else:  # transformers' own ViT holds it
        assert api.export(ckpt, out=out, format="transformers", check=False)["files"]
