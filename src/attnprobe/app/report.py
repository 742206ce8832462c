"""The results report of a demo run: figures (PNG beside, embedded in one offline HTML file), the
table of rows like the paper's Table 1, and plain statements of which strategy won and lost."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..errors import AttnprobeError
from ..io.atomic import write_text
from ..io.jsonfiles import read_json
from ..io.tables import read_table
from ..method.selection import probe_columns, strategy_scores
from .figures import fig_attention, png, thumb
from .report_run import write_run_report
from .report_sections import flops, table

SOURCE_ORDER = ["mnist_heldout", "sklearn_digits", "photo_crops", "faces", "noise"]


def auroc(values: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive < score of a random negative): how well LOW values pick positives."""
    ranks = pd.Series(-values).rank().to_numpy()  # Mann-Whitney U from ranks; ties averaged
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _sources_sorted(sources: pd.Series) -> list[str]:
    present = list(dict.fromkeys(sources))
    return [s for s in SOURCE_ORDER if s in present] + sorted(s for s in present if s not in SOURCE_ORDER)


def fig_score_terms(scores: pd.DataFrame, source: pd.Series) -> Figure:
    terms = ["outlier"] + probe_columns(scores)
    fig = Figure(figsize=(4.2 * len(terms), 3.4), layout="constrained")
    for ax, term in zip(fig.subplots(1, len(terms), squeeze=False)[0], terms):
        values = scores[term].to_numpy()
        bins = np.linspace(values.min(), values.max(), 40)
        for s in _sources_sorted(source):
            ax.hist(values[source.to_numpy() == s], bins=bins, histtype="step", linewidth=1.6, density=True, label=s)
        ax.set_title(f"{term} (lower = preferred)")
        ax.set_xlabel(term)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle("Score terms of every wild image, by source")
    return fig


def fig_ranked(scores: pd.DataFrame, order_score: np.ndarray, wild: Path, is_digit: np.ndarray, name: str,
               n: int = 12) -> Figure:
    """The n best-ranked (selected first) and n worst-ranked wild images of one strategy."""
    order = np.lexsort((np.arange(len(order_score)), order_score))
    fig = Figure(figsize=(n * 0.9, 2.3), layout="constrained")
    axes = fig.subplots(2, n)
    for row, idx in enumerate([order[:n], order[::-1][:n]]):
        for ax, i in zip(axes[row], idx):
            thumb(ax, wild / scores.path.iat[i], color="tab:green" if is_digit[i] else "tab:red")
        axes[row][0].set_ylabel(["best", "worst"][row], fontsize=9)
    fig.suptitle(f"{name}: best-ranked (top) and worst-ranked (bottom); green frame = digit", fontsize=10)
    return fig


