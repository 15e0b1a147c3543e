"""Peak-memory measurement of one process for the memory benchmarks (``train/bench_rl.py memory=true``).

On CPU the resident set: its high-water mark is reset through ``/proc/self/clear_refs`` (Linux) and
read from ``/proc/self/status`` (``VmHWM``); on CUDA ``torch.cuda``'s allocator statistics.
"""
from __future__ import annotations

import ctypes

import torch

__all__ = ["release_free_heap", "reset_peak_memory", "peak_memory_mb"]


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so the resident set before a measured
    step is live memory only and the step's rise above it is not hidden by reused free pages."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(cuda: bool) -> float:
    """Reset the peak-memory mark; returns the memory in use now (MB)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # reset the resident-set high-water mark (Linux)
        f.write("5")
    return _proc_kb("VmRSS") / 1024


def peak_memory_mb(cuda: bool) -> float:
    """Peak memory (MB) since the last :func:`reset_peak_memory`."""
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _proc_kb("VmHWM") / 1024
