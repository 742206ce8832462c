"""The figures of an `attnprobe run` report: the score terms against the cut at K, the selections' classes,
each strategy's ranking as thumbnails, and the learning curves."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..method.selection import probe_columns
from .figures import thumb

MAX_CLASSES = 30  # classes drawn in the class figure (the most frequent ones when there are more)


def fig_score_terms(scores: pd.DataFrame, ranks: list[dict]) -> Figure:
    """Per strategy (row): each score term and the combined score over the pool, the selected part filled."""
    terms = ["outlier"] + probe_columns(scores) + ["combined"]
    fig = Figure(figsize=(3.1 * len(terms), 2.4 * len(ranks) + 0.5), layout="constrained")
    for row, r in zip(fig.subplots(len(ranks), len(terms), squeeze=False), ranks):
        for ax, term in zip(row, terms):
            values = r["combined"] if term == "combined" else scores[term].to_numpy(np.float64)
            bins = np.histogram_bin_edges(values, bins=30)
            ax.hist(values, bins, color="lightgray", label="pool")
            ax.hist(values[r["chosen"]], bins, color=r["color"], alpha=0.85, label=f"selected (K={r['k']})")
            if term == "combined":
                ax.axvline(r["cut"], color="black", linestyle="--", linewidth=1.2, label="cut at K")
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
            ax.set_title(f"{r['name']}: {term}", fontsize=9)
            ax.tick_params(labelsize=7)
        row[0].set_ylabel("images", fontsize=8)
    fig.suptitle("Score terms over the pool (lower = preferred); the selected images filled", fontsize=10)
    return fig


def fig_classes(strats: list[dict], classes: list[str]) -> Figure:
    """The teacher's predicted classes among each selection, and each selection's DFND class weights."""
    hists = {s["name"]: np.asarray(s["summary"].get("pred_histogram") or
                                   np.bincount(s["selection"].pred, minlength=len(classes)), float) for s in strats}
    weights = {s["name"]: np.asarray(s["summary"]["class_weights"]) for s in strats
               if s["summary"].get("class_weights")}
    shown = np.arange(len(classes)) if len(classes) <= MAX_CLASSES else \
        np.sort(np.argsort(-sum(hists.values()), kind="stable")[:MAX_CLASSES])
    labels = [str(classes[c]) for c in shown]
    panels = [("selected images", hists)] + ([("class weight (DFND)", weights)] if weights else [])
    fig = Figure(figsize=(min(11.5, max(7.0, 0.22 * len(shown) * len(strats) + 2)), 2.7 * len(panels) + 0.6),
                 layout="constrained")
    width, x = 0.8 / len(strats), np.arange(len(shown))
    tilt = sum(len(t) + 2 for t in labels) * len(strats) ** 0.5 > 70
    for ax, (ylabel, data) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        for k, s in enumerate(s for s in strats if s["name"] in data):
            ax.bar(x + k * width, data[s["name"]][shown], width, label=s["name"], color=s["color"])
        if data is weights:
            ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
        ax.set_xticks(x + 0.4 - width / 2, labels, rotation=45 if tilt else 0, ha="right" if tilt else "center",
                      fontsize=8)
        ax.set_ylabel(ylabel, fontsize=9)
    fig.axes[0].legend(fontsize=8, loc="upper right")  # inside: outside, it ran into the title
    part = "" if len(shown) == len(classes) else f" ({len(shown)} most frequent of {len(classes)} classes)"
    fig.suptitle(f"The teacher's predicted class of the selected images, and DFND's class weights{part}", fontsize=10)
    return fig


def fig_ranking(scores: pd.DataFrame, r: dict, wild: Path, in_chans: int, n: int = 10) -> Figure:
    """Thumbnails of the top, the borderline (around rank K) and the bottom of one strategy's ranking."""
    order, k, n = r["order"], r["k"], min(n, len(r["order"]))
    start = max(0, min(k - n // 2, len(order) - n))
    fig = Figure(figsize=(1.2 * n, 4.9), layout="constrained")
    for axes, (label, idx) in zip(fig.subplots(3, n, squeeze=False), [
            ("top", order[:n]), (f"around K={k}", order[start:start + n]), ("bottom", order[-n:])]):
        for ax, i in zip(axes, idx):
            thumb(ax, wild / scores.path.iat[i], f"#{r['rank'][i] + 1}  {r['combined'][i]:.4g}",
                   "tab:green" if r["chosen"][i] else "tab:red", in_chans=in_chans)
            ax.title.set_fontsize(8)
        axes[0].set_ylabel(label, fontsize=9)
    fig.suptitle(f"{r['name']}: rank and combined score (lower = preferred); green frame = selected, red = rejected",
                 fontsize=10)
    return fig


def fig_curves(strats: list[dict]) -> Figure | None:
    """Each loss term, fidelity and top-1 per epoch, one line per strategy; keys a run lacks are left out."""
    keys = list(dict.fromkeys(k for s in strats for row in s["metrics"] for k, v in row.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)))
    accs = [k for k in keys if k.endswith("_top1")]
    losses = [k for k in keys if k not in ("epoch", "lr", "seconds", "fidelity")
              and k.rsplit("_", 1)[-1] not in ("top1", "top5", "n")]
    panels = [(k, [k], 1) for k in losses] + ([("fidelity (%)", ["fidelity"], 100)] if "fidelity" in keys else []) \
        + ([(f"{accs[0][:-5] if len(accs) == 1 else ''} top-1 (%)".strip(), accs, 100)] if accs else [])
    if not panels:
        return None
    cols, rows = min(4, len(panels)), math.ceil(len(panels) / 4)
    fig = Figure(figsize=(3.4 * cols, 2.7 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, ks, scale) in zip(axes, panels):
        for s, marker in zip(strats, "os^Dv<>p" * 4):  # shapes tell apart strategies whose lines coincide
            for key, style in zip(ks, ["-", "--", ":"]):
                pts = [(row["epoch"] + 1, scale * row[key]) for row in s["metrics"] if row.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker=marker, markersize=4, fillstyle="none", color=s["color"],
                            label=s["name"] + ("" if len(ks) == 1 else f" {key}"))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle("Distillation, per epoch (metrics.jsonl of each strategy)", fontsize=10)
    return fig
