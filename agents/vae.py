"""Motion VAE (paper section 3.1): normalised 67-d FLAME frames <-> continuous latent tokens.

A window of ``T`` normalised frames ``x' (B, T, 67)`` is compressed ``r = 8`` times in time into
``N = T / r`` latent tokens of size ``D_v`` (25 tokens for the 200-frame window)::

    encoder: strided Conv1d (kernel 2r, stride r) -> transformer (bidirectional, RoPE) -> (mu, logvar)
    decoder: Linear(D_v -> D) -> transformer -> ConvTranspose1d (kernel 2r, stride r) -> frame conv -> 67

The transformer blocks and rotary embeddings (token j at position j) are the AR-Flow's
(``agents/attention.py``).

Overlapping kernels (2r) on both ends make neighbouring tokens share frames, so decoded motion has
no seams at token boundaries. The VAE works on NORMALISED motion (``Normalizer`` of the dataset,
stored in the checkpoint); ``per_group_report`` converts back to raw FLAME units.

Loss terms (``MotionVAE.loss``), weighted means over valid channels:
    loss_recon  MSE of frames                            (channel_weight masks invalid groups)
    loss_vel    MSE of frame differences                 (keeps dynamics, see docs/design.md section 6)
    loss_dyn    squared error of the per-channel velocity std (the reward's statistic,
                ``rewards.stats.velocity_std``), of the whole window (``dyn_window = 0``) or of each
                non-overlapping sub-window of ``dyn_window`` frames (see :func:`local_velocity_std`)
    loss_kl     KL(q(z|x) || N(0, I)), summed over D_v, mean over tokens
    loss        loss_recon + vel_weight * loss_vel + dyn_weight * loss_dyn + kl_weight * loss_kl
Channel weights (``loss_channel_weights``) follow each channel's raw variance within its group and
balance groups of different size, so the 16-d latent is not spent on the many small, noisy
expression coefficients that normalisation blows up to unit variance. With MSE terms alone, the
decoded velocity std of the fast channels (mouth, jaw, gaze) came out 20-30 % too low on the
synthetic corpus; ``loss_dyn`` brings it to 0.85-1.0.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..envs.dataset import Normalizer
from ..envs.flame import FLAME_DIM, GROUP_NAMES, GROUPS, channel_group_ids
from ..rewards.stats import velocity_std
from .attention import Block, rope_cos_sin
from .checkpoint import CheckpointError, load_checkpoint_meta, load_weights, save_checkpoint

VAE_KIND = "vae"
# 2: shared attention blocks (agents/attention.py): rotary pairs (i, i + hd/2) instead of (2i, 2i + 1),
#    MLP weights named fc/proj; weights of version 1 do not mean the same and are refused.
VAE_FORMAT_VERSION = 2
# VAEConfig fields added after checkpoints of this format were written, with the value those checkpoints were
# trained with (a checkpoint whose meta lacks the field loads with it; see legacy_settings)
LEGACY_DEFAULTS: dict[str, Any] = {"dyn_window": 0}
LOGVAR_RANGE = (-10.0, 10.0)


@dataclass
class VAEConfig:
    d_in: int = FLAME_DIM  # frame size (the 67-d FLAME layout)
    d_latent: int = 16  # D_v, size of one latent token
    d_model: int = 64  # transformer width
    n_layers: int = 2  # transformer blocks in the encoder and again in the decoder
    n_heads: int = 2
    mlp_ratio: float = 4.0
    r: int = 8  # temporal downsampling: one token per r frames
    window: int = 200  # training window in frames (must be a multiple of r)
    dropout: float = 0.0
    kl_weight: float = 1e-4  # small: latents stay informative (KL only keeps their scale in check)
    vel_weight: float = 10.0  # weight of loss_vel (frame differences)
    dyn_weight: float = 30.0  # weight of loss_dyn: match each window's per-channel velocity std
    dyn_window: int = 50  # frames per sub-window whose velocity std loss_dyn matches (2 s); 0 = the whole window (the
    # VAEs before this option). A whole window's std is dominated by its speaking frames: matched on it, the decoded
    # listening expression moved at 0.31 of the ground truth's velocity std (docs/benchmarks.md, "The VAE's ceiling")
    group_balance: float = 0.5  # loss weight ~ (group dims)^-group_balance: 0 every channel equal, 1 every group equal
    raw_weight: float = 0.8  # within a group, this share of the weight follows the channel's raw variance (< 1:
    # constant channels must keep some weight, else the decoder is free to output anything there)
    rope_base: float = 10_000.0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"VAEConfig: d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size")
        if self.r < 1 or self.window % self.r:
            raise ValueError(f"VAEConfig: window={self.window} must be a positive multiple of r={self.r}")
        if self.dyn_window != 0 and self.dyn_window < 3:
            raise ValueError(f"VAEConfig: dyn_window={self.dyn_window} must be 0 (the whole window) or at least 3 frames "
                             "(a longer one than the window is the whole window)")

    @classmethod
    def small(cls, **kw) -> "VAEConfig":
        """CPU default: ~0.3M parameters, trains on a 1-hour corpus in a minute or two on 2 cores."""
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw) -> "VAEConfig":
        """For tests and smoke runs."""
        return cls(**{"d_model": 32, "n_layers": 1, "n_heads": 2, **kw})

    @classmethod
    def medium(cls, **kw) -> "VAEConfig":
        """Wider CPU model (~1.1M parameters), about twice the cost of ``small`` per step."""
        return cls(**{"d_model": 128, "n_heads": 4, **kw})

    @classmethod
    def base(cls, **kw) -> "VAEConfig":
        """A larger model for real corpora (GPU)."""
        return cls(**{"d_latent": 32, "d_model": 256, "n_layers": 4, "n_heads": 8, "dropout": 0.1, **kw})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "VAE config") -> "VAEConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown VAE config fields {unknown}; valid fields: {sorted(fields)}")
        return cls(**dict(d))


# ----------------------------------------------------------------------------------------------
# building blocks


class Transformer(nn.Module):
    """Bidirectional pre-LN transformer over latent tokens with rotary positions 0 .. N-1."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)  # (N,) token j at position j
        cos, sin = rope_cos_sin(pos, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_base)  # (N, hd/2) each
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.ln_f(x)


