"""Convert the official CIFAR-10, CIFAR-100 and Tiny-ImageNet layouts into ImageFolder trees, as the
reference's process_* scripts do: `out/train/<class>/*.png`, `out/val/<class>/*.png` and `out/classes.json`
({"classes": [folder names in label order], "names": {folder: human-readable name}}).

CIFAR folders are the class names (`airplane`, ...; CIFAR-100's fine labels), images `<split>_<index:05d>.png`
numbered through the split's batches in order. Tiny-ImageNet folders are the wnids, names from `words.txt`,
images `<original stem>.png` in RGB; its unlabeled test/ split is skipped. Label order in classes.json is the
dataset's own (CIFAR label index, wnids.txt line); ImageFolder sorts folders alphabetically instead, which
is fine: downstream code goes by folder name.

`src` is the official archive (read member by member, never extracted to disk), its extracted folder, or a
parent holding only that folder. The tree is built in `.<out>.partial` beside `out` and renamed into place
at the end (io.atomic.replacing_dir), so `out` is complete or absent. CIFAR pickles go through an unpickler that only builds arrays.
"""
from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
import zlib
from collections import defaultdict
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import AttnprobeError
from ..io.atomic import remove_stale, replacing_dir, write_json
from ..settings import PrepareSettings

CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], val=["test_batch"],
                    meta="batches.meta", labels=b"labels", names=b"label_names"),
    "cifar100": dict(folder="cifar-100-python", archive="cifar-100-python.tar.gz", train=["train"], val=["test"],
                     meta="meta", labels=b"fine_labels", names=b"fine_label_names"),
}
TINY_FILES = ("wnids.txt", "words.txt", "val/val_annotations.txt")
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, IndexError,
                pickle.UnpicklingError, tarfile.TarError, zipfile.BadZipFile, zlib.error)


def prepare(*, src, out, settings: PrepareSettings) -> dict:
    """Convert the official `settings.kind` dataset at `src` into an ImageFolder tree at `out`.

    Returns {"kind", "out", "classes": n_classes, "train": n_train_images, "val": n_val_images}."""
    kind = settings.kind
    src, out = Path(src), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AttnprobeError(f"{out} already exists; remove it or choose another OUT")
    remove_stale(out)  # left over from an interrupted run
    with replacing_dir(out) as partial:
        convert = _tinyimagenet if kind == "tinyimagenet" else _cifar
        classes, names, counts = convert(kind, src, partial, settings.progress)
        write_json(partial / "classes.json", {"classes": classes, "names": names}, sync=False)
    return {"kind": kind, "out": str(out), "classes": len(classes), **counts}


def _bar(total: int, kind: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="img", desc=f"prepare {kind}", disable=None if progress else True)


def _find_root(src: Path, files, folder: str) -> Path:
    """`src` if it holds `files`, else its only sub-folder if that does; otherwise an error naming what is missing."""
    subdirs = [d for d in src.iterdir() if d.is_dir() and not d.name.startswith(".")]
    for root in [src] + subdirs[:1] * (len(subdirs) == 1):
        if all((root / f).is_file() for f in files):
            return root
    root = subdirs[0] if len(subdirs) == 1 else src
    missing = [f for f in files if not (root / f).is_file()]
    raise AttnprobeError(f"{src} is not an extracted {folder}/ folder (missing {', '.join(missing)}); "
                         f"pass the official archive or the folder that holds these files")


