"""The supervised flow loss, and the same loss as an anchor beside the RL objective.

- :func:`flow_matching_loss`: the rectified-flow loss of ``train/sft.py`` (paper eq. 4), per token,
  teacher forced (each token's condition holds the ground-truth latents before it);
- :class:`SupervisedAnchor`: that loss on ground-truth train windows, weighted by ``coef``, added to
  every RL update (``algo.sft_coef``; InstructGPT's PPO-ptx). Not in the paper (0 = the paper).

Why an anchor: the RL objective and its KL see only the policy's own rollouts, so the conditionals the
policy would use given real motion are unconstrained. On the default corpus GDPO lowers them where it
raises the rollouts' dynamics (docs/benchmarks.md, "The VAE's ceiling", "The AR-Flow's own collapse
is its rollout's"); the anchor keeps them at the supervised fit while the objective moves the rollouts.

Flow time as in :mod:`.flow`: t = 0 noise, t = 1 data.
"""
from __future__ import annotations

import torch

from ..envs.windows import cond_from_bank
from .arflow import adapter_kwargs
from .flow import interpolate, velocity_target


def flow_matching_loss(model, batch, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-token squared error ``(b, N)`` of ``model``'s velocity against the straight path from the noise
    ``x0 (b, N, Dv)`` to ``batch["actor_latent"]`` at flow times ``t (b, N)`` (mean over latent dims)."""
    x1 = batch["actor_latent"]  # (b, N, Dv)
    xt = interpolate(x0, x1, t.unsqueeze(-1))  # (b, N, Dv)
    spk = adapter_kwargs(model, batch.get("speaking_tokens", None))  # (b, N) speaking mask, for listening parts (adapter, LoRA)
    v = model(cond_from_bank(batch), x1, xt, t, **spk)  # (b, N, Dv), history = the ground truth
    return (v - velocity_target(x0, x1)).pow(2).mean(-1)  # (b, N)


class SupervisedAnchor:
    """``coef`` x the flow loss of ``model`` on ``batch_size`` rows of ``bank`` drawn with replacement.

    Each call draws rows, noise and times from ``generator`` (the run's: saved and restored with it).
    With several processes each holds ``rows`` of one global batch of ``batch_size``: the draws are
    the global batch's, sliced, and the loss is scaled by the rows' share, so the gradients summed over
    processes are one process's on the whole batch. Returns ``{"loss_sft": ...}`` with gradient.
    The model runs as the RL update runs it (eval mode: no condition dropout), so the anchor holds the
    conditional branch, not CFG's unconditional one.
    """

    def __init__(self, bank, coef: float, batch_size: int, generator: torch.Generator, rows: slice = slice(None)):
        if not coef >= 0:
            raise ValueError(f"SupervisedAnchor: coef must be >= 0, got {coef}")
        if int(batch_size) < 1:
            raise ValueError(f"SupervisedAnchor: batch_size must be >= 1, got {batch_size}")
        self.bank, self.coef, self.batch_size, self.generator, self.rows = bank, float(coef), int(batch_size), generator, rows

    def __call__(self, model) -> dict[str, torch.Tensor]:
        B, g = self.batch_size, self.generator
        idx = torch.randint(self.bank.batch_size[0], (B,), generator=g)[self.rows]  # (b,) this process's rows
        batch = self.bank[idx.to(self.bank.device)]
        shape = batch["actor_latent"].shape  # (b, N, Dv)
        x0 = torch.randn((B, *shape[1:]), generator=g)[self.rows].to(self.bank.device)  # (b, N, Dv)
        t = torch.rand((B, shape[1]), generator=g)[self.rows].to(self.bank.device)  # (b, N)
        share = idx.shape[0] / B
        return {"loss_sft": self.coef * share * flow_matching_loss(model, batch, x0, t).mean()}
