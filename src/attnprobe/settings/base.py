"""The machinery of settings: a field with its help and check, the checks on construction, and the
command-line flags built from the fields.

A command's settings are one keyword-only dataclass (settings/commands.py): its fields carry the default,
the help text and the check of each value. The command line builds its flags from them (`add_flags`),
the Python API builds the dataclass from keyword arguments (`build`), and `attnprobe run` records them in
config.json (`asdict`). Nothing heavy is imported here: `attnprobe --help` must stay fast.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import numbers
import os
import types
import typing
from dataclasses import MISSING, field, fields

from ..errors import AttnprobeError


def setting(default=MISSING, help: str = "", *, choices=None, check=None, runtime: bool = False,
            metavar: str | None = None, unique: bool = False, shared: bool = False):
    """A dataclass field with its help text, allowed choices, a check `(predicate, 'what it must be')`.
    unique: a list whose values must differ (blocks, strategies). shared: in `attnprobe run` one flag sets
    it for every stage (its help says so there)."""
    meta = {"help": help, "choices": choices, "check": check, "runtime": runtime, "metavar": metavar,
            "unique": unique, "shared": shared}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


class Settings:
    """Shared behaviour: every value checked on construction, one line naming the flag on failure."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            value = _checked_type(f, value, *base_type(hints[f.name]))
            setattr(self, f.name, value)
            values = value if isinstance(value, list) else [value]
            if meta.get("unique") and len(set(values)) < len(values):
                twice = next(v for v in values if values.count(v) > 1)
                raise AttnprobeError(f"{flag_name(f)} {_show(value)}: {twice} is given twice; give each value once")
            if meta.get("choices") and any(v not in meta["choices"] for v in values):
                raise AttnprobeError(f"{flag_name(f)} {_show(value)} is not one of {', '.join(map(str, meta['choices']))}")
            check = meta.get("check")
            if check and not all(check[0](v) for v in values):
                raise AttnprobeError(f"{flag_name(f)} {_show(value)}: must be {check[1]}")

    @classmethod
    def build(cls, settings=None, **overrides):
        """From another instance and/or keyword arguments; an unknown name is an error, not ignored."""
        if settings is not None and not isinstance(settings, cls):
            got = "a dict" if isinstance(settings, dict) else f"a {type(settings).__name__}"
            raise TypeError(f"settings= takes a {cls.__name__} (or None), not {got}; pass "
                            f"settings={cls.__name__}(...) or the values as keyword arguments")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise AttnprobeError(f"{cls.__name__} has no setting {unknown[0]!r}; known: {', '.join(sorted(names))}")
        base = {f.name: getattr(settings, f.name) for f in fields(cls)} if settings is not None else {}
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                   and f.name not in base and f.name not in overrides]
        if missing:
            raise AttnprobeError(f"{cls.__name__} needs {', '.join(missing)}")
        return cls(**{**base, **overrides})

    def asdict(self) -> dict:
        return dataclasses.asdict(self)

    def result_settings(self) -> dict:
        """The settings that change the stage's result (what `run` compares to reuse a stage)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("runtime")}


_PLURAL = {int: "whole numbers", float: "numbers", bool: "True/False values", str: "names"}


def _checked_type(f, value, kind, is_list: bool):
    """`value` (not None) checked against the field's type: whole numbers for int fields, finite numbers for
    float fields (an int is a number too), True/False for flags, text or a path for str fields (a path or a
    torch.device becomes its text), a list (or tuple) of those for list fields, a dict with names as keys for
    model kwargs (their values: checked against the model later)."""
    if kind is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise AttnprobeError(f"{flag_name(f)} {value!r}: expected key=value pairs (a dict with names as keys)")
        return value
    if is_list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise AttnprobeError(f"{flag_name(f)} {value!r}: expected a list of {_PLURAL.get(kind, 'values')}")
    checked = [_checked_value(f, v, kind) for v in (value if is_list else [value])]
    return checked if is_list else checked[0]


def _checked_value(f, v, kind):
    if kind is bool and not isinstance(v, bool):
        raise AttnprobeError(f"{flag_name(f)} {v!r}: expected True or False")
    if kind is int:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise AttnprobeError(f"{flag_name(f)} {v!r}: expected a whole number")
        return int(v)  # a numpy integer becomes a Python one: config.json and the summaries record it
    if kind is float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise AttnprobeError(f"{flag_name(f)} {v!r}: expected a number")
        if not math.isfinite(v):
            raise AttnprobeError(f"{flag_name(f)} {v}: must be a finite number")
        return float(v) if not isinstance(v, numbers.Integral) else int(v)
    if kind is str:
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if type(v).__name__ == "device" and type(v).__module__ == "torch":
            return str(v)
        if not isinstance(v, str):
            raise AttnprobeError(f"{flag_name(f)} {v!r}: expected text (a name or a path), "
                                 f"not a {type(v).__name__}")
    return v


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def flag_name(f) -> str:
    return "--" + f.name.replace("_", "-")


def check_device(name: str) -> bool:
    """A device this machine has: cpu, cuda and cuda:N (N below the GPU count), mps where there is one.
    Refused in one line naming --device and what the machine has. torch is imported only here."""
    import torch
    gpus = torch.cuda.device_count()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    have = ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(gpus)] if gpus else []) + (["mps"] if mps else [])
    kind, _, index = name.partition(":")
    if kind == "cpu" and not index or kind == "mps" and mps and index in ("", "0"):
        return True
    if kind == "cuda" and gpus and (not index or index.isdigit() and int(index) < gpus):
        return True
    raise AttnprobeError(f"--device {name}: this machine has no such device; it has {', '.join(have)}")


def base_type(annotation):
    """(element type, is_list) of `int`, `float | None`, `list[int] | None`, ..."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


SHARED_IN_RUN = " (in run: for every stage)"


def add_flags(parser: argparse.ArgumentParser, cls, *, skip=(), seen: set | None = None, run: bool = False) -> None:
    """One flag per field of `cls` (skipping `skip` and names already in `seen`), with its default and help.
    run: the flags of `attnprobe run`, where a shared setting is meant for every stage."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or (seen is not None and f.name in seen):
            continue
        if seen is not None:
            seen.add(f.name)
        meta, flag = f.metadata, flag_name(f)
        text = meta["help"] + (SHARED_IN_RUN if run and meta.get("shared") else "")
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if required else (f.default if f.default is not MISSING else f.default_factory())
        kind, is_list = base_type(hints[f.name])
        if kind is bool:
            if default:
                parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=f"no {text}")
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=text)
        elif kind is dict:
            parser.add_argument(flag, dest=f.name, nargs="*", default=None, metavar=meta.get("metavar") or "K=V",
                                help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, nargs="+" if is_list else None, default=default,
                                required=required, choices=meta.get("choices"), metavar=meta.get("metavar"),
                                help=text)


def from_args(cls, args: argparse.Namespace, **extra):
    """The settings of `cls` from parsed flags (K=V lists parsed as model kwargs)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if base_type(hints[f.name])[0] is dict:
            from ..models import parse_model_kwargs  # lazy: models imports torch and timm
            value = parse_model_kwargs(value)
        values[f.name] = value
    return cls.build(**{**values, **extra})
