"""Issue 20, part E: what the user states wins or is refused in one line saying what the file records; what
the file does not say is filled by the convention of the program that wrote it, and the info says so."""
import argparse
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from attnprobe import AttnprobeError, import_teacher, load_checkpoint
from attnprobe.app.cli import main
from attnprobe.io.images import eval_transform

from .test_import import SMALL, SMALL_ARGS, logits_diff, randomised, timm_model

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def snapshot(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def refused(root, argv, capsys, *messages):
    """`attnprobe import-teacher ARGV`: exit 2, one line holding every message, no file written or changed."""
    before = snapshot(root)
    capsys.readouterr()
    code = main(["import-teacher", *map(str, argv), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for m in messages:
        assert m in err, err
    assert snapshot(root) == before
    return err


@pytest.fixture
def timm_folder(tmp_path):
    from timm.models import save_for_hf
    net = timm_model(num_classes=3)
    save_for_hf(net, tmp_path / "folder", model_config={"label_names": ["a", "b", "c"]},
                data_config={"mean": (0.3, 0.3, 0.3), "std": (0.1, 0.2, 0.3)}, safe_serialization=True)
    return tmp_path / "folder", net


def transformers_folder(path, *, processor=True, id2label=("plane", "car", "bird"), num_labels=3, edit=None):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=16, patch_size=4, num_labels=num_labels,
                                    id2label=dict(enumerate(id2label)), label2id={n: i for i, n in enumerate(id2label)})
    net = randomised(transformers.ViTForImageClassification(config))
    net.save_pretrained(path)
    if processor:
        transformers.ViTImageProcessor(image_mean=[0.49, 0.48, 0.45], image_std=[0.25, 0.24, 0.26]).save_pretrained(path)
    if edit:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(edit)
        (path / "config.json").write_text(json.dumps(cfg))
    return net


# 1. one rule: stated and not recorded -> used; the same -> fine; different -> refused naming the record

def test_timm_folder_refuses_a_different_mean_std_classes_and_img_size(timm_folder, tmp_path, capsys):
    folder, _ = timm_folder
    (tmp_path / "names.txt").write_text("x\ny\nz\n")
    out = ["--out", tmp_path / "t.pt"]
    refused(tmp_path, [folder, *out, "--mean", "0.5", "0.5", "0.5"], capsys,
            "--mean 0.5 0.5 0.5:", "records mean [0.3, 0.3, 0.3]", "pretrained_cfg.mean", "drop --mean")
    refused(tmp_path, [folder, *out, "--std", "0.5", "0.5", "0.5"], capsys, "records std [0.1, 0.2, 0.3]")
    refused(tmp_path, [folder, *out, "--classes", tmp_path / "names.txt"], capsys,
            "records classes ['a', 'b', 'c']", "label_names", "drop --classes")
    refused(tmp_path, [folder, *out, "--model-kwargs", "img_size=32"], capsys,
            "--model-kwargs img_size=32:", "records img_size [16, 16]", "drop img_size=32 from --model-kwargs")
    # The same values as the folder's: fine.
    (tmp_path / "same.txt").write_text("a\nb\nc\n")
    info = import_teacher(folder, out=tmp_path / "t.pt", mean=[0.3, 0.3, 0.3], std=[0.1, 0.2, 0.3],
                          classes=str(tmp_path / "same.txt"), model_kwargs={"img_size": 16})
    assert info["classes"] == ["a", "b", "c"] and info["assumed"] == []


def test_transformers_folder_refuses_a_different_mean_and_classes_and_fills_its_convention(tmp_path, capsys):
    transformers_folder(tmp_path / "hf")
    out = ["--out", tmp_path / "t.pt"]
    refused(tmp_path, [tmp_path / "hf", *out, "--mean", "0.5", "0.5", "0.5"], capsys,
            "records mean [0.49, 0.48, 0.45]", "preprocessor_config.json")
    refused(tmp_path, [tmp_path / "hf", *out, "--classes", "cifar10"], capsys,
            "--classes gives 10 names but the teacher's head has 3")
    (tmp_path / "names.txt").write_text("cat\ndog\nfrog\n")
    refused(tmp_path, [tmp_path / "hf", *out, "--classes", tmp_path / "names.txt"], capsys,
            "records classes ['plane', 'car', 'bird']", "id2label")
    # Without preprocessor_config.json the folder records no normalisation: --mean is used, std is
    # transformers' image-processor default, and the info says it was assumed.
    net = transformers_folder(tmp_path / "bare", processor=False)
    info = import_teacher(tmp_path / "bare", out=tmp_path / "b.pt", mean=[0.4, 0.4, 0.4])
    assert info["mean"] == pytest.approx([0.4] * 3) and info["std"] == pytest.approx([0.5] * 3)
    assert len(info["assumed"]) == 1 and info["assumed"][0].startswith("std [0.5, 0.5, 0.5] (the default of "
                                                                         "transformers'")
    assert logits_diff(tmp_path / "b.pt", net) < 1e-4


def test_timm_train_checkpoint_refuses_other_values_and_takes_stated_ones_it_lacks(tmp_path, capsys):
    net = timm_model()
    kw = {k: v for k, v in SMALL.items() if k != "img_size"}
    args = argparse.Namespace(model="vit_tiny_patch16_224", model_kwargs=kw, img_size=16, in_chans=None,
                              input_size=None, mean=(0.1, 0.2, 0.3), std=None)
    torch.save({"arch": "vit_tiny_patch16_224", "state_dict": net.state_dict(), "args": args}, tmp_path / "m.pth.tar")
    out = ["--out", tmp_path / "t.pt"]
    refused(tmp_path, [tmp_path / "m.pth.tar", *out, "--mean", "0.5", "0.5", "0.5"], capsys,
            "records mean [0.1, 0.2, 0.3] (args.mean)")
    refused(tmp_path, [tmp_path / "m.pth.tar", *out, "--model-kwargs", "depth=3"], capsys,
            "records depth 2 (args.model_kwargs)")
    info = import_teacher(tmp_path / "m.pth.tar", out=tmp_path / "t.pt", std=[0.2, 0.3, 0.4])  # std: not recorded
    assert info["mean"] == pytest.approx([0.1, 0.2, 0.3]) and info["std"] == pytest.approx([0.2, 0.3, 0.4])
    assert info["assumed"] == ["classes 0..2 (the source names none; pass --classes to name them)"]
    assert logits_diff(tmp_path / "t.pt", net) < 1e-5


# 2. what the file does not say: the convention of the program that wrote it, and the info says so

def test_deit_checkpoint_gets_imagenet_normalisation_and_says_it_assumed_it(tmp_path, capsys):
    net = timm_model()
    torch.save({"model": net.state_dict(), "epoch": 3,
                "args": argparse.Namespace(model="vit_tiny_patch16_224", input_size=16, nb_classes=3)},
               tmp_path / "checkpoint.pth")
    info = import_teacher(tmp_path / "checkpoint.pth", out=tmp_path / "t.pt", model_kwargs=SMALL)
    assert info["mean"] == pytest.approx(IMAGENET_MEAN) and info["std"] == pytest.approx(IMAGENET_STD)
    assert any(a.startswith("mean [0.485, 0.456, 0.406] (ImageNet's, as DeiT's main.py") for a in info["assumed"])
    assert any(a.startswith("classes 0..2") for a in info["assumed"])
    # Stated values are used (the file records none), and the input size it records holds.
    info = import_teacher(tmp_path / "checkpoint.pth", out=tmp_path / "s.pt", model_kwargs=SMALL,
                          mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert info["mean"] == [0.5, 0.5, 0.5] and not any(a.startswith(("mean", "std")) for a in info["assumed"])
    refused(tmp_path, [tmp_path / "checkpoint.pth", "--out", tmp_path / "u.pt", "--model-kwargs",
                       *[a for a in SMALL_ARGS if not a.startswith("img_size")], "img_size=32"], capsys,
            "records img_size 16 (args.input_size)")


def test_timm_train_checkpoint_input_size_gives_channels_and_size(tmp_path):
    net = timm_model(in_chans=1, img_size=(16, 24))
    kw = {k: v for k, v in SMALL.items() if k != "img_size"}
    args = argparse.Namespace(model="vit_tiny_patch16_224", model_kwargs=kw, img_size=None, in_chans=None,
                              input_size=(1, 16, 24), mean=None, std=None)
    torch.save({"arch": "vit_tiny_patch16_224", "state_dict": net.state_dict(), "args": args}, tmp_path / "m.pth.tar")
    info = import_teacher(tmp_path / "m.pth.tar", out=tmp_path / "t.pt")
    assert info["in_chans"] == 1 and info["img_size"] == [16, 24] and len(info["mean"]) == 1
    assert any("timm's default for vit_tiny_patch16_224" in a for a in info["assumed"])
    model, _ = load_checkpoint(tmp_path / "t.pt")
    x = torch.randn(2, 1, 16, 24)
    with torch.no_grad():
        assert (model(x) - net(x)).abs().max() < 1e-5


# 3. class names: a transformers id2label of another length, duplicates from any source

def test_transformers_id2label_of_another_length_is_refused(tmp_path, capsys):
    transformers_folder(tmp_path / "hf", edit={"id2label": {"0": "a", "1": "b", "2": "c", "3": "d"}})
    refused(tmp_path, [tmp_path / "hf", "--out", tmp_path / "t.pt"], capsys,
            "records 4 class names (config.json id2label) but its head has 3 outputs")


def test_duplicate_class_names_are_refused_from_every_source(timm_folder, tmp_path, capsys):
    folder, _ = timm_folder
    cfg = json.loads((folder / "config.json").read_text())
    cfg["label_names"] = ["a", "b", "a"]
    (folder / "config.json").write_text(json.dumps(cfg))
    refused(tmp_path, [folder, "--out", tmp_path / "t.pt"], capsys, "class name 'a' is given twice (index 0 and 2)")
    transformers_folder(tmp_path / "hf", id2label=("cat", "cat", "dog"))
    refused(tmp_path, [tmp_path / "hf", "--out", tmp_path / "t.pt"], capsys, "class name 'cat' is given twice")
    torch.save(timm_model().state_dict(), tmp_path / "sd.pth")
    (tmp_path / "dup.txt").write_text("x\ny\nx\n")
    refused(tmp_path, [tmp_path / "sd.pth", "--out", tmp_path / "t.pt", "--model", "vit_tiny_patch16_224",
                       "--model-kwargs", *SMALL_ARGS, "--classes", tmp_path / "dup.txt"], capsys,
            "--classes", "class name 'x' is given twice")


# 4. numbers and paths the settings and the API refuse

@pytest.mark.parametrize("extra,message", [(["--mean", "nan", "0.5", "0.5"], "--mean"),
                                           (["--std", "inf", "0.5", "0.5"], "--std"),
                                           (["--accuracy", "nan"], "--accuracy")])
def test_non_finite_values_are_refused(tmp_path, capsys, extra, message):
    torch.save(timm_model().state_dict(), tmp_path / "sd.pth")
    refused(tmp_path, [tmp_path / "sd.pth", "--out", tmp_path / "t.pt", "--model", "vit_tiny_patch16_224",
                       "--model-kwargs", *SMALL_ARGS, *extra], capsys, message)


def test_api_refuses_accuracy_true_and_out_onto_its_source(tmp_path):
    torch.save(timm_model().state_dict(), tmp_path / "sd.pth")
    before = snapshot(tmp_path)
    with pytest.raises(AttnprobeError, match="accuracy"):
        import_teacher(tmp_path / "sd.pth", out=tmp_path / "t.pt", model="vit_tiny_patch16_224",
                       model_kwargs=SMALL, accuracy=True)
    with pytest.raises(AttnprobeError):
        import_teacher(tmp_path / "sd.pth", out=tmp_path / "sd.pth", model="vit_tiny_patch16_224", model_kwargs=SMALL)
    assert snapshot(tmp_path) == before


# 5. a non-square teacher: crop keeps the aspect ratio, stretch does not

def test_crop_keeps_the_aspect_ratio_of_a_non_square_input():
    """A 60 x 60 image, black in its top and bottom 10 rows, white between. For a 32 x 48 (H x W) input,
    crop scales it by max(32/60, 48/60) = 0.8 to 48 x 48 and keeps the middle 32 rows: all white.
    stretch squeezes the whole image into 32 x 48: the black bands stay, 16% of the height each."""
    a = np.full((60, 60, 3), 255, np.uint8)
    a[:10], a[50:] = 0, 0
    img = Image.fromarray(a)
    info = {"img_size": [32, 48], "mean": [0.0] * 3, "std": [1.0] * 3}
    crop, stretch = eval_transform(info, resize="crop")(img), eval_transform(info, resize="stretch")(img)
    assert crop.shape == stretch.shape == (3, 32, 48)
    assert crop[:, 1:-1].min() > 0.95 and crop.mean() > 0.97
    assert stretch[:, :4].max() < 0.05 and stretch[:, -4:].max() < 0.05 and stretch[:, 8:24].min() > 0.95
    # A wide image: scale = max(32/40, 48/120) = 0.8 -> 32 x 96, the middle 48 columns kept.
    b = np.zeros((40, 120, 3), np.uint8)
    b[:, 36:84] = 255  # the middle 48 of 120 columns (scaled: 28.8..67.2 of 96; kept 24..72)
    out = eval_transform(info, resize="crop")(Image.fromarray(b))
    assert out.shape == (3, 32, 48) and out[:, :, 6:42].min() > 0.95 and out[:, :, :3].max() < 0.05


# 6. messages that point the right way

def test_a_zip_that_is_not_a_checkpoint_is_not_called_truncated(tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "weights.pth", "w") as z:
        z.writestr("readme.txt", "not weights")
    err = refused(tmp_path, [tmp_path / "weights.pth", "--out", tmp_path / "t.pt", "--model", "vit_tiny_patch16_224"],
                  capsys, "is a zip archive but not a PyTorch checkpoint")
    assert "truncated" not in err


@pytest.mark.parametrize("name,message", [("hf-hub:someorg/vit@v1.0", "a revision is not supported from the local "
                                                                     "cache"),
                                          ("hf-hub:", "is not a Hub model name"),
                                          ("hf-hub:a b", "is not a Hub model name")])
def test_hub_names_that_cannot_work_get_advice_that_does(tmp_path, capsys, name, message):
    err = refused(tmp_path, [name, "--out", tmp_path / "t.pt"], capsys, message)
    assert "hf download" not in err


@pytest.mark.parametrize("edit,message", [({"num_hidden_layers": 3}, "num_hidden_layers is 3, which needs 3 "
                                                                     "layers, but the weights have 2"),
                                          ({"num_hidden_layers": 1}, "num_hidden_layers is 1, which needs 1 "
                                                                     "layers, but the weights have 2"),
                                          ({"hidden_size": 48}, "hidden_size is 48"),
                                          ({"image_size": 32}, "image_size is 32, which needs 65"),
                                          ({"num_channels": 1}, "num_channels is 1")])
def test_a_transformers_config_that_disagrees_with_its_weights_is_named(tmp_path, capsys, edit, message):
    transformers_folder(tmp_path / "hf", edit=edit)
    err = refused(tmp_path, [tmp_path / "hf", "--out", tmp_path / "t.pt"], capsys,
                  "config.json disagrees with its weights", message)
    assert "plain ViT" not in err and not os.path.exists(tmp_path / "t.pt")
