"""prepare: official CIFAR-10 / CIFAR-100 / Tiny-ImageNet layouts (built here in their real formats, tiny)
into ImageFolder trees; archive and folder inputs agree; bad input fails cleanly."""
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnprobe import prepare
from attnprobe.errors import AttnprobeError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_FINE = ["apple", "aquarium_fish", "baby", "bear", "beaver"]  # a few of the real 100
CIFAR100_COARSE = ["fish", "fruit_and_vegetables"]
PER_CLASS = 2


# ---------------------------------------------------------------- builders of the official formats

def _batch(rng, label_key, n_classes, title, extra=None):
    labels = [c for c in range(n_classes) for _ in range(PER_CLASS)]
    rng.shuffle(labels)
    data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    batch = {b"batch_label": title.encode(), label_key: labels, b"data": data,
             b"filenames": [f"img_{title}_{i}.png".encode() for i in range(len(labels))]}
    batch.update(extra(labels) if extra else {})
    return batch


def _write_folder_and_tar(tmp_path, folder, members):
    """members {name: object}: pickled into tmp_path/extracted/<folder>/ and tmp_path/<folder>.tar.gz."""
    root = tmp_path / "extracted" / folder
    root.mkdir(parents=True)
    for name, obj in members.items():
        (root / name).write_bytes(pickle.dumps(obj, protocol=2))
    (root / "readme.html").write_text("<html></html>")
    archive = tmp_path / f"{folder}.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname=folder)
    return archive, root


@pytest.fixture
def cifar10(tmp_path):
    rng = np.random.default_rng(0)
    members = {f"data_batch_{i}": _batch(rng, b"labels", 10, f"training batch {i} of 5") for i in range(1, 6)}
    members["test_batch"] = _batch(rng, b"labels", 10, "testing batch 1 of 1")
    members["batches.meta"] = {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": 20,
                               b"num_vis": 3072}
    archive, root = _write_folder_and_tar(tmp_path, "cifar-10-batches-py", members)
    return archive, root, members


@pytest.fixture
def cifar100(tmp_path):
    rng = np.random.default_rng(1)
    coarse = lambda labels: {b"coarse_labels": [(l + 1) % 2 for l in labels]}  # noqa: E731, differs from fine
    members = {"train": _batch(rng, b"fine_labels", 5, "training", coarse),
               "test": _batch(rng, b"fine_labels", 5, "testing", coarse),
               "meta": {b"fine_label_names": [n.encode() for n in CIFAR100_FINE],
                        b"coarse_label_names": [n.encode() for n in CIFAR100_COARSE]}}
    archive, root = _write_folder_and_tar(tmp_path, "cifar-100-python", members)
    return archive, root, members


WNIDS = ["n01443537", "n01629819", "n02099601"]
WORDS = {"n01443537": "goldfish, Carassius auratus", "n01629819": "European fire salamander, Salamandra salamandra",
         "n02099601": "golden retriever", "n00001740": "entity"}  # words.txt covers all of ImageNet
VAL = [("val_0.JPEG", "n02099601"), ("val_1.JPEG", "n01443537"), ("val_2.JPEG", "n01629819"),
       ("val_3.JPEG", "n01443537")]


def _jpeg(rng, mode="RGB"):
    arr = rng.integers(0, 256, (64, 64, 3) if mode == "RGB" else (64, 64), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def tiny(tmp_path):
    """tiny-imagenet-200.zip and its extraction: {relative path: bytes} as in the official zip."""
    rng = np.random.default_rng(2)
    files = {"wnids.txt": "\n".join(WNIDS) + "\n",
             "words.txt": "".join(f"{w}\t{n}\n" for w, n in WORDS.items()),
             "val/val_annotations.txt": "".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in VAL),
             "test/images/test_0.JPEG": _jpeg(rng)}
    for w in WNIDS:
        files[f"train/{w}/{w}_boxes.txt"] = f"{w}_0.JPEG\t0\t0\t63\t63\n"
        for i in range(PER_CLASS):
            files[f"train/{w}/images/{w}_{i}.JPEG"] = _jpeg(rng, "L" if (w, i) == (WNIDS[1], 1) else "RGB")
    for f, _ in VAL:
        files[f"val/images/{f}"] = _jpeg(rng)
    archive, root = tmp_path / "tiny-imagenet-200.zip", tmp_path / "extracted" / "tiny-imagenet-200"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel, data in files.items():
            zf.writestr(f"tiny-imagenet-200/{rel}", data)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data.encode() if isinstance(data, str) else data)
    return archive, root, files


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _check_no_leftovers(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial*"))  # io.atomic's temporary folder


# ---------------------------------------------------------------- CIFAR

def _check_cifar(out, members, train_batches, val_batches, label_key, names):
    for split, batch_names in (("train", train_batches), ("val", val_batches)):
        i = 0
        for name in batch_names:
            batch = members[name]
            for row, label in zip(batch[b"data"], batch[label_key]):
                png = out / split / names[label] / f"{split}_{i:05d}.png"
                assert np.array_equal(_pixels(png), row.reshape(3, 32, 32).transpose(1, 2, 0))
                i += 1
        assert len(list((out / split).rglob("*.png"))) == i
        for c in names:
            assert len(list((out / split / c).glob("*.png"))) == PER_CLASS * len(batch_names)
    assert json.loads((out / "classes.json").read_text()) == {"classes": names, "names": {n: n for n in names}}
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "train", "val"]


