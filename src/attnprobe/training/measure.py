"""What a model costs: parameters, FLOPs per image and measured throughput (student against teacher)."""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models import input_shape


def _input(info: dict, batch: int, device) -> torch.Tensor:
    return torch.randn(batch, *input_shape(info), device=device)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(model: nn.Module, info: dict, device="cpu") -> int:
    """FLOPs (2 x multiply-accumulates, as FlopCounterMode counts) of one forward pass of one image.

    timm's fused attention (scaled_dot_product_attention) is switched off while counting: the counter
    has no formula for its CPU kernel and would leave the attention matmuls out; the unfused path does
    the same arithmetic with plain matmuls, which it counts. Norms, softmax and activations are not counted."""
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in fused:
            m.fused_attn = False
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(_input(info, 1, device))
    finally:
        for m, was in fused:
            m.fused_attn = was
    return int(counter.get_total_flops())


def model_cost(model: nn.Module, info: dict, *, device="cpu", batch_size: int = 32, seconds: float = 1.0) -> dict:
    """{"params", "flops" (per image, forward), "images_per_s", and how the throughput was measured: "device",
    "batch_size", "threads" (CPU threads; None on an accelerator)} of a model whose input geometry `info` gives
    (img_size, in_chans: a checkpoint's info). Throughput: forward passes of a random batch of `batch_size`
    in eval mode without gradients, after one warm-up pass, repeated for about `seconds` (at least once).
    On a CPU shared with other busy processes it can read far too low (threads wait for cores).
    The model is moved to `device`; its train/eval mode is restored afterwards."""
    model = model.to(device)
    was_training = model.training
    model.eval()
    try:
        params = sum(p.numel() for p in model.parameters())
        flops = count_flops(model, info, device)
        x = _input(info, batch_size, device)
        with torch.no_grad():
            model(x)  # warm-up: allocations, kernel selection
            _sync(device)
            passes, t0 = 0, time.perf_counter()
            while True:
                model(x)
                _sync(device)
                passes += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds:
                    break
    finally:
        model.train(was_training)
    device = torch.device(device)
    return {"params": int(params), "flops": flops, "images_per_s": passes * batch_size / elapsed,
            "device": str(device), "batch_size": batch_size,
            "threads": torch.get_num_threads() if device.type == "cpu" else None}
