"""Prerequisite stages: produce the dataset, the VAE or the supervised AR-Flow when missing.

Each stage is produced by running its own entry point (``train/<stage>.py``) as a subprocess, so
``python train/gdpo.py`` works on a fresh clone and later runs reuse what is already there.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from ..agents.checkpoint import is_checkpoint
from ..envs.dataset import load_dataset_meta
from .factories import abspath

# the entry points live in the repository's train/ folder (the package is installed editable)
TRAIN_DIR = Path(__file__).resolve().parents[1] / "train"


def run_stage(script: str, overrides: list[str]) -> None:
    """Run another entry point (``train/<script>``) as a subprocess; fail loudly if it fails."""
    path = TRAIN_DIR / script
    if not path.is_file():
        raise FileNotFoundError(f"entry point {path} not found (install the project editable from its repository: pip install -e .)")
    cmd = [sys.executable, str(path), *overrides]
    print(f"[pipeline] running: {' '.join(cmd[1:])}", flush=True)
    res = subprocess.run(cmd, cwd=os.getcwd())
    if res.returncode != 0:
        raise RuntimeError(f"stage {script} failed with exit code {res.returncode} (command: {' '.join(cmd)})")


def ensure_dataset(data_cfg: DictConfig) -> Path:
    """The canonical dataset folder; the synthetic corpus is generated if missing and allowed."""
    root = abspath(data_cfg.root)
    if not (root / "dataset.json").is_file():
        if not data_cfg.get("auto_prepare", False):
            raise FileNotFoundError(f"no dataset at {root}; run train/prepare_data.py or set data.auto_prepare=true")
        over = ["source=synthetic", f"out={root}", f"seed={data_cfg.seed}"]
        for k in ("n_conversations", "seconds"):
            if data_cfg.get(k) is not None:
                over.append(f"synthetic.{k}={data_cfg[k]}")
        run_stage("prepare_data.py", over)
    meta = load_dataset_meta(root)
    _check_synthetic_version(root, meta, data_cfg)
    return root


def _check_synthetic_version(root: Path, meta: dict, data_cfg: DictConfig) -> None:
    """An auto-prepared synthetic corpus written by another corpus version, or with a generator option
    auto-preparation does not set (``synthetic.idle_expr_rank``), is not reused silently."""
    if meta.get("source") != "synthetic" or not data_cfg.get("auto_prepare", False):
        return
    from ..envs.synthetic import CORPUS_VERSION  # the generator (and scipy.signal) only when it matters

    version = (meta.get("synthetic") or {}).get("corpus_version", 1)
    rank = (meta.get("synthetic") or {}).get("idle_expr_rank")
    if rank is not None:
        raise RuntimeError(f"{root} holds a synthetic corpus written with synthetic.idle_expr_rank={rank}, which "
                           f"data.auto_prepare would not produce: set data.auto_prepare=false to use it on purpose, or point "
                           f"data.root at the default corpus")
    if version != CORPUS_VERSION:
        raise RuntimeError(f"{root} holds synthetic corpus version {version}, but this code's default corpus is version "
                           f"{CORPUS_VERSION}: move {root} away (and the VAE/AR-Flow checkpoints trained on it, e.g. runs/vae, "
                           f"runs/sft_*) to regenerate it, or point data.root at another folder")


def ensure_vae(cfg: DictConfig, data_root: Path) -> Path:
    """Path of the frozen VAE; trained with ``train/vae.py`` if missing and ``pretrained.auto_train`` is set."""
    path = abspath(cfg.pretrained.vae)
    if not is_checkpoint(path):
        if not cfg.pretrained.get("auto_train", False):
            raise FileNotFoundError(f"no VAE checkpoint at {path}; run train/vae.py or set pretrained.auto_train=true")
        run_stage("vae.py", [f"data.root={data_root}", f"out_dir={path}", f"device={cfg.device}", *cfg.pretrained.get("vae_overrides", [])])
        _expect_checkpoint(path, "vae.py")
    elif cfg.pretrained.get("auto_train", False):
        _check_vae_defaults(path, list(cfg.pretrained.get("vae_overrides", [])))
    return path


def _check_vae_defaults(path: Path, vae_overrides: list[str]) -> None:
    """A VAE at the auto-trained path that an older ``train/vae.py`` wrote with a setting whose default has since
    changed (``dyn_window``) is not reused silently: a fresh clone would train another VAE there."""
    from ..agents.vae import legacy_settings

    asked = dict(o.lstrip("+").split("=", 1) for o in vae_overrides if "=" in o)  # {"model.dyn_window": "0", ...}
    stale = {k: v for k, v in legacy_settings(path).items() if asked.get(f"model.{k}", "").strip() != str(v[0])}
    if stale:
        got = ", ".join(f"{k}={old}" for k, (old, _) in stale.items())
        today = ", ".join(f"{k}={new}" for k, (_, new) in stale.items())
        keep = ",".join(f"'+model.{k}={old}'" for k, (old, _) in stale.items())
        raise RuntimeError(f"{path} holds a VAE written before this code's default {today} (it was trained with {got}), "
                           f"which pretrained.auto_train would not produce: move {path} (and the AR-Flow checkpoints trained "
                           f"on it, e.g. runs/sft_*) away to retrain both, or keep it on purpose with "
                           f"pretrained.vae_overrides=[{keep}] or pretrained.auto_train=false")


def ensure_sft(cfg: DictConfig, data_root: Path, vae_path: Path) -> Path:
    """Path of the supervised AR-Flow; trained with ``train/sft.py`` if missing and allowed."""
    path = abspath(cfg.pretrained.sft)
    if not is_checkpoint(path):
        if not cfg.pretrained.get("auto_train", False):
            raise FileNotFoundError(f"no supervised AR-Flow checkpoint at {path}; run train/sft.py or set pretrained.auto_train=true")
        run_stage("sft.py", [
            f"data.root={data_root}", f"vae_dir={vae_path}", f"out_dir={path}", f"device={cfg.device}",
            f"model={cfg.model.preset}", f"features.cache_dir={cfg.features.cache_dir}",
            f"features.text_encoder={cfg.features.text_encoder}", f"features.audio_encoder={cfg.features.audio_encoder}",
            *cfg.pretrained.get("sft_overrides", []),
        ])
        _expect_checkpoint(path, "sft.py")
    return path


def _expect_checkpoint(path: Path, script: str) -> None:
    if not is_checkpoint(path):
        raise RuntimeError(f"{script} finished but wrote no checkpoint at {path}: the folder holds an unfinished run with "
                           f"other settings (see the log above for where it wrote); remove {path} or point pretrained.* at it")