def fig_top1(results: dict) -> Figure:
    """Mean test top-1 per row over its seeds, the sd as an error bar and each seed as a dot."""
    rows = results["rows"]
    names = ["teacher"] + [r["name"] for r in rows]
    means = [100 * results["teacher"]["top1"]] + [100 * r["top1"] for r in rows]
    sds = [0.0] + [100 * r.get("top1_sd", 0.0) for r in rows]
    colors = ["tab:gray"] + [{"reference": "tab:blue", "no data": "tab:purple"}.get(r["kind"], "tab:orange")
                             for r in rows]
    fig = Figure(figsize=(1.1 * len(names) + 1, 3.6), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(names, means, yerr=sds, capsize=4, color=colors, alpha=0.85)
    ax.bar_label(bars, labels=[f"{m:.1f}" + (f"\n±{s:.1f}" if s else "") for m, s in zip(means, sds)], fontsize=7,
                 padding=2)
    for i, r in enumerate(rows, start=1):
        seeds = [100 * v for v in r.get("test_top1", [])] if isinstance(r.get("test_top1"), list) else []
        ax.plot([i] * len(seeds), seeds, "k.", markersize=4)
    ax.set_ylabel("test top-1 (%)")
    ax.set_ylim(0, 110)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set_title("Test top-1 per row: mean ± sd over seeds, dots = seeds (blue: original data, purple: no data, "
                 "orange: wild images)", fontsize=9)
    return fig


def class_histograms(results: dict, run: Path) -> dict[str, list]:
    """Each selection row's pred_histogram, from its (first) selection's summary JSON."""
    out = {}
    for r in results["rows"]:
        if r["kind"] == "selection":
            path = (run / _first(r["selection"])).with_suffix(".json")
            fix = f"run `attnprobe demo --out {run}` again"
            out[r["name"]] = read_json(path, what="a selection's summary", fix=fix).get("pred_histogram")
            if not isinstance(out[r["name"]], list):
                raise AttnprobeError(f"{path}: a selection's summary is damaged (no 'pred_histogram'); {fix}")
    return out


def fig_class_hist(hists: dict[str, list]) -> Figure:
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(hists)
    for k, (name, hist) in enumerate(hists.items()):
        ax.bar(np.arange(len(hist)) + k * width, hist, width, label=name)
    ax.set_xticks(np.arange(len(hist)) + 0.4 - width / 2, [str(c) for c in range(len(hist))])
    ax.set_xlabel("teacher's predicted class")
    ax.set_ylabel("selected images")
    ax.legend(fontsize=8)
    ax.set_title("Class histogram of each selection (the first seed's, for random)")
    return fig


def _first(selection):
    return selection[0] if isinstance(selection, list) else selection


def differs(a: dict, b: dict) -> bool:
    """Whether two rows' mean top-1 differ by more than the spread of their seeds (the larger sd): the only
    differences the findings claim."""
    return abs(a["top1"] - b["top1"]) > max(a.get("top1_sd", 0.0), b.get("top1_sd", 0.0))


def compare(a: dict, b: dict) -> str:
    """`a` against `b` in words: which wins by how much, or that they are within the spread of their seeds."""
    diff = 100 * (a["top1"] - b["top1"])
    if not differs(a, b):
        return (f"{a['name']} and {b['name']} are within the spread of their seeds ({diff:+.1f} points, sd "
                f"{100 * a.get('top1_sd', 0):.1f} and {100 * b.get('top1_sd', 0):.1f}): no difference is claimed")
    return f"{a['name']} {'beats' if diff > 0 else 'loses to'} {b['name']} by {abs(diff):.1f} points of top-1"


def findings(results: dict, aurocs: dict) -> list[str]:
    """Plain statements drawn from the numbers, including where a strategy loses; a difference between two
    rows is claimed only when it is larger than the spread of their seeds."""
    rows = {r["name"]: r for r in results["rows"]}
    wild = [r for r in results["rows"] if r["kind"] in ("selection", "wild")]
    best = max(wild, key=lambda r: r["top1"])
    n_seeds = len(best["test_top1"]) if isinstance(best.get("test_top1"), list) else 1
    out = [f"Best wild row: <b>{best['name']}</b>, {100 * best['top1']:.1f} ± {100 * best.get('top1_sd', 0):.1f}% "
           f"test top-1 over {n_seeds} seeds ({100 * best['relative_top1']:.0f}% of the teacher's "
           f"{100 * results['teacher']['top1']:.1f}%)."]
    if "random" in rows:
        for r in wild:
            if r["name"] != "random":
                out.append(f"{compare(r, rows['random'])} (precision {100 * r['precision']:.0f}% vs "
                           f"{100 * rows['random']['precision']:.0f}%).")
    for a, b in (("attnprobe", "dfnd"), ("attnprobe", "all"), ("dfnd", "dafl"), ("kd-original", "attnprobe")):
        if a in rows and b in rows:
            out.append(compare(rows[a], rows[b]) + ".")
    default = results.get("default_selection")
    if default in rows and default != "attnprobe" and "attnprobe" in rows:
        out.append(f"The default selection ({default}): {compare(rows[default], rows['attnprobe'])}.")
    for term, a in aurocs.items():
        note = " — inverted: low values pick non-digits" if a < 0.5 else ""
        out.append(f"AUROC of <code>{term}</code> for telling digits from non-digits (low = digit): {a:.2f}{note}.")
    return out


def _demo_results(run: Path) -> dict:
    """results.json of a demo run, checked: readable, complete, and its benchmark images still there."""
    path, what, fix = run / "results.json", "the results of a demo run", f"run `attnprobe demo --out {run}` again"
    results = read_json(path, what=what, fix=fix + " to rebuild it")
    try:
        wild, sources = Path(results["pool"]["wild_dir"]), Path(results["pool"]["sources_csv"])
        if not isinstance(results["rows"], list) or not results["teacher"]["checkpoint"]:
            raise ValueError("no rows or no teacher checkpoint")
    except (ValueError, KeyError, TypeError) as e:
        raise AttnprobeError(f"{path}: {what} is damaged or incomplete ({type(e).__name__}: {e}); {fix} to "
                             "rebuild it") from None
    if not (wild.is_dir() and sources.is_file()):
        raise AttnprobeError(f"the benchmark images of {run} are no longer at {wild.parent} (the cache moved or was "
                             f"cleared); {fix} (with --cache if it lives elsewhere)")
    return results


def write_report(run) -> Path:
    """Build RUN/report.html (self-contained) and RUN/figures/*.png from a finished demo run, or from an
    `attnprobe run` folder (config.json; see report_run.write_run_report)."""
    run = Path(run)
    if not (run / "results.json").is_file():
        if (run / "config.json").is_file():
            return write_run_report(run)
        raise AttnprobeError(f"{run} has no results.json (a finished `attnprobe demo`) nor config.json (an "
                             "`attnprobe run` folder); pass the output folder of one of them")
    results = _demo_results(run)
    if results.get("students"):
        return write_students_report(run, results)
    hists = class_histograms(results, run)  # every side file read before anything is written
    scores, meta = read_table(run / "scores.parquet")
    sources = pd.read_csv(results["pool"]["sources_csv"]).set_index("path").loc[scores.path]
    source, is_digit = sources["source"].reset_index(drop=True), (sources["label"] >= 0).to_numpy()
    wild = Path(results["pool"]["wild_dir"])
    figs_dir = run / "figures"
    figs = [("Score terms by source", png(fig_score_terms(scores, source), figs_dir / "score_terms.png"))]
    for r in results["rows"]:
        if r["kind"] == "selection":
            s = r["settings"]
            order = strategy_scores(scores, s["strategy"], s["w_attn"], s["w_out"], 0, s["normalize"])
            figs.append((f"Ranking of {r['name']}", png(fig_ranked(scores, order, wild, is_digit, r["name"]),
                                                        figs_dir / f"ranked_{r['name']}.png")))
    rng = np.random.default_rng(0)
    picks = [int(rng.choice(np.flatnonzero(source.to_numpy() == s))) for s in _sources_sorted(source)]
    figs.append(("Attention probe heatmaps", png(fig_attention(
        run / results["teacher"]["checkpoint"], wild, [scores.path.iat[i] for i in picks],
        [source.iat[i] for i in picks], meta["blocks"]), figs_dir / "attention_probe.png")))
    figs.append(("Test top-1", png(fig_top1(results), figs_dir / "top1.png")))
    figs.append(("Class histograms", png(fig_class_hist(hists), figs_dir / "class_histograms.png")))
    aurocs = {t: auroc(scores[t].to_numpy(), is_digit) for t in ["outlier"] + probe_columns(scores)}
    path = run / "report.html"
    write_text(path, _html(results, figs, findings(results, aurocs)))
    return path


def _html(results: dict, figs, notes) -> str:
    t = results["teacher"]
    head = ("<tr><th>row</th><th>data</th><th>method</th><th>test top-1 (mean ± sd)</th><th>seeds</th>"
            "<th>of teacher</th><th>steps</th><th>precision</th><th>composition of the selection</th></tr>")
    body = [f"<tr><td>teacher</td><td>original training set, labels ({t['params']:,} params)</td><td></td>"
            f"<td>{100 * t['top1']:.2f}</td><td></td><td>100%</td><td></td><td></td><td></td></tr>"]
    for r in results["rows"]:
        comp = ", ".join(f"{k} {v}" for k, v in r.get("composition", {}).items())
        prec = f"{100 * r['precision']:.1f}%" if "precision" in r else ""
        per_seed = r["test_top1"] if isinstance(r["test_top1"], list) else [r["test_top1"]]
        body.append(f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['data'])}</td>"
                    f"<td>{html.escape(r.get('method', ''))}</td>"
                    f"<td>{100 * r['top1']:.2f} ± {100 * r.get('top1_sd', 0):.2f}</td>"
                    f"<td>{', '.join(f'{100 * v:.1f}' for v in per_seed)}</td>"
                    f"<td>{100 * r['relative_top1']:.0f}%</td><td>{r.get('steps') or ''}</td><td>{prec}</td>"
                    f"<td>{html.escape(comp)}</td></tr>")
    pool = results["pool"]
    pool_text = ", ".join(f"{k} {v}" for k, v in pool["by_source"].items())
    images = "".join(f"<h3>{html.escape(title)}</h3><img src='data:image/png;base64,{b64}' alt='{html.escape(title)}'>"
                     for title, b64 in figs)
    cfg = html.escape(json.dumps(results["config"]))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>attnprobe: digits in the wild</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}
