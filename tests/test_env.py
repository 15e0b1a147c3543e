"""The SDE environment, the AR-Flow policy and their agreement with the AR-Flow samplers."""
from __future__ import annotations

import math

import pytest
import torch
from torchrl.envs.utils import ExplorationType, check_env_specs, set_exploration_type

from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.envs.windows import cond_from_bank
from gdpo_listener.rewards.groups import build_reward


def make(rl, n_prompts=2, G=2, steps=2, sigma=0.5, spec="expr+rot", seed=0, bank=None, **env_kw):
    bank = rl.tiny_bank() if bank is None else bank
    vae, norm = rl.tiny_vae()
    g = torch.Generator().manual_seed(seed)
    env = ListenerSDEEnv(bank, vae, norm, build_reward(spec), n_prompts=n_prompts, group_size=G, sde_steps=steps,
                         sigma=sigma, generator=g, seed=seed, **env_kw)
    model = rl.tiny_arflow()
    policy = make_policy(model, env, generator=g)
    return env, policy, model, bank


@pytest.mark.parametrize("n_prompts,G,spec", [(1, 2, "expr"), (2, 2, "expr+rot"), (3, 4, "all")])
def test_check_env_specs(n_prompts, G, spec, rl):
    env, _, _, _ = make(rl, n_prompts, G, spec=spec)
    check_env_specs(env)
    assert env.reward_spec.shape == (n_prompts * G, len(spec.split("+")) if spec != "all" else 6)


def test_episode_structure_and_reward_only_at_end(rl):
    env, policy, _, _ = make(rl, steps=3)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        ro = env.rollout(rl.N * 3, policy, break_when_any_done=False)
    assert ro.batch_size == (4, rl.N * 3)
    r = ro["next", "reward"]
    assert torch.all(r[:, :-1] == 0)
    assert torch.isfinite(r[:, -1]).all() and (r[:, -1] != 0).any()
    assert ro["next", "done"][:, -1].all() and not ro["next", "done"][:, :-1].any()
    # the G rollouts of a prompt share the window and the group id
    w, gid = ro["window"][:, 0], ro["group_id"][:, 0]
    assert torch.equal(w[0::2], w[1::2]) and torch.equal(gid, torch.tensor([0, 0, 1, 1]))
    # the history is the last action of every token
    hist = ro["next", "history"][:, -1]
    assert torch.allclose(hist, ro["action"][:, 2::3])


