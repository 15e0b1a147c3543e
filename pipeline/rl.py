"""The RL stage's components and logged figures (``train/gdpo.py`` is the recipe that uses them).

- :func:`check_settings`: every numeric setting of the stage in range before any long work;
- :func:`make_env`, :func:`make_train_bank`, :func:`make_loss`, :func:`collect`: the env, the window
  bank episodes are drawn from, the GDPO / GRPO loss module, one batch of trajectories;
  :func:`make_group_kl`: the decoded-motion metrics of ``algo.group_kl``;
- :func:`attach_hold_reference`: the supervised model's rollouts ``<group>@hold`` reward columns score against;
- :func:`global_advantages`, :func:`objective_counts`, :func:`combine_rank_stats`: the global batch's
  advantages and figures under torchrun (one process: the batch itself);
- :func:`reward_stats`, :func:`reward_term_means`, :func:`advantage_log_stats`: what is logged each
  iteration (``reward/<group>/mean|std|<term>``, ``adv/<figure>[/<group>]``).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from omegaconf import DictConfig
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

from ..agents.advantages import STD_SCOPES
from ..agents.arflow import DROP_KEYS, LORA_SCOPES
from ..agents.compress import check_precision, compress
from ..agents.flow import sde_window_steps
from ..agents.loss import AGGREGATION, COUNT_KINDS, KL_STEPS, LOSSES, collect_trajectories, listening_token_mask, transition_counts
from ..agents.policy import transition_core
from ..envs.flame import GROUP_NAMES, group_slice
from ..envs.sde_env import ListenerSDEEnv
from . import factories
from .checks import check_choice, check_count, check_fraction, check_non_negative, check_positive
from .distributed import Dist

HOLD_REFERENCES = ("rollout", "ode")  # env.hold_reference: the sampler that draws the hold columns' reference


def check_settings(cfg: DictConfig) -> None:
    """Every numeric setting in range before any long work (errors name the setting)."""
    check_positive(cfg, ["optim.lr", "env.sigma", "algo.clip_epsilon", "algo.eps", "algo.eps0"])
    check_non_negative(cfg, ["algo.beta", "optim.weight_decay", "optim.grad_clip"])
    if cfg.algo.get("beta_speaking") is not None:
        check_non_negative(cfg, ["algo.beta_speaking"])
    if cfg.algo.get("speaking_objective_weight") is not None:
        check_non_negative(cfg, ["algo.speaking_objective_weight"])
    try:
        check_precision(cfg.algo.get("ref_precision", "fp32"))
    except ValueError as e:
        raise ValueError(f"algo.ref_precision: {e}") from None
    check_count(cfg, ["optim.iterations", "env.n_prompts", "env.sde_steps", "algo.chunk_steps", "algo.sync_every",
                      "algo.epochs", "ckpt_every", "log_every", "eval.n_windows", "eval.steps"])
    check_count(cfg, ["env.group_size"], minimum=2)
    try:
        sde_window_steps(cfg.env.get("sde_window"), cfg.env.sde_steps)
    except ValueError as e:
        raise ValueError(f"env.sde_window: {e}") from None
    check_choice(cfg, "algo.kl_steps", KL_STEPS, "sde")
    check_choice(cfg, "env.hold_reference", HOLD_REFERENCES, "rollout")
    check_fraction(cfg, "env.cond_drop", 0.0)
    keys = list(cfg.env.get("drop_keys", DROP_KEYS))
    if not keys or set(keys) - set(DROP_KEYS):
        raise ValueError(f"env.drop_keys={keys} must be a non-empty subset of {list(DROP_KEYS)}")
    scope = check_choice(cfg, "algo.std_scope", STD_SCOPES, "group")
    if scope != "group" and cfg.algo.objective_tokens == "matched":
        raise ValueError(f"algo.std_scope={scope} is not supported with algo.objective_tokens=matched; use std_scope=group")
    check_fraction(cfg, "algo.std_momentum", 0.98)
    if cfg.algo.get("sft_coef") is not None:
        check_non_negative(cfg, ["algo.sft_coef"])
        check_count(cfg, ["algo.sft_batch_size"])
    check_count(cfg, ["env.prefix_tokens"], minimum=0)
    for key, what in (("listen_adapter", "width"), ("listen_lora", "rank")):
        n = cfg.algo.get(key, 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"algo.{key}={n!r} must be an integer {what} >= 0 (0 = none)")
    group_kl = cfg.algo.get("group_kl") or {}
    if not isinstance(group_kl, Mapping):
        raise ValueError(f"algo.group_kl={group_kl!r} must map FLAME groups to weights, e.g. {{jaw: 0.2}}")
    for g in group_kl:
        if g not in GROUP_NAMES:
            raise ValueError(f"algo.group_kl: unknown FLAME group {g!r}; valid groups: {', '.join(GROUP_NAMES)}")
    check_non_negative(cfg, [f"algo.group_kl.{g}" for g in group_kl])
    scope = check_choice(cfg, "algo.lora_scope", LORA_SCOPES, "listening")
    if scope != "listening" and not cfg.algo.get("listen_lora", 0):
        raise ValueError(f"algo.lora_scope={scope} needs low-rank updates: set algo.listen_lora to a rank > 0")


def make_trainable(model, width: int, rank: int = 0, scope: str = "listening") -> list:
    """The parameters RL trains. ``width`` and ``rank`` 0: all of them (the paper). Otherwise only the
    listening parts, added zero-initialised unless the checkpoint has them, the rest frozen: a listening
    adapter (:class:`~gdpo_listener.agents.arflow.ListenAdapter`) of ``width`` hidden units
    (``algo.listen_adapter``) and/or listening low-rank updates
    (:class:`~gdpo_listener.agents.arflow.ListenLoRA`) of rank ``rank`` (``algo.listen_lora``). A speaking
    token's velocity then stays the supervised one given its context; ``scope`` (``algo.lora_scope``,
    :data:`~gdpo_listener.agents.arflow.LORA_SCOPES`) widens where the low-rank updates act: the context entries of
    listening tokens too (which speaking tokens read), or everything (plain LoRA)."""
    width, rank = int(width), int(rank)
    if width == 0 and rank == 0:
        return [p for p in model.parameters() if p.requires_grad]
    parts = []
    for n, attr, add, what in ((width, "listen_adapter", model.add_listen_adapter, "width"),
                               (rank, "listen_lora", model.add_listen_lora, "rank")):
        if n == 0:
            continue
        if getattr(model, attr) is None:
            add(n, scope) if attr == "listen_lora" else add(n)
        elif getattr(model.cfg, attr) != n:
            raise ValueError(f"algo.{attr}={n}, but the checkpoint's {attr} has {what} {getattr(model.cfg, attr)}")
        elif attr == "listen_lora" and model.cfg.lora_scope != scope:
            raise ValueError(f"algo.lora_scope={scope}, but the checkpoint's low-rank updates have "
                             f"lora_scope={model.cfg.lora_scope}")
        parts.append(getattr(model, attr))
    model.requires_grad_(False)
    for part in parts:
        part.requires_grad_(True)
    return [p for part in parts for p in part.parameters()]


def make_env(cfg: DictConfig, bank, vae, normalizer, reward, generator, n_prompts: int | None = None,
             seed: int | None = None) -> ListenerSDEEnv:
    """The RL env of ``cfg.env``; ``n_prompts`` and ``seed`` (a rank's share and stream) default to ``cfg``'s."""
    return ListenerSDEEnv(bank, vae, normalizer, reward, n_prompts=cfg.env.n_prompts if n_prompts is None else n_prompts,
                          group_size=cfg.env.group_size, sde_steps=cfg.env.sde_steps, sigma=cfg.env.sigma, sde=cfg.env.sde,
                          device=bank.device, generator=generator, seed=cfg.seed if seed is None else seed,
                          cond_drop=float(cfg.env.get("cond_drop", 0.0)), drop_keys=tuple(cfg.env.get("drop_keys", DROP_KEYS)),
                          sde_window=cfg.env.get("sde_window"))


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


@torch.no_grad()
def attach_hold_reference(cfg: DictConfig, bank, model, vae, normalizer, reward, batch_size: int = 64):
    """For a reward with ``<group>@hold`` columns: ``bank["reference_motion"] (B, W, 67)``, the supervised
    ``model``'s own rollout of every row with the env's sampler (``env.sde_steps``, ``sigma``, ``sde``,
    ``sde_window``; no CFG, as the rollouts; long rows by sliding windows with ``env.prefix_tokens``, as the
    policy), decoded raw FLAME; drawn once with ``seed`` so every rank and a resumed run hold the same
    reference. Like with like: at the start of RL a hold column's reward is the spread of one rollout around
    another. ``env.hold_reference=ode`` draws it with the evaluation sampler instead (Euler ODE of
    ``eval.steps`` steps, no noise). Other rewards: ``bank`` unchanged."""
    if not reward.scores_reference:
        return bank
    from ..envs.windows import cond_from_bank, decode_latents

    e = cfg.env
    kw = (dict(steps=int(cfg.eval.steps), sigma=0.0) if e.get("hold_reference", "rollout") == "ode" else
          dict(steps=int(e.sde_steps), sigma=float(e.sigma), sde=e.sde, sde_window=e.get("sde_window")))
    g = torch.Generator(device=bank.device).manual_seed(int(cfg.seed))
    n_tokens, out = bank["actor_latent"].shape[1], []
    for i in range(0, bank.batch_size[0], batch_size):
        b = bank[i : i + batch_size]
        cond, spk = cond_from_bank(b), b["speaking_tokens"]
        z = model.sample(cond, n_tokens, speaking_tokens=spk, generator=g, **kw) if n_tokens <= model.cfg.n_tokens else \
            model.generate_long(cond, n_tokens * model.cfg.r, k=int(e.prefix_tokens), speaking_tokens=spk, generator=g, **kw)
        out.append(decode_latents(vae, normalizer, z))  # (b, W, 67); z (b, N, Dv)
    ref = torch.cat(out)  # (B, W, 67)
    if not torch.isfinite(ref).all():
        raise ValueError(f"reward={cfg.get('reward')}: the supervised model's reference rollouts for the hold columns "
                         f"{reward.hold_columns} are not finite (a broken checkpoint?)")
    bank["reference_motion"] = ref
    return bank


def make_reference(model, precision: str):
    """The frozen reference policy: a copy of ``model`` at ``precision`` (agents/compress.py; ``auto`` = bf16
    where native and the model is large, the paper preset on a bf16 CPU). It only scores the KL's means."""
    ref = compress(model, precision)
    return copy.deepcopy(model) if ref is model else ref


def make_group_kl(algo_cfg: DictConfig, vae, bank, n_windows: int = 64) -> dict:
    """``{group: (beta_g, M_g)}`` of ``algo.group_kl``: each group's decoded-motion metric measured at the latents of
    the first ``n_windows`` rows of ``bank`` (the train windows; agents/group_metric.py). Empty: the paper's KL only."""
    from ..agents.group_metric import decoded_group_metric

    z = bank["actor_latent"][:n_windows].to(next(vae.parameters()).device)  # (b, N, Dv)
    return {g: (float(w), decoded_group_metric(vae, z, group_slice(g)))
            for g, w in (algo_cfg.get("group_kl") or {}).items()}


def make_loss(algo_cfg: DictConfig, policy, model, reward, reference_source=None, group_kl=None):
    """The GDPO / GRPO loss of ``algo_cfg`` training ``model``. The KL's reference is a frozen copy of
    ``reference_source`` (default ``model``): train/gdpo.py passes the checkpoint as loaded, before
    :func:`make_trainable` adds zero-initialised listening parts. Those change no output (``y + gate * 0``), so
    that reference scores the same means to the bit without computing them. ``group_kl``: :func:`make_group_kl`'s."""
    if algo_cfg.name not in LOSSES:
        raise ValueError(f"unknown algo {algo_cfg.name!r}; valid: {sorted(LOSSES)}")
    reference = make_reference(model if reference_source is None else reference_source, algo_cfg.get("ref_precision", "fp32"))
    return LOSSES[algo_cfg.name](transition_core(policy), model, reward.lambdas, clip_epsilon=algo_cfg.clip_epsilon,
                                 beta=algo_cfg.beta, eps=algo_cfg.eps, eps0=algo_cfg.eps0, whiten=algo_cfg.whiten,
                                 eps_mode=algo_cfg.eps_mode, objective_tokens=algo_cfg.objective_tokens,
                                 beta_speaking=algo_cfg.get("beta_speaking"), reference=reference,
                                 speaking_columns=[f == "speaking" for f in reward.column_frames],
                                 speaking_objective_weight=algo_cfg.get("speaking_objective_weight", 1.0),
                                 std_scope=algo_cfg.get("std_scope", "group"), std_momentum=algo_cfg.get("std_momentum", 0.98),
                                 kl_steps=algo_cfg.get("kl_steps", "sde"), group_kl=group_kl)


def make_anchor(cfg: DictConfig, train_bank, data_root, features, vae, normalizer, device, generator, dist: Dist | None = None):
    """The supervised anchor of ``algo.sft_coef`` on the train split's windows, or None when it is 0 (the paper).
    ``train_bank`` (:func:`make_train_bank`'s) is reused when its rows are the model's windows."""
    algo_cfg = cfg.algo
    coef = float(algo_cfg.get("sft_coef") or 0.0)
    if coef == 0:
        return None
    from ..agents.anchor import SupervisedAnchor

    bank = train_bank if cfg.env.episode_tokens is None else \
        factories.make_banks(data_root, features, vae, normalizer, device, splits=("train",))["train"]
    B = int(algo_cfg.sft_batch_size)
    rows = slice(None) if dist is None or not dist.is_distributed else dist.shard(B, "algo.sft_batch_size")
    return SupervisedAnchor(bank, coef, B, generator, rows=rows)


@torch.no_grad()
def collect(env, policy, keep_ode_steps: bool = False) -> TensorDict:
    """One batch of RL trajectories with their objective masks; ``keep_ode_steps`` for a loss whose KL covers
    the ODE steps of a mixed env (``loss.keeps_ode_steps``)."""
    with set_exploration_type(ExplorationType.RANDOM):
        traj = collect_trajectories(env, policy, keep_ode_steps=keep_ode_steps)
    rows = env.bank[traj["window"]]
    traj["token_mask"] = listening_token_mask(rows["listening"], env.n_tokens)  # the objective's tokens (listening)
    traj["speaking_token_mask"] = listening_token_mask(rows["speaking"], env.n_tokens)  # objective_tokens=matched's speaking tokens
    return traj


def advantage_log_stats(traj, group_names, algo_cfg) -> dict:
    """Advantage diagnostics (tensors), named ``adv/<figure>`` or ``adv/<figure>/<group>`` for per-group ones.

    With ``objective_tokens=matched`` (an ``advantage_speaking`` in ``traj``) each column's correlations
    are with the advantage that trains its own token kind (``<group>@speaking`` columns: the speaking
    tokens'); the scalar figures are the listening advantage's."""
    from ..agents.advantages import advantage_diagnostics, reward_group_stats
    from ..rewards.groups import is_speaking_column

    reward, gid = traj["reward"], traj["group_id"]
    figures = {**reward_group_stats(reward, gid, eps=algo_cfg.eps, eps_mode=algo_cfg.eps_mode),
               **advantage_diagnostics(traj["advantage"], reward, gid)}
    if "advantage_speaking" in traj.keys():
        spk = torch.tensor([is_speaking_column(g) for g in group_names], device=reward.device)  # (n,) speaking columns
        own = advantage_diagnostics(traj["advantage_speaking"], reward, gid)
        for k in ("corr_zscore", "corr_reward"):
            figures[k] = torch.where(spk, own[k], figures[k])
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
    for key in ("advantage", "advantage_speaking"):  # advantage_speaking: objective_tokens=matched
        if key in glob.keys():
            traj[key] = glob[key][dist.shard(rewards.shape[0])]  # (b,)
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


def objective_counts(loss_module, traj) -> dict[str, float]:
    """This rank's transition counts by kind (objective, all, listening, speaking) over the replay
    windows: the weights of chunked_update's means (:data:`~agents.loss.AGGREGATION`)."""
    counts = transition_counts(loss_module, traj)
    return {k: sum(c[k] for c in counts) for k in COUNT_KINDS}


def combine_rank_stats(per_rank: list[tuple[dict, dict]], rules: dict = AGGREGATION) -> dict:
    """One process's ``chunked_update`` figures from every rank's ``(stats, counts)`` (:func:`objective_counts`).

    ``loss/<term>`` and ``policy/<figure>`` combine by :data:`~agents.loss.AGGREGATION`: a mean
    weighted by each rank's transitions of the rule's kind (a rank without such transitions, whose
    figure is NaN, has weight 0), or the maximum ignoring NaN; other figures (``optim/grad_norm``,
    equal on every rank after the gradient all-reduce) are rank 0's.
    """
    out = dict(per_rank[0][0])
    for key in out:
        rule = rules.get(key.split("/", 1)[1]) if key.startswith(("loss/", "policy/")) else None
        if rule is None:
            continue
        values = [(s[key], counts) for s, counts in per_rank]
        if rule == "max":
            finite = [v for v, _ in values if not math.isnan(v)]
            out[key] = max(finite) if finite else math.nan
        else:
            pairs = [(v, w[rule]) for v, w in values if w[rule] > 0]
            total = sum(w for _, w in pairs)
            out[key] = sum(v * w for v, w in pairs) / total if total > 0 else math.nan
    return out
