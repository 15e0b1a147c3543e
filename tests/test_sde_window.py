"""Mixed SDE/ODE sampling (env.sde_window): the window check, the Gaussian recursion of the mixed
sampler, the env rollout against the AR-Flow sampler, ODE steps as point masses, an update that
replays and trains the SDE steps only, and one whose KL also covers the ODE steps (algo.kl_steps=all)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from test_sde import DATA_STD, SIGMA, gaussian_velocity_gain
from torchrl.envs.utils import ExplorationType, set_exploration_type, step_mdp

from gdpo_listener.agents import flow
from gdpo_listener.agents.loss import (
    GDPOLoss,
    chunked_update,
    collect_trajectories,
    listening_token_mask,
    select_steps,
    trajectory_batch,
)
from gdpo_listener.agents.policy import POLICY_IN_KEYS, SDETransition, make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.envs.windows import cond_from_bank
from gdpo_listener.rewards.groups import build_reward

K = 4


@pytest.mark.parametrize("window,expected", [(None, (0, K)), ([0, 2], (0, 2)), ((1, 4), (1, 4)), ([3, 4], (3, 4)), ([0, 4], (0, 4))])
def test_sde_window_steps_accepts_null_and_ranges(window, expected):
    assert flow.sde_window_steps(window, K) == expected


@pytest.mark.parametrize("window", [[2, 2], [3, 1], [-1, 2], [0, 5], [0.5, 2], [1], "ab", 3])
def test_sde_window_steps_names_a_bad_window(window):
    with pytest.raises(ValueError, match="sde_window"):
        flow.sde_window_steps(window, K)


def test_step_sigma_is_zero_outside_the_window():
    assert [flow.step_sigma(0.5, s, (1, 3)) for s in range(K)] == [0.0, 0.5, 0.5, 0.0]


def mixed_final_std(sde: str, steps: int, window) -> float:
    """Exact std after the mixed sampler: Var <- (1 + dt c_s)^2 Var + sigma_s^2 dt, sigma_s = 0 on ODE steps,
    c_s read off flow.sde_drift at x = 1 with that step's sigma."""
    a_b = flow.sde_window_steps(window, steps)
    dt, var = 1.0 / steps, 1.0
    one = torch.ones(1, dtype=torch.float64)
    for s in range(steps):
        t, sig = s * dt, flow.step_sigma(SIGMA, s, a_b)
        c = float(flow.sde_drift(one, gaussian_velocity_gain(t, DATA_STD) * one, t, sig, sde))
        var = (1.0 + dt * c) ** 2 * var + sig**2 * dt
    return math.sqrt(var)


def test_mixed_sampler_matches_its_gaussian_recursion_and_sits_between_ode_and_sde():
    """Monte Carlo of the sampler's step (flow.sde_step with the step's sigma) against the closed form; the
    paper SDE's excess spread over the ODE shrinks as the window shrinks."""
    g = torch.Generator().manual_seed(0)
    window = (0, 2)
    x = torch.randn(40_000, 6, generator=g, dtype=torch.float64)
    dt = 1.0 / K
    for s in range(K):
        t, sig = s * dt, flow.step_sigma(SIGMA, s, window)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)  # drawn on every step, as the sampler does
        x = flow.sde_step(x, flow.sde_drift(x, gaussian_velocity_gain(t, DATA_STD) * x, t, sig, "paper"), dt, sig, noise)
    torch.testing.assert_close(x.std(0), torch.full((6,), mixed_final_std("paper", K, window), dtype=torch.float64), rtol=0.015, atol=0)
    full, half, one = (mixed_final_std("paper", K, w) for w in (None, (0, 2), (0, 1)))
    ode_std = _ode_std(K)
    assert ode_std < one < half < full  # 4 ODE steps < 1 SDE step < 2 < 4
    # the marginal drift keeps (up to Euler error) the ODE's marginal whatever the window
    for w in (None, (0, 2), (1, 3)):
        assert mixed_final_std("marginal", 100, None if w is None else (w[0] * 25, w[1] * 25)) == pytest.approx(DATA_STD, rel=0.03)


