"""AR-Flow transformer (agents/arflow.py): positions, masks, KV cache, CFG, sampling, long generation.

The shared rotary/attention parts are tested in test_attention.py, the sampler's SDE variants in
test_sampling.py; here sampling is exercised through the model's ``sample`` / ``generate_long``.
"""
import json
import math

import pytest
import torch

from gdpo_listener.agents import flow
from gdpo_listener.agents.arflow import (
    AUDIO,
    MOTION,
    TEXT,
    ARFlow,
    ARFlowConfig,
    attention_mask,
    causal_prefix_mask,
    count_parameters,
    load_arflow,
    prefix_layout,
    prefix_positions,
    save_arflow,
    token_positions,
)
from gdpo_listener.agents.checkpoint import CheckpointError
from gdpo_listener.agents.sampling import window_schedule

B = 2


def tiny_cfg(**kw):
    base = dict(d_latent=6, d_text=12, d_audio=10, d_model=32, n_layers=2, n_heads=2, r=8, window=32, dropout=0.0)
    return ARFlowConfig(**{**base, **kw})


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = ARFlow(tiny_cfg(**kw))
    # give the zero-initialised output modulation some weight, so flow time acts on the output too
    with torch.no_grad():
        m.final_mod.weight.normal_(std=0.05)
    return m.eval()


