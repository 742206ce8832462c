"""How many torch threads a training process uses: its fair share of the cores.

torch's intra-op threads spin while they wait for each other, so a process with more threads than it gets
cores runs several times slower than with fewer (issue 20: a small teacher's epoch took 5 to 6 times as long
beside two 2-thread torch processes on 2 cores, 3 times beside two busy pure-Python ones). So:

- attnprobe's own parallel jobs never oversubscribe: each of `jobs` processes on this machine (the demo's
  `--jobs`, torchrun's LOCAL_WORLD_SIZE) gets cores // jobs threads;
- other processes' load counts: the threads are at most the cores free from the others' load, at least 1. The
  load is the larger of the 1-minute load average (less this process's own part of it), which remembers
  intermittent work, and the threads runnable now (/proc/loadavg, a few samples), which sees work that
  started seconds ago;
- the user's choice wins: OMP_NUM_THREADS or MKL_NUM_THREADS in the environment (but for torchrun's own
  OMP_NUM_THREADS=1, which it sets for several local processes when the user did not), or torch.set_num_threads
  called with a count other than torch's default.

`fair_threads()` computes the choice; `use_fair_threads()` applies it where training starts (training/loop.fit)
and where torchrun processes join (distributed.init_distributed); the demo gives each job its share (share_cores).
"""
from __future__ import annotations

import math
import os
import time

_STATE = {"share": None, "ours": None}


def cores() -> int:
    """The cores this process may run on: its CPU affinity, and a cgroup's CPU quota (a container's
    --cpus) where one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def local_jobs() -> int:
    """attnprobe's processes on this machine sharing its cores: torchrun's LOCAL_WORLD_SIZE (1 without it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        return 1


def share_cores(threads: int | None) -> None:
    """This process is one of several attnprobe jobs run at once on this machine (the demo's --jobs): its share
    is `threads` (the demo's cores // jobs), the most it takes. None: forget it."""
    _STATE["share"] = threads


def own_load() -> float:
    """This process's part of the load average: its CPU seconds (and its finished children's: DataLoader
    workers) per second since it started, as much as the 1-minute average has seen of it (a process started
    seconds ago is in it barely); Linux, 0 where that is not known. A long-lived process (a notebook that
    trained before, `attnprobe run` after scoring) must not count itself as others' load."""
    try:
        stat = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = sum(int(v) for v in stat[11:15]) / ticks  # utime, stime, cutime, cstime
        uptime = float(open("/proc/uptime").read().split()[0])
        age = uptime - int(stat[19]) / ticks  # starttime
        return cpu / age * (1 - math.exp(-age / 60)) if age > 0 else 0.0
    except (OSError, ValueError, IndexError):
        return 0.0


def running_now(samples: int = 5, interval: float = 0.01) -> float:
    """Other threads runnable on this machine now (the median of a few samples of /proc/loadavg, less this
    thread); 0 where that is not known."""
    counts = []
    for k in range(samples):
        try:
            counts.append(int(open("/proc/loadavg").read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0.0
        if k + 1 < samples:
            time.sleep(interval)
    return float(sorted(counts)[len(counts) // 2])


def fair_threads(*, n_cores: int | None = None, jobs: int | None = None, share: int | None = None,
                 load: float | None = None, own: float | None = None, running: float | None = None
                 ) -> tuple[int, str]:
    """(threads, why): cores // jobs (at most `share`, see share_cores), but at most the cores free from the
    others' 1-minute load, at least 1. Each argument defaults to this machine's and this process's."""
    n_cores = cores() if n_cores is None else n_cores
    jobs = max(1, jobs or local_jobs())
    share = share if share is not None else _STATE["share"]
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    own = own_load() if own is None else own
    running = running_now() if running is None else running
    share = max(1, min(n_cores // jobs, share or n_cores))
    others = max(0.0, load - own, running)
    free = max(1, math.floor(n_cores - others + 0.5))
    if free < share:
        return free, f"{free} of {n_cores} cores: the others' load is {others:.1f} (share: {share})"
    return share, f"{share} of {n_cores} cores" + (" (a share of parallel jobs)" if share < n_cores else "")


def user_threads() -> int | None:
    """The thread count the user chose (environment or torch.set_num_threads), or None where none was chosen."""
    import torch
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value and not (name == "OMP_NUM_THREADS" and value == "1" and torchrun_set_omp()):
            return torch.get_num_threads()
    now = torch.get_num_threads()
    if now == _STATE["ours"]:
        return None
    defaults = {os.cpu_count() or 1, cores(), _physical_cores()}
    return None if now in defaults else now


def torchrun_set_omp() -> bool:
    """Whether OMP_NUM_THREADS=1 is torchrun's own (it sets it for more than one local process when the user did
    not): under torchrun, and absent from the environment the launcher was started with (/proc/PPID/environ,
    which keeps a process's starting environment). Where that cannot be read: the user's, left alone."""
    if local_jobs() <= 1:
        return False
    try:
        start = open(f"/proc/{os.getppid()}/environ", "rb").read().split(b"\0")
    except OSError:
        return False
    return not any(v.startswith(b"OMP_NUM_THREADS=") for v in start)


def _physical_cores() -> int:
    """torch's default intra-op count: the physical cores (from /proc/cpuinfo; the logical count elsewhere)."""
    try:
        pairs, phys = set(), None
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                phys = value.strip()
            elif key.strip() == "core id":
                pairs.add((phys, value.strip()))
        return len(pairs) or (os.cpu_count() or 1)
    except OSError:
        return os.cpu_count() or 1


def use_fair_threads(device=None, *, keep: int | None = None) -> int:
    """Set torch's intra-op threads to `fair_threads()` (on the CPU; on a GPU nothing is changed) unless the user
    chose a count; returns the count in use. `keep`: the count a resumed run trained with, kept so that it ends
    bit-identical to an uninterrupted run (a CPU reduction's rounding depends on the thread count)."""
    import torch
    if device is not None and torch.device(device).type != "cpu":
        return torch.get_num_threads()
    chosen = user_threads()
    if chosen is not None:
        return chosen
    n = keep if keep else fair_threads()[0]
    torch.set_num_threads(n)
    _STATE["ours"] = n
    return n

