"""The one reader of JSON side files (a selection's summary, a run's config.json, stages.json and
evaluation.json, a demo's results.json, the score parts' settings.json, a shard's _stats.json):
damage of any kind becomes one line naming the file, what it should hold and how to fix it."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import AttnprobeError, first_line


def read_json(path, *, what: str, fix: str, kind: type = dict, missing=None):
    """The JSON value in `path`, which must be a `kind` (dict or list). A missing file gives `missing`
    when it is not None (an optional side file) and is refused otherwise; unreadable, truncated or
    mistyped content is refused: `{path}: {what} is damaged (...); {fix}`."""
    path = Path(path)
    if not path.is_file():
        if missing is not None:
            return missing
        raise AttnprobeError(f"{path} does not exist: {what} is missing; {fix}")
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as e:
        raise AttnprobeError(f"{path}: {what} is damaged (not JSON: {first_line(e)}); {fix}") from None
    if not isinstance(value, kind):
        raise AttnprobeError(f"{path}: {what} is damaged (a JSON {type(value).__name__}, expected a "
                             f"{'list' if kind is list else 'mapping'}); {fix}")
    return value


def field(mapping: dict, key: str, kind, *, path, what: str, fix: str, default=None):
    """mapping[key] checked to be a `kind` (a type or a tuple of types); absent: `default` when that is
    not None, else refused like a damaged file."""
    if key not in mapping or mapping[key] is None:
        if default is not None:
            return default
        raise AttnprobeError(f"{path}: {what} is damaged (no {key!r}); {fix}")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise AttnprobeError(f"{path}: {what} is damaged ({key!r} is {value!r}); {fix}")
    return value
