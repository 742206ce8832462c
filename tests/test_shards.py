"""Wild pools as tar shards (img2dataset / WebDataset layout): score, select, distill and reshard read them in
place, and give what the same image bytes extracted to a folder give."""
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pandas as pd
import pytest
import torch

from attnprobe import AttnprobeError, distill, score
from attnprobe.api import reshard, select
from attnprobe.app.cli import main
from attnprobe.io.folders import PathList
from attnprobe.io.outputs import parts_dir, skipped_path, uids_path
from attnprobe.io.selection import selected_paths
from attnprobe.io.shards import (
    Shard,
    datacomp_uids,
    deal_shards,
    expand_braces,
    list_shards,
    shard_weights,
)
from attnprobe.io.tables import read_table, write_table
from attnprobe.io.tar_members import TarSamples
from attnprobe.stages import score_parts
from attnprobe.stages.score_shards import finished_shards

from .conftest import CLASSES, TINY_STUDENT, shape_image
from .test_score_distributed import assert_same_table, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def image_bytes(rng, i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    shape_image(rng, CLASSES[i % 3], 16 + i % 7).save(buf, fmt)
    return buf.getvalue()


def uid_of(s: int, i: int) -> str:
    return f"{(s * 1000 + i) * 0x9E3779B97F4A7C15:032x}"[-32:]


def tar_bytes(samples) -> bytes:
    """A plain tar of [(key, [(suffix, bytes), ...]), ...], members in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for suffix, data in members:
                info = tarfile.TarInfo(f"{key}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """pool/0000{0..3}.tar(.gz) as img2dataset writes them, and extracted/<stem>/<member>: the image bytes of
    every member that can be read whole, in a folder.

    00000.tar: 5 samples with uids (json before or after the image), one image undecodable, one `.PNG`;
    00001.tar: .jpeg/.webp/.png, a sample without json, a .cls member, no _stats.json;
    00002.tar.gz: gzip-compressed, 3 samples; 00003.tar: cut off inside its 4th image (3 readable)."""
    root = tmp_path_factory.mktemp("shards")
    (root / "pool").mkdir()
    rng = np.random.default_rng(3)
    images = {}

    def sample(s, i, suffix, fmt, uid=True, json_first=False, extra=()):
        key = f"{s:05d}{i:04d}"
        img = image_bytes(rng, s * 10 + i, fmt) if fmt else b"this is not an image"
        images[f"{s:05d}/{key}{suffix}"] = img
        meta = [(".json", json.dumps({"uid": uid_of(s, i), "url": "http://x"}).encode())] if uid else []
        text = [(".txt", f"caption {key}".encode())]
        members = meta + [(suffix, img)] + text if json_first else [(suffix, img)] + text + meta
        return key, members + list(extra)

    shard0 = [sample(0, 0, ".jpg", "JPEG"), sample(0, 1, ".jpg", "JPEG", json_first=True),
              sample(0, 2, ".jpg", None), sample(0, 3, ".PNG", "PNG"), sample(0, 4, ".jpg", "JPEG")]
    shard1 = [sample(1, 0, ".jpeg", "JPEG"), sample(1, 1, ".webp", "WEBP", uid=False),
              sample(1, 2, ".png", "PNG", extra=[(".cls", b"2")]), sample(1, 3, ".jpg", "JPEG")]
    shard2 = [sample(2, i, ".jpg", "JPEG") for i in range(3)]
    shard3 = [sample(3, i, ".jpg", "JPEG") for i in range(5)]
    (root / "pool" / "00000.tar").write_bytes(tar_bytes(shard0))
    (root / "pool" / "00001.tar").write_bytes(tar_bytes(shard1))
    (root / "pool" / "00002.tar.gz").write_bytes(gzip.compress(tar_bytes(shard2)))
    whole = tar_bytes(shard3)
    cut = whole.index(images["00003/000030003.jpg"]) + 40  # inside the 4th image
    (root / "pool" / "00003.tar").write_bytes(whole[:cut])
    for stem, n in (("00000", 5), ("00002", 3), ("00003", 5)):
        (root / "pool" / f"{stem}_stats.json").write_text(json.dumps({"count": n + 2, "successes": n}))
    (root / "pool" / "00000.parquet").write_bytes(b"img2dataset's metadata: not a shard")
    for name in ("00003/000030003.jpg", "00003/000030004.jpg"):  # past the cut: not in the pool
        del images[name]
    for name, data in images.items():
        (root / "extracted" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "extracted" / name).write_bytes(data)
    return root


KW = dict(batch_size=3, workers=0, progress=False, device="cpu")


@pytest.fixture(scope="module")
def scored(pool, teacher_ckpt, tmp_path_factory):
    """The pool scored from its shards and from the extracted folder."""
    out = tmp_path_factory.mktemp("scored")
    summary = score(teacher_ckpt, f"{pool}/pool/{{00000..00001}}.tar", out / "probe.parquet", **KW)
    assert summary["scored"] == 8  # a brace pattern expanded here, as the shell would
    shards = score(teacher_ckpt, f"{pool}/pool/0000*", out / "shards.parquet", **KW)
    folder = score(teacher_ckpt, pool / "extracted", out / "folder.parquet", **KW)
    return out, shards, folder


def test_patterns_stats_and_dealing(pool):
    assert expand_braces("p/{00008..00011}.tar") == [f"p/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    shards = list_shards(f"{pool}/pool/*")
    assert [s.stem for s in shards] == ["00000", "00001", "00002", "00003"]  # not the .parquet
    assert [s.samples for s in shards] == [5, None, 3, 5]
    weights = shard_weights(shards)
    assert weights[0] == 5 and weights[1] == pytest.approx(shards[1].bytes * 13 / (shards[0].bytes + shards[2].bytes
                                                                                    + shards[3].bytes))
    with pytest.raises(AttnprobeError, match=r"2 shard\(s\) do not exist \(first: .*00004.tar\)"):
        list_shards(f"{pool}/pool/{{00003..00005}}.tar")
    with pytest.raises(AttnprobeError, match="matches no .tar shard"):
        list_shards(f"{pool}/nowhere/*.tar")
    with pytest.raises(AttnprobeError, match=r"holds tar shards, not images; pass the shards: --wild '.*/\*.tar'"):
        PathList.from_dir(pool / "pool")  # the shards' folder given as a folder of images
    # heaviest first to the least loaded rank: balanced where round-robin (0 2 4 | 1 3) is not
    assert deal_shards([0, 1, 2, 3, 4], [9, 1, 1, 8, 1], 2) == [[0, 2], [1, 3, 4]]
    hands = deal_shards(list(range(7)), [1] * 7, 3)
    assert sorted(sum(hands, [])) == list(range(7)) and [len(h) for h in hands] == [3, 2, 2]
    assert deal_shards([5], [1] * 6, 3) == [[5], [], []]  # fewer shards than ranks: the others go to the merge


def test_shard_scores_equal_folder_scores(pool, scored):
    out, shards, folder = scored
    a, meta = read_table(out / "shards.parquet")
    b = read_table(out / "folder.parquet")[0]
    assert shards["scored"] == 14 and shards["skipped"] == 2 and meta["shards"] == 4
    assert list(a.columns[:4]) == ["path", "uid", "offset", "size"]
    assert_same_table(a.drop(columns=["uid", "offset", "size"]), b)  # same rows, order and values
    assert a.path.iloc[7] == "00001/000010003.jpg" and a.path.str.endswith((".txt", ".json", ".cls")).sum() == 0
    uids = dict(zip(a.path, a.uid))
    assert uids["00000/000000001.jpg"] == uid_of(0, 1) and pd.isna(uids["00001/000010001.webp"])
    assert uids["00002/000020002.jpg"] == uid_of(2, 2)
    for path, offset, size in zip(a.path, a.offset, a["size"]):  # where each member's bytes lie
        stem = path.split("/")[0]
        shard = (pool / "pool" / f"{stem}.tar.gz").read_bytes() if stem == "00002" else None
        data = gzip.decompress(shard) if shard else (pool / "pool" / f"{stem}.tar").read_bytes()
        assert data[offset:offset + size] == (pool / "extracted" / path).read_bytes()
    skipped = pd.read_csv(skipped_path(out / "shards.parquet"))
    assert skipped.path.iloc[0] == "00000/000000002.jpg" and "UnidentifiedImageError" in skipped.reason.iloc[0]
    assert skipped.path.iloc[1].endswith("00003.tar") and skipped.reason.iloc[1] == "truncated"


def test_truncated_and_broken_shards(pool, tmp_path):
    stream = TarSamples(pool / "pool" / "00003.tar")
    assert [s.key for s in stream] == ["000030000", "000030001", "000030002"] and stream.problem == "truncated"
    gz = (pool / "pool" / "00002.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(gz[:len(gz) // 2])
    stream = TarSamples(tmp_path / "cut.tar.gz")
    assert len(list(stream)) < 3 and stream.problem == "truncated"
    (tmp_path / "empty.tar").write_bytes(b"")
    stream = TarSamples(tmp_path / "empty.tar")
    assert list(stream) == [] and "empty file" in stream.problem
    whole = (pool / "pool" / "00001.tar").read_bytes()
    end = whole.rindex(b"caption 000010003") + 512  # the last member's block, no end-of-archive block
    (tmp_path / "no_end.tar").write_bytes(whole[:end - end % 512])
    stream = TarSamples(tmp_path / "no_end.tar")
    assert len(list(stream)) == 4 and stream.problem == "truncated"


def test_a_part_is_trusted_while_its_shard_is_unchanged(tmp_path, scored):
    table = read_table(scored[0] / "shards.parquet")[0].head(0)
    import pyarrow as pa
    shard = Shard("x/00000.tar", "00000", 100, 5, None)
    score_parts.write_part(tmp_path, 0, pa.Table.from_pandas(table, preserve_index=False), [], marker=shard.marker())
    assert finished_shards(tmp_path, [shard]) == {0}
    assert finished_shards(tmp_path, [Shard("x/00000.tar", "00000", 100, 6, None)]) == set()  # rewritten since


SLOW = """
import sys, time
import attnprobe.stages.score_parts as s
write = s.write_part
def slow(*a, **k):
    write(*a, **k)
    time.sleep(1.0)
s.write_part = slow
from attnprobe.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def kill_after_first_part(argv, script, parts):
    """Run `attnprobe score` slowed down after each part; SIGKILL it once its first part is written."""
    proc = subprocess.Popen([sys.executable, str(script), *argv], env=ENV)
    try:
        deadline = time.time() + 120
        while not (parts.is_dir() and list(parts.glob("0*.parquet"))):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_and_rerun_gives_the_same_table(pool, teacher_ckpt, scored, tmp_path, workers):
    """Killed after its first part, the same command goes ahead at once, even while the killed run's DataLoader
    workers (--workers 2) are still exiting: the lock was the killed process's own, not theirs."""
    out = tmp_path / "scores.parquet"
    argv = ["score", "--teacher", str(teacher_ckpt), "--wild", f"{pool}/pool/0000*", "--out", str(out),
            "--batch-size", "3", "--workers", str(workers), "--no-progress", "--device", "cpu"]
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    parts = parts_dir(out)
    kill_after_first_part(argv, script, parts)
    assert 1 <= len(list(parts.glob("0*.parquet"))) < 4 and not out.exists()
    if workers:
        assert main(argv) == 0  # at once, the same command
    else:
        assert score(teacher_ckpt, f"{pool}/pool/0000*", out, **KW)["resumed_chunks"] >= 1
    assert not parts.exists()
    pd.testing.assert_frame_equal(read_table(out)[0], read_table(scored[0] / "shards.parquet")[0], check_exact=True)
    assert pd.read_csv(skipped_path(out)).equals(pd.read_csv(skipped_path(scored[0] / "shards.parquet")))


def test_two_gloo_processes_equal_one(pool, teacher_ckpt, scored, tmp_path):
    out = tmp_path / "two.parquet"
    proc = torchrun(2, ["score", "--teacher", str(teacher_ckpt), "--wild", f"{pool}/pool/0000*", "--out", str(out),
                        "--batch-size", "3", "--workers", "1", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("scored 14 images, skipped 2") == 1
    one, meta_one = read_table(scored[0] / "shards.parquet")
    two, meta_two = read_table(out)
    assert_same_table(one, two)
    assert list(one.uid) == list(two.uid) and list(one.offset) == list(two.offset)
    assert {k: v for k, v in meta_one.items() if k != "wild"} == {k: v for k, v in meta_two.items() if k != "wild"}


def test_select_writes_datacomp_uids(scored, tmp_path):
    out, _, _ = scored
    sel = tmp_path / "new" / "selection.parquet"  # a folder select creates
    summary = select(out / "shards.parquet", out=sel, num_select=10, strategy="random")
    chosen = read_table(sel)[0]
    uids = np.load(uids_path(sel))
    assert summary["uids_npy"] == str(uids_path(sel)) and uids.dtype == np.dtype("u8,u8")
    expected = sorted((int(u[:16], 16), int(u[16:], 16)) for u in chosen.uid if pd.notna(u))
    assert [tuple(int(x) for x in pair) for pair in uids] == expected and len(expected) >= 8
    assert datacomp_uids(["ab", None]) is None  # not DataComp's uids: no file, rather than a wrong one
    summary = select(out / "folder.parquet", out=sel, num_select=10)
    assert summary["uids_npy"] is None and not uids_path(sel).exists()  # a folder's: none, and no stale one


def plain_selection(scored, path):
    """The rows of the plain tar shards (distill reads members by offset: not from the gzip shard)."""
    df, meta = read_table(scored[0] / "shards.parquet")
    write_table(df[~df.path.str.startswith("00002/")].reset_index(drop=True), path, meta)
    return path


def test_distill_an_epoch_from_shards_as_from_files(pool, teacher_ckpt, scored, tmp_path):
    selection = plain_selection(scored, tmp_path / "sel.parquet")
    arch, kwargs = TINY_STUDENT
    kw = dict(student=arch, model_kwargs=kwargs, epochs=1, batch_size=4, holdout=2, workers=2, progress=False,
              device="cpu", probe_weight=0.5)
    a = distill(teacher_ckpt, f"{pool}/pool/0000*", selection, out=tmp_path / "shards", **kw)
    b = distill(teacher_ckpt, pool / "extracted", selection, out=tmp_path / "files", **kw)
    assert a["fidelity"] == b["fidelity"] and a["holdout"] == 2
    sa, sb = (torch.load(tmp_path / r / "last.pt", weights_only=False)["model"] for r in ("shards", "files"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the same images, order and augmentation
    rows = [json.loads((tmp_path / r / "metrics.jsonl").read_text()) for r in ("shards", "files")]
    assert rows[0].pop("seconds") and rows[1].pop("seconds") and rows[0] == rows[1]
    assert rows[0]["fidelity_n"] == 2 and rows[0]["kd"] > 0
    with pytest.raises(AttnprobeError, match="compressed.*attnprobe reshard"):
        selected_paths(scored[0] / "shards.parquet", f"{pool}/pool/0000*")
    with pytest.raises(AttnprobeError, match="shards that --wild .* does not name"):
        selected_paths(selection, f"{pool}/pool/00000.tar")


def test_reshard_round_trip(pool, teacher_ckpt, scored, tmp_path):
    sel = tmp_path / "selection.parquet"
    select(scored[0] / "shards.parquet", out=sel, num_select=9, strategy="random", seed=1)
    out = tmp_path / "resharded"
    assert main(["reshard", "--selection", str(sel), "--wild", f"{pool}/pool/0000*", "--out", str(out),
                 "--shard-size", "4", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00000_stats.json", "00001.tar",
                                                     "00001_stats.json", "00002.tar", "00002_stats.json",
                                                     "selection.json", "selection.parquet"]
    assert [json.loads((out / f"0000{i}_stats.json").read_text())["successes"] for i in range(3)] == [4, 4, 1]
    chosen = read_table(sel)[0]
    members = {}
    for i in range(3):
        with tarfile.open(out / f"0000{i}.tar") as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
    keys = {p.split("/")[1].split(".")[0] for p in chosen.path}
    for key in keys:  # every member of each selected sample, byte for byte: image, caption, json
        assert members[f"{key}.txt"] == f"caption {key}".encode()
    assert {n.split(".")[0] for n in members} == keys
    moved, _ = read_table(out / "selection.parquet")
    for old, new, offset, size in zip(chosen.path, moved.path, moved.offset, moved["size"]):
        assert members[new.split("/")[1]] == (pool / "extracted" / old).read_bytes()
        assert (out / f"{new.split('/')[0]}.tar").read_bytes()[offset:offset + size] == members[new.split("/")[1]]
    rescored = score(teacher_ckpt, f"{out}/*.tar", tmp_path / "again.parquet", **KW)
    assert rescored["scored"] == 9 and rescored["skipped"] == 0
    again = read_table(tmp_path / "again.parquet")[0].set_index("uid").loc[chosen.uid.dropna()]
    first = chosen.set_index("uid").loc[chosen.uid.dropna()]
    np.testing.assert_allclose(again.outlier, first.outlier, atol=1e-5)
    assert main(["reshard", "--selection", str(sel), "--wild", f"{pool}/pool/0000*", "--out", str(out)]) == 2
    with pytest.raises(AttnprobeError, match="holds the shards being read"):
        reshard(sel, f"{pool}/pool/0000*", out=pool / "pool")


def test_reshard_refuses_a_folder_with_files_and_a_damaged_summary(pool, scored, tmp_path, capsys):
    """OUT is built whole and renamed into place: a folder that holds files is refused, as is a damaged summary
    beside the selection; one line, exit 2, nothing written."""
    sel = tmp_path / "sel" / "selection.parquet"
    select(scored[0] / "shards.parquet", out=sel, num_select=4, strategy="random")
    argv = ["reshard", "--selection", str(sel), "--wild", f"{pool}/pool/0000*", "--no-progress"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for out, words in ((busy, ("already holds 1 file(s), e.g. notes.txt", "new or empty folder")),
                       (tmp_path / "new", ("selection.json", "damaged", "rerun `attnprobe select`"))):
        if out.name == "new":
            sel.with_suffix(".json").write_text('{"strategy": "ran')  # cut short
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        capsys.readouterr()
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_gpu_check_says_why_it_cannot_run_here(capsys):
    import runpy
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run benchmarks/gpu_check.py itself")
    check = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py"))
    assert check["main"]([]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]
