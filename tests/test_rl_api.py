"""The RL building blocks are safe however they are called (issue 14), and the env is built from paths alone."""
from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torchrl.envs.utils import ExplorationType, check_env_specs, set_exploration_type, step_mdp

from gdpo_listener.agents import flow
from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
from gdpo_listener.agents.encoders import AudioEncoder, TextEncoder
from gdpo_listener.agents.loss import collect_trajectories
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.agents.vae import MotionVAE, VAEConfig, save_vae
from gdpo_listener.envs import ENV_ID
from gdpo_listener.envs.dataset import DatasetFormatError, Normalizer
from gdpo_listener.envs.factory import make_listener_env
from gdpo_listener.envs.gym_adapter import ListenerGymEnv
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.envs.synthetic import generate_corpus
from gdpo_listener.rewards.groups import build_reward

K, SIGMA = 2, 0.5


def make_env(rl, steps=K, sigma=SIGMA, seed=0, n_prompts=2, G=2, bank=None, generator=None):
    vae, norm = rl.tiny_vae()
    return ListenerSDEEnv(rl.tiny_bank() if bank is None else bank, vae, norm, build_reward("expr+rot"), n_prompts=n_prompts,
                          group_size=G, sde_steps=steps, sigma=sigma, seed=seed,
                          generator=torch.Generator().manual_seed(seed) if generator is None else generator)


# 1 -- exploration ---------------------------------------------------------------------------------

def test_policy_samples_by_default_and_is_deterministic_only_when_asked(rl):
    env = make_env(rl)
    policy = make_policy(rl.tiny_arflow(), env, generator=torch.Generator().manual_seed(0))
    td = env.reset()
    with torch.no_grad():
        a1, a2 = policy(td.clone()), policy(td.clone())  # no exploration type set by the caller
    assert not torch.allclose(a1["action"], a1["loc"], atol=1e-3)  # a sample, not the mean
    assert not torch.allclose(a1["action"], a2["action"], atol=1e-3)
    assert not torch.allclose(a1["action_log_prob"], a2["action_log_prob"])
    z = (a1["action"] - a1["loc"]) / a1["scale"]
    expected = (-0.5 * z.pow(2) - a1["scale"].log() - 0.5 * np.log(2 * np.pi)).sum(-1)
    assert torch.allclose(a1["action_log_prob"], expected, atol=1e-5)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        d = policy(td.clone())
    assert torch.equal(d["action"], d["loc"])


# 2 -- train-mode AR-Flow ----------------------------------------------------------------------------

def test_train_mode_arflow_collects_and_replays_the_same_log_probs(rl):
    """Condition dropout and dropout are off in collection and replay, whatever the module's mode."""
    torch.manual_seed(0)
    cfg = ARFlowConfig(d_latent=rl.DV, d_text=rl.DT, d_audio=rl.DA, d_model=32, n_layers=2, n_heads=2, r=rl.R, window=rl.N * rl.R,
                       dropout=0.3, p_drop_text=0.5, p_drop_audio=0.5, p_drop_motion=0.5)
    model = ARFlow(cfg).train()
    results = []
    for mode in ("train", "eval"):
        env = make_env(rl, seed=3)
        model.train(mode == "train")
        policy = make_policy(model, env, generator=env.generator)
        env.set_windows(torch.tensor([1, 4]))
        with set_exploration_type(ExplorationType.RANDOM):
            traj = collect_trajectories(env, policy)
        assert model.training == (mode == "train")  # the caller's mode is left as it was
        loc = transition_core(policy).replay_loc(traj["window"], traj["history"], traj["x"], traj["t"])  # train mode, grad
        assert loc.requires_grad
        lp = flow.gaussian_log_prob(traj["action"], loc, flow.transition_std(SIGMA, 1 / K))
        assert torch.allclose(lp, traj["action_log_prob"], atol=1e-4), (mode, (lp - traj["action_log_prob"]).abs().max())
        results.append(traj["history"])
    assert torch.allclose(results[0], results[1], atol=1e-5)  # the same episodes in either mode


# 3 -- one policy, two environments ------------------------------------------------------------------

