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

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep (pipeline/threads.py)

import copy
import time

import hydra
import torch
from omegaconf import DictConfig
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm import tqdm

from gdpo_listener.agents.arflow import load_arflow
from gdpo_listener.agents.guards import DivergenceError, check_finite_stats, check_finite_weights
from gdpo_listener.agents.loss import LOSSES, chunked_update, collect_trajectories, listening_token_mask
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.evaluation.generation import before_after
from gdpo_listener.pipeline import factories, stages
from gdpo_listener.pipeline.checks import check_count, check_non_negative, check_positive
from gdpo_listener.pipeline.run_dir import claim_run_dir, truncate_logs
from gdpo_listener.pipeline.run_state import load_run_state, save_run_state, seed_everything
from gdpo_listener.pipeline.threads import configure_threads

# config sections that must match for resume=true to continue a run
RESUME_KEYS = ("reward", "rewards", "env", "algo", "model", "pretrained", "features", "data", "seed")


def check_settings(cfg: DictConfig) -> None:
    """Every numeric setting in range before any long work (errors name the setting)."""
    check_positive(cfg, ["optim.lr", "env.sigma", "algo.clip_epsilon", "algo.eps", "algo.eps0"])
    check_non_negative(cfg, ["algo.beta", "optim.weight_decay", "optim.grad_clip"])
    check_count(cfg, ["optim.iterations", "env.n_prompts", "env.sde_steps", "algo.chunk_steps", "algo.sync_every",
                      "algo.epochs", "ckpt_every", "log_every", "eval.n_windows", "eval.steps"])
    check_count(cfg, ["env.group_size"], minimum=2)
    check_count(cfg, ["env.prefix_tokens"], minimum=0)


def make_env(cfg: DictConfig, bank, vae, normalizer, reward, generator) -> ListenerSDEEnv:
    return ListenerSDEEnv(bank, vae, normalizer, reward, n_prompts=cfg.env.n_prompts, group_size=cfg.env.group_size,
                          sde_steps=cfg.env.sde_steps, sigma=cfg.env.sigma, sde=cfg.env.sde, device=bank.device, generator=generator,
                          seed=cfg.seed)


def make_train_bank(cfg: DictConfig, data_root, features, vae, normalizer, device, window_tokens: int):
    """The bank episodes are drawn from: the model's windows, or long rows of ``env.episode_tokens`` tokens."""
    n = cfg.env.episode_tokens
    if n is not None and (int(n) != n or n < window_tokens):
        raise ValueError(f"env.episode_tokens={n} must be null or an integer >= the model's window of {window_tokens} tokens")
    frames = None if n is None else int(n) * vae.cfg.r
    try:
        return factories.make_banks(data_root, features, vae, normalizer, device, splits=("train",), window=frames)["train"]
    except ValueError as e:
        raise ValueError(f"env.episode_tokens={n} needs {frames}-frame segments of the train conversations: {e}") from None


def make_loss(algo_cfg: DictConfig, policy, model, reward):
    if algo_cfg.name not in LOSSES:
        raise ValueError(f"unknown algo {algo_cfg.name!r}; valid: {sorted(LOSSES)}")
    return LOSSES[algo_cfg.name](transition_core(policy), model, reward.lambdas, clip_epsilon=algo_cfg.clip_epsilon,
                                 beta=algo_cfg.beta, eps=algo_cfg.eps, eps0=algo_cfg.eps0, whiten=algo_cfg.whiten,
                                 eps_mode=algo_cfg.eps_mode, objective_tokens=algo_cfg.objective_tokens)


@torch.no_grad()
def collect(env, policy, algo_cfg) -> TensorDict:
    with set_exploration_type(ExplorationType.RANDOM):
        traj = collect_trajectories(env, policy)
    traj["token_mask"] = listening_token_mask(env.bank["listening"][traj["window"]], env.n_tokens)  # the objective's tokens (listening)
    return traj


def advantage_log_stats(traj, group_names, algo_cfg) -> dict:
    """Advantage diagnostics (tensors), named ``adv/<figure>`` or ``adv/<figure>/<group>`` for per-group ones."""
    from gdpo_listener.agents.advantages import advantage_diagnostics, reward_group_stats

    figures = {**reward_group_stats(traj["reward"], traj["group_id"], eps=algo_cfg.eps, eps_mode=algo_cfg.eps_mode),
               **advantage_diagnostics(traj["advantage"], traj["reward"], traj["group_id"])}
    for k in ("reward_mean", "reward_std"):  # logged once, as reward/<group>/mean and /std
        figures.pop(k)
    out = {}
    for k, v in figures.items():
        if v.numel() == len(group_names) and v.dim() == 1:
            out.update({f"adv/{k}/{g}": x for g, x in zip(group_names, v)})
        else:
            out[f"adv/{k}"] = v.reshape(())
    return out


def reward_stats(traj, env) -> dict:
    """Per rewarded group: the reward's batch mean and std, and the batch mean of each of its terms' penalties."""
    r = traj["reward"]  # (B, n_groups)
    out = {}
    for i, g in enumerate(env.group_names):
        out[f"reward/{g}/mean"] = r[:, i].mean()
        out[f"reward/{g}/std"] = r[:, i].std()
    out.update({k: v.mean() for k, v in env.episode_reward_terms(traj["history"], traj["window"]).items()})
    return {k: v.item() for k, v in out.items()}