class _NumpyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes and numpy arrays only, so a tampered batch file cannot run code."""

    def find_class(self, module, name):
        if (module.split(".")[0] == "numpy" and name in {"_reconstruct", "_frombuffer", "ndarray", "dtype", "scalar"}
                or (module, name) == ("_codecs", "encode")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")


def _unpickle(f, name: str, folder: str):
    try:
        return _NumpyUnpickler(f, encoding="bytes").load()
    except _READ_ERRORS as e:
        raise AttnprobeError(f"{folder}/{name} is corrupt ({e}); re-download the official archive") from None


def _load_cifar(src: Path, spec: dict) -> dict:
    """{member name: unpickled dict} for every batch and the meta file, from the tar.gz or the folder."""
    need, folder = [*spec["train"], *spec["val"], spec["meta"]], spec["folder"]
    if src.is_dir():
        root = _find_root(src, need, folder)
        return {name: _unpickle(io.BytesIO((root / name).read_bytes()), name, folder) for name in need}
    batches = {}
    try:
        with tarfile.open(src, "r|*") as tf:  # streaming: one pass, member by member
            for m in tf:
                parts = PurePosixPath(m.name).parts
                if m.isfile() and len(parts) <= 2 and parts[-1] in need:
                    batches[parts[-1]] = _unpickle(tf.extractfile(m), parts[-1], folder)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise AttnprobeError(f"cannot read {src} as a tar archive ({e}); "
                             f"pass the official {spec['archive']} or its extracted {folder}/ folder") from None
    missing = [n for n in need if n not in batches]
    if missing:
        raise AttnprobeError(f"{src} lacks {', '.join(f'{folder}/{n}' for n in missing)}; "
                             f"re-download the official {spec['archive']}")
    return batches


def _cifar_rows(batch: dict, name: str, spec: dict, n_classes: int):
    """(images N x 32 x 32 x 3 uint8, labels) of one batch, checked."""
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[spec["labels"]], dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        ok = data.ndim == 2 and labels.shape == (len(images),) and bool(np.all((labels >= 0) & (labels < n_classes)))
        problem = None if ok else "image and label counts or label values do not match"
    except _READ_ERRORS as e:
        problem = repr(e)
    if problem:
        raise AttnprobeError(f"{spec['folder']}/{name} is corrupt ({problem}); re-download the official archive")
    return images, labels


def _cifar(kind: str, src: Path, dst: Path, progress: bool):
    spec = CIFAR[kind]
    batches = _load_cifar(src, spec)
    try:
        classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in batches[spec["meta"]][spec["names"]]]
    except (KeyError, TypeError, UnicodeDecodeError):
        classes = []
    if not classes or any(c in ("", ".", "..") or "/" in c or "\\" in c for c in classes):
        raise AttnprobeError(f"{spec['folder']}/{spec['meta']} has no valid {spec['names'].decode()}; "
                             "re-download the official archive")
    rows = {name: _cifar_rows(batches[name], name, spec, len(classes)) for name in spec["train"] + spec["val"]}
    counts = {}
    with _bar(sum(len(labels) for _, labels in rows.values()), kind, progress) as bar:
        for split in ("train", "val"):
            for c in classes:
                (dst / split / c).mkdir(parents=True)
            i = 0
            for name in spec[split]:
                for image, label in zip(*rows[name]):
                    Image.fromarray(image).save(dst / split / classes[label] / f"{split}_{i:05d}.png")
                    i += 1
                    bar.update()
            counts[split] = i
    return classes, dict(zip(classes, classes)), counts


def _tinyimagenet(kind: str, src: Path, dst: Path, progress: bool):
    folder = "tiny-imagenet-200"
    if src.is_dir():
        root = _find_root(src, TINY_FILES, folder)
        files = {p.relative_to(root).as_posix() for sub in ("train", "val") for p in (root / sub).rglob("*")
                 if p.is_file()}
        return _write_tiny(files | set(TINY_FILES), lambda rel: (root / rel).read_bytes(), folder, dst, progress)
    try:
        zf = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError) as e:
        raise AttnprobeError(f"cannot read {src} as a zip archive ({e}); "
                             f"pass the official {folder}.zip or its extracted {folder}/ folder") from None
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        hits = sorted((n for n in names if PurePosixPath(n).name == "wnids.txt"), key=len)
        prefix = hits[0][:-len("wnids.txt")] if hits else ""
        files = {n[len(prefix):] for n in names if n.startswith(prefix)}
        missing = [f for f in TINY_FILES if f not in files]
        if missing:
            raise AttnprobeError(f"{src} lacks {', '.join(f'{folder}/{f}' for f in missing)}; "
                                 f"re-download the official {folder}.zip")
        return _write_tiny(files, lambda rel: zf.read(prefix + rel), folder, dst, progress)


def _write_tiny(files: set, read_bytes, folder: str, dst: Path, progress: bool):
    """Write the Tiny-ImageNet tree from `files` (paths relative to tiny-imagenet-200/) and a reader for them."""
    def read(rel):
        try:
            return read_bytes(rel)
        except _READ_ERRORS as e:
            raise AttnprobeError(f"cannot read {folder}/{rel} ({e}); re-download the official {folder}.zip") from None

    def lines(rel):
        return [line.strip() for line in read(rel).decode("utf-8", "replace").splitlines() if line.strip()]

    wnids = lines("wnids.txt")
    words = dict(line.split("\t", 1) for line in lines("words.txt") if "\t" in line)
    by_wnid = defaultdict(list)
    for rel in sorted(files):
        parts = rel.split("/")
        if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and not parts[3].startswith("."):
            by_wnid[parts[1]].append(rel)
    if not wnids:
        raise AttnprobeError(f"{folder}/wnids.txt lists no classes; re-download the official {folder}.zip")
    missing = [w for w in wnids if w not in by_wnid]
    if missing:
        raise AttnprobeError(f"{folder}/train/{missing[0]}/images has no images; re-download the official {folder}.zip")
    jobs = [("train", w, rel) for w in wnids for rel in by_wnid[w]]
    known = set(wnids)
    for line in lines("val/val_annotations.txt"):
        image, wnid = (line.split("\t") + [""])[:2]
        rel = f"val/images/{image}"
        if rel not in files or wnid not in known:
            raise AttnprobeError(f"{folder}/val/val_annotations.txt lists {image} of class {wnid!r}, but that "
                                 f"{'image' if rel not in files else 'wnid'} is missing; re-download {folder}.zip")
        jobs.append(("val", wnid, rel))
    for split in ("train", "val"):
        for w in wnids:
            (dst / split / w).mkdir(parents=True)
    with _bar(len(jobs), "tinyimagenet", progress) as bar:
        for split, wnid, rel in jobs:
            try:
                image = Image.open(io.BytesIO(read_bytes(rel))).convert("RGB")
            except _READ_ERRORS as e:
                raise AttnprobeError(f"cannot read image {folder}/{rel} ({e}); re-download {folder}.zip") from None
            image.save(dst / split / wnid / f"{PurePosixPath(rel).stem}.png")
            bar.update()
    counts = {s: sum(j[0] == s for j in jobs) for s in ("train", "val")}
    return wnids, {w: words.get(w, w).strip() for w in wnids}, counts
