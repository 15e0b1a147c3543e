"""Stage 2: GDPO / GRPO post-training of the supervised AR-Flow (paper section 3.3).

    python train/gdpo.py reward=expr+rot          # the main job: works as typed on a fresh clone
    python train/gdpo.py reward=all algo=grpo     # GRPO baseline
    python train/gdpo.py resume=true              # continue a killed run
    python train/gdpo.py env.episode_tokens=100   # 32 s episodes by sliding windows (k = env.prefix_tokens)

If the dataset, the VAE or the supervised AR-Flow are missing they are produced first by their
own entry points (cached: the next run skips them). Each iteration collects ``n_prompts * G``
SDE rollouts without gradient (one env step = one denoising transition), computes per-group
rewards and group-relative advantages, then replays the cached transitions window by window in
chunks of ``algo.chunk_steps`` denoising steps with gradient accumulation. The run ends with a
before/after table on held-out windows (deterministic ODE sampler, paired per window with a
bootstrap interval of the change).
"""
from __future__ import annotations

import copy
import time

import hydra
import torch
from omegaconf import DictConfig
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm import tqdm

import common
from gdpo_listener.agents.checkpoint import atomic_save_torch
from gdpo_listener.agents.loss import LOSSES, chunked_update, collect_trajectories
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv

# config sections that must match for resume=true to continue a run
RESUME_KEYS = ("reward", "rewards", "env", "algo", "model", "pretrained", "features", "data", "seed")


def make_env(cfg: DictConfig, bank, vae, normalizer, reward, generator) -> ListenerSDEEnv:
    return ListenerSDEEnv(bank, vae, normalizer, reward, n_prompts=cfg.env.n_prompts, group_size=cfg.env.group_size,
                          sde_steps=cfg.env.sde_steps, sigma=cfg.env.sigma, device=bank.device, generator=generator,
                          seed=cfg.seed)


def make_train_bank(cfg: DictConfig, data_root, features, vae, normalizer, device, window_tokens: int):
    """The bank episodes are drawn from: the model's windows, or long rows of ``env.episode_tokens`` tokens."""
    n = cfg.env.episode_tokens
    if n is not None and (int(n) != n or n < window_tokens):
        raise ValueError(f"env.episode_tokens={n} must be null or an integer >= the model's window of {window_tokens} tokens")
    frames = None if n is None else int(n) * vae.cfg.r
    try:
        return common.make_banks(data_root, features, vae, normalizer, device, splits=("train",), window=frames)["train"]
    except ValueError as e:
        raise ValueError(f"env.episode_tokens={n} needs {frames}-frame segments of the train conversations: {e}") from None


def make_loss(algo_cfg: DictConfig, policy, model, reward):
    if algo_cfg.name not in LOSSES:
        raise ValueError(f"unknown algo {algo_cfg.name!r}; valid: {sorted(LOSSES)}")
    return LOSSES[algo_cfg.name](transition_core(policy), model, reward.lambdas, clip_epsilon=algo_cfg.clip_epsilon,
                                 beta=algo_cfg.beta, eps=algo_cfg.eps, eps0=algo_cfg.eps0, whiten=algo_cfg.whiten)


def listening_token_mask(bank, window, n_tokens: int):
    """(B, N): tokens whose frames overlap the actor's listening frames."""
    lis = bank["listening"][window]  # (B, W)
    return lis.reshape(lis.shape[0], n_tokens, -1).any(-1)


@torch.no_grad()
def collect(env, policy, algo_cfg) -> TensorDict:
    with set_exploration_type(ExplorationType.RANDOM):
        traj = collect_trajectories(env, policy)
    if algo_cfg.listening_tokens_only:
        traj["token_mask"] = listening_token_mask(env.bank, traj["window"], env.n_tokens)
    return traj


def reward_stats(traj, group_names) -> dict:
    r = traj["reward"]
    out = {}
    for i, g in enumerate(group_names):
        out[f"reward/{g}/mean"] = r[:, i].mean().item()
        out[f"reward/{g}/std"] = r[:, i].std().item()
    return out


def save_state(path, model, behaviour, optimizer, iteration, logger, cfg, env, generator) -> None:
    atomic_save_torch(path, {"model": model.state_dict(), "behaviour": behaviour.state_dict(), "optim": optimizer.state_dict(),
                "iteration": iteration, "rng": common.rng_state(generator), "env_rng": env.rng_state(),
                "logger": logger.state_dict() if logger is not None and hasattr(logger, "state_dict") else None,
                "config": common.resume_config(cfg, RESUME_KEYS)})