def make_cond(cfg, batch=B, frames=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    L = cfg.window if frames is None else frames
    return {
        "text_emb": torch.randn(batch, cfg.d_text, generator=g),
        "text_mask": torch.ones(batch, dtype=torch.bool),
        "actor_audio": torch.randn(batch, L, cfg.d_audio, generator=g),
        "partner_audio": torch.randn(batch, L, cfg.d_audio, generator=g),
        "partner_latent": torch.randn(batch, L // cfg.r, cfg.d_latent, generator=g),
        "partner_has_motion": torch.ones(batch, dtype=torch.bool),
    }


# ---------------------------------------------------------------------------------------------
# positions and masks


def test_tmrope_prefix_layout():
    L, N, r = 16, 2, 8
    pos = prefix_positions(L, N, r)
    audio = list(range(L))
    assert pos.tolist() == [0] + audio + [4, 12] + audio
    assert token_positions(3, r, start=2).tolist() == [20, 28, 36]
    # r = 5: offset floor(5 / 2) = 2
    assert token_positions(3, 5).tolist() == [2, 7, 12]
    # audio_stride s: audio token i covers frames [i s, (i + 1) s) and sits at their centre
    audio4 = [1.5, 5.5, 9.5, 13.5]
    assert prefix_positions(L, N, r, audio_stride=4).tolist() == [0] + audio4 + [4, 12] + audio4


def test_model_uses_tmrope_positions(monkeypatch):
    """The full pass rotates [prefix; clean; noisy] with text 0, audio i, token j -> j r + r // 2."""
    m = make_model()
    cfg = m.cfg
    seen = []
    orig = m._rope
    monkeypatch.setattr(m, "_rope", lambda pos: (seen.append(pos.clone()), orig(pos))[1])
    cond = make_cond(cfg)
    x = torch.randn(B, 4, cfg.d_latent)
    m(cond, x, x, torch.rand(B, 4))
    toks = [j * 8 + 4 for j in range(4)]
    expect = [0] + list(range(32)) + toks + list(range(32)) + toks + toks
    assert seen[-1].tolist() == expect


def test_attention_mask_structure():
    P, n = 3, 4
    m = attention_mask(P, n, torch.arange(n))
    assert m.shape == (P + 2 * n, P + 2 * n)
    assert m[:P, :P].all() and not m[:P, P:].any()  # prefix: bidirectional, nothing else
    for j in range(n):
        row = m[P + j]
        assert row[:P].all()
        assert row[P:P + n].tolist() == [i <= j for i in range(n)]
        assert not row[P + n:].any()
    for l in range(n):
        row = m[P + n + l]
        assert row[:P].all()
        assert row[P:P + n].tolist() == [i < l for i in range(n)]
        assert row[P + n:].tolist() == [i == l for i in range(n)]


# ---------------------------------------------------------------------------------------------
# teacher forcing vs incremental computation (the key mask test)


@pytest.mark.parametrize("audio_stride,causal", [(1, False), (4, False), (1, True), (4, True)])
def test_forward_equals_uncached_incremental_for_every_token(audio_stride, causal):
    m = make_model(audio_stride=audio_stride, causal_prefix=causal)
    cfg = m.cfg
    N = cfg.n_tokens
    g = torch.Generator().manual_seed(3)
    cond = make_cond(cfg)
    cond["text_mask"] = torch.tensor([True, False])  # one row with the null text
    x_clean = torch.randn(B, N, cfg.d_latent, generator=g)
    x_noisy = torch.randn(B, N, cfg.d_latent, generator=g)
    t = torch.rand(B, N, generator=g)
    v = m(cond, x_clean, x_noisy, t)
    assert v.shape == (B, N, cfg.d_latent)
    for l in range(N):
        ref = m.velocity_uncached(cond, x_clean[:, :l], x_noisy[:, l], t[:, l])
        torch.testing.assert_close(v[:, l], ref, atol=1e-5, rtol=1e-5)
    # the future of the clean sequence never leaks into earlier tokens
    x_future = x_clean.clone()
    x_future[:, 2:] = torch.randn(B, N - 2, cfg.d_latent, generator=g)
    v2 = m(cond, x_future, x_noisy, t)
    torch.testing.assert_close(v2[:, :3], v[:, :3], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(v2[:, 3], v[:, 3], atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_cached_velocity_and_append_match_uncached(causal):
    m = make_model(causal_prefix=causal)
    cfg = m.cfg
    N = cfg.n_tokens
    g = torch.Generator().manual_seed(4)
    cond = make_cond(cfg)
    hist = torch.randn(B, N, cfg.d_latent, generator=g)
    cache = m.start(cond, n_tokens=N)
    for l in range(N):
        x_t, t = torch.randn(B, cfg.d_latent, generator=g), torch.rand(B, generator=g)
        before = [k[:, :, :cache.history_slot(l)].clone() for k in cache.k]
        v1 = m.velocity(cache, x_t, t, l)
        v1b = m.velocity(cache, x_t, t, l)  # repeated call: same answer (cache unchanged)
        assert all(torch.equal(b, k[:, :, :cache.history_slot(l)]) for b, k in zip(before, cache.k))
        torch.testing.assert_close(v1, v1b, atol=0, rtol=0)
        torch.testing.assert_close(v1, m.velocity_uncached(cond, hist[:, :l], x_t, t), atol=1e-5, rtol=1e-5)
        m.append(cache, hist[:, l], l)
    assert cache.length == N
    # a query for an earlier token re-uses its slot and restores the committed token afterwards
    snap = [k.clone() for k in cache.k]
    x_t, t = torch.randn(B, cfg.d_latent, generator=g), torch.rand(B, generator=g)
    torch.testing.assert_close(m.velocity(cache, x_t, t, 1), m.velocity_uncached(cond, hist[:, :1], x_t, t), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(snap, cache.k))
    # batch helpers
    sub = cache.select(torch.tensor([1]))
    torch.testing.assert_close(m.velocity(sub, x_t[1:], t[1:], 1), m.velocity(cache, x_t, t, 1)[1:], atol=1e-6, rtol=1e-6)
    rep = cache.repeat_interleave(2)
    assert rep.batch_size == 2 * B and torch.equal(rep.k[0][2], cache.k[0][1])
    with pytest.raises(ValueError, match="history"):
        m.velocity(m.start(cond, n_tokens=N), x_t, t, 2)  # token 2 without history 0, 1


# ---------------------------------------------------------------------------------------------
# causal-in-time prefix


def test_causal_prefix_mask_structure():
    L, N, r, s = 16, 2, 8, 4  # audio tokens at 1.5, 5.5 (token 0), 9.5, 13.5 (token 1)
    lay = prefix_layout(L, N, r, audio_stride=s)
    assert lay.kind.tolist() == [TEXT] + [AUDIO] * 4 + [MOTION] * 2 + [AUDIO] * 4
    assert lay.tok.tolist() == [0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    m = causal_prefix_mask(lay, lay)
    names = ["txt", "pa0", "pa1", "pa2", "pa3", "pm0", "pm1", "aa0", "aa1", "aa2", "aa3"]
    seen = {q: {k for k, ok in zip(names, row) if ok} for q, row in zip(names, m.tolist())}
    assert seen["txt"] == {"txt"}
    assert seen["pa1"] == seen["aa1"] == {"txt", "pa0", "pa1", "aa0", "aa1"}  # audio: both streams, timestamps <= own
    assert seen["pm0"] == {"txt", "pa0", "pa1", "aa0", "aa1", "pm0"}  # partner motion: the prefix of tokens <= own
    assert seen["pm1"] == set(names)
    full = attention_mask(len(lay), 2, torch.arange(2), lay.tok, m)
    P = len(lay)
    assert torch.equal(full[:P, :P], m) and not full[:P, P:].any()
    for j in range(2):  # clean j and noisy j see the prefix entries of tokens <= j
        assert full[P + j, :P].tolist() == (lay.tok <= j).tolist() == full[P + 2 + j, :P].tolist()


@pytest.mark.parametrize("audio_stride", [1, 4])
def test_causal_token_depends_only_on_audio_up_to_its_last_frame(audio_stride):
    m = make_model(audio_stride=audio_stride, causal_prefix=True)
    cfg = m.cfg
    N, g = cfg.n_tokens, torch.Generator().manual_seed(9)
    cond = make_cond(cfg)
    xc, xn, t = torch.randn(B, N, cfg.d_latent, generator=g), torch.randn(B, N, cfg.d_latent, generator=g), torch.rand(B, N, generator=g)
    v = m(cond, xc, xn, t)
    for j in range(1, N):  # change everything from token j's frames on: tokens < j are untouched, token j changes
        later = {**cond, "actor_audio": cond["actor_audio"].clone(), "partner_latent": cond["partner_latent"].clone()}
        later["actor_audio"][:, j * cfg.r:] += 1.0
        later["partner_latent"][:, j:] += 1.0
        v2 = m(later, xc, xn, t)
        assert torch.equal(v2[:, :j], v[:, :j]) and not torch.allclose(v2[:, j], v[:, j], atol=1e-4), j
    # a bidirectional model sees the future
    mb = make_model(audio_stride=audio_stride)
    later = {**cond, "actor_audio": cond["actor_audio"].clone()}
    later["actor_audio"][:, -cfg.r:] += 1.0
    assert not torch.allclose(mb(later, xc, xn, t)[:, 0], mb(cond, xc, xn, t)[:, 0], atol=1e-4)


def test_causal_cache_built_token_by_token_equals_start():
    m = make_model(audio_stride=4, causal_prefix=True)
    cfg = m.cfg
    N = cfg.n_tokens
    cond = make_cond(cfg, frames=cfg.window + 16)  # longer audio: entries of later tokens are never read
    whole = m.start(cond, n_tokens=N)
    inc = m.start({"text_emb": cond["text_emb"]}, n_tokens=N, groups=0)  # nothing known yet but the text
    assert inc.groups == 0 and whole.groups == N and inc.slots.size == whole.k[0].shape[2]
    g = torch.Generator().manual_seed(2)
    hist = torch.randn(B, N, cfg.d_latent, generator=g)
    with pytest.raises(ValueError, match="prefix group"):
        m.velocity(inc, hist[:, 0], torch.rand(B), 0)
    for j in range(N):
        upto = {**cond, "actor_audio": cond["actor_audio"][:, :(j + 1) * cfg.r],
                "partner_audio": cond["partner_audio"][:, :(j + 1) * cfg.r], "partner_latent": cond["partner_latent"][:, :j + 1]}
        m.extend(inc, upto)
        grp = inc.slots.group(j)
        for a, b in zip(inc.k, whole.k):
            torch.testing.assert_close(a[:, :, grp], b[:, :, grp], atol=1e-5, rtol=1e-5)
        x, t = torch.randn(B, cfg.d_latent, generator=g), torch.rand(B, generator=g)
        torch.testing.assert_close(m.velocity(inc, x, t, j), m.velocity_uncached(cond, hist[:, :j], x, t), atol=1e-5, rtol=1e-5)
        m.append(inc, hist[:, j], j)
        m.append(whole, hist[:, j], j)
    with pytest.raises(IndexError, match="all 4 prefix groups"):
        m.extend(inc, cond)
    with pytest.raises(ValueError, match="needs 16 audio frames"):
        m.extend(m.start(cond, n_tokens=N, groups=1), {**cond, "actor_audio": cond["actor_audio"][:, :8],
                                                      "partner_audio": cond["partner_audio"][:, :8]})
    with pytest.raises(ValueError, match="bidirectional"):
        make_model().extend(make_model().start(cond), cond)


@pytest.mark.parametrize("causal", [False, True])
def test_context_passes_equal_forward_with_gradient(causal):
    """encode_context once + velocity_in_context for any subset of noisy tokens == forward (values and gradients)."""
    m = make_model(audio_stride=4, causal_prefix=causal)
    cfg = m.cfg
    N, g = cfg.n_tokens, torch.Generator().manual_seed(5)
    cond = make_cond(cfg)
    xc, xn, t = torch.randn(B, N, cfg.d_latent, generator=g), torch.randn(B, N, cfg.d_latent, generator=g), torch.rand(B, N, generator=g)
    w = torch.randn(B, N, cfg.d_latent, generator=g)
    (m(cond, xc, xn, t) * w).sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ctx = m.encode_context(cond, xc)
    v = torch.cat([m.velocity_in_context(ctx, xn[:, :2], t[:, :2], torch.arange(2)),
                   m.velocity_in_context(ctx, xn[:, 2:], t[:, 2:], torch.arange(2, N))], dim=1)
    torch.testing.assert_close(v, m(cond, xc, xn, t), atol=1e-5, rtol=1e-5)
    (v * w).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_causal_generate_long_cuts_the_last_window_short():
    m = make_model(causal_prefix=True)
    cfg = m.cfg
    assert window_schedule(11, 4, 1, causal=True) == [(0, 4, 0), (3, 4, 4), (6, 4, 7), (9, 2, 10)]
    assert window_schedule(11, 4, 1) == [(0, 4, 0), (3, 4, 4), (6, 4, 7), (7, 4, 10)]  # bidirectional: shifted back
    for batch in (1, B):  # a causal stream (one row) can stop anywhere, bit for bit
        cond = make_cond(cfg, frames=88, batch=batch)
        long = m.generate_long(cond, 88, k=1, steps=2, generator=torch.Generator().manual_seed(3))
        short = m.generate_long(cond, 64, k=1, steps=2, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(short, long[:, :8], atol=0 if batch == 1 else 1e-6, rtol=0 if batch == 1 else 1e-6)


# ---------------------------------------------------------------------------------------------
# sampling


@pytest.mark.parametrize("sigma,audio_stride,causal,cfg_drop", [(0.0, 1, False, None), (0.5, 1, False, None), (0.5, 4, False, None),
                                                                 (0.5, 4, True, None), (0.5, 1, False, ["motion"]),
                                                                 (0.5, 4, True, ["text", "motion"])])
def test_cached_and_uncached_sampling_agree_with_cfg(sigma, audio_stride, causal, cfg_drop):
    m = make_model(audio_stride=audio_stride, causal_prefix=causal)
    cfg = m.cfg
    cond = make_cond(cfg)
    speaking = torch.tensor([[True, False, False, True], [False, False, True, True]])
    kw = dict(steps=3, w_speak=1.5, w_listen=2.5, speaking_tokens=speaking, sigma=sigma, cfg_drop=cfg_drop)
    a = m.sample(cond, cfg.n_tokens, generator=torch.Generator().manual_seed(7), use_cache=True, **kw)
    b = m.sample(cond, cfg.n_tokens, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert a.shape == (B, cfg.n_tokens, cfg.d_latent) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    c = m.sample(cond, cfg.n_tokens, generator=torch.Generator().manual_seed(8), **kw)
    assert not torch.allclose(a, c, atol=1e-3)  # the generator drives the noise


@pytest.mark.parametrize("sigma,cfg_drop", [(0.0, None), (0.5, None), (0.0, ("motion",)), (0.5, ("text", "audio"))])
def test_sample_matches_reference_loop(sigma, cfg_drop):
    """sample() = per token: x0 ~ N(0, I); per step v = CFG(v_cond, v_uncond, w_l) with w_l from speaking_tokens[:, l];
    x <- x + dt v (+ sigma sqrt(dt) eps); the finished token joins the history. Written out with velocity_uncached.
    The unconditional branch nulls ``cfg_drop`` (None: every condition, the paper's)."""
    m = make_model()
    cfg = m.cfg
    cond = make_cond(cfg)
    steps, ws, wl = 3, 0.5, 2.0
    speaking = torch.tensor([[True, False, True, False], [False, True, True, False]])
    out = m.sample(cond, steps=steps, w_speak=ws, w_listen=wl, speaking_tokens=speaking, sigma=sigma,
                   generator=torch.Generator().manual_seed(5), cfg_drop=cfg_drop)
    g = torch.Generator().manual_seed(5)
    everything = {k: cfg_drop is None or k in cfg_drop for k in ("text", "audio", "motion")}
    hist = torch.zeros(B, 0, cfg.d_latent)
    for l in range(cfg.n_tokens):
        x = torch.randn((B, cfg.d_latent), generator=g)
        w = torch.where(speaking[:, l], ws, wl)
        for s in range(steps):
            t = torch.full((B,), s / steps)
            vc = m.velocity_uncached(cond, hist, x, t, drop={})
            vu = m.velocity_uncached(cond, hist, x, t, drop=everything)
            v = vu + w[:, None] * (vc - vu)
            x = x + v / steps
            if sigma:
                x = x + sigma * math.sqrt(1 / steps) * torch.randn((B, cfg.d_latent), generator=g)
        hist = torch.cat([hist, x[:, None]], dim=1)
    torch.testing.assert_close(out, hist, atol=1e-5, rtol=1e-5)


def test_cfg_weight_one_equals_cond_only():
    m = make_model()
    cfg = m.cfg
    cond = make_cond(cfg)
    plain = m.sample(cond, steps=3, generator=torch.Generator().manual_seed(0))
    # CFG path active (w_listen != 1) but every token speaks with w_speak = 1
    all_speak = torch.ones(B, cfg.n_tokens, dtype=torch.bool)
    guided = m.sample(cond, steps=3, w_speak=1.0, w_listen=3.0, speaking_tokens=all_speak, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=1e-5)
    # and w = 0 on every token equals the unconditional model (all conditions null)
    uncond = m.sample(cond, steps=3, w_speak=0.0, w_listen=0.0, generator=torch.Generator().manual_seed(0))
    other = make_cond(cfg, seed=99)  # every condition different: the unconditional branch ignores them all
    x = m.sample(other, steps=3, generator=torch.Generator().manual_seed(0), w_speak=0.0, w_listen=0.0)
    torch.testing.assert_close(uncond, x, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(uncond, plain, atol=1e-3)
    # a partial unconditional branch still reads the conditions it keeps: w = 0 with cfg_drop=[motion] changes
    # with the audio, not with the partner's motion
    only_motion = dict(steps=3, w_speak=0.0, w_listen=0.0, cfg_drop=["motion"])
    a = m.sample(cond, generator=torch.Generator().manual_seed(0), **only_motion)
    moved = {**cond, "partner_latent": other["partner_latent"]}
    torch.testing.assert_close(m.sample(moved, generator=torch.Generator().manual_seed(0), **only_motion), a, atol=1e-5, rtol=1e-5)
    heard = {**cond, "actor_audio": other["actor_audio"]}
    assert not torch.allclose(m.sample(heard, generator=torch.Generator().manual_seed(0), **only_motion), a, atol=1e-3)


def test_condition_dropout_acts_only_through_nulls():
    m = make_model()
    cfg = m.cfg
    g = torch.Generator().manual_seed(2)
    cond = make_cond(cfg)
    N = cfg.n_tokens
    xc, xn, t = torch.randn(B, N, cfg.d_latent, generator=g), torch.randn(B, N, cfg.d_latent, generator=g), torch.rand(B, N, generator=g)
    yes, no = torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
    base = m(cond, xc, xn, t)
    changed = {
        "text": {**cond, "text_emb": torch.randn(B, cfg.d_text, generator=g)},
        "audio": {**cond, "actor_audio": torch.randn_like(cond["actor_audio"]), "partner_audio": torch.randn_like(cond["partner_audio"])},
        "motion": {**cond, "partner_latent": torch.randn_like(cond["partner_latent"])},
    }
    for key, other in changed.items():
        assert not torch.allclose(m(other, xc, xn, t), base, atol=1e-4), key  # the condition matters...
        d = {key: yes}
        torch.testing.assert_close(m(other, xc, xn, t, drop=d), m(cond, xc, xn, t, drop=d), atol=0, rtol=0)  # ...unless dropped
        assert not torch.allclose(m(cond, xc, xn, t, drop=d), base, atol=1e-4), key
    # missing text / partner motion use the same nulls as dropping them
    torch.testing.assert_close(m({**cond, "text_mask": no}, xc, xn, t), m(cond, xc, xn, t, drop={"text": yes}), atol=0, rtol=0)
    torch.testing.assert_close(m({**cond, "partner_has_motion": no}, xc, xn, t), m(cond, xc, xn, t, drop={"motion": yes}), atol=0, rtol=0)
    # per-row masks: row 0 dropped, row 1 untouched
    part = m(changed["text"], xc, xn, t, drop={"text": torch.tensor([True, False])})
    torch.testing.assert_close(part[0], m(cond, xc, xn, t, drop={"text": yes})[0], atol=0, rtol=0)
    torch.testing.assert_close(part[1], m(changed["text"], xc, xn, t)[1], atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown drop keys"):
        m(cond, xc, xn, t, drop={"txt": yes})


def test_training_mode_draws_condition_dropout_and_eval_is_deterministic():
    m = make_model(dropout=0.3, p_drop_text=0.5, p_drop_audio=0.5, p_drop_motion=0.5)
    cfg = m.cfg
    cond = make_cond(cfg, batch=8)
    g = torch.Generator().manual_seed(2)
    N = cfg.n_tokens
    xc, xn, t = torch.randn(8, N, cfg.d_latent, generator=g), torch.randn(8, N, cfg.d_latent, generator=g), torch.rand(8, N, generator=g)
    m.eval()
    torch.testing.assert_close(m(cond, xc, xn, t), m(cond, xc, xn, t), atol=0, rtol=0)
    m.train()
    torch.manual_seed(0)
    a = m(cond, xc, xn, t)
    b = m(cond, xc, xn, t)
    assert not torch.allclose(a, b)
    # explicit drop masks override the random condition dropout (only nn.Dropout remains random)
    m2 = make_model(p_drop_text=0.99, p_drop_audio=0.99, p_drop_motion=0.99).train()
    none = {"text": False, "audio": False, "motion": False}
    torch.testing.assert_close(m2(cond, xc, xn, t, drop=none), m2.eval()(cond, xc, xn, t), atol=0, rtol=0)


def test_flow_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    m = ARFlow(tiny_cfg()).train()
    cfg = m.cfg
    g = torch.Generator().manual_seed(0)
    cond = make_cond(cfg, batch=4)
    N = cfg.n_tokens
    x1 = torch.randn(4, N, cfg.d_latent, generator=g)
    x0 = torch.randn(4, N, cfg.d_latent, generator=g)
    t = torch.rand(4, N, generator=g)
    xt = flow.interpolate(x0, x1, t)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    no_drop = {"text": False, "audio": False, "motion": False}
    losses = []
    for _ in range(50):
        loss = flow.flow_matching_loss(m(cond, x1, xt, t, drop=no_drop), x0, x1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------------------------------------
# long generation, prefixes, validation


def test_prefix_tokens_are_kept_and_condition_the_rest():
    m = make_model()
    cfg = m.cfg
    cond = make_cond(cfg)
    pre = torch.randn(B, 1, cfg.d_latent)
    a = m.sample(cond, steps=2, prefix=pre, generator=torch.Generator().manual_seed(0))
    b = m.sample(cond, steps=2, prefix=pre, generator=torch.Generator().manual_seed(0), use_cache=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # with CFG the prefix goes into both the cond and the uncond rows
    a = m.sample(cond, steps=2, prefix=pre, w_speak=2.0, w_listen=2.0, generator=torch.Generator().manual_seed(0))
    b = m.sample(cond, steps=2, prefix=pre, w_speak=2.0, w_listen=2.0, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(a[:, :1], pre)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    c = m.sample(cond, steps=2, prefix=pre + 1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a[:, 1], c[:, 1], atol=1e-4)


def test_generate_long_length_and_first_window():
    m = make_model()
    cfg = m.cfg
    total = 80  # 10 tokens, windows of 4 tokens: [0, 4), [3, 7), [6, 10)
    cond = make_cond(cfg, frames=total + 8)  # longer features are fine; only total_frames are used
    out = m.generate_long(cond, total, k=1, steps=2, generator=torch.Generator().manual_seed(3))
    assert out.shape == (B, total // cfg.r, cfg.d_latent) and torch.isfinite(out).all()
    first = {k: (v[:, :32] if "audio" in k else v[:, :4] if k == "partner_latent" else v) for k, v in cond.items()}
    ref = m.sample(first, 4, steps=2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out[:, :4], ref, atol=1e-6, rtol=1e-6)
    # a callable cond_fn gets (start_frame, n_frames) per window
    calls = []

    def cond_fn(f0, nf):
        calls.append((f0, nf))
        return {k: (v[:, f0:f0 + nf] if "audio" in k else v[:, f0 // 8:(f0 + nf) // 8] if k == "partner_latent" else v)
                for k, v in cond.items()}

    out2 = m.generate_long(cond_fn, total, k=1, steps=2, generator=torch.Generator().manual_seed(3))
    assert calls == [(0, 32), (24, 32), (48, 32)]
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-6)


def test_generate_long_3600_frames():
    m = make_model(d_model=16, n_layers=1, n_heads=2, window=200)
    cond = make_cond(m.cfg, batch=1, frames=3600)
    out = m.generate_long(cond, 3600, k=1, steps=1, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 450, m.cfg.d_latent) and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    m = make_model()  # random weights: no checkpoint needed
    cfg = m.cfg
    cond = make_cond(cfg)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"w_listen=(nan|inf|-inf)"):
            m.sample(cond, w_listen=bad)
        with pytest.raises(ValueError, match=r"w_speak=(nan|inf|-inf)"):
            m.generate_long(cond, 32, w_speak=bad)
    with pytest.raises(ValueError, match="speaking_tokens"):
        m.sample(cond, w_speak=2.0, w_listen=1.0)
    with pytest.raises(ValueError, match=r"actor_audio.*32 frames.*total_frames=64"):
        m.generate_long(cond, 64)
    with pytest.raises(ValueError, match="multiple of r"):
        m.generate_long(cond, 30)
    with pytest.raises(ValueError, match="partner_latent"):
        m.sample({**cond, "partner_latent": torch.randn(B, 4, cfg.d_latent + 1)})
    with pytest.raises(KeyError, match="actor_audio"):
        m.sample({k: v for k, v in cond.items() if k != "actor_audio"})
    with pytest.raises(ValueError, match="sigma"):
        m.sample(cond, sigma=-0.1)


def test_presets_and_parameter_count():
    small, paper = ARFlowConfig.small(), ARFlowConfig.paper()
    assert (paper.n_layers, paper.n_heads, paper.d_model, paper.d_text, paper.d_audio) == (6, 16, 512, 384, 80)
    assert small.n_tokens == paper.n_tokens == 25
    assert small.causal_prefix and not paper.causal_prefix and not ARFlowConfig().causal_prefix  # old checkpoints: bidirectional
    n = count_parameters(ARFlow(ARFlowConfig.paper(n_layers=1)))
    per_layer = count_parameters(ARFlow(ARFlowConfig.paper(n_layers=2))) - n
    total = n + 5 * per_layer
    assert abs(total - 19.3e6) / 19.3e6 < 0.1, total  # paper: about 19.3M trainable parameters
    with pytest.raises(ValueError, match="divisible"):
        ARFlowConfig(d_model=30, n_heads=4)


def test_attention_dropout_is_its_own_setting():
    """Paper preset: residual dropout 0.1, none on attention probabilities (fused attention kernels);
    an architecture without ``attn_dropout`` (checkpoints saved before it existed) keeps ``dropout`` there."""
    paper = ARFlow(ARFlowConfig.paper(n_layers=1))
    attn = paper.blocks[0].attn
    assert attn.p == 0.0 and attn.resid_drop.p == 0.1 and paper.blocks[0].mlp.drop.p == 0.1
    old = ARFlow(ARFlowConfig(**{k: v for k, v in ARFlowConfig.paper(n_layers=1).to_dict().items() if k != "attn_dropout"}))
    assert old.blocks[0].attn.p == 0.1
    assert ARFlow(ARFlowConfig.paper(n_layers=1, attn_dropout=0.2)).blocks[0].attn.p == 0.2
    with pytest.raises(ValueError, match="attn_dropout"):
        ARFlowConfig(attn_dropout=1.0)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = make_model(audio_stride=4)
    d = save_arflow(tmp_path / "sft", m, "small", config={"lr": 1e-3}, extra={"step": 7})
    m2, meta = load_arflow(d, expect={"d_latent": 6, "audio_stride": 4}, preset="small")
    assert m2.cfg == m.cfg and not m2.training and meta["config"] == {"lr": 1e-3} and meta["step"] == 7
    cond = make_cond(m.cfg)
    x, t = torch.randn(B, 4, 6), torch.rand(B, 4)
    assert torch.equal(m2(cond, x, x, t), m(cond, x, x, t))
    with pytest.raises(CheckpointError, match="d_latent=6 but the pipeline needs d_latent=8"):
        load_arflow(d, expect={"d_latent": 8})
    with pytest.raises(CheckpointError, match="preset 'small'.*model=paper"):
        load_arflow(d, preset="paper")
    meta_path = d / "meta.json"
    good = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**good, "arch": {**good["arch"], "d_model": 64}}))
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_arflow(d)
    meta_path.write_text(json.dumps({**good, "arch": {**good["arch"], "n_layerz": 3}}))
    with pytest.raises(CheckpointError, match="bad AR-Flow architecture.*n_layerz"):
        load_arflow(d)
