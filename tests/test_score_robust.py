"""The scoring pass on a dirty pool (broken, odd and huge files), killed and restarted, and twice alike."""
import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from attnprobe import load_checkpoint, score
from attnprobe.app.cli import main
from attnprobe.io.checkpoints import save_checkpoint
from attnprobe.io.folders import PathList
from attnprobe.io.images import eval_transform, load_image
from attnprobe.io.outputs import parts_dir, skipped_path
from attnprobe.io.tables import read_table
from attnprobe.models import build_model, describe
from attnprobe.settings import ScoreSettings
from attnprobe.stages.scoring import score_pool

from .conftest import CLASSES, TINY_TEACHER, shape_image

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(path, width=10000, height=9000):
    """A real, valid 1-bit PNG of width x height (90 M pixels, past PIL's bomb limit), written in a few MB."""
    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) +
                     png_chunk(b"IEND", b""))


def to_8bit(a16: np.ndarray) -> np.ndarray:
    """The expected 16 -> 8 bit conversion: full range scaled, rounded (not clipped at 255)."""
    return np.rint(a16.astype(np.float64) * 255 / 65535).astype(np.uint8)


G16 = (np.arange(40 * 30).reshape(30, 40) * 54).astype(np.uint16)  # spans 0..64746


def make_pool(root):
    """Every kind of odd file; returns (readable names, {unreadable name: reason fragment})."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((64, 48), Image.BILINEAR)
    photo.save(root / "a_rgb.jpg", quality=90)
    photo.convert("CMYK").save(root / "cmyk.jpg", quality=90)
    Image.fromarray(G16).save(root / "gray16.png")
    assert Image.open(root / "gray16.png").mode == "I;16"
    pal = Image.fromarray(rng.integers(0, 4, (20, 20), dtype=np.uint8), mode="L").convert("P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255] + [0] * 756)
    pal.save(root / "palette_trns.png", transparency=0)
    la = Image.merge("LA", [Image.new("L", (20, 20), 200), Image.linear_gradient("L").resize((20, 20))])
    la.save(root / "la.png")
    Image.merge("RGBA", [*photo.split(), Image.new("L", photo.size, 128)]).save(root / "rgba.png")
    shape_image(rng, "hbar").convert("L").save(root / "gray.png")
    photo.save(root / "rgb.png")
    readable = ["a_rgb.jpg", "cmyk.jpg", "gray.png", "gray16.png", "la.png", "palette_trns.png", "rgb.png",
                "rgba.png"]

    buf = io.BytesIO()
    photo.resize((256, 192)).save(buf, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not a picture\n")
    good = bytearray((root / "rgb.png").read_bytes())
    good[29] ^= 0xFF  # a byte of the IHDR chunk's CRC
    (root / "badcrc.png").write_bytes(bytes(good))
    huge_png(root / "bomb.png")
    bad_name = os.fsencode(root) + b"/bad\xffname.png"  # a file name that is not UTF-8
    with open(bad_name, "wb") as f:
        f.write((root / "rgb.png").read_bytes())
    unreadable = {"truncated.jpg": "truncated", "zero.jpg": "cannot identify", "text.png": "cannot identify",
                  "badcrc.png": "cannot identify", "bomb.png": "DecompressionBomb",
                  os.fsdecode(b"bad\xffname.png"): "UnicodeEncodeError"}
    return readable, unreadable


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirty") / "wild"
    readable, unreadable = make_pool(root)
    return root, readable, unreadable


@pytest.fixture(scope="module")
def gray_teacher(tmp_path_factory):
    """A one-channel teacher (random weights: only the input conversion is under test)."""
    arch, kw = TINY_TEACHER
    kw = {**kw, "in_chans": 1}
    torch.manual_seed(0)
    model = build_model(arch, kw, len(CLASSES))
    path = tmp_path_factory.mktemp("gray") / "gray.pt"
    save_checkpoint(path, model, describe(model, arch, kw, CLASSES, [0.5], [0.25]))
    return path


def read_skipped(out):
    """{path: reason}, the paths as the pool lists them (the file is UTF-8: a name's non-UTF-8 bytes are written
    as backslash escapes; mapped back here)."""
    with open(skipped_path(out), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "reason"]
    unescape = lambda p: os.fsdecode(p.encode("utf-8").decode("unicode_escape").encode("latin-1"))  # ASCII names here
    return {unescape(p) if "\\x" in p else p: r for p, r in rows[1:]}


@pytest.mark.parametrize("teacher_kind", ["rgb", "gray"])
def test_dirty_pool_scored_and_skipped(pool, teacher_kind, teacher_ckpt, gray_teacher, tmp_path, capsys):
    root, readable, unreadable = pool
    teacher = teacher_ckpt if teacher_kind == "rgb" else gray_teacher
    out = tmp_path / "scores.parquet"
    assert main(["score", "--teacher", str(teacher), "--wild", str(root), "--out", str(out), "--chunk-size", "4",
                 "--batch-size", "3", "--workers", "2" if teacher_kind == "rgb" else "0", "--no-progress"]) == 0
    assert f"scored {len(readable)} images, skipped {len(unreadable)} unreadable" in capsys.readouterr().out
    df, meta = read_table(out)
    assert list(df.path) == sorted(readable)  # every readable file, in pool order, once
    assert meta["scored"] == len(readable) and meta["skipped"] == len(unreadable)
    assert df[["outlier", "probe_0", "probe_1"]].notna().all().all() and np.isfinite(df.outlier).all()
    skipped = read_skipped(out)
    assert set(skipped) == set(unreadable)
    for name, fragment in unreadable.items():
        assert fragment in skipped[name], (name, skipped[name])
    assert not parts_dir(out).exists()

    # each row is the teacher applied to the correctly converted image
    model, info = load_checkpoint(teacher)
    x = torch.stack([eval_transform(info)(load_image(root / p, info["in_chans"], 16)) for p in df.path])
    with torch.no_grad():
        log_p = model(x).log_softmax(1)
    np.testing.assert_array_equal(df.pred.to_numpy(), log_p.argmax(1).numpy())
    np.testing.assert_allclose(df.outlier.to_numpy(), -log_p.max(1).values.numpy(), atol=1e-5)

    # the 16-bit image went in as its 8-bit scaling, on every channel the teacher has
    expected = Image.fromarray(to_8bit(G16))
    if info["in_chans"] == 3:
        expected = expected.convert("RGB")
    t = eval_transform(info)
    assert torch.equal(t(load_image(root / "gray16.png", info["in_chans"], 16)), t(expected))


def test_colour_conversions(pool):
    root = pool[0]
    g16 = np.asarray(load_image(root / "gray16.png", 1))
    np.testing.assert_array_equal(g16, to_8bit(G16))
    assert g16.max() == 252 and len(np.unique(g16)) > 200  # scaled, not clipped at 255
    rgb16 = np.asarray(load_image(root / "gray16.png", 3))
    assert rgb16.shape == (30, 40, 3) and (rgb16 == g16[..., None]).all()

    cmyk = load_image(root / "cmyk.jpg", 3)
    assert cmyk.mode == "RGB" and np.array_equal(np.asarray(cmyk), np.asarray(Image.open(root / "cmyk.jpg").convert("RGB")))
    photo = np.asarray(Image.open(root / "rgb.png"), dtype=np.float64)
    assert np.abs(np.asarray(cmyk, dtype=np.float64) - photo).mean() < 4  # the same picture, not inverted

    pal = np.asarray(load_image(root / "palette_trns.png", 3))
    index = np.asarray(Image.open(root / "palette_trns.png"))
    colours = np.array([[0, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]])  # index 0 transparent -> black
    np.testing.assert_array_equal(pal, colours[index])

    la = np.asarray(load_image(root / "la.png", 1), dtype=np.int64)
    alpha = np.asarray(Image.open(root / "la.png").split()[1], dtype=np.int64)
    assert np.abs(la - np.rint(200 * alpha / 255)).max() <= 1  # composited on black

    gray = np.asarray(load_image(root / "gray.png", 3))
    assert gray.shape[-1] == 3 and (gray == gray[..., :1]).all()
    lum = load_image(root / "rgb.png", 1)
    assert lum.mode == "L" and np.array_equal(np.asarray(lum), np.asarray(Image.open(root / "rgb.png").convert("L")))
    rgba = np.asarray(load_image(root / "rgba.png", 3), dtype=np.int64)
    photo = np.asarray(Image.open(root / "rgb.png"), dtype=np.int64)
    assert np.abs(rgba - photo * 128 / 255).max() <= 1

    with pytest.raises(Image.DecompressionBombError):
        load_image(root / "bomb.png", 1)


@pytest.mark.parametrize("size", [(500, 375), (1000, 750), (375, 500), (231, 229), (64, 48)])
@pytest.mark.parametrize("hint", [16, 32, 224])
def test_jpeg_draft_never_below_needed(tmp_path, size, hint):
    path = tmp_path / "p.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    img = load_image(path, 3, hint)
    assert min(img.size) >= min(hint, *size)  # never below the size the exact resize needs
    if min(size) >= 2 * hint:
        assert img.size[0] < size[0]  # and draft did reduce


def test_path_list_is_compact_and_faithful(image_root):
    from attnprobe.io.folders import list_images
    listed = list_images(image_root / "wild")
    paths = PathList.from_dir(image_root / "wild")
    assert list(paths) == listed and len(paths) == len(listed) and paths[-1] == listed[-1]
    assert paths[2:5] == listed[2:5]
    assert paths.digest() == PathList(listed).digest() != PathList(listed[:-1]).digest()
    assert sum(a.nbytes for a in (paths._buf, paths._offsets)) < 40 * len(listed)


def test_two_runs_identical_and_score_pool_agrees(image_root, teacher_ckpt, tmp_path):
    wild = image_root / "wild"
    kw = dict(batch_size=7, workers=0, progress=False, chunk_size=8, device="cpu")
    first = score(teacher_ckpt, wild, tmp_path / "a.parquet", **kw)
    second = score(teacher_ckpt, wild, tmp_path / "b.parquet", **kw)
    assert first["scored"] == second["scored"] == 30 and first["skipped"] == 0
    a, b = read_table(tmp_path / "a.parquet")[0], read_table(tmp_path / "b.parquet")[0]
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    model, info = load_checkpoint(teacher_ckpt)
    df, meta = score_pool(model, info, wild, settings=ScoreSettings(batch_size=7, workers=0, progress=False,
                                                                     chunk_size=8))
    pd.testing.assert_frame_equal(df, a, check_exact=True)
    assert meta["skipped_files"] == [] and meta["scored"] == 30


# ---------------------------------------------------------------- kill and restart

SLOW = """
import sys, time
import attnprobe.stages.score_parts as s
mode, mark = sys.argv[1], sys.argv[2]
if mode == "parts":          # slow down after each finished part, so the test can kill mid-run
    write = s.write_part
    def slow_part(*a, **k):
        write(*a, **k)
        time.sleep(0.15)
    s.write_part = slow_part
