"""``make_*`` factories: config sections in, components out, in the order a recipe uses them."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from ..envs.dataset import WINDOW, DyadicWindows
from ..envs.windows import build_window_bank
from .run_state import resolved_config


def abspath(p: str | os.PathLike) -> Path:
    """``p`` relative to the folder the user launched from (Hydra may change the working folder)."""
    return Path(to_absolute_path(str(p)))


def make_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available on this machine")
    return dev


# ----------------------------------------------------------------------------------------------
# data and features


def make_encoders(feat_cfg: DictConfig, device: torch.device):
    from ..agents.encoders import AudioEncoder, TextEncoder

    return TextEncoder(feat_cfg.text_encoder, device=device), AudioEncoder(feat_cfg.audio_encoder, device=device)


def checkpoint_encoders(feat_cfg: DictConfig, ckpt_meta: dict) -> DictConfig:
    """Encoder config: ``feat_cfg``'s non-null entries, else those recorded in the checkpoint, else the defaults."""
    recorded = ((ckpt_meta.get("config") or {}).get("features") or {})
    return OmegaConf.create({
        "text_encoder": feat_cfg.text_encoder or recorded.get("text_encoder") or "bundled-minilm",
        "audio_encoder": feat_cfg.audio_encoder or recorded.get("audio_encoder") or "logmel",
        "cache_dir": feat_cfg.cache_dir})


def make_features(feat_cfg: DictConfig, data_root: Path, device: torch.device, dist=None):
    """Cached text/audio features of every clip of the dataset, and the two encoders.

    ``dist`` (a :class:`~pipeline.distributed.Dist` of several processes): every rank first computes
    and writes its own share of the missing cache entries, then, after a barrier, loads them all.
    """
    from ..agents.encoders import precompute_features

    text_enc, audio_enc = make_encoders(feat_cfg, device)
    cache_dir = abspath(feat_cfg.cache_dir)
    if dist is not None and dist.is_distributed:
        precompute_features(data_root, text_enc, audio_enc, cache_dir, progress=dist.is_main, shard=(dist.rank, dist.world_size))
        dist.barrier()
    feats = precompute_features(data_root, text_enc, audio_enc, cache_dir, progress=dist is None or dist.is_main)
    return feats, text_enc, audio_enc


def make_banks(data_root: Path, features, vae, normalizer, device, splits=("train", "test"), max_windows: int | None = None,
               window: int | None = None) -> dict:
    """Window banks per split; ``window`` (frames, default the dataset's 200) > 200 gives long rows."""
    banks = {}
    for split in splits:
        windows = DyadicWindows(data_root, split, load_audio=False, window=window or WINDOW)
        idx = None
        if max_windows is not None and len(windows) > max_windows:
            idx = np.random.default_rng(0).choice(len(windows), max_windows, replace=False).tolist()
        banks[split] = build_window_bank(windows, features, vae, normalizer, device=device, indices=idx)
    return banks


# ----------------------------------------------------------------------------------------------
# models


def load_frozen_vae(path: Path, device: torch.device):
    from ..agents.vae import load_vae

    vae, normalizer, vae_cfg = load_vae(path, device)
    vae.eval().requires_grad_(False)
    return vae, normalizer, vae_cfg


def arflow_config(model_cfg: DictConfig, **dims):
    """ARFlowConfig of the preset ``model_cfg.preset`` with ``model_cfg.arch`` and ``dims`` overrides."""
    from ..agents.arflow import ARFlowConfig

    presets = {"small": ARFlowConfig.small, "paper": ARFlowConfig.paper}
    if model_cfg.preset not in presets:
        raise ValueError(f"unknown model preset {model_cfg.preset!r}; valid: {sorted(presets)}")
    arch = {**OmegaConf.to_container(model_cfg.arch, resolve=True), **dims}
    fields = {f.name for f in dataclasses.fields(ARFlowConfig)}
    unknown = sorted(set(arch) - fields)
    if unknown:
        raise ValueError(f"unknown AR-Flow config fields {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(presets[model_cfg.preset](), **arch)


def make_arflow(model_cfg: DictConfig, **dims):
    from ..agents.arflow import ARFlow

    return ARFlow(arflow_config(model_cfg, **dims))


def save_run_arflow(out_dir: Path, model, cfg: DictConfig, extra: dict | None = None) -> Path:
    """The run's AR-Flow checkpoint, with its preset and resolved config."""
    from ..agents.arflow import save_arflow

    return save_arflow(out_dir, model, cfg.model.preset, resolved_config(cfg), extra)


# ----------------------------------------------------------------------------------------------
# RL and logging


def make_reward(cfg: DictConfig):
    """The ``FlameReward`` of ``reward=...`` and the ``rewards`` section (validated early)."""
    from ..rewards.groups import build_reward

    r = cfg.rewards
    reward = build_reward(cfg.reward, weights=r.weights, lambdas=r.lambdas, group_reward=r.group_reward,
                          extra_terms=r.extra_terms)
    objective = cfg.get("algo", {}).get("objective_tokens", "listening")
    if reward.scores_speaking and objective == "listening":
        raise ValueError(f"reward={cfg.reward}: columns {reward.speaking_columns} score speaking frames, but algo.objective_tokens="
                         f"{objective} trains only listening tokens on the advantage; set algo.objective_tokens=matched "
                         f"(speaking tokens on the speaking columns' advantage) or all")
    if objective == "matched" and len(reward.speaking_columns) in (0, reward.n_groups):
        raise ValueError(f"algo.objective_tokens=matched needs listening groups and <group>@speaking columns in the "
                         f"reward (e.g. reward=expr+rot+jaw@speaking), got reward={cfg.reward}")
    return reward


def make_logger(log_cfg: DictConfig, out_dir: Path, exp_name: str, state_dict=None):
    """A TorchRL logger (``logger.backend=csv|tensorboard|wandb``) under ``out_dir/logs``; None if disabled."""
    from torchrl.record.loggers import get_logger

    if not log_cfg.backend:
        return None
    kwargs = {}
    if log_cfg.backend == "wandb":
        kwargs = {"project": log_cfg.get("project", "gdpo-listener")}
    if state_dict is not None:  # a resumed run logs into ITS folder (torchrl would reuse the saved absolute path,
        # i.e. the folder the run was first written to, if the run has been moved or copied since)
        state_dict = {**state_dict, "log_dir": str(Path(out_dir) / "logs"), "exp_name": exp_name}
    return get_logger(log_cfg.backend, logger_name=str(out_dir / "logs"), experiment_name=exp_name, state_dict=state_dict, **kwargs)


def log_scalars(logger, scalars: dict, step: int) -> None:
    if logger is None:
        return
    for k, v in scalars.items():
        logger.log_scalar(k, float(v), step=step)
