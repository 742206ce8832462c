"""Export a checkpoint for use without attnprobe: a timm or transformers folder, or one ONNX file.

A transformers folder holds a CLS-token ViT as transformers' own ViT/DeiT (io/convert.py); any other student (a
CNN, a ViT without a CLS token) is written as a timm folder, which transformers loads through its timm wrapper
(TimmWrapperForImageClassification: config.json's `pretrained_cfg` marks it, and also feeds the image processor).

The export is written to a hidden sibling of `out` (io.atomic), loaded back with its own library and compared with the
checkpoint's model, and only then renamed onto `out`: a failed or interrupted export leaves nothing behind.
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch

from ..errors import AttnprobeError
from ..io.atomic import remove_stale, replacing, replacing_dir
from ..io.checkpoints import load_checkpoint
from ..io.lock import hold
from ..models import fixed_input_size, geometry, input_shape, is_cls_vit
from ..settings import ExportSettings

# Beyond attnprobe's own dependencies (timm brings huggingface_hub and safetensors). The TorchScript ONNX
# exporter needs `onnx` but not `onnxscript`; onnxruntime runs the check.
_NEEDS = {"timm": (), "transformers": ("transformers",), "onnx": ("onnx", "onnxruntime")}
TOLERANCE = 1e-4
TIMM_EPS = 1e-6  # timm ViTs' LayerNorm eps; a timm config has no plain-value argument for another
# pretrained_cfg entries that describe the ImageNet weights published under the architecture's name, not ours
_SOURCE_KEYS = ("tag", "license", "hf_hub_id", "url", "origin_url", "paper_ids", "paper_name", "notes")


def export(*, checkpoint, out, settings: ExportSettings) -> dict:
    """Write `checkpoint` as a timm folder, a transformers folder or an ONNX file at `out` (a new path).

    With `settings.check`, the export is loaded back with its own library and its logits compared with the
    checkpoint's model on a seeded random input (AttnprobeError above 1e-4). Returns format, out,
    max_abs_diff (None without check) and the files written."""
    format = settings.format
    missing = [name for name in _NEEDS[format] if importlib.util.find_spec(name) is None]
    if missing:
        raise AttnprobeError(f"export --format {format} needs {' and '.join(missing)}: "
                             f"pip install 'attnprobe[{format}]'")
    out = Path(out)
    # one export to `out` at a time: a second one would clear the first's folder in the making (remove_stale)
    lock = hold(out.with_name(f".{out.name}.lock"), f"export to {out}",
                "wait for it to finish, or pass another --out")
    try:
        return _export(checkpoint, out, format, settings)
    finally:
        lock.release(remove=True)


def _export(checkpoint, out: Path, format: str, settings: ExportSettings) -> dict:
    if out.exists() or out.is_symlink():
        raise AttnprobeError(f"{out} exists; pass a new path or remove it")
    model, info = load_checkpoint(checkpoint)
    model = model.float()
    if _timm_folder(format, model) and info.get("layer_norm_eps") not in (None, TIMM_EPS):
        other = "transformers or onnx" if format == "timm" and is_cls_vit(model) else "onnx"
        raise AttnprobeError(f"{checkpoint} uses LayerNorm eps {info['layer_norm_eps']:g}, which a timm config "
                             f"cannot express; export --format {other} instead")
    if format == "transformers" and _timm_folder(format, model) and not _has_timm_wrapper():
        raise AttnprobeError(f"export --format transformers writes a {info['arch']} for transformers' timm wrapper, "
                             "which this transformers lacks: pip install -U 'transformers>=4.48'")
    remove_stale(out)  # leftovers of a killed export
    # written beside `out`, checked there, and only then renamed onto it: a failed check leaves nothing
    with (replacing(out) if format == "onnx" else replacing_dir(out)) as tmp:
        _WRITERS[format](model, info, tmp)
        if tmp.is_dir():
            (tmp / "README.md").write_text(_model_card(model, info, format, out.name))
        diff = _CHECKERS[format](model, info, tmp) if settings.check else None
        if diff is not None and not diff <= TOLERANCE:  # NaN fails too
            raise AttnprobeError(f"the {format} export's logits differ from the checkpoint's by {diff:.2e} "
                                 f"(> {TOLERANCE:g}); this is a bug, please report it with the checkpoint")
    files = sorted(str(p) for p in out.iterdir()) if out.is_dir() else [str(out)]
    return {"format": format, "out": str(out), "max_abs_diff": diff, "files": files}


def _timm_folder(format: str, model) -> bool:
    """Whether the export is a timm folder: --format timm, or transformers for a model without a CLS token (which
    transformers' ViT cannot hold: its timm wrapper loads the timm folder instead)."""
    return format == "timm" or format == "transformers" and not is_cls_vit(model)


def _has_timm_wrapper() -> bool:
    return importlib.util.find_spec("transformers.models.timm_wrapper") is not None


def _data_config(info) -> dict:
    # attnprobe evaluates with Resize(shorter side, bilinear) + CenterCrop: timm's eval transform at crop_pct 1
    return {"input_size": input_shape(info), "mean": tuple(info["mean"]), "std": tuple(info["std"]),
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def _write_timm(model, info, path: Path) -> None:
    from timm.models import save_for_hf
    data = _data_config(info)
    save_for_hf(model, path, model_config={"label_names": list(info["classes"]), "pretrained_cfg": dict(data)},
                data_config=data, safe_serialization=True)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    # transformers' TimmWrapper passes num_classes itself, and timm 1.0.x's model_args.num_classes makes it fail
    # ("got multiple values for keyword argument 'num_classes'"); timm reads the top-level num_classes anyway.
    config.get("model_args", {}).pop("num_classes", None)
    for key in _SOURCE_KEYS:
        config["pretrained_cfg"].pop(key, None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _write_transformers(model, info, path: Path) -> None:
    if _timm_folder("transformers", model):
        _write_timm(model, info, path)  # transformers wraps it as TimmWrapperForImageClassification
        return
    from safetensors.torch import save_file

    from ..io.convert import timm_to_transformers
    config, state = timm_to_transformers(model, info)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors", metadata={"format": "pt"})
    _, h, w = input_shape(info)
    # Resize straight to the input size: transformers 4 and 5 ViT processors both read this; for square
    # images it equals attnprobe's shorter-side resize + centre crop.
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
                 "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(info["mean"]), "image_std": list(info["std"])}
    (path / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def _write_onnx(model, info, path: Path) -> None:
    import onnx
    # The TorchScript exporter (deprecated but present in torch 2.14) needs no onnxscript and exports timm's
    # fused attention as is; its deprecation and tracer warnings (timm's constant shape asserts) are noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *input_shape(info)),), str(path), input_names=["pixel_values"],
                          output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    # An .onnx file travels alone: let it carry what a user needs to feed it and read its output.
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"classes": json.dumps(info["classes"]), "mean": json.dumps(info["mean"]),
                                        "std": json.dumps(info["std"]), "arch": info["arch"]})
    onnx.save(proto, str(path))


_USAGE = {
    "timm": 'import timm\nmodel = timm.create_model("local-dir:{0}", pretrained=True).eval()  # or "hf-hub:<repo>"',
    "transformers": ("from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline\n"
                     'processor = AutoImageProcessor.from_pretrained("{0}")\n'
                     'model = AutoModelForImageClassification.from_pretrained("{0}").eval()\n'
                     'classify = pipeline("image-classification", model="{0}")  # processor and model in one'),
}
# a timm folder in transformers: what it is loaded as, and that timm reads it too
_WRAPPED = ("\n# a timm model, which transformers wraps as TimmWrapperForImageClassification (needs timm);\n"
            '# timm loads the same folder: timm.create_model("local-dir:{0}", pretrained=True)')


def _model_card(model, info, format: str, name: str) -> str:
    c, h, w = input_shape(info)
    acc = lambda a: "not measured" if a is None else f"{100 * a:.2f}%"  # noqa: E731
    wrapped = format == "transformers" and _timm_folder(format, model)
    lines = ["---", f"library_name: {format}", "pipeline_tag: image-classification", "tags:",
             "- image-classification", "- attnprobe", *(["- timm"] if wrapped else []), "---", "",
             f"# {info['arch']} {info.get('role', 'model')} (attnprobe)", "",
             (f"- architecture: `{info['arch']}` ({_network(model)}) with "
              f"`{json.dumps(info['model_kwargs'], default=str)}`, {info['params']:,} parameters"),
             f"- top-1 accuracy: {acc(info.get('accuracy'))}"]
    if info.get("teacher"):
        lines.append(f"- distilled by attnprobe from the teacher `{os.path.basename(info['teacher'])}` "
                     f"(top-1 accuracy {acc(info.get('teacher_accuracy'))})")
        lines += _probe_lines(info.get("probe"))
    if info.get("selection"):
        lines.append(f"- training images: the selection `{os.path.basename(info['selection'])}`")
    # a CNN takes other sizes too, but was trained (and is checked) at this one
    other_sizes = "" if fixed_input_size(info["arch"]) else " (trained at this size; the network runs on others too)"
    resize = f"resize the shorter side to {h} (bilinear), centre-crop" if h == w else f"resize to {h} x {w} (bilinear)"
    usage = _USAGE[format].format(name) + (_WRAPPED.format(name) if wrapped else "")
    norm = f"scale to [0, 1], normalise with mean {info['mean']} and std {info['std']}"
    lines += [f"- classes ({len(info['classes'])}): {', '.join(info['classes'])}",
              f"- input: {c} x {h} x {w}{other_sizes}; {resize}, {norm}", "", "## Usage", "", "```python", usage, "```",
              ""]
    return "\n".join(lines)


def _network(model) -> str:
    """What kind of network the card describes: the timm class, and a ViT's token grid."""
    if is_cls_vit(model):
        rows, cols = geometry(model)["grid_size"]
        return f"timm `{type(model).__name__}`, CLS token, {rows} x {cols} patch grid"
    return f"timm `{type(model).__name__}`, no CLS token"


def _probe_lines(probe: dict | None) -> list[str]:
    """The probe term a student was distilled with (checkpoints record the plan), in one line."""
    if not probe or not probe.get("teacher_blocks"):
        return []
    layers = ", ".join(map(str, probe["student_layers"]))
    grids = ", ".join(f"{r}x{c}" for r, c in probe["student_grids"])
    no_cls = probe["kind"] == "no-cls"
    what = ("pooled-feature cosine maps of the student's stages" if no_cls
            else "CLS-to-patch cosine maps of the student's blocks")
    blocks = ", ".join(map(str, probe["teacher_blocks"]))
    line = (f"- probe term (weight {probe['weight']:g}): the teacher's CLS-to-patch cosine maps at blocks {blocks} "
            f"against the {what} {layers} ({grids}), compared on the coarser grid")
    return [line]


def _logits_diff(model, info, run, batch_sizes=(2,)) -> float:
    gen = torch.Generator().manual_seed(0)
    diff = 0.0
    with torch.no_grad():
        for b in batch_sizes:
            x = torch.randn(b, *input_shape(info), generator=gen)
            diff = max(diff, (torch.as_tensor(run(x)) - model(x)).abs().max().item())
    return diff


def _check_timm(model, info, path: Path) -> float:
    import timm
    loaded = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    return _logits_diff(model, info, loaded)


def _check_transformers(model, info, path: Path) -> float:
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one line of result, not a loading bar, from `attnprobe export`
    loaded = AutoModelForImageClassification.from_pretrained(path).eval()
    return _logits_diff(model, info, lambda x: loaded(pixel_values=x).logits)


def _check_onnx(model, info, path: Path) -> float:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _logits_diff(model, info, lambda x: session.run(["logits"], {"pixel_values": x.numpy()})[0], (1, 3))


_WRITERS = {"timm": _write_timm, "transformers": _write_transformers, "onnx": _write_onnx}
_CHECKERS = {"timm": _check_timm, "transformers": _check_transformers, "onnx": _check_onnx}