def alternate(policy_a, policy_b, env_a, env_b, steps):
    """Step two envs in turn, each with its policy; -> per env the list of policy outputs."""
    tds, out = [env_a.reset(), env_b.reset()], ([], [])
    pols, envs = (policy_a, policy_b), (env_a, env_b)
    with torch.no_grad():
        for _ in range(steps):
            for i in range(2):
                td = pols[i](tds[i])
                out[i].append(td.select("x", "t", "window", "loc", "action", "action_log_prob").clone())
                tds[i] = step_mdp(envs[i].step(td))
    return [torch.stack(o, dim=1) for o in out]


def two_envs(rl):
    """Two envs of the same bank on different windows, with their own noise."""
    env_a, env_b = make_env(rl, seed=1), make_env(rl, seed=2)
    env_a.set_windows(torch.tensor([0, 1]))
    env_b.set_windows(torch.tensor([4, 5]))
    return env_a, env_b


def test_one_policy_stepping_two_envs_equals_two_policies(rl):
    model = rl.tiny_arflow()
    env_a, env_b = two_envs(rl)
    shared = make_policy(model, env_a)
    with set_exploration_type(ExplorationType.DETERMINISTIC):  # actions = means: only the cache decides them
        got = alternate(shared, shared, env_a, env_b, rl.N * K)
        env_a, env_b = two_envs(rl)
        ref = alternate(make_policy(model, env_a), make_policy(model, env_b), env_a, env_b, rl.N * K)
    for g, r in zip(got, ref):
        assert torch.allclose(g["action"], r["action"], atol=1e-5), (g["action"] - r["action"]).abs().max()
    # sampled actions: the log-probs recorded while alternating equal a cache-free teacher-forced replay
    env_a, env_b = two_envs(rl)
    with set_exploration_type(ExplorationType.RANDOM):
        got = alternate(shared, shared, env_a, env_b, rl.N * K)
    core = transition_core(shared)
    for g in got:
        B = g.shape[0]
        x = g["x"].reshape(B, rl.N, K, rl.DV).transpose(1, 2)  # (B, K, N, Dv): step-major layout of replay_loc
        t = g["t"].squeeze(-1).reshape(B, rl.N, K).transpose(1, 2)  # (B, K, N)
        action = g["action"].reshape(B, rl.N, K, rl.DV).transpose(1, 2)  # (B, K, N, Dv)
        history = action[:, -1]  # (B, N, Dv): the last transition of every token
        with torch.no_grad():
            loc = core.replay_loc(g["window"][:, 0], history, x, t)
        lp = flow.gaussian_log_prob(action, loc, flow.transition_std(SIGMA, 1 / K))
        rec = g["action_log_prob"].reshape(B, rl.N, K).transpose(1, 2)
        assert torch.allclose(lp, rec, atol=1e-4), (lp - rec).abs().max()


# 4 -- gymnasium reproducibility -----------------------------------------------------------------------

def test_gym_make_reset_seed_is_reproducible_without_a_generator(rl):
    vae, norm = rl.tiny_vae()
    tenv = ListenerSDEEnv(rl.tiny_bank(), vae, norm, build_reward("expr+rot"), n_prompts=1, group_size=1, sde_steps=K)
    env = gymnasium.make(ENV_ID, torchrl_env=tenv)  # wrappers included (passive checker, order enforcing)
    check_env(env, skip_render_check=True)

    def episode(seed):
        obs, _ = env.reset(seed=seed)
        first, total, done = obs, 0.0, False
        while not done:
            obs, r, done, _, _ = env.step(obs["x"] * 0.9)
            total += r
        return first, total

    (o1, r1), (o2, r2), (o3, _) = episode(5), episode(5), episode(6)
    assert np.array_equal(o1["x"], o2["x"]) and o1["window"] == o2["window"] and r1 == r2
    assert not np.array_equal(o1["x"], o3["x"])


# 5 -- the env owns sigma, sde_steps and sde --------------------------------------------------------

def test_policy_takes_the_sde_from_the_env_and_refuses_other_values(rl):
    env = make_env(rl, steps=3, sigma=0.7)
    core = transition_core(make_policy(rl.tiny_arflow(), env))
    assert (core.sigma, core.sde_steps, core.sde) == (0.7, 3, "paper")
    for kw, msg in [({"sigma": 0.5}, "sigma=0.5 but the environment has env.sigma=0.7"),
                    ({"sde_steps": 4}, "sde_steps=4 but the environment has env.sde_steps=3"),
                    ({"sde": "marginal"}, "sde='marginal' but the environment has env.sde='paper'")]:
        with pytest.raises(ValueError, match=msg):
            make_policy(rl.tiny_arflow(), env, **kw)
    make_policy(rl.tiny_arflow(), env, sigma=0.7, sde_steps=3)  # agreeing values are accepted


