"""Set-ups and timings of the RL benchmark (``train/bench_rl.py``): a random window bank with the real shapes,
the env / policy / model / reward of one preset, a timed rollout, and RL that trains only listening low-rank
updates timed beside the whole model. Models are randomly initialised: throughput does not depend on the weights."""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from ..agents.arflow import ARFlow, ARFlowConfig
from ..agents.loss import GDPOLoss, chunked_update, trajectory_batch
from ..agents.policy import make_policy, transition_core
from ..agents.vae import MotionVAE, VAEConfig
from ..envs.dataset import Normalizer
from ..envs.flame import FLAME_DIM, N_GROUPS
from ..envs.sde_env import ListenerSDEEnv
from ..envs.windows import token_majority
from ..pipeline.rl import make_reference, make_trainable
from ..rewards.groups import build_reward


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


def build(preset: str, n_prompts: int, G: int, steps: int, use_cache: bool, device: str = "cpu",
          episode_tokens: int | None = None, model: ARFlow | None = None):
    """Env, policy (a frozen behaviour copy of ``model``), trained model and reward; ``model`` defaults to a new
    random AR-Flow of ``preset``."""
    cfg = getattr(ARFlowConfig, preset)()
    model = ARFlow(cfg).eval().to(device) if model is None else model
    frames = cfg.window if episode_tokens is None else int(episode_tokens) * cfg.r
    bank = random_bank(max(8, n_prompts), W=frames, r=cfg.r, dv=cfg.d_latent, dt=cfg.d_text, da=cfg.d_audio).to(device)
    vae = MotionVAE(VAEConfig.small(d_latent=cfg.d_latent)).eval().requires_grad_(False).to(device)
    norm = Normalizer(np.zeros(FLAME_DIM, np.float32), np.ones(FLAME_DIM, np.float32))
    reward = build_reward("expr+rot").to(device)
    g = torch.Generator(device=device).manual_seed(0)
    env = ListenerSDEEnv(bank, vae, norm, reward, n_prompts=n_prompts, group_size=G, sde_steps=steps, generator=g,
                         device=device)
    behaviour = copy.deepcopy(model).requires_grad_(False)
    policy = make_policy(behaviour, env, generator=g, use_cache=use_cache)
    return env, policy, model, reward


def timed_rollout(env, policy, n_steps: int):
    t0 = time.perf_counter()
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        ro = env.rollout(n_steps, policy, break_when_any_done=False)
    return ro, time.perf_counter() - t0


def lora_timings(preset: str, n_prompts: int, G: int, K: int, chunk_steps: int, repeats: int, device: str,
                 whole_env, whole_policy, whole_model, rank: int, scope: str) -> dict[str, float]:
    """RL that trains only listening low-rank updates (``algo.listen_lora`` / ``algo.lora_scope``;
    ``preset=listening_lora``) against the whole model (``whole_*``, fp32 reference), the two timed interleaved,
    best of ``repeats`` seconds: the cached rollouts (``rollout whole``, ``rollout lora``), the whole model's update
    (``whole``) and the low-rank update with the KL reference train/gdpo.py uses (``lora, reference = the
    checkpoint``: as loaded, without the new zero-initialised updates) and with one that carries them (``lora,
    reference with the updates``: a copy of the trained model, as before 2026-12-07; the same means to the bit)."""
    base = ARFlow(getattr(ARFlowConfig, preset)()).eval().to(device)
    model = copy.deepcopy(base)
    trainable = make_trainable(model, 0, rank, scope)
    env, policy, model, reward = build(preset, n_prompts, G, K, True, device, model=model)
    N = env.n_tokens
    timed_rollout(env, policy, K)  # warm-up
    best: dict[str, float] = {}

    def keep(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)

    trajs = {}
    for _ in range(repeats):
        for name, (e, p) in (("whole", (whole_env, whole_policy)), ("lora", (env, policy))):
            ro, dt = timed_rollout(e, p, N * K)
            keep(f"rollout {name}", dt)
            trajs[name] = trajectory_batch(ro, N, K)
    updates = {"whole": (whole_policy, whole_model, whole_model.parameters(), whole_model, trajs["whole"]),
               "lora, reference = the checkpoint": (policy, model, trainable, base, trajs["lora"]),
               "lora, reference with the updates": (policy, model, trainable, model, trajs["lora"])}
    losses = {}
    for name, (p, m, params, source, traj) in updates.items():
        loss = GDPOLoss(transition_core(p), m, reward.lambdas, reference=make_reference(source, "fp32"))
        opt = torch.optim.AdamW(params, lr=1e-6)
        loss.compute_advantage(traj)
        chunked_update(loss, traj, opt, chunk_steps=chunk_steps)  # warm-up
        losses[name] = (loss, opt, traj)
    for _ in range(repeats):
        for name, (loss, opt, traj) in losses.items():
            t0 = time.perf_counter()
            chunked_update(loss, traj, opt, chunk_steps=chunk_steps)
            keep(name, time.perf_counter() - t0)
    return best
