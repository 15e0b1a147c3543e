"""Stage 2: GDPO / GRPO post-training of the supervised AR-Flow (paper section 3.3).

    python train/gdpo.py reward=expr+rot          # the main job: works as typed on a fresh clone
    python train/gdpo.py reward=all algo=grpo     # GRPO baseline
    python train/gdpo.py resume=true              # continue a killed run
    python train/gdpo.py env.episode_tokens=100   # 32 s episodes by sliding windows (k = env.prefix_tokens)
    torchrun --nproc_per_node=2 train/gdpo.py     # 2 processes, each env.n_prompts / 2 prompts

If the dataset, the VAE or the supervised AR-Flow are missing they are produced first by their
own entry points (cached: the next run skips them). Each iteration collects ``n_prompts * G``
SDE rollouts without gradient (one env step = one denoising transition), computes per-group
rewards and group-relative advantages, then replays the cached transitions window by window in
chunks of ``algo.chunk_steps`` denoising steps with gradient accumulation. The run ends with a
before/after table on held-out windows (deterministic ODE sampler, paired per window with a
bootstrap interval of the change).

Under torchrun (pipeline/distributed.py) ``env.n_prompts`` stays the GLOBAL batch: every rank
collects ``n_prompts / world_size`` prompts with all G rollouts of each (its own window draws and
noise, seeded ``rank_seed(seed, rank)``). The small reward matrices are gathered so advantages
are those of the global batch (eps_mode=relative and whiten read batch-level statistics; the
groups themselves never cross ranks); the replay weights every pass by its share of the GLOBAL
transition counts and sums the gradients over ranks once per optimiser step, so the update equals
the single-process update on the union of the ranks' trajectories. Each rank keeps its own
reference copy; the behaviour policy is re-synced from rank 0's weights on every rank. Rank 0
logs the global figures and writes the checkpoints, which hold every rank's RNG states.
"""
from __future__ import annotations

import os

from gdpo_listener.pipeline.threads import omp_wait_defaults  # imports no torch

os.environ.update(omp_wait_defaults())  # before torch loads: OpenMP threads spin briefly, then sleep (pipeline/threads.py)

import copy
import time

import hydra
import torch
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from gdpo_listener.agents.arflow import load_arflow
from gdpo_listener.agents.flow import sde_window_label
from gdpo_listener.agents.guards import DivergenceError, check_finite_stats, check_finite_weights
from gdpo_listener.agents.loss import chunked_update
from gdpo_listener.agents.policy import make_policy
from gdpo_listener.evaluation.generation import before_after
from gdpo_listener.pipeline import factories, stages
from gdpo_listener.pipeline.distributed import Dist, distributed, main_first, on_cpu, rank_seed, run_config
from gdpo_listener.pipeline.rl import (
    advantage_log_stats,
    attach_hold_reference,
    check_settings,
    collect,
    combine_rank_stats,
    global_advantages,
    make_anchor,
    make_env,
    make_group_kl,
    make_loss,
    make_train_bank,
    make_trainable,
    objective_counts,
    reward_stats,
    reward_term_means,
)
from gdpo_listener.pipeline.run_dir import claim_run_dir
from gdpo_listener.pipeline.run_state import resume_training, rng_state, save_run_state, seed_everything
from gdpo_listener.pipeline.threads import configure_threads

# config sections that must match for resume=true to continue a run
RESUME_KEYS = ("reward", "rewards", "env", "algo", "model", "pretrained", "features", "data", "seed")
# settings added since runs were first saved, with their no-op value: states saved without them still resume
ADDED_SETTINGS = {"algo": {"sft_coef": 0.0, "sft_batch_size": 16, "std_scope": "group", "std_momentum": 0.98,
                           "kl_steps": "sde", "group_kl": None, "listen_adapter": 0, "listen_lora": 0, "lora_scope": "listening"},
                  "env": {"cond_drop": 0.0, "drop_keys": ["text", "audio", "motion"], "sde_window": None}}


def sde_window_note(env, kl_steps: str = "sde") -> str:
    """``", SDE on steps a-(b-1) of K (n trained)"`` for a mixed SDE/ODE env (env.sde_window), else empty;
    ``algo.kl_steps=all`` adds the transitions the KL covers."""
    a, b = env.sde_window
    if (a, b) == (0, env.sde_steps):
        return ""
    kl = f", KL on all {env.n_tokens * env.sde_steps}" if kl_steps == "all" else ""
    return f", SDE on {sde_window_label((a, b))} of {env.sde_steps} ({env.n_tokens * (b - a)} trained{kl})"


