"""Group-relative advantages: GDPO (paper eq. 8-9) and the GRPO baseline. Pure functions.

Inputs: ``rewards (B, n)``, one column per rewarded FLAME group (``FlameReward`` output);
``group_ids (B,)`` integer, rollouts with the same id were generated from the same prompt (any
values, any order: ids need not be contiguous or sorted); ``lambdas (n,)`` per-group weights.

GDPO (decoupled)::

    A_i^j = (R_i^j - mean_k R_i^k) / (std_k R_i^k + eps)          per reward i, within the prompt (eq. 8)
    A^j   = sum_i lambda_i A_i^j / (sum_i lambda_i + eps0)                                       (eq. 9)

GRPO (baseline)::

    R^j = sum_i lambda_i R_i^j;   A^j = (R^j - mean_k R^k) / (std_k R^k + eps)

Conventions: std is the *unbiased* one (divide by G - 1), so every prompt needs >= 2 rollouts;
a reward that is identical over a prompt's rollouts (zero std, decided exactly by max == min)
gives exactly 0 advantage, never NaN; ``whiten=True`` then standardises the final advantages
over the whole batch, ``(A - mean_batch) / (std_batch + eps)`` (unbiased std), as the reference
GDPO code and TRL's ``normalize_then_sum`` do. Whitening removes the ``1 / (sum lambda + eps0)``
scale of eq. 9, so for GDPO we whiten the weighted sum ``sum_i lambda_i A_i`` itself (exactly the
reference code; ``eps`` then acts at the natural scale of the advantages, and dividing first would
only change the result through ``eps``, by about 1e-4 relative).
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "group_normalize",
    "gdpo_advantages",
    "grpo_advantages",
    "whiten_advantages",
    "compute_advantages",
    "advantage_stats",
]


def _check_eps(name: str, eps: float) -> float:
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {eps}")
    return eps


def _check_rewards(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate; return rewards as floating ``(B, n)`` and group ids ``(B,)``."""
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if rewards.dim() == 1:
        rewards = rewards.unsqueeze(-1)
    if rewards.dim() != 2 or rewards.shape[0] == 0 or rewards.shape[1] == 0:
        raise ValueError(f"rewards must be (B, n_rewards) with B, n > 0, got {tuple(rewards.shape)}")
    group_ids = torch.as_tensor(group_ids, device=rewards.device)
    if group_ids.shape != rewards.shape[:1]:
        raise ValueError(f"group_ids must be ({rewards.shape[0]},) like the rewards' rows, got {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    finite = torch.isfinite(rewards)
    if not finite.all():
        bad = (~finite).nonzero()[:5].tolist()
        raise ValueError(f"rewards contain NaN/inf at (row, reward) {bad}"
                         f"{' ...' if (~finite).sum() > 5 else ''}; fix the reward before computing advantages")
    return rewards, group_ids


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor):
    """Per prompt group: ``inv (B,)`` row -> group, ``counts (G,)``, ``mean, std, const (G, n)``.

    ``const`` is True where the reward is identical over the group's rollouts (exact test).
    """
    uniq, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        small = uniq[counts < 2][:5].tolist()
        raise ValueError(f"every prompt group needs >= 2 rollouts for a group-relative std; "
                         f"group ids with a single rollout: {small}")
    G, n = counts.shape[0], rewards.shape[1]
    cnt = counts.to(rewards.dtype).unsqueeze(-1)  # (G, 1)
    mean = rewards.new_zeros(G, n).index_add_(0, inv, rewards) / cnt  # (G, n)
    dev = rewards - mean[inv]  # (B, n)
    var = rewards.new_zeros(G, n).index_add_(0, inv, dev.square()) / (cnt - 1)  # unbiased
    idx = inv.unsqueeze(-1).expand_as(rewards)
    gmax = rewards.new_zeros(G, n).scatter_reduce(0, idx, rewards, "amax", include_self=False)
    gmin = rewards.new_zeros(G, n).scatter_reduce(0, idx, rewards, "amin", include_self=False)
    const = gmax == gmin
    std = torch.where(const, torch.zeros_like(var), var.clamp(min=0).sqrt())
    return inv, counts, mean, std, const


