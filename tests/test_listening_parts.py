"""The listening parts RL can train alone: the listening adapter (agents/arflow.py ListenAdapter, RL's
algo.listen_adapter), a velocity term on the listening tokens, and the listening low-rank updates
(ListenLoRA, algo.listen_lora) of every block, on the noisy listening tokens. New ones change nothing;
trained ones change the listening tokens and never a speaking token's velocity given its context; every
pass (teacher forced, context, cached, uncached, sampling, replay) applies them alike; RL with them
trains them alone. With ``lora_scope="listening_context"`` the low-rank updates also re-encode the context
entries of listening tokens: a speaking token then moves exactly when it reads one; with ``lora_scope="all"``
they are plain LoRA (every token, no mask)."""
from __future__ import annotations

import copy

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig, load_arflow, save_arflow
from gdpo_listener.agents.flow import gaussian_log_prob
from gdpo_listener.agents.loss import GDPOLoss, select_window, trajectory_batch
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.pipeline.rl import make_loss, make_trainable
from gdpo_listener.rewards.groups import build_reward

B = 2


def tiny_model(seed: int = 0, causal: bool = True) -> ARFlow:
    torch.manual_seed(seed)
    cfg = ARFlowConfig(d_latent=6, d_text=12, d_audio=10, d_model=32, n_layers=2, n_heads=2, r=8, window=32,
                       audio_stride=4, causal_prefix=causal)
    m = ARFlow(cfg)
    with torch.no_grad():
        m.final_mod.weight.normal_(std=0.05)
    return m.eval()


