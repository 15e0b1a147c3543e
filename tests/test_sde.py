"""SDE choice (env.sde = paper | marginal): the Gaussian check of the drift, and the env rollout,
collected log-probs and replay against the AR-Flow sampler for both kinds."""
from __future__ import annotations

import math

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from gdpo_listener.agents import flow
from gdpo_listener.agents.loss import collect_trajectories
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.envs.windows import cond_from_bank
from gdpo_listener.rewards.groups import build_reward

DATA_STD = 0.30
SIGMA = 0.5


def gaussian_velocity_gain(t: float, s: float) -> float:
    """Exact flow velocity of Gaussian data, as a gain: E[x1 - x0 | x_t = x] = gain(t) * x.

    x_t = t x1 + (1 - t) x0 with x0 ~ N(0, 1), x1 ~ N(0, s^2) independent (t = 0 noise, t = 1 data):
    (x1 - x0, x_t) is jointly Gaussian with Cov = t s^2 - (1 - t) and Var(x_t) = t^2 s^2 + (1 - t)^2,
    so the conditional mean is linear: gain = (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2).
    """
    return (t * s * s - (1.0 - t)) / (t * t * s * s + (1.0 - t) ** 2)


def sampled_std(sde: str, steps: int, dims: int, n: int = 40_000, seed: int = 0) -> torch.Tensor:
    """Per-dim std of ``n`` samples of the Euler-Maruyama sampler (flow.sde_step with flow.sde_drift)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dims, generator=g, dtype=torch.float64)  # (n, D) noise at t = 0
    dt = 1.0 / steps
    for s in range(steps):
        t = s * dt
        v = gaussian_velocity_gain(t, DATA_STD) * x  # (n, D) exact velocity
        noise = torch.randn(n, dims, generator=g, dtype=torch.float64)
        x = flow.sde_step(x, flow.sde_drift(x, v, t, SIGMA, sde), dt, SIGMA, noise)
    return x.std(0)


def final_std(sde: str, steps: int) -> float:
    """Exact std after ``steps`` Euler-Maruyama steps: the drift is linear, b = c(t) x, so
    Var <- (1 + dt c)^2 Var + sigma^2 dt, with c(t) read off flow.sde_drift at x = 1."""
    dt, var = 1.0 / steps, 1.0
    one = torch.ones(1, dtype=torch.float64)
    for s in range(steps):
        t = s * dt
        c = float(flow.sde_drift(one, gaussian_velocity_gain(t, DATA_STD) * one, t, SIGMA, sde))
        var = (1.0 + dt * c) ** 2 * var + SIGMA**2 * dt
    return math.sqrt(var)


@pytest.mark.parametrize("dims", [1, 6])
def test_sampler_matches_the_exact_gaussian_recursion(dims):
    """Monte-Carlo runs of the SDE sampler (1-D and 6-D) end at the closed-form std of the discrete chain."""
    for sde in ("paper", "marginal"):
        got = sampled_std(sde, 4, dims)
        torch.testing.assert_close(got, torch.full_like(got, final_std(sde, 4)), rtol=0.015, atol=0)


def test_marginal_sde_keeps_the_data_std_paper_sde_does_not():
    # the continuous-time limit: the marginal (score-corrected) SDE keeps the flow's marginal, std 0.30;
    # the paper's SDE (eq. 7, drift v) ends far above it and does not converge to it
    assert final_std("marginal", 100) == pytest.approx(DATA_STD, rel=0.03)
    assert final_std("marginal", 1000) == pytest.approx(DATA_STD, rel=0.005)
    assert final_std("paper", 100) > 1.4 * DATA_STD  # 0.449 (issue 10: 0.451)
    assert final_std("paper", 1000) > 1.4 * DATA_STD
    # 4 steps (the RL setting): the paper's SDE is visibly off (issue 10 measured 0.357); the marginal
    # SDE is much closer but carries the Euler error of 4 steps (0.275), which no drift choice removes
    paper4, marginal4 = final_std("paper", 4), final_std("marginal", 4)
    assert paper4 == pytest.approx(0.357, abs=0.003)
    assert marginal4 == pytest.approx(0.275, abs=0.003)
    assert abs(marginal4 - DATA_STD) < 0.5 * abs(paper4 - DATA_STD)
    # the same on samples of 6-D data
    assert torch.all((sampled_std("marginal", 100, 6) / DATA_STD - 1).abs() < 0.03)
    assert torch.all(sampled_std("paper", 4, 6) > 1.1 * DATA_STD)


def make(rl, sde: str, steps: int = 3, seed: int = 0):
    bank = rl.tiny_bank()
    vae, norm = rl.tiny_vae()
    g = torch.Generator().manual_seed(seed)
    env = ListenerSDEEnv(bank, vae, norm, build_reward("expr+rot"), n_prompts=2, group_size=2, sde_steps=steps,
                         sigma=SIGMA, sde=sde, generator=g, seed=seed)
    model = rl.tiny_arflow()
    return env, make_policy(model, env, generator=g), model, bank


@pytest.mark.parametrize("sde", ["paper", "marginal"])
def test_env_rollout_equals_sampler_and_replay_equals_collection(sde, rl):
    env, policy, model, bank = make(rl, sde)
    assert transition_core(policy).sde == sde
    env.set_windows(torch.tensor([2, 5]))
    env.generator.manual_seed(4)
    with set_exploration_type(ExplorationType.RANDOM):
        traj = collect_trajectories(env, policy)
    rows = bank[traj["window"]]
    env.generator.manual_seed(4)
    z_ref = model.sample(cond_from_bank(rows), rl.N, steps=3, sigma=SIGMA, generator=env.generator, sde=sde)
    assert torch.allclose(traj["history"], z_ref, atol=1e-4), (traj["history"] - z_ref).abs().max()
    # the recorded mean is x + dt * sde_drift(x, v, t) and the replay (teacher forced) gives the same log-probs
    core = transition_core(policy)
    with torch.no_grad():
        loc = core.replay_loc(traj["window"], traj["history"], traj["x"], traj["t"])  # (B, K, N, Dv)
    lp = flow.gaussian_log_prob(traj["action"], loc, flow.transition_std(SIGMA, 1 / 3))
    assert torch.allclose(lp, traj["action_log_prob"], atol=1e-4), (lp - traj["action_log_prob"]).abs().max()


def test_sde_kinds_give_different_paths_from_the_same_noise(rl):
    z = {}
    for sde in ("paper", "marginal"):
        env, policy, _, _ = make(rl, sde)
        env.set_windows(torch.tensor([2, 5]))
        env.generator.manual_seed(4)
        with set_exploration_type(ExplorationType.RANDOM):
            z[sde] = collect_trajectories(env, policy)["history"]
    assert not torch.allclose(z["paper"], z["marginal"], atol=1e-3)


def test_bad_sde_kind_is_refused(rl):
    vae, norm = rl.tiny_vae()
    with pytest.raises(ValueError, match="sde must be one of"):
        ListenerSDEEnv(rl.tiny_bank(), vae, norm, build_reward("expr"), n_prompts=1, group_size=2, sde="ito")
