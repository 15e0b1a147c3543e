"""Examples of user extensions, plugged in by dotted path (also the README's example).

A term::

    build_reward("expr+rot", extra_terms={"jerk": {"target": "gdpo_listener.rewards.examples.JerkTerm",
                                                     "weight": 0.5}})

or from the command line ``python train/gdpo.py reward=expr+rot
+rewards.extra_terms.jerk.target=gdpo_listener.rewards.examples.JerkTerm +rewards.extra_terms.jerk.weight=0.5``. A group reward class::

    build_reward("jaw", group_reward="gdpo_listener.rewards.examples.LogPenaltyGroupReward")
"""
from __future__ import annotations

import torch

from .groups import GroupReward
from .stats import frame_velocity, masked_std
from .terms import RewardTerm

__all__ = ["JerkTerm", "PeakVelocityTerm", "LogPenaltyGroupReward"]


class JerkTerm(RewardTerm):
    """Jerkiness penalty ``mean_c |std_t(d2P[:, c]) - std_t(d2G[:, c])|``, ``d2`` = second difference.

    A second difference counts only where its three frames are valid (``frame_velocity`` twice).
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        def accel_std(x):
            v, vmask = frame_velocity(x, mask)  # (B, T-1, C)
            a, amask = frame_velocity(v, vmask)  # (B, T-2, C)
            return masked_std(a, amask)  # (B, C)

        return (accel_std(pred) - accel_std(target)).abs().mean(-1)  # (B,)


class PeakVelocityTerm(RewardTerm):
    """Burst penalty ``mean_c |max_s std_s(dP[:, c]) - max_s std_s(dG[:, c])|``: the strongest burst.

    ``s`` runs over sub-windows of ``frames`` velocities every ``hop`` frames; a sub-window counts when
    at least ``min_valid`` of its velocities are valid (else its std is 0). Where the velocity-variance
    term averages a burst (a laugh, a nod series) over the whole window, this one scores the
    strongest burst whatever its timing, so a rollout that starts one when the ground truth has one
    stands out within its group. Windows shorter than ``frames`` are one sub-window.
    """

    def __init__(self, frames: int = 25, hop: int = 5, min_valid: float = 0.5):
        super().__init__()
        if int(frames) < 2 or int(hop) < 1 or not 0 < float(min_valid) <= 1:
            raise ValueError(f"PeakVelocityTerm: need frames >= 2, hop >= 1, 0 < min_valid <= 1; got "
                             f"frames={frames}, hop={hop}, min_valid={min_valid}")
        self.frames, self.hop, self.min_valid = int(frames), int(hop), float(min_valid)

    def peak(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, C)
        v, vmask = frame_velocity(x, mask)  # (B, T-1, C), (B, T-1)
        n = min(self.frames, v.shape[-2])
        vs = v.unfold(-2, n, self.hop).transpose(-1, -2)  # (B, S, n, C)
        ms = vmask.unfold(-1, n, self.hop)  # (B, S, n)
        std = masked_std(vs, ms)  # (B, S, C)
        ok = ms.sum(-1) >= self.min_valid * n  # (B, S)
        return torch.where(ok.unsqueeze(-1), std, torch.zeros_like(std)).amax(-2)  # (B, C)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (self.peak(pred, mask) - self.peak(target, mask)).abs().mean(-1)  # (B,)


class LogPenaltyGroupReward(GroupReward):
    """``R = -log(1 + scale * sum_k w_k term_k)``: compresses large penalties (same constructor + kwarg)."""

    def __init__(self, group: str, terms, scale: float = 1.0):
        super().__init__(group, terms)
        if not scale > 0:
            raise ValueError(f"LogPenaltyGroupReward: scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, pred, target, mask):
        return -torch.log1p(-self.scale * super().forward(pred, target, mask))  # (B,)
