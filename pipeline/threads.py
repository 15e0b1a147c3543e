"""CPU threads that cope with a busy machine.

OpenMP waiting. At the end of every parallel region torch's OpenMP threads wait for the next one.
libgomp's default spins for about 300,000 iterations (~0.1-1 ms) before sleeping: next to any other
busy process, 2 spinning threads on 2 cores run several times slower. Never spinning
(``OMP_WAIT_POLICY=PASSIVE``) copes with load but costs a futex wake-up (~50 us) per parallel op,
which is most of the time of one-token decoding (many small ops back to back: a paper-preset
denoising pass took 7.7 ms passive vs 4.3 ms spinning, idle, 2 threads). Entry points therefore call
:func:`omp_wait_defaults` before torch is imported: ``short`` spins for ``GOMP_SPINCOUNT=10000``
iterations (tens of microseconds: long enough to catch the next op of a pass, short enough that a
descheduled sibling costs little), then sleeps (4.5 ms for the same pass). An OpenMP wait variable
the user exported wins. ``train/bench_threads.py`` measures the modes idle and under load.

``threads: auto`` picks the number of cores this process may actually run on (CPU affinity and the
cgroup CPU quota, as containers set them) minus the cores other processes keep busy when the run
starts (runnable tasks in ``/proc/loadavg``, sampled a few times): a thread that must share its core
with a busy process stalls every parallel region of the others, so beside one busy process on 2
cores one thread is faster than two.
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


def _is_auto(spec) -> bool:
    return isinstance(spec, str) and spec.strip().lower() == "auto"


def _exported_threads() -> int | None:
    """A positive ``OMP_NUM_THREADS`` the user exported, else None."""
    exported = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(exported) if exported.isdigit() and int(exported) >= 1 else None


def resolve_threads(spec) -> int:
    """``"auto"`` -> an exported ``OMP_NUM_THREADS``, else :func:`available_cores` minus :func:`busy_cores`
    (at least 1); otherwise a positive integer (error naming the value)."""
    if _is_auto(spec):
        return _exported_threads() or max(1, available_cores() - busy_cores())
    if isinstance(spec, int) and not isinstance(spec, bool):
        n = spec
    elif isinstance(spec, str) and spec.strip().isdigit():
        n = int(spec)
    else:
        raise ValueError(f"threads={spec!r} must be 'auto' or a positive integer")
    if n < 1:
        raise ValueError(f"threads={spec!r} must be 'auto' or a positive integer")
    return n


def load_note(spec, n: int) -> str | None:
    """What a training run should say when ``threads: auto`` gave it ``n`` threads, fewer than the cores it may use,
    because other processes were busy: the thread count changes a run's numbers in their last bits (reductions split
    differently), and an RL run started from another supervised checkpoint's last bits is another draw. None when
    ``spec`` is a number, an exported ``OMP_NUM_THREADS`` decided, or every core was used."""
    if not _is_auto(spec) or _exported_threads() is not None:
        return None
    cores = available_cores()
    if n >= cores:
        return None
    return (f"[threads] auto: {n} of {cores} cores ({cores - n} busy with other processes when the run started). Its numbers differ in "
            f"their last bits from a run with {cores} threads on an idle machine. To repeat a run bit for bit, give it "
            f"its thread count: threads=N, or OMP_NUM_THREADS=N exported for a pipeline and the stages it starts "
            f"(recorded in run.json)")


def configure_threads(spec, announce: bool = False) -> int:
    """Set torch's intra-op threads from ``spec`` (``auto`` or N); returns the number used. ``announce``: print
    :func:`load_note` when the load took cores away (training entry points, whose checkpoints others build on)."""
    import torch

    n = resolve_threads(spec)
    torch.set_num_threads(n)
    if announce and (note := load_note(spec, n)):
        print(note, flush=True)
    return n


# OpenMP wait modes (module docstring): environment set before torch (and its libgomp) loads
OMP_WAIT_MODES: dict[str, dict[str, str]] = {
    "short": {"GOMP_SPINCOUNT": "10000"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
}
OMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def omp_wait_env(mode: str) -> dict[str, str]:
    """The environment variables of an OpenMP wait ``mode`` (short | passive | active)."""
    if mode not in OMP_WAIT_MODES:
        raise ValueError(f"OpenMP wait mode {mode!r}; valid: {', '.join(OMP_WAIT_MODES)}")
    return dict(OMP_WAIT_MODES[mode])


def omp_wait_defaults(mode: str = "short", environ=None) -> dict[str, str]:
    """The variables of OpenMP wait ``mode`` to add to ``environ`` (default ``os.environ``): none when
    the user exported one of :data:`OMP_WAIT_VARS`. Entry points, before torch is imported::

        os.environ.update(omp_wait_defaults())
    """
    env = os.environ if environ is None else environ
    wanted = omp_wait_env(mode)
    return {} if any(k in env for k in OMP_WAIT_VARS) else wanted


def describe_omp_wait(environ=None) -> str:
    """The OpenMP wait variables set in ``environ`` (default ``os.environ``), or ``(unset)``."""
    env = os.environ if environ is None else environ
    return " ".join(f"{k}={env[k]}" for k in OMP_WAIT_VARS if k in env) or "(unset)"
