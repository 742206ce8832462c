"""distill from the decoded selection (issue 18): each selected image decoded once into SEL.decoded/ (or
--decode-cache, or RUN/decoded/ in `run`), then gathered and augmented in batches. The same seed gives the
same student, a kill -9 mid-run then --resume gives the uninterrupted one, shards and labeled mixing work,
a changed file is decoded again, and --no-decode-cache keeps today's path."""
import io
import json
import shutil
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch

import attnprobe
from attnprobe.app.cli import main
from attnprobe.errors import AttnprobeError
from attnprobe.io.checkpoints import read_checkpoint
from attnprobe.io.datasets import split_holdout
from attnprobe.io.images import decode_transform, load_image
from attnprobe.io.tables import read_table, write_table

from .conftest import CLASSES, TINY_STUDENT, cli, kill_after_first_epoch, shape_image
from .test_score_distributed import torchrun

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH, KWARGS = TINY_STUDENT
KW = dict(student=ARCH, model_kwargs=KWARGS, batch_size=8, workers=0, progress=False, device="cpu", seed=3)


def chunk_rows(folder) -> list[dict]:
    """Every row of every chunk of the decoded stores under `folder` (each decode is one row)."""
    return [r for p in sorted(folder.rglob("chunk-*.json")) for r in json.loads(p.read_text())]


def same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def metrics(run) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def store_bytes(folder, key) -> np.ndarray:
    """The newest decoded bytes of `key` under `folder` (a later chunk supersedes an earlier one)."""
    found = None
    for p in sorted(folder.rglob("chunk-*.json")):
        for j, r in enumerate(json.loads(p.read_text())):
            if r["key"] == key:
                found = np.load(p.with_suffix(".npy"))[j]
    return found


@pytest.fixture
def wild(image_root, tmp_path):
    """A copy of the wild pool (this test may rewrite its files) with one broken JPEG, and a selection of its
    images, each listed twice."""
    root = tmp_path / "wild"
    shutil.copytree(image_root / "wild", root)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg",
                                                                                                  ".bmp"))
    write_table(pd.DataFrame({"path": paths * 2}), tmp_path / "sel.parquet", {})
    return root, tmp_path / "sel.parquet", paths


def test_same_seed_same_student_from_the_decoded_selection(teacher_ckpt, wild, tmp_path, capsys):
    root, sel, paths = wild
    a = attnprobe.distill(teacher_ckpt, root, sel, out=tmp_path / "a", epochs=2, **KW)
    store = tmp_path / "sel.decoded"  # beside the selection by default
    decoded = chunk_rows(store)
    assert sorted(r["key"] for r in decoded) == paths  # each distinct image decoded once
    assert [r["key"] for r in decoded if not r["ok"]] == ["broken.jpg"]
    err = capsys.readouterr().err
    assert err.count("skipped 1 unreadable image") == 1 and "broken.jpg" in err  # listed once
    b = attnprobe.distill(teacher_ckpt, root, sel, out=tmp_path / "b", epochs=2, **KW)
    c = attnprobe.distill(teacher_ckpt, root, sel, out=tmp_path / "c", epochs=2, decoded_on="device", **KW)
    assert chunk_rows(store) == decoded  # reused: nothing decoded again
    runs = [read_checkpoint(tmp_path / n / "last.pt") for n in "abc"]
    for other in runs[1:]:
        same_state(runs[0]["model"], other["model"])
        same_state(runs[0]["noise"], other["noise"])
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b") == metrics(tmp_path / "c")
    assert a["holdout"] == b["holdout"] == c["holdout"] == 3  # 10% of the 31 distinct images
    held = split_holdout(paths * 2, 0.1, 3)[1]  # the unreadable image, if held out, is not measured
    assert [r["fidelity_n"] for r in metrics(tmp_path / "a")] == [3 - ("broken.jpg" in held)] * 2
    # the bytes of a row: the eval geometry applied by hand
    info = read_checkpoint(teacher_ckpt)["info"]
    first = paths[1] if paths[0] == "broken.jpg" else paths[0]
    by_hand = decode_transform(info, resize="crop")(load_image(root / first, info["in_chans"])).numpy()
    assert np.array_equal(store_bytes(store, first), by_hand)


def test_a_changed_file_is_decoded_again_and_nothing_else(teacher_ckpt, wild, tmp_path):
    root, sel, _ = wild
    attnprobe.distill(teacher_ckpt, root, sel, out=tmp_path / "a", epochs=1, decode_cache=tmp_path / "dc", **KW)
    before = chunk_rows(tmp_path / "dc")
    assert not (tmp_path / "sel.decoded").exists()  # --decode-cache elsewhere
    changed = "shapes/s0.png"
    shape_image(np.random.default_rng(99), "vbar").save(root / changed)
    attnprobe.distill(teacher_ckpt, root, sel, out=tmp_path / "a", epochs=1, decode_cache=tmp_path / "dc",
                      overwrite=True, **KW)
    after = chunk_rows(tmp_path / "dc")
    assert after[:len(before)] == before and [r["key"] for r in after[len(before):]] == [changed]
    info = read_checkpoint(teacher_ckpt)["info"]
    by_hand = decode_transform(info, resize="crop")(load_image(root / changed, info["in_chans"])).numpy()
    assert np.array_equal(store_bytes(tmp_path / "dc", changed), by_hand)


