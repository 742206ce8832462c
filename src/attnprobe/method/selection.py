"""Step 1 of the method, second half: the selection strategies and the top K of a score table.

The scoring pass itself (one teacher forward per wild image) is stages/scoring.py; the table is read and
written by io/tables.py.

Score table columns: path (relative to the wild root), pred, outlier (= -log max softmax, DFND),
probe_<b> (cosine of block b's CLS attention over patches with uniform), and `probs` (the softmax,
kept when the class count is small enough for the table to stay compact; DFND's class weights use it).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import AttnprobeError
from .choices import NORMALIZATIONS, STRATEGIES
from .losses import class_weights

# What `attnprobe select` does without --strategy: the paper's two criteria on one scale. Chosen on pools of our
# own making (README: which selection to use; benchmarks/selection_study.py), where the paper's weights let a
# miscalibrated teacher's confidence decide alone.
DEFAULT_SELECTION = {"name": "attnprobe-rank", "settings": {"strategy": "attnprobe-rank"}}
RANK_W_PROBE = 0.3  # attnprobe-rank's weight of the probe terms' rank; the outlier's rank weighs the rest


def probe_columns(df: pd.DataFrame) -> list[str]:
    return sorted((c for c in df.columns if c.startswith("probe_")), key=lambda c: int(c.split("_")[1]))


def _normalized(values: np.ndarray, how: str) -> np.ndarray:
    if how == "rank":  # fraction of the pool scoring lower: scale-free, robust to outliers
        return pd.Series(values).rank(method="average", pct=True).to_numpy()
    if how == "zscore":
        return (values - values.mean()) / (values.std() + 1e-12)
    return values


def strategy_scores(df: pd.DataFrame, strategy: str, w_attn: float = 0.05, w_out: float = 0.9,
                    seed: int = 0, normalize: str = "none") -> np.ndarray:
    """Per-image score, lower is better. `normalize` (rank or zscore) puts the terms on one scale
    before weighting; `none` is the paper's combination. `attnprobe-rank` takes neither weights nor
    `normalize`: 0.3 x the probe terms' rank in the pool (the rank of their summed per-block ranks) +
    0.7 x the outlier's rank, so that each criterion counts by its weight whatever its spread."""
    if strategy not in STRATEGIES:
        raise AttnprobeError(f"--strategy {strategy!r} is not one of {STRATEGIES}")
    if normalize not in NORMALIZATIONS:
        raise AttnprobeError(f"--normalize {normalize!r} is not one of {NORMALIZATIONS}")
    if strategy == "random":
        return np.random.default_rng(seed).random(len(df))
    probes = probe_columns(df)
    needed = (["outlier"] if strategy in ("attnprobe-rank", "attnprobe", "dfnd") else []) + \
             (probes if strategy != "dfnd" else [])
    if strategy != "dfnd" and not probes:
        raise AttnprobeError(f"strategy {strategy} needs probe_<b> columns, and the table has none; rescore the pool")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise AttnprobeError(f"score table lacks {missing} needed by strategy {strategy}; rescore the pool")
    if df[needed].isna().any().any():
        raise AttnprobeError(f"score table has NaN in {needed}; rescore the pool")
    if strategy == "attnprobe-rank":
        probe_rank = _normalized(sum(_normalized(df[c].to_numpy(np.float64), "rank") for c in probes), "rank")
        return RANK_W_PROBE * probe_rank + (1 - RANK_W_PROBE) * _normalized(df["outlier"].to_numpy(np.float64), "rank")
    probe_sum = sum(_normalized(df[c].to_numpy(np.float64), normalize) for c in probes) if probes else 0.0
    outlier = _normalized(df["outlier"].to_numpy(np.float64), normalize) if "outlier" in needed else 0.0
    if strategy == "dfnd":
        return outlier
    if strategy == "probe":
        return probe_sum
    if w_attn < 0 or w_out < 0 or w_attn + w_out == 0:
        raise AttnprobeError(f"weights --w-attn {w_attn} --w-out {w_out} must be non-negative and not both zero")
    return w_attn * probe_sum + w_out * outlier


STRATEGY_SETTINGS = {"attnprobe-rank": (), "attnprobe": ("w_attn", "w_out", "normalize"), "dfnd": ("normalize",),
                     "probe": ("normalize",), "random": ("seed",)}  # what each strategy reads; the others ignored


def used_settings(strategy: str) -> tuple[str, ...]:
    """The select settings that can change `strategy`'s order or scores (a report lists these, not the rest):
    `attnprobe-rank` takes none, the paper's combination its weights and normalisation, random its seed."""
    return STRATEGY_SETTINGS.get(strategy, ("w_attn", "w_out", "normalize", "seed"))


def select_images(df: pd.DataFrame, num_select: int, strategy: str = "attnprobe-rank", w_attn: float = 0.05,
                  w_out: float = 0.9, seed: int = 0, normalize: str = "none",
                  num_classes: int | None = None) -> tuple[pd.DataFrame, dict]:
    """The `num_select` lowest-scoring rows (ascending `score`) and a summary with DFND's class weights."""
    if df.empty:
        raise AttnprobeError("the score table has no rows: no image of the pool could be read (see the table's "
                             "skipped list); fix the pool and score it again")
    if not 0 < num_select <= len(df):
        raise AttnprobeError(f"--num-select {num_select} must be between 1 and the pool size {len(df)}")
    score = strategy_scores(df, strategy, w_attn, w_out, seed, normalize)
    order = np.lexsort((np.arange(len(df)), score))[:num_select]  # stable: ties keep pool order
    selected = df.iloc[order].copy()
    selected["score"] = score[order]
    selected = selected.reset_index(drop=True)
    C = num_classes or int(df["pred"].max()) + 1
    if "probs" in selected.columns:
        sums, source = np.stack(selected["probs"].to_numpy()).sum(axis=0), "softmax"
    else:  # no softmax stored (many classes): count predictions instead, unseen classes counted once
        sums, source = np.maximum(np.bincount(selected["pred"], minlength=C), 1), "pred"
    summary = {
        "strategy": strategy, "num_select": int(num_select), "pool_size": int(len(df)),
        "w_attn": w_attn, "w_out": w_out, "normalize": normalize, "seed": seed,
        "probe_columns": probe_columns(df),
        "pred_histogram": np.bincount(selected["pred"], minlength=C).tolist(),
        "class_weights": class_weights(sums, C), "class_weights_from": source,
        "score_min": float(selected["score"].min()), "score_max": float(selected["score"].max()),
    }
    return selected, summary