def save_state(path, cfg, step, generator, logger, run_states, env, dist: Dist) -> None:
    """Training state, written once by rank 0; under torchrun it also holds every rank's RNG states."""
    extra = {"env_rng": env.rng_state()}
    if dist.is_distributed:  # a collective: every rank calls it at the same iteration
        extra.update(world_size=dist.world_size,
                     ranks=dist.all_gather_object({"rng": rng_state(generator), "env_rng": env.rng_state()}))
    if dist.is_main:
        save_run_state(path, cfg, RESUME_KEYS, step, generator, logger, run_states, **extra)


@hydra.main(version_base="1.3", config_path="conf", config_name="gdpo")
def main(cfg: DictConfig) -> None:
    configure_threads(cfg.threads, announce=True)
    with distributed(cfg.device, cfg.dist.timeout_min) as dist:
        train(cfg, dist)


def resume_run(cfg: DictConfig, state_path, log_dir, run_states: dict, env, generator: torch.Generator,
               dist: Dist) -> tuple[int, dict | None]:
    """Load the killed run's state into ``run_states``, the env and the RNGs: ``(iteration, logger state)``.
    Rollout noise and window draws continue the killed run's (each rank its own streams)."""
    state = resume_training("gdpo", state_path, log_dir, cfg, RESUME_KEYS, run_states, generator, dist.device, dist,
                            added=ADDED_SETTINGS, where="at iteration")
    env.set_rng_state(on_cpu(state["ranks"][dist.rank]["env_rng"] if dist.is_distributed else state["env_rng"]))
    return int(state["step"]), state["logger"]


def iteration(cfg: DictConfig, it: int, env, policy, loss_module, optimizer, anchor, dist: Dist, n_prompts: int) -> dict[str, float]:
    """One GDPO / GRPO iteration (0-based ``it``): collect, advantages over every rank's rollouts, update.
    Returns the logged figures (rewards, advantages, losses, phase times)."""
    t0 = time.perf_counter()
    traj = collect(env, policy, loss_module.keeps_ode_steps)
    t1 = time.perf_counter()
    batch = global_advantages(loss_module, traj, dist, n_prompts)  # (B,) reward, group_id, advantage of all ranks
    stats = reward_stats(batch["reward"], env.group_names, reward_term_means(env, traj, dist))
    stats.update({k: v.item() for k, v in advantage_log_stats(batch, env.group_names, cfg.algo).items()})
    if loss_module.reward_scale is not None:  # algo.std_scope=running: the spread the advantages were divided by
        names = env.group_names if loss_module.decoupled else ["sum"]
        stats.update({f"adv/running_std/{g}": v.item() for g, v in zip(names, loss_module.reward_scale.value().sqrt())})
    t2 = time.perf_counter()
    try:
        update = chunked_update(loss_module, traj, optimizer, cfg.algo.chunk_steps, cfg.algo.epochs, cfg.optim.grad_clip,
                                sync=dist if dist.is_distributed else None, anchor=anchor)
        if dist.is_distributed:  # the global batch's figures
            update = combine_rank_stats(dist.all_gather_object((update, objective_counts(loss_module, traj))))
        stats.update(update)
    except DivergenceError as e:
        raise DivergenceError(f"{cfg.algo.name} iteration {it + 1}: {e} (settings: optim.lr={cfg.optim.lr}, "
                              f"algo.clip_epsilon={cfg.algo.clip_epsilon}, env.sigma={cfg.env.sigma})") from None
    check_finite_stats(stats, [k for k in stats if k.startswith(("reward/", "loss/"))], where=f"{cfg.algo.name} iteration {it + 1}",
                       hint=f"optim.lr={cfg.optim.lr} or env.sigma={cfg.env.sigma} out of range")
    stats.update({"time/rollout": t1 - t0, "time/advantage": t2 - t1, "time/update": time.perf_counter() - t2})
    return stats


