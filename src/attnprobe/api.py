"""The Python API: one function per command, each taking and writing files as the CLI does."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import AttnprobeError
from .exporter import export
from .imports import import_teacher
from .models import atomic_write_text
from .select import read_table, select_images, write_table
from .train import distill, evaluate_checkpoint as evaluate, train_teacher

__all__ = ["prepare", "train_teacher", "score", "select", "distill", "evaluate", "import_teacher", "export"]


def prepare(kind: str, src, out, progress: bool = True) -> dict:
    """Convert an official CIFAR-10/100 or Tiny-ImageNet archive or folder into an ImageFolder tree."""
    from .prepare import prepare as _prepare
    return _prepare(kind, src, out, progress=progress)


def score(teacher, wild, out, blocks=None, heads: str = "first", batch_size: int = 256, workers: int = 2,
          device=None, amp: bool = False, progress: bool = True, chunk_size: int = 2048,
          channels_last: bool = False, compile: bool = False, *, resize: str = "crop") -> dict:
    """Score every image under `wild` with the teacher; write the table to `out` (parquet) and the files
    that could not be read to `<out stem>.skipped.csv` (path, reason).

    Resumable: a stopped run leaves finished chunks of `chunk_size` images in `<out>.parts/`, and the
    same call continues from them. Under torchrun the chunks are shared among the processes. `resize`:
    `crop` (shorter side, centre crop) or `stretch` (the whole image to the square input, as the reference).
    Returns
    the table's metadata plus `scored`, `skipped`, `rows` (= scored) and `skipped_csv`."""
    from .score import score as _score
    return _score(teacher, wild, out, blocks, heads, batch_size, workers, device, amp, progress, chunk_size,
                  channels_last, compile, resize=resize)


def select(scores, num_select: int, strategy: str = "attnprobe", w_attn: float = 0.05, w_out: float = 0.9,
           seed: int = 0, normalize: str = "none", out="selection.parquet") -> dict:
    """Select the K best rows of a score table; write them and a JSON summary (same stem) beside."""
    df, meta = read_table(scores)
    for col in ("path", "pred"):
        if col not in df.columns:
            raise AttnprobeError(f"{scores} has no {col!r} column; pass a table written by `attnprobe score`")
    selected, summary = select_images(df, num_select, strategy, w_attn, w_out, seed, normalize,
                                      meta.get("num_classes"))
    summary.update(scores=os.path.abspath(scores), classes=meta.get("classes"))
    out = Path(out)
    write_table(selected, out, {**meta, "selection": summary})
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    return summary
