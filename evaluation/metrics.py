"""Evaluation metrics (paper section 4 and supplementary; docs/design.md section 8).

Inputs follow :mod:`.stats`: prediction and ground truth ``(B, T, 67)`` raw FLAME frames of ``B``
windows, a frame mask ``(B, T)`` selecting the frames of one split, and the per-group validity
``(B, 6)`` of the dataset. The two splits (paper, supplementary section 1) are

- **speaking** frames: the actor speaks (actor VAD);
- **listening** frames: the partner speaks and the actor is silent.

Both are stored in the window bank (``speaking``, ``listening``; ``envs/windows.py``).

Every metric returns a :class:`MetricResult` ``(value, n, note)``. A metric that cannot be
computed -- no frames in the split, no window with enough frames, every group invalid, no FLAME
model for a vertex metric -- has ``value=None`` and a note saying why (``null`` in JSON, "n/a" in
tables), never 0. Invalid FLAME groups (a source lacking them) are skipped, never scored as zeros.

Table 1 metrics (lower is better)
---------------------------------

Dynamic deviation, as the paper defines it: per window and channel, the absolute difference of
the standard deviations over time of the frame-to-frame velocities of prediction and ground
truth, ``|std_t(P[t+1]-P[t]) - std_t(G[t+1]-G[t])|`` (velocities only between two frames of the
split, :func:`.stats.velocity_std`), averaged over the valid channels of the window, then over
windows that have at least ``min_frames`` frames of the split (and 2 velocities). Reported
``x 1000`` (units: 1e-3 of the channel unit per frame; the paper does not state its scale).

- **FDD** (upper face): without a FLAME model, the upper-face *parameter* channels ``expr`` and
  ``eyelid`` (each counted when valid); with a FLAME model, the x, y, z coordinates (mm) of the
  upper-face vertices (``forehead`` + ``eye_region`` of the masks file).
- **PDD** (head pose): ``rot`` and ``neck`` channels (axis-angle, rad).
- **JDD** (jaw): ``jaw`` channels.

``convention="position"`` gives the ARTalk / UniLS convention instead: the std of the *positions*
(not velocities) over time, ``|std_t(P) - std_t(G)|``, reported ``x 100``, for comparison with
published numbers.

Vertex errors (speaking only; need a FLAME model, else unavailable), in millimetres, on
face-local geometry (global and neck rotation zeroed, as talking-head benchmarks do):

- **LVE**: per frame, the maximum over lip vertices of the L2 distance between predicted and
  ground-truth vertex; mean over the speaking frames of all windows.
- **MHD**: per frame, the mean over all head vertices of the L2 distance; mean over frames.

Supplementary (Table 6) metrics, per group (``exp`` = ``expr`` 50-d, ``jaw`` 3-d, ``pose`` = global
head rotation ``rot`` 3-d), following DualTalk's metric code. DualTalk computes each metric on one
*sequence* (one side of one conversation) and averages over sequences; here a sequence is the
frames of the split from all windows of one (conversation, actor) pair (``seq_ids``), or one
window when no ids are given. Sequences with fewer than ``min_frames`` frames are skipped.

- **FD**: Frechet distance between Gaussians fitted to the predicted and ground-truth frames
  (frames as samples): ``|mu_p - mu_g|^2 + tr(S_p + S_g - 2 (S_p S_g)^(1/2))``, ``np.cov``
  (unbiased) covariances, ``scipy.linalg.sqrtm``; a near-singular product is retried with
  ``1e-6 I`` added to both covariances, a negligible imaginary part is dropped.
- **P-FD**: the same on the frames concatenated with the partner's ground-truth frames of the
  group, ``FD([partner, gt], [partner, pred])`` (needs the partner's group; else skipped).
- **MSE**: mean over frames and channels of ``(P - G)^2``.
- **SID** (higher is better): k-means with ``k`` = 40 (exp) / 10 (jaw, pose) clusters fitted on the
  ground-truth frames of the sequence (k-means++ start, fixed seed), the predicted frames
  assigned to the nearest centre, and the entropy (bits) of that histogram. (DualTalk's script
  passes prediction and ground truth to its SID helper in swapped order, i.e. fits the clusters on
  the prediction; we follow the helper's documented intent, as in L2L / DIM.) Sequences with
  fewer than ``k`` distinct ground-truth frames are skipped.
- **rPCC**: ``|PCC(G, partner) - PCC(P, partner)|`` with the Pearson correlation of the flattened
  (frames x channels) arrays; skipped when a correlation is undefined (constant input).

Publication scaling (Table 6 / DualTalk): FD and P-FD ``jaw x 1000, pose x 100``; MSE
``exp x 10, jaw x 1000, pose x 100``; SID and rPCC unscaled.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from scipy import linalg

from ..envs.flame import GROUP_NAMES, GROUPS, channel_mask
from ..rewards.stats import masked_std, velocity_std

__all__ = [
    "MetricResult",
    "UPPER_FACE_GROUPS", "HEAD_POSE_GROUPS", "JAW_GROUPS", "DYNAMIC_METRICS",
    "DUALTALK_GROUPS", "SID_CLUSTERS", "PUBLICATION_SCALE", "DYNAMIC_SCALE",
    "group_channel_valid", "group_channels", "dynamic_std_rows",
    "deviation_from_stds", "dynamic_deviation_rows", "dynamic_metric", "vertex_dynamic_deviation_rows",
    "lve_rows", "mhd_rows", "frame_mean", "row_mean",
    "frechet_distance", "paired_frechet_distance", "mse", "sid", "rpcc", "kmeans",
    "collect_sequences", "dualtalk_metrics", "motion_std", "unavailable",
]

UPPER_FACE_GROUPS: tuple[str, ...] = ("expr", "eyelid")
HEAD_POSE_GROUPS: tuple[str, ...] = ("rot", "neck")
JAW_GROUPS: tuple[str, ...] = ("jaw",)
DYNAMIC_METRICS: dict[str, tuple[str, ...]] = {"FDD": UPPER_FACE_GROUPS, "PDD": HEAD_POSE_GROUPS, "JDD": JAW_GROUPS}
DYNAMIC_SCALE: dict[str, float] = {"velocity": 1000.0, "position": 100.0}

DUALTALK_GROUPS: dict[str, str] = {"exp": "expr", "jaw": "jaw", "pose": "rot"}
SID_CLUSTERS: dict[str, int] = {"exp": 40, "jaw": 10, "pose": 10}
PUBLICATION_SCALE: dict[str, dict[str, float]] = {
    "FD": {"exp": 1.0, "jaw": 1000.0, "pose": 100.0},
    "P-FD": {"exp": 1.0, "jaw": 1000.0, "pose": 100.0},
    "MSE": {"exp": 10.0, "jaw": 1000.0, "pose": 100.0},
    "SID": {"exp": 1.0, "jaw": 1.0, "pose": 1.0},
    "rPCC": {"exp": 1.0, "jaw": 1.0, "pose": 1.0},
}


@dataclass
class MetricResult:
    """One reported number: ``value`` (None = unavailable), ``n`` items it averages, a ``note``."""

    value: float | None
    n: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.value is not None

    def to_json(self) -> dict:
        d: dict[str, Any] = {"value": self.value, "n": self.n}
        if self.note:
            d["note"] = self.note
        if self.extra:
            d.update(self.extra)
        return d

    def fmt(self, digits: int = 2) -> str:
        return "n/a" if self.value is None else f"{self.value:.{digits}f}"


def unavailable(note: str) -> MetricResult:
    return MetricResult(None, 0, note)


def _bool(m: torch.Tensor) -> torch.Tensor:
    return m if m.dtype == torch.bool else m != 0


def group_channel_valid(valid: torch.Tensor | None, groups: Sequence[str], batch: int, device=None) -> torch.Tensor:
    """``(B, 6)`` group validity -> ``(B, C)`` validity of the channels of ``groups`` (in order)."""
    cols = torch.cat([torch.arange(GROUPS[g].start, GROUPS[g].stop) for g in groups])
    if valid is None:
        return torch.ones(batch, len(cols), dtype=torch.bool, device=device)
    cm = torch.as_tensor(channel_mask(_bool(valid).cpu().numpy()), device=valid.device)  # (B, 67)
    return cm[:, cols]


def group_channels(x: torch.Tensor, groups: Sequence[str]) -> torch.Tensor:
    """The channels of ``groups`` (in order) of ``(..., 67)`` frames."""
    return torch.cat([x[..., GROUPS[g]] for g in groups], -1)


# ----------------------------------------------------------------------------------------------
# dynamic deviation (FDD / PDD / JDD)


def dynamic_std_rows(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, convention: str = "velocity",
                     min_frames: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-window, per-channel stds a dynamic deviation compares: ``sp``, ``sg`` ``(B, C)`` of
    ``pred`` and ``target`` ``(B, T, C)`` over the frames of ``mask`` ``(B, T)`` (velocities for
    ``velocity``, positions for ``position``), and which windows have enough frames ``(B,)`` bool."""
    mask = _bool(mask)
    if convention == "velocity":
        sp, sg = velocity_std(pred, mask), velocity_std(target, mask)  # (B, C)
        n_vel = (mask[..., 1:] & mask[..., :-1]).sum(-1)
        enough = (mask.sum(-1) >= min_frames) & (n_vel >= 2)
    elif convention == "position":
        sp, sg = masked_std(pred, mask), masked_std(target, mask)  # (B, C)
        enough = mask.sum(-1) >= max(min_frames, 2)
    else:
        raise ValueError(f"dynamic deviation: convention must be 'velocity' (paper) or 'position' (ARTalk/UniLS), got {convention!r}")
    return sp, sg, enough


