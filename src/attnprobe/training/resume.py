"""Resuming a stopped run: the random streams of every process, the settings a run records and a resume
must repeat, the training objects restored from RUN/last.pt, and what last.pt saves to make that possible."""
from __future__ import annotations

import json
import numbers
import os
import random
import warnings
from dataclasses import fields

import numpy as np
import torch

from ..errors import AttnprobeError
from ..io.checkpoints import read_checkpoint
from .distributed import all_gather_object, is_main, rank, world_size


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch. Seeds derived from --seed (seed + rank, seed + epoch offsets) may pass
    numpy's 2**32 - 1, so they are taken modulo 2**32."""
    seed %= 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(loader_generator: torch.Generator | None = None) -> dict:
    """This process's random streams: torch (CPU and current GPU), numpy, python, the loader's generator.

    Kept as plain values and tensors so that checkpoints still load with weights_only=True."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if loader_generator is not None:
        state["loader"] = loader_generator.get_state()
    return state


def set_rng_state(state: dict, loader_generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if loader_generator is not None and "loader" in state:
        loader_generator.set_state(state["loader"])


def recorded_settings(settings) -> dict:
    """The settings (a settings dataclass) that change the training: what a checkpoint records as
    info["settings"] and a resume must repeat. Runtime ones (workers, device, resume, ...) are left out."""
    recorded = {f.name: plain(getattr(settings, f.name)) for f in fields(settings) if not f.metadata.get("runtime")}
    if recorded.get("model_kwargs", {}) is None:  # None and {} both mean: no overrides
        recorded["model_kwargs"] = {}
    return recorded


def plain(value):
    """Plain Python values, recursively (what a checkpoint's info holds, so that it loads with weights_only,
    and compares): tuples as lists, paths as strings, numpy numbers as int/float."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (bool, str, type(None))):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def setting_text(name: str, value) -> str:
    """A recorded setting as the user wrote it: `--lr 0.001`, `--model-kwargs depth=3`, `noise adaptation off`."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return f"{name.replace('_', ' ')} {'on' if value else 'off'}"
    if value is None:
        return f"no {flag}"
    if isinstance(value, dict):
        return f"{flag} " + (" ".join(f"{k}={v!r}" for k, v in value.items()) or "(none)")
    if isinstance(value, list):
        return f"{flag} " + " ".join(map(str, value))
    return f"{flag} {value}"


def check_resumed_settings(resume, old: dict, new: dict, done: int) -> None:
    """A resumed run keeps the settings it was started with: any recorded setting that differs is refused,
    naming the setting and its old value. --epochs may change only where the learning rate does not depend
    on it (the step schedule; a cosine schedule is laid out over the run's epochs, so extending a finished
    cosine run would restart from lr 0), and never to no more than the epochs already trained."""
    for name, now in new.items():
        if name == "epochs" or name not in old or plain(old[name]) == plain(now):
            continue
        raise AttnprobeError(f"{resume} was run with {setting_text(name, old[name])}, this run has "
                             f"{setting_text(name, now)}; a resumed run keeps its settings: pass the same ones, "
                             "or start a new run in another --out")
    before, epochs = old.get("epochs"), new.get("epochs")
    if before is None or epochs is None or before == epochs:
        return
    if new.get("schedule", "cosine") == "cosine":
        raise AttnprobeError(f"{resume} is a {before}-epoch run whose cosine schedule ends at epoch {before}: "
                             f"--epochs must stay {before} on resume; to train longer, start a new run in another "
                             "--out with more --epochs (or --schedule step, which does not depend on --epochs)")
    if epochs <= done:
        raise AttnprobeError(f"{resume} has already trained {done + 1} epochs; --epochs {epochs} leaves none to "
                             f"train: pass more than {done + 1}, or {before} as the run was started")


def resume_state(resume, run, objects: dict, same: dict | None = None, settings: dict | None = None) -> dict:
    """Restore model/optimizer/scheduler/noise state from RUN/last.pt into `objects` and put back
    metrics.jsonl (of `run`, a loop.RunDir) as the checkpoint saw it (each finished epoch once). `same`:
    settings (info keys) that must not change on resume, as {key: (value now, the flag that sets it)};
    checkpoints without a key pass. `settings` (recorded_settings): compared with the ones the checkpoint
    records (info["settings"]), see check_resumed_settings; checkpoints from before settings were recorded
    are compared on `same` alone.

    Returns {"start": next epoch, "history": metrics rows, "rng": per-rank RNG states or None}; a fresh
    run when `resume` is falsy. The best epoch so far is found again in the history (loop.best_row)."""
    if not resume:
        return {"start": 0, "history": [], "rng": None}
    ckpt = read_checkpoint(resume)
    old_settings = ckpt.get("info", {}).get("settings")
    if (settings is not None and isinstance(old_settings, dict) and isinstance(ckpt.get("epoch"), int)
            and (set(old_settings) <= set(settings) or set(settings) <= set(old_settings))):
        # the same kind of run, perhaps of a version with fewer settings (a teacher's last.pt is refused below)
        check_resumed_settings(resume, old_settings, settings, ckpt["epoch"])
    for name, obj in objects.items():
        if name not in ckpt or "epoch" not in ckpt:
            raise AttnprobeError(f"{resume} has no {name} state to resume from; pass the last.pt of the same kind "
                                 "of run")
        try:
            getattr(obj, "module", obj).load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AttnprobeError(f"{resume}: its {name} state does not fit this run ({first}); resume with the "
                                 "same model and options as the stopped run") from None
    for key, (now, flag) in (same or {}).items():
        before = ckpt.get("info", {}).get(key)
        if before is not None and before != now:
            if key.endswith("sha256"):  # a file's identity: the start of the hash is enough to tell them apart
                before, now = f"sha256 {before[:12]}...", f"sha256 {str(now)[:12]}..."
            raise AttnprobeError(f"{resume} was run with {flag} {before}, this run has {now}; resume with the "
                                 "same setting")
    done = ckpt["epoch"]
    if "metrics" in ckpt:
        history = [dict(r) for r in ckpt["metrics"] if r["epoch"] <= done]
    else:  # checkpoints from before the history was stored: keep the file's rows up to the checkpoint
        history = []
        if run.metrics.exists():
            for line in run.metrics.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line
                if row.get("epoch", done + 1) <= done:
                    history.append(row)
    run.rewrite(history)
    threads = ckpt.get("threads")
    return {"start": done + 1, "history": history, "rng": ckpt.get("rng"),
            "threads": threads if isinstance(threads, int) and threads > 0 else None}


def restore_rng(resumed: dict, seed: int, loader_generator: torch.Generator) -> None:
    """Continue the random streams of the stopped run; if it ran with another number of processes,
    reseed from (seed, epoch, rank) instead (the data order then differs from an uninterrupted run)."""
    rngs = resumed["rng"]
    if rngs is not None and len(rngs) == world_size():
        set_rng_state(rngs[rank()], loader_generator)
    elif resumed["start"] > 0:
        if is_main():
            warnings.warn("the resumed run used another number of processes (or stored no random state): "
                          "reseeding, so data order and augmentation differ from an uninterrupted run")
        s = seed + 1_000_003 * resumed["start"] + rank()
        seed_everything(s)
        loader_generator.manual_seed(s)


def checkpoint_state(resumed: dict, epoch: int, best: dict, criterion: str, loader_generator,
                     objects: dict) -> dict:
    """Everything last.pt needs to continue the run: gathers the RNG states of every process. The best
    epoch so far is recorded for reading (best_on, best_score, best_epoch); a resumed run finds it again
    in the metrics rows, on the criterion it runs with."""
    rngs = all_gather_object(rng_state(loader_generator))
    return {**{name: getattr(obj, "module", obj).state_dict() for name, obj in objects.items() if name != "model"},
            "epoch": epoch, "best_on": criterion, "best_score": best[criterion], "best_epoch": best["epoch"],
            "metrics": resumed["history"], "rng": rngs, "threads": torch.get_num_threads()}