else:                        # hang in the middle of writing the final table
    s.MERGE_ROWS = 8
    class Slow(s.pq.ParquetWriter):
        def write_table(self, *a, **k):
            super().write_table(*a, **k)
            open(mark, "w").close()
            time.sleep(60)
    s.pq.ParquetWriter = Slow
from attnprobe.app.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory, pool):
    """120 small images plus the broken ones: 17 chunks of 8."""
    root = tmp_path_factory.mktemp("big") / "wild"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i in range(120):
        img = shape_image(rng, CLASSES[i % 3], 20 + i % 5)
        img.save(root / ("sub" if i % 2 else "") / f"{i:03d}.{'png' if i % 3 else 'jpg'}")
    for name in ("truncated.jpg", "zero.jpg", "text.png", "gray16.png", "cmyk.jpg"):
        (root / name).write_bytes((pool[0] / name).read_bytes())
    return root


def wait_for(proc, pred, timeout=120):
    """Poll `pred` until it holds; False if the process ended first or the time ran out."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if proc.poll() is not None:
            return pred()
        time.sleep(0.02)
    return False


def test_kill_and_restart_gives_the_same_table(big_pool, teacher_ckpt, tmp_path):
    cmd = ["score", "--teacher", str(teacher_ckpt), "--wild", str(big_pool), "--chunk-size", "8",
           "--batch-size", "3", "--workers", "0", "--no-progress"]
    ref = tmp_path / "ref.parquet"
    assert main([*cmd, "--out", str(ref)]) == 0
    reference = read_table(ref)[0]
    assert len(reference) == 122  # 120 + 16-bit + CMYK; three broken files skipped

    out = tmp_path / "run" / "scores.parquet"
    parts = parts_dir(out)
    argv = [*cmd, "--out", str(out)]
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    mark = tmp_path / "merging"

    # 1. SIGKILL mid-run, once a few parts exist
    proc = subprocess.Popen([sys.executable, str(script), "parts", str(mark), *argv], env=ENV)
    try:
        assert wait_for(proc, lambda: parts.is_dir() and len(list(parts.glob("0*.parquet"))) >= 4)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = sorted(parts.glob("0*.parquet"))
    assert 4 <= len(done) < 16 and not out.exists()

    # other settings may not mix with these parts
    assert main([*argv, "--heads", "mean"]) == 2

    # 2. restart, and SIGKILL it while it writes the final table: no torn table
    proc = subprocess.Popen([sys.executable, str(script), "merge", str(mark), *argv], env=ENV)
    try:
        assert wait_for(proc, mark.exists)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists() and list(out.parent.glob(".scores.parquet.tmp*"))  # only the temporary file
    assert len(list(parts.glob("0*.parquet"))) == 16

    # 3. the same command again finishes: the same rows, order and values as the uninterrupted run
    proc = subprocess.run([sys.executable, "-m", "attnprobe.cli", *argv], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "scored 122 images, skipped 3 unreadable" in proc.stdout
    df, meta = read_table(out)
    pd.testing.assert_frame_equal(df, reference, check_exact=True)
    assert not parts.exists() and not list(out.parent.glob(".*tmp*"))
    assert read_skipped(out) == read_skipped(ref)
    assert json.loads(json.dumps(meta))["skipped"] == 3


def test_settings_mismatch_names_the_fix(big_pool, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "s.parquet"
    parts_dir(out).mkdir()
    (parts_dir(out) / "settings.json").write_text(json.dumps({"heads": "mean"}))
    assert main(["score", "--teacher", str(teacher_ckpt), "--wild", str(big_pool), "--out", str(out),
                 "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "delete" in err and str(parts_dir(out)) in err


def test_scoring_forward_is_probe_scores(teacher_ckpt):
    """The pass's per-batch math is probe.probe_scores' (one forward, CLS row), plus -log max softmax."""
    from attnprobe.method.probe import probe_scores
    from attnprobe.stages.scoring import ScoringForward
    model, _ = load_checkpoint(teacher_ckpt)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for heads in ("first", "mean"):
        logits, probe = probe_scores(model, x, [0, 2], heads)
        with ScoringForward(model, [0, 2], heads) as fwd:
            pred, outlier, got, probs = fwd.scores(x)
        log_p = logits.log_softmax(1)
        np.testing.assert_array_equal(got, probe.numpy())
        np.testing.assert_array_equal(pred, log_p.argmax(1).numpy())
        np.testing.assert_array_equal(outlier, -log_p.max(1).values.numpy())
        np.testing.assert_array_equal(probs, log_p.exp().numpy())


def test_stretch_scores_the_whole_image(image_root, teacher_ckpt, tmp_path):
    """--resize stretch: every image resized whole to the square input (the reference's way); recorded in the
    table's metadata and guarded on resume."""
    from attnprobe.errors import AttnprobeError
    from attnprobe.stages.score_parts import GUARDED, check_settings
    wild = image_root / "wild"
    kw = dict(batch_size=7, workers=0, progress=False, chunk_size=8, device="cpu")
    meta = score(teacher_ckpt, wild, tmp_path / "s.parquet", resize="stretch", **kw)
    assert meta["resize"] == "stretch"
    df, table_meta = read_table(tmp_path / "s.parquet")
    assert table_meta["resize"] == "stretch"
    score(teacher_ckpt, wild, tmp_path / "c.parquet", **kw)
    crop, crop_meta = read_table(tmp_path / "c.parquet")
    assert crop_meta["resize"] == "crop" and list(crop.path) == list(df.path)

    model, info = load_checkpoint(teacher_ckpt)
    x = torch.stack([eval_transform(info, resize="stretch")(load_image(wild / p, 3, 16)) for p in df.path])
    with torch.no_grad():
        log_p = model(x).log_softmax(1)
    np.testing.assert_allclose(df.outlier.to_numpy(), -log_p.max(1).values.numpy(), atol=1e-5)
    square = df.path.str.startswith("shapes/").to_numpy()  # 16 x 16 shapes: the same either way
    np.testing.assert_array_equal(df.outlier.to_numpy()[square], crop.outlier.to_numpy()[square])
    assert (df.outlier.to_numpy()[~square] != crop.outlier.to_numpy()[~square]).all()  # 40 x 30 noise: not

    # parts written before `resize` was recorded were cropped: they resume a crop run, not a stretch run
    parts = tmp_path / "old.parquet.parts"
    parts.mkdir()
    settings = {k: 1 for k in GUARDED}
    (parts / "settings.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "resize"}))
    check_settings(parts, {**settings, "resize": "crop"})
    with pytest.raises(AttnprobeError, match=r"then --resize crop, now --resize stretch"):
        check_settings(parts, {**settings, "resize": "stretch"})
    with pytest.raises(AttnprobeError, match=r"--resize squash is not one of crop, stretch"):
        score(teacher_ckpt, wild, tmp_path / "bad.parquet", resize="squash", **kw)
    assert not (tmp_path / "bad.parquet").exists() and not parts_dir(tmp_path / "bad.parquet").exists()


HOLDER = """
import os, sys, time
from attnprobe.io.lock import hold
lock = hold(sys.argv[1], "`test`", "wait")
child = os.fork()
if child == 0:  # as a DataLoader worker: forked while the lock is held, and outliving its parent
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_the_lock_is_free_once_its_holder_is_killed_though_its_child_lives(tmp_path):
    """io.lock: a record lock, not inherited by forked workers: refused while its holder lives, free right after
    kill -9 of the holder even while the holder's forked child still runs."""
    from attnprobe.errors import AttnprobeError
    from attnprobe.io.lock import hold
    path = tmp_path / "parts" / ".lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=ENV)
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(AttnprobeError, match=rf"another `test` is running \(it holds {path}, pid {proc.pid}\)"):
            hold(path, "`test`", "wait")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the child still lives
        lock = hold(path, "`test`", "wait")  # and the lock is free
        lock.release()
    finally:
        proc.kill()
        proc.wait()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_damaged_parts_settings_is_one_line(big_pool, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "s.parquet"
    parts_dir(out).mkdir()
    (parts_dir(out) / "settings.json").write_text('{"heads": "fir')  # cut short
    before = sorted(p.name for p in parts_dir(out).iterdir())
    assert main(["score", "--teacher", str(teacher_ckpt), "--wild", str(big_pool), "--out", str(out),
                 "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings.json" in err[0] and "damaged" in err[0] and f"delete {parts_dir(out)}" in err[0]
    assert not out.exists() and sorted(p.name for p in parts_dir(out).iterdir()) == before
