"""Score and selection tables: parquet files with attnprobe's metadata (the teacher, blocks, classes,
the selection's summary) in the schema, written whole by the one atomic writer and read with checks."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import AttnprobeError
from .atomic import replacing

META_KEY = b"attnprobe"  # the table's metadata key
PART_KEY = b"attnprobe_part"  # a score part's own record (its chunk or shard, its skipped files)


def write_table(df: pd.DataFrame, path, meta: dict) -> None:
    """Parquet with our metadata in the schema; written to a temporary file, then renamed."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    with replacing(path) as tmp:
        pq.write_table(table, tmp)  # a new file: mode 0666 less the umask, as any other output


def read_table(path) -> tuple[pd.DataFrame, dict]:
    path = Path(path)
    if not path.is_file():
        raise AttnprobeError(f"table {path} does not exist; run `attnprobe score` (or select) first")
    try:
        table = pq.read_table(path)
    except Exception as e:
        raise AttnprobeError(f"{path} is not a readable parquet table ({type(e).__name__}); rerun the step that "
                             "wrote it") from None
    try:
        meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise AttnprobeError(f"{path}: its attnprobe metadata is damaged; rerun the step that wrote it")
    return table.to_pandas(), meta