class Encoder(nn.Module):
    """(B, T, 67) normalised frames -> mu, logvar (B, T/r, D_v)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        r = cfg.r
        # kernel 2r, stride r, padding r/2: token j sees frames [j r - r/2, j r + 3r/2)
        self.patch = nn.Conv1d(cfg.d_in, cfg.d_model, kernel_size=2 * r, stride=r, padding=r // 2)
        self.transformer = Transformer(cfg)
        self.head = nn.Linear(cfg.d_model, 2 * cfg.d_latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.patch(x.transpose(1, 2)).transpose(1, 2)  # (B, N, D)
        h = self.transformer(h)
        mu, logvar = self.head(h).chunk(2, dim=-1)  # (B, N, Dv) each
        return mu, logvar.clamp(*LOGVAR_RANGE)


class Decoder(nn.Module):
    """(B, N, D_v) latents -> (B, N r, 67) normalised frames."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        r = cfg.r
        d_frame = max(cfg.d_model // 2, 16)
        self.inp = nn.Linear(cfg.d_latent, cfg.d_model)
        self.transformer = Transformer(cfg)
        # inverse of the encoder's patch conv: output length (N - 1) r - r + 2r = N r
        self.unpatch = nn.ConvTranspose1d(cfg.d_model, d_frame, kernel_size=2 * r, stride=r, padding=r // 2)
        self.frame = nn.Conv1d(d_frame, cfg.d_in, kernel_size=3, padding=1, padding_mode="replicate")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.transformer(self.inp(z))  # (B, N, D)
        f = F.gelu(self.unpatch(h.transpose(1, 2)))  # (B, d_frame, N r)
        return self.frame(f).transpose(1, 2)  # (B, N r, 67)


class MotionVAE(nn.Module):
    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig.small()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # statistics of posterior means on the training split (set by train/vae.py; 0 / 1 until
        # then). Not used by encode/decode: downstream models may use them to scale latents.
        self.register_buffer("latent_mean", torch.zeros(cfg.d_latent))
        self.register_buffer("latent_std", torch.ones(cfg.d_latent))
        # per-channel loss weights (training only; see loss_channel_weights and set_loss_weights)
        self.register_buffer("loss_weights", loss_channel_weights(cfg))

    def set_loss_weights(self, raw_std: np.ndarray | torch.Tensor) -> None:
        """Weight channels by their raw std over the training data (``(67,)``, see :func:`loss_channel_weights`)."""
        self.loss_weights.copy_(loss_channel_weights(self.cfg, raw_std))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"MotionVAE expects motion (B, T, {self.cfg.d_in}), got {tuple(x.shape)}")
        if x.shape[1] == 0 or x.shape[1] % self.cfg.r:
            raise ValueError(f"MotionVAE: T={x.shape[1]} frames must be a positive multiple of r={self.cfg.r}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised motion (B, T, 67) -> (mu, logvar), each (B, T / r, D_v)."""
        self._check(x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, N, D_v) -> normalised motion (B, N r, 67)."""
        if z.ndim != 3 or z.shape[-1] != self.cfg.d_latent:
            raise ValueError(f"MotionVAE.decode expects latents (B, N, {self.cfg.d_latent}), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool | None = None) -> dict[str, torch.Tensor]:
        """Reconstruct; ``sample`` (default: ``self.training``) draws z ~ q(z|x), else z = mu."""
        mu, logvar = self.encode(x)
        sample = self.training if sample is None else sample
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        return {"recon": self.decode(z), "mu": mu, "logvar": logvar, "z": z}

    def loss(self, x: torch.Tensor, out: Mapping[str, torch.Tensor], channel_weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms (see the module docstring) and their weighted sum ``loss``.

        ``channel_weight (B, 67)`` (bool or float) masks invalid groups; it is multiplied with the
        model's per-channel ``loss_weights`` (set from the training data by :meth:`set_loss_weights`).
        """
        recon = out["recon"]
        B, T, C = x.shape
        w = torch.ones(B, C, device=x.device) if channel_weight is None else channel_weight.to(x.device, x.dtype)
        w = (w * self.loss_weights.to(x.dtype))[:, None, :]  # (B, 1, C)
        terms = {
            "loss_recon": masked_mse(recon, x, w),
            "loss_vel": masked_mse(recon.diff(dim=1), x.diff(dim=1), w),
            "loss_kl": kl_standard_normal(out["mu"], out["logvar"]),
            "loss_dyn": masked_mse(local_velocity_std(recon, self.cfg.dyn_window), local_velocity_std(x, self.cfg.dyn_window), w),
        }
        terms["loss"] = (terms["loss_recon"] + self.cfg.vel_weight * terms["loss_vel"] + self.cfg.kl_weight * terms["loss_kl"]
                         + self.cfg.dyn_weight * terms["loss_dyn"])
        return terms


def local_velocity_std(x: torch.Tensor, window: int) -> torch.Tensor:
    """Velocity std of each non-overlapping sub-window of ``window`` frames: ``(B, T, C) -> (B, T // window, C)``.

    ``window = 0`` (or ``>= T``) is the whole sequence, ``(B, 1, C)``; frames after the last whole
    sub-window are not used.
    """
    if window <= 0 or window >= x.shape[1]:
        return velocity_std(x)[:, None]  # (B, 1, C)
    sub = x.unfold(1, window, window).transpose(-1, -2)  # (B, T // window, window, C)
    return velocity_std(sub)  # (B, T // window, C)


def loss_channel_weights(cfg: VAEConfig, std: np.ndarray | None = None) -> torch.Tensor:
    """``(67,)`` loss weight per channel, mean 1.

    The model sees normalised channels, but what matters downstream (rewards, metrics) is raw
    motion, where a few channels of a group carry most of its variance (e.g. the first expression
    coefficients). Within a group, weight ``(1 - raw_weight) + raw_weight * std_c^2 / mean_g(std^2)``
    (``std`` = raw std of each channel over the training data, 0 for constant channels; uniform when
    None); across groups, every channel of a group of ``d`` channels is scaled by ``d ** -group_balance``.
    """
    if cfg.d_in != FLAME_DIM:
        return torch.ones(cfg.d_in)
    ids = torch.as_tensor(channel_group_ids())
    w = torch.ones(FLAME_DIM)
    if std is not None and cfg.raw_weight:
        var = torch.as_tensor(np.asarray(std, np.float64), dtype=torch.float64).pow(2)
        if var.shape != (FLAME_DIM,) or not torch.isfinite(var).all():
            raise ValueError(f"loss_channel_weights: std must be ({FLAME_DIM},) finite values, got shape {tuple(var.shape)}")
        share = torch.empty(FLAME_DIM, dtype=torch.float64)
        for g, sl in GROUPS.items():
            share[sl] = var[sl] / var[sl].mean().clamp(min=1e-12)
        w = ((1 - cfg.raw_weight) + cfg.raw_weight * share).float()
    gdims = torch.tensor([GROUPS[g].stop - GROUPS[g].start for g in GROUP_NAMES], dtype=torch.float32)
    w = w * gdims[ids] ** -float(cfg.group_balance)
    return w / w.mean()


def raw_channel_std(motion: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """Std of each raw channel over the frames of rows where its group is valid: ``(B, T, 67), (B, 6) -> (67,)``."""
    w = channel_weight(valid)[:, None, :].to(motion.dtype)  # (B, 1, 67)
    n = (w.sum(0) * motion.shape[1]).clamp(min=1.0)  # (1, 67)
    mean = (motion * w).sum((0, 1)) / n[0]
    var = ((motion - mean).pow(2) * w).sum((0, 1)) / n[0]
    return var.sqrt().double().numpy()


def channel_weight(group_valid: torch.Tensor) -> torch.Tensor:
    """Per-group validity ``(B, 6)`` bool -> per-channel float weights ``(B, 67)`` for :meth:`MotionVAE.loss`."""
    ids = torch.as_tensor(channel_group_ids(), device=group_valid.device)
    return group_valid.bool()[..., ids].float()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean of ``w * (pred - target)^2`` over (B, T, C), normalised by the weight mass."""
    err = (pred - target).pow(2) * w  # (B, T, C)
    return err.sum() / (w.expand_as(err).sum()).clamp(min=1.0)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the latent dim, mean over (B, N)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()


def make_vae(cfg: VAEConfig | Mapping[str, Any] | None = None) -> MotionVAE:
    """Build a VAE from a :class:`VAEConfig`, a mapping of its fields (e.g. Hydra ``cfg.model``) or None."""
    if cfg is None or isinstance(cfg, VAEConfig):
        return MotionVAE(cfg)
    if not isinstance(cfg, Mapping):
        try:  # OmegaConf DictConfig
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        except Exception as e:  # noqa: BLE001
            raise TypeError(f"make_vae: expected VAEConfig or a mapping, got {type(cfg).__name__}") from e
    return MotionVAE(VAEConfig.from_dict(cfg))


# ----------------------------------------------------------------------------------------------
# checkpoint


def save_vae(
    directory: str | Path,
    model: MotionVAE,
    normalizer: Normalizer,
    extra_meta: Mapping[str, Any] | None = None,
    extra_weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``model.safetensors``, ``normalizer.safetensors`` and ``meta.json`` (kind "vae", last)."""
    mean, std = np.asarray(normalizer.mean, np.float32), np.asarray(normalizer.std, np.float32)
    if mean.shape != (model.cfg.d_in,) or std.shape != (model.cfg.d_in,):
        raise ValueError(f"save_vae: normaliser mean/std must have shape ({model.cfg.d_in},), got {mean.shape}/{std.shape}")
    weights = {
        "model": model.state_dict(),
        "normalizer": {"mean": torch.from_numpy(mean), "std": torch.from_numpy(std)},
        **(extra_weights or {}),
    }
    meta = {"vae_format_version": VAE_FORMAT_VERSION, "vae_config": dataclasses.asdict(model.cfg), **(extra_meta or {})}
    return save_checkpoint(directory, VAE_KIND, weights, meta)


def legacy_settings(directory: str | Path) -> dict[str, tuple[Any, Any]]:
    """The settings a VAE checkpoint was trained with that this code's default would not reproduce because the
    checkpoint predates them: ``{field: (its value, today's default)}`` (empty for a checkpoint of this code)."""
    recorded = load_checkpoint_meta(directory, kind=VAE_KIND).get("vae_config") or {}
    today = dataclasses.asdict(VAEConfig.small())
    return {k: (v, today[k]) for k, v in LEGACY_DEFAULTS.items() if k not in recorded and v != today[k]}


def load_vae(directory: str | Path, device: str | torch.device = "cpu") -> tuple[MotionVAE, Normalizer, VAEConfig]:
    """Load a VAE checkpoint (eval mode) with its normaliser; :class:`CheckpointError` on mismatch."""
    meta = load_checkpoint_meta(directory, kind=VAE_KIND)
    where = Path(directory) / "meta.json"
    if meta.get("vae_format_version") != VAE_FORMAT_VERSION:
        raise CheckpointError(f"{where}: VAE format version {meta.get('vae_format_version')}, this code reads {VAE_FORMAT_VERSION} "
                              f"(retrain the VAE with train/vae.py)")
    try:
        cfg = VAEConfig.from_dict({**LEGACY_DEFAULTS, **meta["vae_config"]}, where=str(where))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad VAE config ({e})") from None
    if cfg.d_in != FLAME_DIM:
        raise CheckpointError(f"{where}: VAE has d_in={cfg.d_in} but the FLAME layout has {FLAME_DIM} channels")
    model = MotionVAE(cfg)
    try:
        model.load_state_dict(load_weights(directory, "model", "cpu"))
    except RuntimeError as e:
        raise CheckpointError(f"{Path(directory) / 'model.safetensors'} does not match the VAE config in {where}: {e}") from None
    nz = load_weights(directory, "normalizer", "cpu")
    if set(nz) != {"mean", "std"} or tuple(nz["mean"].shape) != (FLAME_DIM,) or tuple(nz["std"].shape) != (FLAME_DIM,):
        raise CheckpointError(f"{Path(directory) / 'normalizer.safetensors'}: expected mean/std of shape ({FLAME_DIM},)")
    normalizer = Normalizer(nz["mean"].numpy().astype(np.float32), nz["std"].numpy().astype(np.float32))
    return model.to(device).eval(), normalizer, cfg


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def per_group_report(
    model: MotionVAE,
    normalizer: Normalizer,
    windows_iterable: Iterable[Mapping[str, Any]],
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    min_frames: int = 10,
) -> dict[str, dict[str, float]]:
    """Reconstruction quality per FLAME group on held-out windows (posterior mean, raw FLAME units).

    ``windows_iterable`` yields dicts with ``actor_motion (T, 67)`` raw and ``actor_valid (6,)``
    (e.g. a ``DyadicWindows``). Per group, over windows where the group is valid:

    - ``rmse``: root mean square error of decoded vs original frames;
    - ``vel_std_ratio``: mean over (window, channel) of the std over time of the decoded frame
      differences, divided by the same for the original (1 = dynamics kept, < 1 = over-smoothed);
    - ``windows``: number of windows used;
    - ``listening_vel_std_ratio`` / ``speaking_vel_std_ratio`` (when the items carry ``listening`` /
      ``speaking (T,)`` masks, as ``DyadicWindows`` items do): the same ratio on the actor's listening /
      speaking frames only, over windows with at least ``min_frames`` of them. The turn matters: the
      listening motion is small and a VAE that keeps the whole window's dynamics can still smooth most
      of it away, which then caps every model decoded by it (the benchmark's reconstruction row).
    Groups valid in no window are left out.
    """
    model.eval()
    turns = ("listening", "speaking")
    acc = {g: {"se": 0.0, "n": 0, "vs_dec": 0.0, "vs_ref": 0.0, "windows": 0,
               **{f"{t}_{k}": 0.0 for t in turns for k in ("dec", "ref")}} for g in GROUP_NAMES}

    def flush(motion: list, valid: list, masks: dict[str, list]) -> None:
        x = torch.as_tensor(np.stack(motion), dtype=torch.float32, device=device)  # (B, T, 67)
        v = np.stack(valid).astype(bool)  # (B, 6)
        rec = normalizer.denormalize(model(normalizer.normalize(x), sample=False)["recon"])  # (B, T, 67)
        vs_dec = rec.diff(dim=1).std(dim=1, unbiased=False)  # (B, 67)
        vs_ref = x.diff(dim=1).std(dim=1, unbiased=False)  # (B, 67)
        se = (rec - x).pow(2).sum(dim=1)  # (B, 67)
        per_turn = {}
        for t, ms in masks.items():
            m = torch.as_tensor(np.stack(ms), dtype=torch.bool, device=device)  # (B, T)
            enough = m.sum(1) >= min_frames  # (B,)
            per_turn[t] = (velocity_std(rec, m), velocity_std(x, m), enough)  # (B, 67) x 2, (B,)
        for gi, g in enumerate(GROUP_NAMES):
            rows = torch.as_tensor(v[:, gi], device=device)
            if not rows.any():
                continue
            sl = GROUPS[g]
            a = acc[g]
            a["se"] += float(se[rows][:, sl].sum())
            a["n"] += int(rows.sum()) * x.shape[1] * (sl.stop - sl.start)
            a["vs_dec"] += float(vs_dec[rows][:, sl].sum())
            a["vs_ref"] += float(vs_ref[rows][:, sl].sum())
            a["windows"] += int(rows.sum())
            for t, (dec, ref, enough) in per_turn.items():
                r = rows & enough
                a[f"{t}_dec"] += float(dec[r][:, sl].sum())
                a[f"{t}_ref"] += float(ref[r][:, sl].sum())

    motion, valid, masks = [], [], {}
    for item in windows_iterable:
        motion.append(np.asarray(item["actor_motion"], np.float32))
        valid.append(np.asarray(item["actor_valid"], bool))
        for t in turns:
            if t in item:
                masks.setdefault(t, []).append(np.asarray(item[t], bool))
        if len(motion) == batch_size:
            flush(motion, valid, {t: m for t, m in masks.items() if len(m) == len(motion)})
            motion, valid, masks = [], [], {}
    if motion:
        flush(motion, valid, {t: m for t, m in masks.items() if len(m) == len(motion)})
    report = {}
    for g, a in acc.items():
        if a["windows"]:
            report[g] = {
                "rmse": math.sqrt(a["se"] / a["n"]),
                "vel_std_ratio": a["vs_dec"] / max(a["vs_ref"], 1e-12),
                "windows": a["windows"],
            }
            for t in turns:
                if a[f"{t}_ref"] > 0:
                    report[g][f"{t}_vel_std_ratio"] = a[f"{t}_dec"] / a[f"{t}_ref"]
    return report


def format_report(report: Mapping[str, Mapping[str, float]]) -> str:
    lines = [f"{'group':8s} {'rmse':>10s} {'vel_std_ratio':>14s} {'listening':>10s} {'speaking':>10s} {'windows':>8s}"]
    for g, r in report.items():
        turn = "".join(f" {r[k]:10.3f}" if k in r else f" {'n/a':>10s}" for k in ("listening_vel_std_ratio", "speaking_vel_std_ratio"))
        lines.append(f"{g:8s} {r['rmse']:10.5f} {r['vel_std_ratio']:14.3f}{turn} {r['windows']:8d}")
    return "\n".join(lines)


@torch.no_grad()
def latent_stats(model: MotionVAE, x: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dim mean and std of posterior means over normalised windows ``x (B, T, 67)``."""
    mus = torch.cat([model.encode(x[i : i + batch_size])[0] for i in range(0, x.shape[0], batch_size)])  # (B, N, Dv)
    flat = mus.reshape(-1, mus.shape[-1])
    return flat.mean(0), flat.std(0, unbiased=False).clamp(min=1e-6)


__all__ = [
    "VAEConfig", "MotionVAE", "make_vae", "save_vae", "load_vae", "legacy_settings", "LEGACY_DEFAULTS", "per_group_report", "format_report",
    "latent_stats", "local_velocity_std", "masked_mse", "kl_standard_normal", "channel_weight", "loss_channel_weights", "raw_channel_std",
]
