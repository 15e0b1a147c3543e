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

__all__ = ["JerkTerm", "LogPenaltyGroupReward"]


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


class LogPenaltyGroupReward(GroupReward):
    """``R = -log(1 + scale * sum_k w_k term_k)``: compresses large penalties (same constructor + kwarg)."""

    def __init__(self, group: str, terms, scale: float = 1.0):
        super().__init__(group, terms)
        if not scale > 0:
            raise ValueError(f"LogPenaltyGroupReward: scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, pred, target, mask):
        return -torch.log1p(-self.scale * super().forward(pred, target, mask))  # (B,)
