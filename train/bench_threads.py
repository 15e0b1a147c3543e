"""Supervised training steps idle and next to one busy single-threaded process (issue 11, threads that cope with load).

    python train/bench_threads.py                          # small preset, 4 conditions, each in a fresh process
    python train/bench_threads.py steps=20 repeats=3 busy=numpy

Settings and their defaults: ``train/conf/bench_threads.yaml`` (Hydra overrides, as every entry point).

Each condition times ``steps`` supervised steps of train/sft.py (``evaluation.hardware.time_sft_steps``:
batch drawn from a synthetic bank with the real shapes, rectified-flow loss, backward, clipping,
AdamW) in a fresh child process, with its OpenMP wait variables set before torch loads
(``pipeline/threads.py``):

* default: short spin (``GOMP_SPINCOUNT=10000``) and ``threads: auto`` (what the entry points do);
* passive: never spin (``OMP_WAIT_POLICY=PASSIVE``) and ``threads: auto`` (the previous default);
* old:     ``OMP_WAIT_POLICY=ACTIVE`` and ``old_threads`` threads (torch's spin-waiting, the former
           ``threads: 2``);

each idle and then next to one busy single-threaded process (``busy``: a pure-Python loop or a
1-thread numpy loop), killed after the measurement; and one thread on the idle machine ("one core
idle"), the best any setting can do beside the busy process on 2 cores. Thread-count variables of the calling
environment (OMP_NUM_THREADS ...) are cleared for the timed child. The table gives seconds per step
(mean over the timed steps; median of ``repeats`` children), and the busy / idle ratio of each
setting (target for the default: at most ``max_busy_ratio``). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import os
import statistics

import hydra
from omegaconf import DictConfig

from gdpo_listener.evaluation import hardware as hw
from gdpo_listener.pipeline.checks import check_choice, check_count
from gdpo_listener.pipeline.threads import available_cores


def check_settings(cfg: DictConfig) -> None:
    if cfg.preset not in ("small", "paper"):
        raise ValueError(f"preset={cfg.preset!r} must be small or paper")
    check_count(cfg, ["batch", "steps", "repeats", "bank_rows", "old_threads"])
    check_count(cfg, ["warmup"], minimum=0)
    check_choice(cfg, "busy", sorted(hw.BUSY_CODE), None)


@hydra.main(version_base="1.3", config_path="conf", config_name="bench_threads")
def main(cfg: DictConfig) -> None:
    check_settings(cfg)
    settings = {k: cfg[k] for k in ("preset", "batch", "steps", "warmup", "bank_rows", "seed")}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"SFT steps under load | preset {cfg.preset}, batch {cfg.batch}, {cfg.steps} timed steps after {cfg.warmup} | "
          f"cores available {available_cores()} | load avg (1 min) {load:.2f} | busy process: {cfg.busy} | "
          f"median of {cfg.repeats} fresh process(es) per condition")
    if load > 0.5:
        print(f"NOTE: the machine is not idle (load {load:.1f}): the idle figures are inflated, the ratios understated")
    print()
    hdr = f"{'condition':<13} {'OpenMP wait':>11} {'threads':>7} {'s/step':>8} {'median':>8} {'max':>8}"
    print(hdr)
    print("-" * len(hdr))
    seconds = {}
    for cond in hw.thread_conditions(int(cfg.old_threads)):
        runs = [hw.run_condition(cond, settings, str(cfg.busy)) for _ in range(int(cfg.repeats))]
        seconds[cond.name] = statistics.median(r["seconds_per_step"] for r in runs)
        med = statistics.median(r["median"] for r in runs)
        print(f"{cond.name:<13} {cond.omp_wait:>11} {runs[0]['threads']:>7} {seconds[cond.name]:>8.3f} {med:>8.3f} "
              f"{max(r['max'] for r in runs):>8.3f}", flush=True)
    print("-" * len(hdr))
    ratios = hw.busy_ratios(seconds)
    limit = float(cfg.max_busy_ratio)
    print(f"busy / idle: default {ratios['default']:.2f}x (target <= {limit:.1f}x: "
          f"{'OK' if ratios['default'] <= limit else 'ABOVE TARGET'}) | passive {ratios['passive']:.2f}x | old {ratios['old']:.2f}x")
    print(f"idle: the default runs {seconds['passive idle'] / seconds['default idle']:.2f}x faster than passive waiting")
    one = seconds["one core idle"]
    print(f"busy / one core idle (the best a run can do beside the busy process): default {seconds['default busy'] / one:.2f}x | "
          f"passive {seconds['passive busy'] / one:.2f}x | old {seconds['old busy'] / one:.2f}x")
    print(f"next to the busy process the default runs {seconds['old busy'] / seconds['default busy']:.2f}x faster than the old setting")


if __name__ == "__main__":
    main()
