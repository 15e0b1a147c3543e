"""The benchmark's training runs: ``train/gdpo.py`` subprocesses with identical budgets per method,
reused when their overrides are unchanged, each recorded beside its folder (``run_stamp``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import DictConfig

from ..agents.checkpoint import atomic_write_json
from ..pipeline import factories, stages
from ..pipeline.run_dir import IGNORED
from ..pipeline.threads import resolve_threads
from .benchmark import BenchMethod, parse_method, replaceable_run_dir, run_stamp


def train_overrides(cfg: DictConfig, method: BenchMethod, seed: int, run_dir: Path, data_root: Path, vae: Path, sft: Path) -> list[str]:
    """Overrides of one ``train/gdpo.py`` run; identical for every method apart from ``algo=`` / ``env.sde=``
    and a variant's overrides (``cfg.variants[method.variant]``, last, so they win over ``train_overrides``)."""
    f = cfg.features
    extra = [str(o) for o in cfg.train_overrides]
    if method.sde is not None and any(o.lstrip("+~").startswith("env.sde=") for o in extra):
        raise ValueError(f"method {method.key} sets env.sde itself; remove env.sde from train_overrides={extra}")
    return [*method.overrides(), f"seed={seed}", f"out_dir={run_dir}", f"reward={cfg.reward}", f"model={cfg.model.preset}",
            f"data.root={data_root}", "data.auto_prepare=false", f"pretrained.vae={vae}", f"pretrained.sft={sft}",
            "pretrained.auto_train=false", f"features.text_encoder={f.text_encoder}", f"features.audio_encoder={f.audio_encoder}",
            f"features.cache_dir={factories.abspath(f.cache_dir)}",
            *([] if cfg.iterations is None else [f"optim.iterations={int(cfg.iterations)}"]),
            f"device={cfg.device}", f"threads={resolve_threads(cfg.threads)}", "logger.backend=csv", *extra,
            *method.variant_overrides(cfg.get("variants"), cfg.reward)]


def _iterations(overrides: list[str]) -> int | None:
    its = [o.split("=", 1)[1] for o in overrides if o.startswith("optim.iterations=")]
    return int(its[-1]) if its else None


# overrides that do not make another run: the settings run folders ignore too (where and how the run
# executes, its folder: the bench folder is ``<out_dir>/runs/<slug>_seed<S>`` either way, so a moved
# benchmark folder still matches), and the iteration count (a shorter run is extended, not replaced)
_NOT_IDENTITY = (*(f"{k}{sep}" for k in IGNORED for sep in "=."), "optim.iterations=")


def _identity(overrides: list[str]) -> list[str]:
    """What makes two runs of one folder the same run: the overrides but :data:`_NOT_IDENTITY`."""
    return [o for o in overrides if not o.startswith(_NOT_IDENTITY)]


def previous_run(cfg: DictConfig, run_dir: Path, over: list[str]) -> tuple[str, dict] | None:
    """How an earlier run in ``run_dir`` serves ``over``: ("reuse", record) when it is the same finished
    run, ("extend", record) when it is the same run with fewer iterations and its training state is
    there (``extend=true``; also an extension that was interrupted, if ``over`` asks for at least its
    target); None otherwise (retrain). ``record`` holds the finished part's overrides and wall time."""
    stamp = run_stamp(run_dir)
    if not (cfg.reuse and stamp.is_file() and (run_dir / "meta.json").is_file()):
        return None
    rec = json.loads(stamp.read_text())
    status, wanted = rec.get("status", "done"), _iterations(over)
    if status not in ("done", "extending") or _identity(rec.get("overrides") or []) != _identity(over):
        return None
    done = _iterations(rec["overrides"])
    if status == "done" and done == wanted:
        return "reuse", rec
    # an extension asks for more iterations than the folder holds: more than the finished part, and at
    # least an interrupted extension's target (that folder may already be past the finished part)
    least = _iterations(rec.get("target") or []) if status == "extending" else (None if done is None else done + 1)
    if (cfg.get("extend", False) and least is not None and wanted is not None and wanted >= least
            and (run_dir / "last" / "state.pt").is_file()):
        return "extend", rec
    return None