def test_cifar10_archive_and_folders_round_trip(cifar10, tmp_path):
    archive, root, members = cifar10
    trees = []
    for k, src in enumerate([archive, root, root.parent]):  # archive, the folder, its parent as extracted
        out = tmp_path / f"out{k}"
        summary = prepare("cifar10", src, out, progress=False)
        assert summary == {"kind": "cifar10", "out": str(out), "classes": 10, "train": 100, "val": 20}
        _check_cifar(out, members, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", CIFAR10_NAMES)
        trees.append(_tree(out))
    assert trees[0] == trees[1] == trees[2]
    assert not list(tmp_path.glob(".*.partial"))


def test_cifar100_uses_fine_labels_and_names(cifar100, tmp_path):
    archive, root, members = cifar100
    out_a, out_f = tmp_path / "a", tmp_path / "f"
    assert prepare("cifar100", archive, out_a, progress=False)["train"] == 10
    summary = prepare("cifar100", root.parent, out_f, progress=False)
    assert summary == {"kind": "cifar100", "out": str(out_f), "classes": 5, "train": 10, "val": 10}
    _check_cifar(out_a, members, ["train"], ["test"], b"fine_labels", CIFAR100_FINE)
    assert _tree(out_a) == _tree(out_f)
    assert not any((out_a / "train" / c).exists() for c in CIFAR100_COARSE)


def test_prepare_into_existing_empty_out(cifar10, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert prepare("cifar10", cifar10[0], out)["val"] == 20  # default progress: tqdm, silent off a terminal


# ---------------------------------------------------------------- Tiny-ImageNet

def test_tinyimagenet_archive_and_folders(tiny, tmp_path):
    archive, root, files = tiny
    trees = []
    for k, src in enumerate([archive, root, root.parent]):
        out = tmp_path / f"out{k}"
        summary = prepare("tinyimagenet", src, out, progress=False)
        assert summary == {"kind": "tinyimagenet", "out": str(out), "classes": 3, "train": 6, "val": 4}
        trees.append(_tree(out))
    assert trees[0] == trees[1] == trees[2]
    out = tmp_path / "out0"
    meta = json.loads((out / "classes.json").read_text())
    assert meta == {"classes": WNIDS, "names": {w: WORDS[w] for w in WNIDS}}
    for f, w in VAL:  # val images in the folder of their annotated wnid, and only there
        png = out / "val" / w / f.replace(".JPEG", ".png")
        expected = np.asarray(Image.open(io.BytesIO(files[f"val/images/{f}"])).convert("RGB"))
        assert np.array_equal(_pixels(png), expected)
        assert [p.parent.name for p in (out / "val").rglob(png.name)] == [w]
    for w in WNIDS:
        assert sorted(p.name for p in (out / "train" / w).iterdir()) == [f"{w}_{i}.png" for i in range(PER_CLASS)]
        for i in range(PER_CLASS):
            expected = np.asarray(Image.open(io.BytesIO(files[f"train/{w}/images/{w}_{i}.JPEG"])).convert("RGB"))
            got = _pixels(out / "train" / w / f"{w}_{i}.png")
            assert got.shape == (64, 64, 3) and np.array_equal(got, expected)  # grayscale one made RGB
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "train", "val"]  # test/ skipped


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "tinyimagenet"])
def test_missing_src(kind, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AttnprobeError, match="does not exist"):
        prepare(kind, tmp_path / "nope.tar.gz", out, progress=False)
    _check_no_leftovers(out)


@pytest.mark.parametrize("kind, expect", [("cifar10", "data_batch_1"), ("cifar100", "train"),
                                          ("tinyimagenet", "wnids.txt")])