@record  # under torchrun the job's failure summary names this rank's error
def train(cfg: DictConfig, dist: Dist) -> None:
    device = dist.device
    seed = rank_seed(cfg.seed, dist.rank)  # this rank's prompts and noise
    generator = seed_everything(seed)
    check_settings(cfg)
    n_prompts = int(cfg.env.n_prompts) // dist.world_size
    dist.shard(int(cfg.env.n_prompts), "env.n_prompts")  # refuses a count that does not split evenly
    out_dir = None
    if dist.is_main:
        out_dir, _lock = claim_run_dir(factories.abspath(cfg.out_dir), run_config(cfg, dist), stage="gdpo", resume=cfg.resume)
    out_dir = dist.broadcast_object(out_dir)
    reward = factories.make_reward(cfg).to(device)  # validates the reward spec before any long work

    # -- prerequisites: data, frozen VAE, supervised AR-Flow (produced on first use, by rank 0) ---
    t_start = time.perf_counter()
    data_root = main_first(dist, stages.ensure_dataset, cfg.data)
    vae_path = main_first(dist, stages.ensure_vae, cfg, data_root)
    sft_path = main_first(dist, stages.ensure_sft, cfg, data_root, vae_path)
    vae, normalizer, _ = factories.load_frozen_vae(vae_path, device)
    features, text_enc, audio_enc = factories.make_features(cfg.features, data_root, device, dist=dist)
    model, _ = load_arflow(sft_path, device, expect={"d_latent": vae.cfg.d_latent, "d_text": text_enc.dim, "d_audio": audio_enc.dim},
                                  preset=cfg.model.preset)
    supervised = copy.deepcopy(model)
    trainable = make_trainable(model, cfg.algo.get("listen_adapter", 0), cfg.algo.get("listen_lora", 0),
                               cfg.algo.get("lora_scope", "listening"))  # all, or listening parts
    train_bank = make_train_bank(cfg, data_root, features, vae, normalizer, device, model.cfg.n_tokens)
    train_bank = attach_hold_reference(cfg, train_bank, supervised, vae, normalizer, reward)  # <group>@hold columns only
    test_bank = factories.make_banks(data_root, features, vae, normalizer, device, splits=("test",))["test"]

    # -- RL components ----------------------------------------------------------------------------
    behaviour = copy.deepcopy(model).requires_grad_(False)
    env = make_env(cfg, train_bank, vae, normalizer, reward, generator, n_prompts=n_prompts, seed=seed)
    policy = make_policy(behaviour, env, generator=generator, prefix_tokens=cfg.env.prefix_tokens)  # sigma, steps, sde: the env's
    loss_module = make_loss(cfg.algo, policy, model, reward, reference_source=supervised,  # KL reference: the checkpoint
                            group_kl=make_group_kl(cfg.algo, vae, train_bank))  # {}: the paper's KL only
    anchor = make_anchor(cfg, train_bank, data_root, features, vae, normalizer, device, generator, dist)  # None: the paper
    model.eval()  # no dropout: replayed log-probs must match the behaviour policy's (gradients still flow)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    state_path = out_dir / "last" / "state.pt"
    run_states = {"model": model, "behaviour": behaviour, "optim": optimizer}
    if loss_module.reward_scale is not None:  # algo.std_scope=running: the running reward spread resumes too
        run_states["reward_scale"] = loss_module.reward_scale
    start, logger_state = resume_run(cfg, state_path, out_dir / "logs", run_states, env, generator, dist) if cfg.resume else (0, None)
    logger = factories.make_logger(cfg.logger, out_dir, f"{cfg.algo.name}", state_dict=logger_state) if dist.is_main else None
    if dist.is_main:
        ranks = f" ({dist.world_size} processes x {env.batch_size[0]})" if dist.is_distributed else ""
        print(f"[gdpo] {cfg.algo.name} on reward={cfg.reward} ({', '.join(reward.group_names)}); "
              f"batch {env.batch_size[0] * dist.world_size} rollouts{ranks} x {env.n_tokens * env.sde_steps} transitions"
              f"{sde_window_note(env, cfg.algo.get('kl_steps', 'sde'))}; "
              f"setup {time.perf_counter() - t_start:.1f} s")

    iterations = int(cfg.optim.iterations)
    bar = tqdm(range(start, iterations), desc=cfg.algo.name, initial=start, total=iterations, disable=not dist.is_main)
    for it in bar:
        stats = iteration(cfg, it, env, policy, loss_module, optimizer, anchor, dist, n_prompts)
        if (it + 1) % int(cfg.algo.sync_every) == 0:
            dist.broadcast_module_(model)  # bitwise the same weights on every rank before the behaviour copy
            behaviour.load_state_dict(model.state_dict())
        if (it + 1) % int(cfg.log_every) == 0:
            factories.log_scalars(logger, stats, it + 1)
        bar.set_postfix({k.split("/")[1]: f"{v:.3f}" for k, v in stats.items() if k.endswith("/mean") and k.startswith("reward/")})
        if (it + 1) % int(cfg.ckpt_every) == 0 or it + 1 == iterations:
            check_finite_weights(model, where=f"{cfg.algo.name} iteration {it + 1}", hint=f"optim.lr={cfg.optim.lr} too large")
            save_state(state_path, cfg, it + 1, generator, logger, run_states, env, dist)
    model.eval()
    if not dist.is_main:
        return
    factories.save_run_arflow(out_dir, model, cfg, extra={"stage": "rl", "algo": cfg.algo.name, "reward": cfg.reward,
                                                   "vae_dir": str(vae_path), "sft": str(sft_path)})
    table = before_after(supervised, model, vae, normalizer, test_bank, reward, n_windows=cfg.eval.n_windows,
                         steps=cfg.eval.steps, seed=cfg.seed, label=cfg.algo.name)
    factories.log_scalars(logger, {f"eval/{k}": v for k, v in table.items()}, iterations)
    print(f"[gdpo] total time {time.perf_counter() - t_start:.1f} s; checkpoint: {out_dir}")


if __name__ == "__main__":
    main()
