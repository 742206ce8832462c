"""attnprobe: distill a vision transformer in the wild with the attention probe (ICASSP 2022)."""
from .api import (
                  dafl,
                  distill,
                  evaluate,
                  export,
                  import_teacher,
                  prepare,
                  reshard,
                  score,
                  select,
                  train_teacher,
)
from .errors import AttnprobeError
from .io.checkpoints import load_checkpoint, save_checkpoint
from .models import PRESETS

__version__ = "0.2.0"
__all__ = ["prepare", "import_teacher", "export", "train_teacher", "score", "select", "distill", "dafl", "evaluate",
           "reshard", "load_checkpoint", "save_checkpoint", "PRESETS", "AttnprobeError"]