def cond_of(cfg, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    L = cfg.window
    return {"text_emb": torch.randn(B, cfg.d_text, generator=g), "text_mask": torch.ones(B, dtype=torch.bool),
            "actor_audio": torch.randn(B, L, cfg.d_audio, generator=g), "partner_audio": torch.randn(B, L, cfg.d_audio, generator=g),
            "partner_latent": torch.randn(B, L // cfg.r, cfg.d_latent, generator=g),
            "partner_has_motion": torch.ones(B, dtype=torch.bool)}


def with_trained_adapter(base: ARFlow, width: int = 16) -> ARFlow:
    """A copy of ``base`` with an adapter whose output layer is no longer zero (as after training)."""
    m = copy.deepcopy(base)
    m.add_listen_adapter(width)
    with torch.no_grad():
        m.listen_adapter.proj.weight.normal_(std=0.3)
        m.listen_adapter.proj.bias.normal_(std=0.3)
    return m.eval()


def with_trained_lora(base: ARFlow, rank: int = 4, scope: str = "listening") -> ARFlow:
    """A copy of ``base`` with low-rank updates acting on ``scope`` whose ``up`` maps are no longer zero (as after
    training)."""
    m = copy.deepcopy(base)
    m.add_listen_lora(rank, scope=scope)
    with torch.no_grad():
        for name, p in m.listen_lora.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(std=0.3)
    return m.eval()


def with_trained_context_lora(base: ARFlow, rank: int = 4) -> ARFlow:
    return with_trained_lora(base, rank, scope="listening_context")


def with_trained_plain_lora(base: ARFlow, rank: int = 4) -> ARFlow:
    return with_trained_lora(base, rank, scope="all")


TRAINED = {"adapter": with_trained_adapter, "lora": with_trained_lora, "lora_ctx": with_trained_context_lora,
           "lora_all": with_trained_plain_lora}
PART = {"adapter": "listen_adapter", "lora": "listen_lora", "lora_ctx": "listen_lora", "lora_all": "listen_lora"}
SCOPE = {"lora": "listening", "lora_ctx": "listening_context", "lora_all": "all"}


SPEAKING = torch.tensor([[True, True, False, False], [False, True, True, False]])  # (B, N) tokens of a 32-frame window


def collect(rl, model, K: int = 2):
    """Rollouts of ``model`` (a frozen behaviour copy) in a tiny expr+rot env with K SDE steps per token:
    ``(env, policy, reward, bank, traj)``, the trajectory batch the update replays."""
    bank = rl.tiny_bank()
    vae, norm = rl.tiny_vae()
    g = torch.Generator().manual_seed(0)
    reward = build_reward("expr+rot")
    env = ListenerSDEEnv(bank, vae, norm, reward, n_prompts=2, group_size=2, sde_steps=K, sigma=0.5, generator=g, seed=0)
    policy = make_policy(copy.deepcopy(model).requires_grad_(False), env, generator=g)
    N = bank["actor_latent"].shape[1]
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        traj = trajectory_batch(env.rollout(N * K, policy, break_when_any_done=False), N, K)
    return env, policy, reward, bank, traj


@pytest.mark.parametrize("kind", ["adapter", "lora"])
@pytest.mark.parametrize("causal", [False, True])
def test_listening_parts_move_listening_tokens_only_and_every_pass_agrees(causal, kind):
    base = tiny_model(causal=causal)
    m = TRAINED[kind](base)
    cfg, N = m.cfg, m.cfg.n_tokens
    g = torch.Generator().manual_seed(3)
    cond = cond_of(cfg)
    xc, xn, t = torch.randn(B, N, cfg.d_latent, generator=g), torch.randn(B, N, cfg.d_latent, generator=g), torch.rand(B, N, generator=g)
    with torch.no_grad():
        v0 = base(cond, xc, xn, t)  # (B, N, Dv)
        v = m(cond, xc, xn, t, speaking=SPEAKING)
        torch.testing.assert_close(v[SPEAKING], v0[SPEAKING], atol=0, rtol=0)  # speaking: the head's velocity exactly
        assert (v[~SPEAKING] - v0[~SPEAKING]).abs().amax(-1).gt(1e-2).all()  # listening: every token moved
        ctx = m.encode_context(cond, xc)
        idx = torch.arange(N)
        torch.testing.assert_close(m.velocity_in_context(ctx, xn, t, idx, SPEAKING), v, atol=1e-5, rtol=1e-5)
        cache = m.start(cond, n_tokens=N)
        for l in range(N):
            vl = m.velocity(cache, xn[:, l], t[:, l], l, SPEAKING[:, l])
            torch.testing.assert_close(vl, v[:, l], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(m.velocity_uncached(cond, xc[:, :l], xn[:, l], t[:, l], speaking=SPEAKING[:, l]), v[:, l],
                                       atol=1e-5, rtol=1e-5)
            m.append(cache, xc[:, l], l)
        with pytest.raises(ValueError, match="speaking mask of the tokens"):
            m(cond, xc, xn, t)  # no speaking mask: refused, not silently all-listening
        with pytest.raises(ValueError, match="speaking mask of shape"):
            m(cond, xc, xn, t, speaking=SPEAKING[:, :2])


@pytest.mark.parametrize("causal", [False, True])
def test_context_updates_move_exactly_the_tokens_that_read_a_listening_entry_and_every_pass_agrees(causal):
    base = tiny_model(causal=causal)
    m = with_trained_context_lora(base)
    cfg, N = m.cfg, m.cfg.n_tokens
    g = torch.Generator().manual_seed(3)
    cond = {**cond_of(cfg), "speaking_tokens": SPEAKING}
    xc, xn, t = torch.randn(B, N, cfg.d_latent, generator=g), torch.randn(B, N, cfg.d_latent, generator=g), torch.rand(B, N, generator=g)
    # causal prefix: token l reads the entries of tokens <= l (prefix groups) and < l (history); bidirectional: every group
    reads_listening = (~SPEAKING).cumsum(1).gt(0) if causal else (~SPEAKING).any(1, keepdim=True).expand(B, N)  # (B, N)
    assert (SPEAKING & ~reads_listening).any() or not causal
    with torch.no_grad():
        v0 = base(cond, xc, xn, t)  # (B, N, Dv)
        v = m(cond, xc, xn, t, speaking=SPEAKING)
        torch.testing.assert_close(v[~reads_listening], v0[~reads_listening], atol=0, rtol=0)
        assert (v[reads_listening] - v0[reads_listening]).abs().amax(-1).gt(1e-3).all()
        ctx = m.encode_context(cond, xc)
        torch.testing.assert_close(m.velocity_in_context(ctx, xn, t, torch.arange(N), SPEAKING), v, atol=1e-5, rtol=1e-5)
        caches = [m.start(cond, n_tokens=N)] + ([m.start(cond, n_tokens=N, groups=0)] if causal else [])
        for l in range(N):
            if causal:  # the second cache gets its prefix groups one by one, from the conditioning so far
                part = {k: (x[:, :(l + 1) * cfg.r] if k.endswith("audio") else x[:, :l + 1] if x.dim() >= 2 and k != "text_emb" else x)
                        for k, x in cond.items()}
                m.extend(caches[1], part)
            for cache in caches:
                torch.testing.assert_close(m.velocity(cache, xn[:, l], t[:, l], l, SPEAKING[:, l]), v[:, l], atol=1e-5, rtol=1e-5)
                m.append(cache, xc[:, l], l, SPEAKING[:, l])
            torch.testing.assert_close(m.velocity_uncached(cond, xc[:, :l], xn[:, l], t[:, l], speaking=SPEAKING[:, l]), v[:, l],
                                       atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="speaking_tokens"):
            m(cond_of(cfg), xc, xn, t, speaking=SPEAKING)  # the context's mask comes with the conditioning
        with pytest.raises(ValueError, match=r"speaking_tokens'\] has shape"):
            m(cond | {"speaking_tokens": SPEAKING[:, :2]}, xc, xn, t, speaking=SPEAKING)
        with pytest.raises(ValueError, match="speaking mask"):
            m.append(m.start(cond, n_tokens=N), xc[:, 0], 0)  # a history token needs its own


def test_wider_scopes_need_low_rank_updates():
    with pytest.raises(ValueError, match="lora_scope=listening_context needs"):
        ARFlowConfig(lora_scope="listening_context")
    with pytest.raises(ValueError, match="must be one of"):
        ARFlowConfig(listen_lora=2, lora_scope="yes")


@pytest.mark.parametrize("causal", [False, True])
def test_plain_lora_moves_every_token_needs_no_mask_and_every_pass_agrees(causal):
    base = tiny_model(causal=causal)
    m = with_trained_plain_lora(base)
    assert not m.takes_speaking
    cfg, N = m.cfg, m.cfg.n_tokens
    g = torch.Generator().manual_seed(4)
    cond = cond_of(cfg)
    xc, xn, t = torch.randn(B, N, cfg.d_latent, generator=g), torch.randn(B, N, cfg.d_latent, generator=g), torch.rand(B, N, generator=g)
    with torch.no_grad():
        v = m(cond, xc, xn, t)  # no speaking mask
        assert (v - base(cond, xc, xn, t)).abs().amax(-1).gt(1e-3).all()
        torch.testing.assert_close(m.velocity_in_context(m.encode_context(cond, xc), xn, t, torch.arange(N)), v,
                                   atol=1e-5, rtol=1e-5)
        cache = m.start(cond, n_tokens=N)
        for l in range(N):
            torch.testing.assert_close(m.velocity(cache, xn[:, l], t[:, l], l), v[:, l], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(m.velocity_uncached(cond, xc[:, :l], xn[:, l], t[:, l]), v[:, l], atol=1e-5, rtol=1e-5)
            m.append(cache, xc[:, l], l)
    kw = dict(steps=3, w_speak=1.0, w_listen=2.0, speaking_tokens=SPEAKING, sigma=0.3)
    c = m.sample(cond, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(m.sample(cond, generator=torch.Generator().manual_seed(0), use_cache=False, **kw), c,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["adapter", "lora", "lora_ctx", "lora_all"])
def test_new_listening_parts_change_no_sample_and_sampling_needs_the_mask(kind):
    base = tiny_model()
    m = copy.deepcopy(base)
    m.add_listen_adapter(8) if kind == "adapter" else m.add_listen_lora(8, scope=SCOPE[kind])
    cond = cond_of(m.cfg)
    kw = dict(steps=3, w_speak=1.0, w_listen=2.0, speaking_tokens=SPEAKING, sigma=0.3)
    a = base.sample(cond, generator=torch.Generator().manual_seed(0), **kw)
    b = m.sample(cond, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    if kind == "lora_all":  # plain LoRA: no mask
        torch.testing.assert_close(m.sample(cond, steps=2, generator=torch.Generator().manual_seed(1)),
                                   base.sample(cond, steps=2, generator=torch.Generator().manual_seed(1)), atol=0, rtol=0)
    else:
        with pytest.raises(ValueError, match="needs speaking_tokens"):
            m.sample(cond, steps=2)  # CFG 1 needs no mask for the weights, the listening parts still do
    with pytest.raises(ValueError, match="already has"):
        (m.add_listen_adapter if kind == "adapter" else m.add_listen_lora)(8)
    # cached and uncached sampling apply them alike, with either prefix and both CFG branches
    for causal in (True, False):
        b0 = tiny_model(causal=causal)
        t = TRAINED[kind](b0)
        c = t.sample(cond, generator=torch.Generator().manual_seed(0), **kw)
        u = t.sample(cond, generator=torch.Generator().manual_seed(0), use_cache=False, **kw)
        torch.testing.assert_close(c, u, atol=1e-4, rtol=1e-4)
        assert (c - b0.sample(cond, generator=torch.Generator().manual_seed(0), **kw)).abs().max() > 1e-3


def test_checkpoint_keeps_the_listening_parts(tmp_path):
    m = with_trained_context_lora(with_trained_adapter(tiny_model(), width=12), rank=3)
    assert m.cfg.lora_scope == "listening_context"
    save_arflow(tmp_path / "ck", m, preset="small")
    back, _ = load_arflow(tmp_path / "ck")
    assert back.cfg.listen_adapter == 12 and back.listen_adapter is not None
    assert back.cfg.listen_lora == 3 and back.listen_lora is not None and back.cfg.lora_scope == "listening_context"
    for (n, p), q in zip(m.state_dict().items(), back.state_dict().values()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="listen_adapter"):
        ARFlowConfig(listen_adapter=-1)
    with pytest.raises(ValueError, match="listen_lora"):
        ARFlowConfig(listen_lora=1.5)


def test_make_trainable_freezes_all_but_the_adapter():
    m = tiny_model()
    assert len(make_trainable(m, 0)) == len(list(m.parameters()))
    params = make_trainable(m, 8)
    assert {id(p) for p in params} == {id(p) for p in m.listen_adapter.parameters()}
    assert all(not p.requires_grad for n, p in m.named_parameters() if not n.startswith("listen_adapter."))
    assert make_trainable(m, 8) and m.cfg.listen_adapter == 8  # the checkpoint's own adapter is kept
    with pytest.raises(ValueError, match="width 8"):
        make_trainable(m, 4)


def test_make_trainable_freezes_all_but_the_low_rank_updates():
    m = tiny_model()
    params = make_trainable(m, 0, 4)
    assert {id(p) for p in params} == {id(p) for p in m.listen_lora.parameters()}
    assert len(params) == 4 * 2 * m.cfg.n_layers  # four maps per block, down and up each
    assert all(not p.requires_grad for n, p in m.named_parameters() if not n.startswith("listen_lora."))
    both = make_trainable(m, 8, 4)  # with an adapter too: both trained, nothing else
    assert {id(p) for p in both} == {id(p) for p in [*m.listen_lora.parameters(), *m.listen_adapter.parameters()]}
    with pytest.raises(ValueError, match="rank 4"):
        make_trainable(m, 0, 2)
    with pytest.raises(ValueError, match="lora_scope=listening"):
        make_trainable(m, 0, 4, scope="all")  # the checkpoint's updates act on the noisy listening tokens only
    ctx = tiny_model()
    assert make_trainable(ctx, 0, 4, scope="listening_context") and ctx.cfg.lora_scope == "listening_context"


@pytest.mark.parametrize("kind", ["adapter", "lora", "lora_ctx", "lora_all"])
def test_rl_replay_with_listening_parts_matches_collection_and_trains_them_only(rl, kind):
    """Rollouts of a policy with listening parts replay to their collected log-probs; the loss's gradient
    reaches those parts alone, and the speaking tokens' transitions are exactly the reference's (KL 0 there)."""
    K = 2
    base = rl.tiny_arflow(0)
    model = TRAINED[kind](base, 8)
    trainable = make_trainable(model, 8 if kind == "adapter" else 0, 0 if kind == "adapter" else 8, SCOPE.get(kind, "listening"))
    _, policy, reward, bank, traj = collect(rl, model, K)
    N = bank["actor_latent"].shape[1]
    core = transition_core(policy)
    with torch.no_grad():
        loc = core.replay_loc(traj["window"], traj["history"], traj["x"], traj["t"])
    std = torch.tensor(0.5 * (1 / K) ** 0.5)
    lp = gaussian_log_prob(traj["action"], loc, std.expand_as(loc))
    assert torch.allclose(lp, traj["action_log_prob"], atol=1e-4)
    spk = bank["speaking_tokens"][traj["window"]]  # (B, N)
    assert spk.any() and (~spk).any()
    # the reference (no adapter) gives the speaking tokens the same means, the listening ones others
    ref = copy.deepcopy(base).eval()
    with torch.no_grad():
        loc_ref = core.replay_loc(traj["window"], traj["history"], traj["x"], traj["t"], model=ref)
    d = (loc - loc_ref).abs().amax(-1)  # (B, K, N)
    assert d.transpose(1, 2)[~spk].min() > 1e-4
    if kind in ("lora_ctx", "lora_all"):  # the speaking tokens that read a re-encoded context entry move too
        assert d.transpose(1, 2)[spk].max() > 1e-4
    else:
        assert d.transpose(1, 2)[spk].max() < 1e-5
    loss = GDPOLoss(core, model, reward.lambdas, beta=0.1)
    loss.compute_advantage(traj)
    out = loss(select_window(traj, (0, N, 0)))
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(PART[kind] + "."))


@pytest.mark.parametrize("kind", ["adapter", "lora", "lora_ctx", "lora_all"])
def test_the_kl_reference_is_the_checkpoint_without_the_new_parts(rl, compose_config, kind):
    """train/gdpo.py's KL reference is the checkpoint as loaded (``make_loss(..., reference_source=...)``): new,
    zero-initialised listening parts change no replayed mean to the bit, so it scores the same KL without their passes."""
    K = 2
    base = rl.tiny_arflow(0, causal=kind == "lora_ctx")
    model = copy.deepcopy(base)
    make_trainable(model, 8 if kind == "adapter" else 0, 0 if kind == "adapter" else 8, SCOPE.get(kind, "listening"))
    _, policy, reward, _, traj = collect(rl, model, K)
    loss = make_loss(compose_config("gdpo").algo, policy, model, reward, reference_source=base)
    assert getattr(loss.ref_network, PART[kind]) is None and getattr(model, PART[kind]) is not None
    core = transition_core(policy)
    with torch.no_grad():
        args = (traj["window"], traj["history"], traj["x"], traj["t"])
        torch.testing.assert_close(core.replay_loc(*args, model=loss.ref_network), core.replay_loc(*args, model=model),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["adapter", "lora", "lora_ctx", "lora_all"])
def test_supervised_anchor_and_teacher_forced_evaluation_pass_the_mask(rl, kind):
    """The SFT anchor's flow loss and the teacher-forced evaluation read the bank's speaking tokens for an
    adapter model (the same as its forward given them), and run unchanged for a model without one."""
    from gdpo_listener.agents.anchor import flow_matching_loss
    from gdpo_listener.envs.windows import cond_from_bank
    from gdpo_listener.evaluation.generation import teacher_forced_motion

    base = rl.tiny_arflow(0)
    model = TRAINED[kind](base, 8)
    bank = rl.tiny_bank(3)
    vae, norm = rl.tiny_vae()
    x0 = torch.randn(bank["actor_latent"].shape, generator=torch.Generator().manual_seed(0))
    t = torch.rand(bank["actor_latent"].shape[:2], generator=torch.Generator().manual_seed(1))
    x1 = bank["actor_latent"]
    with torch.no_grad():
        want = model(cond_from_bank(bank), x1, (1 - t[..., None]) * x0 + t[..., None] * x1, t, speaking=bank["speaking_tokens"])
        got = flow_matching_loss(model, bank, x0, t)
        torch.testing.assert_close(got, (want - (x1 - x0)).pow(2).mean(-1), atol=1e-5, rtol=1e-5)
        assert not torch.equal(got, flow_matching_loss(base, bank, x0, t))
        a = teacher_forced_motion(model, vae, norm, bank, steps=2, seed=0)
        b = teacher_forced_motion(base, vae, norm, bank, steps=2, seed=0)
    assert a.shape == b.shape and not torch.equal(a, b)