def test_resumed_after_sigkill_mid_run_equals_uninterrupted(teacher_ckpt, wild, tmp_path, capsys):
    root, _, paths = wild
    sel = tmp_path / "long.parquet"
    write_table(pd.DataFrame({"path": paths * 4}), sel, {})  # longer epochs, so that the kill lands mid-run
    epochs = 4

    def argv(out, *extra):
        return ["distill", "--teacher", str(teacher_ckpt), "--wild", str(root), "--selection", str(sel),
                "--student", ARCH, "--model-kwargs", *[f"{k}={v}" for k, v in KWARGS.items()], "--epochs",
                str(epochs), "--out", str(tmp_path / out), "--batch-size", "8", "--seed", "3", "--workers", "0",
                "--no-progress", "--device", "cpu", *extra]
    assert main(argv("whole")) == 0  # builds the decoded selection
    killed = cli(argv("killed"))
    kill_after_first_epoch(killed, tmp_path / "killed/metrics.jsonl")
    stopped_at = read_checkpoint(tmp_path / "killed/last.pt")["epoch"]
    assert stopped_at < epochs - 1, "the run finished before it was killed; make the epochs longer"
    resumed = cli(argv("killed", "--resume", str(tmp_path / "killed/last.pt")))
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    a, b = read_checkpoint(tmp_path / "whole/last.pt"), read_checkpoint(tmp_path / "killed/last.pt")
    assert b["epoch"] == epochs - 1
    same_state(a["model"], b["model"])
    same_state(a["noise"], b["noise"])
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "killed")
    # the resumed run keeps its path: --no-decode-cache draws its augmentation otherwise, and is refused
    capsys.readouterr()
    assert main(argv("killed", "--resume", str(tmp_path / "killed/last.pt"), "--no-decode-cache")) == 2
    assert "a resumed run keeps its settings" in capsys.readouterr().err


def test_no_decode_cache_keeps_todays_path(teacher_ckpt, wild, tmp_path):
    root, sel, _ = wild
    for name in ("a", "b"):
        attnprobe.distill(teacher_ckpt, root, sel, out=tmp_path / name, epochs=1, no_decode_cache=True, **KW)
    assert not (tmp_path / "sel.decoded").exists()
    same_state(read_checkpoint(tmp_path / "a/last.pt")["model"], read_checkpoint(tmp_path / "b/last.pt")["model"])
    assert read_checkpoint(tmp_path / "a/last.pt")["info"]["settings"]["no_decode_cache"] is True


def test_labeled_mixing_cropped_beside_stretched_wild_images(image_root, teacher_ckpt, wild, tmp_path):
    root, sel, paths = wild
    info = attnprobe.distill(teacher_ckpt, root, sel, out=tmp_path / "run", epochs=1, labeled=image_root / "data",
                             per_class=2, resize="stretch", **KW)
    assert info["holdout"] == 3  # the labeled images are never held out
    stores = sorted(p for p in (tmp_path / "sel.decoded").iterdir() if p.is_dir())
    assert len(stores) == 2  # the wild images stretched, the labeled ones cropped: two geometries
    kinds = {json.loads((p / "geometry.json").read_text())["resize"]: chunk_rows(p) for p in stores}
    assert sorted(r["key"] for r in kinds["stretch"]) == paths
    labeled = [r["key"] for r in kinds["crop"]]
    assert len(labeled) == 2 * len(CLASSES) and all(k.startswith(str(image_root / "data" / "train")) for k in labeled)
    t_info = read_checkpoint(teacher_ckpt)["info"]
    for key, resize in ((labeled[0], "crop"), (paths[1], "stretch")):
        image = load_image(key if resize == "crop" else root / key, t_info["in_chans"])
        by_hand = decode_transform(t_info, resize=resize)(image).numpy()
        assert np.array_equal(store_bytes(tmp_path / "sel.decoded", key), by_hand)
    # the two stores as one tensor in (device) memory: the same batches, the same student
    attnprobe.distill(teacher_ckpt, root, sel, out=tmp_path / "dev", epochs=1, labeled=image_root / "data",
                      per_class=2, resize="stretch", decoded_on="device", **KW)
    same_state(read_checkpoint(tmp_path / "run/last.pt")["model"], read_checkpoint(tmp_path / "dev/last.pt")["model"])


