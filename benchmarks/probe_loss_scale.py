"""Scale of the probe-distillation loss against the KD loss, at initialisation, with the paper's CIFAR models.

Teacher ap_teacher_32 (384 wide, 12 deep, 3 heads) and student ap_student_32 (128, 12, 2), 10 classes,
built with a seeded torch RNG (teacher first, then student); both in eval mode, no gradients.
One batch of 64 images, 32x32 RGB, normalised with the teacher's default mean/std (timm's for the arch):

- `photos` (default): random square crops (side 64 px .. the photo's shorter side, seeded) of the natural
  photographs that ship with scikit-image (`skimage.data`: astronaut, chelsea, coffee, rocket, ...; the
  gray ones as RGB), each resized to 32x32 with PIL's bilinear filter;
- `noise`: standard Gaussian noise, already in normalised units.

Printed as JSON: the probe-distillation loss (losses.probe_distill_loss over the CLS-to-patch similarity
of probe.cls_patch_similarity at the default distill blocks 3, 7, 11 of both models) with the `cosine`
variant (channel-axis cosine, our default) and the `reference` variant (token-axis normalisation, as
the reference code), and the KD loss at T = 4 between the two models' logits; also each probe loss times
the default weight 0.8 and its ratio to KD.

    python benchmarks/probe_loss_scale.py [--images photos|noise] [--seed 0] [--batch-size 64] [--seeds 1]
"""
from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from PIL import Image

from attnprobe.method.losses import kd_loss, probe_distill_loss
from attnprobe.method.probe import default_distill_blocks
from attnprobe.method.probe_maps import ProbeTaps
from attnprobe.models import build_model, default_norm, resolve_model

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "camera", "moon", "coins", "clock", "grass", "gravel", "brick")
PROBE_WEIGHT, TEMPERATURE, NUM_CLASSES = 0.8, 4.0, 10


def photo_batch(n: int, size: int, mean, std, rng: np.random.Generator) -> torch.Tensor:
    """n random square crops of skimage's photographs, resized to size x size, normalised."""
    import skimage.data
    photos = []
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        photos.append(Image.fromarray(a).convert("RGB"))
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        side = int(rng.integers(64, min(w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def measure(seed: int, images: str, batch_size: int) -> dict:
    torch.manual_seed(seed)
    t_arch, t_kwargs = resolve_model("ap_teacher_32")
    s_arch, s_kwargs = resolve_model("ap_student_32")
    teacher = build_model(t_arch, t_kwargs, NUM_CLASSES).eval()
    student = build_model(s_arch, s_kwargs, NUM_CLASSES).eval()
    mean, std = default_norm(t_arch, 3)
    if images == "photos":
        x = photo_batch(batch_size, 32, mean, std, np.random.default_rng(seed))
    else:
        x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    blocks = default_distill_blocks(12)  # 3, 7, 11 for both (same depth)
    probe = {}
    for v in ("cosine", "reference"):
        with ProbeTaps(teacher, blocks, v) as t_taps, ProbeTaps(student, blocks, v) as s_taps:
            t_logits, s_logits = teacher(x), student(x)
            probe[v] = probe_distill_loss(t_taps.maps(), s_taps.maps()).item()
    kd = kd_loss(s_logits, t_logits, TEMPERATURE).item()
    return {"probe_cosine": probe["cosine"], "probe_reference": probe["reference"], "kd_T4": kd,
            "weighted_probe_cosine": PROBE_WEIGHT * probe["cosine"],
            "weighted_probe_reference": PROBE_WEIGHT * probe["reference"],
            "weighted_cosine_over_kd": PROBE_WEIGHT * probe["cosine"] / kd,
            "weighted_reference_over_kd": PROBE_WEIGHT * probe["reference"] / kd}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", choices=("photos", "noise"), default="photos")
    ap.add_argument("--seed", type=int, default=0, help="models' init and the batch")
    ap.add_argument("--seeds", type=int, default=1, help="repeat over seeds seed..seed+N-1; print mean and spread")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [measure(s, args.images, args.batch_size) for s in range(args.seed, args.seed + args.seeds)]
    result = {"images": args.images, "batch_size": args.batch_size, "seeds": list(range(args.seed, args.seed + args.seeds)),
              "teacher": "ap_teacher_32", "student": "ap_student_32", "num_classes": NUM_CLASSES,
              "blocks": default_distill_blocks(12), "temperature": TEMPERATURE, "probe_weight": PROBE_WEIGHT}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        result[k] = round(vals[0], 5) if len(vals) == 1 else {
            "mean": round(statistics.fmean(vals), 5), "min": round(min(vals), 5), "max": round(max(vals), 5)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
