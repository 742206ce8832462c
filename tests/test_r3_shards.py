"""Issue 20, part G: a shard member is its name and a sample its key (repeats are read once, the first), the
`--wild` pattern means what it says, one export and one demo per output or cache, and messages that name the
real problem (an empty pool; the settings a strategy reads)."""
import io
import json
import subprocess
import sys
import tarfile
import time

import numpy as np
import pandas as pd
import pytest

from attnprobe import AttnprobeError, score
from attnprobe.api import reshard, select
from attnprobe.app.cli import main
from attnprobe.io.outputs import skipped_path, uids_path
from attnprobe.io.shards import list_shards
from attnprobe.io.tables import read_table, write_table
from attnprobe.io.tar_members import TarSamples
from attnprobe.method.selection import used_settings

from .conftest import CLASSES, CLI_ENV, shape_image

pytestmark = pytest.mark.usefixtures("one_thread")
KW = dict(batch_size=4, workers=0, progress=False, device="cpu")


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    shape_image(np.random.default_rng(seed), CLASSES[seed % 3], 16 + seed % 5).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path, members) -> None:
    """A plain tar of [(name, bytes), ...], in the order given (repeated names kept, as tar allows)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def uid(i: int) -> bytes:
    return json.dumps({"uid": f"{i:032x}"}).encode()


# a.jpg twice (a second sample `a` after `b`), c.png twice inside its sample: the first of each is the member
REPEATS = [("a.png", png(0)), ("a.json", uid(1)), ("b.png", png(1)), ("b.json", uid(2)), ("a.png", png(2)),
           ("a.txt", b"later caption"), ("c.png", png(3)), ("c.png", png(4)), ("d.png", png(5))]


@pytest.fixture
def snapshot(tmp_path):
    def files():
        return {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    return files


def one_line(capsys, argv, *words):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    return err[0]


def test_repeated_members_are_read_once_by_score_and_reshard(tmp_path, teacher_ckpt):
    (tmp_path / "pool").mkdir()
    write_tar(tmp_path / "pool" / "00000.tar", REPEATS)
    stream = TarSamples(tmp_path / "pool" / "00000.tar")
    samples = {s.key: [(m.name, m.data) for m in s.members] for s in stream}
    assert samples == {"a": REPEATS[:2], "b": REPEATS[2:4], "c": [REPEATS[6]], "d": [REPEATS[8]]}
    assert stream.repeats == ["a.png", "a.txt", "c.png"]
    assert stream.problem.startswith("repeated members: 3 member(s)") and "first: a.png, sample key a" in stream.problem

    summary = score(teacher_ckpt, tmp_path / "pool" / "00000.tar", tmp_path / "scores.parquet", **KW)
    df, _ = read_table(tmp_path / "scores.parquet")
    assert df.path.tolist() == ["00000/a.png", "00000/b.png", "00000/c.png", "00000/d.png"] and summary["scored"] == 4
    whole = (tmp_path / "pool" / "00000.tar").read_bytes()
    first = {"00000/a.png": png(0), "00000/b.png": png(1), "00000/c.png": png(3), "00000/d.png": png(5)}
    assert all(whole[o:o + s] == first[p] for p, o, s in zip(df.path, df.offset, df["size"]))
    skipped = pd.read_csv(skipped_path(tmp_path / "scores.parquet"))
    assert skipped.path.tolist() == [str(tmp_path / "pool" / "00000.tar")]
    assert skipped.reason.iat[0].startswith("repeated members") and "sample key a" in skipped.reason.iat[0]

    # reshard copies what was scored: one new member per row, the first of each, no two rows on one member
    select(tmp_path / "scores.parquet", out=tmp_path / "sel.parquet", num_select=4, strategy="random")
    r = reshard(tmp_path / "sel.parquet", tmp_path / "pool" / "00000.tar", out=tmp_path / "new", shard_size=10,
                progress=False)
    assert r["samples"] == 4 and r["members"] == 6  # a.png a.json b.png b.json c.png d.png
    moved, _ = read_table(tmp_path / "new" / "selection.parquet")
    chosen, _ = read_table(tmp_path / "sel.parquet")
    new = (tmp_path / "new" / "00000.tar").read_bytes()
    assert moved.path.is_unique and moved.offset.is_unique
    assert all(new[o:o + s] == first[p] for p, o, s in zip(chosen.path, moved.offset, moved["size"]))
    with tarfile.open(tmp_path / "new" / "00000.tar") as tar:
        names = tar.getnames()
    assert sorted(names) == ["a.json", "a.png", "b.json", "b.png", "c.png", "d.png"]


def test_reshard_refuses_two_rows_on_one_member_and_a_rewritten_shard(tmp_path, teacher_ckpt, capsys, snapshot):
    (tmp_path / "pool").mkdir()
    shard = tmp_path / "pool" / "00000.tar"
    write_tar(shard, [("a.png", png(0)), ("a.json", uid(1)), ("b.png", png(1)), ("c.png", png(2))])
    score(teacher_ckpt, shard, tmp_path / "scores.parquet", **KW)
    df, meta = read_table(tmp_path / "scores.parquet")
    # a table scored before repeats were read once: two rows `00000/a.png` at two offsets
    twice = pd.concat([df, df.iloc[[0]].assign(offset=df.offset.iat[2])], ignore_index=True)
    write_table(twice, tmp_path / "old.parquet", meta)
    before = snapshot()
    argv = ["reshard", "--wild", str(shard), "--no-progress", "--out", str(tmp_path / "new")]
    one_line(capsys, [*argv, "--selection", str(tmp_path / "old.parquet")],
             "lists 1 row path(s) twice (first: 00000/a.png)", "shard 00000", "sample key a", "rescore")
    assert snapshot() == before
    # the shard rewritten with its members in another order: same names and size, other offsets
    write_tar(shard, [("c.png", png(2)), ("b.png", png(1)), ("a.png", png(0)), ("a.json", uid(1))])
    before = snapshot()
    one_line(capsys, [*argv, "--selection", str(tmp_path / "scores.parquet")],
             "at another offset in their shard", "rewritten since it was scored", "rescore")
    assert snapshot() == before and not (tmp_path / "new").exists()


def test_keys_met_in_several_source_shards_stay_apart(tmp_path, teacher_ckpt):
    """Three shards with the same key `x` (and one named like the prefix of another) into one new shard."""
    (tmp_path / "pool").mkdir()
    for s in range(3):
        write_tar(tmp_path / "pool" / f"0000{s}.tar", [("x.png", png(s)), (f"0000{s}_x.png", png(s + 10))])
    wild = f"{tmp_path}/pool/*.tar"
    score(teacher_ckpt, wild, tmp_path / "scores.parquet", **KW)
    select(tmp_path / "scores.parquet", out=tmp_path / "sel.parquet", num_select=6, strategy="random")
    reshard(tmp_path / "sel.parquet", wild, out=tmp_path / "new", shard_size=100, progress=False)
    with tarfile.open(tmp_path / "new" / "00000.tar") as tar:
        names = tar.getnames()
        data = {n: tar.extractfile(n).read() for n in names}
    assert len(names) == len(set(names)) == 6
    moved, _ = read_table(tmp_path / "new" / "selection.parquet")
    chosen, _ = read_table(tmp_path / "sel.parquet")
    for old, new in zip(chosen.path, moved.path):
        stem, name = old.split("/")
        s = int(stem)
        assert data[new.split("/", 1)[1]] == (png(s) if name == "x.png" else png(s + 10))


def test_uids_missing_is_counted(tmp_path, teacher_ckpt):
    (tmp_path / "pool").mkdir()
    write_tar(tmp_path / "pool" / "00000.tar", [("a.png", png(0)), ("a.json", uid(1)), ("b.png", png(1)),
                                                ("c.png", png(2)), ("c.json", uid(3)), ("d.png", png(3))])
    score(teacher_ckpt, tmp_path / "pool" / "00000.tar", tmp_path / "scores.parquet", **KW)
    summary = select(tmp_path / "scores.parquet", out=tmp_path / "sel.parquet", num_select=4, strategy="random")
    assert summary["uids_missing"] == 2 and len(np.load(uids_path(tmp_path / "sel.parquet"))) == 2
    assert json.loads((tmp_path / "sel.json").read_text())["uids_missing"] == 2
    assert read_table(tmp_path / "sel.parquet")[1]["selection"]["uids_missing"] == 2


def test_a_pattern_means_what_it_says(tmp_path, teacher_ckpt, capsys, snapshot):
    d = tmp_path / "mixed"
    d.mkdir()
    write_tar(d / "00000.tar", [("a.png", png(0))])
    (d / "photo.png").write_bytes(png(1))
    with pytest.raises(AttnprobeError, match=r"matches 1 .tar shard\(s\) and 1 image\(s\), e.g. .*photo.png; pass "
                                             r"the shards alone \(--wild '.*mixed/\*.tar'\) or a folder of images"):
        list_shards(f"{d}/*")
    before = snapshot()
    one_line(capsys, ["score", "--teacher", str(teacher_ckpt), "--wild", f"{d}/*", "--out",
                      str(tmp_path / "s.parquet")], "matches 1 .tar shard(s) and 1 image(s)", "not both")
    assert snapshot() == before
    (d / "00000.tar").unlink()
    with pytest.raises(AttnprobeError, match=r"matches 1 image\(s\), e.g. .*photo.png; pass their folder"):
        list_shards(f"{d}/*.png")
    # a literal shard name with [..]: that file, not the pattern (which would match a1.tar)
    lit = tmp_path / "lit"
    lit.mkdir()
    write_tar(lit / "a[1].tar", [("a.png", png(0))])
    write_tar(lit / "a1.tar", [("b.png", png(1)), ("c.png", png(2))])
    assert [s.stem for s in list_shards(lit / "a[1].tar")] == ["a[1]"]
    assert [s.stem for s in list_shards(f"{lit}/a[1]*.tar")] == ["a1"]  # a pattern that names no file still globs
    summary = score(teacher_ckpt, lit / "a[1].tar", tmp_path / "lit.parquet", **KW)
    assert summary["scored"] == 1 and read_table(tmp_path / "lit.parquet")[0].path.tolist() == ["a[1]/a.png"]


HOLD = """
import sys, time
from attnprobe.io.lock import hold
lock = hold(sys.argv[1], "test", "")
print("held", flush=True)
time.sleep(60)
"""


def holding(path):
    """Another process holding the lock on `path` (io.lock: a record lock, per process)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=CLI_ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_one_export_per_out(tmp_path, capsys):
    from .test_export import _student
    ckpt = _student(tmp_path / "ckpt" / "best.pt")
    out = tmp_path / "exports" / "model"
    out.parent.mkdir()
    proc = holding(out.with_name(".model.lock"))  # an export to the same out, running
    try:
        line = one_line(capsys, ["export", str(ckpt), "--format", "timm", "--out", str(out)],
                        f"another export to {out} is running", "wait for it to finish, or pass another --out")
        assert "pid" in line
        assert [p.name for p in out.parent.iterdir()] == [".model.lock"]  # the holder's; no .partial
    finally:
        proc.kill()
        proc.wait()
    assert main(["export", str(ckpt), "--format", "timm", "--out", str(out), "--no-check"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # the lock file removed after


def test_one_demo_per_cache(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    cache = tmp_path / "cache"
    proc = holding(cache / ".lock")  # a demo on this cache, running
    try:
        t0 = time.time()
        one_line(capsys, ["demo", "--quick", "--out", str(tmp_path / "demo"), "--cache", str(cache)],
                 f"another attnprobe demo on the cache {cache} is running", "pass --cache DIR to use another cache")
        assert time.time() - t0 < 30  # refused at once, before building anything
        assert [p.name for p in cache.iterdir()] == [".lock"] and not (tmp_path / "demo").exists()
    finally:
        proc.kill()
        proc.wait()


def test_an_empty_pool_is_named(tmp_path, teacher_ckpt, capsys, snapshot):
    (tmp_path / "wild").mkdir()
    for i in range(3):
        (tmp_path / "wild" / f"{i}.png").write_bytes(b"not an image")
    summary = score(teacher_ckpt, tmp_path / "wild", tmp_path / "scores.parquet", **KW)
    assert summary["scored"] == 0 and summary["skipped"] == 3
    before = snapshot()
    line = one_line(capsys, ["select", "--scores", str(tmp_path / "scores.parquet"), "--out",
                             str(tmp_path / "sel.parquet"), "--num-select", "2"],
                    "has no rows: no image of its pool could be read", "scores.skipped.csv")
    assert "--num-select" not in line and snapshot() == before


def test_the_report_lists_only_the_settings_a_strategy_reads():
    from attnprobe.app.report_sections import selection_sections
    assert used_settings("attnprobe-rank") == () and used_settings("random") == ("seed",)
    assert used_settings("attnprobe") == ("w_attn", "w_out", "normalize")
    sel = pd.DataFrame({"path": ["a.png", "b.png"], "pred": [0, 1]})
    common = {"w_attn": 0.05, "w_out": 0.9, "normalize": "none", "seed": 0, "score_min": 0.1, "score_max": 0.2}
    strats = [{"name": n, "color": "k", "selection": sel, "summary": {"strategy": n, **common}}
              for n in ("attnprobe-rank", "attnprobe", "random")]
    c = {"strats": strats, "teacher": {"classes": ["x", "y"]}, "fig": lambda *a: "", "ranks": [], "wild": "."}
    html = selection_sections(c, sel, {})[0][1]
    rows = html.split("<tr>")[2:]
    assert "w_attn" not in rows[0] and "seed" not in rows[0] and "—" in rows[0]
    assert "w_attn 0.05, w_out 0.9, normalize none" in rows[1] and "seed" not in rows[1]
    assert "seed 0" in rows[2] and "w_attn" not in rows[2]


def test_distill_never_reads_a_stale_offset(tmp_path, teacher_ckpt, capsys, snapshot):
    """A shard rewritten with its members in another order (same names, same size): the selection's offsets
    now point at other members. distill refuses before training; a read by offset checks the member's header."""
    from attnprobe.io.tar_members import MemberLoader, member_index
    (tmp_path / "pool").mkdir()
    shard = tmp_path / "pool" / "00000.tar"
    long = "n" * 120 + "é.png"  # a PAX name: its own header holds it cut short, the é as '?'
    members = [("a.png", png(0)), ("b.png", png(1)), (long, png(2)), ("c.png", png(3))]
    write_tar(shard, members)
    score(teacher_ckpt, shard, tmp_path / "scores.parquet", **KW)
    select(tmp_path / "scores.parquet", out=tmp_path / "sel.parquet", num_select=4, strategy="random")
    df, _ = read_table(tmp_path / "sel.parquet")
    index = member_index(df, shard)
    loader = MemberLoader(index, 3)
    assert {p: loader.read(p) for p in df.path} == {f"00000/{n}": d for n, d in members}
    write_tar(shard, members[::-1])  # reordered in place
    with pytest.raises(OSError, match="holds another member at 00000/.*the shard was rewritten"):
        loader.read("00000/a.png")
    with pytest.raises(AttnprobeError, match=r"row 00000/.* is not where shard .* now holds it .*rewritten since it "
                                             r"was scored; rescore it"):
        member_index(df, shard)
    before = snapshot()
    one_line(capsys, ["distill", "--teacher", str(teacher_ckpt), "--wild", str(shard), "--selection",
                      str(tmp_path / "sel.parquet"), "--out", str(tmp_path / "run"), "--student",
                      "vit_tiny_patch16_224", "--epochs", "1", "--device", "cpu", "--no-progress",
                      "--probe-weight", "0"],
             "is not where shard", "rewritten since it was scored")
    assert snapshot() == before


def test_one_reshard_per_out(tmp_path, teacher_ckpt, capsys, snapshot):
    (tmp_path / "pool").mkdir()
    shard = tmp_path / "pool" / "00000.tar"
    write_tar(shard, [("a.png", png(0)), ("b.png", png(1))])
    score(teacher_ckpt, shard, tmp_path / "scores.parquet", **KW)
    out = tmp_path / "new"
    proc = holding(tmp_path / ".new.lock")  # a reshard into the same out, running
    try:
        before = snapshot()
        one_line(capsys, ["reshard", "--selection", str(tmp_path / "scores.parquet"), "--wild", str(shard), "--out",
                          str(out), "--no-progress"], f"another reshard into {out} is running", "pass another --out")
        assert snapshot() == before and not out.exists()
    finally:
        proc.kill()
        proc.wait()
    assert main(["reshard", "--selection", str(tmp_path / "scores.parquet"), "--wild", str(shard), "--out", str(out),
                 "--no-progress"]) == 0
    assert not (tmp_path / ".new.lock").exists() and sorted(p.name for p in out.iterdir()) == [
        "00000.tar", "00000_stats.json", "selection.parquet"]
