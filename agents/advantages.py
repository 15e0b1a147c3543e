"""Group-relative advantages: GDPO (paper eq. 8-9) and the GRPO baseline, and their diagnostics. Pure functions.

Inputs: ``rewards (B, n)``, one column per rewarded FLAME group (``FlameReward`` output);
``group_ids (B,)`` integer, rollouts with the same id were generated from the same prompt (any
values, any order: ids need not be contiguous or sorted); ``lambdas (n,)`` per-group weights.

GDPO (decoupled)::

    A_i^j = (R_i^j - mean_k R_i^k) / (std_k R_i^k + eps_i)        per reward i, within the prompt (eq. 8)
    A^j   = sum_i lambda_i A_i^j / (sum_i lambda_i + eps0)                                       (eq. 9)

GRPO (baseline)::

    R^j = sum_i lambda_i R_i^j;   A^j = (R^j - mean_k R^k) / (std_k R^k + eps)

Conventions (written once, used by every function below):

- std is the *unbiased* one (divide by G - 1), so every prompt needs >= 2 rollouts;
- a reward that is identical over a prompt's rollouts (zero std, decided exactly by max == min)
  gives exactly 0 advantage, never NaN;
- ``eps_mode`` decides what the denominator constant ``eps_i`` of a normalised column is
  (:func:`effective_eps`):

  * ``"relative"`` (default, scale-free): ``eps_i = eps * s_i + u_i`` with ``s_i`` the column's
    mean within-group std over the batch's prompt groups and ``u_i = finfo.eps * max_j |R_i^j|``
    the column's float resolution (spreads below it are rounding noise). Both scale with the
    reward, so multiplying a reward by any c > 0 leaves its advantages unchanged: a reward's
    influence no longer depends on its raw units;
  * ``"absolute"`` (the reference GDPO code): ``eps_i = eps``. A reward whose within-group std is
    near ``eps`` (FLAME-unit rewards are often ~1e-4) is damped, one far below it is ignored.

- ``scale`` (optional, ``(n,)``) replaces the per-prompt std of eq. 8 by one spread per reward column
  shared by every prompt: ``A_i^j = (R_i^j - mean_k R_i^k) / (scale_i + eps_i)``. Each column stays
  scale-free (its advantages are unchanged when the reward is multiplied by c > 0 and ``scale`` with
  it), but a prompt whose rollouts differ more in a reward gets larger advantages for it, where eq. 8
  gives every prompt unit spread however little its rollouts differ (the per-prompt std bias of
  Dr. GRPO, Liu et al. 2025; REINFORCE++ normalises by the batch instead). :func:`pooled_group_var`
  is the batch's pooled within-prompt variance; the loss (``std_scope``) passes its square root
  (``"batch"``) or a running average of it over iterations (``"running"``);
- ``whiten=True`` then standardises the final advantages over the whole batch,
  ``(A - mean_batch) / (std_batch + eps_w)`` (unbiased std; ``eps_w`` by the same ``eps_mode``), as
  the reference GDPO code and TRL's ``normalize_then_sum`` do. Whitening removes the
  ``1 / (sum lambda + eps0)`` scale of eq. 9, so for GDPO we whiten the weighted sum
  ``sum_i lambda_i A_i`` itself (exactly the reference code; dividing first would only change the
  result through ``eps``, by about 1e-4 relative).
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "EPS_MODES",
    "STD_SCOPES",
    "advantage_diagnostics",
    "compute_advantages",
    "distinct_per_group",
    "effective_eps",
    "gdpo_advantages",
    "group_normalize",
    "grpo_advantages",
    "pooled_group_var",
    "reward_group_stats",
    "whiten_advantages",
    "within_group_zscores",
]

EPS_MODES = ("relative", "absolute")
STD_SCOPES = ("group", "batch", "running")  # the spread eq. 8 divides by: the prompt's, the batch's, a running one


def _check_eps(name: str, eps: float) -> float:
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {eps}")
    return eps


def _check_eps_mode(eps_mode: str) -> str:
    if eps_mode not in EPS_MODES:
        raise ValueError(f"eps_mode must be one of {EPS_MODES}, got {eps_mode!r}")
    return eps_mode


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
    var = rewards.new_zeros(G, n).index_add_(0, inv, dev.square()) / (cnt - 1)  # (G, n) unbiased
    idx = inv.unsqueeze(-1).expand_as(rewards)  # (B, n)
    gmax = rewards.new_zeros(G, n).scatter_reduce(0, idx, rewards, "amax", include_self=False)  # (G, n)
    gmin = rewards.new_zeros(G, n).scatter_reduce(0, idx, rewards, "amin", include_self=False)  # (G, n)
    const = gmax == gmin
    std = torch.where(const, torch.zeros_like(var), var.clamp(min=0).sqrt())  # (G, n)
    return inv, counts, mean, std, const


def effective_eps(rewards: torch.Tensor, group_std: torch.Tensor, eps: float, eps_mode: str) -> torch.Tensor:
    """The denominator constant ``eps_i`` of every column, ``(n,)`` (module docstring, ``eps_mode``).

    rewards (B, n), group_std (G, n) the within-group stds of :func:`_group_stats`.
    """
    eps = _check_eps("eps", eps)
    if _check_eps_mode(eps_mode) == "absolute":
        return rewards.new_full(rewards.shape[1:], eps)  # (n,)
    scale = group_std.mean(0)  # (n,) the column's typical within-group spread
    resolution = torch.finfo(rewards.dtype).eps * rewards.abs().amax(0)  # (n,)
    return eps * scale + resolution


def group_normalize(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4,
                    eps_mode: str = "relative", scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(R - mean_group) / (std_group + eps_i)`` per column; exactly 0 where a group's column is constant.

    ``scale (n,)``: divide by ``scale + eps_i`` instead of each group's own std (module docstring).
    ``(B,)`` or ``(B, n)`` -> same shape.
    """
    squeeze = torch.as_tensor(rewards).dim() == 1
    rewards, group_ids = _check_rewards(rewards, group_ids)
    inv, _, mean, std, const = _group_stats(rewards, group_ids)
    if scale is None:
        eps_i = effective_eps(rewards, std, eps, eps_mode)  # (n,)
        den = std[inv] + eps_i  # (B, n)
    else:
        scale = _check_scale(scale, rewards)  # (n,)
        eps_i = effective_eps(rewards, scale.unsqueeze(0), eps, eps_mode)  # (n,)
        den = (scale + eps_i).expand_as(rewards)  # (B, n)
    a = (rewards - mean[inv]) / den  # (B, n)
    a = torch.where(const[inv] | (den == 0), torch.zeros_like(a), a)
    return a.squeeze(-1) if squeeze else a


