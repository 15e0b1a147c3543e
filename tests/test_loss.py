"""GDPO / GRPO loss modules: replay equality, objective, KL, chunked accumulation, keys."""
from __future__ import annotations

import copy

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from gdpo_listener.agents.loss import GDPOLoss, GRPOLoss, select_steps, trajectory_batch
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.rewards.groups import build_reward
from rl_fixtures import N, tiny_arflow, tiny_bank, tiny_vae

K = 4


def setup(loss_cls=GDPOLoss, beta=0.01, seed=0):
    bank = tiny_bank()
    vae, norm = tiny_vae()
    g = torch.Generator().manual_seed(seed)
    reward = build_reward("expr+rot")
    env = ListenerSDEEnv(bank, vae, norm, reward, n_prompts=2, group_size=3, sde_steps=K, sigma=0.5, generator=g, seed=seed)
    model = tiny_arflow()
    behaviour = copy.deepcopy(model).requires_grad_(False)
    policy = make_policy(behaviour, bank, sigma=0.5, sde_steps=K, generator=g)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        ro = env.rollout(N * K, policy, break_when_any_done=False)
    traj = trajectory_batch(ro, N, K)
    loss = loss_cls(transition_core(policy), model, reward.lambdas, beta=beta)
    return loss, traj, model, behaviour


def test_replayed_log_probs_equal_collected():
    loss, traj, _, _ = setup()
    out_lp = []
    for k0 in range(0, K, 2):
        chunk = select_steps(traj, k0, k0 + 2)
        with torch.no_grad():
            loc = loss.transition[0].replay_loc(chunk["window"], chunk["history"], chunk["x"], chunk["t"])
        from gdpo_listener.agents.flow import gaussian_log_prob
        out_lp.append(gaussian_log_prob(chunk["action"], loc, torch.full_like(loc, 0.5 * (1 / K) ** 0.5)))
    replayed = torch.cat(out_lp, 1)
    assert replayed.shape == traj["action_log_prob"].shape
    assert torch.allclose(replayed, traj["action_log_prob"], atol=1e-4), (replayed - traj["action_log_prob"]).abs().max()


def test_objective_at_behaviour_params_is_minus_mean_advantage():
    loss, traj, _, _ = setup(beta=0.0)
    loss.compute_advantage(traj)
    out = loss(select_steps(traj, 0, 2))
    assert out["ratio_mean"].item() == pytest.approx(1.0, abs=1e-3)
    assert float(out["clip_fraction"]) == 0.0
    assert out["loss_objective"].item() == pytest.approx(-traj["advantage"].mean().item(), abs=1e-3)
    assert float(out["kl"]) == pytest.approx(0.0, abs=1e-8)
    assert set(out.keys()) >= {"loss_objective", "loss_kl", "clip_fraction", "kl", "ratio_mean", "ratio_max"}


def test_kl_closed_form_after_perturbation():
    loss, traj, model, _ = setup(beta=0.5)
    with torch.no_grad():
        model.head.bias.add_(0.1)  # shifts every velocity by 0.1 -> every mean by dt * 0.1
    loss.compute_advantage(traj)
    out = loss(select_steps(traj, 0, 2))
    dt, sigma, D = 1 / K, 0.5, model.cfg.d_latent
    expected = D * (dt * 0.1) ** 2 / (2 * sigma**2 * dt)
    assert float(out["kl"]) == pytest.approx(expected, rel=1e-3)
    assert out["loss_kl"].item() == pytest.approx(0.5 * expected, rel=1e-3)


def test_chunked_gradient_equals_full_gradient():
    loss, traj, model, _ = setup()
    loss.compute_advantage(traj)

    def grads(chunk):
        model.zero_grad()
        for k0 in range(0, K, chunk):
            out = loss(select_steps(traj, k0, k0 + chunk))
            ((out["loss_objective"] + out["loss_kl"]) * chunk / K).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    g_full, g_chunk = grads(K), grads(2)
    assert g_full.abs().max() > 0
    assert torch.allclose(g_full, g_chunk, atol=1e-6, rtol=1e-4)


def test_gdpo_and_grpo_differ_only_in_advantage():
    lg, traj, _, _ = setup(GDPOLoss)
    lr = GRPOLoss(lg.transition[0], lg.actor_network, lg.lambdas)
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    a_g, a_r = lg.advantage_fn(r, gid), lr.advantage_fn(r, gid)
    assert not torch.allclose(a_g, a_r)
    td = traj.clone()
    td["advantage"] = a_g
    o1 = lg(select_steps(td, 0, 2))
    o2 = lr(select_steps(td, 0, 2))
    assert torch.allclose(o1["loss_objective"], o2["loss_objective"])


def test_set_keys_and_errors():
    loss, traj, _, _ = setup()
    traj.rename_key_("action_log_prob", "old_lp")
    loss.set_keys(sample_log_prob="old_lp")
    loss.compute_advantage(traj)
    out = loss(select_steps(traj, 0, 2, step_keys=("x", "t", "action", "old_lp")))
    assert torch.isfinite(out["loss_objective"])
    with pytest.raises(ValueError, match="no key"):
        loss.set_keys(nonsense="x")
    traj["reward"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        loss.compute_advantage(traj)
