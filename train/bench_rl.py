"""Benchmark of the RL stage: rollout throughput (KV cache vs full recompute) and the wall time of
one GDPO iteration split into rollout, reward and replay/update, for both model presets.

    python train/bench_rl.py                          # both presets, 2 threads
    python train/bench_rl.py --presets small --batch 16 --sde-steps 4

Models are randomly initialised (throughput does not depend on the weights); the window bank is
random with the real shapes (200 frames, 25 tokens, log-mel 80, MiniLM 384, latent 16).
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
from gdpo_listener.agents.loss import GDPOLoss, select_steps, trajectory_batch
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.agents.vae import MotionVAE, VAEConfig
from gdpo_listener.envs.dataset import Normalizer
from gdpo_listener.envs.flame import FLAME_DIM, N_GROUPS
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.envs.windows import token_majority
from gdpo_listener.rewards.groups import build_reward


def random_bank(n: int, W: int = 200, r: int = 8, dv: int = 16, dt: int = 384, da: int = 80) -> TensorDict:
    N = W // r
    g = torch.Generator().manual_seed(0)
    vad = torch.rand(n, W, generator=g) > 0.5
    bank = TensorDict({
        "actor_motion": torch.randn(n, W, FLAME_DIM, generator=g) * 0.1,
        "partner_motion": torch.randn(n, W, FLAME_DIM, generator=g) * 0.1,
        "actor_valid": torch.ones(n, N_GROUPS, dtype=torch.bool),
        "partner_valid": torch.ones(n, N_GROUPS, dtype=torch.bool),
        "speaking": vad, "listening": ~vad,
        "partner_has_motion": torch.ones(n, dtype=torch.bool),
        "actor_audio": torch.randn(n, W, da, generator=g), "partner_audio": torch.randn(n, W, da, generator=g),
        "text_emb": torch.randn(n, dt, generator=g), "text_mask": torch.ones(n, dtype=torch.bool),
        "actor_latent": torch.randn(n, N, dv, generator=g), "partner_latent": torch.randn(n, N, dv, generator=g),
    }, batch_size=[n])
    bank["speaking_tokens"] = token_majority(vad, r)
    return bank


def build(preset: str, n_prompts: int, G: int, steps: int, use_cache: bool):
    cfg = getattr(ARFlowConfig, preset)()
    model = ARFlow(cfg).eval()
    bank = random_bank(max(8, n_prompts), W=cfg.window, r=cfg.r, dv=cfg.d_latent, dt=cfg.d_text, da=cfg.d_audio)
    vae = MotionVAE(VAEConfig.small(d_latent=cfg.d_latent)).eval().requires_grad_(False)
    norm = Normalizer(np.zeros(FLAME_DIM, np.float32), np.ones(FLAME_DIM, np.float32))
    reward = build_reward("expr+rot")
    g = torch.Generator().manual_seed(0)
    env = ListenerSDEEnv(bank, vae, norm, reward, n_prompts=n_prompts, group_size=G, sde_steps=steps, generator=g)
    behaviour = copy.deepcopy(model).requires_grad_(False)
    policy = make_policy(behaviour, bank, sde_steps=steps, generator=g, use_cache=use_cache)
    return env, policy, model, reward


def timed_rollout(env, policy, n_steps: int):
    t0 = time.perf_counter()
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        ro = env.rollout(n_steps, policy, break_when_any_done=False)
    return ro, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "paper"])
    ap.add_argument("--n-prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--sde-steps", type=int, default=4)
    ap.add_argument("--uncached-tokens", type=int, default=5, help="tokens of the (slow) recompute rollout")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, K = args.n_prompts * args.group_size, args.sde_steps
    print(f"batch {B} rollouts ({args.n_prompts} prompts x G={args.group_size}), {K} SDE steps per token, "
          f"{args.threads} threads\n")
    print(f"{'preset':8s} {'mode':10s} {'transitions':>12s} {'seconds':>9s} {'trans/s':>9s} {'speed-up':>9s}")
    for preset in args.presets:
        env, policy, model, reward = build(preset, args.n_prompts, args.group_size, K, use_cache=True)
        N = env.n_tokens
        timed_rollout(env, policy, K)  # warm-up
        ro, dt_cached = timed_rollout(env, policy, N * K)
        rate_cached = B * N * K / dt_cached
        env_u, policy_u, _, _ = build(preset, args.n_prompts, args.group_size, K, use_cache=False)
        n_u = min(args.uncached_tokens, N) * K
        _, dt_u = timed_rollout(env_u, policy_u, n_u)
        # the recompute cost grows with the history: extrapolate the first tokens' rate only as a lower bound
        rate_u = B * n_u / dt_u
        print(f"{preset:8s} {'kv-cache':10s} {B * N * K:12d} {dt_cached:9.2f} {rate_cached:9.1f}")
        print(f"{preset:8s} {'recompute':10s} {B * n_u:12d} {dt_u:9.2f} {rate_u:9.1f} {rate_cached / rate_u:8.1f}x"
              f"   (first {n_u // K} tokens only; later tokens recompute more)")

        # one GDPO iteration, split into phases
        traj = trajectory_batch(ro, N, K)
        t0 = time.perf_counter()
        with torch.no_grad():
            env.episode_reward(traj["history"], traj["window"])
        t_reward = time.perf_counter() - t0
        loss = GDPOLoss(transition_core(policy), model.train(), reward.lambdas)
        loss.compute_advantage(traj)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        t0 = time.perf_counter()
        opt.zero_grad()
        for k0 in range(0, K, 2):
            out = loss(select_steps(traj, k0, k0 + 2))
            ((out["loss_objective"] + out["loss_kl"]) * 2 / K).backward()
        opt.step()
        t_update = time.perf_counter() - t0
        print(f"{preset:8s} iteration: rollout {dt_cached:.2f} s | reward (VAE decode + terms) {t_reward:.3f} s | "
              f"replay/update {t_update:.2f} s  ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)\n")


if __name__ == "__main__":
    main()