def test_policy_log_prob_is_closed_form_gaussian(rl):
    env, policy, _, _ = make(rl, steps=4, sigma=0.5)
    td = env.reset()
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        td = policy(td)
    std = 0.5 * math.sqrt(0.25)
    assert torch.allclose(td["scale"], torch.full_like(td["scale"], std))
    z = (td["action"] - td["loc"]) / std
    expected = (-0.5 * z.pow(2) - math.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(td["action_log_prob"], expected, atol=1e-5)


def rollout_latents(rl, env, policy, steps):
    with torch.no_grad():
        ro = env.rollout(rl.N * steps, policy, break_when_any_done=False)
    return ro["next", "history"][:, -1], ro


def test_deterministic_rollout_reproduces_ode_sampler(rl):
    """sigma -> 0 (deterministic exploration = the transition mean) gives the Euler ODE sampler."""
    env, policy, model, bank = make(rl, steps=4, sigma=0.5)
    env.set_windows(torch.tensor([1, 4]))
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        g = env.generator.manual_seed(123)
        z_env, ro = rollout_latents(rl, env, policy, 4)
    rows = bank[ro["window"][:, 0]]
    g.manual_seed(123)
    # sample() draws one (B, Dv) noise per token from its generator; in a deterministic rollout the
    # policy draws nothing, so the env's noise stream is exactly the sampler's
    z_ode = model.sample(cond_from_bank(rows), rl.N, steps=4, generator=g)
    assert torch.allclose(z_env, z_ode, atol=1e-4), (z_env - z_ode).abs().max()


def test_cond_drop_rollouts_are_the_unconditional_branch(rl):
    """env cond_drop: a dropped prompt points to the window's copy whose conditions are nulled; its deterministic
    rollout is exactly the sampler's unconditional CFG branch (w = 0), the other prompts' the conditional one."""
    bank = rl.tiny_bank()
    n = bank.batch_size[0]
    env, policy, model, _ = make(rl, n_prompts=3, steps=4, bank=bank, cond_drop=0.5, seed=1)
    assert "cond_drop" not in bank.keys() and env.bank.batch_size[0] == 2 * n and env.n_windows == n
    assert not env.bank["cond_drop"][:n].any() and env.bank["cond_drop"][n:].all()
    check_env_specs(env)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        g = env.generator.manual_seed(7)
        z_env, ro = rollout_latents(rl, env, policy, 4)
    window = ro["window"][:, 0]  # (B,) bank rows
    dropped = window >= n
    assert dropped.any() and (~dropped).any(), window  # this seed draws both kinds
    rows = bank[window % n]
    g.manual_seed(7)
    z_cond = model.sample(cond_from_bank(rows), rl.N, steps=4, generator=g)
    g.manual_seed(7)
    z_null = model.sample(cond_from_bank(rows), rl.N, steps=4, generator=g, w_speak=0.0, w_listen=0.0)
    assert torch.allclose(z_env[~dropped], z_cond[~dropped], atol=1e-4)
    assert torch.allclose(z_env[dropped], z_null[dropped], atol=1e-4)
    assert not torch.allclose(z_cond[dropped], z_null[dropped], atol=1e-3)  # the drop matters
    # the reward of a copy is its window's: same ground truth
    r = env.episode_reward(z_env, window)
    assert torch.allclose(r, env.episode_reward(z_env, window % n))
    # about cond_drop of the prompts are dropped
    draws = torch.cat([env.reset()["window"] for _ in range(200)])
    assert 0.4 < (draws >= n).float().mean() < 0.6


def test_cond_drop_draws_the_same_windows_as_no_drop_and_resumes_its_draws(rl):
    """The drop draws have a stream of their own: for one seed every cond_drop trains on the same window
    sequence (so a probe of p compares dropout, not window draws), and rng_state resumes both streams."""
    bank = rl.tiny_bank()
    n = bank.batch_size[0]
    plain, *_ = make(rl, n_prompts=3, bank=bank, seed=4)
    drop, *_ = make(rl, n_prompts=3, bank=bank, seed=4, cond_drop=0.5)
    w0 = torch.stack([plain.reset()["window"] for _ in range(30)])  # (30, B)
    w1 = torch.stack([drop.reset()["window"] for _ in range(30)])
    assert torch.equal(w0, w1 % n) and (w1 >= n).any()
    state = drop.rng_state()
    after = torch.stack([drop.reset()["window"] for _ in range(10)])
    drop.reset()
    drop.set_rng_state(state)
    assert torch.equal(torch.stack([drop.reset()["window"] for _ in range(10)]), after)
    drop.set_seed(4)  # reseeding restarts both streams
    assert torch.equal(torch.stack([drop.reset()["window"] for _ in range(30)]), w1)


def test_sde_rollout_reproduces_sde_sampler(rl):
    env, policy, model, bank = make(rl, steps=4, sigma=0.5)
    env.set_windows(torch.tensor([0, 3]))
    g = env.generator.manual_seed(7)
    with set_exploration_type(ExplorationType.RANDOM):
        z_env, ro = rollout_latents(rl, env, policy, 4)
    rows = bank[ro["window"][:, 0]]
    g.manual_seed(7)
    z_sde = model.sample(cond_from_bank(rows), rl.N, steps=4, sigma=0.5, generator=g)
    assert torch.allclose(z_env, z_sde, atol=1e-4), (z_env - z_sde).abs().max()
    # and the path is really stochastic: another seed gives another result
    env.set_windows(torch.tensor([0, 3]))
    env.generator.manual_seed(8)
    with set_exploration_type(ExplorationType.RANDOM):
        z_other, _ = rollout_latents(rl, env, policy, 4)
    assert not torch.allclose(z_env, z_other, atol=1e-2)


def test_kv_cache_matches_recompute_in_rollout(rl):
    """The cached policy step equals a full teacher-forced recompute of the same state."""
    env, policy, model, bank = make(rl, steps=2, sigma=0.5)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        ro = env.rollout(rl.N * 2, policy, break_when_any_done=False)
    core = transition_core(policy)
    hist = ro["next", "history"][:, -1]
    B = hist.shape[0]
    x = ro["x"].reshape(B, rl.N, 2, rl.DV).transpose(1, 2)
    t = ro["t"].squeeze(-1).reshape(B, rl.N, 2).transpose(1, 2)
    with torch.no_grad():
        loc = core.replay_loc(ro["window"][:, 0], hist, x, t)
    assert torch.allclose(loc, ro["loc"].reshape(B, rl.N, 2, rl.DV).transpose(1, 2), atol=1e-5)


def test_no_listening_frames_gives_zero_reward_not_nan(rl):
    env, policy, _, _ = make(rl, bank=rl.tiny_bank(listening=False))
    with torch.no_grad():
        ro = env.rollout(rl.N * 2, policy, break_when_any_done=False)
    r = ro["next", "reward"][:, -1]
    assert torch.isfinite(r).all() and torch.all(r == 0)


def test_speaking_column_reward_is_scored_on_the_speaking_frames(rl):
    """The env hands the bank's speaking frames to a reward with a ``<group>@speaking`` column."""
    env, policy, _, bank = make(rl, spec="expr+jaw@speaking")
    check_env_specs(env)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        ro = env.rollout(rl.N * 2, policy, break_when_any_done=False)
    r = ro["next", "reward"][:, -1]  # (B, 2)
    rows = bank[ro["window"][:, 0]]
    pred = env.decode(ro["next", "history"][:, -1])
    expect = build_reward("jaw")(pred, rows["actor_motion"], rows["speaking"], rows["actor_valid"])[:, 0]
    assert rows["speaking"].any(-1).all() and torch.allclose(r[:, 1], expect, atol=1e-6)
    terms = env.episode_reward_terms(ro["next", "history"][:, -1], ro["window"][:, 0])
    assert "reward/jaw@speaking/var" in terms


def test_hold_column_is_scored_against_the_banks_reference_motion(rl):
    """The env hands the bank's ``reference_motion`` to a reward with a ``<group>@hold`` column; a bank
    without one is refused when the env is built."""
    bank = rl.tiny_bank()
    vae, norm = rl.tiny_vae()
    with pytest.raises(ValueError, match="reference_motion"):
        ListenerSDEEnv(bank, vae, norm, build_reward("expr+jaw@hold"), n_prompts=2, group_size=2, sde_steps=2)
    bank["reference_motion"] = bank["actor_motion"] + 0.3 * torch.randn(bank["actor_motion"].shape)
    env, policy, _, _ = make(rl, spec="expr+jaw@hold", bank=bank)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        ro = env.rollout(rl.N * 2, policy, break_when_any_done=False)
    r = ro["next", "reward"][:, -1]  # (B, 2)
    rows = bank[ro["window"][:, 0]]
    pred = env.decode(ro["next", "history"][:, -1])
    expect = build_reward("jaw")(pred, rows["reference_motion"], rows["listening"], rows["actor_valid"])[:, 0]
    assert torch.allclose(r[:, 1], expect, atol=1e-6)
    assert "reward/jaw@hold/var" in env.episode_reward_terms(ro["next", "history"][:, -1], ro["window"][:, 0])


def test_hold_reference_is_the_supervised_models_rollout_with_the_env_sampler(rl):
    """attach_hold_reference: the env's own rollout under the same noise; with sigma 0 the evaluation sampler's
    motion, as with env.hold_reference=ode whatever the env's sampler; the same for the same seed; a reward
    without hold columns leaves the bank alone."""
    from omegaconf import OmegaConf

    from gdpo_listener.evaluation.generation import generate_motion
    from gdpo_listener.pipeline.rl import attach_hold_reference

    vae, norm = rl.tiny_vae()
    model = rl.tiny_arflow()
    cfg = lambda sigma, seed=0, reference="rollout": OmegaConf.create({"seed": seed, "eval": {"steps": 3}, "env": {  # noqa: E731
        "sde_steps": 2, "sigma": sigma, "sde": "paper", "sde_window": None, "prefix_tokens": 1,
        "hold_reference": reference}})
    hold = build_reward("expr+jaw@hold")
    assert "reference_motion" not in attach_hold_reference(cfg(0.5), rl.tiny_bank(), model, vae, norm, build_reward("expr")).keys()
    ode = attach_hold_reference(cfg(0.0), rl.tiny_bank(), model, vae, norm, hold)["reference_motion"]
    bank = rl.tiny_bank()
    assert torch.allclose(ode, generate_motion(model, vae, norm, bank, steps=2, seed=0), atol=1e-5)
    evaluation = attach_hold_reference(cfg(0.5, reference="ode"), rl.tiny_bank(), model, vae, norm, hold)["reference_motion"]
    assert torch.allclose(evaluation, generate_motion(model, vae, norm, bank, steps=3, seed=0), atol=1e-5)
    sde = attach_hold_reference(cfg(0.5), rl.tiny_bank(), model, vae, norm, hold)["reference_motion"]
    assert sde.shape == bank["actor_motion"].shape and not torch.allclose(sde, ode, atol=1e-3)
    assert torch.equal(sde, attach_hold_reference(cfg(0.5), rl.tiny_bank(), model, vae, norm, hold)["reference_motion"])
    assert not torch.equal(sde, attach_hold_reference(cfg(0.5, seed=1), rl.tiny_bank(), model, vae, norm, hold)["reference_motion"])
    env, policy, _, _ = make(rl, steps=2, sigma=0.5, bank=rl.tiny_bank())  # the rollouts it stands for
    env.set_windows(torch.tensor([0, 3]))
    env.generator.manual_seed(7)
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        ro = env.rollout(rl.N * 2, policy, break_when_any_done=False)
    rows = bank[ro["window"][:, 0]]
    ref = attach_hold_reference(cfg(0.5, seed=7), rows, model, vae, norm, hold)["reference_motion"]
    assert torch.allclose(ref, env.decode(ro["next", "history"][:, -1]), atol=1e-5)


@pytest.mark.parametrize("kw,msg", [({"group_size": 0}, "group_size"), ({"sigma": float("nan")}, "sigma"), ({"sde_steps": 0}, "sde_steps"),
                                    ({"cond_drop": 1.0}, "cond_drop"), ({"cond_drop": 0.1, "drop_keys": ("face",)}, "drop_keys")])
def test_bad_env_config(kw, msg, rl):
    vae, norm = rl.tiny_vae()
    args = dict(n_prompts=2, group_size=2, sde_steps=2, sigma=0.5) | kw
    with pytest.raises(ValueError, match=msg):
        ListenerSDEEnv(rl.tiny_bank(), vae, norm, build_reward("expr"), **args)


def test_gymnasium_adapter_passes_check_env(rl):
    import gymnasium
    from gymnasium.utils.env_checker import check_env

    from gdpo_listener.envs.gym_adapter import ENV_ID, ListenerGymEnv

    vae, norm = rl.tiny_vae()
    tenv = ListenerSDEEnv(rl.tiny_bank(), vae, norm, build_reward("expr+rot", lambdas={"expr": 1.0, "rot": 3.0}),
                          n_prompts=1, group_size=1, sde_steps=2, generator=torch.Generator().manual_seed(0))
    env = gymnasium.make(ENV_ID, torchrl_env=tenv, disable_env_checker=True).unwrapped
    assert isinstance(env, ListenerGymEnv)
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=3)
    steps, done = 0, False
    while not done:
        obs, r, done, _, info = env.step(obs["x"] * 0.9)
        steps += 1
    assert steps == rl.N * 2 and obs["token"] == rl.N
    assert r == pytest.approx(0.25 * info["reward_vector"][0] + 0.75 * info["reward_vector"][1], rel=1e-5)
