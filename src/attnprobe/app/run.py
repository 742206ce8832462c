"""`attnprobe run`: score -> select -> distill -> evaluate -> report, in one folder.

Each stage has a key: a hash of its inputs (the teacher file, the pool's listing, the stage before) and
of the settings that change its result. A stage whose key is unchanged and whose output is complete is
reused; a changed key redoes that stage and those after it. A stage stopped half-way (Ctrl-C, kill -9,
a lost machine) continues: scoring from its finished parts, distillation from its last.pt.

    RUN/config.json       every setting, by stage
    RUN/stages.json       per stage: key, status (started/done), seconds
    RUN/scores.parquet    (+ scores.skipped.csv)
    RUN/<strategy>/selection.parquet, selection.json, student/, evaluation.json
    RUN/report.html
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from .. import api
from ..errors import AttnprobeError
from ..io.atomic import write_json, write_text
from ..io.checkpoints import file_sha256, load_checkpoint
from ..settings import DistillSettings, EvaluateSettings, RunSettings, ScoreSettings, SelectSettings
from ..training import distributed
from .run_files import CONFIG_FIX, check_side_files, read_evaluation, read_stages, run_json


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class Stages:
    """RUN/stages.json: what ran, with which key, how long. Written by rank 0 only, and only on change. A
    damaged one is refused (one line), not taken for a fresh run: that would clear every finished stage."""

    def __init__(self, run: Path):
        self.path = run / "stages.json"
        self.rows: list[dict] = read_stages(run)
        self.by_name = {r["stage"]: r for r in self.rows if isinstance(r, dict) and "stage" in r}

    def done(self, name: str, key: str) -> bool:
        row = self.by_name.get(name)
        return bool(row) and row.get("key") == key and row.get("status") == "done"

    def started(self, name: str, key: str) -> bool:
        row = self.by_name.get(name)
        return bool(row) and row.get("key") == key

    def seconds(self, name: str) -> float | None:
        return (self.by_name.get(name) or {}).get("seconds")

    def mark(self, name: str, key: str, status: str, seconds: float | None = None) -> None:
        row = {"stage": name, "key": key, "status": status, "seconds": seconds}
        if name in self.by_name:
            self.rows[self.rows.index(self.by_name[name])] = row
        else:
            self.rows.append(row)
        self.by_name[name] = row
        if distributed.is_main():
            write_text(self.path, json.dumps(self.rows, indent=1) + "\n")


class Progress:
    """One line per stage on stderr: its place, the time so far and an estimate of the time left."""

    def __init__(self, plan: list[str], stages: Stages, show: bool):
        self.plan, self.stages, self.show, self.start = plan, stages, show, time.time()
        self.took: dict[str, float] = {}

    def _estimate(self, name: str) -> float | None:
        kind = name.split(":")[0]
        same = [s for n, s in self.took.items() if n.split(":")[0] == kind]
        return sum(same) / len(same) if same else self.stages.seconds(name)

    def line(self, name: str, status: str) -> None:
        if not self.show:
            return
        i = self.plan.index(name)
        guesses = {n: self._estimate(n) for n in self.plan[i:]}
        # score and distill set the pace; an untimed select, evaluate or report counts as nothing
        unknown = any(g is None and n.split(":")[0] in ("score", "distill") for n, g in guesses.items())
        left = "unknown yet" if unknown else f"~{_hms(sum(g or 0 for g in guesses.values()))}"
        print(f"[{i + 1}/{len(self.plan)}] {name}: {status} ({_hms(time.time() - self.start)} elapsed, "
              f"{left} left)", file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run(teacher, wild, out, *, test=None, run_settings: RunSettings, score_settings: ScoreSettings,
        select_settings: SelectSettings, distill_settings: DistillSettings) -> dict:
    """Run (or continue, or reuse) every stage into `out`; returns {strategy: evaluation} and the run folder."""
    from ..io.folders import PathList
    from ..io.shards import content_digest, is_shard_pool

    out = Path(out)
    teacher, wild = Path(teacher).resolve(), Path(wild).resolve()
    test = Path(test).resolve() if test else None
    if not teacher.is_file():
        raise AttnprobeError(f"--teacher {teacher} is not a file; pass a checkpoint (train-teacher or import-teacher)")
    if out.exists() and not out.is_dir():
        raise AttnprobeError(f"--out {out} is a file; pass a folder for the run")
    device = str(distributed.init_distributed(score_settings.device))  # this process's device, as a setting
    try:
        stages = Stages(out)  # read (a damaged one refused) before anything is written
        check_side_files(out, run_settings.strategies)
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        config = {"kind": "attnprobe-run", "version": 1, "teacher": str(teacher), "wild": str(wild),
                  "test": str(test) if test else None, "strategies": list(run_settings.strategies),
                  "score": score_settings.asdict(), "select": select_settings.asdict(),
                  "distill": distill_settings.asdict()}
        _write_config(out / "config.json", config)
        distributed.barrier()  # every process has read stages.json before anyone changes it

        plan = ["score"] + [f"{stage}:{s}" for s in run_settings.strategies
                            for stage in ("select", "distill", "evaluate")] + ["report"]
        bar = Progress(plan, stages, distributed.is_main())  # stage lines always; --no-progress drops the bars
        pool = content_digest(wild) if is_shard_pool(wild) else PathList.from_dir(wild).digest()  # shards or folder
        score_key = _key(file_sha256(teacher), str(wild), pool, score_settings.result_settings())
        scores = out / "scores.parquet"

        def stage(name, key, output: Path, work, *, clear=()):
            """Reuse, continue or (re)do one stage; `clear` is removed when the key changed."""
            if stages.done(name, key) and output.exists():
                bar.line(name, "reused")
                return
            if not stages.started(name, key) and distributed.is_main():
                for p in clear:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            distributed.barrier()
            bar.line(name, "continuing" if stages.started(name, key) else "running")
            stages.mark(name, key, "started", stages.seconds(name))
            t0 = time.time()
            work()
            distributed.barrier()
            bar.took[name] = round(time.time() - t0, 2)  # the estimate for the stages of its kind still to come
            stages.mark(name, key, "done", bar.took[name])

        stage("score", score_key, scores,
              lambda: api.score(teacher, wild, scores, settings=score_settings, device=device),
              clear=(scores, scores.with_name("scores.skipped.csv"), scores.with_name("scores.parquet.parts")))
        results = {}
        for strategy in run_settings.strategies:
            folder = out / strategy
            sel_settings = SelectSettings.build(select_settings, strategy=strategy)
            select_key = _key(score_key, sel_settings.result_settings())
            selection = folder / "selection.parquet"
            stage(f"select:{strategy}", select_key, selection,
                  _on_main(api.select, scores, out=selection, settings=sel_settings),
                  clear=(selection, selection.with_suffix(".json")))
            distill_key = _key(select_key, str(test), distill_settings.result_settings())
            student = folder / "student"
            resume = student / "last.pt"
            stage(f"distill:{strategy}", distill_key, student / "best.pt",
                  lambda: api.distill(teacher, wild, selection, out=student, test=test, settings=distill_settings,
                                  device=device, resume=str(resume) if resume.is_file() else None,
                                  overwrite=not resume.is_file()),  # a cleared or never-saved student folder
                  clear=(student,))
            evaluation = folder / "evaluation.json"
            stage(f"evaluate:{strategy}", distill_key, evaluation,
                  lambda: _evaluate(teacher, student / "best.pt", test, evaluation, out / "teacher-evaluation.json",
                                    distill_settings, device))
            results[strategy] = read_evaluation(evaluation)
        report_key = _key([stages.by_name[n]["key"] for n in plan[:-1]])
        stage("report", report_key, out / "report.html", _on_main(_report, out))
        distributed.barrier()
        return {"run": str(out), "strategies": results}
    finally:
        distributed.cleanup()


def _on_main(fn, *args, **kwargs):
    """A stage that only the main process does (select, evaluate, report); the others wait at the barrier."""
    def work():
        if distributed.is_main():
            fn(*args, **kwargs)
    return work


def _write_config(path: Path, config: dict) -> None:
    """RUN/config.json, rewritten only when a setting changed (a damaged one is refused, not overwritten)."""
    text = json.dumps(config, indent=1, default=str) + "\n"
    old = run_json(path, "the config of an `attnprobe run`", {}, fix=CONFIG_FIX)
    if distributed.is_main() and old != json.loads(text):
        write_text(path, text)


def _evaluate(teacher: Path, best: Path, test, out: Path, teacher_cache: Path, settings: DistillSettings,
              device) -> None:
    """evaluation.json: the student and the teacher side by side (cost, fidelity, test accuracy).

    Every process takes part in the test evaluations (sharded, counts summed); rank 0 alone times the
    models, so that the processes do not compete for the cores it measures, and writes the files."""
    from ..stages.evaluate import evaluate_model
    from ..training.measure import model_cost
    loader = EvaluateSettings(batch_size=settings.batch_size, workers=settings.workers, device=device,
                              progress=False)

    def measured(ckpt, keep=()) -> dict:
        """Test accuracy and cost of a checkpoint, plus the info fields `keep` (loaded once)."""
        net, info = load_checkpoint(ckpt)
        row = {**{k: info.get(k) for k in keep}, "test_top1": None, "test_top5": None}
        if test is not None:
            result = evaluate_model(net, info, test, settings=loader)
            row.update(test_top1=result["top1"], test_top5=result["top5"])
        if distributed.is_main():
            row.update(model_cost(net, info))
        return row

    student = measured(best, keep=("fidelity",))
    key = _key(file_sha256(teacher), str(test))
    cached = read_evaluation(teacher_cache, {})
    if cached.get("key") != key:  # the teacher is measured once per run, not once per strategy
        cached = {"key": key, **measured(teacher)}
        if distributed.is_main():
            write_json(teacher_cache, cached)
    if distributed.is_main():
        teacher_row = {k: v for k, v in cached.items() if k != "key"}
        write_json(out, {"student": student, "teacher": teacher_row})


def _report(out: Path) -> None:
    from .report import write_report
    write_report(out)

