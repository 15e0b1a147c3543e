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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep (pipeline/threads.py)

import copy
import math
import time

import hydra
import torch
from omegaconf import DictConfig
from tensordict import TensorDict
from torch.distributed.elastic.multiprocessing.errors import record
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm import tqdm

from gdpo_listener.agents.arflow import load_arflow
from gdpo_listener.agents.guards import DivergenceError, check_finite_stats, check_finite_weights
from gdpo_listener.agents.loss import AGGREGATION, LOSSES, chunked_update, collect_trajectories, listening_token_mask
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.evaluation.generation import before_after
from gdpo_listener.pipeline import factories, stages
from gdpo_listener.pipeline.checks import check_count, check_non_negative, check_positive
from gdpo_listener.pipeline.distributed import Dist, check_world_size, distributed, main_first, on_cpu, rank_seed, run_config
from gdpo_listener.pipeline.run_dir import claim_run_dir, truncate_logs
from gdpo_listener.pipeline.run_state import load_run_state, rng_state, save_run_state, seed_everything, set_rng_state
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


def make_env(cfg: DictConfig, bank, vae, normalizer, reward, generator, n_prompts: int | None = None,
             seed: int | None = None) -> ListenerSDEEnv:
    """The RL env of ``cfg.env``; ``n_prompts`` and ``seed`` (a rank's share and stream) default to ``cfg``'s."""
    return ListenerSDEEnv(bank, vae, normalizer, reward, n_prompts=cfg.env.n_prompts if n_prompts is None else n_prompts,
                          group_size=cfg.env.group_size, sde_steps=cfg.env.sde_steps, sigma=cfg.env.sigma, sde=cfg.env.sde,
                          device=bank.device, generator=generator, seed=cfg.seed if seed is None else seed)


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


def global_advantages(loss_module, traj, dist: Dist, n_prompts: int) -> TensorDict:
    """Write ``traj``'s advantages; return the global batch's ``reward``, ``group_id`` and ``advantage``.

    One process: ``traj`` itself. Several: every rank's rewards ``(b, n_groups)`` and group ids
    (offset by ``rank * n_prompts``, the local prompt count) are gathered in rank order, the
    advantages computed on the global batch exactly as one process would, and this rank keeps its rows.
    """
    if not dist.is_distributed:
        loss_module.compute_advantage(traj)
        return traj
    rewards = dist.all_gather_rows(traj["reward"])  # (B, n_groups) the global batch
    glob = TensorDict({"reward": rewards, "group_id": dist.all_gather_rows(traj["group_id"] + dist.rank * n_prompts)},
                      batch_size=rewards.shape[:1])
    loss_module.compute_advantage(glob)
    traj["advantage"] = glob["advantage"][dist.shard(rewards.shape[0])]  # (b,)
    return glob


def reward_stats(rewards: torch.Tensor, group_names, terms: dict) -> dict:
    """Per rewarded group: the reward's batch mean and std (``rewards (B, n_groups)``), then ``terms``
    (the batch mean of each of the groups' term penalties)."""
    out = {}
    for i, g in enumerate(group_names):
        out[f"reward/{g}/mean"] = rewards[:, i].mean()
        out[f"reward/{g}/std"] = rewards[:, i].std()
    out.update(terms)
    return {k: v.item() for k, v in out.items()}


def reward_term_means(env, traj, dist: Dist) -> dict:
    """Batch mean of every reward term's penalty over the global batch (every rank has the same batch size)."""
    terms = {k: v.mean() for k, v in env.episode_reward_terms(traj["history"], traj["window"]).items()}
    if not dist.is_distributed or not terms:
        return terms
    means = dist.all_reduce(torch.stack(list(terms.values())), "mean")  # same key order on every rank
    return dict(zip(terms, means))


def objective_counts(loss_module, traj) -> tuple[float, float]:
    """This rank's objective and generated token counts over the replay windows (chunked_update's weights)."""
    obj = loss_module.objective_mask(traj)  # (b, N)
    spans = loss_module.transition[0].schedule
    n_obj = sum(float(obj[:, new0:s0 + n].sum()) for s0, n, new0 in spans)
    n_all = sum(float(obj.shape[0] * (s0 + n - new0)) for s0, n, new0 in spans)
    return n_obj, n_all


