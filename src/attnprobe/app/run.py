"""`attnprobe run`: score -> select -> distill -> evaluate -> report, in one folder.

Each stage has a key: a hash of its inputs by content (the teacher's bytes, the pool's content identity:
each file's name, size and mtime_ns, the stage before) and of the settings that change its result. A stage
whose key is unchanged and whose outputs verify (a readable table, best.pt, evaluation.json) is reused; a
changed key, or outputs that do not verify, redo that stage (and a changed key those after it). A stage
stopped half-way (Ctrl-C, kill -9, a lost machine) continues: scoring from its finished parts,
distillation from its last.pt. Everything that can be checked before the first stage is (nothing is written
on a refusal), and RUN/.lock keeps a second `run` out of the folder while one runs.

    RUN/config.json       every setting, by stage
    RUN/stages.json       per stage: key, status (started/done), seconds
    RUN/scores.parquet    (+ scores.skipped.csv)
    RUN/<strategy>/selection.parquet, selection.json, student/, evaluation.json
    RUN/decoded/          the decoded selection, shared by the strategies (not with --no-decode-cache)
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
from ..io.lock import hold
from .run_files import (CONFIG_FIX, check_run_out, checkpoint_problem, evaluation_problem, folder_identity,
                        pool_identity, read_evaluation, read_stages, run_json, selection_problem, table_problem)


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
    out = Path(out)
    teacher, wild = Path(teacher).resolve(), Path(wild).resolve()
    test = Path(test).resolve() if test else None
    _preflight(teacher, wild, out, test, select_settings.num_select, distill_settings)  # every check that can fail before a stage: no writes
    device = str(distributed.init_distributed(score_settings.device))  # this process's device, as a setting
    lock = None
    try:
        lock = _lock(out)
        stages = Stages(out)  # read (a damaged one refused) before anything is written
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
        teacher_id = file_sha256(teacher)
        # the score stage's key: the teacher's bytes, the pool's content identity (each file's name, size and
        # mtime_ns), and the settings that change the table (not chunk_size: the table is the same)
        scoring = {k: v for k, v in score_settings.result_settings().items() if k != "chunk_size"}
        score_key = _key(teacher_id, str(wild), pool_identity(wild), scoring)
        test_id = [str(test), folder_identity(test)]
        scores = out / "scores.parquet"

        def stage(name, key, check, work, *, clear=(), kept=None, again="running again"):
            """Reuse, continue or (re)do one stage. Reused only when its key is unchanged and `check()` finds its
            outputs sound (None); otherwise `clear` is removed (a changed key, or outputs that do not verify) and
            the stage is done again. `kept`: what a stopped stage left to continue from."""
            problem = check() if stages.done(name, key) else None
            if stages.done(name, key) and problem is None:
                bar.line(name, "reused")
                return
            fresh = problem is not None or not stages.started(name, key)
            if fresh and distributed.is_main():
                for p in clear:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            distributed.barrier()
            going_on = not fresh and kept is not None and kept.exists()
            bar.line(name, f"{problem}, {again}" if problem else "continuing" if going_on else "running")
            stages.mark(name, key, "started", stages.seconds(name))
            t0 = time.time()
            work()
            distributed.barrier()
            bar.took[name] = round(time.time() - t0, 2)  # the estimate for the stages of its kind still to come
            stages.mark(name, key, "done", bar.took[name])

        stage("score", score_key, lambda: table_problem(scores, full=False),
              lambda: api.score(teacher, wild, scores, settings=score_settings, device=device),
              clear=(scores, scores.with_name("scores.skipped.csv"), scores.with_name("scores.parquet.parts")),
              kept=scores.with_name("scores.parquet.parts"), again="scoring again")
        results = {}
        # one decoded selection for every strategy: the rows their selections share are decoded once
        decoded = distill_settings.decode_cache or str(out.resolve() / "decoded")
        for strategy in run_settings.strategies:
            folder = out / strategy
            sel_settings = SelectSettings.build(select_settings, strategy=strategy)
            select_key = _key(score_key, sel_settings.result_settings())
            selection = folder / "selection.parquet"
            stage(f"select:{strategy}", select_key, lambda: selection_problem(selection),
                  _on_main(api.select, scores, out=selection, settings=sel_settings),
                  clear=(selection, selection.with_suffix(".json")), again="selecting again")
            # --test chooses the epoch only with --select-on test; otherwise it is measured, and a new one
            # redoes evaluate and the report alone
            chooses = [test_id] if distill_settings.select_on == "test" else []
            distill_key = _key(select_key, *chooses, distill_settings.result_settings())
            student = folder / "student"
            resume = student / "last.pt"
            stage(f"distill:{strategy}", distill_key, lambda: checkpoint_problem(student / "best.pt"),
                  lambda: api.distill(teacher, wild, selection, out=student, test=test, settings=distill_settings,
                                      device=device, decode_cache=decoded,
                                      resume=str(resume) if resume.is_file() else None,
                                      overwrite=not resume.is_file()),  # a cleared or never-saved student folder
                  clear=(student,), kept=resume, again="training again")
            evaluation = folder / "evaluation.json"
            stage(f"evaluate:{strategy}", _key(distill_key, test_id), lambda: evaluation_problem(evaluation),
                  lambda: _evaluate(teacher, student / "best.pt", test, evaluation, out / "teacher-evaluation.json",
                                    distill_settings, device, _key(teacher_id, test_id)),
                  clear=(evaluation,), again="evaluating again")
            results[strategy] = read_evaluation(evaluation)
        report_key = _key([stages.by_name[n]["key"] for n in plan[:-1]])
        report = out / "report.html"
        stage("report", report_key, lambda: None if report.is_file() and report.stat().st_size else "report.html is "
              "missing", _on_main(_report, out), again="writing it again")
        distributed.barrier()
        return {"run": str(out), "strategies": results}
    finally:
        if lock is not None:
            lock.release(remove=True)  # the run's own lock file: the folder is left as the run made it
        distributed.cleanup()


def _preflight(teacher: Path, wild: Path, out: Path, test: Path | None, num_select: int,
               distill: DistillSettings) -> None:
    """What can fail before the first stage fails before it, and writes nothing: the paths, `--out` (not inside
    the pool, a run's folder or a new one), a student that cannot be distilled from this teacher (its input,
    --probe-blocks, probe maps that cannot be compared), --select-on test without --test, a --num-select above
    the images listed, and shards that distill cannot read by offset (compressed)."""
    from ..io.folders import PathList
    from ..io.inputs import check_inputs
    from ..io.shards import is_compressed, is_shard_pool, list_shards
    from ..models import build_student
    from ..stages.distill import probe_plan
    if not teacher.is_file():
        raise AttnprobeError(f"--teacher {teacher} is not a file; pass a checkpoint (train-teacher or import-teacher)")
    check_inputs({"--wild": (wild, "pool"), "--test": (test, "dir")})
    if out.exists() and not out.is_dir():
        raise AttnprobeError(f"--out {out} is a file; pass a folder for the run")
    check_run_out(out, wild)
    if distill.select_on == "test" and test is None:
        raise AttnprobeError("--select-on test chooses the epoch on the test set and needs --test; "
                             "without one, choose on fidelity")
    if is_shard_pool(wild):
        packed = next((s.path for s in list_shards(wild) if is_compressed(s.path)), None)
        if packed is not None:
            raise AttnprobeError(f"--wild {wild}: shard {packed} is compressed: distill reads the selected members "
                                 "by offset, which a compressed shard does not allow; decompress the shards (gunzip "
                                 "turns x.tar.gz into a plain x.tar) and pass the plain ones")
    elif num_select > (listed := len(PathList.from_dir(wild))):  # the scored rows are at most the images listed
        raise AttnprobeError(f"--num-select {num_select} is more than the {listed} images under --wild {wild}; "
                             "pass a smaller --num-select")
    net, info = load_checkpoint(teacher, teacher=True)
    student = build_student(distill.student, distill.model_kwargs, teacher_info=info, teacher_model=net)[0]
    probe_plan(distill, net, student, info)  # --probe-blocks, and a student whose maps cannot be compared


def _lock(out: Path):
    """RUN/.lock, held by rank 0 for the run's whole life: a second `run` into the folder is refused at once;
    a killed one frees it (a record lock). Every rank learns whether rank 0 got it."""
    lock, refusal = None, None
    if distributed.is_main():
        try:
            lock = hold(out / ".lock", f"`attnprobe run` into {out}", "wait for it to finish, or pass another --out")
        except AttnprobeError as e:
            refusal = e
    if not distributed.all_gather_object(refusal is None)[0]:
        raise refusal or AttnprobeError(f"another `attnprobe run` into {out} is running; wait for it to finish, "
                                        "or pass another --out")
    return lock


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
              device, key: str) -> None:
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
    try:
        cached = read_evaluation(teacher_cache, {})
    except AttnprobeError:  # a damaged cache is measured again
        cached = {}
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

