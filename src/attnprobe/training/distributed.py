"""Data-parallel helpers for runs launched with torchrun (one process per GPU, or per CPU slot).

Nothing happens at import. `init_distributed` reads the torchrun environment (RANK, WORLD_SIZE,
LOCAL_RANK) and joins the process group only when WORLD_SIZE > 1: NCCL on GPUs, Gloo on the CPU.
Every other helper is a no-op (or the single-process answer) outside a process group, so the
training code has one path for one process and for many.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .threads import use_fair_threads


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str | torch.device | None = None, timeout: timedelta | None = None) -> torch.device:
    """Join the torchrun process group if there is one; return the device this process should use.

    `device`: None (a GPU when there is one, else the CPU), "cpu", "cuda" or "cuda:N". Under torchrun
    with GPUs each process takes the GPU of its LOCAL_RANK (an explicit index is overridden)."""
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    want = torch.device(device) if device is not None else None
    use_cuda = (want.type == "cuda") if want is not None else torch.cuda.is_available()
    if use_cuda and world > 1:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    elif use_cuda:
        dev = want if want is not None and want.index is not None else torch.device("cuda")
    else:
        dev = want if want is not None else torch.device("cpu")
    if world > 1 and not is_distributed():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        dist.init_process_group(backend=backend, rank=_env_int("RANK", 0), world_size=world, **kwargs)
        _default_sigterm()  # joined: from here on torchrun's SIGTERM stops a running job (see app/commands.py)
    if world > 1:  # N processes on this machine: each its share of the cores, not torchrun's 1 or all of them
        use_fair_threads(dev)
    return dev


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returns it (unchanged in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process ([obj] in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Leave the process group (if this process is in one)."""
    if is_distributed():
        dist.destroy_process_group()


def _default_sigterm() -> None:
    import signal
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: the handler was never set there
        pass