def combine_rank_stats(per_rank: list[tuple[dict, float, float]], rules: dict = AGGREGATION) -> dict:
    """One process's ``chunked_update`` figures from every rank's ``(stats, n_objective, n_all)``.

    ``loss/<term>`` and ``policy/<figure>`` combine by :data:`~agents.loss.AGGREGATION`: a mean
    weighted by each rank's objective (or all) transitions (a rank without such transitions, whose
    figure is NaN, has weight 0), or the maximum ignoring NaN; other figures (``optim/grad_norm``,
    equal on every rank after the gradient all-reduce) are rank 0's.
    """
    out = dict(per_rank[0][0])
    for key in out:
        rule = rules.get(key.split("/", 1)[1]) if key.startswith(("loss/", "policy/")) else None
        if rule is None:
            continue
        values = [(s[key], {"objective": n_obj, "all": n_all}) for s, n_obj, n_all in per_rank]
        if rule == "max":
            finite = [v for v, _ in values if not math.isnan(v)]
            out[key] = max(finite) if finite else math.nan
        else:
            pairs = [(v, w[rule]) for v, w in values if w[rule] > 0]
            total = sum(w for _, w in pairs)
            out[key] = sum(v * w for v, w in pairs) / total if total > 0 else math.nan
    return out


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
    configure_threads(cfg.threads)
    with distributed(cfg.device, cfg.dist.timeout_min) as dist:
        train(cfg, dist)


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
    train_bank = make_train_bank(cfg, data_root, features, vae, normalizer, device, model.cfg.n_tokens)
    test_bank = factories.make_banks(data_root, features, vae, normalizer, device, splits=("test",))["test"]

    # -- RL components ----------------------------------------------------------------------------
    behaviour = copy.deepcopy(model).requires_grad_(False)
    env = make_env(cfg, train_bank, vae, normalizer, reward, generator, n_prompts=n_prompts, seed=seed)
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
        check_world_size(state.get("world_size"), dist, state_path)
        env.set_rng_state(on_cpu(state["env_rng"]))
        if dist.is_distributed:  # this rank's own streams
            set_rng_state(state["ranks"][dist.rank]["rng"], generator)
            env.set_rng_state(on_cpu(state["ranks"][dist.rank]["env_rng"]))
        start, logger_state = state["step"], state["logger"]
        if dist.is_main:
            truncate_logs(out_dir / "logs", start)  # steps logged after the saved state are logged again
            print(f"[gdpo] resumed at iteration {start}")
    logger = factories.make_logger(cfg.logger, out_dir, f"{cfg.algo.name}", state_dict=logger_state) if dist.is_main else None
    if dist.is_main:
        ranks = f" ({dist.world_size} processes x {env.batch_size[0]})" if dist.is_distributed else ""
        print(f"[gdpo] {cfg.algo.name} on reward={cfg.reward} ({', '.join(reward.group_names)}); "
              f"batch {env.batch_size[0] * dist.world_size} rollouts{ranks} x {env.n_tokens * env.sde_steps} transitions; "
              f"setup {time.perf_counter() - t_start:.1f} s")

    iterations = int(cfg.optim.iterations)
    sync = dist if dist.is_distributed else None
    bar = tqdm(range(start, iterations), desc=cfg.algo.name, initial=start, total=iterations, disable=not dist.is_main)
    for it in bar:
        t0 = time.perf_counter()
        traj = collect(env, policy, cfg.algo)
        t1 = time.perf_counter()
        batch = global_advantages(loss_module, traj, dist, n_prompts)  # (B,) reward, group_id, advantage of all ranks
        stats = reward_stats(batch["reward"], env.group_names, reward_term_means(env, traj, dist))
        stats.update({k: v.item() for k, v in advantage_log_stats(batch, reward.group_names, cfg.algo).items()})
        t2 = time.perf_counter()
        try:
            update = chunked_update(loss_module, traj, optimizer, cfg.algo.chunk_steps, cfg.algo.epochs, cfg.optim.grad_clip, sync=sync)
            if dist.is_distributed:  # the global batch's figures
                update = combine_rank_stats(dist.all_gather_object((update, *objective_counts(loss_module, traj))))
            stats.update(update)
        except DivergenceError as e:
            raise DivergenceError(f"{cfg.algo.name} iteration {it + 1}: {e} (settings: optim.lr={cfg.optim.lr}, "
                                  f"algo.clip_epsilon={cfg.algo.clip_epsilon}, env.sigma={cfg.env.sigma})") from None
        check_finite_stats(stats, [k for k in stats if k.startswith(("reward/", "loss/"))], where=f"{cfg.algo.name} iteration {it + 1}",
                           hint=f"optim.lr={cfg.optim.lr} or env.sigma={cfg.env.sigma} out of range")
        t3 = time.perf_counter()
        stats.update({"time/rollout": t1 - t0, "time/advantage": t2 - t1, "time/update": t3 - t2})
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