def _ode_std(steps: int) -> float:
    dt, std = 1.0 / steps, 1.0
    for s in range(steps):
        std *= 1.0 + dt * gaussian_velocity_gain(s * dt, DATA_STD)
    return abs(std)


def make(rl, window, sde: str = "paper", steps: int = K, seed: int = 0):
    bank = rl.tiny_bank()
    vae, norm = rl.tiny_vae()
    g = torch.Generator().manual_seed(seed)
    env = ListenerSDEEnv(bank, vae, norm, build_reward("expr+rot"), n_prompts=2, group_size=2, sde_steps=steps,
                         sigma=SIGMA, sde=sde, generator=g, seed=seed, sde_window=window)
    model = rl.tiny_arflow()
    return env, make_policy(model, env, generator=g), model, bank


def collect(env, policy, seed: int = 4):
    env.set_windows(torch.tensor([2, 5]))
    env.generator.manual_seed(seed)
    with set_exploration_type(ExplorationType.RANDOM):
        return collect_trajectories(env, policy)


@pytest.mark.parametrize("sde", ["paper", "marginal"])
def test_env_rollout_with_a_window_equals_the_mixed_sampler_and_replay_equals_collection(rl, sde):
    env, policy, model, bank = make(rl, (1, 3), sde)
    assert env.sde_window == (1, 3) and transition_core(policy).sde_window == (1, 3)
    traj = collect(env, policy)
    env.generator.manual_seed(4)
    z_ref = model.sample(cond_from_bank(bank[traj["window"]]), rl.N, steps=K, sigma=SIGMA, generator=env.generator, sde=sde,
                         sde_window=(1, 3))
    assert torch.allclose(traj["history"], z_ref, atol=1e-4), (traj["history"] - z_ref).abs().max()
    # only the SDE steps 1 and 2 are kept, at their flow times
    assert traj["x"].shape[1] == 2 and torch.allclose(traj["t"][:, :, 0], torch.tensor([0.25, 0.5]).expand(4, 2))
    with torch.no_grad():
        loc = transition_core(policy).replay_loc(traj["window"], traj["history"], traj["x"], traj["t"])
    lp = flow.gaussian_log_prob(traj["action"], loc, flow.transition_std(SIGMA, 1 / K))
    assert torch.allclose(lp, traj["action_log_prob"], atol=1e-4), (lp - traj["action_log_prob"]).abs().max()
    # and the window changes the samples: the full SDE from the same seed ends elsewhere
    env_full, policy_full, _, _ = make(rl, None, sde)
    assert not torch.allclose(collect(env_full, policy_full)["history"], traj["history"], atol=1e-3)


def test_ode_steps_are_point_masses_at_the_ode_step(rl):
    """Outside the window the action is the Euler step x + dt * v exactly (scale 0, log-prob 0), also for
    the marginal drift, whose SDE mean differs from it."""
    env, policy, model, bank = make(rl, (0, 1), "marginal")
    euler = SDETransition(model, bank, SIGMA, K, sde="paper", use_cache=False)  # paper mean = x + dt * v: the ODE step
    env.set_windows(torch.tensor([2, 5]))
    td = env.reset()
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        for k in range(K):
            td = policy(td)
            ode = euler(*(td[key] for key in POLICY_IN_KEYS))[0]  # (B, Dv)
            if k == 0:  # the SDE step: a Gaussian around the marginal mean, which is not the ODE step
                assert torch.all(td["scale"] > 0) and not torch.allclose(td["loc"], ode, atol=1e-4)
                assert torch.all(td["action_log_prob"] != 0)
            else:
                assert torch.all(td["scale"] == 0) and torch.equal(td["action"], td["loc"])
                assert torch.allclose(td["action"], ode, atol=1e-5), (td["action"] - ode).abs().max()
                assert torch.equal(td["action_log_prob"], torch.zeros_like(td["action_log_prob"]))
            td = step_mdp(env.step(td))