def _check_scale(scale, rewards: torch.Tensor) -> torch.Tensor:
    scale = torch.as_tensor(scale, dtype=rewards.dtype, device=rewards.device).reshape(-1)
    if scale.shape != rewards.shape[1:]:
        raise ValueError(f"scale must have one entry per reward column ({rewards.shape[1]}), got shape {tuple(scale.shape)}")
    if not torch.isfinite(scale).all() or (scale < 0).any():
        raise ValueError(f"scale must be finite and >= 0, got {scale.tolist()}")
    return scale


def pooled_group_var(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """The batch's pooled within-prompt variance per column, ``(n,)``: the mean over prompt groups of the
    unbiased within-group variance (constant groups count as 0). ``(B,)`` or ``(B, n)`` rewards."""
    rewards, group_ids = _check_rewards(rewards, group_ids)
    _, _, _, std, _ = _group_stats(rewards, group_ids)
    return std.square().mean(0)  # (n,)


def _check_lambdas(lambdas, n: int, like: torch.Tensor) -> torch.Tensor:
    lam = torch.as_tensor(lambdas, dtype=like.dtype, device=like.device).reshape(-1)
    if lam.shape != (n,):
        raise ValueError(f"lambdas must have one entry per reward column ({n}), got shape {tuple(lam.shape)}")
    if not torch.isfinite(lam).all() or (lam < 0).any():
        raise ValueError(f"lambdas must be finite and >= 0, got {lam.tolist()}")
    if (lam == 0).all():
        raise ValueError(f"lambdas must not all be zero, got {lam.tolist()}")
    return lam


def whiten_advantages(advantages: torch.Tensor, eps: float = 1e-4, eps_mode: str = "relative") -> torch.Tensor:
    """Batch whitening ``(A - mean) / (std + eps_w)``, unbiased std; all-equal ``A`` -> zeros.

    ``eps_w = eps`` (absolute) or ``eps * std + finfo.eps * max |A|`` (relative).
    """
    eps = _check_eps("eps", eps)
    _check_eps_mode(eps_mode)
    a = torch.as_tensor(advantages)
    if a.dim() != 1 or a.shape[0] < 2:
        raise ValueError(f"whitening needs advantages (B,) with B >= 2, got {tuple(a.shape)}")
    if a.max() == a.min():
        return torch.zeros_like(a)
    std = a.std(unbiased=True)
    if eps_mode == "absolute":
        return (a - a.mean()) / (std + eps)
    return (a - a.mean()) / (std * (1 + eps) + torch.finfo(a.dtype).eps * a.abs().max())


def gdpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, lambdas, eps: float = 1e-4,
                    eps0: float = 1e-4, whiten: bool = False, eps_mode: str = "relative",
                    scale: torch.Tensor | None = None) -> torch.Tensor:
    """GDPO advantage (eq. 8-9): normalise each reward within its prompt group, then weighted sum.

    rewards (B, n), group_ids (B,) int, lambdas (n,), scale (n,) or None (eq. 8's per-prompt std) -> (B,).
    """
    eps0 = _check_eps("eps0", eps0)
    a_i = group_normalize(rewards, group_ids, eps, eps_mode, scale)  # (B, n), validates
    if a_i.dim() == 1:
        a_i = a_i.unsqueeze(-1)
    lam = _check_lambdas(lambdas, a_i.shape[1], a_i)
    a = (a_i * lam).sum(-1)  # (B,) weighted sum, eq. 9 numerator
    if whiten:  # scale-invariant: whiten the sum at its natural scale, as the reference GDPO code does
        return whiten_advantages(a, eps, eps_mode)
    return a / (lam.sum() + eps0)  # eq. 9


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, lambdas, eps: float = 1e-4,
                    whiten: bool = False, eps_mode: str = "relative", scale: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO baseline: ``R = sum_i lambda_i R_i`` then normalise within the prompt group. -> (B,).

    ``scale (1,)``: the summed reward's shared spread instead of each prompt's std (module docstring)."""
    rewards, group_ids = _check_rewards(rewards, group_ids)
    lam = _check_lambdas(lambdas, rewards.shape[1], rewards)
    a = group_normalize((rewards * lam).sum(-1, keepdim=True), group_ids, eps, eps_mode, scale).squeeze(-1)  # (B,)
    return whiten_advantages(a, eps, eps_mode) if whiten else a


def compute_advantages(algo: str, rewards: torch.Tensor, group_ids: torch.Tensor, lambdas, eps: float = 1e-4,
                       eps0: float = 1e-4, whiten: bool = False, eps_mode: str = "relative",
                       scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch on ``algo`` in {"gdpo", "grpo"} (``eps0`` is used by GDPO only)."""
    if algo == "gdpo":
        return gdpo_advantages(rewards, group_ids, lambdas, eps=eps, eps0=eps0, whiten=whiten, eps_mode=eps_mode,
                               scale=scale)
    if algo == "grpo":
        return grpo_advantages(rewards, group_ids, lambdas, eps=eps, whiten=whiten, eps_mode=eps_mode, scale=scale)
    raise ValueError(f"unknown advantage algorithm {algo!r}; choose 'gdpo' or 'grpo'")