def tar_of(images: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in images.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()


def test_tar_shards_train_as_their_extracted_folder(teacher_ckpt, tmp_path):
    """The same images as tar-shard members and as files of a folder: the same decoded bytes, the same student."""
    rng = np.random.default_rng(5)
    shards, folder = tmp_path / "pool", tmp_path / "extracted"
    shards.mkdir()
    for s in range(2):
        images = {}
        for i in range(12):
            buf = io.BytesIO()
            shape_image(rng, CLASSES[i % 3], 16 + i % 5).save(buf, "PNG")
            images[f"{s:05d}{i:04d}.png"] = buf.getvalue()
            (folder / f"{s:05d}").mkdir(parents=True, exist_ok=True)
            (folder / f"{s:05d}" / f"{s:05d}{i:04d}.png").write_bytes(buf.getvalue())
        (shards / f"{s:05d}.tar").write_bytes(tar_of(images))
    kw = dict(KW, batch_size=4, workers=0)
    attnprobe.score(teacher_ckpt, f"{shards}/*.tar", tmp_path / "scores.parquet", batch_size=8, workers=0,
                    progress=False, device="cpu")
    attnprobe.select(tmp_path / "scores.parquet", out=tmp_path / "shard-sel.parquet", num_select=20)
    picked = read_table(tmp_path / "shard-sel.parquet")[0]["path"].tolist()
    write_table(pd.DataFrame({"path": picked}), tmp_path / "folder-sel.parquet", {})
    attnprobe.distill(teacher_ckpt, f"{shards}/*.tar", tmp_path / "shard-sel.parquet", out=tmp_path / "s", epochs=2,
                      **kw)
    attnprobe.distill(teacher_ckpt, folder, tmp_path / "folder-sel.parquet", out=tmp_path / "f", epochs=2, **kw)
    members = chunk_rows(tmp_path / "shard-sel.decoded")
    assert sorted(r["key"] for r in members) == sorted(picked) and all(len(r["identity"]) == 4 for r in members)
    for key in picked[:3]:
        assert np.array_equal(store_bytes(tmp_path / "shard-sel.decoded", key),
                              store_bytes(tmp_path / "folder-sel.decoded", key))
    same_state(read_checkpoint(tmp_path / "s/last.pt")["model"], read_checkpoint(tmp_path / "f/last.pt")["model"])


def test_run_decodes_the_union_of_its_strategies_once(image_root, teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--teacher", str(teacher_ckpt), "--wild", str(image_root / "wild"), "--out", str(out),
            "--num-select", "20", "--student", ARCH, "--model-kwargs", *[f"{k}={v}" for k, v in KWARGS.items()],
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress", "--seed", "3",
            "--device", "cpu", "--strategies", "attnprobe", "random"]
    assert main(argv) == 0
    selected = [set(read_table(out / s / "selection.parquet")[0]["path"]) for s in ("attnprobe", "random")]
    assert selected[0] != selected[1]
    rows = chunk_rows(out / "decoded")
    assert sorted(r["key"] for r in rows) == sorted(selected[0] | selected[1])  # the union, each once
    assert not list(out.glob("*/selection.decoded"))


def test_an_unwritable_decode_cache_is_one_line(teacher_ckpt, wild, tmp_path):
    root, sel, _ = wild
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(AttnprobeError, match="--decode-cache DIR on a writable disk, or --no-decode-cache"):
        attnprobe.distill(teacher_ckpt, root, sel, out=tmp_path / "a", epochs=1, decode_cache=tmp_path / "file", **KW)


def test_a_pool_with_no_readable_image_is_one_line(teacher_ckpt, tmp_path):
    (tmp_path / "bad").mkdir()
    for i in range(4):
        (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"not an image")
    write_table(pd.DataFrame({"path": [f"{i}.jpg" for i in range(4)]}), tmp_path / "sel.parquet", {})
    with pytest.raises(AttnprobeError, match="none of the 3 training images could be read"):
        attnprobe.distill(teacher_ckpt, tmp_path / "bad", tmp_path / "sel.parquet", out=tmp_path / "a", epochs=1,
                          **KW)


def test_two_processes_share_one_decoded_selection(teacher_ckpt, wild, tmp_path):
    """Under torchrun the ranks build one store together and each trains on its share of the decoded rows."""
    root, sel, paths = wild
    argv = ["distill", "--teacher", str(teacher_ckpt), "--wild", str(root), "--selection", str(sel), "--student",
            ARCH, "--model-kwargs", *[f"{k}={v}" for k, v in KWARGS.items()], "--epochs", "2", "--out",
            str(tmp_path / "run"), "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress"]
    proc = torchrun(2, argv, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("skipped 1 unreadable image") == 1  # rank 0 lists it, once
    assert sorted(r["key"] for r in chunk_rows(tmp_path / "sel.decoded")) == paths  # each image decoded once
    held = split_holdout(paths * 2, 0.1, 0)[1]
    assert [r["fidelity_n"] for r in metrics(tmp_path / "run")] == [3 - ("broken.jpg" in held)] * 2
    last = read_checkpoint(tmp_path / "run/last.pt")
    assert len(last["rng"]) == 2 and last["rng"][0]["loader"].tolist() != last["rng"][1]["loader"].tolist()