@hydra.main(version_base="1.3", config_path="conf", config_name="gdpo")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    device = common.make_device(cfg.device)
    generator = common.seed_everything(cfg.seed)
    out_dir = common.abspath(cfg.out_dir)
    reward = common.make_reward(cfg).to(device)  # validates the reward spec before any long work
    if cfg.env.group_size < 2:
        raise ValueError(f"env.group_size (G) must be >= 2, got {cfg.env.group_size}")

    # -- prerequisites: data, frozen VAE, supervised AR-Flow (produced on first use) ------------
    t_start = time.perf_counter()
    data_root = common.make_dataset(cfg.data)
    vae_path = common.make_vae_checkpoint(cfg, data_root)
    sft_path = common.make_sft_checkpoint(cfg, data_root, vae_path)
    vae, normalizer, _ = common.load_frozen_vae(vae_path, device)
    features, text_enc, audio_enc = common.make_features(cfg.features, data_root, device)
    model, _ = common.load_arflow(sft_path, device, expect={"d_latent": vae.cfg.d_latent, "d_text": text_enc.dim, "d_audio": audio_enc.dim},
                                  preset=cfg.model.preset)
    supervised = copy.deepcopy(model)
    train_bank = make_train_bank(cfg, data_root, features, vae, normalizer, device, model.cfg.n_tokens)
    test_bank = common.make_banks(data_root, features, vae, normalizer, device, splits=("test",))["test"]

    # -- RL components ----------------------------------------------------------------------------
    behaviour = copy.deepcopy(model).requires_grad_(False)
    env = make_env(cfg, train_bank, vae, normalizer, reward, generator)
    policy = make_policy(behaviour, train_bank, sigma=cfg.env.sigma, sde_steps=cfg.env.sde_steps, generator=generator,
                         prefix_tokens=cfg.env.prefix_tokens)
    loss_module = make_loss(cfg.algo, policy, model, reward)
    model.eval()  # no dropout: replayed log-probs must match the behaviour policy's (gradients still flow)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    state_path = out_dir / "last" / "state.pt"
    start, logger_state = 0, None
    if cfg.resume:
        state = common.load_resume_state(state_path, cfg, RESUME_KEYS, device)
        model.load_state_dict(state["model"])
        behaviour.load_state_dict(state["behaviour"])
        optimizer.load_state_dict(state["optim"])
        common.set_rng_state(state["rng"], generator)  # rollout noise and window draws continue the killed run's
        env.set_rng_state(state["env_rng"])
        start, logger_state = state["iteration"], state["logger"]
        print(f"[gdpo] resumed at iteration {start}")
    logger = common.make_logger(cfg.logger, out_dir, f"{cfg.algo.name}", state_dict=logger_state)
    print(f"[gdpo] {cfg.algo.name} on reward={cfg.reward} ({', '.join(reward.group_names)}); "
          f"batch {env.batch_size[0]} rollouts x {env.n_tokens * env.sde_steps} transitions; setup {time.perf_counter() - t_start:.1f} s")

    iterations = int(cfg.optim.iterations)
    bar = tqdm(range(start, iterations), desc=cfg.algo.name, initial=start, total=iterations)
    for it in bar:
        t0 = time.perf_counter()
        traj = collect(env, policy, cfg.algo)
        t1 = time.perf_counter()
        loss_module.compute_advantage(traj)
        stats = reward_stats(traj, reward.group_names)
        stats.update({f"adv/{k}": v.item() for k, v in common.advantage_stats(traj, reward).items()})
        t2 = time.perf_counter()
        stats.update(chunked_update(loss_module, traj, optimizer, cfg.algo.chunk_steps, cfg.algo.epochs, cfg.optim.grad_clip))
        t3 = time.perf_counter()
        stats.update({"time/rollout": t1 - t0, "time/advantage": t2 - t1, "time/update": t3 - t2})
        if (it + 1) % int(cfg.algo.sync_every) == 0:
            behaviour.load_state_dict(model.state_dict())
        if (it + 1) % int(cfg.log_every) == 0:
            common.log_scalars(logger, stats, it + 1)
        bar.set_postfix({k.split("/")[1]: f"{v:.3f}" for k, v in stats.items() if k.endswith("/mean") and k.startswith("reward/")})
        if (it + 1) % int(cfg.ckpt_every) == 0 or it + 1 == iterations:
            save_state(state_path, model, behaviour, optimizer, it + 1, logger, cfg, env, generator)
    model.eval()
    common.save_arflow(out_dir, model, cfg, extra={"stage": "rl", "algo": cfg.algo.name, "reward": cfg.reward,
                                                   "vae_dir": str(vae_path), "sft": str(sft_path)})
    table = common.before_after(supervised, model, vae, normalizer, test_bank, reward, cfg)
    common.log_scalars(logger, {f"eval/{k}": v for k, v in table.items()}, iterations)
    print(f"[gdpo] total time {time.perf_counter() - t_start:.1f} s; checkpoint: {out_dir}")


if __name__ == "__main__":
    main()
