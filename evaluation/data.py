"""The data every checkpoint evaluated on one split shares: windows, bank, encoders, VAE, FLAME layer.

:func:`prepare_eval_data` checks the inputs (checkpoint vs dataset, listening frames, FLAME model
file) and builds an :class:`EvalData`; :func:`load_eval_model` loads an AR-Flow checkpoint with
the compatibility check against it. The *expressive subset* is the windows whose ground-truth
variance (:func:`expressiveness`) is at or above the ``metrics.expressive_quantile`` quantile.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ..agents.arflow import load_arflow
from ..agents.checkpoint import load_checkpoint_meta
from ..envs.dataset import DyadicWindows, load_dataset_meta
from ..envs.flame import channel_mask
from ..envs.windows import build_window_bank
from ..pipeline import factories
from .checkpoints import EvalInputError, check_compatibility, read_arflow_meta, recorded_vae_dir


@dataclass
class EvalData:
    root: Path
    split: str
    windows: DyadicWindows
    indices: list[int]
    bank: object  # TensorDict of the windows (envs/windows.py)
    seq_ids: list[tuple[str, int]]  # (conversation, actor) of every row
    expressive: torch.Tensor  # (B,) bool
    variance: torch.Tensor  # (B,) expressiveness score
    vae: object
    normalizer: object
    text_enc: object
    audio_enc: object
    device: torch.device
    flame: object = None
    notes: list[str] = field(default_factory=list)


def select_indices(n: int, max_windows) -> list[int]:
    """All windows, or ``max_windows`` evenly spaced ones (deterministic, covers every conversation)."""
    if max_windows is None or int(max_windows) >= n:
        return list(range(n))
    k = max(int(max_windows), 1)
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def expressiveness(windows: DyadicWindows, motion: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B,)``: mean over valid channels of the per-channel variance over the window of the
    ground truth normalised by the dataset's normaliser."""
    x = windows.normalizer.normalize(motion.double().cpu())
    var = x.var(1, unbiased=False)  # (B, 67)
    cm = torch.as_tensor(channel_mask(valid.cpu().numpy()))  # (B, 67)
    return (var * cm).sum(-1) / cm.sum(-1).clamp(min=1)


def load_flame(mcfg: DictConfig):
    """The FLAME layer of ``metrics.flame_model`` (+ masks), or None (vertex metrics unavailable)."""
    if not mcfg.get("flame_model"):
        return None
    from .flame_layer import FlameLayer, FlameModelError

    if not mcfg.get("flame_masks"):
        raise FlameModelError("metrics.flame_model is set but metrics.flame_masks is not: LVE needs the lip vertices "
                              "and the vertex FDD the forehead / eye-region vertices (FLAME_masks.pkl)")
    return FlameLayer(factories.abspath(mcfg.flame_model), factories.abspath(mcfg.flame_masks),
                      n_shape=int(mcfg.get("flame_n_shape", 300)))


def split_activity(windows: DyadicWindows) -> tuple[int, int]:
    """(speaking frames, listening frames) of the actor over every window of ``windows``."""
    n_speak = n_listen = 0
    for ix in windows.index:
        vad = windows.conversation(ix.conversation).vad
        s, e = ix.window * windows.window, (ix.window + 1) * windows.window
        n_speak += int(vad[ix.actor, s:e].sum())
        n_listen += int((vad[1 - ix.actor, s:e] & ~vad[ix.actor, s:e]).sum())
    return n_speak, n_listen


def prepare_eval_data(cfg: DictConfig, ckpt: Path, data_root: Path, device: torch.device) -> tuple[EvalData, dict]:
    """Check inputs, load the VAE, encoders and the window bank of ``cfg.split`` of ``data_root``.

    ``cfg``: ``split``, ``vae_dir`` (null = the checkpoint's), ``max_windows``, ``progress`` and the
    ``features`` / ``metrics`` groups. Returns the data and the checkpoint's meta.
    """
    data_meta = load_dataset_meta(data_root)
    ckpt_meta = read_arflow_meta(ckpt)
    vae_dir = recorded_vae_dir(ckpt, ckpt_meta, cfg.get("vae_dir"))
    vae_meta = load_checkpoint_meta(vae_dir, kind="vae")
    check_compatibility(ckpt, ckpt_meta, vae_meta, data_root, data_meta)

    windows = DyadicWindows(data_root, cfg.split, load_audio=False)
    if len(windows) == 0:
        raise EvalInputError(f"split {cfg.split!r} of {data_root} has no {windows.window}-frame window")
    n_speak, n_listen = split_activity(windows)
    notes = []
    if n_listen == 0:
        msg = (f"split {cfg.split!r} of {data_root} has no listening frames (partner speaking while the actor is "
               f"silent): the listening metrics cannot be computed; check the dataset's VAD")
        if cfg.metrics.get("require_listening", True):
            raise EvalInputError(msg + " (metrics.require_listening=false reports them as unavailable instead)")
        notes.append(msg)
    if n_speak == 0:
        notes.append(f"split {cfg.split!r} has no speaking frames: speaking metrics are unavailable")
    flame = load_flame(cfg.metrics)  # fails early on a bad model file

    vae, normalizer, _ = factories.load_frozen_vae(vae_dir, device)
    feat_cfg = factories.checkpoint_encoders(cfg.features, ckpt_meta)
    text_enc, audio_enc = factories.make_encoders(feat_cfg, device)
    from ..agents.encoders import precompute_features

    features = precompute_features(data_root, text_enc, audio_enc, factories.abspath(feat_cfg.cache_dir),
                                   progress=bool(cfg.get("progress", True)), splits=(cfg.split,))
    idx = select_indices(len(windows), cfg.get("max_windows"))
    bank = build_window_bank(windows, features, vae, normalizer, device=device, indices=idx)
    seq_ids = [(windows.index[i].conversation, windows.index[i].actor) for i in idx]
    score = expressiveness(windows, bank["actor_motion"], bank["actor_valid"])
    thr = float(np.quantile(score.numpy(), float(cfg.metrics.get("expressive_quantile", 0.75))))
    data = EvalData(data_root, cfg.split, windows, idx, bank, seq_ids, score >= thr, score, vae, normalizer, text_enc,
                    audio_enc, device, flame, notes)
    return data, ckpt_meta


def load_eval_model(ckpt: Path, data: EvalData):
    """The AR-Flow at ``ckpt`` (eval mode) and its meta; refuses one whose latent or feature sizes
    differ from ``data``'s VAE and encoders."""
    return load_arflow(ckpt, data.device, expect={"d_latent": data.vae.cfg.d_latent, "d_text": data.text_enc.dim,
                                                  "d_audio": data.audio_enc.dim})
