"""Is a post-trained model's extra motion in one FLAME group forced by the frozen VAE decoder?

Every model is decoded by the same VAE, whose latents are shared by all FLAME groups. When RL that rewards
some groups also moves an unrewarded one (expr+rot GDPO adds listening jaw motion), either the decoder ties
that motion to the rewarded groups' (no latent gives the one without the other), or the policy moves along a
latent direction nothing in its objective holds. The test, in normalised units:

- ``y = splice_group(D(z_run), D(z_sup), group)``: the run's decoded motion with ``group``'s channels taken
  from the supervised model's (same windows, same sampling noise);
- ``z* = fit_latents(vae, z_run, y)``: the latents moved by Adam to make the decoder give ``y``
  (:func:`group_balanced_error`: positions plus ``vel_weight`` x frame differences, each FLAME group weighing
  the same by default, so the 3 jaw channels count as much as the 50 expression channels; ``weights`` can weigh
  the spliced group more);
- the control ``fit_latents(vae, z_sup, D(z_run))``: the same optimiser towards a target the decoder is known
  to reach. When it reaches the run's figures, the fit's remaining extra motion in ``group`` is what the
  decoder does not let go of at that setting (an upper bound: a longer fit may remove more).

``train/decoder_fit.py`` runs it on a split's windows and prints the listening deviations of each motion.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..envs.flame import GROUPS


def decode_normalised(vae, z: Tensor) -> Tensor:
    """Latents ``(B, N, Dv)`` -> normalised motion ``(B, N r, 67)``, one VAE training window at a time (with
    gradient when ``z`` has one; ``envs.windows.decode_latents`` is the same, denormalised)."""
    n = vae.cfg.window // vae.cfg.r
    return torch.cat([vae.decode(z[:, i:i + n]) for i in range(0, z.shape[1], n)], dim=1)


def splice_group(motion: Tensor, donor: Tensor, group: str) -> Tensor:
    """``motion (B, T, 67)`` with the channels of FLAME ``group`` taken from ``donor (B, T, 67)``."""
    if group not in GROUPS:
        raise ValueError(f"decoder_fit: unknown FLAME group {group!r}; one of {list(GROUPS)}")
    if motion.shape != donor.shape:
        raise ValueError(f"decoder_fit: motion {tuple(motion.shape)} and donor {tuple(donor.shape)} differ in shape")
    out = motion.clone()
    out[..., GROUPS[group]] = donor[..., GROUPS[group]]
    return out


def group_balanced_error(m: Tensor, y: Tensor, vel_weight: float = 4.0, weights: dict[str, float] | None = None) -> Tensor:
    """Weighted mean over the six FLAME groups of each group's mean squared error of ``m`` to ``y`` ``(B, T, 67)``,
    positions plus ``vel_weight`` x frame differences (scalar). ``weights``: group -> weight (default 1 each)."""
    vel = torch.nn.functional.pad(m.diff(dim=1) - y.diff(dim=1), (0, 0, 0, 1))  # (B, T, 67), last frame 0
    e = (m - y).pow(2) + vel_weight * vel.pow(2)  # (B, T, 67)
    w = torch.tensor([float((weights or {}).get(g, 1.0)) for g in GROUPS], device=m.device)  # (6,)
    return (torch.stack([e[..., c].mean() for c in GROUPS.values()]) * w).sum() / w.sum()


def fit_latents(vae, z0: Tensor, target: Tensor, steps: int = 400, lr: float = 0.02, vel_weight: float = 4.0,
                weights: dict[str, float] | None = None) -> tuple[Tensor, float]:
    """Latents from ``z0 (B, N, Dv)`` whose decoding approaches ``target (B, N r, 67)`` (normalised):
    ``steps`` Adam steps on :func:`group_balanced_error` (``weights`` per group), every row at once; the VAE is
    not changed. Returns the latents and the final error."""
    if int(steps) != steps or steps < 1 or not lr > 0:
        raise ValueError(f"decoder_fit: steps={steps} must be a positive integer and lr={lr} positive")
    if weights and (set(weights) - set(GROUPS) or any(not float(v) >= 0 for v in weights.values())
                    or not any(float(weights.get(g, 1.0)) > 0 for g in GROUPS)):
        raise ValueError(f"decoder_fit: weights={weights} must map FLAME groups to weights >= 0, not all 0")
    frozen = [p.requires_grad for p in vae.parameters()]
    vae.requires_grad_(False)
    z = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=float(lr))
    try:
        for _ in range(int(steps)):
            loss = group_balanced_error(decode_normalised(vae, z), target, vel_weight, weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, f in zip(vae.parameters(), frozen):
            p.requires_grad_(f)
    with torch.no_grad():
        final = float(group_balanced_error(decode_normalised(vae, z), target, vel_weight, weights))
    return z.detach(), final


def share_removed(run: float, fitted: float, supervised: float) -> float | None:
    """Share of the run's change from the supervised figure that the fit takes back (1 = all; None when the
    run did not change it)."""
    gap = run - supervised
    return None if abs(gap) < 1e-12 else (run - fitted) / gap
