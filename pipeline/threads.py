"""CPU threads that cope with a busy machine.

Torch's OpenMP threads spin-wait by default: next to any other busy process, 2 spinning threads on
2 cores run several times slower. Entry points therefore set ``OMP_WAIT_POLICY=PASSIVE`` before
torch is imported (a value the user exported wins), and ``threads: auto`` picks the number of cores
this process may actually run on (CPU affinity and the cgroup CPU quota, as containers set them)
minus the cores other processes keep busy when the run starts (runnable tasks in ``/proc/loadavg``,
sampled a few times): a thread that must share its core with a busy process stalls every parallel
region of the others, so beside one busy process on 2 cores one thread is faster than two.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota if one is set."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def busy_cores(samples: int = 5, interval: float = 0.02) -> int:
    """Cores other processes keep busy now: the median over ``samples`` readings of the runnable tasks
    in ``/proc/loadavg``, minus this process (0 where the file does not exist)."""
    import statistics
    import time

    counts = []
    for i in range(samples):
        try:
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return 0
        if i + 1 < samples:
            time.sleep(interval)
    return max(0, int(statistics.median(counts)) - 1)


def resolve_threads(spec) -> int:
    """``"auto"`` -> an exported ``OMP_NUM_THREADS``, else :func:`available_cores` minus :func:`busy_cores`
    (at least 1); otherwise a positive integer (error naming the value)."""
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        exported = os.environ.get("OMP_NUM_THREADS", "").strip()
        if exported.isdigit() and int(exported) >= 1:
            return int(exported)
        return max(1, available_cores() - busy_cores())
    if isinstance(spec, int) and not isinstance(spec, bool):
        n = spec
    elif isinstance(spec, str) and spec.strip().isdigit():
        n = int(spec)
    else:
        raise ValueError(f"threads={spec!r} must be 'auto' or a positive integer")
    if n < 1:
        raise ValueError(f"threads={spec!r} must be 'auto' or a positive integer")
    return n


def configure_threads(spec) -> int:
    """Set torch's intra-op threads from ``spec`` (``auto`` or N); returns the number used."""
    import torch

    n = resolve_threads(spec)
    torch.set_num_threads(n)
    return n
