"""Rectified-flow math, written once for the whole project (paper eq. 4-7).

Time convention (the only place it is defined):

    t = 0 is pure noise x0 ~ N(0, I),  t = 1 is data x1,
    x_t = t * x1 + (1 - t) * x0,        velocity target v* = x1 - x0   (eq. 4),

so integrating dx/dt = v from t = 0 to t = 1 carries noise to data. (minRF and some diffusion code
use the opposite direction; do not mix them.)

Sampling, per latent token, on the grid t_s = s / steps (s = 0 .. steps - 1), dt = 1 / steps:

    ODE (eq. 5):  x <- x + dt * v(x, t_s)
    SDE (eq. 7):  x <- x + dt * b(x, t_s) + sigma * sqrt(dt) * eps,   eps ~ N(0, I)

with drift b (``sde_drift``) either the paper's b = v ("paper", eq. 7 as printed; it does not keep
the flow's marginals) or the score-corrected b = v - sigma^2 (x - t v) / (2 (1 - t)) ("marginal":
for the straight path the score is -(x - t v) / (1 - t), and adding sigma^2 / 2 times it to the
drift keeps every marginal of the flow for any sigma).

Mixed SDE/ODE sampling (``sde_window = (a, b)``, as MixGRPO / Flow-GRPO-Fast): only the steps
a <= s < b are SDE steps; the others are ODE steps x <- x + dt * v (whatever the drift kind: both
drifts share the ODE's marginals in the limit, and the ODE step is what evaluation takes). The noise
of every step is still drawn, so one seed gives the same stream with or without a window; an ODE
step multiplies it by 0. ``None`` = every step is an SDE step (eq. 7 as printed).

One SDE step is a Gaussian transition N(mean = x + dt * b, std = sigma * sqrt(dt)) per latent
dimension; its log-probability and the closed-form KL between two such transitions (same std)
are what the RL stage uses. Classifier-free guidance (eq. 6): v = v_uncond + w * (v_cond - v_uncond).

Broadcasting rule for ``t``, ``dt``, ``w`` and ``std``: a python number, or a tensor holding the
*leading* dims of the state (e.g. ``(B,)`` or ``(B, N)`` for a state ``(B, N, D)``); trailing
singleton dims are added so they broadcast per row / per token, never along the feature dim.
All functions are pure (no in-place updates of their inputs).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "interpolate", "velocity_target", "flow_matching_loss", "euler_step", "sde_step", "sde_drift", "SDE_KINDS",
    "transition_mean", "transition_std", "gaussian_log_prob", "gaussian_kl_same_std", "gaussian_kl_metric",
    "cfg_combine", "time_grid", "sde_window_steps", "sde_window_label", "step_sigma",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _lead(a, x: Tensor):
    """Give ``a`` (number or tensor with the leading dims of ``x``) trailing singleton dims."""
    if not isinstance(a, Tensor):
        return a
    if a.dim() > x.dim():
        raise ValueError(f"flow: a coefficient of shape {tuple(a.shape)} has more dims than the state {tuple(x.shape)}")
    return a.reshape(tuple(a.shape) + (1,) * (x.dim() - a.dim()))


def interpolate(x0: Tensor, x1: Tensor, t) -> Tensor:
    """x_t = t * x1 + (1 - t) * x0; t = 0 -> noise x0, t = 1 -> data x1."""
    t = _lead(t, x1)
    return t * x1 + (1.0 - t) * x0


def velocity_target(x0: Tensor, x1: Tensor) -> Tensor:
    """Rectified-flow regression target x1 - x0 (eq. 4); constant along the straight path."""
    return x1 - x0


def flow_matching_loss(v_pred: Tensor, x0: Tensor, x1: Tensor, reduce_dims: int | Sequence[int] | None = None) -> Tensor:
    """Squared error ||v_pred - (x1 - x0)||^2 averaged over ``reduce_dims``.

    ``reduce_dims=None`` averages everything (scalar); ``reduce_dims=-1`` gives one loss per token
    (e.g. ``(B, N)``) for masking or binning by flow time.
    """
    err = (v_pred - velocity_target(x0, x1)).pow(2)
    if reduce_dims is None:
        return err.mean()
    return err.mean(dim=reduce_dims)


def euler_step(x: Tensor, v: Tensor, dt) -> Tensor:
    """One Euler step of the ODE dx = v dt (eq. 5)."""
    return x + _lead(dt, x) * v


SDE_KINDS = ("paper", "marginal")


def sde_drift(x: Tensor, v: Tensor, t, sigma, sde: str = "paper") -> Tensor:
    """Drift b(x, t) of the SDE whose Euler-Maruyama step is x + dt * b + sigma * sqrt(dt) * eps.

    ``"paper"``: b = v (eq. 7 as printed).
    ``"marginal"``: b = v - sigma^2 (x - t v) / (2 (1 - t)), the score-corrected drift. On the straight
    path x_t = t x1 + (1 - t) x0 the noise estimate is x0 = x - t v and the score is -x0 / (1 - t),
    so b = v + sigma^2 / 2 * score keeps the flow's marginals. Needs t < 1 (the sampler's grid
    evaluates t = s / steps < 1).
    """
    if sde not in SDE_KINDS:
        raise ValueError(f"flow.sde_drift: sde must be one of {SDE_KINDS}, got {sde!r}")
    if sde == "paper":
        return v
    t = _lead(t, x)
    if (t >= 1).any() if isinstance(t, Tensor) else t >= 1:
        raise ValueError("flow.sde_drift: the marginal drift needs t < 1 (t = 1 is data, the score is singular)")
    return v - (sigma ** 2) * (x - t * v) / (2.0 * (1.0 - t))


def transition_mean(x: Tensor, v: Tensor, dt) -> Tensor:
    """Mean of the SDE transition: x + dt * v."""
    return euler_step(x, v, dt)


def transition_std(sigma, dt):
    """Std of the SDE transition: sigma * sqrt(dt) (numbers in, number out; tensors allowed)."""
    if not isinstance(sigma, Tensor) and not isinstance(dt, Tensor):
        if dt < 0 or sigma < 0:
            raise ValueError(f"flow.transition_std: need sigma >= 0 and dt >= 0, got sigma={sigma}, dt={dt}")
        return sigma * math.sqrt(dt)
    sqrt_dt = dt.sqrt() if isinstance(dt, Tensor) else math.sqrt(dt)
    return sigma * sqrt_dt


def sde_step(x: Tensor, v: Tensor, dt, sigma, noise: Tensor) -> Tensor:
    """One Euler-Maruyama step (eq. 7): x + dt * v + sigma * sqrt(dt) * noise, noise ~ N(0, I)."""
    return transition_mean(x, v, dt) + _lead(transition_std(sigma, dt), x) * noise


def gaussian_log_prob(action: Tensor, mean: Tensor, std) -> Tensor:
    """log N(action; mean, std^2 I) summed over the last dim -> shape ``action.shape[:-1]``.

    ``std`` is a positive number or a tensor broadcastable to ``action`` (leading dims rule).
    """
    std = _lead(std, action) if isinstance(std, Tensor) else torch.as_tensor(float(std), dtype=action.dtype, device=action.device)
    z = (action - mean) / std
    per_dim = -0.5 * z.pow(2) - torch.log(std) - 0.5 * _LOG_2PI
    return per_dim.expand_as(z).sum(-1)


def gaussian_kl_same_std(mu_p: Tensor, mu_q: Tensor, sigma, dt) -> Tensor:
    """KL(N(mu_p, s^2 I) || N(mu_q, s^2 I)) with s^2 = sigma^2 dt: ||mu_p - mu_q||^2 / (2 sigma^2 dt).

    Summed over the last dim (same convention as :func:`gaussian_log_prob`).
    """
    var = _lead(transition_std(sigma, dt), mu_p)
    var = var * var
    return ((mu_p - mu_q).pow(2) / (2.0 * var)).sum(-1)


def gaussian_kl_metric(mu_p: Tensor, mu_q: Tensor, sigma, dt, metric: Tensor) -> Tensor:
    """The same KL measured in the metric ``M (D, D)``: (mu_p - mu_q)^T M (mu_p - mu_q) / (2 sigma^2 dt).

    ``M = I`` is :func:`gaussian_kl_same_std`; a positive semi-definite ``M`` weighs each direction of the
    mean's difference by how much it matters (``algo.group_kl``: how much it moves one FLAME group's
    decoded motion, :mod:`agents.group_metric`). Sums over the last dim like the plain KL.
    """
    var = _lead(transition_std(sigma, dt), mu_p[..., 0])
    d = mu_p - mu_q  # (..., D)
    return (d @ metric.to(d.dtype) * d).sum(-1) / (2.0 * var * var)


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, w) -> Tensor:
    """Classifier-free guidance (eq. 6): v_uncond + w * (v_cond - v_uncond); w per row (leading dims)."""
    return v_uncond + _lead(w, v_cond) * (v_cond - v_uncond)


def time_grid(steps: int, device=None, dtype=torch.float32) -> Tensor:
    """``(steps + 1,)`` times 0, 1/steps, ..., 1. Step s evaluates v at grid[s] with dt = 1 / steps."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"flow.time_grid: steps must be a positive integer, got {steps!r}")
    return torch.linspace(0.0, 1.0, int(steps) + 1, device=device, dtype=dtype)


