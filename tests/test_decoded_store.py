"""The decoded selection's store (io.decoded): bytes, resuming after kill -9, invalidation, unreadable images,
tar-shard members, ranks dealing chunks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from attnprobe.errors import AttnprobeError
from attnprobe.io.decoded import DecodedStore, RowSource, geometry_key, row_sources
from attnprobe.io.images import ImageLoader, decode_transform, load_image
from attnprobe.io.tar_members import MemberLoader, member_index

INFO = {"img_size": 16, "in_chans": 3}


def _image(rng, w, h, mode="RGB"):
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    return img.convert(mode)


@pytest.fixture
def pool(tmp_path):
    """A folder of 9 images of different sizes and formats (one in a sub-folder)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "pool"
    (root / "sub").mkdir(parents=True)
    paths = []
    for i in range(9):
        rel = f"sub/im{i}.png" if i == 4 else f"im{i}.{'jpg' if i % 2 else 'png'}"
        _image(rng, 20 + 3 * i, 40 - 2 * i, "L" if i == 7 else "RGB").save(root / rel)
        paths.append(rel)
    return root, paths


class Counting:
    """An ImageLoader that counts what it opens (in this process: workers=0)."""

    def __init__(self, in_chans=3):
        self.inner, self.opened = ImageLoader(in_chans), []

    def __call__(self, path):
        self.opened.append(os.path.basename(path))
        return self.inner(path)


def _by_hand(path, info=INFO, resize="crop"):
    return decode_transform(info, resize=resize)(load_image(path, info["in_chans"]))


def test_bytes_equal_decode_transform_by_hand(tmp_path, pool):
    root, paths = pool
    for info, resize in [(INFO, "crop"), (INFO, "stretch"), ({"img_size": [12, 20], "in_chans": 3}, "crop"),
                         ({"img_size": 16, "in_chans": 1}, "crop")]:
        rows = row_sources(paths + paths[:2], wild=root)  # repeated rows share a store row
        store = DecodedStore.at(tmp_path / "dec", info=info, resize=resize)
        assert store.folder == tmp_path / "dec" / geometry_key(info, resize)
        idx = store.ensure(rows, loader=ImageLoader(info["in_chans"]), workers=0, progress=False)
        assert idx.dtype == np.int64 and (idx >= 0).all() and list(idx[-2:]) == list(idx[:2])
        got = store.gather(idx)
        H, W = (16, 16) if isinstance(info["img_size"], int) else info["img_size"]
        assert got.dtype == torch.uint8 and got.shape == (len(rows), info["in_chans"], H, W)
        assert store.nbytes_per_image == info["in_chans"] * H * W
        for k, p in enumerate(paths + paths[:2]):
            assert torch.equal(got[k], _by_hand(root / p, info, resize)), p
        perm = np.random.default_rng(1).permutation(len(idx))
        assert torch.equal(store.tensor(idx[perm]), got[perm])
        assert torch.equal(store.gather(idx[perm]), got[perm])
    assert len({p.name for p in (tmp_path / "dec").iterdir()}) == 4  # one store per geometry


def test_workers_and_chunks(tmp_path, pool):
    """Decoding by DataLoader worker processes, in small chunks: the same bytes; a fresh object reads them."""
    root, paths = pool
    rows = row_sources(paths, wild=root)
    store = DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")
    idx = store.ensure(rows, loader=ImageLoader(3), workers=2, progress=False, chunk_rows=2)
    assert len(list(store.folder.glob("chunk-*.json"))) == 5 and len(list(store.folder.glob("chunk-*.npy"))) == 5
    again = DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")
    counting = Counting()
    idx2 = again.ensure(rows, loader=counting, workers=0, progress=False)
    assert counting.opened == []
    assert torch.equal(again.gather(idx2), store.gather(idx))
    for k, p in enumerate(paths):
        assert torch.equal(again.gather(idx2[k:k + 1])[0], _by_hand(root / p))


_BUILD = """
import sys, time
from attnprobe.io.decoded import DecodedStore, row_sources
from attnprobe.io.images import ImageLoader
root, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
inner = ImageLoader(3)
def slow(path):
    time.sleep(0.15)
    return inner(path)
store = DecodedStore.at(out, info={"img_size": 16, "in_chans": 3}, resize="crop")
store.ensure(row_sources(paths, wild=root), loader=slow, workers=0, progress=False, chunk_rows=2)
"""


