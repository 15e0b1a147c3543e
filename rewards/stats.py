"""Masked statistics over time, written once for rewards and evaluation metrics.

Conventions (every function in this module):

- Shapes: ``x`` is ``(B, T, C)`` (any number of leading batch dims is allowed: ``(..., T, C)``),
  ``mask`` is ``(B, T)`` (``(..., T)``), True = the frame counts. ``mask=None`` means every frame
  counts. A non-bool mask is read as ``mask != 0``. Statistics are over time, per channel, so a
  statistic of ``x`` is ``(B, C)``; a deviation between two sequences is ``(B,)``.
- Values at masked-out frames are never read (they may even be NaN/inf).
- ``masked_std`` is the *population* std (divide by n, not n - 1) over the valid frames.
- Velocity is the frame-to-frame difference ``x[t+1] - x[t]`` in units per frame (25 fps), and a
  velocity counts only where *both* of its frames are valid, so a gap in the mask (e.g. a
  speaking turn between two listening turns) never produces a jump.
- Degenerate cases have defined values, never NaN: with no valid frame, ``masked_mean`` is 0;
  with fewer than 2 valid frames (or fewer than 2 valid velocities for ``velocity_std``), the std
  is 0. Hence ``dynamic_deviation`` is 0 for a row with fewer than 2 valid velocities in both
  prediction and target. The gradient of the std at zero variance is 0, not NaN.
"""
from __future__ import annotations

import torch

__all__ = [
    "masked_mean",
    "masked_std",
    "frame_velocity",
    "velocity_std",
    "dynamic_deviation",
    "position_deviation",
]


def _check(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Validate shapes and return a bool mask ``(..., T)``."""
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError(f"stats: x must be a tensor (..., T, C), got {getattr(x, 'shape', type(x))}")
    if mask is None:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    if not torch.is_tensor(mask):
        mask = torch.as_tensor(mask, device=x.device)
    if mask.dtype != torch.bool:
        mask = mask != 0
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"stats: mask must have shape {tuple(x.shape[:-1])} (x without channels), "
                         f"got {tuple(mask.shape)}")
    return mask


def _zero_invalid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with masked-out frames set to 0 (``mask`` already checked)."""
    return torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x))


def _safe_sqrt(var: torch.Tensor) -> torch.Tensor:
    """sqrt that is exactly 0 (with gradient 0) where var <= 0."""
    pos = var > 0
    return torch.where(pos, torch.where(pos, var, torch.ones_like(var)).sqrt(), torch.zeros_like(var))


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over valid frames: ``(..., T, C), (..., T) -> (..., C)``; 0 when no frame is valid."""
    mask = _check(x, mask)
    n = mask.unsqueeze(-1).sum(-2).to(x.dtype)  # (..., 1)
    return _zero_invalid(x, mask).sum(-2) / n.clamp(min=1)


def masked_std(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Population std over valid frames: ``(..., T, C) -> (..., C)``; 0 with fewer than 2 valid frames."""
    mask = _check(x, mask)
    m = mask.unsqueeze(-1)  # (..., T, 1)
    n = m.sum(-2).to(x.dtype)  # (..., 1)
    x = _zero_invalid(x, mask)  # never read masked frames, not even through the gradient
    mu = masked_mean(x, mask).unsqueeze(-2)  # (..., 1, C)
    d2 = torch.where(m, (x - mu).square(), torch.zeros_like(x))
    var = d2.sum(-2) / n.clamp(min=1)  # (..., C)
    var = torch.where(n >= 2, var, torch.zeros_like(var))
    return _safe_sqrt(var)


def frame_velocity(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame differences ``(..., T, C) -> (v (..., T-1, C), vmask (..., T-1))``.

    ``v[t] = x[t+1] - x[t]`` (units per frame); ``vmask[t] = mask[t] & mask[t+1]``. Invalid
    velocities are set to 0. Applying it twice gives accelerations (valid over 3 valid frames).
    """
    mask = _check(x, mask)
    x = _zero_invalid(x, mask)
    vmask = mask[..., 1:] & mask[..., :-1]
    v = x[..., 1:, :] - x[..., :-1, :]
    v = torch.where(vmask.unsqueeze(-1), v, torch.zeros_like(v))
    return v, vmask


def velocity_std(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Population std over time of the valid frame velocities: ``(..., T, C) -> (..., C)``."""
    v, vmask = frame_velocity(x, mask)
    return masked_std(v, vmask)


def position_deviation(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_c |std_t(pred) - std_t(target)|``: ``(..., T, C) x 2 -> (...,)`` (std of positions)."""
    _check_pair(pred, target)
    return (masked_std(pred, mask) - masked_std(target, mask)).abs().mean(-1)


def dynamic_deviation(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic deviation (paper, supplementary metrics): ``mean_c |std_t(vel pred) - std_t(vel target)|``.

    ``(..., T, C) x 2, (..., T) -> (...,)``. The FDD/PDD/JDD metrics are this on the upper-face,
    head-pose and jaw channels; the velocity-variance reward term is this on one FLAME group.
    """
    _check_pair(pred, target)
    return (velocity_std(pred, mask) - velocity_std(target, mask)).abs().mean(-1)


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"stats: pred and target must have the same shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
