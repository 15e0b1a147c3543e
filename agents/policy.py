"""The AR-Flow as a TorchRL ``ProbabilisticActor`` over SDE transitions (paper eq. 7).

For the state ``m_t`` of token ``l`` the policy is the Gaussian transition

    pi(m_{t+dt} | m_t) = N(m_t + dt * b(m_t, t), sigma^2 * dt * I),     dt = 1 / K

with drift ``b = flow.sde_drift(m_t, v_theta, t, sigma, sde)`` (``sde="paper"``: b = v, eq. 7;
``"marginal"``: the score-corrected drift) and log-probability summed over the latent dims. With an
SDE window ``(a, b)`` (mixed sampling, ``flow.sde_window_steps``) the steps outside it are ODE steps:
the transition has scale 0 (the action is the mean ``m_t + dt * v``, its log-probability is 0 by
convention) and never enters the loss. The environment owns ``sigma``, ``K`` (``sde_steps``), ``sde``
and ``sde_window``; :func:`make_policy` takes them from the env, and every transition checks that the
env's flow time ``t`` is ``sde_step / K``.

Safe by default:

* the policy samples (``InteractionType.RANDOM``) unless the caller asks for the mean with
  ``set_exploration_type(ExplorationType.DETERMINISTIC)``;
* collection and replay run the AR-Flow without dropout, whatever its train/eval mode, and null
  only the conditions the env's bank marks for a row (``cond_drop``, the env's ``cond_drop`` option;
  none by default), the same at collection and replay, so replayed log-probs equal the collected ones;
* the key/value cache is kept per episode (``episode``: an id the env writes at reset), so one
  policy can step several environments in turn.

The module keeps the AR-Flow's key/value cache across the transitions of a token and across
tokens, so one environment step costs one new-token pass. A new episode (``token == 0``,
``sde_step == 0``) starts a fresh cache from the conditioning of ``window``; when a token starts,
the finished token ``l - 1`` (from ``history``) is appended; if the calls arrive out of order the
cache is rebuilt from ``history``, so the output never depends on stale state.

For the update, :meth:`SDETransition.replay_loc` recomputes the transition means of cached
states with gradient, teacher forced (one pass for every token of the trajectory at a given
denoising step), which is what makes chunked replay cheap. Inside
:meth:`SDETransition.shared_context` (``loss.chunked_update`` opens one per window) it runs in two
stages: the window's prefix and clean history (``ARFlow.encode_context``) once per window and model
(the reference without gradient), shared by every chunk of denoising steps, then each chunk's noisy
states against it (``ARFlow.velocity_in_context``); the gradient the chunks leave on the shared
part is sent through the prefix once, at the end of the block.

Long episodes (bank rows longer than the model's window) follow the sliding-window schedule of
long generation (``envs.windows.sliding_windows``, ``schedule``): each token is conditioned on
its own window (``window_cond``) with the window's first tokens as given prefix, and the cache
restarts at every window. ``replay_loc`` then replays one window (``span``) at a time.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.nn import InteractionType, TensorDictModule
from torch import nn
from torchrl.modules import IndependentNormal, ProbabilisticActor

from ..envs.windows import window_cond
from .arflow import DROP_KEYS, KVCache, context_gated, takes_speaking
from .flow import SDE_KINDS, sde_drift, sde_window_steps, step_sigma, transition_mean, transition_std
from .sampling import window_schedule

POLICY_IN_KEYS = ["x", "t", "token", "sde_step", "history", "window", "episode"]
NO_DROP = {k: False for k in DROP_KEYS}  # no condition nulled (a bank without ``cond_drop``)


class SDEGaussian(IndependentNormal):
    """``IndependentNormal`` that samples with an optional ``torch.Generator`` (reproducible SDE paths).

    A dimension of scale 0 (an ODE step of a mixed sampler) is a point mass at ``loc``: sampling
    returns ``loc`` (the noise is still drawn, so the stream does not depend on the window) and its
    log-probability is 0 by convention; such transitions never enter the loss.
    """

    def __init__(self, loc, scale, generator: torch.Generator | None = None, **kwargs):
        kwargs.setdefault("validate_args", False)  # scale 0 is allowed (ODE steps); finiteness is checked by the guards
        super().__init__(loc, scale, **kwargs)
        self._generator = generator

    def log_prob(self, value):
        lp = self.base_dist.log_prob(value)  # (..., D)
        return torch.where(self.base_dist.scale > 0, lp, torch.zeros_like(lp)).sum(-1)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        g, loc, scale = self._generator, self.base_dist.loc, self.base_dist.scale
        eps = torch.randn(shape, generator=g, device=g.device if g is not None else loc.device, dtype=loc.dtype)
        return loc + eps.to(loc.device) * scale

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)


@contextlib.contextmanager
def dropout_off(model: nn.Module):
    """Run ``model`` in eval mode (no dropout) and restore every sub-module's mode afterwards.

    Gradients still flow; only the train-time randomness is switched off.
    """
    if not model.training:
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class _EpisodeCache:
    """Key/value cache of one episode: the current window's cache and where the rollout stands."""

    cache: KVCache
    expect: tuple[int, int]  # (token, sde_step) of the next in-order call
    length: int  # finished tokens written into the cache


