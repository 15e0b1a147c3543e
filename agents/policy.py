"""The AR-Flow as a TorchRL ``ProbabilisticActor`` over SDE transitions (paper eq. 7).

For the state ``m_t`` of token ``l`` the policy is the Gaussian transition

    pi(m_{t+dt} | m_t) = N(m_t + dt * v_theta(m_t), sigma^2 * dt * I),     dt = 1 / K

with log-probability summed over the latent dims. The module keeps the AR-Flow's key/value cache
across the transitions of a token and across tokens, so one environment step costs one
new-token pass. The cache follows the rollout: a new episode (``token == 0``, ``sde_step == 0``)
starts a fresh cache from the conditioning of ``window``; when a token starts, the finished token
``l - 1`` (from ``history``) is appended; if the calls arrive out of order the cache is rebuilt
from ``history``, so the output never depends on stale state.

For the update, :meth:`SDETransition.replay_loc` recomputes the transition means of cached
states with gradient, teacher forced (one pass for every token of the trajectory at a given
denoising step), which is what makes chunked replay cheap.

Long episodes (bank rows longer than the model's window) follow the sliding-window schedule of
long generation (``envs.windows.sliding_windows``, ``schedule``): each token is conditioned on
its own window (``window_cond``) with the window's first tokens as given prefix, and the cache
restarts at every window. ``replay_loc`` then replays one window (``span``) at a time.
"""
from __future__ import annotations

import math

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import IndependentNormal, ProbabilisticActor

from ..envs.windows import sliding_windows, window_cond
from .arflow import DROP_KEYS
from .flow import transition_mean

POLICY_IN_KEYS = ["x", "t", "token", "sde_step", "history", "window"]


class SDEGaussian(IndependentNormal):
    """``IndependentNormal`` that samples with an optional ``torch.Generator`` (reproducible SDE paths)."""

    def __init__(self, loc, scale, generator: torch.Generator | None = None, **kwargs):
        super().__init__(loc, scale, **kwargs)
        self._generator = generator

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        g, loc, scale = self._generator, self.base_dist.loc, self.base_dist.scale
        eps = torch.randn(shape, generator=g, device=g.device if g is not None else loc.device, dtype=loc.dtype)
        return loc + eps.to(loc.device) * scale

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)