def sde_window_steps(window, steps: int) -> tuple[int, int]:
    """The SDE steps ``[a, b)`` of a sampler of ``steps`` steps: ``window`` None (every step) or ``(a, b)``
    with ``0 <= a < b <= steps``; a clear ``ValueError`` names the value otherwise."""
    if window is None:
        return 0, int(steps)
    try:
        a, b = (int(w) for w in window)
        ok = [a, b] == [float(w) for w in window]
    except (TypeError, ValueError):
        ok = False
    if not ok or not 0 <= a < b <= steps:
        raise ValueError(f"sde_window must be null or [a, b] with integers 0 <= a < b <= sde steps = {steps} "
                         f"(the denoising steps a .. b-1 sample the SDE, the others take ODE steps), got {window!r}")
    return a, b


def sde_window_label(window: tuple[int, int]) -> str:
    """``"step a"`` or ``"steps a-(b-1)"``: the SDE steps of a window ``(a, b)`` for reports and logs."""
    a, b = window
    return f"step {a}" if b - a == 1 else f"steps {a}-{b - 1}"


def step_sigma(sigma: float, s: int, window: tuple[int, int]) -> float:
    """The noise scale of step ``s``: ``sigma`` inside the SDE window ``[a, b)``, 0 (an ODE step) outside."""
    return float(sigma) if window[0] <= s < window[1] else 0.0
