"""evaluate: top-1/top-5 of a checkpoint on a labeled folder of its classes."""
from __future__ import annotations

from ..io.checkpoints import load_checkpoint
from ..io.datasets import labeled_folder
from ..io.folders import class_dir
from ..io.images import eval_transform
from ..training.distributed import init_distributed, is_main
from ..training.engine import evaluate as accuracy
from ..training.loop import eval_loader, pick_device


def evaluate(*, model, data, settings) -> dict:
    """Top-1/top-5 of the checkpoint `model` on `data`, a labeled folder with its classes (or an ImageFolder
    root's val/); `settings`: an EvaluateSettings. Images of another size or colour mode than the model's
    are resized and converted to its geometry. Under torchrun the folder is sharded over the processes and
    the counts summed."""
    device = init_distributed(settings.device)
    net, info = load_checkpoint(model, device)
    return evaluate_model(net, info, data, settings=settings, device=device)


def evaluate_model(net, info: dict, data, *, settings, device=None) -> dict:
    """Top-1/top-5 of a model described by `info` (a checkpoint's) on a labeled folder of its classes (see
    evaluate). `device`: where `net` runs (default: settings.device, or a GPU when there is one)."""
    device = device if device is not None else pick_device(settings.device)
    ds = labeled_folder(class_dir(data, info["classes"], "val"), info["classes"], eval_transform(info),
                        info["in_chans"])
    return accuracy(net.to(device), eval_loader(ds, settings.batch_size, settings.workers), device,
                    settings.progress and is_main())
