"""attnprobe: distill a vision transformer in the wild with the attention probe (ICASSP 2022)."""
from .api import distill, evaluate, export, import_teacher, prepare, score, select, train_teacher
from .errors import AttnprobeError
from .models import PRESETS, load_checkpoint, save_checkpoint

__version__ = "0.1.0"
__all__ = ["prepare", "import_teacher", "export", "train_teacher", "score", "select", "distill", "evaluate",
           "load_checkpoint", "save_checkpoint", "PRESETS", "AttnprobeError"]
