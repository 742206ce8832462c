"""The report of an `attnprobe run` folder (score -> select -> distill -> evaluate for one or more strategies).

Every number is read from the run's own files: config.json, stages.json, scores.parquet and its skipped list,
<strategy>/selection.{parquet,json}, <strategy>/student/{best.pt,metrics.jsonl}, <strategy>/evaluation.json and
the checkpoints' infos. A stage that has not run yet leaves its part out. Figures are written to RUN/figures/*.png
and embedded in one self-contained RUN/report.html (no external files: it opens offline)."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import AttnprobeError
from ..io.atomic import write_text
from ..io.checkpoints import read_checkpoint
from ..io.tables import read_table
from ..method.selection import probe_columns, strategy_scores
from .report import _png, _thumb, fig_attention

RUN_KIND = "attnprobe-run"
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
MAX_CLASSES = 30  # classes drawn in the class figure (the most frequent ones when there are more)
SELECT_DEFAULTS = {"w_attn": 0.05, "w_out": 0.9, "seed": 0, "normalize": "none"}
STAR_NOTE = "<p class=note>* from the last epoch in metrics.jsonl (no evaluation.json yet).</p>"
FIDELITY = ("fidelity: top-1 agreement of the student with the teacher on the part of the selection held out "
            "from training (no labels needed); each strategy holds out its own images, so it compares a student with "
            "its teacher more than one strategy with another")
esc = html.escape


def _json(path: Path, default=None, lines: bool = False):
    """A JSON file (or with `lines`, a JSON-lines file as a list), `default` when it is not there."""
    if not path.is_file():
        return default
    try:
        text = path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise AttnprobeError(f"{path} is not valid JSON ({type(e).__name__}); rerun the stage that wrote it") from None


def read_config(run: Path) -> dict:
    """RUN/config.json, checked to be an `attnprobe run` config."""
    path = run / "config.json"
    if not path.is_file():
        raise AttnprobeError(f"{run} has no config.json; pass the folder of an `attnprobe run`")
    cfg = _json(path)
    if not isinstance(cfg, dict) or cfg.get("kind") != RUN_KIND:
        raise AttnprobeError(f"{path} is not the config of an `attnprobe run` (no kind {RUN_KIND!r}); "
                             "pass the run's own folder, or rerun `attnprobe run`")
    missing = [k for k in ("teacher", "wild", "strategies") if not cfg.get(k)]
    if missing:
        raise AttnprobeError(f"{path} lacks {', '.join(missing)}; rerun `attnprobe run` to rewrite it")
    return cfg


def _info(path: Path):
    """(a checkpoint's info, None), or (None, the reason it cannot be read)."""
    try:
        return read_checkpoint(path)["info"], None
    except AttnprobeError as e:
        return None, str(e)


def _strategy(run: Path, name: str, color: str) -> dict:
    d = run / name
    return {"name": name, "color": color, "summary": _json(d / "selection.json", {}),
            "selection": read_table(d / "selection.parquet")[0] if (d / "selection.parquet").is_file() else None,
            "metrics": _json(d / "student" / "metrics.jsonl", [], lines=True),
            "evaluation": _json(d / "evaluation.json") or {},
            "student": _info(d / "student" / "best.pt")[0] if (d / "student" / "best.pt").is_file() else None}


def _ranking(scores: pd.DataFrame, s: dict, cfg: dict) -> dict | None:
    """The strategy's combined score over the pool with the run's select settings, its order, K and the cut."""
    st = {**SELECT_DEFAULTS, **cfg.get("select", {}), **{k: v for k, v in s["summary"].items() if k in SELECT_DEFAULTS}}
    try:
        combined = strategy_scores(scores, s["name"], st["w_attn"], st["w_out"], st["seed"], st["normalize"])
    except AttnprobeError as e:
        s["note"] = str(e)
        return None
    order = np.lexsort((np.arange(len(combined)), combined))
    k = min(int(s["summary"].get("num_select") or st.get("num_select") or len(scores)), len(scores))
    rank = np.empty(len(order), int)
    rank[order] = np.arange(len(order))
    chosen = scores.path.isin(s["selection"].path).to_numpy()
    if not np.array_equal(chosen, rank < k):
        s["note"] = "the ranking recomputed from scores.parquet differs from selection.parquet (frames: the file)"
    cut = (combined[order[k - 1]] + combined[order[k]]) / 2 if k < len(order) else combined[order[-1]]
    return {**s, "combined": combined, "order": order, "rank": rank, "k": k, "chosen": chosen, "cut": cut}


def _result(s: dict, key: str):
    """(value, mark) of a student number: from evaluation.json, else from the last epoch in metrics.jsonl ("*")."""
    ev, last = s["evaluation"].get("student") or {}, s["metrics"][-1] if s["metrics"] else {}
    if ev.get(key) is not None:
        return ev[key], ""
    return (last[key], "*") if last.get(key) is not None else (None, "")


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def seconds(v) -> str:
    """A duration as the report writes it: 0.04 s, 12.3 s, 2 min 05 s; unknown (a stage not done) as —."""
    if v is None:
        return "—"
    return f"{v:.2f} s" if v < 1 else f"{v:.1f} s" if v < 120 else f"{int(v // 60)} min {int(v % 60):02d} s"


def _cell(s: dict, key: str) -> str:
    return pct(_result(s, key)[0]) + _result(s, key)[1]


def _num(v, fmt=",") -> str:
    return "—" if v is None else format(v, fmt)


def _flops(v) -> str:
    if v is None:
        return "—"
    scale, prefix = next((s, p) for s, p in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")) if v >= s or s == 1)
    return f"{v / scale:.2f} {prefix}FLOP"


def _bar(v, top: float, color: str = "#4a79a5", width: int = 120) -> str:
    """An inline bar of v / top (drawn by the browser from the table itself: no image needed)."""
    return "" if not v else f"<span class=bar style='width:{width * min(v / top, 1):.0f}px;background:{color}'></span>"


def _table(head: list[str] | None, rows: list[list]) -> str:
    top = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" if head else ""
    return f"<table>{top}" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>"


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
            _thumb(ax, wild / scores.path.iat[i], f"#{r['rank'][i] + 1}  {r['combined'][i]:.4g}",
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


def _verdict(strats: list[dict]) -> str:
    key = "test_top1" if any(_result(s, "test_top1")[0] is not None for s in strats) else "fidelity"
    have = [(s["name"], _result(s, key)[0]) for s in strats if _result(s, key)[0] is not None]
    if len(have) < 2:
        return "Fewer than two strategies have a distilled student yet: nothing to compare."
    (best, hi), (worst, lo) = max(have, key=lambda t: t[1]), min(have, key=lambda t: t[1])
    spread, what = 100 * (hi - lo), "test top-1" if key == "test_top1" else "fidelity (no test set)"
    out = [f"By {what}: all strategies tie at {pct(hi)}." if spread == 0 else f"By {what}: best <b>{esc(best)}</b> "
           f"({pct(hi)}), worst {esc(worst)} ({pct(lo)}), a spread of {spread:.1f} points."]
    n = next((row.get("test_n") for s in strats for row in s["metrics"][-1:] if row.get("test_n")), None)
    if key == "test_top1" and n:
        p = sum(v for _, v in have) / len(have)
        noise = 200 * math.sqrt(2 * p * (1 - p) / n)  # about 2 standard errors of a difference of two accuracies
        out.append(f"The test set has {n:,} images, so differences below about {noise:.1f} points are within its noise"
                   + (": on this data the choice of selection made no measurable difference." if spread < noise
                      else "; this spread is larger."))
    rnd = dict(have).get("random")
    out += [f"{esc(name)} {'beats' if v > rnd else 'loses to' if v < rnd else 'ties'} random by "
            f"{100 * abs(v - rnd):.1f} points." for name, v in have if rnd is not None and name != "random"]
    if key == "fidelity":
        out.append("Without a test set only fidelity is there to compare, each strategy's on its own held-out "
                   "images: a rough guide.")
    return " ".join(out)


def write_run_report(run_dir) -> Path:
    """Build RUN/report.html (self-contained) and RUN/figures/*.png from an `attnprobe run` folder."""
    run = Path(run_dir)
    cfg = read_config(run)
    strats = [_strategy(run, name, COLORS[i % len(COLORS)]) for i, name in enumerate(cfg["strategies"])]
    teacher, teacher_err = _info(Path(cfg["teacher"]))
    scores, meta = read_table(run / "scores.parquet") if (run / "scores.parquet").is_file() else (None, {})
    (run / "figures").mkdir(exist_ok=True)

    def fig(f: Figure, name: str) -> str:
        return f"<img src='data:image/png;base64,{_png(f, run / 'figures' / f'{name}.png')}' alt='{esc(name)}'>"

    ranks = [] if scores is None else [r for r in (_ranking(scores, s, cfg) for s in strats
                                                   if s["selection"] is not None) if r]
    c = {"run": run, "cfg": cfg, "strats": strats, "teacher": teacher, "fig": fig, "wild": Path(cfg["wild"]),
         "t_eval": next((s["evaluation"]["teacher"] for s in strats if s["evaluation"].get("teacher")), {}),
         "ranks": ranks}
    sections = [_compare(c), ("Teacher", _teacher(c) if teacher else f"<p>{esc(teacher_err)}</p>"),
                *_pool(c, scores, meta), *_selections(c, scores, meta), *_distillation(c), _cost(c),
                *_stages(c, _json(run / "stages.json", []))]
    path = run / "report.html"
    write_text(path, _html(run, cfg, strats, sections))
    return path


def _star(rows) -> str:
    return STAR_NOTE if any("*" in str(cell) for r in rows for cell in r) else ""


def _compare(c: dict) -> tuple[str, str]:
    """Does the selection matter? The strategies side by side."""
    rows = [[esc(s["name"]), f"{s['summary'].get('num_select', '—')} of {s['summary'].get('pool_size', '—')}"]
            + [_cell(s, k) + _bar(_result(s, k)[0], 1.0) for k in ("test_top1", "test_top5", "fidelity")]
            for s in c["strats"]]
    if c["t_eval"].get("test_top1") is not None:
        rows.append(["<i>teacher</i>", "", pct(c["t_eval"]["test_top1"]) + _bar(c["t_eval"]["test_top1"], 1, "#999"),
                     "", ""])
    return "Does the selection matter on this data?", (
        _table(["strategy", "selected", "test top-1", "test top-5", "fidelity"], rows) + _star(rows)
        + f"<p>{_verdict(c['strats'])}</p>")


def _teacher(c: dict) -> str:
    t, t_eval = c["teacher"], c["t_eval"]
    kw = ", ".join(f"{k}={v}" for k, v in t.get("model_kwargs", {}).items())
    names = ", ".join(map(str, t["classes"][:12])) + (", …" if t["num_classes"] > 12 else "")
    where = t.get("accuracy_source") or "training validation"
    rows = [["checkpoint", f"<code>{esc(c['cfg']['teacher'])}</code>"],
            ["architecture", f"{esc(t['arch'])} ({esc(kw)})"], ["parameters", f"{t['params']:,}"],
            ["input", f"{t['img_size']} px, {t['in_chans']} channel(s)"],
            ["classes", f"{t['num_classes']}: {esc(names)}"],
            ["accuracy", f"{pct(t.get('accuracy'))} on {esc(str(where))}"]]
    if t.get("source_kind"):
        rows.append(["imported from", esc(str(t["source_kind"]))])
    if t_eval.get("test_top1") is not None:
        rows.append(["test top-1 / top-5", f"{pct(t_eval['test_top1'])} / {pct(t_eval.get('test_top5'))} on "
                                           f"<code>{esc(str(c['cfg'].get('test')))}</code>"])
    return _table(None, rows)


def _pool(c: dict, scores, meta: dict) -> list:
    if scores is None:
        return [("Pool", "<p>The score stage has not finished: no scores.parquet yet.</p>")]
    skip_csv = c["run"] / "scores.skipped.csv"
    skipped = pd.read_csv(skip_csv, keep_default_na=False, dtype=str) if skip_csv.is_file() else \
        pd.DataFrame(columns=["path", "reason"])
    n_scored, n_skipped = int(meta.get("scored", len(scores))), int(meta.get("skipped", len(skipped)))
    body = (f"<p>Pool: <b>{n_scored + n_skipped:,}</b> image files under <code>{esc(str(c['wild']))}</code>: "
            f"{n_scored:,} scored, {n_skipped:,} skipped as unreadable (scores.skipped.csv). Probe blocks "
            f"{esc(str(meta.get('blocks')))}, heads {esc(str(meta.get('heads')))}, resize "
            f"{esc(str(meta.get('resize', 'crop')))}.</p>")
    if len(skipped):
        kinds = skipped.assign(kind=skipped.reason.str.split(":", n=1).str[0]).groupby("kind", sort=False)
        rows = sorted(([esc(k), len(g), esc(g.reason.iat[0][:160]), "<br>".join(esc(p) for p in g.path.head(3))]
                       for k, g in kinds), key=lambda r: -r[1])
        body += _table(["reason", "files", "example", "example paths"], rows)
    out = [("Pool", body)] + [(f"Note on {esc(s['name'])}", f"<p>{esc(s['note'])}</p>")
                              for s in c["strats"] if s.get("note")]
    if c["ranks"]:
        out.append(("Score terms and the cut at K", c["fig"](fig_score_terms(scores, c["ranks"]), "score_terms")))
    return out


def _selections(c: dict, scores, meta: dict) -> list:
    out, t, fig = [], c["teacher"], c["fig"]
    done = [s for s in c["strats"] if s["selection"] is not None]
    if done:
        classes = t["classes"] if t else meta.get("classes") or [str(i) for i in range(int(scores.pred.max()) + 1)]
        rows = [[esc(s["name"]), f"{len(s['selection']):,}",
                 esc(", ".join(f"{k} {m[k]}" for k in ("w_attn", "w_out", "normalize", "seed") if k in m)),
                 f"{m['score_min']:.4g} … {m['score_max']:.4g}" if "score_min" in m else "—",
                 f"{s['selection'].pred.nunique()} of {len(classes)}"] for s, m in ((s, s["summary"]) for s in done)]
        out.append(("Selections", _table(["strategy", "images", "settings", "score range", "classes predicted"], rows)
                    + fig(fig_classes(done, classes), "selected_classes")))
    ranked = [r for r in c["ranks"] if r["name"] != "random"] or c["ranks"]  # a random order's ends mean nothing
    for r in ranked:
        out.append((f"Ranking of {esc(r['name'])}", fig(fig_ranking(scores, r, c["wild"], (t or {}).get("in_chans", 3)),
                                                        f"ranking_{r['name']}")))
    if ranked and t and meta.get("blocks"):
        r = ranked[0]
        try:
            imgs = [fig(fig_attention(c["cfg"]["teacher"], c["wild"], [scores.path.iat[i] for i in idx],
                                      [f"{'selected' if r['chosen'][i] else 'rejected'} #{r['rank'][i] + 1}"
                                       for i in idx], meta["blocks"], meta.get("resize", "crop"),
                                      f"The {end} of {r['name']}'s ranking"), f"attention_{end}")
                    for end, idx in (("top", r["order"][:4]), ("bottom", r["order"][len(r["order"]) - 4:]))]
            out.append(("Attention probe", "<p>Head 0's CLS attention over the patches at each probed block, over "
                        "the image as the teacher saw it.</p><div class=pair>" + "".join(imgs) + "</div>"))
        except Exception as e:  # the wild folder moved: the rest of the report still stands
            out.append(("Attention probe", f"<p>Not drawn: {esc(type(e).__name__)}: {esc(str(e))}</p>"))
    return out


def _distillation(c: dict) -> list:
    trained, rows = [s for s in c["strats"] if s["metrics"]], []
    for s in trained:
        last, info = s["metrics"][-1], s["student"] or {}
        chosen, on = info.get("best_epoch", info.get("epoch")), {"test": "test top-1"}.get(info.get("selected_on"),
                                                                                              info.get("selected_on"))
        held = f" ({last['fidelity_n']} held out)" if last.get("fidelity_n") else ""
        rows.append([esc(s["name"]), len(s["metrics"]), f"{last['loss']:.4f}" if "loss" in last else "—",
                     pct(last.get("fidelity")) + held, pct(last.get("test_top1")),
                     "—" if chosen is None else f"epoch {chosen + 1}, chosen on {esc(str(on or 'test top-1'))}",
                     seconds(sum(m.get("seconds") or 0 for m in s["metrics"]))])
    f = fig_curves(trained) if trained else None
    head = ["strategy", "epochs", "last loss", "last fidelity", "last test top-1", "best.pt", "training time"]
    return [("Distillation", _table(head, rows) + f"<p class=note>{FIDELITY}.</p>"
             + (c["fig"](f, "learning_curves") if f else ""))] if trained else []


def _cost(c: dict) -> tuple[str, str]:
    """The student against the teacher: size, cost, speed, fidelity, accuracy."""
    t_eval, t = c["t_eval"], c["teacher"] or {}
    tp, tf, ts = t_eval.get("params") or t.get("params"), t_eval.get("flops"), t_eval.get("images_per_s")
    rows = [["teacher", esc(t.get("arch", "—")), _num(tp), _flops(tf), _num(ts, ",.0f"), "—",
             pct(t_eval.get("test_top1")), pct(t_eval.get("test_top5")), ""]]
    for s in c["strats"]:
        ev, info = s["evaluation"].get("student") or {}, s["student"] or {}
        sp, sf, ss = ev.get("params") or info.get("params"), ev.get("flops"), ev.get("images_per_s")
        vs = [tp and sp and f"{tp / sp:.1f}x fewer parameters", tf and sf and f"{tf / sf:.1f}x fewer FLOPs",
              ts and ss and f"{ss / ts:.1f}x the throughput"]
        rows.append([f"student ({esc(s['name'])})", esc(info.get("arch", "—")), _num(sp), _flops(sf),
                     _num(ss, ",.0f"), *(_cell(s, k) for k in ("fidelity", "test_top1", "test_top5")),
                     ", ".join(v for v in vs if v)])
    head = ["model", "architecture", "parameters", "FLOPs / image", "images/s", "fidelity", "test top-1",
            "test top-5", "student against teacher"]
    how = next((e for e in [t_eval, *(s["evaluation"].get("student") or {} for s in c["strats"])] if e.get("device")),
               {})
    where = f" (on {esc(str(how['device']))}, batches of {how.get('batch_size')}" + \
        (f", CPU threads: {how['threads']})" if how.get("threads") else ")") if how else ""
    return "Student against teacher", _table(head, rows) + _star(rows) + (
        "<p class=note>Parameters and FLOPs (2 x multiply-adds of one forward pass of one image) counted; images/s "
        f"timed on forward passes by the run's evaluate stage{where}; {FIDELITY}.</p>")


def _stages(c: dict, stages) -> list:
    if not stages:
        return []
    longest = max(float(st.get("seconds") or 0) for st in stages) or 1.0
    rows = [[esc(str(st.get("stage"))), esc(str(st.get("status"))), seconds(st.get("seconds")),
             _bar(st.get("seconds"), longest, "#4a79a5" if st.get("status") == "done" else "#bbb", 400)]
            for st in stages]
    rows.append(["<b>total</b>", "", f"<b>{seconds(sum(float(st.get('seconds') or 0) for st in stages))}</b>", ""])
    return [("Stages", _table(["stage", "status", "time", ""], rows))]


def _html(run: Path, cfg: dict, strats: list[dict], sections) -> str:
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>attnprobe run: {esc(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px;
vertical-align:top}}th{{background:#f3f3f3}}img{{max-width:100%;display:block;margin:.5em 0}}
.note{{color:#666;font-size:13px}}.pair{{display:flex;gap:2em;flex-wrap:wrap}}
.bar{{display:inline-block;height:.7em;margin-left:8px}}
pre{{background:#f7f7f7;padding:.5em;overflow-x:auto}}</style></head><body>
<h1>attnprobe run: {esc(run.name)}</h1>
<p>Teacher <code>{esc(cfg['teacher'])}</code>, wild images <code>{esc(cfg['wild'])}</code>, test set
<code>{esc(str(cfg.get('test')))}</code>; strategies {esc(', '.join(s['name'] for s in strats))}.
Every number below is read from this run's files.</p>
{body}
<h2>Settings</h2><details><summary>config.json</summary><pre>{esc(json.dumps(cfg, indent=1))}</pre></details>
</body></html>"""
