"""Effect of compressed AR-Flow weights (bf16, int8) on the evaluation metrics, against fp32 (issue 11).

    python train/bench_precision.py                                   # runs/sft_small: bf16 and int8 vs fp32
    python train/bench_precision.py checkpoint=runs/gdpo_small_expr+rot precisions=[bf16]

Settings and their defaults: ``train/conf/bench_precision.yaml``. ``train/evaluate.py`` scores the
checkpoint once per precision (fp32 first) with the same split, windows, seed and ODE sampler, so
the reports differ only by the weights' precision; ``evaluation/precision_check.py`` compares every
metric. Prints, per precision, the largest relative change (and the largest absolute change of the
near-zero metrics) and whether every metric stays within ``max_change``; writes
``<out_dir>/report.json``. Speed is ``train/bench_arflow.py``'s job (``precisions``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import hydra
from omegaconf import DictConfig

from gdpo_listener.agents.checkpoint import atomic_write_json
from gdpo_listener.agents.compress import PRECISIONS
from gdpo_listener.evaluation.precision_check import compare_reports, worst_change
from gdpo_listener.pipeline import factories, stages


def check_settings(cfg: DictConfig) -> None:
    if not cfg.precisions or any(p not in PRECISIONS or p == "fp32" for p in cfg.precisions):
        raise ValueError(f"precisions={list(cfg.precisions)} must be a non-empty subset of [bf16, int8] (fp32 is the reference)")
    for key in ("max_change", "floor"):
        if not float(cfg[key]) > 0:
            raise ValueError(f"{key}={cfg[key]} must be positive")
    if not (factories.abspath(cfg.checkpoint) / "meta.json").is_file():
        raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no AR-Flow checkpoint there (meta.json missing)")


def evaluate(cfg: DictConfig, precision: str, out) -> dict:
    """train/evaluate.py with ``precision`` -> its metrics.json."""
    over = [f"checkpoint={factories.abspath(cfg.checkpoint)}", f"precision={precision}", f"out={out}",
            f"split={cfg.split}", f"seed={cfg.seed}", f"steps={cfg.steps}", f"w_speak={cfg.w_speak}", f"w_listen={cfg.w_listen}",
            f"data.root={factories.abspath(cfg.data.root)}", f"threads={cfg.threads}", "progress=false"]
    if cfg.max_windows is not None:
        over.append(f"max_windows={cfg.max_windows}")
    cmd = [sys.executable, str(stages.TRAIN_DIR / "evaluate.py"), *over]
    res = subprocess.run(cmd, cwd=os.getcwd(), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"train/evaluate.py precision={precision} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


@hydra.main(version_base="1.3", config_path="conf", config_name="bench_precision")
def main(cfg: DictConfig) -> None:
    check_settings(cfg)
    out = factories.abspath(cfg.out_dir)
    limit, floor = float(cfg.max_change), float(cfg.floor)
    print(f"precision check | checkpoint {cfg.checkpoint} | split {cfg.split} | seed {cfg.seed} | {cfg.steps} ODE steps | "
          f"target: every metric within {limit:.0%} of fp32 (|fp32| < {floor}: absolute difference)", flush=True)
    ref = evaluate(cfg, "fp32", out / "fp32")
    print(f"fp32: {ref['n_windows']} windows scored", flush=True)
    report = {"checkpoint": str(cfg.checkpoint), "split": cfg.split, "seed": int(cfg.seed), "max_change": limit,
              "floor": floor, "precisions": {}}
    for p in cfg.precisions:
        changes = compare_reports(ref, evaluate(cfg, p, out / p), floor=floor)
        rel, ab = worst_change(changes, relative=True), worst_change(changes, relative=False)
        over = [c for c in changes if c.relative and abs(c.change) > limit]
        ok = not over
        print(f"{p}: {len(changes)} metrics | largest relative change {rel.change:+.2%} ({rel.metric}: {rel.ref:.4g} -> "
              f"{rel.other:.4g})" + (f" | largest absolute change of near-zero metrics {ab.change:+.2e} ({ab.metric})" if ab else "")
              + f" | {'OK' if ok else f'ABOVE {limit:.0%} for {len(over)} metric(s)'}", flush=True)
        for c in sorted(over, key=lambda c: -abs(c.change))[:10]:
            print(f"    {c.metric}: {c.ref:.4g} -> {c.other:.4g} ({c.change:+.2%})")
        report["precisions"][p] = {"ok": ok, "n_metrics": len(changes), "worst_relative": vars(rel) | {"change": rel.change},
                                   "over_limit": [vars(c) | {"change": c.change} for c in over]}
    atomic_write_json(out / "report.json", report)
    print(f"-> {out / 'report.json'}")


if __name__ == "__main__":
    main()
