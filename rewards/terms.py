"""Reward terms: penalties comparing a predicted and a ground-truth motion on one FLAME group.

Every term is an ``nn.Module`` with ONE signature::

    forward(pred (B, T, C), target (B, T, C), mask (B, T) bool) -> (B,)   # penalty >= 0, lower is better

``C`` is the channel count of the group being scored (the caller slices the group), ``mask``
marks the frames that count (the actor's listening frames). Statistics are over time per
channel and then averaged over channels (docs/design.md section 6), built on :mod:`.stats`, so the
degenerate cases are defined: no valid frame -> 0, fewer than 2 valid frames -> std 0.

Your own term: subclass :class:`RewardTerm` (or write any ``nn.Module`` with the same
signature) and plug it in by dotted path, see ``build_reward(extra_terms=...)`` in
:mod:`.groups` and :class:`.examples.JerkTerm`.
"""
from __future__ import annotations

import torch
from torch import nn

from .stats import _check, _check_pair, _zero_invalid, dynamic_deviation, masked_mean, position_deviation

__all__ = ["RewardTerm", "VarianceTerm", "VelocityVarianceTerm", "MeanDriftTerm", "MSETerm"]


class RewardTerm(nn.Module):
    """Base class documenting the term signature; a penalty per rollout.

    Subclasses implement ``forward(pred (B,T,C), target (B,T,C), mask (B,T) bool) -> (B,)``.
    The value must be finite; it should be >= 0 (the group reward is ``-sum w * term``).
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B,)
        raise NotImplementedError(f"{type(self).__name__} must implement forward(pred, target, mask) -> (B,)")


class VarianceTerm(RewardTerm):
    """Positional variance penalty ``mean_c |std_t(P[:, c]) - std_t(G[:, c])|`` (motion amplitude)."""

    def forward(self, pred, target, mask):
        return position_deviation(pred, target, mask)  # (B,)


class VelocityVarianceTerm(RewardTerm):
    """Velocity variance penalty ``mean_c |std_t(dP[:, c]) - std_t(dG[:, c])|``, ``d`` = frame difference.

    A velocity counts only where both of its frames are valid (the dynamic deviation of the metrics).
    """

    def forward(self, pred, target, mask):
        return dynamic_deviation(pred, target, mask)  # (B,)


class MeanDriftTerm(RewardTerm):
    """Mean-drift penalty ``mean_c |mean_t(P[:, c]) - mean_t(G[:, c])|`` (global drift of the pose)."""

    def forward(self, pred, target, mask):
        _check_pair(pred, target)
        return (masked_mean(pred, mask) - masked_mean(target, mask)).abs().mean(-1)  # (B,)


class MSETerm(RewardTerm):
    """``mean_{t,c} (P - G)^2`` over the valid frames ``t`` and all channels ``c``; 0 without valid frame."""

    def forward(self, pred, target, mask):
        _check_pair(pred, target)
        mask = _check(pred, mask)
        d2 = _zero_invalid(pred - target, mask).square()  # (B, T, C)
        n = mask.sum(-1).to(pred.dtype) * pred.shape[-1]  # (B,) valid (t, c) pairs
        return d2.sum((-2, -1)) / n.clamp(min=1)