class SDETransition(nn.Module):
    """``(x, t, token, sde_step, history, window) -> (loc, scale)`` of one SDE transition.

    Args:
        arflow: the AR-Flow (``agents/arflow.py``); its parameters are the policy's.
        bank: window bank holding the conditioning rows that ``window`` indexes.
        sigma, sde_steps: eq. 7 noise scale and transitions per token.
        prefix_tokens: k of the sliding-window schedule of long rows (paper 4.3).
    """

    def __init__(self, arflow: nn.Module, bank: TensorDictBase, sigma: float, sde_steps: int, use_cache: bool = True,
                 prefix_tokens: int = 1):
        super().__init__()
        self.use_cache = bool(use_cache)  # False: recompute prefix + history every step (benchmark baseline)
        self.arflow = arflow
        self.bank = bank
        self.sigma = float(sigma)
        self.sde_steps = int(sde_steps)
        self.dt = 1.0 / self.sde_steps
        n_total, W = bank["actor_latent"].shape[1], arflow.cfg.n_tokens
        self.schedule = sliding_windows(n_total, W, prefix_tokens)  # [(0, n_total, 0)] for a one-window row; validates k
        self._window_of = [w for w, (s0, n, new0) in enumerate(self.schedule) for _ in range(new0, s0 + n)]  # token -> window
        self._cache = None
        self._expect = None  # (token, sde_step) the next in-order call will carry
        self._cache_len = 0  # finished tokens written into the cache

    def reset_cache(self) -> None:
        self._cache, self._expect, self._cache_len = None, None, 0

    def _cond(self, window: torch.Tensor, s0: int, n: int) -> dict:
        return window_cond(self.bank[window], s0, n, self.arflow.cfg.r)

    def _rebuild(self, window: torch.Tensor, history: torch.Tensor, l: int, s0: int, n: int) -> None:
        """Cache of the window starting at token ``s0`` holding its tokens ``s0 .. l - 1`` from ``history``."""
        self._cache = self.arflow.start(self._cond(window, s0, n))
        for j in range(s0, l):
            self.arflow.append(self._cache, history[:, j], j - s0)
        self._cache_len = l

    def forward(self, x, t, token, sde_step, history, window):
        # rows step in lock-step: one scalar read of the schedule per call
        l, k = int(token[0]), int(sde_step[0])
        s0, n, new0 = self.schedule[self._window_of[l]]
        if not self.use_cache:
            with torch.no_grad():
                v = self.arflow.velocity_uncached(self._cond(window, s0, n), history[:, s0:l], x, t.squeeze(-1))
            loc = transition_mean(x, v, self.dt)
            return loc, torch.full_like(loc, self.sigma * math.sqrt(self.dt))
        if self._cache is None or (l, k) != self._expect or (l == new0 and k == 0):
            self._rebuild(window, history, l, s0, n)  # new episode, new window, or out-of-order call
        elif self._cache_len < l:
            self.arflow.append(self._cache, history[:, l - 1], l - 1 - s0)
            self._cache_len = l
        v = self.arflow.velocity(self._cache, x, t.squeeze(-1), l - s0)  # (B, Dv)
        self._expect = (l, k + 1) if k + 1 < self.sde_steps else (l + 1, 0)
        loc = transition_mean(x, v, self.dt)
        scale = torch.full_like(loc, self.sigma * math.sqrt(self.dt))
        return loc, scale

    def replay_loc(self, window: torch.Tensor, history: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                   model: nn.Module | None = None, span: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Transition means of cached states, teacher forced, with gradient.

        window (B,), history (B, N, Dv) finished trajectory; ``span = (s0, n, new0)`` one entry of
        ``schedule`` (default: the whole row as one window); x (B, S, M, Dv) states of S denoising
        steps of the window's M = s0 + n - new0 generated tokens, t (B, S, M) their flow times
        -> loc (B, S, M, Dv). ``model`` defaults to this policy's AR-Flow (pass the reference copy to score it).
        """
        model = self.arflow if model is None else model
        s0, n, new0 = (0, history.shape[1], 0) if span is None else span
        B, S, M, D = x.shape
        if M != s0 + n - new0:
            raise ValueError(f"replay_loc: x holds {M} tokens per step, span {span} generates {s0 + n - new0}")
        cond = self._cond(window, s0, n)
        # the S copies of every token share one sequence [prefix; window history; S x M noisy tokens]
        xs = x.reshape(B, S * M, D)
        idx = torch.arange(new0 - s0, n, device=x.device).repeat(S)  # window-local index of every noisy copy
        no_drop = {k: False for k in DROP_KEYS}  # replay never drops conditions
        v = model._full_pass(cond, history[:, s0:s0 + n], xs, t.reshape(B, S * M), idx, no_drop)  # (B, S*M, Dv)
        return transition_mean(xs, v, self.dt).reshape(B, S, M, D)


def make_policy(arflow: nn.Module, bank: TensorDictBase, sigma: float = 0.5, sde_steps: int = 4,
                generator: torch.Generator | None = None, use_cache: bool = True, prefix_tokens: int = 1) -> ProbabilisticActor:
    """The AR-Flow wrapped as a ``ProbabilisticActor`` with the Gaussian SDE transition."""
    core = SDETransition(arflow, bank, sigma, sde_steps, use_cache=use_cache, prefix_tokens=prefix_tokens)
    module = TensorDictModule(core, in_keys=POLICY_IN_KEYS, out_keys=["loc", "scale"])
    return ProbabilisticActor(
        module, in_keys=["loc", "scale"], out_keys=["action"], distribution_class=SDEGaussian,
        distribution_kwargs={"generator": generator}, return_log_prob=True,
    )


def transition_core(policy: ProbabilisticActor) -> SDETransition:
    """The :class:`SDETransition` inside a policy built by :func:`make_policy`."""
    return policy.module[0].module
