"""AR-Flow sampling (agents/sampling.py): SDE drift variants, CFG weights per token, argument checks.

The sampler's agreement with the uncached reference, CFG and long generation are tested through
``ARFlow.sample`` / ``generate_long`` in test_arflow.py.
"""
import math
import types

import pytest
import torch
import torch.nn as nn

from gdpo_listener.agents import flow, sampling
from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
from gdpo_listener.envs.windows import token_majority

B = 2


def make_model(seed=0):
    """Tiny AR-Flow (4 tokens of 8 frames) with a non-zero output modulation, in eval mode."""
    torch.manual_seed(seed)
    m = ARFlow(ARFlowConfig(d_latent=6, d_text=12, d_audio=10, d_model=32, n_layers=2, n_heads=2, r=8, window=32))
    with torch.no_grad():
        m.final_mod.weight.normal_(std=0.05)
    return m.eval()


def make_cond(cfg, frames=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = cfg.window if frames is None else frames
    return {
        "text_emb": torch.randn(B, cfg.d_text, generator=g),
        "actor_audio": torch.randn(B, L, cfg.d_audio, generator=g),
        "partner_audio": torch.randn(B, L, cfg.d_audio, generator=g),
        "partner_latent": torch.randn(B, L // cfg.r, cfg.d_latent, generator=g),
    }


def _paper_loop(m, cond, steps, sigma, generator):
    """The eq. 7 sampler written out with the model's cached primitives (no CFG): per token x0, then
    x <- x + dt v + sigma sqrt(dt) eps; the finished token joins the cache."""
    N, d = m.cfg.n_tokens, m.cfg.d_latent
    keep = {"text": False, "audio": False, "motion": False}
    cache = m.start(cond, keep, n_tokens=N)
    out, dt = [], 1.0 / steps
    for l in range(N):
        x = torch.randn((B, d), generator=generator)
        for s in range(steps):
            v = m.velocity(cache, x, torch.full((B,), s * dt), l)
            x = flow.sde_step(x, v, dt, sigma, torch.randn((B, d), generator=generator))
        out.append(x)
        if l + 1 < N:
            m.append(cache, x, l)
    return torch.stack(out, dim=1)


def test_paper_sde_is_bit_identical_to_eq7():
    m = make_model()
    cond = make_cond(m.cfg)
    ref = _paper_loop(m, cond, 3, 0.5, torch.Generator().manual_seed(4))
    got = m.sample(cond, steps=3, sigma=0.5, sde="paper", generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, ref)
    default = sampling.sample(m, cond, steps=3, sigma=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(default, ref)  # "paper" is the default
    # with CFG and on the long path the default is "paper" as well
    sp = torch.tensor([[True, False, False, True], [False, False, True, True]])
    kw = dict(steps=2, w_speak=2.0, w_listen=0.5, speaking_tokens=sp, sigma=0.5)
    assert torch.equal(m.sample(cond, generator=torch.Generator().manual_seed(1), **kw),
                       m.sample(cond, sde="paper", generator=torch.Generator().manual_seed(1), **kw))


def test_marginal_sde_matches_written_out_drift():
    """sde="marginal": x <- x + dt (v - sigma^2 (x - t v) / (2 (1 - t))) + sigma sqrt(dt) eps, with CFG v."""
    m = make_model()
    cfg = m.cfg
    cond = make_cond(cfg)
    steps, sigma, ws, wl = 3, 0.7, 1.5, 2.5
    sp = torch.tensor([[True, False, True, False], [False, True, True, False]])
    out = m.sample(cond, steps=steps, w_speak=ws, w_listen=wl, speaking_tokens=sp, sigma=sigma, sde="marginal",
                   generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    null = {"text": True, "audio": True, "motion": True}
    hist = torch.zeros(B, 0, cfg.d_latent)
    for l in range(cfg.n_tokens):
        x = torch.randn((B, cfg.d_latent), generator=g)
        w = torch.where(sp[:, l], ws, wl)[:, None]
        for s in range(steps):
            t = s / steps
            tt = torch.full((B,), t)
            vc, vu = m.velocity_uncached(cond, hist, x, tt, drop={}), m.velocity_uncached(cond, hist, x, tt, drop=null)
            v = vu + w * (vc - vu)
            drift = v - sigma ** 2 * (x - t * v) / (2 * (1 - t))
            x = x + drift / steps + sigma * math.sqrt(1 / steps) * torch.randn((B, cfg.d_latent), generator=g)
        hist = torch.cat([hist, x[:, None]], dim=1)
    torch.testing.assert_close(out, hist, atol=1e-5, rtol=1e-5)
    paper = m.sample(cond, steps=steps, w_speak=ws, w_listen=wl, speaking_tokens=sp, sigma=sigma,
                     generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(out, paper, atol=1e-3)
    # without noise both drifts are the flow's velocity: the ODE sample is the same
    ode = dict(steps=steps, w_speak=ws, w_listen=wl, speaking_tokens=sp, sigma=0.0)
    assert torch.equal(m.sample(cond, sde="marginal", generator=torch.Generator().manual_seed(2), **ode),
                       m.sample(cond, generator=torch.Generator().manual_seed(2), **ode))


class _GaussianFlow(nn.Module):
    """Duck-typed AR-Flow with the exact velocity of data x1 ~ N(mean, std^2 I) (one token, no conditioning)."""

    def __init__(self, mean: float, std: float, d: int = 2):
        super().__init__()
        self.mean, self.std = mean, std
        self.cfg = types.SimpleNamespace(d_latent=d, r=1)

    def check_cond(self, cond):
        return cond["text_emb"].shape[0], cond["actor_audio"].shape[1], cond["partner_latent"].shape[1]

    def start(self, cond, drop, n_tokens):
        return None

    def append(self, cache, x, l):
        pass

    def velocity(self, cache, x, t, l):  # E[x1 - x0 | x_t] = (E[x1 | x_t] - x_t) / (1 - t)
        t, m, s2 = t[:, None], self.mean, self.std ** 2
        e1 = m + t * s2 * (x - t * m) / (t * t * s2 + (1 - t) ** 2)
        return (e1 - x) / (1 - t)


def test_marginal_sde_keeps_the_data_distribution_and_paper_sde_widens_it():
    n = 8000
    cond = {"text_emb": torch.zeros(n, 1), "actor_audio": torch.zeros(n, 1, 1), "partner_audio": torch.zeros(n, 1, 1),
            "partner_latent": torch.zeros(n, 1, 2)}
    model = _GaussianFlow(mean=2.0, std=0.5)
    x = {sde: sampling.sample(model, cond, 1, steps=20, sigma=1.0, sde=sde, generator=torch.Generator().manual_seed(0))
         for sde in flow.SDE_KINDS}
    assert abs(float(x["marginal"].mean()) - 2.0) < 0.03
    assert abs(float(x["marginal"].std()) - 0.5) < 0.03
    assert float(x["paper"].std()) > 0.8  # eq. 7 as printed adds the noise on top of the flow's spread


def test_generate_long_passes_sde_to_every_window():
    m = make_model()
    cfg = m.cfg
    cond = make_cond(cfg, frames=80)  # 10 tokens: windows [0, 4), [3, 7), [6, 10)
    out = m.generate_long(cond, 80, steps=2, sigma=0.5, sde="marginal", generator=torch.Generator().manual_seed(3))
    first = {k: (v[:, :32] if "audio" in k else v[:, :4] if k == "partner_latent" else v) for k, v in cond.items()}
    ref = m.sample(first, 4, steps=2, sigma=0.5, sde="marginal", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out[:, :4], ref, atol=1e-6, rtol=1e-6)
    paper = m.generate_long(cond, 80, steps=2, sigma=0.5, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(out[:, 4:], paper[:, 4:], atol=1e-3)


def test_bad_sde_kind_raises():
    m = make_model()
    cond = make_cond(m.cfg)
    with pytest.raises(ValueError, match="sde must be one of.*'ito'"):
        m.sample(cond, sigma=0.5, sde="ito")
    with pytest.raises(ValueError, match="sde must be one of.*'ito'"):
        m.generate_long(cond, 32, sigma=0.5, sde="ito")


def test_check_cfg_drop():
    assert sampling.check_cfg_drop(None) == ("text", "audio", "motion")  # the paper's unconditional branch
    assert sampling.check_cfg_drop(["motion", "text"]) == ("text", "motion")  # DROP_KEYS order
    assert sampling.check_cfg_drop("audio") == ("audio",)
    with pytest.raises(ValueError, match=r"cfg_drop=\['motion', 'gaze'\]: unknown \['gaze'\]"):
        sampling.check_cfg_drop(["motion", "gaze"])
    with pytest.raises(ValueError, match="cfg_drop=\\[\\]: empty"):
        sampling.check_cfg_drop([])
    with pytest.raises(ValueError, match="cfg_drop=3 must be a list"):
        sampling.check_cfg_drop(3)
    m = make_model()
    with pytest.raises(ValueError, match="unknown \\['video'\\]"):  # refused before any sampling
        m.sample(make_cond(m.cfg), steps=1, w_listen=2.0, cfg_drop=["video"])


def test_token_cfg_weights_and_speaking_tokens():
    sp = torch.tensor([[True, False, True]])
    assert sampling.token_cfg_weights(1, 3, 2.0, 0.5, sp, "cpu").tolist() == [[2.0, 0.5, 2.0]]
    assert sampling.token_cfg_weights(1, 3, 1.5, 1.5, None, "cpu").tolist() == [[1.5, 1.5, 1.5]]
    with pytest.raises(ValueError, match="needs speaking_tokens"):
        sampling.token_cfg_weights(1, 3, 2.0, 0.5, None, "cpu")
    with pytest.raises(ValueError, match=r"shape \(1, 2\), expected \(1, 3\)"):
        sampling.token_cfg_weights(1, 3, 2.0, 0.5, sp[:, :2], "cpu")
    # speaking tokens come from the per-frame VAD by a strict majority of the token's r frames
    vad = torch.zeros(2, 16, dtype=torch.bool)
    vad[0, :5] = True   # token 0: 5 of 8 -> speaking
    vad[0, 8:12] = True  # token 1: 4 of 8 (tie) -> not speaking
    vad[1, 8:] = True
    assert token_majority(vad, 8).tolist() == [[True, False], [False, True]]
