"""The report of an `attnprobe run` folder (score -> select -> distill -> evaluate for one or more strategies).

Every number is read from the run's own files: config.json, stages.json, scores.parquet and its skipped list,
<strategy>/selection.{parquet,json}, <strategy>/student/{best.pt,metrics.jsonl}, <strategy>/evaluation.json and
the checkpoints' infos. A stage that has not run yet leaves its part out. Figures are written to RUN/figures/*.png
and embedded in one self-contained RUN/report.html (no external files: it opens offline)."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import AttnprobeError
from ..io.atomic import write_text
from ..io.checkpoints import read_checkpoint
from ..io.tables import read_table
from ..method.selection import strategy_scores
from .figures import png
from .report_sections import (
    compare_section,
    cost_section,
    distillation_sections,
    pool_sections,
    selection_sections,
    stage_sections,
    teacher_section,
)
from .run_files import read_config, read_evaluation, read_jsonl, read_stages, run_json

COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
SELECT_DEFAULTS = {"w_attn": 0.05, "w_out": 0.9, "seed": 0, "normalize": "none"}
esc = html.escape


def _info(path: Path):
    """(a checkpoint's info, None), or (None, the reason it cannot be read)."""
    try:
        return read_checkpoint(path)["info"], None
    except AttnprobeError as e:
        return None, str(e)


def _strategy(run: Path, name: str, color: str) -> dict:
    d = run / name
    return {"name": name, "color": color, "summary": run_json(d / "selection.json", "a selection's summary", {}),
            "selection": read_table(d / "selection.parquet")[0] if (d / "selection.parquet").is_file() else None,
            "metrics": read_jsonl(d / "student" / "metrics.jsonl"),
            "evaluation": read_evaluation(d / "evaluation.json", {}),
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


def write_run_report(run_dir) -> Path:
    """Build RUN/report.html (self-contained) and RUN/figures/*.png from an `attnprobe run` folder. Every side
    file is read (and a damaged one refused) before anything is written."""
    run = Path(run_dir)
    cfg = read_config(run)
    strats = [_strategy(run, name, COLORS[i % len(COLORS)]) for i, name in enumerate(cfg["strategies"])]
    stages = read_stages(run)
    teacher, teacher_err = _info(Path(cfg["teacher"]))
    scores, meta = read_table(run / "scores.parquet") if (run / "scores.parquet").is_file() else (None, {})

    def fig(f, name: str) -> str:
        return f"<img src='data:image/png;base64,{png(f, run / 'figures' / f'{name}.png')}' alt='{esc(name)}'>"

    ranks = [] if scores is None else [r for r in (_ranking(scores, s, cfg) for s in strats
                                                   if s["selection"] is not None) if r]
    c = {"run": run, "cfg": cfg, "strats": strats, "teacher": teacher, "fig": fig, "wild": Path(cfg["wild"]),
         "t_eval": next((s["evaluation"]["teacher"] for s in strats if s["evaluation"].get("teacher")), {}),
         "ranks": ranks}
    sections = [compare_section(c), ("Teacher", teacher_section(c) if teacher else f"<p>{esc(teacher_err)}</p>"),
                *pool_sections(c, scores, meta), *selection_sections(c, scores, meta), *distillation_sections(c),
                cost_section(c), *stage_sections(c, [st for st in stages if isinstance(st, dict)])]
    path = run / "report.html"
    write_text(path, _html(run, cfg, strats, sections))
    return path


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
