"""The sections of an `attnprobe run` report, each (title, HTML) from the run's files as report_run reads
them: the strategies compared, the teacher, the pool, the selections, the distillation, the cost and the
stages. A part the run has not reached yet is left out or marked."""
from __future__ import annotations

import html
import math

import pandas as pd

from ..method.selection import used_settings
from .figures import fig_attention
from .report_run_figures import fig_classes, fig_curves, fig_ranking, fig_score_terms

STAR_NOTE = "<p class=note>* from the last epoch in metrics.jsonl (no evaluation.json yet).</p>"
FIDELITY = ("fidelity: top-1 agreement of the student with the teacher on the part of the selection held out "
            "from training (no labels needed); each strategy holds out its own images, so it compares a student with "
            "its teacher more than one strategy with another")
esc = html.escape


def result(s: dict, key: str):
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


def cell(s: dict, key: str) -> str:
    return pct(result(s, key)[0]) + result(s, key)[1]


def num(v, fmt=",") -> str:
    return "—" if v is None else format(v, fmt)


def flops(v) -> str:
    if v is None:
        return "—"
    scale, prefix = next((s, p) for s, p in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")) if v >= s or s == 1)
    return f"{v / scale:.2f} {prefix}FLOP"


def bar(v, top: float, color: str = "#4a79a5", width: int = 120) -> str:
    """An inline bar of v / top (drawn by the browser from the table itself: no image needed)."""
    return "" if not v else f"<span class=bar style='width:{width * min(v / top, 1):.0f}px;background:{color}'></span>"


def table(head: list[str] | None, rows: list[list]) -> str:
    top = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" if head else ""
    return f"<table>{top}" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>"


def verdict(strats: list[dict]) -> str:
    key = "test_top1" if any(result(s, "test_top1")[0] is not None for s in strats) else "fidelity"
    have = [(s["name"], result(s, key)[0]) for s in strats if result(s, key)[0] is not None]
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


def star(rows) -> str:
    return STAR_NOTE if any("*" in str(cell) for r in rows for cell in r) else ""


def compare_section(c: dict) -> tuple[str, str]:
    """Does the selection matter? The strategies side by side."""
    rows = [[esc(s["name"]), f"{s['summary'].get('num_select', '—')} of {s['summary'].get('pool_size', '—')}"]
            + [cell(s, k) + bar(result(s, k)[0], 1.0) for k in ("test_top1", "test_top5", "fidelity")]
            for s in c["strats"]]
    if c["t_eval"].get("test_top1") is not None:
        rows.append(["<i>teacher</i>", "", pct(c["t_eval"]["test_top1"]) + bar(c["t_eval"]["test_top1"], 1, "#999"),
                     "", ""])
    return "Does the selection matter on this data?", (
        table(["strategy", "selected", "test top-1", "test top-5", "fidelity"], rows) + star(rows)
        + f"<p>{verdict(c['strats'])}</p>")


def teacher_section(c: dict) -> str:
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
    return table(None, rows)


def pool_sections(c: dict, scores, meta: dict) -> list:
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
        body += table(["reason", "files", "example", "example paths"], rows)
    out = [("Pool", body)] + [(f"Note on {esc(s['name'])}", f"<p>{esc(s['note'])}</p>")
                              for s in c["strats"] if s.get("note")]
    if c["ranks"]:
        out.append(("Score terms and the cut at K", c["fig"](fig_score_terms(scores, c["ranks"]), "score_terms")))
    return out


def selection_sections(c: dict, scores, meta: dict) -> list:
    out, t, fig = [], c["teacher"], c["fig"]
    done = [s for s in c["strats"] if s["selection"] is not None]
    if done:
        classes = t["classes"] if t else meta.get("classes") or [str(i) for i in range(int(scores.pred.max()) + 1)]
        rows = [[esc(s["name"]), f"{len(s['selection']):,}",
                 esc(", ".join(f"{k} {m[k]}" for k in used_settings(m.get("strategy", s["name"])) if k in m) or "—"),
                 f"{m['score_min']:.4g} … {m['score_max']:.4g}" if "score_min" in m else "—",
                 f"{s['selection'].pred.nunique()} of {len(classes)}"] for s, m in ((s, s["summary"]) for s in done)]
        out.append(("Selections", table(["strategy", "images", "settings", "score range", "classes predicted"], rows)
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


_STUDENT_KINDS = {"vit": "ViT on the teacher's grid", "vit-other-grid": "ViT on another grid",
                  "no-cls": "no CLS token"}


def probe_term(probe: dict | None) -> str:
    """The probe term a student was distilled with: its weight and the student's maps, or off (and why not)."""
    if not probe:
        return "—"
    kind = _STUDENT_KINDS.get(probe.get("kind"), probe.get("kind"))
    if not probe.get("weight"):
        return f"off ({esc(str(kind))})"
    grids = ", ".join(f"{h}x{w}" for h, w in probe.get("student_grids") or [])
    teacher = "x".join(map(str, probe["teacher_grid"]))
    return f"weight {probe['weight']:g}: {esc(str(kind))}, maps {grids} against the teacher's {teacher}"


def distillation_sections(c: dict) -> list:
    trained, rows = [s for s in c["strats"] if s["metrics"]], []
    for s in trained:
        last, info = s["metrics"][-1], s["student"] or {}
        chosen, on = info.get("best_epoch", info.get("epoch")), {"test": "test top-1"}.get(info.get("selected_on"),
                                                                                              info.get("selected_on"))
        held = f" ({last['fidelity_n']} held out)" if last.get("fidelity_n") else ""
        rows.append([esc(s["name"]), len(s["metrics"]), f"{last['loss']:.4f}" if "loss" in last else "—",
                     pct(last.get("fidelity")) + held, pct(last.get("test_top1")),
                     "—" if chosen is None else f"epoch {chosen + 1}, chosen on {esc(str(on or 'test top-1'))}",
                     probe_term(info.get("probe")), seconds(sum(m.get("seconds") or 0 for m in s["metrics"]))])
    f = fig_curves(trained) if trained else None
    head = ["strategy", "epochs", "last loss", "last fidelity", "last test top-1", "best.pt", "probe term",
            "training time"]
    return [("Distillation", table(head, rows) + f"<p class=note>{FIDELITY}.</p>"
             + (c["fig"](f, "learning_curves") if f else ""))] if trained else []


def cost_section(c: dict) -> tuple[str, str]:
    """The student against the teacher: size, cost, speed, fidelity, accuracy."""
    t_eval, t = c["t_eval"], c["teacher"] or {}
    tp, tf, ts = t_eval.get("params") or t.get("params"), t_eval.get("flops"), t_eval.get("images_per_s")
    rows = [["teacher", esc(t.get("arch", "—")), num(tp), flops(tf), num(ts, ",.0f"), "—",
             pct(t_eval.get("test_top1")), pct(t_eval.get("test_top5")), ""]]
    for s in c["strats"]:
        ev, info = s["evaluation"].get("student") or {}, s["student"] or {}
        sp, sf, ss = ev.get("params") or info.get("params"), ev.get("flops"), ev.get("images_per_s")
        vs = [tp and sp and f"{tp / sp:.1f}x fewer parameters", tf and sf and f"{tf / sf:.1f}x fewer FLOPs",
              ts and ss and f"{ss / ts:.1f}x the throughput"]
        rows.append([f"student ({esc(s['name'])})", esc(info.get("arch", "—")), num(sp), flops(sf),
                     num(ss, ",.0f"), *(cell(s, k) for k in ("fidelity", "test_top1", "test_top5")),
                     ", ".join(v for v in vs if v)])
    head = ["model", "architecture", "parameters", "FLOPs / image", "images/s", "fidelity", "test top-1",
            "test top-5", "student against teacher"]
    how = next((e for e in [t_eval, *(s["evaluation"].get("student") or {} for s in c["strats"])] if e.get("device")),
               {})
    where = f" (on {esc(str(how['device']))}, batches of {how.get('batch_size')}" + \
        (f", CPU threads: {how['threads']})" if how.get("threads") else ")") if how else ""
    return "Student against teacher", table(head, rows) + star(rows) + (
        "<p class=note>Parameters and FLOPs (2 x multiply-adds of one forward pass of one image) counted; images/s "
        f"timed on forward passes by the run's evaluate stage{where}; {FIDELITY}.</p>")


def stage_sections(c: dict, stages) -> list:
    if not stages:
        return []
    longest = max(float(st.get("seconds") or 0) for st in stages) or 1.0
    rows = [[esc(str(st.get("stage"))), esc(str(st.get("status"))), seconds(st.get("seconds")),
             bar(st.get("seconds"), longest, "#4a79a5" if st.get("status") == "done" else "#bbb", 400)]
            for st in stages]
    rows.append(["<b>total</b>", "", f"<b>{seconds(sum(float(st.get('seconds') or 0) for st in stages))}</b>", ""])
    return [("Stages", table(["stage", "status", "time", ""], rows))]