@hydra.main(version_base="1.3", config_path="conf", config_name="gdpo")
def main(cfg: DictConfig) -> None:
    configure_threads(cfg.threads)
    device = factories.make_device(cfg.device)
    generator = seed_everything(cfg.seed)
    check_settings(cfg)
    out_dir, _lock = claim_run_dir(factories.abspath(cfg.out_dir), cfg, stage="gdpo", resume=cfg.resume)
    reward = factories.make_reward(cfg).to(device)  # validates the reward spec before any long work

    # -- prerequisites: data, frozen VAE, supervised AR-Flow (produced on first use) ------------
    t_start = time.perf_counter()
    data_root = stages.ensure_dataset(cfg.data)
    vae_path = stages.ensure_vae(cfg, data_root)
    sft_path = stages.ensure_sft(cfg, data_root, vae_path)
    vae, normalizer, _ = factories.load_frozen_vae(vae_path, device)
    features, text_enc, audio_enc = factories.make_features(cfg.features, data_root, device)
    model, _ = load_arflow(sft_path, device, expect={"d_latent": vae.cfg.d_latent, "d_text": text_enc.dim, "d_audio": audio_enc.dim},
                                  preset=cfg.model.preset)
    supervised = copy.deepcopy(model)
    train_bank = make_train_bank(cfg, data_root, features, vae, normalizer, device, model.cfg.n_tokens)
    test_bank = factories.make_banks(data_root, features, vae, normalizer, device, splits=("test",))["test"]

    # -- RL components ----------------------------------------------------------------------------
    behaviour = copy.deepcopy(model).requires_grad_(False)
    env = make_env(cfg, train_bank, vae, normalizer, reward, generator)
    policy = make_policy(behaviour, env, generator=generator, prefix_tokens=cfg.env.prefix_tokens)  # sigma, steps, sde: the env's
    loss_module = make_loss(cfg.algo, policy, model, reward)
    model.eval()  # no dropout: replayed log-probs must match the behaviour policy's (gradients still flow)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    state_path = out_dir / "last" / "state.pt"
    run_states = {"model": model, "behaviour": behaviour, "optim": optimizer}
    start, logger_state = 0, None
    if cfg.resume:
        # rollout noise and window draws continue the killed run's
        state = load_run_state(state_path, cfg, RESUME_KEYS, device, generator, states=run_states)
        env.set_rng_state(state["env_rng"])
        start, logger_state = state["step"], state["logger"]
        truncate_logs(out_dir / "logs", start)  # steps logged after the saved state are logged again
        print(f"[gdpo] resumed at iteration {start}")
    logger = factories.make_logger(cfg.logger, out_dir, f"{cfg.algo.name}", state_dict=logger_state)
    print(f"[gdpo] {cfg.algo.name} on reward={cfg.reward} ({', '.join(reward.group_names)}); "
          f"batch {env.batch_size[0]} rollouts x {env.n_tokens * env.sde_steps} transitions; setup {time.perf_counter() - t_start:.1f} s")

    iterations = int(cfg.optim.iterations)
    bar = tqdm(range(start, iterations), desc=cfg.algo.name, initial=start, total=iterations)
    for it in bar:
        t0 = time.perf_counter()
        traj = collect(env, policy, cfg.algo)
        t1 = time.perf_counter()
        loss_module.compute_advantage(traj)
        stats = reward_stats(traj, env)
        stats.update({k: v.item() for k, v in advantage_log_stats(traj, reward.group_names, cfg.algo).items()})
        t2 = time.perf_counter()
        try:
            stats.update(chunked_update(loss_module, traj, optimizer, cfg.algo.chunk_steps, cfg.algo.epochs, cfg.optim.grad_clip))
        except DivergenceError as e:
            raise DivergenceError(f"{cfg.algo.name} iteration {it + 1}: {e} (settings: optim.lr={cfg.optim.lr}, "
                                  f"algo.clip_epsilon={cfg.algo.clip_epsilon}, env.sigma={cfg.env.sigma})") from None
        check_finite_stats(stats, [k for k in stats if k.startswith(("reward/", "loss/"))], where=f"{cfg.algo.name} iteration {it + 1}",
                           hint=f"optim.lr={cfg.optim.lr} or env.sigma={cfg.env.sigma} out of range")
        t3 = time.perf_counter()
        stats.update({"time/rollout": t1 - t0, "time/advantage": t2 - t1, "time/update": t3 - t2})
        if (it + 1) % int(cfg.algo.sync_every) == 0:
            behaviour.load_state_dict(model.state_dict())
        if (it + 1) % int(cfg.log_every) == 0:
            factories.log_scalars(logger, stats, it + 1)
        bar.set_postfix({k.split("/")[1]: f"{v:.3f}" for k, v in stats.items() if k.endswith("/mean") and k.startswith("reward/")})
        if (it + 1) % int(cfg.ckpt_every) == 0 or it + 1 == iterations:
            check_finite_weights(model, where=f"{cfg.algo.name} iteration {it + 1}", hint=f"optim.lr={cfg.optim.lr} too large")
            save_run_state(state_path, cfg, RESUME_KEYS, it + 1, generator, logger, run_states, env_rng=env.rng_state())
    model.eval()
    factories.save_run_arflow(out_dir, model, cfg, extra={"stage": "rl", "algo": cfg.algo.name, "reward": cfg.reward,
                                                   "vae_dir": str(vae_path), "sft": str(sft_path)})
    table = before_after(supervised, model, vae, normalizer, test_bank, reward, n_windows=cfg.eval.n_windows,
                         steps=cfg.eval.steps, seed=cfg.seed, label=cfg.algo.name)
    factories.log_scalars(logger, {f"eval/{k}": v for k, v in table.items()}, iterations)
    print(f"[gdpo] total time {time.perf_counter() - t_start:.1f} s; checkpoint: {out_dir}")


if __name__ == "__main__":
    main()