@dataclass
class _SharedWindow:
    """Replay contexts of one window: ``entries[id(model)] = (context with graph, context used by calls, with_grad)``."""

    window: torch.Tensor
    history: torch.Tensor
    span: tuple[int, int, int]
    entries: dict


class SDETransition(nn.Module):
    """``(x, t, token, sde_step, history, window, episode) -> (loc, scale)`` of one SDE transition.

    Args:
        arflow: the AR-Flow (``agents/arflow.py``); its parameters are the policy's.
        bank: window bank holding the conditioning rows that ``window`` indexes.
        sigma, sde_steps, sde: noise scale, transitions per token and drift kind (``flow.sde_drift``);
            the environment's values (see :func:`make_policy`).
        sde_window: ``None`` (every transition samples the SDE) or ``(a, b)``: only steps a .. b-1 do,
            the others are ODE steps of scale 0 (``flow.sde_window_steps``); the environment's value.
        prefix_tokens: k of the sliding-window schedule of long rows (paper 4.3).
        max_episodes: episodes whose caches are kept at once (least recently used dropped first;
            an episode's cache is dropped after its last transition).
    """

    def __init__(self, arflow: nn.Module, bank: TensorDictBase, sigma: float, sde_steps: int, use_cache: bool = True,
                 prefix_tokens: int = 1, sde: str = "paper", max_episodes: int = 4, sde_window=None):
        super().__init__()
        if sde not in SDE_KINDS:
            raise ValueError(f"policy: sde must be one of {SDE_KINDS}, got {sde!r}")
        if int(sde_steps) != sde_steps or sde_steps < 1:
            raise ValueError(f"policy: sde_steps must be a positive integer, got {sde_steps!r}")
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"policy: sigma must be finite and >= 0, got {sigma}")
        self.use_cache = bool(use_cache)  # False: recompute prefix + history every step (benchmark baseline)
        self.arflow = arflow
        self.bank = bank
        self.sigma = float(sigma)
        self.sde_steps = int(sde_steps)
        self.sde = sde
        self.dt = 1.0 / self.sde_steps
        self.std = transition_std(self.sigma, self.dt)  # of an SDE step
        self.sde_window = sde_window_steps(sde_window, self.sde_steps)  # (a, b): the SDE steps
        n_total, W = bank["actor_latent"].shape[1], arflow.cfg.n_tokens
        self.n_total = n_total
        # the windows of generate_long: [(0, n_total, 0)] for a one-window row; validates k
        self.schedule = window_schedule(n_total, W, prefix_tokens, causal=bool(getattr(arflow.cfg, "causal_prefix", False)))
        self._window_of = [w for w, (s0, n, new0) in enumerate(self.schedule) for _ in range(new0, s0 + n)]  # token -> window
        self.max_episodes = int(max_episodes)
        self._episodes: OrderedDict[int, _EpisodeCache] = OrderedDict()
        self._shared: _SharedWindow | None = None  # replay contexts of one window (shared_context)

    def reset_cache(self) -> None:
        self._episodes.clear()

    def _cond(self, window: torch.Tensor, s0: int, n: int) -> dict:
        return window_cond(self.bank[window], s0, n, self.arflow.cfg.r)

    def _drop(self, window: torch.Tensor) -> dict:
        """The conditions nulled for each row: none, unless the env's bank marks the row (``cond_drop``)."""
        if "cond_drop" not in self.bank.keys():
            return NO_DROP
        mask = self.bank["cond_drop"][window]  # (B, len(DROP_KEYS))
        return {k: mask[:, i] for i, k in enumerate(DROP_KEYS)}

    def _speaking(self, model: nn.Module, window: torch.Tensor, tokens) -> dict:
        """``model``'s speaking keyword (as :func:`adapter_kwargs`): the rows' speaking mask of ``tokens`` for a
        model with a listening adapter or listening low-rank updates, else nothing."""
        if not takes_speaking(model):
            return {}
        if "speaking_tokens" not in self.bank.keys():
            raise KeyError("policy: the model has a listening adapter or listening low-rank updates, which need the "
                           "bank's speaking_tokens (B, N)")
        return {"speaking": self.bank["speaking_tokens"][window][:, tokens]}

    def _context_speaking(self, window: torch.Tensor, j: int) -> dict:
        """``append``'s speaking keyword for history token ``j`` when the AR-Flow's listening updates act on the
        context (``lora_scope="listening_context"``), else nothing."""
        return self._speaking(self.arflow, window, j) if context_gated(self.arflow) else {}

    def _mean(self, x: torch.Tensor, v: torch.Tensor, t, sigma: float | None = None) -> torch.Tensor:
        """Transition mean x + dt * b(x, t) of the env's SDE kind at noise scale ``sigma`` (default the
        SDE's; 0 gives the ODE step x + dt * v)."""
        return transition_mean(x, sde_drift(x, v, t, self.sigma if sigma is None else sigma, self.sde), self.dt)

    def _rebuild(self, window: torch.Tensor, history: torch.Tensor, l: int, s0: int, n: int) -> _EpisodeCache:
        """Cache of the window starting at token ``s0`` holding its tokens ``s0 .. l - 1`` from ``history``."""
        cache = self.arflow.start(self._cond(window, s0, n), self._drop(window))
        for j in range(s0, l):
            self.arflow.append(cache, history[:, j], j - s0, **self._context_speaking(window, j))
        return _EpisodeCache(cache, (l, 0), l)

    def _check_time(self, t: torch.Tensor, k: int) -> None:
        """The env's flow time must be sde_step / K of this policy (else the step counts differ)."""
        if k >= self.sde_steps or abs(float(t[0]) - k / self.sde_steps) > 1e-5:
            raise ValueError(f"policy: the environment is at sde_step={k}, t={float(t[0]):.6g}, which does not fit the "
                             f"policy's sde_steps={self.sde_steps} (t = sde_step / sde_steps); build the policy from the env "
                             f"(make_policy(arflow, env)) so both use the same sde_steps")

    def _velocity_cached(self, x, t, l: int, k: int, history, window, episode: int, speaking: dict) -> torch.Tensor:
        s0, n, new0 = self.schedule[self._window_of[l]]
        state = self._episodes.get(episode)
        if state is None or (l, k) != state.expect or (l == new0 and k == 0):
            state = self._rebuild(window, history, l, s0, n)  # new episode, new window, or out-of-order call
        elif state.length < l:
            self.arflow.append(state.cache, history[:, l - 1], l - 1 - s0, **self._context_speaking(window, l - 1))
            state.length = l
        v = self.arflow.velocity(state.cache, x, t, l - s0, **speaking)  # (B, Dv)
        state.expect = (l, k + 1) if k + 1 < self.sde_steps else (l + 1, 0)
        self._episodes.pop(episode, None)
        if state.expect[0] < self.n_total:  # keep it (most recent last) unless the episode is over
            self._episodes[episode] = state
            while len(self._episodes) > self.max_episodes:
                self._episodes.popitem(last=False)
        return v

    def forward(self, x, t, token, sde_step, history, window, episode):
        # rows step in lock-step: one scalar read of the schedule per call
        l, k, ep = int(token[0]), int(sde_step[0]), int(episode[0])
        self._check_time(t, k)
        t = t.squeeze(-1)  # (B,)
        spk = self._speaking(self.arflow, window, l)  # {"speaking": (B,)} for listening parts, else {}
        with torch.no_grad(), dropout_off(self.arflow):
            if self.use_cache:
                v = self._velocity_cached(x, t, l, k, history, window, ep, spk)  # (B, Dv)
            else:
                s0, n, _ = self.schedule[self._window_of[l]]
                v = self.arflow.velocity_uncached(self._cond(window, s0, n), history[:, s0:l], x, t, self._drop(window), **spk)
        sigma = step_sigma(self.sigma, k, self.sde_window)  # 0 on an ODE step of a mixed sampler
        loc = self._mean(x, v, t, sigma)  # (B, Dv)
        return loc, torch.full_like(loc, transition_std(sigma, self.dt))

    def replay_loc(self, window: torch.Tensor, history: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                   model: nn.Module | None = None, span: tuple[int, int, int] | None = None,
                   sde: torch.Tensor | None = None) -> torch.Tensor:
        """Transition means of cached states, teacher forced, with gradient (no dropout, whatever the mode).

        window (B,), history (B, N, Dv) finished trajectory; ``span = (s0, n, new0)`` one entry of
        ``schedule`` (default: the whole row as one window); x (B, S, M, Dv) states of S SDE steps
        (inside ``sde_window``: the mean is the SDE's) of the window's M = s0 + n - new0 generated
        tokens, t (B, S, M) their flow times
        -> loc (B, S, M, Dv). ``model`` defaults to this policy's AR-Flow (pass the reference copy to score it).
        ``sde`` (B, S, M) bool, when the states include ODE steps of a mixed sampler: False marks an ODE
        step, whose mean is the ODE's x + dt v (the same as the SDE's for the paper drift).
        """
        model = self.arflow if model is None else model
        s0, n, new0 = (0, history.shape[1], 0) if span is None else tuple(span)
        B, S, M, D = x.shape
        if M != s0 + n - new0:
            raise ValueError(f"replay_loc: x holds {M} tokens per step, span {span} generates {s0 + n - new0}")
        # the S copies of every token attend to one context [prefix; window history]: inside shared_context
        # that of the block, else one sequence [prefix; window history; S x M noisy tokens]
        xs = x.reshape(B, S * M, D)
        ts = t.reshape(B, S * M)
        idx = torch.arange(new0 - s0, n, device=x.device).repeat(S)  # window-local index of every noisy copy
        spk = self._speaking(model, window, s0 + idx)  # {"speaking": (B, S*M)} for listening parts, else {}
        with dropout_off(model):
            ctx = self._shared_for(model, window, history, (s0, n, new0))
            if ctx is None:
                v = model._full_pass(self._cond(window, s0, n), history[:, s0:s0 + n], xs, ts, idx,
                                     self._drop(window), **spk)  # (B, S*M, Dv)
            else:
                v = model.velocity_in_context(ctx, xs, ts, idx, **spk)  # (B, S*M, Dv)
        loc = self._mean(xs, v, ts)  # (B, S*M, Dv)
        if sde is not None and self.sde != "paper":  # the marginal drift's ODE steps: sigma 0
            loc = torch.where(sde.reshape(B, S * M, 1), loc, self._mean(xs, v, ts, 0.0))
        return loc.reshape(B, S, M, D)

    @contextlib.contextmanager
    def shared_context(self, window: torch.Tensor, history: torch.Tensor, span: tuple[int, int, int] | None = None,
                       models: tuple[nn.Module, ...] = ()):
        """Within the block, :meth:`replay_loc` of ``models`` on this ``window`` / ``history`` / ``span``
        reuses one prefix-and-history pass per model instead of one per call.

        The pass of a model whose parameters require grad runs with autograd (when enabled); calls
        get detached copies of its keys/values, on which their backward passes leave gradients, and
        a clean exit sends the gathered gradient through the prefix pass once (so each call's
        ``backward`` plus the exit give the same parameter gradients as unshared calls). Other
        models (the frozen reference) run without gradient. Memory: one window's prefix
        activations, whatever the number of calls. A call for another window, history or span of
        one of ``models`` inside the block is an error.
        """
        if self._shared is not None:
            raise RuntimeError("shared_context: blocks do not nest")
        s0, n, new0 = (0, history.shape[1], 0) if span is None else tuple(span)
        cond = self._cond(window, s0, n)
        entries = {}
        for m in models:
            grad = torch.is_grad_enabled() and any(p.requires_grad for p in m.parameters())
            with torch.set_grad_enabled(grad), dropout_off(m):
                full = m.encode_context(cond, history[:, s0:s0 + n], self._drop(window))
            entries[id(m)] = (full, full.detached() if grad else full, grad)
        self._shared = _SharedWindow(window, history, (s0, n, new0), entries)
        try:
            yield
        finally:
            self._shared = None
        roots, grads = [], []
        for full, leaf, grad in entries.values():
            if grad:
                for a, b in zip(full.k + full.v, leaf.k + leaf.v):
                    if b.grad is not None:
                        roots.append(a)
                        grads.append(b.grad)
        if roots:
            torch.autograd.backward(roots, grads)

    def _shared_for(self, model: nn.Module, window: torch.Tensor, history: torch.Tensor, span: tuple[int, int, int]):
        """The shared context of ``model`` for this window (None outside :meth:`shared_context` or for other models)."""
        sh = self._shared
        if sh is None or id(model) not in sh.entries:
            return None
        same = (span == sh.span and history.shape == sh.history.shape and history.data_ptr() == sh.history.data_ptr()
                and window.shape == sh.window.shape and torch.equal(window, sh.window))
        if not same:
            raise ValueError(f"replay_loc: span {span} or its window / history differ from the shared_context "
                             f"block's (span {sh.span}); replay other windows outside the block")
        return sh.entries[id(model)][1]