def test_policy_with_other_step_count_than_the_env_fails_at_the_first_mismatched_step(rl):
    env = make_env(rl, steps=3)
    with pytest.warns(DeprecationWarning, match="pass the ListenerSDEEnv"):
        policy = make_policy(rl.tiny_arflow(), env.bank, sigma=SIGMA, sde_steps=2)
    with pytest.raises(ValueError, match="sde_step=1, t=0.333.*policy's sde_steps=2"), torch.no_grad():
        env.rollout(3, policy)


# C -- an environment from paths alone ---------------------------------------------------------------

@pytest.fixture(scope="module")
def paths(tmp_path_factory, rl):
    """A 2-conversation synthetic dataset (8 s each: one window per side) and an untrained tiny VAE."""
    d = tmp_path_factory.mktemp("paths")
    generate_corpus(d / "data", n_conversations=2, seconds=8, test_fraction=0.5, progress=False)
    torch.manual_seed(0)
    norm = Normalizer.load(d / "data" / "normalizer.npz")
    save_vae(d / "vae", MotionVAE(VAEConfig.tiny(d_latent=rl.DV)), norm)
    return d


@pytest.fixture(scope="module")
def encoders():
    return TextEncoder("bundled-minilm"), AudioEncoder("logmel")


def test_torchrl_env_from_paths(paths, encoders, rl):
    text, audio = encoders
    env = make_listener_env(paths / "data", paths / "vae", reward="expr+rot", n_prompts=1, group_size=2, sde_steps=K,
                            sde="marginal", text_encoder=text, audio_encoder=audio, feature_cache=paths / "cache", seed=0)
    check_env_specs(env)
    assert env.n_windows == 2 and env.n_tokens == 200 // rl.R and env.group_names == ("expr", "rot")
    assert env.bank["actor_audio"].shape[-1] == audio.dim and env.bank["text_emb"].shape[-1] == text.dim
    assert any((paths / "cache").iterdir())  # features were cached where asked
    cfg = ARFlowConfig(d_latent=rl.DV, d_text=text.dim, d_audio=audio.dim, d_model=32, n_layers=1, n_heads=2, r=rl.R, window=200)
    policy = make_policy(ARFlow(cfg).eval(), env, generator=env.generator)
    assert transition_core(policy).sde == "marginal"
    with torch.no_grad():
        ro = env.rollout(env.n_tokens * K, policy, break_when_any_done=False)
    r = ro["next", "reward"][:, -1]  # (B, 2)
    assert ro["next", "done"][:, -1].all() and torch.isfinite(r).all() and (r != 0).any()


def test_gym_make_from_paths(paths, encoders):
    text, audio = encoders
    env = gymnasium.make(ENV_ID, dataset=str(paths / "data"), vae=str(paths / "vae"), reward="expr+rot", sde_steps=K,
                         text_encoder=text, audio_encoder=audio, feature_cache=str(paths / "cache"))
    assert isinstance(env.unwrapped, ListenerGymEnv) and env.unwrapped.env.group_names == ("expr", "rot")
    check_env(env, skip_render_check=True)
    with pytest.raises(ValueError, match="group_size must be 1"):
        gymnasium.make(ENV_ID, dataset=str(paths / "data"), vae=str(paths / "vae"), group_size=4)


def test_missing_or_bad_paths_are_clear_errors(paths, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset .*nowhere.*is not a folder"):
        make_listener_env(tmp_path / "nowhere", paths / "vae")
    with pytest.raises(FileNotFoundError, match="VAE checkpoint .*novae.*is not a folder"):
        make_listener_env(paths / "data", tmp_path / "novae")
    with pytest.raises(DatasetFormatError, match="dataset.json is missing"):
        make_listener_env(tmp_path, paths / "vae")
    with pytest.raises(ValueError, match="unknown"):
        make_listener_env(paths / "data", paths / "vae", reward="expr+nose")
    with pytest.raises(TypeError, match="dataset=... and vae="):
        gymnasium.make(ENV_ID, dataset=str(paths / "data"))
