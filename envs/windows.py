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
                            (long rows, W > 200: (W / 200, Dt) and (W / 200,), one per 200 frames)
    speaking_tokens (N,)    bool: majority of the token's frames are speaking

:func:`cond_from_bank` picks the AR-Flow conditioning dict out of a (sub-)bank; :func:`window_cond`
the conditioning of one sliding window of long rows (multi-window RL episodes).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from tensordict import TensorDict

from .dataset import WINDOW, DyadicWindows

# the conditioning dict's keys; ``speaking_tokens`` (B, N) is optional, read only by a model whose listening
# low-rank updates act on the context (``ARFlowConfig.lora_scope="listening_context"``)
COND_KEYS = ("text_emb", "text_mask", "actor_audio", "partner_audio", "partner_latent", "partner_has_motion",
             "speaking_tokens")


def token_majority(mask: torch.Tensor, r: int) -> torch.Tensor:
    """``(..., W)`` bool frame mask -> ``(..., W / r)`` bool: more than half of the token's frames set."""
    *lead, W = mask.shape
    return mask.reshape(*lead, W // r, r).float().mean(-1) > 0.5


def sliding_windows(n_total: int, W: int, k: int = 1) -> list[tuple[int, int, int]]:
    """The window schedule of long generation (paper 4.3): ``[(start, length, first_new), ...]`` in tokens.

    The first window is ``[0, min(W, n_total))`` with no prefix. Each next window starts ``k``
    tokens before the end of what is generated (stride ``W - k``), so tokens ``start .. first_new - 1``
    are its given prefix; the last window is shifted back to end exactly at ``n_total`` (it then
    has more than ``k`` prefix tokens). Every token is generated exactly once, in order.
    """
    if n_total < 1 or W < 2 or not 1 <= k < W:
        raise ValueError(f"sliding_windows: need n_total >= 1, W >= 2 and 1 <= k < W; got n_total={n_total}, W={W}, k={k}")
    out, end = [], 0
    while end < n_total:
        s0 = 0 if end == 0 else min(end - k, n_total - W)
        n = min(W, n_total - s0)
        out.append((s0, n, end))
        end = s0 + n
    return out


def cond_from_bank(bank: TensorDict) -> dict[str, torch.Tensor]:
    """The AR-Flow conditioning dict (see ``agents/arflow.py``) of a batch of bank rows (``speaking_tokens``
    when the bank has it)."""
    return {k: bank[k] for k in COND_KEYS if k != "speaking_tokens" or k in bank.keys()}


def window_cond(bank: TensorDict, start: int, length: int, r: int, text_window: int = WINDOW) -> dict[str, torch.Tensor]:
    """Conditioning of the token window ``[start, start + length)`` of (long) bank rows.

    Audio and partner latents are sliced; a long bank's per-segment text (``text_emb (B, n_seg, Dt)``,
    one description per ``text_window`` frames) gives the segment holding the window's centre
    frame. On a one-window bank, ``window_cond(rows, 0, N, r) == cond_from_bank(rows)``.
    """
    cond = cond_from_bank(bank)
    f0, nf = start * r, length * r
    cond["actor_audio"] = cond["actor_audio"][:, f0:f0 + nf]
    cond["partner_audio"] = cond["partner_audio"][:, f0:f0 + nf]
    cond["partner_latent"] = cond["partner_latent"][:, start:start + length]
    if "speaking_tokens" in cond:
        cond["speaking_tokens"] = cond["speaking_tokens"][:, start:start + length]
    if cond["text_emb"].dim() == 3:  # (B, n_seg, Dt): one text per segment
        seg = min((f0 + nf // 2) // text_window, cond["text_emb"].shape[1] - 1)
        cond["text_emb"], cond["text_mask"] = cond["text_emb"][:, seg], cond["text_mask"][:, seg]
    return cond


@torch.no_grad()
def encode_latents(vae, normalizer, motion: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """VAE posterior mean of raw motion ``(B, T, 67)`` -> ``(B, T / r, Dv)``, in batches.

    Motion longer than the VAE's training window is encoded window by window (as it was trained).
    """
    T, chunk = motion.shape[1], vae.cfg.window
    outs = []
    for i in range(0, motion.shape[0], batch_size):
        x = normalizer.normalize(motion[i : i + batch_size])
        outs.append(torch.cat([vae.encode(x[:, f:f + chunk])[0] for f in range(0, T, chunk)], dim=1))
    return torch.cat(outs)


def decode_normalised(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents ``(B, N, Dv)`` -> normalised frames ``(B, N r, 67)``, one VAE training window at a time."""
    n = vae.cfg.window // vae.cfg.r
    return torch.cat([vae.decode(z[:, i:i + n]) for i in range(0, z.shape[1], n)], dim=1)


@torch.no_grad()
def decode_latents(vae, normalizer, z: torch.Tensor) -> torch.Tensor:
    """Latents ``(B, N, Dv)`` -> raw FLAME ``(B, N r, 67)``, one VAE training window at a time."""
    return normalizer.denormalize(decode_normalised(vae, z))


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
        emb, mask = features.text(ix.conversation, ix.actor)  # one description per WINDOW frames
        segs = [s // WINDOW] if W <= WINDOW else list(range(s // WINDOW, -(-e // WINDOW)))
        te = np.stack([emb[j] if j < len(mask) else np.zeros(emb.shape[-1], np.float32) for j in segs])
        tm = np.array([bool(mask[j]) if j < len(mask) else False for j in segs])
        rows["text_emb"].append(te[0] if W <= WINDOW else te)
        rows["text_mask"].append(tm[0] if W <= WINDOW else tm)
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
