"""Fail fast on divergence: a non-finite loss, gradient or weight stops the run, naming where.

Each check reads the device once (a deliberate sync per optimiser step: a diverged step must not
reach ``optimizer.step()`` or a checkpoint).
"""
from __future__ import annotations

from typing import Mapping

import torch


class DivergenceError(FloatingPointError):
    """Training produced a non-finite value."""


def check_finite_step(terms: Mapping[str, torch.Tensor], grad_norm: torch.Tensor, where: str, hint: str) -> None:
    """Raise if any loss term or the gradient norm is NaN/inf (call before ``optimizer.step()``)."""
    names = [*terms, "grad_norm"]
    values = torch.stack([*(v.detach().reshape(()).float() for v in terms.values()), grad_norm.detach().reshape(()).float()])
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        items = ", ".join(f"{n}={v:.4g}" for n, v, b in zip(names, values.tolist(), bad.tolist()) if b)
        raise DivergenceError(f"{where}: non-finite {items}; training stopped before the optimiser step "
                              f"(nothing was saved from this step). Likely cause: {hint}")


def check_finite_stats(stats: Mapping[str, float], keys, where: str, hint: str) -> None:
    """Raise if any of ``stats[k]`` (plain floats, e.g. from ``chunked_update``) is NaN/inf."""
    bad = {k: stats[k] for k in keys if k in stats and not torch.isfinite(torch.tensor(float(stats[k])))}
    if bad:
        items = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise DivergenceError(f"{where}: non-finite {items}. Likely cause: {hint}")


def check_finite_weights(model: torch.nn.Module, where: str, hint: str) -> None:
    """Raise if any parameter or buffer of ``model`` holds NaN/inf (call before saving)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not tensors:
        return
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if not bool(ok):
        names = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_floating_point() and not torch.isfinite(t).all()]
        raise DivergenceError(f"{where}: non-finite weights in {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; "
                              f"nothing was saved. Likely cause: {hint}")
