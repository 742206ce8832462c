"""Each selection strategy on a handmade score table."""
import json

import numpy as np
import pandas as pd
import pytest

from attnprobe import AttnprobeError, select
from attnprobe.io.tables import read_table, write_table
from attnprobe.method.selection import select_images, strategy_scores


@pytest.fixture
def table():
    return pd.DataFrame({
        "path": ["a.png", "b.png", "c.png", "d.png", "e.png"],
        "pred": [0, 1, 1, 2, 0],
        "outlier": [0.1, 2.0, 0.5, 0.3, 1.0],
        "probe_3": [0.9, 0.2, 0.8, 0.95, 0.1],
        "probe_7": [0.9, 0.3, 0.7, 0.95, 0.2],
        "probs": [np.array(p, dtype=np.float32) for p in
                  ([.8, .1, .1], [.2, .5, .3], [.1, .6, .3], [.1, .1, .8], [.5, .25, .25])],
    })


def test_attnprobe_combined_score(table):
    # score = 0.05 * (probe_3 + probe_7) + 0.9 * outlier
    expected = 0.05 * (table.probe_3 + table.probe_7) + 0.9 * table.outlier
    np.testing.assert_allclose(strategy_scores(table, "attnprobe"), expected)
    sel, summary = select_images(table, 3, "attnprobe", num_classes=3)
    assert sel.path.tolist() == ["a.png", "d.png", "c.png"]  # 0.18, 0.365, 0.525
    assert sel.score.is_monotonic_increasing
    assert summary["pred_histogram"] == [1, 1, 1]


def test_attnprobe_rank_weighs_two_ranks_and_is_the_default():
    df = pd.DataFrame({"path": list("abcd"), "pred": [0, 1, 0, 1], "outlier": [2.0, 0.5, 1.0, 0.1],
                       "probe_1": [0.1, 0.4, 0.3, 0.2], "probe_2": [0.2, 0.1, 0.4, 0.3]})
    # per-block ranks (fraction of the pool at or below): [.25 1 .75 .5] + [.5 .25 1 .75] = [.75 1.25 1.75 1.25],
    # ranked again: [.25 .625 1 .625] (ties averaged); outlier's ranks [1 .5 .75 .25]; 0.3 and 0.7 of them:
    np.testing.assert_allclose(strategy_scores(df, "attnprobe-rank"), [0.775, 0.5375, 0.825, 0.3625])
    assert select_images(df, 3)[0].path.tolist() == ["d", "b", "a"]  # the default strategy
    # the paper's weights (0.05 * probes + 0.9 * outlier = [1.815 .475 .935 .115]) let the outlier decide alone
    assert select_images(df, 3, "attnprobe")[0].path.tolist() == ["d", "b", "c"]


def test_dfnd_probe_and_weights(table):
    assert select_images(table, 2, "dfnd")[0].path.tolist() == ["a.png", "d.png"]
    assert select_images(table, 2, "probe")[0].path.tolist() == ["e.png", "b.png"]  # 0.3, 0.5
    # weights change the ranking: all weight on the probe = `probe`
    assert select_images(table, 2, "attnprobe", w_attn=1.0, w_out=0.0)[0].path.tolist() == ["e.png", "b.png"]


def test_rank_normalisation(table):
    # ranks (pct) of outlier: a .2 b 1 c .6 d .4 e .8; probe_3: a .6 b .4 c .2? -> computed with pandas
    r = lambda c: table[c].rank(pct=True).to_numpy()
    expected = 0.5 * (r("probe_3") + r("probe_7")) + 0.5 * r("outlier")
    np.testing.assert_allclose(strategy_scores(table, "attnprobe", 0.5, 0.5, normalize="rank"), expected)


def test_random_is_seeded(table):
    a = select_images(table, 3, "random", seed=1)[0].path.tolist()
    assert a == select_images(table, 3, "random", seed=1)[0].path.tolist()
    others = {tuple(select_images(table, 3, "random", seed=s)[0].path) for s in range(10)}
    assert len(others) > 1


def test_class_weights_from_selected_softmax(table):
    _, summary = select_images(table, 3, "attnprobe", num_classes=3)  # a, d, c
    sums = np.array([.8 + .1 + .1, .1 + .1 + .6, .1 + .8 + .3])
    inv = 1 / sums
    assert summary["class_weights"] == pytest.approx((inv / inv.sum() * 3).tolist(), rel=1e-5)
    assert summary["class_weights_from"] == "softmax"
    _, no_probs = select_images(table.drop(columns="probs"), 3, "attnprobe", num_classes=4)
    assert no_probs["class_weights_from"] == "pred" and len(no_probs["class_weights"]) == 4


@pytest.mark.parametrize("k", [0, 6, -1])
def test_bad_k(table, k):
    with pytest.raises(AttnprobeError, match="num-select"):
        select_images(table, k, "attnprobe")


def test_bad_tables_and_weights(table):
    with pytest.raises(AttnprobeError, match="probe_"):
        strategy_scores(table.drop(columns=["probe_3", "probe_7"]), "probe")
    with pytest.raises(AttnprobeError, match="outlier"):
        strategy_scores(table.drop(columns=["outlier"]), "dfnd")
    nan = table.copy()
    nan.loc[2, "outlier"] = np.nan
    with pytest.raises(AttnprobeError, match="NaN"):
        strategy_scores(nan, "attnprobe")
    with pytest.raises(AttnprobeError, match="non-negative"):
        strategy_scores(table, "attnprobe", w_attn=-1)
    with pytest.raises(AttnprobeError, match="non-negative"):
        strategy_scores(table, "attnprobe", w_attn=0, w_out=0)


def test_select_writes_table_and_summary(table, tmp_path):
    write_table(table, tmp_path / "scores.parquet", {"num_classes": 3, "classes": ["x", "y", "z"]})
    summary = select(tmp_path / "scores.parquet", num_select=2, strategy="dfnd", out=tmp_path / "sel.parquet")
    df, meta = read_table(tmp_path / "sel.parquet")
    assert df.path.tolist() == ["a.png", "d.png"] and list(df.score) == pytest.approx([0.1, 0.3])
    on_disk = json.loads((tmp_path / "sel.json").read_text())
    assert on_disk == summary
    assert on_disk["pool_size"] == 5 and on_disk["classes"] == ["x", "y", "z"]
    assert sum(on_disk["class_weights"]) == pytest.approx(3)
    with pytest.raises(AttnprobeError):
        select(tmp_path / "scores.parquet", num_select=0, strategy="dfnd", out=tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists() and not (tmp_path / "bad.json").exists()
