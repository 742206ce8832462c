"""Which timm architectures work as attnprobe students: for each, at the paper's CIFAR geometry (32 px, teacher
ap_teacher_32) and at ImageNet's (224 px, teacher deit_small_patch16_224), build it as `distill` does, plan its
probe maps, take two distillation steps with KD + noise adaptation + probe loss, and export it to timm,
ONNX and transformers (a CNN through transformers' timm wrapper) with attnprobe's own check (each loaded back
by its own library, logits within 1e-4). Randomly initialised models: this tries the plumbing,
not accuracy. Prints a markdown table (README, "Students for deployment").

    python benchmarks/students_tried.py [--sizes 32 224] [--students resnet18 ...]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

from attnprobe import api
from attnprobe.io.checkpoints import save_checkpoint
from attnprobe.method.losses import NoiseAdaptation
from attnprobe.models import build_model, build_student, describe, resolve_model
from attnprobe.stages.distill import probe_plan
from attnprobe.training.engine import DistillModel, distill_one_epoch
from attnprobe.training.measure import model_cost

STUDENTS = ["resnet18", "mobilenetv3_small_100", "mobilenetv3_large_100", "efficientnet_b0", "convnext_atto",
            "efficientvit_b0", "regnetx_002", "ghostnet_100", "mobilevit_xxs", "deit_tiny_patch16_224",
            "vit_small_patch32_224", "swin_tiny_patch4_window7_224"]
TEACHERS = {32: "ap_teacher_32", 224: "deit_small_patch16_224"}


def try_student(name: str, size: int, teacher, t_info: dict, out: Path) -> dict:
    row = {"student": name, "size": size}
    try:
        net, arch, kwargs = build_student(name, {}, teacher_info=t_info, teacher_model=teacher)
    except Exception as e:  # noqa: BLE001 (a table of what works and what does not)
        return {**row, "result": f"not built: {str(e).splitlines()[0][:90]}"}
    s = SimpleNamespace(probe_weight=0.8, probe_variant="cosine", probe_blocks=None)
    try:
        plan = probe_plan(s, teacher, net, t_info)
    except Exception as e:  # noqa: BLE001
        plan = {"weight": 0.0, "kind": "—", "student_layers": [], "student_grids": [], "teacher_blocks": [],
                "refused": str(e).splitlines()[0][:90]}
    batch = torch.randn(4, 3, size, size)
    model = DistillModel(net, NoiseAdaptation(t_info["num_classes"], 0.9))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    terms = distill_one_epoch(model, teacher, [(batch, None), (batch.flip(3), None)], [opt], "cpu",
                              probe_weight=plan["weight"], teacher_blocks=plan["teacher_blocks"],
                              student_layers=plan["student_layers"], progress=False)
    step_s = (time.perf_counter() - t0) / 2
    info = describe(net, arch, kwargs, t_info["classes"], t_info["mean"], t_info["std"], role="student",
                    input_from=t_info, probe=plan)
    ckpt = out / f"{name}-{size}.pt"
    save_checkpoint(ckpt, net, info)
    exports = []
    for fmt, path in (("timm", out / f"{name}-{size}-timm"), ("onnx", out / f"{name}-{size}.onnx"),
                      ("transformers", out / f"{name}-{size}-hf")):
        try:
            diff = api.export(ckpt, out=path, format=fmt)["max_abs_diff"]
            exports.append(f"{fmt} {diff:.0e}")
        except Exception as e:  # noqa: BLE001
            exports.append(f"{fmt} failed: {str(e).splitlines()[0][:60]}")
    cost = model_cost(net, info, device="cpu", batch_size=8, seconds=0.5)
    maps = ", ".join(f"{layer} {g[0]}x{g[1]}" for layer, g in zip(plan["student_layers"], plan["student_grids"]))
    return {**row, "kind": plan["kind"], "params": cost["params"], "flops": cost["flops"],
            "probe maps": maps or plan.get("refused", "off"), "probe": terms.get("probe"), "step s": step_s,
            "export": "; ".join(exports), "result": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], choices=sorted(TEACHERS))
    parser.add_argument("--students", nargs="+", default=STUDENTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            arch, kwargs = resolve_model(TEACHERS[size])
            teacher = build_model(arch, kwargs, 10).eval()
            classes = [str(c) for c in range(10)]
            t_info = describe(teacher, arch, kwargs, classes, [0.5] * 3, [0.5] * 3, accuracy=0.9)
            for name in args.students:
                try:
                    rows.append(try_student(name, size, teacher, t_info, Path(tmp)))
                except Exception:  # noqa: BLE001
                    rows.append({"student": name, "size": size, "result": traceback.format_exc().splitlines()[-1]})
                print(rows[-1], flush=True)
    keys = ["student", "size", "kind", "params", "flops", "probe maps", "probe", "export", "result"]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{r[k]:,}" if k in ("params", "flops") and k in r else
                 f"{r[k]:.3f}" if k == "probe" and isinstance(r.get(k), float) else str(r.get(k, "—")) for k in keys]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