# ----------------------------------------------------------------------------------------------
# Diagnostics (tensors; the logger converts, no host sync here)


def reward_group_stats(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4,
                       eps_mode: str = "relative") -> dict[str, torch.Tensor]:
    """What the per-reward group normalisation (eq. 8) sees in a batch.

    Per reward column, shape ``(n,)``: ``frac_zero_std`` (fraction of prompt groups where the
    reward is constant: no signal), ``frac_std_below_eps`` (fraction of prompt groups whose
    within-group std is below the effective ``eps_i``, constant groups included: the reward is
    damped there by more than half), ``eps_effective`` (``eps_i``), ``group_std_mean`` (mean
    within-group std), ``reward_mean``, ``reward_std`` (over the batch). Scalars:
    ``frac_all_zero_std`` (prompt groups where every reward is constant: zero GDPO advantage),
    ``n_groups``. For GRPO, pass the weighted sum ``(B, 1)`` to see what its normalisation sees.
    """
    rewards, group_ids = _check_rewards(rewards, group_ids)
    _, counts, _, std, const = _group_stats(rewards, group_ids)
    eps_i = effective_eps(rewards, std, eps, eps_mode)  # (n,)
    return {
        "frac_zero_std": const.to(rewards.dtype).mean(0),
        "frac_std_below_eps": (std < eps_i).to(rewards.dtype).mean(0),
        "eps_effective": eps_i,
        "frac_all_zero_std": const.all(-1).to(rewards.dtype).mean(),
        "group_std_mean": std.mean(0),
        "reward_mean": rewards.mean(0),
        "reward_std": rewards.std(0, unbiased=True) if rewards.shape[0] > 1 else torch.zeros_like(rewards[0]),
        "n_groups": torch.tensor(counts.shape[0], device=rewards.device),
    }