def dynamic_deviation_rows(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                           channel_valid: torch.Tensor | None = None, convention: str = "velocity",
                           min_frames: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window deviation ``(B,)`` (unscaled) and which windows count ``(B,)`` bool.

    ``pred``, ``target`` ``(B, T, C)``; ``mask`` ``(B, T)``; ``channel_valid`` ``(B, C)`` (None =
    all). ``velocity``: mean over valid channels of ``|velocity_std(P) - velocity_std(G)|`` (equal to
    :func:`.stats.dynamic_deviation` when every channel is valid); ``position``: the same with
    :func:`.stats.masked_std` of the positions. A window counts when it has ``>= min_frames``
    frames in ``mask`` (and >= 2 velocities), and at least one valid channel.
    """
    return deviation_from_stds(*dynamic_std_rows(pred, target, mask, convention, min_frames), channel_valid)


def deviation_from_stds(sp: torch.Tensor, sg: torch.Tensor, enough: torch.Tensor,
                        channel_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dynamic_deviation_rows` from the stds of :func:`dynamic_std_rows`: per window the mean
    over valid channels of ``|sp - sg|`` ``(B,)`` and which windows count ``(B,)`` bool."""
    dev = (sp - sg).abs()  # (B, C)
    cv = torch.ones_like(dev, dtype=torch.bool) if channel_valid is None else _bool(channel_valid).to(dev.device)
    n_c = cv.sum(-1)
    val = torch.where(cv, dev, torch.zeros_like(dev)).sum(-1) / n_c.clamp(min=1)
    return val, enough & (n_c > 0)


def row_mean(values: torch.Tensor, ok: torch.Tensor, scale: float = 1.0, what: str = "windows") -> MetricResult:
    """Mean of ``values[ok]`` times ``scale``; unavailable when no row is ok."""
    n = int(ok.sum())
    if n == 0:
        return unavailable(f"no {what}")
    return MetricResult(float(values[ok].double().mean()) * scale, n)


def dynamic_metric(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None,
                   groups: Sequence[str], convention: str = "velocity", min_frames: int = 10,
                   scale: float | None = None, split: str = "split") -> MetricResult:
    """FDD / PDD / JDD on parameter channels: ``(B, T, 67)`` frames, ``(B, T)`` mask, ``(B, 6)`` validity."""
    scale = DYNAMIC_SCALE[convention] if scale is None else scale
    mask = _bool(mask)
    if not mask.any():
        return unavailable(f"no {split} frames")
    cv = group_channel_valid(valid, groups, pred.shape[0], pred.device)
    val, ok = dynamic_deviation_rows(group_channels(pred, groups), group_channels(target, groups), mask, cv, convention, min_frames)
    if not cv.any():
        return unavailable(f"groups {'+'.join(groups)} invalid in every window")
    return row_mean(val, ok, scale, f"window with >= {min_frames} {split} frames and a valid {'/'.join(groups)} group")


def vertex_dynamic_deviation_rows(pred_v: torch.Tensor, target_v: torch.Tensor, mask: torch.Tensor,
                                  convention: str = "velocity", min_frames: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertex FDD per window: vertices ``(B, T, V_sub, 3)`` (mm) flattened to ``3 V_sub`` channels."""
    B, T = pred_v.shape[:2]
    return dynamic_deviation_rows(pred_v.reshape(B, T, -1), target_v.reshape(B, T, -1), mask, None, convention, min_frames)


# ----------------------------------------------------------------------------------------------
# vertex errors (LVE / MHD)


def lve_rows(pred_v: torch.Tensor, target_v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lip vertex error sums per window: vertices ``(B, T, V_lip, 3)`` -> (sum over masked frames of
    ``max_v ||P_v - G_v||``, number of masked frames), both ``(B,)``. Units follow the input."""
    mask = _bool(mask)
    d = (pred_v - target_v).norm(dim=-1).amax(-1)  # (B, T)
    return torch.where(mask, d, torch.zeros_like(d)).sum(-1), mask.sum(-1)


def mhd_rows(pred_v: torch.Tensor, target_v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean head distance sums per window: (sum over masked frames of ``mean_v ||P_v - G_v||``, frames)."""
    mask = _bool(mask)
    d = (pred_v - target_v).norm(dim=-1).mean(-1)  # (B, T)
    return torch.where(mask, d, torch.zeros_like(d)).sum(-1), mask.sum(-1)


def frame_mean(sums: torch.Tensor, counts: torch.Tensor, scale: float = 1.0, what: str = "frames") -> MetricResult:
    """Frame-weighted mean ``sum(sums) / sum(counts)`` (pooled over windows); unavailable with no frame."""
    n = int(counts.sum())
    if n == 0:
        return unavailable(f"no {what}")
    return MetricResult(float(sums.double().sum() / n) * scale, n)


# ----------------------------------------------------------------------------------------------
# DualTalk metrics (numpy, per sequence)


def frechet_distance(x: np.ndarray, y: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``x (N, C)`` and ``y (M, C)``."""
    x, y = np.atleast_2d(np.asarray(x, np.float64)), np.atleast_2d(np.asarray(y, np.float64))
    if x.shape[1] != y.shape[1] or len(x) < 2 or len(y) < 2:
        raise ValueError(f"frechet_distance: need >= 2 samples of the same dimension, got {x.shape} and {y.shape}")
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    with warnings.catch_warnings():  # a singular product (e.g. a constant channel) is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        complex_part = np.iscomplexobj(covmean) and np.abs(covmean.imag).max() > 1e-3 * max(1.0, np.abs(covmean.real).max())
        if not np.isfinite(covmean).all() or complex_part:
            off = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def paired_frechet_distance(pred: np.ndarray, target: np.ndarray, partner: np.ndarray) -> float:
    """P-FD: ``FD([partner, target], [partner, pred])`` on frames concatenated along channels."""
    return frechet_distance(np.concatenate([partner, target], -1), np.concatenate([partner, pred], -1))


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((np.asarray(pred, np.float64) - np.asarray(target, np.float64)) ** 2))


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ initialisation; deterministic given ``seed``. -> centres ``(k, C)``."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: need 1 <= k <= n samples, got k={k}, n={n}")
    centres = [x[rng.integers(n)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        tot = d2.sum()
        i = int(rng.choice(n, p=d2 / tot)) if tot > 0 else int(rng.integers(n))
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = np.stack(centres)
    for _ in range(iters):
        lab = _assign(x, c)
        new = c.copy()
        for j in range(k):
            sel = lab == j
            if sel.any():
                new[j] = x[sel].mean(0)
        if np.allclose(new, c):
            break
        c = new
    return c


def _assign(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]
    return d.argmin(1)


def sid(pred: np.ndarray, target: np.ndarray, k: int, seed: int = 0) -> float:
    """SI for diversity: entropy (bits) of the cluster histogram of ``pred`` frames under k-means
    clusters of ``target`` frames."""
    c = kmeans(target, k, seed)
    hist = np.bincount(_assign(np.asarray(pred, np.float64), c), minlength=k) / len(pred)
    nz = hist[hist > 0]
    return float(-(nz * np.log2(nz)).sum())


def rpcc(pred: np.ndarray, target: np.ndarray, partner: np.ndarray) -> float | None:
    """``|PCC(target, partner) - PCC(pred, partner)|`` on flattened arrays; None if undefined."""
    p, g, o = (np.asarray(a, np.float64).reshape(-1) for a in (pred, target, partner))
    if min(p.std(), g.std(), o.std()) < 1e-12:
        return None
    return float(abs(np.corrcoef(g, o)[0, 1] - np.corrcoef(p, o)[0, 1]))


def collect_sequences(mask: np.ndarray, rows: np.ndarray, seq_ids: Sequence | None) -> list[tuple[Any, np.ndarray, np.ndarray]]:
    """Group window rows into sequences: ``[(seq id, row indices, (row, frame) index pairs)]``."""
    B = mask.shape[0]
    ids = list(range(B)) if seq_ids is None else list(seq_ids)
    if len(ids) != B:
        raise ValueError(f"seq_ids has {len(ids)} entries for {B} windows")
    order: dict[Any, list[int]] = {}
    for b in range(B):
        if rows[b]:
            order.setdefault(ids[b], []).append(b)
    out = []
    for sid_, rs in order.items():
        rr, tt = np.nonzero(mask[rs])
        out.append((sid_, np.asarray(rs), np.stack([np.asarray(rs)[rr], tt], 1)))
    return out


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, np.float64)


def dualtalk_metrics(pred, target, mask, valid=None, partner=None, partner_valid=None, seq_ids: Sequence | None = None,
                     min_frames: int = 10, publication_scale: bool = True, seed: int = 0,
                     metrics: Iterable[str] = ("FD", "P-FD", "MSE", "SID", "rPCC"),
                     split: str = "split") -> dict[str, dict[str, MetricResult]]:
    """FD, P-FD, MSE, SID, rPCC per group ``exp / jaw / pose`` on the frames of ``mask``.

    pred, target, partner: ``(B, T, 67)``; mask ``(B, T)``; valid / partner_valid ``(B, 6)`` (None =
    all valid; ``partner=None`` makes P-FD and rPCC unavailable). Returns
    ``{metric: {group: MetricResult}}``; each value is the mean over sequences (``seq_ids``, see the
    module docstring) of the per-sequence metric, scaled for publication if asked.
    """
    P, G, M = _np(pred), _np(target), _np(mask).astype(bool)
    O = None if partner is None else _np(partner)
    B = P.shape[0]
    V = np.ones((B, len(GROUP_NAMES)), bool) if valid is None else _np(valid).astype(bool)
    PV = np.ones((B, len(GROUP_NAMES)), bool) if partner_valid is None else _np(partner_valid).astype(bool)
    out: dict[str, dict[str, MetricResult]] = {}
    for m_name in metrics:
        if m_name not in PUBLICATION_SCALE:
            raise ValueError(f"unknown DualTalk metric {m_name!r}; valid: {list(PUBLICATION_SCALE)}")
        out[m_name] = {}
        paired = m_name in ("P-FD", "rPCC")
        for short, gname in DUALTALK_GROUPS.items():
            gi, sl = GROUP_NAMES.index(gname), GROUPS[gname]
            if paired and O is None:
                out[m_name][short] = unavailable("no partner motion")
                continue
            if not M.any():
                out[m_name][short] = unavailable(f"no {split} frames")
                continue
            rows = V[:, gi] & PV[:, gi] if paired else V[:, gi]
            if not rows.any():
                out[m_name][short] = unavailable(f"group {gname} invalid{' for the partner' if paired else ''} in every window")
                continue
            vals, skipped = [], 0
            for _, _, idx in collect_sequences(M, rows, seq_ids):
                if len(idx) < max(min_frames, 2):
                    skipped += 1
                    continue
                p, g = P[idx[:, 0], idx[:, 1], sl], G[idx[:, 0], idx[:, 1], sl]
                o = None if O is None else O[idx[:, 0], idx[:, 1], sl]
                if m_name == "FD":
                    v = frechet_distance(p, g)
                elif m_name == "P-FD":
                    v = paired_frechet_distance(p, g, o)
                elif m_name == "MSE":
                    v = mse(p, g)
                elif m_name == "SID":
                    k = SID_CLUSTERS[short]
                    v = sid(p, g, k, seed) if len(np.unique(g, axis=0)) >= k else None
                else:  # rPCC
                    v = rpcc(p, g, o)
                if v is None:
                    skipped += 1
                else:
                    vals.append(v)
            note = f"{skipped} sequence(s) skipped (too few {split} frames or undefined)" if skipped else ""
            if vals:
                s = PUBLICATION_SCALE[m_name][short] if publication_scale else 1.0
                out[m_name][short] = MetricResult(float(np.mean(vals)) * s, len(vals), note)
            else:
                out[m_name][short] = unavailable(f"no sequence with >= {min_frames} {split} frames"
                                                 + (" and a defined value" if m_name in ("SID", "rPCC") else ""))
    return out


# ----------------------------------------------------------------------------------------------
# motion statistics for reports


def motion_std(x: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None, groups: Sequence[str],
               min_frames: int = 10) -> MetricResult:
    """Mean over windows (>= ``min_frames`` frames) and valid channels of ``std_t`` of ``x`` on ``mask``."""
    mask = _bool(mask)
    cv = group_channel_valid(valid, groups, x.shape[0], x.device)
    s = masked_std(group_channels(x, groups), mask)  # (B, C)
    n_c = cv.sum(-1)
    val = torch.where(cv, s, torch.zeros_like(s)).sum(-1) / n_c.clamp(min=1)
    ok = (mask.sum(-1) >= min_frames) & (n_c > 0)
    return row_mean(val, ok, 1.0, f"window with >= {min_frames} frames")


BAND_SIGMA = 2.0  # frames (0.08 s at 25 fps): the low band is the motion Gaussian-smoothed with this std


def band_split(x: torch.Tensor, sigma: float = BAND_SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T, C) -> (low, high)``: ``low`` = ``x`` Gaussian-filtered over time (std ``sigma`` frames,
    ``scipy.ndimage.gaussian_filter1d``), ``high = x - low``. The window is extended at both ends by
    point reflection (``2 x[0] - x[k]``), which keeps a linear trend in the low band up to the last
    frame (a mirror extension would bend it and leak the trend into the high band).

    A diagnostic, not a Table 1 metric: the velocity std of each band tells whether a policy's extra
    motion is slow (reactions, nods) or frame-to-frame (the jitter the paper calls an artifact, and
    the tracker noise a VAE with r = 8 cannot represent).
    """
    from scipy.ndimage import gaussian_filter1d

    a = x.detach().cpu().double().numpy()  # (B, T, C)
    T = a.shape[-2]
    k = min(int(math.ceil(4 * float(sigma))), T - 1)  # the filter's reach (scipy truncates at 4 sigma)
    head = 2 * a[..., :1, :] - a[..., k:0:-1, :]  # (B, k, C) point reflection about the first frame
    tail = 2 * a[..., -1:, :] - a[..., -2:-k - 2:-1, :]  # (B, k, C) ... and about the last
    smooth = gaussian_filter1d(np.concatenate([head, a, tail], axis=-2), float(sigma), axis=-2, mode="nearest")
    low = torch.as_tensor(smooth[..., k:k + T, :], dtype=x.dtype, device=x.device)
    return low, x - low


# ----------------------------------------------------------------------------------------------
# long-sequence stillness (paper 4.3): does motion decay over a long generation?


def segment_velocity_std(x: torch.Tensor, segment: int) -> torch.Tensor:
    """Velocity std per consecutive segment of ``segment`` frames: ``(B, T, C) -> (B, T // segment, C)``
    (a trailing partial segment is dropped)."""
    B, T, C = x.shape
    if segment < 3 or T < segment:
        raise ValueError(f"segment_velocity_std: need 3 <= segment <= T, got segment={segment}, T={T}")
    n = T // segment
    return velocity_std(x[:, : n * segment].reshape(B, n, segment, C))  # (B, n, C)


def stillness_profile(x: torch.Tensor, segment: int, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per FLAME group, the mean velocity std of each segment over rows and valid channels: ``{group: (n_seg,)}``."""
    vs = segment_velocity_std(x, segment)  # (B, n, 67)
    out = {}
    for gi, g in enumerate(GROUP_NAMES):
        rows = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if valid is None else valid[:, gi].bool()
        if rows.any():
            out[g] = vs[rows][..., GROUPS[g]].mean(dim=(0, 2))
    return out


def decay_ratio(profile: torch.Tensor, parts: int = 3) -> float:
    """Mean of the last ``1 / parts`` of a segment profile over the mean of its first: 1 = no decay, < 1 stiller at the end."""
    n = profile.shape[0]
    k = max(1, n // parts)
    first, last = profile[:k].mean(), profile[-k:].mean()
    return float(last / first) if first > 0 else float("nan")


# ----------------------------------------------------------------------------------------------
# paired comparison of two models on the same windows


def paired_bootstrap_ci(diff, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences ``(n,)`` and its percentile-bootstrap interval: ``(mean, low, high)``.

    An interval that excludes 0 means the change is measurable at that level on these windows.
    """
    d = _np(diff).astype(np.float64).reshape(-1)
    if d.size == 0 or not np.isfinite(d).all():
        raise ValueError(f"paired_bootstrap_ci: need a non-empty finite vector of differences, got {d.size} values")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap_ci: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(int(n_boot), d.size))].mean(1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(d.mean()), float(lo), float(hi)