def run_training(cfg: DictConfig, method: str | BenchMethod, seed: int, out: Path, data_root: Path, vae: Path, sft: Path) -> dict:
    """Train (or reuse, or extend) ``out/runs/<slug>_seed<S>`` of ``method`` (an ``algos`` entry).

    Returns {path, wall_s, reused, extended_from} (the iteration count it was continued from, or None).
    A finished run with fewer iterations is continued with ``resume=true`` when ``cfg.extend``: the
    learning rate is constant and the resumed state restores the optimiser, the policy snapshot and
    every noise and window stream, so the result equals a straight run of the new length
    (tests/test_pipeline.py checks resume against a straight run); ``wall_s`` is then the sum of both parts.
    """
    method = parse_method(method) if isinstance(method, str) else method
    name = f"{method.slug}_seed{seed}"
    run_dir = out / "runs" / name
    over = train_overrides(cfg, method, seed, run_dir, data_root, vae, sft)
    stamp = run_stamp(run_dir)
    found = previous_run(cfg, run_dir, over)
    if found is not None and found[0] == "reuse":
        print(f"[bench] reusing {run_dir} ({method.label}, seed {seed})", flush=True)
        return {"path": run_dir, "wall_s": found[1].get("wall_s"), "reused": True, "extended_from": found[1].get("extended_from")}
    extend_from = None
    if found is not None:  # extend
        extend_from = _iterations(found[1]["overrides"])
    elif run_dir.exists():  # stale or different run: start clean (its CSV logs would otherwise be appended to)
        if not replaceable_run_dir(run_dir, out / "runs"):
            raise RuntimeError(f"refusing to delete {run_dir}: it holds files the benchmark did not write (no {stamp.name} "
                               f"beside it); move it away or choose another out_dir")
        shutil.rmtree(run_dir)
    prev_wall = float(found[1].get("wall_s") or 0.0) if found is not None else 0.0
    # the folder is the benchmark's from now on; an interrupted extension is continued next time
    atomic_write_json(stamp, {"overrides": over, "status": "running"} if found is None else
                      {**found[1], "status": "extending", "target": over})
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(stages.TRAIN_DIR / "gdpo.py"), *over, *(["resume=true"] if extend_from is not None else [])]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(resolve_threads(cfg.threads))}
    what = "training" if extend_from is None else f"extending (from iteration {extend_from})"
    print(f"[bench] {what} {method.label} seed {seed} -> {run_dir} (log {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "a" if extend_from is not None else "w") as fh:
        res = subprocess.run(cmd, cwd=os.getcwd(), stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        tail = log.read_text()[-3000:]
        hint = "" if extend_from is None else " (extending a finished run: extend=false retrains it from scratch instead)"
        raise RuntimeError(f"train/gdpo.py {method.key} seed {seed} failed (exit {res.returncode}){hint}; log {log}:\n{tail}")
    if not (run_dir / "meta.json").is_file():
        raise RuntimeError(f"train/gdpo.py {method.key} seed {seed} wrote no checkpoint into {run_dir}; see its log {log}")
    record = {"overrides": over, "wall_s": prev_wall + wall, "status": "done"}
    if extend_from is not None:
        record["extended_from"] = extend_from
    atomic_write_json(stamp, record)
    print(f"[bench] {method.label} seed {seed} done in {wall:.0f} s", flush=True)
    return {"path": run_dir, "wall_s": prev_wall + wall, "reused": False, "extended_from": extend_from}


def train_runs(cfg: DictConfig, algos: list[str], seeds: list[int], out: Path, data_root: Path, vae: Path, sft: Path) -> dict:
    """Every method's run for every seed, ``cfg.jobs`` at a time, with the same budget: ``{algo: {seed: record}}``."""
    jobs = [(a, s) for s in seeds for a in algos]
    with ThreadPoolExecutor(max_workers=max(1, int(cfg.jobs))) as pool:
        done = list(pool.map(lambda j: run_training(cfg, j[0], j[1], out, data_root, vae, sft), jobs))
    runs = {a: {} for a in algos}
    for (a, s), r in zip(jobs, done):
        runs[a][s] = r
    return runs


def run_meta(runs: dict, algos: list[str], seeds: list[int]) -> dict:
    """The meta.json of the first finished training run of ``algos`` (resolved ``config``, ``arch``); {} if none."""
    for a in algos:
        for s in seeds:
            try:
                return json.loads((Path(runs[a][s]["path"]) / "meta.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
    return {}


def git_state() -> dict:
    """Commit and modified files of the code that produced the report (best effort)."""
    def git(*a):
        r = subprocess.run(["git", *a], cwd=stages.TRAIN_DIR.parent, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified": dirty.splitlines() if dirty else []}