def test_kill_during_build_then_same_call_goes_on(tmp_path, pool):
    root, paths = pool
    out = tmp_path / "dec"
    proc = subprocess.Popen([sys.executable, "-c", _BUILD, str(root), str(out), *paths],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = out / geometry_key(INFO, "crop")
    deadline = time.time() + 60
    while not list(folder.glob("chunk-*.json")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = len(list(folder.glob("chunk-*.json")))
    assert 1 <= done < 5
    assert (folder / ".lock").exists()  # its holder is dead: the lock is free
    store = DecodedStore.at(out, info=INFO, resize="crop")
    counting = Counting()
    idx = store.ensure(row_sources(paths, wild=root), loader=counting, workers=0, progress=False, chunk_rows=2)
    assert len(counting.opened) == len(paths) - 2 * done  # only the rest
    assert not list(folder.glob(".chunk-*"))  # the killed writer's temporary files are gone
    for k, p in enumerate(paths):
        assert torch.equal(store.gather(idx[k:k + 1])[0], _by_hand(root / p))


def test_rewritten_file_is_decoded_again(tmp_path, pool):
    root, paths = pool
    store = DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")
    store.ensure(row_sources(paths, wild=root), loader=ImageLoader(3), workers=0, progress=False)
    _image(np.random.default_rng(5), 30, 30).save(root / paths[3])
    st = os.stat(root / paths[3])
    os.utime(root / paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new mtime, even on coarse clocks
    store = DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")
    counting = Counting()
    idx = store.ensure(row_sources(paths, wild=root), loader=counting, workers=0, progress=False)
    assert counting.opened == [os.path.basename(paths[3])]
    assert torch.equal(store.gather(idx[3:4])[0], _by_hand(root / paths[3]))
    # only a new mtime: decoded again too; the others still not
    os.utime(root / paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000))
    counting = Counting()
    store.ensure(row_sources(paths, wild=root), loader=counting, workers=0, progress=False)
    assert counting.opened == [os.path.basename(paths[0])]


def test_unreadable_listed_with_reason_and_minus_one(tmp_path, pool):
    root, paths = pool
    (root / "bad.jpg").write_bytes(b"not an image")
    paths = paths[:3] + ["bad.jpg", "gone.png"] + paths[3:]
    store = DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")
    rows = row_sources(paths, wild=root)
    idx = store.ensure(rows, loader=ImageLoader(3), workers=0, progress=False)
    assert list(idx[3:5]) == [-1, -1] and (np.delete(idx, [3, 4]) >= 0).all()
    bad = store.unreadable(rows)
    assert [k for k, _ in bad] == ["bad.jpg", "gone.png"]
    assert "UnidentifiedImageError" in bad[0][1] and "FileNotFoundError" in bad[1][1]
    counting = Counting()  # tried once: not again while the files stay as they are
    store = DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")
    assert list(store.ensure(rows, loader=counting, workers=0, progress=False)[3:5]) == [-1, -1]
    assert counting.opened == [] and store.unreadable(rows) == bad
    _image(np.random.default_rng(3), 20, 20).save(root / "gone.png")  # it appears: decoded now
    rows = row_sources(paths, wild=root)
    idx = store.ensure(rows, loader=counting, workers=0, progress=False)
    assert counting.opened == ["gone.png"] and idx[4] >= 0 and [k for k, _ in store.unreadable(rows)] == ["bad.jpg"]


def test_tar_shard_members(tmp_path, pool):
    root, paths = pool
    shards = tmp_path / "shards"
    shards.mkdir()
    names = [f"{k:04d}.{'jpg' if p.endswith('jpg') else 'png'}" for k, p in enumerate(paths)]
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for p, name in zip(paths, names):
            tar.add(root / p, arcname=name)
    with tarfile.open(shards / "00000.tar") as tar:
        members = {f"00000/{m.name}": (m.offset_data, m.size) for m in tar.getmembers()}
    df = pd.DataFrame({"path": list(members), "offset": [o for o, _ in members.values()],
                       "size": [s for _, s in members.values()]})
    index = member_index(df, shards / "00000.tar")
    rows = row_sources(list(members), wild=shards / "00000.tar", members=index)
    assert rows[0].identity[:3] == ("00000", *members[rows[0].key]) and rows[0].open_path == rows[0].key
    store = DecodedStore.at(tmp_path / "dec", info=INFO, resize="stretch")
    idx = store.ensure(rows, loader=MemberLoader(index, 3), workers=2, progress=False, chunk_rows=4)
    for k, p in enumerate(paths):
        assert torch.equal(store.gather(idx[k:k + 1])[0], _by_hand(root / p, resize="stretch")), p
    counting = Counting()
    assert (store.ensure(rows, loader=counting, workers=0, progress=False) == idx).all() and counting.opened == []
    os.utime(shards / "00000.tar", ns=(1, 2))  # the shard rewritten: its members are decoded again
    rows = row_sources(list(members), wild=shards / "00000.tar", members=index)
    loader = MemberLoader(index, 3)
    opened = []
    store.ensure(rows, loader=lambda p: opened.append(p) or loader(p), workers=0, progress=False)
    assert opened == list(members)


def test_two_ranks_deal_chunks_and_give_the_same_store(tmp_path, pool):
    root, paths = pool
    rows = row_sources(paths, wild=root)
    one = DecodedStore.at(tmp_path / "one", info=INFO, resize="crop")
    expected = one.gather(one.ensure(rows, loader=ImageLoader(3), workers=0, progress=False))
    gate, results, opened = threading.Barrier(2, timeout=60), {}, {0: [], 1: []}

    def rank(r):
        inner = ImageLoader(3)
        store = DecodedStore.at(tmp_path / "two", info=INFO, resize="crop")
        idx = store.ensure(rows, loader=lambda p: opened[r].append(p) or inner(p), workers=0, progress=False,
                           chunk_rows=2, rank=r, world=2, barrier=gate.wait)
        results[r] = store.gather(idx)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(results) == {0, 1}
    assert len(opened[0]) == 5 and len(opened[1]) == 4 and not set(opened[0]) & set(opened[1])  # chunks 0,2,4 / 1,3
    assert torch.equal(results[0], expected) and torch.equal(results[1], expected)
    fresh = DecodedStore.at(tmp_path / "two", info=INFO, resize="crop")
    counting = Counting()
    assert torch.equal(fresh.gather(fresh.ensure(rows, loader=counting, workers=0, progress=False)), expected)
    assert counting.opened == []
    # called one after the other with no barrier: rank 0 decodes the rest itself (a folder not shared)
    alone = DecodedStore.at(tmp_path / "alone", info=INFO, resize="crop")
    counting = Counting()
    idx = alone.ensure(rows, loader=counting, workers=0, progress=False, chunk_rows=2, rank=0, world=2)
    assert len(counting.opened) == len(paths) and torch.equal(alone.gather(idx), expected)


def test_numbers_stay_valid_and_damage_is_one_line(tmp_path, pool):
    root, paths = pool
    rows = row_sources(paths, wild=root)
    store = DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")
    idx = store.ensure(rows[:4], loader=ImageLoader(3), workers=0, progress=False)
    before = store.gather(idx)
    other = DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")  # another writer adds chunks
    other.ensure(rows, loader=ImageLoader(3), workers=0, progress=False)
    idx_all = store.ensure(rows, loader=Counting(), workers=0, progress=False)
    assert torch.equal(store.gather(idx), before) and (idx_all[:4] == idx).all()
    with pytest.raises(IndexError):
        store.gather(np.array([len(store)]))
    assert store.gather(np.array([], dtype=np.int64)).shape == (0, 3, 16, 16)
    assert store.ensure([], loader=Counting(), workers=0, progress=False).shape == (0,)
    with pytest.raises(AttnprobeError, match="not in the decoded selection"):
        store.rows_of([RowSource("nope.png", (1, 2), str(root / "nope.png"))])
    chunk = min(store.folder.glob("chunk-*.json"))
    chunk.write_text("{broken")
    with pytest.raises(AttnprobeError, match="damaged") as e:
        DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")
    assert "\n" not in str(e.value)
    chunk.unlink()
    npy = max(store.folder.glob("chunk-*.npy"))
    npy.write_bytes(b"short")
    with pytest.raises(AttnprobeError, match="damaged") as e:
        DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")
    assert "\n" not in str(e.value)
    with pytest.raises(AttnprobeError, match="resize"):
        DecodedStore.at(tmp_path / "dec", info=INFO, resize="squash")


def test_pickled_store_reopens_its_chunks(tmp_path, pool):
    import pickle
    root, paths = pool
    store = DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")
    idx = store.ensure(row_sources(paths, wild=root), loader=ImageLoader(3), workers=0, progress=False)
    copy = pickle.loads(pickle.dumps(store))
    assert torch.equal(copy.gather(idx), store.gather(idx))
    assert Path(copy.folder) == store.folder


def test_waits_for_another_process_building(tmp_path, pool, capsys):
    """A second command on the same store waits for the lock's holder instead of decoding the same rows."""
    root, paths = pool
    store = DecodedStore.at(tmp_path / "dec", info=INFO, resize="crop")
    script = ("import sys, time; from attnprobe.io.lock import FileLock; lock = FileLock(sys.argv[1]); "
              "assert lock.acquire(); print('held', flush=True); time.sleep(1.0)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(store.folder / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    t = time.time()
    idx = store.ensure(row_sources(paths, wild=root), loader=ImageLoader(3), workers=0, progress=True)
    assert time.time() - t > 0.5 and (idx >= 0).all()
    holder.wait(30)
    assert "waiting for another process decoding into" in capsys.readouterr().err