def test_full_window_equals_no_window(rl):
    a = collect(*make(rl, None)[:2])
    b = collect(*make(rl, [0, K])[:2])
    assert torch.equal(a["history"], b["history"]) and torch.equal(a["action_log_prob"], b["action_log_prob"])


def test_policy_must_take_the_window_of_its_env(rl):
    env, _, model, _ = make(rl, (0, 2))
    with pytest.raises(ValueError, match="sde_window"):
        make_policy(model, env, sde_window=(0, 3))
    make_policy(model, env, sde_window=[0, 2])  # the env's own value is accepted
    vae, norm = rl.tiny_vae()
    with pytest.raises(ValueError, match="sde_window"):
        ListenerSDEEnv(rl.tiny_bank(), vae, norm, build_reward("expr"), n_prompts=1, group_size=2, sde_steps=K, sde_window=[2, 6])


def test_update_with_a_window_replays_and_trains_only_the_sde_steps(rl):
    """chunked_update on a windowed batch: the gradient of the mean objective and KL over the SDE steps only,
    the same in chunks of 1 and 2 steps, and the same as the full-batch loss on the kept steps."""
    env, policy, model, _ = make(rl, (0, 2))
    behaviour = transition_core(policy).arflow
    trained = copy.deepcopy(behaviour)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        ro = env.rollout(rl.N * K, policy, break_when_any_done=False)
    traj = trajectory_batch(ro, rl.N, K, sde_window=env.sde_window)
    assert traj["x"].shape[1] == 2 and torch.allclose(traj["t"][0, :, 0], torch.tensor([0.0, 0.25]))
    traj["token_mask"] = listening_token_mask(env.bank["listening"][traj["window"]], rl.N)
    loss = GDPOLoss(transition_core(policy), trained, env.reward_fn.lambdas, beta=0.5)
    loss.compute_advantage(traj)
    with torch.no_grad():
        trained.head.bias.add_(0.05)
    out, runs = chunked_matches_one_pass(loss, trained, traj, (1, 2))
    for stats in runs:
        assert stats["loss/loss_kl"] == pytest.approx(out["loss_kl"].item(), rel=1e-4)
        assert stats["loss/loss_kl"] > 0


def chunked_matches_one_pass(loss, trained, traj, chunk_sizes):
    """Assert that chunked_update accumulates the one-pass gradient of objective + KL for every chunk size;
    returns the one-pass loss terms and each chunked run's stats."""
    trained.zero_grad()
    out = loss(traj)
    (out["loss_objective"] + out["loss_kl"]).backward()
    expected = [p.grad.clone() for p in trained.parameters()]
    opt = torch.optim.SGD(trained.parameters(), lr=0.0)
    runs = []
    for chunk_steps in chunk_sizes:
        runs.append(chunked_update(loss, traj, opt, chunk_steps=chunk_steps, grad_clip=1e9))
        for e, g in zip(expected, (p.grad for p in trained.parameters())):
            assert torch.allclose(e, g, atol=1e-6, rtol=1e-4)
    return out, runs


def _kl_setup(rl, window, sde: str = "paper", kl_steps: str = "all"):
    """A batch of a mixed env kept with its ODE steps, a loss with ``kl_steps`` and a trained copy moved off
    the reference."""
    env, policy, model, _ = make(rl, window, sde)
    trained = copy.deepcopy(transition_core(policy).arflow)
    env.set_windows(torch.tensor([2, 5]))
    env.generator.manual_seed(4)
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        traj = collect_trajectories(env, policy, keep_ode_steps=kl_steps == "all")
    traj["token_mask"] = listening_token_mask(env.bank["listening"][traj["window"]], rl.N)
    loss = GDPOLoss(transition_core(policy), trained, env.reward_fn.lambdas, beta=0.5, kl_steps=kl_steps)
    loss.compute_advantage(traj)
    with torch.no_grad():
        trained.head.bias.add_(0.05)
    return env, policy, loss, trained, traj