def make_policy(arflow: nn.Module, env, generator: torch.Generator | None = None, use_cache: bool = True,
                prefix_tokens: int = 1, sigma: float | None = None, sde_steps: int | None = None,
                sde: str | None = None, sde_window=None) -> ProbabilisticActor:
    """The AR-Flow wrapped as a ``ProbabilisticActor`` with the Gaussian SDE transition of ``env``.

    ``env`` (a :class:`~envs.sde_env.ListenerSDEEnv`) owns the window bank, ``sigma``, ``sde_steps``,
    ``sde`` and ``sde_window``; the policy takes them from it. Any of them given here must
    equal the env's (a ``ValueError`` names both otherwise). The actor samples by default
    (``InteractionType.RANDOM``); ``set_exploration_type(ExplorationType.DETERMINISTIC)`` gives
    the transition mean.

    Passing a window bank instead of the env is deprecated: the values then default to
    sigma=0.5, sde_steps=4, sde="paper", sde_window=None, and only the step count is checked at run time.
    """
    if isinstance(env, TensorDictBase):
        warnings.warn("make_policy(arflow, bank, ...) is deprecated: pass the ListenerSDEEnv, which owns the bank, "
                      "sigma, sde_steps and sde", DeprecationWarning, stacklevel=2)
        bank = env
        sigma = 0.5 if sigma is None else sigma
        sde_steps = 4 if sde_steps is None else sde_steps
        sde = "paper" if sde is None else sde
    else:
        bank = env.bank
        given = {"sigma": sigma, "sde_steps": sde_steps, "sde": sde,
                 "sde_window": None if sde_window is None else sde_window_steps(sde_window, env.sde_steps)}
        owned = {"sigma": env.sigma, "sde_steps": env.sde_steps, "sde": env.sde, "sde_window": env.sde_window}
        for name, value in given.items():
            if value is not None and value != owned[name]:
                raise ValueError(f"make_policy: {name}={value!r} but the environment has env.{name}={owned[name]!r}; "
                                 f"the env owns {name} (leave it out here or build the env with {name}={value!r})")
        sigma, sde_steps, sde, sde_window = owned["sigma"], owned["sde_steps"], owned["sde"], owned["sde_window"]
    core = SDETransition(arflow, bank, sigma, sde_steps, use_cache=use_cache, prefix_tokens=prefix_tokens, sde=sde,
                         sde_window=sde_window)
    module = TensorDictModule(core, in_keys=POLICY_IN_KEYS, out_keys=["loc", "scale"])
    return ProbabilisticActor(
        module, in_keys=["loc", "scale"], out_keys=["action"], distribution_class=SDEGaussian,
        distribution_kwargs={"generator": generator}, return_log_prob=True,
        default_interaction_type=InteractionType.RANDOM,
    )


def transition_core(policy: ProbabilisticActor) -> SDETransition:
    """The :class:`SDETransition` inside a policy built by :func:`make_policy`."""
    return policy.module[0].module
