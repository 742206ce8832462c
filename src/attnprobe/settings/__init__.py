"""Each command's settings, defined once (settings/commands.py) with the machinery that turns them into
flags, API keywords and checks (settings/base.py). Imports nothing heavy: `attnprobe --help` stays fast."""
from .base import Settings, add_flags, base_type, check_device, flag_name, from_args, setting
from .commands import (DaflSettings, DemoSettings, DistillSettings, EvaluateSettings, ExportSettings, ImportSettings,
    PrepareSettings, ReshardSettings, RunSettings, ScoreSettings, SelectSettings, TeacherSettings)

__all__ = ["Settings", "setting", "add_flags", "from_args", "flag_name", "base_type", "check_device",
           "ScoreSettings", "SelectSettings", "TeacherSettings", "DistillSettings", "DaflSettings", "RunSettings",
           "ReshardSettings", "EvaluateSettings", "ExportSettings", "ImportSettings", "PrepareSettings",
           "DemoSettings"]
