"""Step 1b of the method (`attnprobe select`): the K best rows of a score table by a strategy
(method/selection.py), written as a selection table with its summary (class histogram, DFND's class
weights) in the table's metadata and beside it as `<stem>.json`; for a shard pool with DataComp uids,
also `<stem>.uids.npy`, DataComp's subset file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AttnprobeError
from ..io.atomic import write_json
from ..io.outputs import skipped_path
from ..io.shards import write_selection_uids
from ..io.tables import read_table, write_table
from ..method.selection import select_images

if TYPE_CHECKING:
    from ..settings import SelectSettings


def select(*, scores, out, settings: SelectSettings) -> dict:
    """Select settings.num_select rows of the score table `scores` by settings.strategy; write them to `out`
    (.parquet) and the summary to `<out stem>.json`. Returns the summary."""
    df, meta = read_table(scores)
    for col in ("path", "pred"):
        if col not in df.columns:
            raise AttnprobeError(f"{scores} has no {col!r} column; pass a table written by `attnprobe score`")
    if df.empty:  # not --num-select's fault: nothing of the pool was scored
        raise AttnprobeError(f"{scores} has no rows: no image of its pool could be read (each is listed with its "
                             f"reason in {skipped_path(scores)}); fix or replace the pool's images and score it again")
    selected, summary = select_images(df, settings.num_select, settings.strategy, settings.w_attn, settings.w_out,
                                      settings.seed, settings.normalize, meta.get("num_classes"))
    summary.update(scores=os.path.abspath(scores), classes=meta.get("classes"))
    out = Path(out)
    summary.update(write_selection_uids(selected, out))  # a shard pool's: DataComp's subset file, rows left out
    write_table(selected, out, {**meta, "selection": summary})
    write_json(out.with_suffix(".json"), summary)
    return summary
