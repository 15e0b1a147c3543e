"""Tiny, fast RL components (random window bank, tiny VAE and AR-Flow) shared by the RL tests."""
from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDict

from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
from gdpo_listener.agents.vae import MotionVAE, VAEConfig
from gdpo_listener.envs.dataset import Normalizer
from gdpo_listener.envs.flame import FLAME_DIM, N_GROUPS
from gdpo_listener.envs.windows import token_majority

W, R, DV, DT, DA = 32, 8, 4, 8, 6
N = W // R


def tiny_bank(n_windows: int = 6, seed: int = 0, listening: bool = True, frames: int = W) -> TensorDict:
    """Random bank rows of ``frames`` frames (``frames > W``: long rows for multi-window episodes)."""
    g = torch.Generator().manual_seed(seed)
    W_, N_ = frames, frames // R
    t = torch.linspace(0, 6.28 * W_ / W, W_)
    motion = 0.3 * torch.sin(t[None, :, None] * (1 + torch.rand(n_windows, 1, FLAME_DIM, generator=g) * 3))
    vad = torch.zeros(n_windows, W_, dtype=torch.bool)
    vad[:, : W_ // 2] = True  # actor speaks in the first half, listens in the second
    lis = ~vad if listening else torch.zeros_like(vad)
    bank = TensorDict({
        "actor_motion": motion,
        "partner_motion": motion.flip(1),
        "actor_valid": torch.ones(n_windows, N_GROUPS, dtype=torch.bool),
        "partner_valid": torch.ones(n_windows, N_GROUPS, dtype=torch.bool),
        "speaking": vad,
        "listening": lis,
        "partner_has_motion": torch.ones(n_windows, dtype=torch.bool),
        "actor_audio": torch.randn(n_windows, W_, DA, generator=g),
        "partner_audio": torch.randn(n_windows, W_, DA, generator=g),
        "text_emb": torch.randn(n_windows, DT, generator=g),
        "text_mask": torch.ones(n_windows, dtype=torch.bool),
        "actor_latent": torch.randn(n_windows, N_, DV, generator=g),
        "partner_latent": torch.randn(n_windows, N_, DV, generator=g),
    }, batch_size=[n_windows])
    bank["speaking_tokens"] = token_majority(bank["speaking"], R)
    return bank


def tiny_arflow(seed: int = 0) -> ARFlow:
    torch.manual_seed(seed)
    cfg = ARFlowConfig(d_latent=DV, d_text=DT, d_audio=DA, d_model=32, n_layers=2, n_heads=2, r=R, window=W,
                       p_drop_text=0.0, p_drop_audio=0.0, p_drop_motion=0.0)
    return ARFlow(cfg).eval()


def tiny_vae(seed: int = 0) -> tuple[MotionVAE, Normalizer]:
    torch.manual_seed(seed)
    vae = MotionVAE(VAEConfig.tiny(d_latent=DV, window=W, r=R)).eval().requires_grad_(False)
    norm = Normalizer(np.zeros(FLAME_DIM, np.float32), np.ones(FLAME_DIM, np.float32))
    return vae, norm
