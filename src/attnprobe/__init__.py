"""attnprobe: distill a vision transformer in the wild with the attention probe (ICASSP 2022).

The public names are imported on first use (PEP 562), so that `attnprobe --help` and `import attnprobe`
do not load torch: `from attnprobe import distill` and `attnprobe.distill` work as usual.
"""
import importlib

__version__ = "0.2.0"
# public name -> the module (below this package) that defines it
_WHERE = {**{name: "api" for name in ("prepare", "import_teacher", "export", "train_teacher", "score", "select",
                                       "distill", "dafl", "evaluate", "reshard")},
          "load_checkpoint": "io.checkpoints", "save_checkpoint": "io.checkpoints", "PRESETS": "models",
          "AttnprobeError": "errors"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'attnprobe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted([*globals(), *__all__])
