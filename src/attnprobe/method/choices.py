"""The named choices of the method, defined once: the settings offer them as flag choices, the functions
that implement them check against them. Plain tuples, no imports: `attnprobe --help` reads them."""

STRATEGIES = ("attnprobe-rank", "attnprobe", "dfnd", "probe", "random")  # method/selection.py
NORMALIZATIONS = ("none", "rank", "zscore")  # method/selection.py
HEAD_REDUCTIONS = ("first", "mean")  # method/probe.py
PROBE_VARIANTS = ("cosine", "reference")  # method/probe.py: cls_patch_similarity
RESIZE_MODES = ("crop", "stretch")  # io/images.py: the geometry before augmentation
SCHEDULES = ("cosine", "step")  # training/loop.py: lr_schedule
