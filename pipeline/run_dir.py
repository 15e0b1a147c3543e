"""Output folders of training runs: one run per folder, never another run's results overwritten.

``claim_run_dir(out_dir, cfg, stage, resume)`` decides where a run writes, then locks it:

* ``resume=true`` continues in ``out_dir`` itself (the resume state checks the config);
* a new run uses ``out_dir`` when it is empty, absent, or holds a run of this stage with the same
  settings (``run.json``; a rerun of the same run replaces it and starts fresh logs);
* when ``out_dir`` holds a run with other settings, the run goes to the first free sibling
  ``out_dir-2``, ``out_dir-3``, ... (or one holding the same settings) and says so in the log;
* the folder is locked (``fcntl.flock`` on ``.lock``) for the run's lifetime: a second run on a busy
  folder is refused, and the kernel releases the lock of a killed run, so nothing stays stuck.

Settings that do not change results (``IGNORED``: paths of the run itself, device, threads,
logging cadence, the distributed timeout ``dist``) do not make runs different. A run of several
processes records its ``world_size`` among its settings (pipeline/distributed.py ``run_config``).

``run.json`` also records where the run started (:func:`host_info`: CPU model, the SIMD level
torch's CPU kernels use, the torch threads it computes with, torch version, GPU), beside its
settings, not among them. Floating-point sums depend on both: the same settings with another thread
count (``threads=auto`` leaves out busy cores, so it follows the machine's load) or another CPU give
other weights, and a long RL run carries a last-bit difference of its supervised start into another
draw (docs/benchmarks.md, "bench_v14 re-run from another supervised checkpoint"); a benchmark names
the hosts of the runs it compares (:func:`host_label`).
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..agents.checkpoint import atomic_write_json

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
RUN_FORMAT = "gdpo-listener-run"
IGNORED = ("out_dir", "resume", "device", "threads", "log_every", "ckpt_every", "logger", "progress", "dist")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def host_info(device: str = "cpu") -> dict:
    """Where a run computes: ``{"cpu", "cpu_capability" (torch's CPU kernel level: AVX2, AVX512, ...), "threads"
    (torch's intra-op threads, as configured when the run claims its folder), "torch", "gpu" (name, or None on the CPU)}``."""
    gpu = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {"cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": gpu}


def host_label(host: dict | None) -> str:
    """One line for a :func:`host_info` record (``"unrecorded"`` for a run written before runs recorded it)."""
    if not host:
        return "unrecorded"
    where = host.get("gpu") or f"{host.get('cpu', '?')} ({host.get('cpu_capability', '?')})"
    threads = f", {host['threads']} thread{'s' if host['threads'] != 1 else ''}" if host.get("threads") else ""
    return f"{where}{threads}, torch {host.get('torch', '?')}"


class RunDirError(RuntimeError):
    """The output folder cannot be used by this run."""


def run_settings(cfg: DictConfig) -> dict:
    """The resolved config minus the settings that do not change a run's results."""
    d = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in d.items() if k not in IGNORED}


def _read_run(folder: Path) -> dict | None:
    try:
        doc = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == RUN_FORMAT else None


def run_host(folder: Path) -> dict | None:
    """The host a run folder's ``run.json`` recorded, or None."""
    run = _read_run(Path(folder))
    return None if run is None else run.get("host")


def _differs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys where two nested settings dicts differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differs(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out


class RunLock:
    """An exclusive advisory lock on ``folder/.lock``, held until :meth:`release` or process exit."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise RunDirError(f"{folder} is in use by another run (pid {holder}); wait for it to finish or choose "
                              f"another out_dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _usable(folder: Path, stage: str, settings: dict) -> tuple[bool, list[str]]:
    """Can a new run with ``settings`` write into ``folder``? Returns (usable, differing keys)."""
    if not folder.exists() or not any(p.name != LOCK_FILE for p in folder.iterdir()):
        return True, []
    run = _read_run(folder)
    if run is None:  # not a run of this project (or written before run.json existed)
        return False, ["(no run.json: not a run folder of this project)"]
    if run.get("stage") != stage:
        return False, [f"stage {run.get('stage')!r}"]
    diff = _differs(run.get("settings") or {}, settings)
    return not diff, diff


def claim_run_dir(out_dir: Path, cfg: DictConfig, stage: str, resume: bool = False,
                  log_subdir: str = "logs") -> tuple[Path, RunLock]:
    """The folder this run writes to (see the module docstring), locked; ``run.json`` written."""
    out_dir = Path(out_dir)
    settings = run_settings(cfg)
    if resume:
        lock = RunLock(out_dir)
        return out_dir, lock
    folder, why = out_dir, []
    for i in range(1, 1000):
        folder = out_dir if i == 1 else out_dir.with_name(f"{out_dir.name}-{i}")
        ok, diff = _usable(folder, stage, settings)
        if ok:
            break
        why = why or diff
    else:
        raise RunDirError(f"no free run folder next to {out_dir}")
    lock = RunLock(folder)
    if folder != out_dir:
        print(f"[{stage}] {out_dir} holds another run (differs in: {', '.join(why[:6])}); this run writes to {folder}", flush=True)
    old_logs = folder / log_subdir
    if old_logs.is_dir() and _read_run(folder) is not None:
        shutil.rmtree(old_logs)  # a rerun of the same run in its own folder starts fresh logs
    atomic_write_json(folder / RUN_FILE, {"format": RUN_FORMAT, "stage": stage, "settings": settings,
                                          "host": host_info(str(cfg.get("device", "cpu")))})
    return folder, lock


def truncate_logs(log_root: Path, step: int) -> None:
    """Drop CSV log rows after ``step`` (a resumed run logs those steps again)."""
    for path in Path(log_root).rglob("*.csv"):
        lines = path.read_text().splitlines(keepends=True)
        keep = [ln for ln in lines if not ln.strip() or float(ln.split(",", 1)[0]) <= step]
        if len(keep) != len(lines):
            path.write_text("".join(keep))
