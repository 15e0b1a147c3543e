"""A bank of training/evaluation windows with all conditioning precomputed, as one TensorDict.

Stage 1 (SFT), the RL environment, evaluation and the benchmarks all draw windows from a
:class:`~tensordict.TensorDict` built once by :func:`build_window_bank`. Row ``b`` is one window of
one conversation with one side as the actor. Keys (``W`` frames, ``N = W / r`` tokens)::

    actor_motion   (W, 67)  raw FLAME of the actor (ground truth)
    partner_motion (W, 67)  raw FLAME of the partner (zeros if audio-only)
    actor_valid    (6,)     bool per FLAME group        partner_valid (6,) bool
    speaking       (W,)     bool: actor speaks          listening (W,) bool: partner speaks, actor silent
    actor_latent   (N, Dv)  VAE mean of the actor's normalised motion (SFT target)
    partner_latent (N, Dv)  VAE mean of the partner's normalised motion
    partner_has_motion ()   bool
    actor_audio    (W, Da)  frozen audio features at 25 fps     partner_audio (W, Da)
    text_emb       (Dt,)    frozen text embedding       text_mask () bool (False = no text)
    speaking_tokens (N,)    bool: majority of the token's frames are speaking

:func:`cond_from_bank` picks the AR-Flow conditioning dict out of a (sub-)bank.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from tensordict import TensorDict

from .dataset import DyadicWindows

COND_KEYS = ("text_emb", "text_mask", "actor_audio", "partner_audio", "partner_latent", "partner_has_motion")


def token_majority(mask: torch.Tensor, r: int) -> torch.Tensor:
    """``(..., W)`` bool frame mask -> ``(..., W / r)`` bool: more than half of the token's frames set."""
    *lead, W = mask.shape
    return mask.reshape(*lead, W // r, r).float().mean(-1) > 0.5


def cond_from_bank(bank: TensorDict) -> dict[str, torch.Tensor]:
    """The AR-Flow conditioning dict (see ``agents/arflow.py``) of a batch of bank rows."""
    return {k: bank[k] for k in COND_KEYS}


@torch.no_grad()
def encode_latents(vae, normalizer, motion: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """VAE posterior mean of raw motion ``(B, W, 67)`` -> ``(B, N, Dv)``, in batches."""
    outs = []
    for i in range(0, motion.shape[0], batch_size):
        x = normalizer.normalize(motion[i : i + batch_size])
        mu, _ = vae.encode(x)
        outs.append(mu)
    return torch.cat(outs)


@torch.no_grad()
def build_window_bank(
    windows: DyadicWindows,
    features,
    vae,
    normalizer,
    device: str | torch.device = "cpu",
    indices: Iterable[int] | None = None,
) -> TensorDict:
    """Stack the windows (or the given ``indices``) of ``windows`` with their cached features.

    ``features`` is the object returned by ``agents.encoders.precompute_features``; ``vae`` and
    ``normalizer`` the frozen stage-0 model (its normaliser, fitted on the train split).
    """
    if windows.load_audio:
        raise ValueError("build the bank from DyadicWindows(..., load_audio=False); audio comes from the feature cache")
    idx = list(range(len(windows))) if indices is None else list(indices)
    if not idx:
        raise ValueError(f"no windows in split {windows.split!r} of {windows.root}")
    W = windows.window
    rows: dict[str, list] = {k: [] for k in (
        "actor_motion", "partner_motion", "actor_valid", "partner_valid", "speaking", "listening",
        "partner_has_motion", "actor_audio", "partner_audio", "text_emb", "text_mask")}
    for i in idx:
        item = windows[i]
        ix = windows.index[i]
        s, e = ix.window * W, (ix.window + 1) * W
        for k in ("actor_motion", "partner_motion", "actor_valid", "partner_valid", "speaking", "listening", "partner_has_motion"):
            rows[k].append(np.asarray(item[k]))
        rows["actor_audio"].append(features.audio(ix.conversation, ix.actor)[s:e])
        rows["partner_audio"].append(features.audio(ix.conversation, 1 - ix.actor)[s:e])
        emb, mask = features.text(ix.conversation, ix.actor)
        if ix.window < len(mask):
            rows["text_emb"].append(emb[ix.window])
            rows["text_mask"].append(bool(mask[ix.window]))
        else:
            rows["text_emb"].append(np.zeros(emb.shape[-1], np.float32))
            rows["text_mask"].append(False)
    t = {k: torch.as_tensor(np.stack(v)) for k, v in rows.items()}
    for k in ("actor_motion", "partner_motion", "actor_audio", "partner_audio", "text_emb"):
        t[k] = t[k].float()
    vae_device = next(vae.parameters()).device
    t["actor_latent"] = encode_latents(vae, normalizer, t["actor_motion"].to(vae_device)).cpu()
    t["partner_latent"] = encode_latents(vae, normalizer, t["partner_motion"].to(vae_device)).cpu()
    t["partner_latent"][~t["partner_has_motion"]] = 0.0
    r = W // t["actor_latent"].shape[1]
    t["speaking_tokens"] = token_majority(t["speaking"], r)
    bank = TensorDict(t, batch_size=[len(idx)])
    return bank.to(device)