def within_group_zscores(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Eps-free within-group z-scores ``(R - mean_group) / std_group``, 0 where constant. (B, n) -> (B, n)."""
    return group_normalize(rewards, group_ids, eps=0.0, eps_mode="absolute")


def distinct_per_group(values: torch.Tensor, group_ids: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Number of distinct values within each prompt group, ``(G,)`` (groups in sorted-id order).

    Two values are distinct when they differ by more than ``rtol * max |values|`` (float noise
    of equal advantages is not counted). The GDPO paper's collapse figure: GRPO maps different
    reward vectors with the same sum to one advantage, so it has fewer distinct values.
    """
    values = torch.as_tensor(values).reshape(-1)
    group_ids = torch.as_tensor(group_ids, device=values.device).reshape(-1)
    if values.shape != group_ids.shape or values.numel() == 0:
        raise ValueError(f"values {tuple(values.shape)} and group_ids {tuple(group_ids.shape)} must be equal, non-empty (B,)")
    _, inv = torch.unique(group_ids, return_inverse=True)
    tol = rtol * values.abs().max()
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(inv[order], stable=True)]  # by group, then by value
    v, g = values[order], inv[order]  # (B,), (B,)
    new = torch.ones_like(v, dtype=torch.bool)  # first value of its group, or a gap above tol
    new[1:] = (g[1:] != g[:-1]) | (v[1:] - v[:-1] > tol)
    return torch.zeros(int(inv.max()) + 1, dtype=torch.long, device=v.device).index_add_(0, g, new.long())


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of ``a (B,)`` with every column of ``b (B, n)`` -> ``(n,)``; 0 where a side is constant."""
    da, db = a - a.mean(), b - b.mean(0)  # (B,), (B, n)
    den = (da.square().sum() * db.square().sum(0)).sqrt()  # (n,)
    num = (da.unsqueeze(-1) * db).sum(0)  # (n,)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def advantage_diagnostics(advantages: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor,
                          rtol: float = 1e-5) -> dict[str, torch.Tensor]:
    """The final advantage ``(B,)`` against the rewards ``(B, n)`` it came from (GDPO paper mechanism figures).

    Scalars: ``adv_mean``, ``adv_std``, ``adv_abs_max``, ``frac_zero_adv``, ``distinct_per_group``
    (mean over prompt groups of :func:`distinct_per_group`). Per reward column ``(n,)``:
    ``corr_zscore`` (batch Pearson correlation of the advantage with the reward's eps-free
    within-group z-score; GDPO with equal weights and independent rewards gives about
    ``1 / sqrt(n)`` each, a collapse onto one reward gives ~1 for it and ~0 for the others) and
    ``corr_reward`` (with the raw reward, which also carries the between-prompt spread no
    group-relative advantage can follow). Correlations are 0 where a side is constant.
    """
    rewards, group_ids = _check_rewards(rewards, group_ids)
    a = torch.as_tensor(advantages).reshape(-1).to(rewards.dtype)
    if a.shape[0] != rewards.shape[0]:
        raise ValueError(f"advantages must be ({rewards.shape[0]},) like the rewards' rows, got {tuple(a.shape)}")
    return {
        "adv_mean": a.mean(),
        "adv_std": a.std(unbiased=True) if a.numel() > 1 else torch.zeros_like(a.mean()),
        "adv_abs_max": a.abs().max(),
        "frac_zero_adv": (a == 0).to(a.dtype).mean(),
        "distinct_per_group": distinct_per_group(a, group_ids, rtol).to(a.dtype).mean(),
        "corr_zscore": _pearson(a, within_group_zscores(rewards, group_ids)),
        "corr_reward": _pearson(a, rewards),
    }
