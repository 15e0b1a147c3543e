"""Sampling from an AR-Flow (paper eq. 5-7 and section 4.3): one window, and sliding-window long generation.

Plain functions over a model with the :class:`~.arflow.ARFlow` interface (``check_cond``, ``start`` /
``velocity`` / ``append`` for cached generation, ``velocity_uncached``); ``ARFlow.sample`` and
``ARFlow.generate_long`` delegate here. Flow time as in ``agents/flow.py`` (t = 0 noise, t = 1 data).

Per latent token l (auto-regressive, in order): x ~ N(0, I), then ``steps`` steps on the grid
t_s = s / steps, dt = 1 / steps, with the guided velocity v of token l given the tokens < l:

    ODE (sigma = 0, eq. 5):  x <- x + dt * v
    SDE (sigma > 0, eq. 7):  x <- x + dt * b(x, v, t_s) + sigma * sqrt(dt) * eps
                             b = v (``sde="paper"``) or the score-corrected drift (``sde="marginal"``,
                             ``flow.sde_drift``)
    mixed (``sde_window = (a, b)``): SDE steps for a <= s < b, ODE steps elsewhere (``flow.sde_window_steps``)

Classifier-free guidance (eq. 6): v = v_uncond + w_l (v_cond - v_uncond), where w_l is ``w_speak``
on tokens where the actor speaks and ``w_listen`` elsewhere, and the unconditional branch nulls the
conditions of ``cfg_drop`` (default, the paper's: all of them, text, audio and partner motion; a
subset guides on those conditions only, e.g. ``("motion",)`` scales the reaction to the partner's
motion while both branches hear the audio). The two branches run as one stacked batch of 2B rows
``[cond; uncond]``. With w_speak = w_listen = 1 only the conditional branch runs.

Random draws come from ``generator`` in a fixed order (per token: x0, then per SDE step the noise),
so a seeded generator reproduces a sample exactly, cached or not.

A window is sampled one token at a time by :class:`WindowSampler` (``sample`` runs it to the end).
With a causal prefix (``ARFlowConfig.causal_prefix``) the sampler adds token l's prefix group to
the cache (``ARFlow.extend``) right before token l, reading only the audio up to token l's last
frame; the streaming generator (``agents/streaming.py``) runs the same sampler as the audio arrives,
so the two agree bit for bit. Long generation with a causal prefix uses windows of stride W - k
whose last one is simply cut short (:func:`window_schedule`): a causal window's first tokens do
not depend on the rest of it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..envs.windows import COND_KEYS, sliding_windows
from .arflow import DROP_KEYS, KVCache, context_gated, takes_speaking
from .flow import SDE_KINDS, cfg_combine, euler_step, sde_drift, sde_step, sde_window_steps, step_sigma

__all__ = ["sample", "window_step", "generate_long", "token_cfg_weights", "check_cfg_weight", "check_cfg_drop",
           "WindowSampler", "window_schedule", "eval_mode"]


def check_cfg_weight(name: str, w) -> float:
    """A CFG weight as a finite float, else ``ValueError`` naming it."""
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise ValueError(f"arflow: CFG weight {name}={w!r} is not a number") from None
    if not math.isfinite(w):
        raise ValueError(f"arflow: CFG weight {name}={w} is not finite")
    return w


def check_cfg_drop(drop) -> tuple[str, ...]:
    """The conditions the unconditional CFG branch nulls, as a tuple in ``DROP_KEYS`` order: a non-empty
    subset of ``DROP_KEYS`` (a string names one condition; None = all, the paper's), else ``ValueError``
    naming the value."""
    if drop is None:
        return DROP_KEYS
    names = (drop,) if isinstance(drop, str) else drop
    try:
        names = [str(n) for n in names]
    except TypeError:
        raise ValueError(f"arflow: cfg_drop={drop!r} must be a list of conditions from {list(DROP_KEYS)}") from None
    bad = sorted(set(names) - set(DROP_KEYS))
    if bad or not names:
        why = f"unknown {bad}" if bad else "empty (the unconditional branch would equal the conditional one)"
        raise ValueError(f"arflow: cfg_drop={list(names)}: {why}; choose a non-empty subset of {list(DROP_KEYS)}")
    return tuple(k for k in DROP_KEYS if k in names)


def token_cfg_weights(B: int, N: int, w_speak: float, w_listen: float, speaking_tokens: Tensor | None, device) -> Tensor:
    """Per-token CFG weight (B, N): ``w_speak`` where ``speaking_tokens`` (B, N) is True, else ``w_listen``.

    ``speaking_tokens`` may be None only when the two weights are equal.
    """
    if speaking_tokens is None:
        if w_speak != w_listen:
            raise ValueError(f"arflow.sample: w_speak={w_speak} != w_listen={w_listen} needs speaking_tokens (B, n_tokens)")
        return torch.full((B, N), w_speak, device=device)
    if tuple(speaking_tokens.shape) != (B, N):
        raise ValueError(f"arflow.sample: speaking_tokens has shape {tuple(speaking_tokens.shape)}, expected ({B}, {N})")
    return torch.where(speaking_tokens.to(device, torch.bool), w_speak, w_listen).float()  # (B, N)


def adapter_mask(model, B: int, N: int, speaking_tokens: Tensor | None, device) -> Tensor | None:
    """The speaking mask (B, N) bool a model with a listening adapter or listening low-rank updates needs
    (None for a model without them)."""
    if not takes_speaking(model):
        return None
    if speaking_tokens is None:
        raise ValueError("arflow.sample: the model has a listening adapter or listening low-rank updates, so sampling "
                         "needs speaking_tokens (B, n_tokens) (the actor's speaking tokens) whatever the CFG weights")
    if tuple(speaking_tokens.shape) != (B, N):
        raise ValueError(f"arflow.sample: speaking_tokens has shape {tuple(speaking_tokens.shape)}, expected ({B}, {N})")
    return speaking_tokens.to(device, torch.bool)


PER_TOKEN = ("partner_latent", "speaking_tokens")  # conditioning tensors with one entry per motion token


def _cond_rows(cond: Mapping[str, Tensor], idx) -> dict[str, Tensor]:
    """Rows ``idx`` of every tensor of a conditioning dict."""
    return {key: v[idx] for key, v in cond.items() if key in COND_KEYS and v is not None}


def _cond_upto(cond: Mapping[str, Tensor], n: int, r: int) -> dict[str, Tensor]:
    """The conditioning of a window's first n tokens: audio frames [0, n r), partner tokens [0, n)."""
    return {key: (v[:, :n * r] if key in ("actor_audio", "partner_audio") else v[:, :n] if key in PER_TOKEN else v)
            for key, v in cond.items() if key in COND_KEYS and v is not None}


@contextlib.contextmanager
def eval_mode(model):
    """Run ``model`` in eval mode (dropout off) and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class _GuidedVelocity:
    """Velocity of token l for B rows, CFG-combined over the stacked [cond; uncond] batch (2B rows)
    when ``use_cfg``; reads and extends a KV cache when ``use_cache``. With a causal prefix the cache
    starts empty and :meth:`extend` adds each token's prefix group; without a cache the conditioning
    of the last :meth:`extend` is used."""

    def __init__(self, model, cond: Mapping[str, Tensor], B: int, N: int, use_cfg: bool, use_cache: bool,
                 cfg_drop: tuple[str, ...] = DROP_KEYS):
        self.model, self.B, self.use_cfg, self.use_cache = model, B, use_cfg, use_cache
        self.takes_speaking = takes_speaking(model)  # only then the velocity takes a speaking mask
        self.causal = bool(getattr(model.cfg, "causal_prefix", False))  # duck-typed models may lack it
        keep, null = {key: False for key in DROP_KEYS}, {key: key in cfg_drop for key in DROP_KEYS}
        if self.use_cfg:
            dev = cond["text_emb"].device
            off, on = torch.zeros(B, dtype=torch.bool, device=dev), torch.ones(B, dtype=torch.bool, device=dev)
            self.drop = {key: torch.cat([off, on if null[key] else off]) for key in DROP_KEYS}
        else:
            self.drop = keep
        self.cond = self.rows_cond(cond)
        if use_cache and self.causal:
            self.cache = model.start(self.cond, self.drop, n_tokens=N, groups=0)  # prefix groups come with extend
        elif use_cache and self.use_cfg and all(null.values()) and not context_gated(model):
            # the unconditional prefix (all nulls) is the same for every row: run it once, copy it B times
            uncond = model.start(_cond_rows(cond, slice(0, 1)), null, n_tokens=N)  # 1 row
            self.cache = KVCache.cat([model.start(cond, keep, n_tokens=N), uncond.repeat_interleave(B)])
        elif use_cache and self.use_cfg:  # a partial unconditional branch keeps some conditions: one prefix per row
            self.cache = KVCache.cat([model.start(cond, keep, n_tokens=N), model.start(cond, null, n_tokens=N)])
        elif use_cache:
            self.cache = model.start(self.cond, self.drop, n_tokens=N)
        else:
            self.cache = None  # every step recomputes the whole sequence (velocity_uncached)

    def rows_cond(self, cond: Mapping[str, Tensor]):  # B rows -> R rows of conditioning
        if self.use_cfg:
            return {key: torch.cat([v, v]) for key, v in cond.items() if key in COND_KEYS and v is not None}  # 2B rows
        return cond

    def rows(self, x: Tensor) -> Tensor:  # (B, ...) -> (R, ...), R = 2B with CFG else B
        return torch.cat([x, x]) if self.use_cfg else x

    def extend(self, cond: Mapping[str, Tensor], l: int) -> None:
        """Causal prefix: the conditioning up to token l (B rows) is known; add token l's prefix group."""
        if not self.causal:
            return
        self.cond = self.rows_cond(cond)
        if self.use_cache:
            self.model.extend(self.cache, self.cond, self.drop)

    def __call__(self, x: Tensor, t: Tensor, l: int, history: Tensor, w: Tensor | None,
                 speaking: Tensor | None = None) -> Tensor:
        """x (B, Dv), t (R,), history (B, l, Dv) (read only without a cache), w (B,) CFG weight, speaking (B,)
        bool (the listening parts' mask) -> v (B, Dv)."""
        xin = self.rows(x)  # (R, Dv)
        spk = {"speaking": self.rows(speaking)} if self.takes_speaking and speaking is not None else {}  # (R,)
        if self.use_cache:
            v = self.model.velocity(self.cache, xin, t, l, **spk)  # (R, Dv)
        else:
            v = self.model.velocity_uncached(self.cond, self.rows(history), xin, t, self.drop, **spk)  # (R, Dv)
        if self.use_cfg:
            v = cfg_combine(v[:self.B], v[self.B:], w)  # (B, Dv)
        return v

    def commit(self, x: Tensor, l: int) -> None:
        """Token l (B, Dv) is final: write it into the cache (both branches; with context updates its
        speaking mask from the conditioning, ``cond["speaking_tokens"]``)."""
        if self.use_cache:
            spk = {"speaking": self.cond["speaking_tokens"][:, l]} if context_gated(self.model) else {}
            self.model.append(self.cache, self.rows(x), l, **spk)


def _check_settings(steps, sigma, sde) -> float:
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"arflow.sample: sigma must be finite and >= 0, got {sigma}")
    if sde not in SDE_KINDS:
        raise ValueError(f"arflow.sample: sde must be one of {SDE_KINDS}, got {sde!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"arflow.sample: steps must be a positive integer, got {steps!r}")
    return sigma


class WindowSampler:
    """Auto-regressive sampling of one window of ``n_tokens`` tokens, one token per :meth:`advance`.

    ``cond``: the window's conditioning (B rows); with a causal prefix it may hold only the tokens
    known so far (the batch size and text are what the start needs). ``guided``: run the
    unconditional CFG branch (then every generated token needs its weight). Settings as
    :func:`sample`. The caller keeps the model in eval mode (:func:`eval_mode`). ``out`` (B, n_tokens, Dv)
    holds the tokens so far.
    """

    def __init__(self, model, cond: Mapping[str, Tensor], n_tokens: int, *, steps: int, guided: bool, sigma: float = 0.0,
                 sde: str = "paper", generator: torch.Generator | None = None, use_cache: bool = True,
                 cfg_drop=DROP_KEYS, sde_window=None):
        self.model, self.N, self.steps = model, int(n_tokens), int(steps)
        self.sigma, self.sde, self.generator = _check_settings(steps, sigma, sde), sde, generator
        self.window = sde_window_steps(sde_window, self.steps)  # [a, b): the SDE steps when sigma > 0
        self.B = cond["text_emb"].shape[0]
        self.guided = _GuidedVelocity(model, cond, self.B, self.N, bool(guided), use_cache, check_cfg_drop(cfg_drop))
        self.out = cond["text_emb"].new_empty(self.B, self.N, model.cfg.d_latent)
        self.dev = cond["text_emb"].device
        dt = 1.0 / self.steps
        R = 2 * self.B if guided else self.B
        self.t_grid = [torch.full((R,), s * dt, device=self.dev) for s in range(self.steps)]  # (R,) per step
        self.next = 0  # tokens done

    def advance(self, cond: Mapping[str, Tensor], given: Tensor | None = None, w: Tensor | None = None,
                speaking: Tensor | None = None) -> Tensor:
        """Token l = ``next``: ``given`` (B, Dv) = a prefix token (copied), else generated with CFG weight
        ``w`` (B,) (needed when guided) -> token l (B, Dv). ``cond``: the window's conditioning holding at
        least tokens [0, l] (a causal prefix reads token l's; later tokens are ignored). ``speaking`` (B,)
        bool: token l's speaking mask, needed by a model with listening parts (adapter, LoRA)."""
        l, d_latent = self.next, self.model.cfg.d_latent
        if l >= self.N:
            raise IndexError(f"WindowSampler: all {self.N} tokens of the window are done")
        if self.guided.causal:
            self.guided.extend(_cond_upto(cond, l + 1, self.model.cfg.r), l)
        if given is not None:
            x = given
        else:
            if self.guided.use_cfg and w is None:
                raise ValueError(f"WindowSampler: token {l} needs its CFG weight w (guided window)")
            x = torch.randn((self.B, d_latent), generator=self.generator, device=self.dev, dtype=self.out.dtype)  # t = 0
            dt = 1.0 / self.steps
            for s in range(self.steps):
                v = self.guided(x, self.t_grid[s], l, self.out[:, :l], w, speaking)  # (B, Dv)
                if self.sigma > 0:  # every step draws its noise; an ODE step of a mixed sampler scales it by 0
                    noise = torch.randn((self.B, d_latent), generator=self.generator, device=self.dev, dtype=self.out.dtype)
                    sig = step_sigma(self.sigma, s, self.window)
                    x = sde_step(x, sde_drift(x, v, s * dt, sig, self.sde), dt, sig, noise)
                else:
                    x = euler_step(x, v, dt)
        self.out[:, l] = x
        if l + 1 < self.N:
            self.guided.commit(x, l)
        self.next = l + 1
        return x


@torch.no_grad()
def sample(model, cond: Mapping[str, Tensor], n_tokens: int | None = None, steps: int = 10, w_speak: float = 1.0,
           w_listen: float = 1.0, speaking_tokens: Tensor | None = None, sigma: float = 0.0,
           generator: torch.Generator | None = None, prefix: Tensor | None = None, use_cache: bool = True,
           sde: str = "paper", cfg_drop=DROP_KEYS, sde_window=None) -> Tensor:
    """Generate ``n_tokens`` latents (B, n_tokens, Dv) of one window auto-regressively (module docstring).

    ``n_tokens`` defaults to the partner tokens of ``cond``. CFG runs when w_speak or w_listen != 1;
    ``speaking_tokens`` (B, n_tokens) bool is required when the two weights differ. ``sigma`` > 0
    selects the SDE with drift ``sde`` ("paper" or "marginal"), on the steps of ``sde_window`` (None: all;
    ``(a, b)``: steps a .. b-1, ODE steps elsewhere). ``cfg_drop``: the conditions the
    unconditional branch nulls (:func:`check_cfg_drop`; default all). ``prefix`` (B, k, Dv): the first k
    tokens are given (copied to the output), generation starts at token k. ``use_cache`` False
    recomputes the whole sequence every step (reference path, same result up to float rounding).
    Runs the model in eval mode (dropout off; the previous mode is restored).
    """
    w_speak, w_listen = check_cfg_weight("w_speak", w_speak), check_cfg_weight("w_listen", w_listen)
    _check_settings(steps, sigma, sde)
    sde_window_steps(sde_window, steps)
    cfg_drop = check_cfg_drop(cfg_drop)
    B, L, Np = model.check_cond(cond)
    d_latent, r = model.cfg.d_latent, model.cfg.r
    N = Np if n_tokens is None else int(n_tokens)
    if not 1 <= N <= Np or N * r > L:
        raise ValueError(f"arflow.sample: n_tokens={N} needs 1 <= n_tokens <= {Np} partner tokens and "
                         f"{N * r} audio frames (have {L})")
    k = 0 if prefix is None else prefix.shape[1]
    if prefix is not None and (prefix.dim() != 3 or prefix.shape[0] != B or prefix.shape[2] != d_latent or k >= N):
        raise ValueError(f"arflow.sample: prefix has shape {tuple(prefix.shape)}, expected ({B}, k < {N}, {d_latent})")
    dev = cond["text_emb"].device
    use_cfg = w_speak != 1.0 or w_listen != 1.0
    w_tok = token_cfg_weights(B, N, w_speak, w_listen, speaking_tokens, dev) if use_cfg else None  # (B, N)
    spk = adapter_mask(model, B, N, speaking_tokens, dev)  # (B, N) or None
    if context_gated(model) and cond.get("speaking_tokens") is None:  # the context entries read it from cond
        if N != Np:
            raise ValueError(f"arflow.sample: a model whose listening updates act on the context needs "
                             f"cond['speaking_tokens'] for all {Np} tokens of the window (speaking_tokens has {N})")
        cond = {**cond, "speaking_tokens": spk}

    with eval_mode(model):
        sampler = WindowSampler(model, cond, N, steps=steps, guided=use_cfg, sigma=sigma, sde=sde, generator=generator,
                                use_cache=use_cache, cfg_drop=cfg_drop, sde_window=sde_window)
        for l in range(N):
            sampler.advance(cond, prefix[:, l] if l < k else None, None if w_tok is None else w_tok[:, l],
                            None if spk is None else spk[:, l])
        return sampler.out


def window_step(model, cond: Mapping[str, Tensor], n: int, prefix: Tensor | None, speaking_tokens: Tensor | None, *,
                steps: int, w_speak: float, w_listen: float, sigma: float, generator: torch.Generator | None,
                use_cache: bool, sde: str, cfg_drop=DROP_KEYS, sde_window=None) -> Tensor:
    """One window of sliding-window generation -> its new latents (B, n - k_w, Dv).

    ``cond``: the window's conditioning (n * r audio frames, n partner tokens); ``prefix`` (B, k_w, Dv):
    its first k_w tokens, already generated (None: k_w = 0, the first window); ``speaking_tokens``
    (B, n) for the window's tokens (entries of the prefix tokens are unused). The one per-window
    step of :func:`generate_long` and of ``agents.streaming.StreamingGenerator``, so the two draw the
    same noise in the same order from ``generator`` and agree bit for bit.
    """
    x = sample(model, cond, n, steps=steps, w_speak=w_speak, w_listen=w_listen, speaking_tokens=speaking_tokens,
               sigma=sigma, generator=generator, prefix=prefix, use_cache=use_cache, sde=sde, cfg_drop=cfg_drop,
               sde_window=sde_window)  # (B, n, Dv)
    return x[:, 0 if prefix is None else prefix.shape[1]:]


def window_schedule(n_total: int, W: int, k: int = 1, causal: bool = False) -> list[tuple[int, int, int]]:
    """Windows ``[(start, length, first_new), ...]`` (tokens) of long generation.

    Bidirectional prefix: ``envs.windows.sliding_windows`` (the last window shifted back to end at
    ``n_total``). Causal prefix: each window starts k tokens before the end of what is generated
    (stride W - k) and the last one is cut short at ``n_total``; its tokens are then exactly those
    of the full window, so a stream can emit them before it knows the length.
    """
    if not causal:
        return sliding_windows(n_total, W, k)
    if n_total < 1 or W < 2 or not 1 <= k < W:
        raise ValueError(f"window_schedule: need n_total >= 1, W >= 2 and 1 <= k < W; got n_total={n_total}, W={W}, k={k}")
    out, end = [], 0
    while end < n_total:
        s0 = 0 if end == 0 else end - k
        n = min(W, n_total - s0)
        out.append((s0, n, end))
        end = s0 + n
    return out


def _window_slicer(cond: Mapping[str, Tensor], r: int) -> Callable[[int, int], dict[str, Tensor]]:
    """``cond_fn(start_frame, n_frames)`` slicing full-length conditioning: audio per frame, partner
    latents per token; text and the masks are shared by every window."""

    def cond_fn(f0: int, nf: int) -> dict[str, Tensor]:
        return {key: (v[:, f0:f0 + nf] if key in ("actor_audio", "partner_audio")
                      else v[:, f0 // r:(f0 + nf) // r] if key in PER_TOKEN else v)
                for key, v in cond.items() if key in COND_KEYS and v is not None}

    return cond_fn


@torch.no_grad()
def generate_long(model, cond: Mapping[str, Tensor] | Callable[[int, int], Mapping[str, Tensor]], total_frames: int,
                  window: int | None = None, k: int = 1, steps: int = 10, w_speak: float = 1.0, w_listen: float = 1.0,
                  speaking_tokens: Tensor | None = None, sigma: float = 0.0, generator: torch.Generator | None = None,
                  use_cache: bool = True, sde: str = "paper", cfg_drop=DROP_KEYS, sde_window=None) -> Tensor:
    """Sliding-window generation of ``total_frames`` frames -> latents (B, total_frames / r, Dv).

    Windows of W = window / r tokens (default the model's config window); the schedule is
    ``envs.windows.sliding_windows``: each next window starts k tokens before the end of what is
    generated and gets those latents as ``prefix`` (stride W - k); the last window is shifted back to
    end exactly at the last token (it then gets more than k prefix tokens), or, with a causal prefix,
    cut short there (:func:`window_schedule`). TMRoPE positions restart
    at 0 in every window, as in training. Each window is one :func:`sample` call with the same
    ``steps``, CFG weights and ``cfg_drop``, ``sigma``, ``sde``, ``sde_window``, ``generator`` and ``use_cache``.

    ``cond``: either full-length features (text_emb (B, d_text) and the masks are shared by all
    windows; actor_audio / partner_audio (B, >= total_frames, Da); partner_latent
    (B, >= total_frames / r, Dv)), sliced per window, or a callable
    ``cond_fn(start_frame, n_frames) -> cond`` for one window. ``speaking_tokens``: (B, total_frames / r).
    """
    r = model.cfg.r
    window = model.cfg.window if window is None else int(window)
    if window % r or window < 2 * r:
        raise ValueError(f"arflow.generate_long: window={window} must be a multiple of r={r} holding >= 2 tokens")
    W = window // r
    if int(total_frames) != total_frames or total_frames < r or total_frames % r:
        raise ValueError(f"arflow.generate_long: total_frames={total_frames} must be a positive multiple of r={r}")
    if not 1 <= k < W:
        raise ValueError(f"arflow.generate_long: k={k} prefix tokens must be in [1, {W - 1}] for a {W}-token window")
    check_cfg_weight("w_speak", w_speak), check_cfg_weight("w_listen", w_listen)
    cfg_drop = check_cfg_drop(cfg_drop)
    n_total = int(total_frames) // r
    if callable(cond):
        cond_fn = cond
    else:
        model.check_cond(cond)
        for key in ("actor_audio", "partner_audio"):
            if cond[key].shape[1] < total_frames:
                raise ValueError(f"arflow.generate_long: cond[{key!r}] has {cond[key].shape[1]} frames, "
                                 f"fewer than the requested total_frames={total_frames}")
        if cond["partner_latent"].shape[1] < n_total:
            raise ValueError(f"arflow.generate_long: cond['partner_latent'] has {cond['partner_latent'].shape[1]} tokens, "
                             f"fewer than total_frames / r = {n_total}")
        cond_fn = _window_slicer(cond, r)
    if speaking_tokens is not None and speaking_tokens.shape[-1] != n_total:
        raise ValueError(f"arflow.generate_long: speaking_tokens has {speaking_tokens.shape[-1]} tokens, expected {n_total}")
    out = None
    for s0, n, new0 in window_schedule(n_total, W, k, causal=bool(getattr(model.cfg, "causal_prefix", False))):
        x = window_step(model, cond_fn(s0 * r, n * r), n, None if new0 == s0 else out[:, s0:new0],
                        None if speaking_tokens is None else speaking_tokens[:, s0:s0 + n], steps=steps,
                        w_speak=w_speak, w_listen=w_listen, sigma=sigma, generator=generator, use_cache=use_cache,
                        sde=sde, cfg_drop=cfg_drop, sde_window=sde_window)  # (B, n - (new0 - s0), Dv)
        if out is None:
            out = x.new_empty(x.shape[0], n_total, x.shape[2])
        out[:, new0:s0 + n] = x
    return out