def test_folder_of_unknown_layout(kind, expect, tmp_path):
    src = tmp_path / "stuff"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    (src / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    with pytest.raises(AttnprobeError, match=f"is not an extracted .*missing .*{expect}") as e:
        prepare(kind, src, out, progress=False)
    assert "pass the official archive" in str(e.value)
    _check_no_leftovers(out)


def test_wrong_kind_for_folder(cifar10, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AttnprobeError, match="cifar-100-python/ folder .*missing train, test, meta"):
        prepare("cifar100", cifar10[1], out, progress=False)
    _check_no_leftovers(out)


def test_tar_missing_test_batch(cifar10, tmp_path):
    _, root, _ = cifar10
    archive = tmp_path / "broken.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for p in sorted(root.iterdir()):
            if p.name != "test_batch":
                tf.add(p, arcname=f"cifar-10-batches-py/{p.name}")
    out = tmp_path / "out"
    with pytest.raises(AttnprobeError, match="lacks cifar-10-batches-py/test_batch; re-download"):
        prepare("cifar10", archive, out, progress=False)
    _check_no_leftovers(out)


def test_corrupt_members(cifar10, tiny, tmp_path):
    _, root, _ = cifar10
    (root / "data_batch_3").write_bytes(b"not a pickle at all")
    out = tmp_path / "out"
    with pytest.raises(AttnprobeError, match="data_batch_3 is corrupt"):
        prepare("cifar10", root, out, progress=False)
    _check_no_leftovers(out)

    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(AttnprobeError, match="data_batch_3 is corrupt"):
        prepare("cifar10", root, out, progress=False)
    _check_no_leftovers(out)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (root / "data_batch_3").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(AttnprobeError, match="data_batch_3 is corrupt .*unexpected object builtins.print"):
        prepare("cifar10", root, out, progress=False)
    _check_no_leftovers(out)

    _, troot, _ = tiny
    (troot / "val" / "images" / "val_2.JPEG").write_bytes(b"\xff\xd8 truncated")  # fails mid-write
    with pytest.raises(AttnprobeError, match="cannot read image tiny-imagenet-200/val/images/val_2.JPEG"):
        prepare("tinyimagenet", troot, out, progress=False)
    _check_no_leftovers(out)

    (troot / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(AttnprobeError, match="lists val_2.JPEG of class 'n01629819', but that image is missing"):
        prepare("tinyimagenet", troot, out, progress=False)
    _check_no_leftovers(out)


def test_zip_missing_annotations_and_not_a_zip(tiny, tmp_path):
    archive, _, files = tiny
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as zf:
        for rel, data in files.items():
            if rel != "val/val_annotations.txt":
                zf.writestr(f"tiny-imagenet-200/{rel}", data)
    out = tmp_path / "out"
    with pytest.raises(AttnprobeError, match="lacks tiny-imagenet-200/val/val_annotations.txt"):
        prepare("tinyimagenet", broken, out, progress=False)
    _check_no_leftovers(out)
    with pytest.raises(AttnprobeError, match="cannot read .* as a zip archive"):
        prepare("tinyimagenet", tmp_path / "extracted" / "tiny-imagenet-200" / "wnids.txt", out, progress=False)
    _check_no_leftovers(out)
    with pytest.raises(AttnprobeError, match="cannot read .* as a tar archive"):
        prepare("cifar10", archive, out, progress=False)
    _check_no_leftovers(out)


def test_existing_nonempty_out(cifar10, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AttnprobeError, match="already exists; remove it or choose another OUT"):
        prepare("cifar10", cifar10[0], out, progress=False)
    assert _tree(out) == {"keep.txt": b"mine"}  # untouched
    assert not list(tmp_path.glob(".out.partial*"))


def test_unknown_kind(cifar10, tmp_path):
    with pytest.raises(AttnprobeError, match="mnist is not one of cifar10, cifar100, tinyimagenet"):
        prepare("mnist", cifar10[0], tmp_path / "out")
    _check_no_leftovers(tmp_path / "out")


def test_cli_prepare_feeds_train_teacher(cifar10, tmp_path, capsys):
    """`attnprobe prepare` on the official archive, then a teacher trains on the tree it wrote."""
    from attnprobe import load_checkpoint
    from attnprobe.app.cli import main

    archive, _, _ = cifar10
    assert main(["prepare", "cifar10", str(archive), str(tmp_path / "c10"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train"] == 100
    assert main(["train-teacher", "--data", str(tmp_path / "c10"), "--model", "vit_tiny_patch16_224",
                 "--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=16", "depth=1", "num_heads=2",
                 "--epochs", "1", "--out", str(tmp_path / "run"), "--workers", "0", "--no-progress"]) == 0
    _, info = load_checkpoint(tmp_path / "run/best.pt")
    assert info["classes"] == sorted(CIFAR10_NAMES) and info["img_size"] == 32