@pytest.mark.parametrize("sde", ["paper", "marginal"])
def test_kl_on_every_step_adds_the_ode_steps_means_and_keeps_the_objective(rl, sde):
    """kl_steps="all": the ODE steps are kept; replay puts their mean at the recorded action (the Euler step,
    also for the marginal drift); the objective is the SDE-only loss's, and the KL is the mean over all K
    steps of ||mu - mu_ref||^2 / (2 sigma^2 dt), the SDE steps' part being the SDE-only loss's KL."""
    window = (0, 2)
    _, policy, loss_all, trained, traj = _kl_setup(rl, window, sde)
    assert traj["x"].shape[1] == K and loss_all.held_steps(K) == list(range(K))
    sde_mask = loss_all.sde_step_mask(traj["t"])  # (B, K, N)
    assert sde_mask[:, :2].all() and not sde_mask[:, 2:].any()
    core = transition_core(policy)
    with torch.no_grad():
        loc = core.replay_loc(traj["window"], traj["history"], traj["x"], traj["t"], sde=sde_mask)
    assert torch.allclose(loc[:, 2:], traj["action"][:, 2:], atol=1e-5), (loc[:, 2:] - traj["action"][:, 2:]).abs().max()
    sde_only = GDPOLoss(core, trained, loss_all.lambdas, beta=0.5, kl_steps="sde", reference=loss_all.ref_network)
    ref_all = loss_all(traj)
    ref_sde = sde_only(select_steps(traj, *window))
    assert torch.allclose(ref_all["loss_objective"], ref_sde["loss_objective"], atol=1e-6)
    with torch.no_grad():
        mu = core.replay_loc(traj["window"], traj["history"], traj["x"], traj["t"], model=trained, sde=sde_mask)
        mu_ref = core.replay_loc(traj["window"], traj["history"], traj["x"], traj["t"], model=loss_all.ref_network, sde=sde_mask)
    kl = ((mu - mu_ref) ** 2).sum(-1) / (2 * SIGMA**2 / K)  # (B, K, N)
    assert kl[:, 2:].mean() > 0
    assert torch.allclose(ref_all["loss_kl"], 0.5 * kl.mean(), rtol=1e-4)
    assert torch.allclose(ref_sde["loss_kl"], 0.5 * kl[:, :2].mean(), rtol=1e-4)


def test_chunked_update_with_ode_steps_equals_the_full_batch_gradient(rl):
    """Chunks of one step (two of them ODE steps, without objective) weight the objective by its SDE
    transitions and the KL by all: the accumulated gradient is the one-pass gradient."""
    _, _, loss, trained, traj = _kl_setup(rl, (1, 3))
    out, runs = chunked_matches_one_pass(loss, trained, traj, (1, 3))
    for stats in runs:
        assert stats["loss/loss_objective"] == pytest.approx(out["loss_objective"].item(), rel=1e-4, abs=1e-7)
        assert stats["loss/loss_kl"] == pytest.approx(out["loss_kl"].item(), rel=1e-4)


def test_kl_on_every_step_without_a_window_is_the_sde_loss(rl):
    _, _, loss_all, trained, traj = _kl_setup(rl, None)
    sde_only = GDPOLoss(loss_all.transition[0], trained, loss_all.lambdas, beta=0.5, reference=loss_all.ref_network)
    a, b = loss_all(traj), sde_only(traj)
    for k in ("loss_objective", "loss_kl", "clip_fraction"):
        assert torch.equal(a[k], b[k]), k


def test_a_batch_of_an_unexpected_step_count_is_refused(rl):
    _, _, loss, _, traj = _kl_setup(rl, (1, 3))
    assert loss.held_steps(2) == [1, 2]
    with pytest.raises(ValueError, match="denoising steps"):
        chunked_update(loss, select_steps(traj, 0, 3), torch.optim.SGD(loss.actor_network.parameters(), lr=0.0))
    with pytest.raises(ValueError, match="kl_steps"):
        GDPOLoss(loss.transition[0], loss.actor_network, loss.lambdas, kl_steps="ode")