th{{background:#f3f3f3}}img{{max-width:100%}}</style></head><body>
<h1>Digits in the wild</h1>
<p>Teacher: a {t['params']:,}-parameter ViT trained on MNIST digits (test top-1 {100 * t['test_top1']:.2f}%, its
epoch chosen on a validation split at {100 * t['val_top1']:.2f}%); student: {results['student_params']:,} parameters.
Wild pool: {pool['size']} images ({pool['digits']} digits; {html.escape(pool_text)}).
Each selection keeps {results['config']['num_select']} images. Every student trains for the same number of optimizer
steps and keeps the epoch chosen without the test set (fidelity to the teacher; the labels row: validation).
Run: {'quick' if results['quick'] else 'full'}, {results['seconds']:.0f} s on the CPU. Settings: <code>{cfg}</code>.</p>
<h2>Results</h2><table>{head}{''.join(body)}</table>
<p>Precision: fraction of digits among the selected images (the selector never sees the sources).</p>
<h2>Findings</h2><ul>{''.join(f'<li>{n}</li>' for n in notes)}</ul>
<h2>Figures</h2>{images}
</body></html>"""


def fig_cost_top1(results: dict) -> Figure:
    """Test top-1 (mean ± sd over seeds) against images/s on one CPU thread, the teacher among the students."""
    t, rows = results["teacher"], results["rows"]
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([t["cost"]["images_per_s"]], [100 * t["top1"]], "k*", markersize=12)
    ax.annotate("teacher", (t["cost"]["images_per_s"], 100 * t["top1"]), xytext=(8, -3), textcoords="offset points",
                fontsize=8)
    for k, r in enumerate(sorted(rows, key=lambda r: (r["cost"]["images_per_s"], r["top1"]))):
        color = "tab:green" if r["structure"]["kind"] == "CNN" else "tab:orange"
        x, y = r["cost"]["images_per_s"], 100 * r["top1"]
        ax.errorbar([x], [y], yerr=[100 * r["top1_sd"]], fmt="o", color=color, capsize=3,
                    mfc=color if r["probe_weight"][0] else "white")
        ax.annotate(r["name"], (x, y), xytext=(8, 8 if k % 2 else -12), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("images/s (forward passes, one CPU thread; log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Accuracy against speed (green: CNN, orange: ViT; filled: with the probe loss; bars: sd over seeds)",
                 fontsize=9)
    return fig


def student_findings(results: dict) -> list[str]:
    """Whether the probe loss helps each student beyond the spread of its seeds (as `compare` claims), what the
    selection gives the CNN against its original images, and each new student against the demo's ViT student."""
    rows, t = {r["name"]: r for r in results["rows"]}, results["teacher"]
    out = []
    for label, with_probe, without in (("the CNN student", "cnn-probe", "cnn-kd"),
                                       ("the coarse ViT student (2x2 tokens)", "vit-2x2-probe", "vit-2x2-kd")):
        if with_probe in rows and without in rows:
            a, b = rows[with_probe], rows[without]
            verdict = ("does not help beyond the spread of the seeds" if not differs(a, b) else
                       "helps" if a["top1"] > b["top1"] else "does not help: it hurts")
            out.append(f"For {label}, the probe loss {verdict}: {compare(a, b)}.")
    if "cnn-kd" in rows and "cnn-kd-original" in rows:
        out.append(f"The CNN on the wild selection against the CNN on the original images: "
                   f"{compare(rows['cnn-kd'], rows['cnn-kd-original'])}.")
    ref = rows.get("vit-4x4-probe")
    for r in results["rows"]:
        if ref is not None and r["name"] != ref["name"] and r["name"] != "cnn-kd-original":
            speed = r["cost"]["images_per_s"] / ref["cost"]["images_per_s"]
            out.append(f"{r['name']} runs at {speed:.1f}x the images/s of the demo's ViT student "
                       f"({r['vs_teacher']['images_per_s']:.1f}x the teacher's against "
                       f"{ref['vs_teacher']['images_per_s']:.1f}x) with {r['cost']['params']:,} parameters against "
                       f"{ref['cost']['params']:,}; {compare(r, ref)}.")
    best = max(results["rows"], key=lambda r: r["top1"])
    out.append(f"Best row: <b>{html.escape(best['name'])}</b>, {100 * best['top1']:.1f} ± {100 * best['top1_sd']:.1f}% "
               f"test top-1 ({100 * best['relative_top1']:.0f}% of the teacher's {100 * t['top1']:.1f}%).")
    return out


def write_students_report(run: Path, results: dict) -> Path:
    """RUN/report.html of `attnprobe demo --students`: the students against the teacher, cost and accuracy."""
    figs_dir = run / "figures"
    figs = [("Test top-1", png(fig_top1(results), figs_dir / "top1.png")),
            ("Accuracy against speed", png(fig_cost_top1(results), figs_dir / "cost_top1.png"))]
    path = run / "report.html"
    write_text(path, _students_html(results, figs, student_findings(results)))
    return path


def _students_html(results: dict, figs, notes) -> str:
    t, sel, how = results["teacher"], results["selection"], results["cost_measured"]
    esc = html.escape
    rows = [["<b>teacher</b>", f"{esc(t['cost']['arch'])}: {esc(t['structure']['text'])}",
             "original training set, labels", "cross-entropy", f"{t['cost']['params']:,}", flops(t['cost']['flops']),
             f"{t['cost']['images_per_s']:,.0f}", "1.0x", f"{100 * t['top1']:.2f}", "", "100%"]]
    for r in results["rows"]:
        c = r["cost"]
        rows.append([esc(r["name"]), f"{esc(r['student'])}: {esc(r['structure']['text'])}", esc(r["data"]),
                     esc(r["method"]) + (f" (weight {r['probe_weight'][0]:g})" if r["probe_weight"][0] else ""),
                     f"{c['params']:,}", flops(c["flops"]), f"{c['images_per_s']:,.0f}",
                     f"{r['vs_teacher']['images_per_s']:.1f}x",
                     f"{100 * r['top1']:.2f} ± {100 * r['top1_sd']:.2f}",
                     ", ".join(f"{100 * v:.1f}" for v in r["test_top1"]), f"{100 * r['relative_top1']:.0f}%"])
    head = ["student", "architecture (grid or stages)", "learns from", "how", "parameters", "FLOPs / image",
            "images/s", "images/s x teacher", "test top-1 % (mean ± sd)", "seeds", "of teacher"]
    comp = ", ".join(f"{k} {v}" for k, v in sel["composition"].items())
    images = "".join(f"<h3>{esc(title)}</h3><img src='data:image/png;base64,{b64}' alt='{esc(title)}'>"
                     for title, b64 in figs)
    steps = results["rows"][0]["steps"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>attnprobe: other students on digits</title>
<style>body{{font-family:sans-serif;max-width:1250px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}
th{{background:#f3f3f3}}img{{max-width:100%}}</style></head><body>
<h1>Other students on digits in the wild</h1>
<p>Teacher: {esc(t['cost']['arch'])} ({esc(t['structure']['text'])}, {t['params']:,} parameters) trained on MNIST
digits: test top-1 {100 * t['test_top1']:.2f}%, its epoch chosen on a validation split at {100 * t['val_top1']:.2f}%.
Each student learns from the default selection ({esc(results['default_selection'])}: {sel['size']} wild images,
{100 * sel['precision']:.0f}% digits; {esc(comp)}) or, where it says so, from the original training images; each
row trains with {len(results['seeds'])} seeds for {steps:,} optimizer steps at the same batch size and learning
rate, and keeps the epoch chosen on fidelity to the teacher (never on the test set).
Run: {'quick' if results['quick'] else 'full'}, {results['seconds']:.0f} s on the CPU.</p>
<h2>Students against the teacher</h2>{table(head, rows)}
<p>Parameters and FLOPs (2 x multiply-adds of one forward pass of one image) counted; images/s timed on forward
passes of batches of {how['batch_size']} on {esc(str(how['device']))} with {how['threads']} thread, every model one
after another in one process after the training ended ({how['rounds']} rounds, each model's fastest kept).</p>
<h2>Findings</h2><ul>{''.join(f'<li>{n}</li>' for n in notes)}</ul>
<p>A difference between two rows is claimed only when it is larger than the spread of their seeds (the larger
sd).</p>
<h2>Figures</h2>{images}
</body></html>"""
