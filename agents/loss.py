"""GDPO and GRPO as TorchRL ``LossModule``s (paper eq. 8-10, docs/design.md section 7).

Both losses share the objective and differ only in how rollouts' reward vectors become one
trajectory advantage:

- GDPO: every reward (FLAME group) is normalised within its prompt's group of G rollouts
  separately, then combined with weights lambda_i (eq. 8-9);
- GRPO: the lambda-weighted sum of rewards is normalised within the group.

Terms (the caller sums the ``loss_*`` terms)::

    loss_objective = -mean_{t in O} min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A)
    loss_kl        = mean_{t in T} beta_t KL(pi_theta || pi_ref)
                   = mean_{t in T} beta_t ||mu_theta - mu_ref||^2 / (2 sigma^2 dt)

with ``rho_t = p_theta(a_t | s_t) / p_behaviour(a_t | s_t)``, the behaviour log-probability being
the one recorded at collection. ``T`` is every generated transition: the KL keeps speaking tokens
near the reference too; ``beta_t`` is ``beta`` on the tokens marked in ``token_mask`` (listening)
and ``beta_speaking`` (default ``beta``) on the others, so the speaking motion the listening
objective does not ask to change can be held closer to the reference. ``O`` are the objective's
transitions: ``objective_tokens="listening"`` (default) keeps the transitions of tokens marked in
the trajectory's ``token_mask`` (the caller marks the tokens that overlap the actor's listening
frames, :func:`listening_token_mask`), ``"all"`` keeps every transition. ``"matched"`` (a reward with
``<group>@speaking`` columns) credits each token kind with the reward of its own frames: the listening
tokens' transitions with the advantage of the listening columns (``loss_objective``, as ``"listening"``)
and the speaking tokens' (``speaking_token_mask``) with the advantage of the speaking columns::

    loss_objective_speaking = -w_s mean_{t in O_s} min(rho_t A_s, clip(rho_t, 1 - eps, 1 + eps) A_s)

each normalised over its own transitions, so the listening update is the ``"listening"`` one
whatever the speaking turn adds. ``group_kl`` (``algo.group_kl``, not in the paper) adds, per FLAME group g,
the KL of the listening transitions measured in that group's decoded-motion metric ``M_g``
(:mod:`.group_metric`): ``loss_kl_<g> = beta_g mean_{t in T, listening} (mu_theta - mu_ref)^T M_g
(mu_theta - mu_ref) / (2 sigma^2 dt)``, diagnostic ``kl_<g>`` (the mean without ``beta_g``). Diagnostics, under non-loss
names: ``kl`` (mean over ``T``), ``kl_listening`` / ``kl_speaking`` (means over the transitions of
tokens inside / outside ``token_mask``), ``clip_fraction``, ``ratio_mean``, ``log_ratio_abs_mean``
(means over ``O``) and ``ratio_max`` (maximum over ``O``; NaN when ``O`` is empty);
:data:`AGGREGATION` says how each output combines over chunks.

Mixed SDE/ODE envs (``sde_window = (a, b)``): ``O`` holds SDE transitions only (an ODE step is a point
mass with no ratio); ``kl_steps="sde"`` (default) keeps only those, so ``T`` is the SDE transitions too
and the update replays ``b - a`` of the ``K`` steps; ``kl_steps="all"`` keeps every step and ``T`` also
holds the ODE steps, whose mean ``x + dt v`` is held near the reference's by the same closed form at an
SDE step's std (the velocity the evaluation ODE follows at those flow times is then regularised
directly, not only through shared parameters). Without a window both are the paper's loss.

Data layout (:func:`trajectory_batch`): one row per trajectory with the states of the kept steps
(all ``K`` denoising steps, or the ``b - a`` SDE steps of the env's ``sde_window`` when the ODE
steps, deterministic, are neither replayed nor trained) of all ``N`` tokens, so the update replays a chunk of ``S`` denoising steps for
every token of a window in one teacher-forced pass (``SDETransition.replay_loc``);
:func:`chunked_update` walks the (window, chunk) pairs with gradient accumulation, so peak memory
is set by one chunk of one window, not by the number of transitions or the episode length.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule  # noqa: F401  (documentation cross-reference)
from torchrl.envs.utils import step_mdp
from torchrl.objectives import LossModule

from .advantages import (
    EPS_MODES,
    STD_SCOPES,
    advantage_diagnostics,
    gdpo_advantages,
    grpo_advantages,
    pooled_group_var,
    reward_group_stats,
)
from .flow import gaussian_kl_metric, gaussian_kl_same_std, gaussian_log_prob, sde_window_steps, transition_std
from .guards import check_finite_step


def _as_trajectories(steps: TensorDictBase, history: torch.Tensor, reward: torch.Tensor, window: torch.Tensor,
                     group_id: torch.Tensor, n_tokens: int, sde_steps: int, token_mask: torch.Tensor | None,
                     log_prob_key: str, sde_window=None, keep_ode_steps: bool = False) -> TensorDict:
    """Per-step records ``(B, N*K)`` + episode ends -> the trajectory layout ``(B,)`` (see :func:`trajectory_batch`)."""
    B, L = steps.batch_size
    N, K = n_tokens, sde_steps
    if L != N * K:
        raise ValueError(f"rollout has {L} steps, expected n_tokens * sde_steps = {N * K}")
    a, b = sde_window_steps(sde_window, K)
    if keep_ode_steps:
        a, b = 0, K

    def per_step(x):  # (B, N*K, ...) -> (B, b - a, N, ...): the kept steps
        return x.reshape(B, N, K, *x.shape[2:]).transpose(1, 2)[:, a:b]

    mask = torch.ones(B, N, dtype=torch.bool, device=steps.device) if token_mask is None else token_mask
    return TensorDict({
        "history": history, "window": window, "group_id": group_id,
        "x": per_step(steps["x"]),
        "t": per_step(steps["t"].squeeze(-1)),
        "action": per_step(steps["action"]),
        "action_log_prob": per_step(steps[log_prob_key]),
        "reward": reward,
        "token_mask": mask,
    }, batch_size=[B], device=steps.device).apply(lambda v: v.contiguous())


@torch.no_grad()
def trajectory_batch(rollout: TensorDictBase, n_tokens: int, sde_steps: int, token_mask: torch.Tensor | None = None,
                     log_prob_key: str = "action_log_prob", sde_window=None, keep_ode_steps: bool = False) -> TensorDict:
    """Reshape a rollout ``(B, N*K)`` of :class:`~envs.sde_env.ListenerSDEEnv` into trajectories ``(B,)``.

    Keys of the result, with ``S`` the SDE steps (``K``, or ``b - a`` for the env's ``sde_window``
    ``(a, b)``, which must be passed: the ODE steps outside it are dropped unless ``keep_ode_steps``,
    for a loss with ``kl_steps="all"``; then ``S = K``): ``history (N, D)``,
    ``window ()``, ``group_id ()``, ``x (S, N, D)``, ``t (S, N)``, ``action (S, N, D)``,
    ``action_log_prob (S, N)``, ``reward (n_groups,)``,
    ``token_mask (N,)``: the tokens whose transitions enter the objective under
    ``objective_tokens="listening"``; every token unless ``token_mask`` is given (build it with
    :func:`listening_token_mask`).
    """
    return _as_trajectories(rollout, rollout["next", "history"][:, -1], rollout["next", "reward"][:, -1],
                            rollout["window"][:, 0], rollout["group_id"][:, 0], n_tokens, sde_steps, token_mask, log_prob_key,
                            sde_window, keep_ode_steps)


@torch.no_grad()
def collect_trajectories(env, policy, log_prob_key: str = "action_log_prob", keep_ode_steps: bool = False) -> TensorDict:
    """One batch of episodes of ``env`` under ``policy``, straight into the :func:`trajectory_batch` layout.

    Same transitions as ``trajectory_batch(env.rollout(N * K, policy), N, K)``, but only the state,
    flow time, action and log-prob of each step are recorded: memory grows linearly with the episode,
    whereas ``env.rollout``'s record holds the Markov state's whole ``history`` at every step
    (quadratic in the number of tokens). Run it under the exploration type you want (random for RL).
    ``token_mask`` marks every token: set it (:func:`listening_token_mask`) before a listening-only objective.
    Only the SDE steps of the env's ``sde_window`` are kept, unless ``keep_ode_steps`` (a loss with
    ``kl_steps="all"``: the KL also holds the ODE steps' means near the reference).
    """
    N, K = env.n_tokens, env.sde_steps
    td = env.reset()
    window, group_id = td["window"], td["group_id"]
    record = []
    for _ in range(N * K):
        td = policy(td)
        record.append(td.select("x", "t", "action", log_prob_key))
        td = env.step(td)
        last = td["next"]
        td = step_mdp(td)
    return _as_trajectories(torch.stack(record, dim=1), last["history"], last["reward"], window, group_id, N, K,
                            None, log_prob_key, getattr(env, "sde_window", None), keep_ode_steps)


STEP_KEYS = ("x", "t", "action", "action_log_prob")
TOKEN_KEYS = ("token_mask", "speaking_token_mask")  # per-token (B, N) masks of a trajectory batch


def select_steps(traj: TensorDictBase, k0: int, k1: int, step_keys=STEP_KEYS) -> TensorDict:
    """The chunk of denoising steps ``k0:k1`` of every token of a :func:`trajectory_batch` (a view)."""
    out = traj.exclude(*step_keys)
    for k in step_keys:
        out.set(k, traj[k][:, k0:k1])
    return out


def select_window(traj: TensorDictBase, span: tuple[int, int, int], step_keys=STEP_KEYS) -> TensorDict:
    """The tokens generated by one sliding window ``span = (s0, n, new0)`` of a :func:`trajectory_batch`.

    ``history`` stays whole (the window reads its prefix from it); the per-token keys keep tokens
    ``new0 .. s0 + n - 1``; the span is stored as non-tensor ``"span"`` for the loss.
    """
    s0, n, new0 = span
    masks = [k for k in TOKEN_KEYS if k in traj.keys()]
    out = traj.exclude(*step_keys, *masks)
    for k in step_keys:
        out.set(k, traj[k][:, :, new0:s0 + n])
    for k in masks:
        out.set(k, traj[k][:, new0:s0 + n])
    out.set_non_tensor("span", tuple(span))
    return out


def listening_token_mask(listening: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Tokens whose frames overlap the actor's listening frames: ``listening (B, W)`` bool -> ``(B, N)``.

    The trajectory's ``token_mask`` for ``objective_tokens="listening"`` (``W`` must be ``N * r``).
    """
    B, W = listening.shape
    if n_tokens < 1 or W % n_tokens:
        raise ValueError(f"listening mask of {W} frames does not split into {n_tokens} tokens")
    return listening.reshape(B, n_tokens, W // n_tokens).any(-1)  # (B, N)


# How chunked_update combines a loss output over (window, chunk) passes and epochs:
#   "objective": mean weighted by the pass's share of the objective's transitions,
#   "all":       mean weighted by the pass's share of all generated transitions,
#   "listening" / "speaking": mean weighted by the pass's share of the transitions of tokens inside /
#                outside ``token_mask``,
#   "speaking_objective": mean weighted by the pass's share of the speaking objective's transitions,
#   "max":       maximum (NaN passes, i.e. without objective transitions, are ignored).
AGGREGATION = {
    "loss_objective": "objective", "clip_fraction": "objective", "ratio_mean": "objective",
    "log_ratio_abs_mean": "objective", "loss_kl": "all", "kl": "all", "ratio_max": "max",
    "kl_listening": "listening", "kl_speaking": "speaking", "loss_objective_speaking": "speaking_objective",
}
COUNT_KINDS = ("objective", "all", "listening", "speaking", "speaking_objective")  # the counts the mean rules weight by
OBJECTIVE_KINDS = ("objective", "speaking_objective")  # kinds counting SDE transitions only (the others: every kept step)


def transition_counts(loss_module: GroupRelativeLoss, traj: TensorDictBase) -> list[dict[str, float]]:
    """Per replay window (``transition[0].schedule``), its token counts by :data:`COUNT_KINDS`
    (each token stands for ``K`` transitions in every kind alike); one device read."""
    obj = loss_module.objective_mask(traj)  # (B, N)
    lis = traj[loss_module.tensor_keys.token_mask].bool()  # (B, N)
    spk_obj = loss_module.speaking_objective_mask(traj)  # (B, N)
    spans = loss_module.transition[0].schedule
    per = torch.stack([torch.stack([m[:, new0:s0 + n].sum() for m in (obj, lis, spk_obj)]) for s0, n, new0 in spans]).tolist()
    B = obj.shape[0]
    return [{"objective": float(o), "all": float(B * (s0 + n - new0)), "listening": float(li),
             "speaking": float(B * (s0 + n - new0) - li), "speaking_objective": float(so)}
            for (o, li, so), (s0, n, new0) in zip(per, spans)]


def _aggregate(outputs: list[tuple[TensorDictBase, dict[str, float]]], rules: dict[str, str]) -> dict[str, torch.Tensor]:
    """Combine the loss outputs of every pass by :data:`AGGREGATION`; ``outputs`` = [(out, {rule: weight})].

    A term whose transitions the batch lacks (zero total weight, e.g. ``loss_objective`` of a batch
    without a listening token) contributed exactly 0 to the gradient: a ``loss_*`` term reports 0, a
    diagnostic NaN ("not measured"), never a NaN loss that reads as divergence."""
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for out, w in outputs:
        for key, v in out.items():
            rule = rules.get(key)
            if rule is None:
                raise ValueError(f"loss output {key!r} has no aggregation rule; add it to the loss module's aggregation")
            if rule == "max":
                sums[key] = torch.fmax(sums[key], v) if key in sums else v
            else:
                sums[key] = sums.get(key, 0.0) + v * w[rule]
                weights[key] = weights.get(key, 0.0) + w[rule]
    def empty(k: str, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(v) if k.startswith("loss_") else torch.full_like(v, float("nan"))

    return {k: v if rules[k] == "max" else (v / weights[k] if weights[k] > 0 else empty(k, v)) for k, v in sums.items()}


def chunked_update(loss_module: GroupRelativeLoss, traj: TensorDictBase, optimizer: torch.optim.Optimizer,
                   chunk_steps: int = 2, epochs: int = 1, grad_clip: float = 1.0, sync=None, anchor=None) -> dict[str, float]:
    """One optimiser step per epoch over the whole batch, replayed window by window and ``chunk_steps``
    denoising steps at a time with gradient accumulation.

    Each pass's ``loss_objective`` is weighted by its share of the batch's objective transitions
    and its ``loss_kl`` by its share of all generated transitions (``loss_objective_speaking`` by its
    share of the speaking objective's), so the accumulated gradient equals the gradient of the whole
    batch's mean objective plus its mean KL. Each window's prefix
    and history run once per model, shared by its chunks (``SDETransition.shared_context``). Peak memory
    is that of one (window, chunk) pass plus one window's prefix activations, whatever the episode length.

    Returns floats: ``loss/<loss term>``, ``policy/<diagnostic>`` (aggregated by
    :data:`AGGREGATION`, averaged over epochs; ``ratio_max`` is the maximum over the whole batch
    and all epochs; objective-weighted figures are NaN when the batch has no objective transition)
    and ``optim/grad_norm`` (last epoch, before clipping). Every window is replayed, also one
    without objective tokens: the KL covers all of them.

    ``sync`` (several processes, each holding its own rows of one global batch; e.g.
    :class:`~pipeline.distributed.Dist`): an object with ``all_reduce(tensor, "sum")`` and
    ``all_reduce_gradients(params)``. The shares are then of the GLOBAL batch's transition counts
    and the accumulated gradients are summed over processes once per optimiser step, before
    clipping: every process takes the step one process would take on the union of the batches.
    The returned loss and policy figures stay those of this process's rows.

    ``anchor`` (e.g. :class:`~agents.anchor.SupervisedAnchor`): called with the trained model once per
    epoch, its ``loss_*`` terms are added to that epoch's gradient before the all-reduce and clipping,
    and logged as ``loss/<term>`` (mean over epochs).
    """
    S, epochs = int(chunk_steps), int(epochs)
    if S < 1:
        raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    K = traj["x"].shape[1]
    sde_held = [0]  # SDE steps among the batch's first k kept steps (ODE steps carry no objective)
    for s in loss_module.held_steps(K):
        sde_held.append(sde_held[-1] + int(loss_module.is_sde_step(s)))
    spans = loss_module.transition[0].schedule
    counts = transition_counts(loss_module, traj)  # per window
    total = {k: sum(c[k] for c in counts) for k in COUNT_KINDS}
    if sync is not None:  # shares of the global batch
        reduced = sync.all_reduce(torch.tensor([total[k] for k in COUNT_KINDS], dtype=torch.float64,
                                               device=traj["x"].device), "sum").tolist()
        total = dict(zip(COUNT_KINDS, reduced))
    outputs, anchored = [], {}
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        for span, c in zip(spans, counts):
            win = select_window(traj, span)
            # the window's prefix and history run once per model, shared by its chunks (policy.SDETransition.shared_context)
            with loss_module.transition[0].shared_context(win["window"], win["history"], span,
                                                          (loss_module.actor_network, loss_module.ref_network)):
                for k0 in range(0, K, S):
                    k1 = min(k0 + S, K)
                    share = {k: (sde_held[k1] - sde_held[k0]) / sde_held[K] if k in OBJECTIVE_KINDS else (k1 - k0) / K
                             for k in COUNT_KINDS}  # the chunk's share of the objective's (SDE) / of all kept steps
                    w = {k: c[k] / total[k] * share[k] if total[k] else 0.0 for k in COUNT_KINDS}
                    out = loss_module(select_steps(win, k0, k1))
                    sum(out[k] * w[loss_module.aggregation[k]] for k in out.keys() if k.startswith("loss_")).backward()
                    outputs.append((out.detach(), w))
        if anchor is not None:
            terms = anchor(loss_module.actor_network)
            sum(terms.values()).backward()
            for k, v in terms.items():
                anchored[k] = anchored.get(k, 0.0) + v.detach() / epochs
        if sync is not None:
            sync.all_reduce_gradients(loss_module.actor_network.parameters())  # one all-reduce per optimiser step
        gnorm = torch.nn.utils.clip_grad_norm_(loss_module.actor_network.parameters(), grad_clip)
        check_finite_step({k: v for k, v in out.items() if k.startswith("loss_")}, gnorm, where="chunked_update",
                          hint="a learning rate or clip range too large for this model, or sigma too small")
        optimizer.step()
    stats = {f"loss/{k}" if k.startswith("loss_") else f"policy/{k}": v.item()
             for k, v in _aggregate(outputs, loss_module.aggregation).items()}
    stats.update({f"loss/{k}": v.item() for k, v in anchored.items()})
    stats["optim/grad_norm"] = gnorm.item()
    return stats


OBJECTIVE_TOKENS = ("listening", "all", "matched")
KL_STEPS = ("sde", "all")


class RunningVariance(torch.nn.Module):
    """Exponential moving average of a per-column variance ``(n,)`` over iterations, bias-corrected as
    Adam's moments are (``value = ema / (1 - momentum ** count)``), so the first update returns the
    first batch's variance. Its buffers go into the run's saved state: a resumed run continues it."""

    def __init__(self, n: int, momentum: float):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"algo.std_momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("ema", torch.zeros(n))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, var: torch.Tensor) -> torch.Tensor:
        """Fold this iteration's ``var (n,)`` in; return the bias-corrected running variance ``(n,)``."""
        if var.shape != self.ema.shape:
            raise ValueError(f"running variance has {self.ema.numel()} columns, got {tuple(var.shape)}")
        self.ema.mul_(self.momentum).add_(var.to(self.ema.dtype), alpha=1 - self.momentum)
        self.count.add_(1)
        return self.value()

    def value(self) -> torch.Tensor:
        return self.ema / (1 - self.momentum ** self.count.clamp(min=1).to(self.ema.dtype))


class GroupRelativeLoss(LossModule):
    """Shared PPO-clip + KL objective of :class:`GDPOLoss` and :class:`GRPOLoss`.

    Args:
        transition: the policy's :class:`~agents.policy.SDETransition` (gives ``replay_loc``,
            ``sigma`` and ``dt``); ``model`` is the AR-Flow being trained.
        model: trainable AR-Flow (theta). A frozen copy is kept as the reference policy.
        lambdas: ``(n_groups,)`` reward weights lambda_i.
        clip_epsilon: PPO clip range; beta: KL weight (the KL covers every generated transition).
        beta_speaking: KL weight on the tokens outside ``token_mask`` (speaking); ``None`` = ``beta``.
        eps, eps0, eps_mode: advantage constants (eq. 8-9); ``eps_mode="relative"`` (scale-free,
            default) or ``"absolute"`` (reference code), see :mod:`agents.advantages`.
        whiten: batch-level whitening of the advantage after the group normalisation.
        std_scope: the spread eq. 8 divides each reward by: ``"group"`` (the paper: each prompt's own
            std), ``"batch"`` (the batch's pooled within-prompt std, shared by its prompts) or
            ``"running"`` (a moving average of that over iterations, momentum ``std_momentum``), see
            :mod:`agents.advantages`. Not with ``objective_tokens="matched"`` unless ``"group"``.
        objective_tokens: ``"listening"`` (default: transitions of the tokens marked in
            ``token_mask``) or ``"all"`` (every transition) enter the PPO objective; ``"matched"``:
            listening tokens on the listening columns' advantage, speaking tokens (``speaking_token_mask``)
            on the speaking columns' (module docstring).
        speaking_columns: ``(n_groups,)`` bool, the reward columns that score speaking frames
            (``FlameReward.column_frames == "speaking"``); ``"matched"`` needs both kinds.
        speaking_objective_weight: ``w_s``, the weight of ``loss_objective_speaking`` (``"matched"``).
    """

    @dataclass
    class _AcceptedKeys:
        """Configurable keys (``loss.set_keys(...)``)."""

        advantage: str = "advantage"
        action: str = "action"
        sample_log_prob: str = "action_log_prob"
        reward: str = "reward"
        group_id: str = "group_id"
        token_mask: str = "token_mask"
        advantage_speaking: str = "advantage_speaking"
        speaking_token_mask: str = "speaking_token_mask"

    default_keys = _AcceptedKeys
    aggregation = AGGREGATION  # how chunked_update combines each output over passes

    def __init__(self, transition, model: torch.nn.Module, lambdas, clip_epsilon: float = 0.2, beta: float = 0.01,
                 eps: float = 1e-4, eps0: float = 1e-4, whiten: bool = False, reference: torch.nn.Module | None = None,
                 eps_mode: str = "relative", objective_tokens: str = "listening", beta_speaking: float | None = None,
                 speaking_columns=None, speaking_objective_weight: float = 1.0, std_scope: str = "group",
                 std_momentum: float = 0.98, kl_steps: str = "sde", group_kl=None):
        super().__init__()
        beta_speaking = beta if beta_speaking is None else beta_speaking
        if clip_epsilon <= 0:
            raise ValueError(f"clip_epsilon must be > 0, got {clip_epsilon}")
        if beta < 0 or beta_speaking < 0:
            raise ValueError(f"beta and beta_speaking must be >= 0, got {beta} and {beta_speaking}")
        if eps_mode not in EPS_MODES:
            raise ValueError(f"eps_mode must be one of {EPS_MODES}, got {eps_mode!r}")
        if objective_tokens not in OBJECTIVE_TOKENS:
            raise ValueError(f"objective_tokens must be one of {OBJECTIVE_TOKENS}, got {objective_tokens!r}")
        if kl_steps not in KL_STEPS:
            raise ValueError(f"kl_steps must be one of {KL_STEPS}, got {kl_steps!r}")
        if std_scope not in STD_SCOPES:
            raise ValueError(f"std_scope must be one of {STD_SCOPES}, got {std_scope!r}")
        if std_scope != "group" and objective_tokens == "matched":
            raise ValueError(f"std_scope={std_scope!r} is not supported with objective_tokens='matched' "
                             "(its two advantages would share one spread); use std_scope='group'")
        self._tensor_keys = self._AcceptedKeys()
        self.transition = [transition]  # plain list: not a sub-module (its AR-Flow is the behaviour copy)
        self.actor_network = model
        ref = copy.deepcopy(model) if reference is None else reference
        self.ref_network = ref.eval().requires_grad_(False)
        self.register_buffer("lambdas", torch.as_tensor(lambdas, dtype=torch.float32))
        sc = torch.zeros(self.lambdas.shape, dtype=torch.bool) if speaking_columns is None else \
            torch.as_tensor(speaking_columns, dtype=torch.bool).reshape(-1)
        if sc.shape != self.lambdas.shape:
            raise ValueError(f"speaking_columns has {sc.numel()} entries for {self.lambdas.numel()} reward columns")
        if objective_tokens == "matched" and (not sc.any() or sc.all()):
            raise ValueError("objective_tokens='matched' needs listening reward columns and <group>@speaking columns "
                             f"(speaking_columns={sc.tolist()})")
        self.register_buffer("speaking_columns", sc)
        if not math.isfinite(speaking_objective_weight) or speaking_objective_weight < 0:
            raise ValueError(f"speaking_objective_weight must be finite and >= 0, got {speaking_objective_weight}")
        self.speaking_objective_weight = float(speaking_objective_weight)
        self.clip_epsilon, self.beta, self.beta_speaking = float(clip_epsilon), float(beta), float(beta_speaking)
        self.eps, self.eps0, self.whiten, self.eps_mode = float(eps), float(eps0), bool(whiten), eps_mode
        self.objective_tokens = objective_tokens
        self.kl_steps = kl_steps
        self.std_scope = std_scope
        n_scale = self.lambdas.numel() if self.decoupled else 1  # GRPO normalises one column: the weighted sum
        self.reward_scale = RunningVariance(n_scale, std_momentum) if std_scope == "running" else None
        self.group_kl_betas: dict[str, float] = {}
        for g, (beta_g, metric) in (group_kl or {}).items():
            if not math.isfinite(beta_g) or beta_g < 0:
                raise ValueError(f"group_kl[{g!r}]: the weight must be finite and >= 0, got {beta_g}")
            metric = torch.as_tensor(metric, dtype=torch.float32)
            if metric.dim() != 2 or metric.shape[0] != metric.shape[1] or not torch.isfinite(metric).all():
                raise ValueError(f"group_kl[{g!r}]: the metric must be a finite square matrix, got shape {tuple(metric.shape)}")
            self.group_kl_betas[g] = float(beta_g)
            self.register_buffer(f"group_kl_metric_{g}", metric, persistent=False)  # rebuilt from the VAE at every start
        self.aggregation = {**AGGREGATION, **{f"{k}_{g}": "listening" for g in self.group_kl_betas for k in ("loss_kl", "kl")}}

    decoupled = True  # GDPO: one spread per reward column; GRPO (False): one for the weighted sum

    @property
    def tensor_keys(self) -> _AcceptedKeys:
        return self._tensor_keys

    def set_keys(self, **kwargs) -> GroupRelativeLoss:
        for k, v in kwargs.items():
            if not hasattr(self._tensor_keys, k):
                raise ValueError(f"{type(self).__name__} has no key {k!r}; keys: {list(vars(self._tensor_keys))}")
            setattr(self._tensor_keys, k, v)
        return self

    def _forward_value_estimator_keys(self, **kwargs) -> None:  # no value estimator: advantages are group-relative
        pass

    # -- advantage -----------------------------------------------------------------------------
    def advantage_fn(self, rewards: torch.Tensor, group_ids: torch.Tensor, lambdas: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, n)`` rewards -> ``(B,)`` advantages (weights ``lambdas``, default the loss's); GDPO by default,
        GRPO overrides it."""
        lambdas = self.lambdas if lambdas is None else lambdas
        return gdpo_advantages(rewards, group_ids, lambdas, eps=self.eps, eps0=self.eps0, whiten=self.whiten,
                               eps_mode=self.eps_mode, scale=self.shared_scale(rewards, group_ids))

    def shared_scale(self, values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor | None:
        """The spread every prompt's ``values (B, m)`` are divided by, ``(m,)``; None: each prompt's own
        std (``std_scope="group"``). ``"running"`` folds this batch into the running variance."""
        if self.std_scope == "group":
            return None
        var = pooled_group_var(values, group_ids)  # (m,)
        if self.std_scope == "running":
            var = self.reward_scale.update(var)
        return var.sqrt()

    @torch.no_grad()
    def compute_advantage(self, td: TensorDictBase) -> TensorDictBase:
        """Write the trajectory advantage ``(B,)`` from the reward vectors ``(B, n_groups)``; with
        ``objective_tokens="matched"`` the listening columns' (``advantage``) and the speaking columns'
        (``advantage_speaking``), each computed as if its columns were the whole reward."""
        keys = self.tensor_keys
        rewards = td[keys.reward]
        if not torch.isfinite(rewards).all():
            raise ValueError("non-finite rewards reached the loss; check the reward modules")
        if self.objective_tokens != "matched":
            td.set(keys.advantage, self.advantage_fn(rewards, td[keys.group_id]))
            return td
        sc = self.speaking_columns
        td.set(keys.advantage, self.advantage_fn(rewards[:, ~sc], td[keys.group_id], self.lambdas[~sc]))
        td.set(keys.advantage_speaking, self.advantage_fn(rewards[:, sc], td[keys.group_id], self.lambdas[sc]))
        return td

    @torch.no_grad()
    def batch_diagnostics(self, td: TensorDictBase) -> dict[str, torch.Tensor]:
        """Per reward group and advantage diagnostics of a batch with advantages (tensors, for logging).

        :func:`~agents.advantages.reward_group_stats` under this loss's ``eps`` / ``eps_mode``
        (per group ``(n_groups,)``: ``frac_std_below_eps`` ...) and
        :func:`~agents.advantages.advantage_diagnostics` (``distinct_per_group``, ``corr_zscore`` ...).
        """
        keys = self.tensor_keys
        rewards, gid = td[keys.reward], td[keys.group_id]
        return {**reward_group_stats(rewards, gid, self.eps, self.eps_mode),
                **advantage_diagnostics(td[keys.advantage], rewards, gid)}

    @property
    def keeps_ode_steps(self) -> bool:
        """Whether trajectories must keep the ODE steps of a mixed SDE/ODE env (``kl_steps="all"``)."""
        return self.kl_steps == "all"

    def is_sde_step(self, s: int) -> bool:
        """Whether denoising step ``s`` samples the SDE (inside the transition's ``sde_window``)."""
        a, b = self.transition[0].sde_window
        return a <= s < b

    def held_steps(self, n_held: int) -> list[int]:
        """The denoising steps of a trajectory batch holding ``n_held`` of them: all ``K``, or the SDE window's."""
        tr = self.transition[0]
        a, b = tr.sde_window
        if n_held == tr.sde_steps:
            return list(range(n_held))
        if n_held == b - a:
            return list(range(a, b))
        raise ValueError(f"trajectories hold {n_held} denoising steps: expected all {tr.sde_steps} or the {b - a} "
                         f"SDE steps of sde_window=({a}, {b})")

    def sde_step_mask(self, t: torch.Tensor) -> torch.Tensor:
        """Flow times ``t`` of replayed states -> bool, same shape: the SDE transitions (grid step
        ``s = t K`` inside ``sde_window``); all True for a sampler that takes the SDE on every step."""
        tr = self.transition[0]
        a, b = tr.sde_window
        s = (t * tr.sde_steps).round()
        return (s >= a) & (s < b)

    def objective_mask(self, td: TensorDictBase) -> torch.Tensor:
        """``(B, N)`` bool: the tokens whose transitions enter the PPO objective."""
        mask = td[self.tensor_keys.token_mask].bool()  # (B, N)
        return torch.ones_like(mask) if self.objective_tokens == "all" else mask

    def speaking_objective_mask(self, td: TensorDictBase) -> torch.Tensor:
        """``(B, N)`` bool: the tokens of ``loss_objective_speaking`` (none unless ``objective_tokens="matched"``)."""
        if self.objective_tokens != "matched":
            return torch.zeros_like(td[self.tensor_keys.token_mask], dtype=torch.bool)
        if self.tensor_keys.speaking_token_mask not in td.keys():
            raise KeyError(f"objective_tokens='matched' needs the trajectories' {self.tensor_keys.speaking_token_mask!r} "
                           f"(tokens that overlap the actor's speaking frames, listening_token_mask(speaking, N))")
        return td[self.tensor_keys.speaking_token_mask].bool()

    # -- objective -----------------------------------------------------------------------------
    def forward(self, td: TensorDictBase) -> TensorDict:
        """Loss terms on a chunk of trajectories ``(B,)`` holding ``S`` denoising steps ``(S, N, ...)``."""
        keys = self.tensor_keys
        if keys.advantage not in td.keys():  # noqa: SIM118 (TensorDict: membership of a key, not a value)
            self.compute_advantage(td)
        tr = self.transition[0]
        span = td.get_non_tensor("span", None)  # one sliding window of a long episode (select_window)
        x, t, action = td["x"], td["t"], td[keys.action]  # (B, S, N, D), (B, S, N), (B, S, N, D)
        sde = None if self.kl_steps == "sde" else self.sde_step_mask(t)  # (B, S, N) bool; None: only SDE steps held
        loc = tr.replay_loc(td["window"], td["history"], x, t, model=self.actor_network, span=span, sde=sde)  # (B, S, N, D)
        with torch.no_grad():
            loc_ref = tr.replay_loc(td["window"], td["history"], x, t, model=self.ref_network, span=span, sde=sde)
        log_prob = gaussian_log_prob(action, loc, torch.full_like(loc, transition_std(tr.sigma, tr.dt)))  # (B, S, N)
        log_ratio = log_prob - td[keys.sample_log_prob]  # (B, S, N)
        if sde is not None:  # an ODE step is a point mass: ratio 1, outside the objective
            log_ratio = torch.where(sde, log_ratio, torch.zeros_like(log_ratio))
        ratio = log_ratio.exp()
        adv = td[keys.advantage][:, None, None].expand_as(ratio)  # same trajectory advantage on every transition
        surr = torch.minimum(ratio * adv, ratio.clamp(1 - self.clip_epsilon, 1 + self.clip_epsilon) * adv)
        in_obj = self.objective_mask(td)[:, None, :].expand_as(ratio)  # (B, S, N) bool
        if sde is not None:
            in_obj = in_obj & sde
        m = in_obj.to(ratio.dtype)
        n_obj = m.sum().clamp(min=1.0)  # no objective transition in this chunk: objective 0
        kl = gaussian_kl_same_std(loc, loc_ref, tr.sigma, tr.dt)  # (B, S, N), every generated transition
        listening = td[keys.token_mask].bool()[:, None, :].expand_as(kl)  # (B, S, N)
        loss_objective = -(surr * m).sum() / n_obj
        terms = {"loss_objective": loss_objective}
        if self.objective_tokens == "matched":  # speaking tokens on the speaking columns' advantage
            adv_s = td[keys.advantage_speaking][:, None, None].expand_as(ratio)
            surr_s = torch.minimum(ratio * adv_s, ratio.clamp(1 - self.clip_epsilon, 1 + self.clip_epsilon) * adv_s)
            m_s = self.speaking_objective_mask(td)[:, None, :].expand_as(ratio)  # (B, S, N)
            m_s = (m_s if sde is None else m_s & sde).to(ratio.dtype)
            terms["loss_objective_speaking"] = -self.speaking_objective_weight * (surr_s * m_s).sum() / m_s.sum().clamp(min=1.0)
        if self.beta_speaking == self.beta:
            loss_kl = self.beta * kl.mean()
        else:  # per-token weight: beta on listening tokens, beta_speaking on the others
            loss_kl = torch.where(listening, self.beta, self.beta_speaking).mul(kl).mean()
        lis = listening.to(kl.dtype)  # (B, S, N)
        n_lis = lis.sum().clamp(min=1.0)
        group_kl = {}
        for g, beta_g in self.group_kl_betas.items():  # the KL in each group's decoded-motion metric, on listening tokens
            kl_g = gaussian_kl_metric(loc, loc_ref, tr.sigma, tr.dt, getattr(self, f"group_kl_metric_{g}"))  # (B, S, N)
            group_kl[f"kl_{g}"] = (kl_g * lis).sum() / n_lis
            terms[f"loss_kl_{g}"] = beta_g * group_kl[f"kl_{g}"]
        with torch.no_grad():
            clipped = ((ratio - 1).abs() > self.clip_epsilon).to(ratio.dtype)
            r_max = torch.where(in_obj, ratio, torch.full_like(ratio, -math.inf)).amax()
            diag = {
                "kl": kl.mean(),
                "kl_listening": (kl * lis).sum() / n_lis,  # 0 without such transitions (weight 0)
                "kl_speaking": (kl * (1 - lis)).sum() / (1 - lis).sum().clamp(min=1.0),
                "clip_fraction": (clipped * m).sum() / n_obj,
                "ratio_mean": (ratio * m).sum() / n_obj,
                "ratio_max": torch.where(in_obj.any(), r_max, torch.full_like(r_max, math.nan)),
                "log_ratio_abs_mean": (log_ratio.abs() * m).sum() / n_obj,
                **{k: v.detach() for k, v in group_kl.items()},
            }
        return TensorDict({**terms, "loss_kl": loss_kl, **diag}, batch_size=[])


class GDPOLoss(GroupRelativeLoss):
    """Group reward-Decoupled normalisation (eq. 8-9), then the shared objective (eq. 10)."""


class GRPOLoss(GroupRelativeLoss):
    """Summed-then-normalised advantages (the GRPO baseline), then the shared objective."""

    decoupled = False

    def advantage_fn(self, rewards, group_ids, lambdas=None):
        lambdas = self.lambdas if lambdas is None else lambdas
        scale = self.shared_scale((rewards * lambdas).sum(-1, keepdim=True), group_ids)  # (1,) or None
        return grpo_advantages(rewards, group_ids, lambdas, eps=self.eps, whiten=self.whiten, eps_mode=self.eps_mode,
                               scale=scale)


LOSSES = {"gdpo": GDPOLoss, "grpo": GRPOLoss}
