"""Multi-window RL episodes: the sliding-window schedule (paper 4.3) in the env, policy and update."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torchrl.envs.utils import ExplorationType, set_exploration_type

from gdpo_listener.agents.flow import gaussian_log_prob
from gdpo_listener.agents.loss import GDPOLoss, chunked_update, collect_trajectories, select_window, trajectory_batch
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.envs.windows import cond_from_bank, sliding_windows, window_cond
from gdpo_listener.pipeline.rl import attach_hold_reference
from gdpo_listener.rewards.groups import build_reward

K = 2
N_LONG = 11  # tokens per episode: windows of N = 4 tokens, k = 1 -> [0,4) [3,7) [6,10) [7,11)


def test_sliding_windows_schedule():
    assert sliding_windows(25, 25, 1) == [(0, 25, 0)]
    sched = sliding_windows(100, 25, 1)
    assert sched[:4] == [(0, 25, 0), (24, 25, 25), (48, 25, 49), (72, 25, 73)]
    assert sched[-1] == (75, 25, 97)  # the last window is shifted back to end at token 100
    for n_total, W, k in [(100, 25, 1), (11, 4, 1), (30, 25, 3), (7, 4, 2), (3, 25, 1)]:
        sched = sliding_windows(n_total, W, k)
        new = [j for s0, n, new0 in sched for j in range(new0, s0 + n)]
        assert new == list(range(n_total))  # every token generated once, in order
        for i, (s0, n, new0) in enumerate(sched):
            assert n == min(W, n_total) and s0 + n <= n_total
            assert new0 - s0 == (0 if i == 0 else max(k, new0 - s0))  # >= k prefix tokens after the first
            if 0 < i < len(sched) - 1:
                assert new0 - s0 == k
    with pytest.raises(ValueError, match="1 <= k < W"):
        sliding_windows(100, 25, 25)


def test_window_cond_slices_and_picks_text_segment(rl):
    bank = rl.tiny_bank(frames=N_LONG * rl.R)
    rows = bank[torch.tensor([0, 2])]
    full = window_cond(rows, 0, N_LONG, rl.R)
    for k, v in cond_from_bank(rows).items():
        assert torch.equal(full[k], v)
    c = window_cond(rows, 3, 4, rl.R)
    assert torch.equal(c["actor_audio"], rows["actor_audio"][:, 24:56])
    assert torch.equal(c["partner_latent"], rows["partner_latent"][:, 3:7])
    # long rows with one text per 16 frames: the window's centre frame (24 + 16 = 40) is in segment 2
    rows = rows.clone()
    rows["text_emb"] = torch.randn(2, 6, rl.DT)
    rows["text_mask"] = torch.tensor([[True, True, False, True, True, True]] * 2)
    c = window_cond(rows, 3, 4, rl.R, text_window=16)
    assert torch.equal(c["text_emb"], rows["text_emb"][:, 2]) and not c["text_mask"].any()


def make_long(rl, seed=0, use_cache=True, sde="paper", causal=False, context_lora=False):
    bank = rl.tiny_bank(frames=N_LONG * rl.R)
    vae, norm = rl.tiny_vae()
    g = torch.Generator().manual_seed(seed)
    reward = build_reward("expr+rot")
    env = ListenerSDEEnv(bank, vae, norm, reward, n_prompts=2, group_size=2, sde_steps=K, sigma=0.5, generator=g,
                         seed=seed, sde=sde)
    model = rl.tiny_arflow(causal=causal)
    if context_lora:  # listening low-rank updates on the context too, away from their zero start
        model.add_listen_lora(4, scope="listening_context")
        with torch.no_grad():
            for name, p in model.listen_lora.named_parameters():
                if name.endswith("up.weight"):
                    p.normal_(std=0.3, generator=torch.Generator().manual_seed(9))
    behaviour = copy.deepcopy(model).requires_grad_(False)
    policy = make_policy(behaviour, env, generator=g, use_cache=use_cache)
    return env, policy, model, bank, reward


def long_rollout(env, policy, seed):
    env.set_windows(torch.tensor([1, 4]))
    env.generator.manual_seed(seed)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        return env.rollout(N_LONG * K, policy, break_when_any_done=False)


@pytest.mark.parametrize("sde,causal", [("paper", False), ("marginal", False), ("paper", True)])
def test_long_episode_rollout_equals_sliding_window_sde_generation(sde, causal, rl):
    env, policy, model, bank, _ = make_long(rl, sde=sde, causal=causal)
    # bidirectional prefix: the last window shifted back to end at the last token; causal: cut short
    expect = [(0, 4, 0), (3, 4, 4), (6, 4, 7), (9, 2, 10)] if causal else [(0, 4, 0), (3, 4, 4), (6, 4, 7), (7, 4, 10)]
    assert transition_core(policy).schedule == expect
    if not causal:
        assert expect == sliding_windows(N_LONG, rl.N, 1)
    ro = long_rollout(env, policy, 11)
    z_env = ro["next", "history"][:, -1]  # (B, N_LONG, Dv)
    rows = bank[ro["window"][:, 0]]
    env.generator.manual_seed(11)
    z_gen = model.generate_long(cond_from_bank(rows), N_LONG * rl.R, k=1, steps=K, sigma=0.5, generator=env.generator, sde=sde)
    assert torch.allclose(z_env, z_gen, atol=1e-4), (z_env - z_gen).abs().max()
    # a hold column's reference motion is this rollout: the same sampler and schedule, drawn from the run's seed
    cfg = OmegaConf.create({"seed": 11, "env": {"sde_steps": K, "sigma": 0.5, "sde": sde, "sde_window": None, "prefix_tokens": 1}})
    ref = attach_hold_reference(cfg, rows.clone(), model, *rl.tiny_vae(), build_reward("expr+jaw@hold"))["reference_motion"]
    assert torch.allclose(ref, env.decode(z_env), atol=1e-4), (ref - env.decode(z_env)).abs().max()
    # the uncached policy follows the same schedule
    env_u, policy_u, _, _, _ = make_long(rl, use_cache=False, sde=sde, causal=causal)
    ro_u = long_rollout(env_u, policy_u, 11)
    assert torch.allclose(ro_u["next", "history"][:, -1], z_env, atol=1e-4)
    # the reward is computed once, on the whole decoded episode
    assert (ro["next", "reward"][:, :-1] == 0).all() and ro["next", "reward"][:, -1].abs().sum() > 0


def test_long_episode_replay_equals_collected_log_probs(rl):
    env, policy, model, bank, reward = make_long(rl)
    traj = trajectory_batch(long_rollout(env, policy, 3), N_LONG, K)
    core = transition_core(policy)
    std = torch.tensor(0.5 * (1 / K) ** 0.5)
    seen = torch.zeros(N_LONG, dtype=torch.bool)
    for span in core.schedule:
        win = select_window(traj, span)
        s0, n, new0 = span
        seen[new0:s0 + n] = True
        with torch.no_grad():
            loc = core.replay_loc(win["window"], win["history"], win["x"], win["t"], span=span)
        lp = gaussian_log_prob(win["action"], loc, std.expand_as(loc))
        assert torch.allclose(lp, win["action_log_prob"], atol=1e-4), (span, (lp - win["action_log_prob"]).abs().max())
    assert seen.all()


@pytest.mark.parametrize("causal", [False, True])
def test_long_episodes_of_a_context_lora_model_follow_generate_long_and_replay_exactly(causal, rl):
    """lora_scope=listening_context on multi-window episodes: every window's context reads the bank's speaking tokens
    of its own span, in collection (cached) and replay alike."""
    env, policy, model, bank, _ = make_long(rl, causal=causal, context_lora=True)
    ro = long_rollout(env, policy, 5)
    rows = bank[ro["window"][:, 0]]
    spk = rows["speaking_tokens"]  # (B, N_LONG)
    assert spk.any() and (~spk).any()
    env.generator.manual_seed(5)
    z_gen = model.generate_long(cond_from_bank(rows), N_LONG * rl.R, k=1, steps=K, sigma=0.5, generator=env.generator,
                                speaking_tokens=spk)
    assert torch.allclose(ro["next", "history"][:, -1], z_gen, atol=1e-4)
    traj = trajectory_batch(ro, N_LONG, K)
    core = transition_core(policy)
    std = torch.tensor(0.5 * (1 / K) ** 0.5)
    for span in core.schedule:
        win = select_window(traj, span)
        with torch.no_grad():
            loc = core.replay_loc(win["window"], win["history"], win["x"], win["t"], span=span)
        lp = gaussian_log_prob(win["action"], loc, std.expand_as(loc))
        assert torch.allclose(lp, win["action_log_prob"], atol=1e-4), span


def test_windowed_update_gradient_equals_mean_objective_gradient(rl):
    """chunked_update's accumulated gradient is the gradient of the whole batch's mean objective."""
    env, policy, model, bank, reward = make_long(rl)
    traj = trajectory_batch(long_rollout(env, policy, 5), N_LONG, K)
    traj["token_mask"][:, :5] = False  # uneven masked counts per window
    loss = GDPOLoss(transition_core(policy), model, reward.lambdas, beta=0.1)
    loss.compute_advantage(traj)
    with torch.no_grad():
        model.head.bias.add_(0.05)  # move away from the behaviour policy so the ratio and KL matter
    # reference: the objective summed over the batch's listening transitions / their number, plus the KL
    # summed over all generated transitions / their number (the KL covers every token)
    model.zero_grad()
    obj_sum, kl_sum, n_obj, n_all = 0.0, 0.0, 0, 0
    for span in transition_core(policy).schedule:
        win = select_window(traj, span)
        out = loss(win)
        n, m = win["token_mask"].sum() * K, win["token_mask"].numel() * K
        obj_sum, kl_sum = obj_sum + out["loss_objective"] * n, kl_sum + out["loss_kl"] * m
        n_obj, n_all = n_obj + n, n_all + m
    (obj_sum / n_obj + kl_sum / n_all).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the parameters, read the gradient
    for chunk_steps in (1, 2):
        stats = chunked_update(loss, traj, opt, chunk_steps=chunk_steps, grad_clip=1e9)
        got = [p.grad for p in model.parameters()]
        for e, g in zip(expected, got):
            assert torch.allclose(e, g, atol=1e-6, rtol=1e-4)
        assert stats["optim/grad_norm"] > 0


def test_bad_prefix_tokens(rl):
    env = make_long(rl)[0]
    with pytest.raises(ValueError, match="1 <= k < W"):
        make_policy(rl.tiny_arflow(), env, prefix_tokens=rl.N)


def test_collect_trajectories_equals_rollout_reshaped(rl):
    """The lean collector records the same transitions as env.rollout + trajectory_batch (same generator)."""
    env, policy, _, _, _ = make_long(rl)
    ro = long_rollout(env, policy, 21)
    expected = trajectory_batch(ro, N_LONG, K)
    env.set_windows(torch.tensor([1, 4]))
    env.generator.manual_seed(21)
    with set_exploration_type(ExplorationType.RANDOM):
        got = collect_trajectories(env, policy)
    assert set(got.keys()) == set(expected.keys())
    for key in expected.keys():
        assert torch.allclose(got[key].float(), expected[key].float(), atol=1e-6), key