def group_normalize(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(R - mean_group) / (std_group + eps)`` per column; exactly 0 where a group's column is constant.

    ``(B,)`` or ``(B, n)`` -> same shape.
    """
    eps = _check_eps("eps", eps)
    squeeze = torch.as_tensor(rewards).dim() == 1
    rewards, group_ids = _check_rewards(rewards, group_ids)
    inv, _, mean, std, const = _group_stats(rewards, group_ids)
    a = (rewards - mean[inv]) / (std[inv] + eps)  # (B, n)
    a = torch.where(const[inv], torch.zeros_like(a), a)
    return a.squeeze(-1) if squeeze else a


def _check_lambdas(lambdas, n: int, like: torch.Tensor) -> torch.Tensor:
    lam = torch.as_tensor(lambdas, dtype=like.dtype, device=like.device).reshape(-1)
    if lam.shape != (n,):
        raise ValueError(f"lambdas must have one entry per reward column ({n}), got shape {tuple(lam.shape)}")
    if not torch.isfinite(lam).all() or (lam < 0).any():
        raise ValueError(f"lambdas must be finite and >= 0, got {lam.tolist()}")
    if (lam == 0).all():
        raise ValueError(f"lambdas must not all be zero, got {lam.tolist()}")
    return lam


def whiten_advantages(advantages: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Batch whitening ``(A - mean) / (std + eps)``, unbiased std; all-equal ``A`` -> zeros."""
    eps = _check_eps("eps", eps)
    a = torch.as_tensor(advantages)
    if a.dim() != 1 or a.shape[0] < 2:
        raise ValueError(f"whitening needs advantages (B,) with B >= 2, got {tuple(a.shape)}")
    if a.max() == a.min():
        return torch.zeros_like(a)
    return (a - a.mean()) / (a.std(unbiased=True) + eps)


def gdpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, lambdas, eps: float = 1e-4,
                    eps0: float = 1e-4, whiten: bool = False) -> torch.Tensor:
    """GDPO advantage (eq. 8-9): normalise each reward within its prompt group, then weighted sum.

    rewards (B, n), group_ids (B,) int, lambdas (n,) -> (B,).
    """
    eps0 = _check_eps("eps0", eps0)
    a_i = group_normalize(rewards, group_ids, eps)  # (B, n), validates
    if a_i.dim() == 1:
        a_i = a_i.unsqueeze(-1)
    lam = _check_lambdas(lambdas, a_i.shape[1], a_i)
    a = (a_i * lam).sum(-1)  # (B,) weighted sum, eq. 9 numerator
    if whiten:  # scale-invariant: whiten the sum at its natural scale, as the reference GDPO code does
        return whiten_advantages(a, eps)
    return a / (lam.sum() + eps0)  # eq. 9


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, lambdas, eps: float = 1e-4,
                    whiten: bool = False) -> torch.Tensor:
    """GRPO baseline: ``R = sum_i lambda_i R_i`` then normalise within the prompt group. -> (B,)."""
    rewards, group_ids = _check_rewards(rewards, group_ids)
    lam = _check_lambdas(lambdas, rewards.shape[1], rewards)
    a = group_normalize((rewards * lam).sum(-1), group_ids, eps)  # (B,)
    return whiten_advantages(a, eps) if whiten else a


def compute_advantages(algo: str, rewards: torch.Tensor, group_ids: torch.Tensor, lambdas, eps: float = 1e-4,
                       eps0: float = 1e-4, whiten: bool = False) -> torch.Tensor:
    """Dispatch on ``algo`` in {"gdpo", "grpo"} (``eps0`` is used by GDPO only)."""
    if algo == "gdpo":
        return gdpo_advantages(rewards, group_ids, lambdas, eps=eps, eps0=eps0, whiten=whiten)
    if algo == "grpo":
        return grpo_advantages(rewards, group_ids, lambdas, eps=eps, whiten=whiten)
    raise ValueError(f"unknown advantage algorithm {algo!r}; choose 'gdpo' or 'grpo'")


def advantage_stats(rewards: torch.Tensor, group_ids: torch.Tensor,
                    advantages: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Diagnostics as tensors (the logger converts; no host sync here).

    Per reward column, shape ``(n,)``: ``frac_zero_std`` (fraction of prompt groups where that
    reward is constant, so it gives no signal), ``group_std_mean`` (mean within-group std),
    ``reward_mean``, ``reward_std`` (over the batch). Scalars: ``frac_all_zero_std`` (prompt
    groups where every reward is constant: zero GDPO advantage), ``n_groups``. With
    ``advantages (B,)``: ``adv_mean``, ``adv_std``, ``adv_abs_max``, ``frac_zero_adv``.
    """
    rewards, group_ids = _check_rewards(rewards, group_ids)
    _, counts, _, std, const = _group_stats(rewards, group_ids)
    out = {
        "frac_zero_std": const.to(rewards.dtype).mean(0),
        "frac_all_zero_std": const.all(-1).to(rewards.dtype).mean(),
        "group_std_mean": std.mean(0),
        "reward_mean": rewards.mean(0),
        "reward_std": rewards.std(0, unbiased=True),
        "n_groups": torch.tensor(counts.shape[0], device=rewards.device),
    }
    if advantages is not None:
        a = torch.as_tensor(advantages).reshape(-1).to(rewards.dtype)
        out.update(adv_mean=a.mean(), adv_std=a.std(unbiased=True) if a.numel() > 1 else torch.zeros_like(a.mean()),
                   adv_abs_max=a.abs().max(), frac_zero_adv=(a == 0).to(a.dtype).mean())
    return out
