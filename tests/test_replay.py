"""Shared-prefix replay (agents/policy.py SDETransition.shared_context): the window's prefix and history run
once per model and window, the chunks' gradients reach the parameters through it exactly once, and the
replayed log-probs still equal the collected ones, for bidirectional and causal prefixes."""
from __future__ import annotations

import copy

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
from gdpo_listener.agents.flow import gaussian_log_prob
from gdpo_listener.agents.loss import GDPOLoss, chunked_update, select_steps, select_window, trajectory_batch
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.rewards.groups import build_reward

K = 4
N_LONG = 7  # windows of 4 tokens, k = 1: [0, 4) [3, 7)


def make_setup(rl, causal: bool, seed: int = 0):
    """Rollouts of a tiny policy over 2-window episodes -> (loss, traj, model, policy core)."""
    base = rl.tiny_arflow(seed)
    model = ARFlow(ARFlowConfig(**{**base.cfg.to_dict(), "causal_prefix": causal}))
    model.load_state_dict(base.state_dict())
    bank = rl.tiny_bank(frames=N_LONG * rl.R)
    vae, norm = rl.tiny_vae()
    g = torch.Generator().manual_seed(seed)
    reward = build_reward("expr+rot")
    env = ListenerSDEEnv(bank, vae, norm, reward, n_prompts=2, group_size=2, sde_steps=K, sigma=0.5, generator=g, seed=seed)
    policy = make_policy(copy.deepcopy(model).requires_grad_(False), env, generator=g)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        ro = env.rollout(N_LONG * K, policy, break_when_any_done=False)
    traj = trajectory_batch(ro, N_LONG, K)
    traj["token_mask"][:, :3] = False
    core = transition_core(policy)
    loss = GDPOLoss(core, model, reward.lambdas, beta=0.1)
    loss.compute_advantage(traj)
    return loss, traj, model, core


@pytest.mark.parametrize("causal", [False, True])
def test_shared_replay_equals_collected_log_probs_and_unshared_replay(causal, rl):
    loss, traj, model, core = make_setup(rl, causal)
    assert core.schedule == [(0, 4, 0), (3, 4, 4)]
    std = torch.tensor(0.5 * (1 / K) ** 0.5)
    for span in core.schedule:
        win = select_window(traj, span)
        with torch.no_grad():
            plain = core.replay_loc(win["window"], win["history"], win["x"], win["t"], span=span)
            with core.shared_context(win["window"], win["history"], span, (core.arflow,)):
                shared = torch.cat([core.replay_loc(c["window"], c["history"], c["x"], c["t"], span=span)
                                    for c in (select_steps(win, 0, 1), select_steps(win, 1, K))], dim=1)
        torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
        lp = gaussian_log_prob(win["action"], shared, std.expand_as(shared))
        assert torch.allclose(lp, win["action_log_prob"], atol=1e-4), (span, (lp - win["action_log_prob"]).abs().max())


@pytest.mark.parametrize("causal", [False, True])
def test_shared_prefix_runs_once_per_window_and_model_and_gives_the_unshared_gradient(causal, monkeypatch, rl):
    loss, traj, model, core = make_setup(rl, causal)
    with torch.no_grad():
        model.head.bias.add_(0.05)  # away from the behaviour policy: ratio and KL matter
    # reference gradient: every chunk replayed on its own (one full pass per chunk and model)
    model.zero_grad()
    for span in core.schedule:
        win = select_window(traj, span)
        for k0 in (0, 1, 3):
            out = loss(select_steps(win, k0, min(k0 + 2, K)))
            (out["loss_objective"] + out["loss_kl"]).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    calls = {"context": 0, "full": 0}
    for name in ("encode_context", "_full_pass"):
        for m in (model, loss.ref_network):
            orig = getattr(m, name)

            def counted(*a, _orig=orig, _key="context" if name == "encode_context" else "full", **kw):
                calls[_key] += 1
                return _orig(*a, **kw)

            monkeypatch.setattr(m, name, counted)
    model.zero_grad()
    for span in core.schedule:
        win = select_window(traj, span)
        with core.shared_context(win["window"], win["history"], span, (model, loss.ref_network)):
            for k0 in (0, 1, 3):
                out = loss(select_steps(win, k0, min(k0 + 2, K)))
                (out["loss_objective"] + out["loss_kl"]).backward()
    assert calls == {"context": 2 * len(core.schedule), "full": 0}  # once per window and model, no full passes
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=1e-4, msg=n)
    # chunked_update opens the block itself
    calls.update(context=0, full=0)
    chunked_update(loss, traj, torch.optim.SGD(model.parameters(), lr=0.0), chunk_steps=2, grad_clip=1e9)
    assert calls == {"context": 2 * len(core.schedule), "full": 0}


def test_shared_context_refuses_other_windows_and_skips_the_prefix_gradient_on_errors(rl):
    loss, traj, model, core = make_setup(rl, False)
    w0, w1 = (select_window(traj, s) for s in core.schedule)
    with core.shared_context(w0["window"], w0["history"], core.schedule[0], (model,)):
        with pytest.raises(ValueError, match="shared_context"):
            core.replay_loc(w0["window"], w0["history"].clone(), w0["x"], w0["t"], model=model, span=core.schedule[0])
        with pytest.raises(ValueError, match="shared_context"):
            core.replay_loc(w1["window"], w1["history"], w1["x"], w1["t"], model=model, span=core.schedule[1])
        with pytest.raises(RuntimeError, match="nest"):
            with core.shared_context(w0["window"], w0["history"], core.schedule[0], (model,)):
                pass
    model.zero_grad()
    with pytest.raises(KeyError):
        with core.shared_context(w0["window"], w0["history"], core.schedule[0], (model,)):
            core.replay_loc(w0["window"], w0["history"], w0["x"], w0["t"], model=model, span=core.schedule[0]).sum().backward()
            raise KeyError("stop")
    # the chunk's own backward reached the parameters, the prefix pass did not run backward (no text gradient)
    assert model.head.weight.grad is not None and model.text_proj.weight.grad is None
