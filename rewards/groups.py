"""FLAME-group rewards: terms -> one group's reward -> the reward vector over groups.

Three layers (docs/design.md section 6):

- a *term* (:mod:`.terms`) is a penalty ``(pred, target, mask) -> (B,)`` on one group's channels;
- :class:`GroupReward` composes weighted terms on one FLAME group: ``R_i = -sum_k w_k * term_k``;
- :class:`FlameReward` evaluates several groups and returns the reward *vector* ``(B, n_groups)``
  that GDPO normalises per group (``agents/advantages.py``), with weights ``lambdas`` (eq. 9).

Defined values, never NaN (document for the environment and the advantages):

- An entry ``(b, i)`` is *valid* when group ``i`` is valid for row ``b`` (the ``valid (B, 6)``
  mask of the dataset, a source lacking the group stores zeros there) AND row ``b`` has at least
  one listening frame. Invalid entries get reward exactly 0 and their group module is not even
  called on that row. :meth:`FlameReward.reward_valid` returns this ``(B, n_groups)`` mask and
  :meth:`FlameReward.compute` returns it alongside the rewards. All rollouts of one prompt share
  the target, mask and validity, so an invalid entry is 0 for the whole prompt group and gets
  zero advantage (zero std), i.e. it simply does not steer the update.
- A group module returning NaN/inf on a valid entry raises ``RuntimeError`` naming the module
  class and the group (a silent NaN would poison every advantage of the batch).

Default term weights (``DEFAULT_WEIGHTS``): ``var 1.0, vel 1.0, drift 0.25, mse 0.1``. The paper
says the reward "primarily emphasizes dynamics-aware statistics (variance and velocity variance)
rather than per-frame alignment", "using the mean and MSE anchors only to stabilize realism and
avoid degenerate drift", without giving numbers. Hence full weight on the two dynamics terms, a
quarter on mean drift (a pose offset is visible but should not dominate) and a tenth on MSE (a
per-frame error penalises exactly the one-to-many diversity we want to restore, so it is only a
weak grounding anchor). Note the terms are in the units of the FLAME channels and velocity stds
are per frame, so on slow motion ``vel`` is numerically smaller than ``var``; tune per dataset.

Specs: ``reward="expr+rot"`` (FLAME group names joined by ``+``), ``"jaw"``, ``"all"``.

Hold columns: ``<group>@hold`` (``reward="expr+rot+jaw@hold"``) scores a group on the listening frames
against a *reference* motion instead of the ground truth: in RL, the supervised model's own SDE
rollout of the same window, drawn once before training (``pipeline/rl.py`` ``attach_hold_reference``).
It holds a group the other columns do not reward near what the supervised model did with it, so an
unrewarded group does not drift along a latent direction nothing in the objective sees (the jaw under
an expr+rot reward, docs/benchmarks.md). Such a reward needs ``reference=(B, T, 67)`` (a clear error
otherwise); :func:`reward_kwargs` passes it only to rewards that score it.

Frames: a reward *column* scores one group on the actor's listening frames (``"jaw"``), or, named
``<group>@speaking`` (``reward="expr+rot+jaw@speaking"``), on its speaking frames: an anchor that
holds speaking motion (lip sync) the listening reward does not see. GDPO normalises it as its own
column like any other. The listening mask is the ``mask`` argument everywhere; a reward with
speaking columns also needs ``speaking=(B, T) bool`` (a clear error otherwise). Since the PPO
objective's default tokens are the listening ones, such a reward needs ``algo.objective_tokens=matched``
(speaking tokens trained on the speaking columns' advantage, ``agents/loss.py``) or ``all``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..envs.flame import FLAME_DIM, GROUP_DIMS, GROUP_NAMES, GROUPS, N_GROUPS
from .terms import MeanDriftTerm, MSETerm, VarianceTerm, VelocityVarianceTerm

__all__ = [
    "column_group",
    "is_speaking_column",
    "speaking_kwargs",
    "reward_kwargs",
    "COLUMN_FRAMES",
    "column_frame_key",
    "DEFAULT_WEIGHTS",
    "BUILTIN_TERMS",
    "GroupReward",
    "FlameReward",
    "parse_reward_spec",
    "build_reward",
]

DEFAULT_WEIGHTS: dict[str, float] = {"var": 1.0, "vel": 1.0, "drift": 0.25, "mse": 0.1}
BUILTIN_TERMS: dict[str, type[nn.Module]] = {
    "var": VarianceTerm,
    "vel": VelocityVarianceTerm,
    "drift": MeanDriftTerm,
    "mse": MSETerm,
}


# what a column scores: "listening" frames against the ground truth (``jaw``), "speaking" frames against the
# ground truth (``jaw@speaking``), or "hold": listening frames against a reference motion (``jaw@hold``)
COLUMN_FRAMES = ("listening", "speaking", "hold")


def column_group(column: str) -> tuple[str, str]:
    """Reward column name -> (FLAME group, kind): ``"jaw"`` -> ("jaw", "listening"),
    ``"jaw@speaking"`` -> ("jaw", "speaking"), ``"jaw@hold"`` -> ("jaw", "hold") (:data:`COLUMN_FRAMES`)."""
    group, sep, frames = column.partition("@")
    if not sep:
        return _check_group(group), "listening"
    if frames not in COLUMN_FRAMES[1:]:
        raise ValueError(f"reward column {column!r}: '@' must be followed by 'speaking' (the speaking frames) or "
                         f"'hold' (listening frames against the reference motion), e.g. 'jaw@speaking'; without '@' "
                         f"a group scores the listening frames against the ground truth")
    return _check_group(group), frames


def column_frame_key(kind: str) -> str:
    """The bank's frame mask a column kind scores: "speaking" for ``@speaking`` columns, else "listening"."""
    return "speaking" if kind == "speaking" else "listening"


def is_speaking_column(column: str) -> bool:
    """True for a ``<group>@speaking`` column (:func:`column_group`)."""
    return column_group(column)[1] == "speaking"


def speaking_kwargs(reward: nn.Module, speaking: torch.Tensor) -> dict:
    """``{"speaking": speaking}`` for a reward with speaking columns, ``{}`` otherwise: callers pass the
    speaking frames only to rewards that score them, so a user's listening-only reward module keeps
    the four-argument signature ``(pred, target, mask, valid)``."""
    return {"speaking": speaking} if getattr(reward, "scores_speaking", False) else {}


def reward_kwargs(reward: nn.Module, rows, reference: torch.Tensor | None = None) -> dict:
    """The keyword arguments ``reward`` takes beyond ``(pred, target, mask, valid)`` for bank ``rows``:
    ``speaking`` (``<group>@speaking`` columns) and ``reference`` (``<group>@hold`` columns: the given one,
    else the rows' ``reference_motion``, else a ValueError saying how to get one)."""
    kw = speaking_kwargs(reward, rows["speaking"])
    if getattr(reward, "scores_reference", False):
        if reference is None:
            if "reference_motion" not in rows.keys():
                raise ValueError(f"reward columns {reward.hold_columns} score against a reference motion, but the window "
                                 f"bank has no 'reference_motion' (pipeline.rl.attach_hold_reference draws the supervised "
                                 f"model's rollouts)")
            reference = rows["reference_motion"]
        kw["reference"] = reference
    return kw


def _check_group(group: str) -> str:
    if group not in GROUPS:
        raise ValueError(f"unknown FLAME group {group!r}; valid groups: {', '.join(GROUP_NAMES)}")
    return group


def _check_weight(what: str, w: Any) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {w!r}") from None
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {w}")
    return w


def _check_finite(out: Any, n_rows: int, module: nn.Module, group: str, what: str, inputs: torch.Tensor):
    """A module's output must be a finite ``(n_rows,)`` tensor; else a RuntimeError naming it."""
    name = type(module).__name__
    if not torch.is_tensor(out) or out.shape != (n_rows,):
        raise RuntimeError(f"{what} {name} on group {group!r} must return a tensor of shape ({n_rows},), "
                           f"got {getattr(out, 'shape', type(out))}")
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise RuntimeError(f"{what} {name} on group {group!r} returned NaN/inf for {bad} of {n_rows} rollouts "
                           f"(inputs finite: {bool(torch.isfinite(inputs).all())})")


class GroupReward(nn.Module):
    """Reward of one FLAME group: ``R = -sum_k w_k * term_k(pred_g, target_g, mask)``, shape ``(B,)``.

    group: a name of :data:`GROUP_NAMES`; terms: ``{name: (module, weight)}`` with weights finite
    and >= 0. ``forward`` takes full FLAME frames ``(B, T, 67)`` (sliced to the group here) or the
    group's own channels ``(B, T, C_g)``. A user's replacement class (``build_reward(group_reward=
    ...)``) takes the same constructor arguments and forward signature; ``penalties`` is optional
    (used for logging only).
    """

    def __init__(self, group: str, terms: Mapping[str, tuple[nn.Module, float]]):
        super().__init__()
        self.group = _check_group(group)
        if not terms:
            raise ValueError(f"GroupReward({group!r}) needs at least one term")
        modules, weights = {}, {}
        for name, spec in terms.items():
            if not isinstance(name, str) or not name or "/" in name or "." in name:
                raise ValueError(f"GroupReward({group!r}): bad term name {name!r} (non-empty, no '/' or '.')")
            try:
                module, weight = spec
            except (TypeError, ValueError):
                raise ValueError(f"GroupReward({group!r}): term {name!r} must be (module, weight), got {spec!r}") from None
            if not isinstance(module, nn.Module):
                raise TypeError(f"GroupReward({group!r}): term {name!r} must be an nn.Module, got {type(module).__name__}")
            modules[name] = module
            weights[name] = _check_weight(f"weight of term {name!r} in group {group!r}", weight)
        self.terms = nn.ModuleDict(modules)
        self.weights: dict[str, float] = weights

    def _slice(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == FLAME_DIM:
            return x[..., GROUPS[self.group]]
        if x.shape[-1] == GROUP_DIMS[self.group]:
            return x
        raise ValueError(f"GroupReward({self.group!r}) expects (B, T, {FLAME_DIM}) FLAME frames or "
                         f"(B, T, {GROUP_DIMS[self.group]}) group channels, got {tuple(x.shape)}")

    def penalties(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted penalty of every term, ``{name: (B,)}``."""
        p, g = self._slice(pred), self._slice(target)  # (B, T, C_g)
        out = {}
        for name, term in self.terms.items():
            v = term(p, g, mask)
            _check_finite(v, p.shape[0], term, self.group, f"reward term {name!r}", p)
            out[name] = v
        return out

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pen = self.penalties(pred, target, mask)
        return -sum(self.weights[k] * v for k, v in pen.items())  # (B,)

    def extra_repr(self) -> str:
        return f"group={self.group!r}, weights={self.weights}"


class FlameReward(nn.Module):
    """Reward vector over FLAME groups: ``forward(pred, target, mask, valid) -> (B, n_groups)``.

    pred, target: ``(B, T, 67)`` FLAME frames (extra leading batch dims are allowed);
    mask: ``(B, T)`` bool, the frames that count (the actor's listening frames);
    valid: ``(B, 6)`` bool per-group validity in :data:`GROUP_NAMES` order (None = all valid);
    speaking: ``(B, T)`` bool, the actor's speaking frames, needed only by ``<group>@speaking`` columns;
    reference: ``(B, T, 67)`` the motion ``<group>@hold`` columns score against (needed only by them).
    Invalid entries (invalid group or no frame to score) are 0, see the module docstring.

    group_rewards: a list of GroupReward-like modules (each with a ``.group`` name; listening
    columns) or a dict ``{column: module}`` with columns ``"<group>"`` or ``"<group>@speaking"``;
    the reward columns follow its order (``group_names``, frames in ``column_frames``).
    lambdas: per-group weights of eq. 9 (sequence in column order, dict by name, or None = 1.0
    each); finite, >= 0, not all zero; stored as the buffer ``lambdas (n_groups,)``.
    """

    def __init__(self, group_rewards: Sequence[nn.Module] | Mapping[str, nn.Module],
                 lambdas: Sequence[float] | Mapping[str, float] | torch.Tensor | None = None):
        super().__init__()
        if isinstance(group_rewards, Mapping):
            names, modules = list(group_rewards.keys()), list(group_rewards.values())
            for n, m in zip(names, modules):
                g = getattr(m, "group", column_group(n)[0])
                if g != column_group(n)[0]:
                    raise ValueError(f"FlameReward: module under key {n!r} scores group {g!r}")
        else:
            modules = list(group_rewards)
            names = []
            for m in modules:
                if not isinstance(getattr(m, "group", None), str):
                    raise ValueError(f"FlameReward: {type(m).__name__} has no .group name; pass a dict {{group: module}}")
                names.append(m.group)
        if not names:
            raise ValueError("FlameReward needs at least one group reward")
        columns = [column_group(n) for n in names]
        if len(set(names)) != len(names):
            raise ValueError(f"FlameReward: duplicate groups in {names}")
        for n, m in zip(names, modules):
            if not isinstance(m, nn.Module):
                raise TypeError(f"FlameReward: reward of group {n!r} must be an nn.Module, got {type(m).__name__}")
        self.group_names: tuple[str, ...] = tuple(names)  # column names, e.g. ("expr", "rot", "jaw@speaking")
        self.column_frames: tuple[str, ...] = tuple(f for _, f in columns)  # COLUMN_FRAMES kind per column
        self.groups = nn.ModuleDict(dict(zip(names, modules)))
        self.register_buffer("lambdas", _lambda_vector(lambdas, self.group_names))
        # column i scores FLAME group flame_index[i] (position in GROUP_NAMES)
        self.register_buffer("flame_index", torch.tensor([GROUP_NAMES.index(g) for g, _ in columns]), persistent=False)

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    @property
    def speaking_columns(self) -> list[str]:
        """The columns that score speaking frames (``<group>@speaking``), in column order."""
        return [n for n, f in zip(self.group_names, self.column_frames) if f == "speaking"]

    @property
    def scores_speaking(self) -> bool:
        """True when a column scores speaking frames (callers must pass ``speaking``)."""
        return bool(self.speaking_columns)

    @property
    def hold_columns(self) -> list[str]:
        """The columns that score against the reference motion (``<group>@hold``), in column order."""
        return [n for n, f in zip(self.group_names, self.column_frames) if f == "hold"]

    @property
    def scores_reference(self) -> bool:
        """True when a column scores against a reference motion (callers must pass ``reference``)."""
        return bool(self.hold_columns)

    def column_masks(self, mask: torch.Tensor, speaking: torch.Tensor | None) -> list[torch.Tensor]:
        """The ``(..., T)`` bool frame mask of every column (listening ``mask`` or ``speaking``)."""
        if self.scores_speaking and speaking is None:
            cols = self.speaking_columns
            raise ValueError(f"FlameReward: columns {cols} score speaking frames: pass speaking=(B, T) bool "
                             f"(the actor's speaking frames)")
        if speaking is not None and speaking.shape != mask.shape:
            raise ValueError(f"FlameReward: speaking mask {tuple(speaking.shape)} != listening mask {tuple(mask.shape)}")
        as_bool = lambda m: m if m.dtype == torch.bool else m != 0  # noqa: E731
        return [as_bool(speaking if f == "speaking" else mask) for f in self.column_frames]

    def column_targets(self, target: torch.Tensor, reference: torch.Tensor | None) -> list[torch.Tensor]:
        """The motion every column scores against: the ground truth, or ``reference`` for ``@hold`` columns."""
        if self.scores_reference:
            if reference is None:
                raise ValueError(f"FlameReward: columns {self.hold_columns} score against a reference motion: pass "
                                 f"reference=(B, T, {FLAME_DIM}) (e.g. the supervised model's rollout of the window)")
            if reference.shape != target.shape:
                raise ValueError(f"FlameReward: reference shape {tuple(reference.shape)} != target shape {tuple(target.shape)}")
        return [reference if f == "hold" else target for f in self.column_frames]

    def _prepare(self, pred, target, mask, valid):
        """Check shapes, flatten leading batch dims: returns (pred, target, mask, valid, lead)."""
        if pred.dim() < 3 or pred.shape[-1] != FLAME_DIM:
            raise ValueError(f"FlameReward: pred must be (B, T, {FLAME_DIM}), got {tuple(pred.shape)}")
        if target.shape != pred.shape:
            raise ValueError(f"FlameReward: target shape {tuple(target.shape)} != pred shape {tuple(pred.shape)}")
        lead, T = pred.shape[:-2], pred.shape[-2]
        if mask.shape != pred.shape[:-1]:
            raise ValueError(f"FlameReward: mask must be {tuple(pred.shape[:-1])}, got {tuple(mask.shape)}")
        if valid is None:
            valid = torch.ones(*lead, N_GROUPS, dtype=torch.bool, device=pred.device)
        if valid.shape != (*lead, N_GROUPS):
            raise ValueError(f"FlameReward: valid must be {(*lead, N_GROUPS)} (groups in order {GROUP_NAMES}), "
                             f"got {tuple(valid.shape)}")
        mask = mask if mask.dtype == torch.bool else mask != 0
        valid = valid if valid.dtype == torch.bool else valid != 0
        B = math.prod(lead)
        return (pred.reshape(B, T, FLAME_DIM), target.reshape(B, T, FLAME_DIM), mask.reshape(B, T),
                valid.reshape(B, N_GROUPS), lead)

    def reward_valid(self, mask: torch.Tensor, valid: torch.Tensor | None = None,
                     speaking: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, n_groups)`` bool: group valid for the row AND the row has >= 1 frame the column scores
        (listening frames, or speaking frames for ``<group>@speaking`` columns)."""
        return self._column_valid(self.column_masks(mask, speaking), valid)

    def _column_valid(self, masks: list[torch.Tensor], valid: torch.Tensor | None) -> torch.Tensor:
        """``(..., n_groups)``: the column's group is valid and its frame mask (``masks[i]``) not empty."""
        has_frames = torch.stack([m.any(-1) for m in masks], -1)  # (..., n)
        if valid is None:
            return has_frames
        valid = valid if valid.dtype == torch.bool else valid != 0
        return valid[..., self.flame_index.to(valid.device)] & has_frames

    def compute(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                valid: torch.Tensor | None = None, with_terms: bool = False,
                speaking: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> dict[str, Any]:
        """Rewards with their validity, optionally the per-term penalties.

        Returns ``{"reward": (B, n_groups), "valid": (B, n_groups) bool}`` and, with
        ``with_terms``, ``"terms": {"reward/<column>/<term>": (B,)}`` (penalties, unweighted, 0 on
        invalid entries; only for group modules that have a ``penalties`` method).
        """
        masks = self.column_masks(mask, speaking)
        targets = self.column_targets(target, reference)
        pred, target, _, valid, lead = self._prepare(pred, target, mask, valid)
        masks = [m.reshape(pred.shape[:2]) for m in masks]  # (B, T) per column
        targets = [g.reshape(pred.shape) for g in targets]  # (B, T, 67) per column
        ok = self._column_valid(masks, valid)  # (B, n)
        B = pred.shape[0]
        reward = pred.new_zeros(B, self.n_groups)
        terms: dict[str, torch.Tensor] = {}
        for i, (name, module) in enumerate(self.groups.items()):
            rows, m, sl = ok[:, i], masks[i], GROUPS[GROUP_NAMES[int(self.flame_index[i])]]
            tgt = targets[i]  # the ground truth, or the reference for a hold column
            n_rows = int(rows.sum())
            if n_rows == 0:
                pass
            elif n_rows == B:  # common case: no gather/scatter
                r = module(pred, tgt, m)
                _check_finite(r, B, module, name, "group reward", pred[..., sl])
                reward[:, i] = r
            else:
                p_r = pred[rows]
                r = module(p_r, tgt[rows], m[rows])
                _check_finite(r, n_rows, module, name, "group reward", p_r[..., sl])
                reward[rows, i] = r.to(reward.dtype)
            if with_terms and hasattr(module, "penalties"):
                for term, v in self._penalties(module, pred, tgt, m, rows, n_rows).items():
                    terms[f"reward/{name}/{term}"] = v.reshape(*lead, *v.shape[1:])
        out: dict[str, Any] = {"reward": reward.reshape(*lead, self.n_groups), "valid": ok.reshape(*lead, self.n_groups)}
        if with_terms:
            out["terms"] = terms
        return out

    @staticmethod
    def _penalties(module, pred, target, mask, rows, n_rows) -> dict[str, torch.Tensor]:
        B = pred.shape[0]
        if n_rows == 0:
            names = list(getattr(module, "terms", {}).keys())
            return {k: pred.new_zeros(B) for k in names}
        if n_rows == B:
            return dict(module.penalties(pred, target, mask))
        out = {}
        for k, v in module.penalties(pred[rows], target[rows], mask[rows]).items():
            full = pred.new_zeros(B)
            full[rows] = v.to(full.dtype)
            out[k] = full
        return out

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                valid: torch.Tensor | None = None, speaking: torch.Tensor | None = None,
                reference: torch.Tensor | None = None) -> torch.Tensor:
        return self.compute(pred, target, mask, valid, speaking=speaking, reference=reference)["reward"]  # (B, n_groups)

    def term_values(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                    valid: torch.Tensor | None = None, reduce: str = "mean",
                    speaking: torch.Tensor | None = None, reference: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-column per-term penalties for logging, keys ``reward/<column>/<term>`` (e.g. ``reward/expr/var``).

        reduce="mean": 0-d tensors, the mean over valid rows of that group (0 if none is valid);
        reduce="none": ``(B,)`` tensors with 0 on invalid entries (use ``compute(...)["valid"]``).
        Tensors are returned (no ``.item()``); the logger converts.
        """
        if reduce not in ("mean", "none"):
            raise ValueError(f"term_values: reduce must be 'mean' or 'none', got {reduce!r}")
        out = self.compute(pred, target, mask, valid, with_terms=True, speaking=speaking, reference=reference)
        if reduce == "none":
            return out["terms"]
        ok = out["valid"].reshape(-1, self.n_groups)
        res = {}
        for key, v in out["terms"].items():
            col = ok[:, self.group_names.index(key.split("/")[1])].to(v.dtype)  # (B,)
            res[key] = (v.reshape(-1) * col).sum() / col.sum().clamp(min=1)
        return res

    def extra_repr(self) -> str:
        return f"groups={self.group_names}, lambdas={self.lambdas.tolist()}"


def _lambda_vector(lambdas, names: Sequence[str]) -> torch.Tensor:
    """``(n,)`` float32 lambdas in column order, validated."""
    if lambdas is None:
        vals = [1.0] * len(names)
    elif isinstance(lambdas, Mapping):
        unknown = [k for k in lambdas if k not in names]
        if unknown:
            raise ValueError(f"lambdas given for groups not in the reward: {unknown}; reward groups: {list(names)}")
        vals = [lambdas.get(n, 1.0) for n in names]
    else:
        vals = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1).tolist()
        if len(vals) != len(names):
            raise ValueError(f"lambdas must have one entry per group {list(names)}, got {len(vals)}")
    vals = [_check_weight(f"lambda of group {n!r}", v) for n, v in zip(names, vals)]
    if all(v == 0 for v in vals):
        raise ValueError(f"lambdas must not all be zero (groups {list(names)})")
    return torch.tensor(vals, dtype=torch.float32)


def parse_reward_spec(spec: str | Sequence[str]) -> list[str]:
    """``"expr+rot"`` -> ``["expr", "rot"]``; ``"all"`` -> every group; ``"expr+jaw@speaking"`` ->
    ``["expr", "jaw@speaking"]`` (the jaw scored on the speaking frames, see the module docstring).

    ``"expr+rot+jaw@hold"`` -> ``["expr", "rot", "jaw@hold"]`` (the jaw held near the reference motion).
    Whitespace around names is ignored; the result is in FLAME order (:data:`GROUP_NAMES`), listening
    columns first, then speaking, then hold columns, so ``"rot+expr"`` and ``"expr+rot"`` are the same
    reward. ``"all"`` (every group on listening frames), ``"all@speaking"`` and ``"all@hold"`` expand;
    ``"all"`` combines with ``@`` columns only. A
    list/tuple of names is accepted too. Unknown, empty or duplicate names raise ``ValueError``.
    """
    valid = (f"valid groups: {', '.join(GROUP_NAMES)} (joined by '+'), or 'all'; "
             f"'<group>@speaking' scores a group on the speaking frames, '<group>@hold' against the reference motion")
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split("+")]
    elif isinstance(spec, Sequence) and all(isinstance(p, str) for p in spec):
        parts = [p.strip() for p in spec]
    else:
        raise ValueError(f"reward spec must be a string like 'expr+rot', got {spec!r}; {valid}")
    if not spec or all(not p for p in parts):
        raise ValueError(f"empty reward spec {spec!r}; {valid}")
    if any(not p for p in parts):
        raise ValueError(f"empty group name in reward spec {spec!r}; {valid}")
    expanded: list[str] = []
    for p in parts:
        group, sep, frames = p.partition("@")
        if group == "all":
            if not sep and any("@" not in q for q in parts if q != p):
                raise ValueError(f"'all' cannot be combined with other listening groups in reward spec {spec!r}")
            expanded += [g + sep + frames for g in GROUP_NAMES]
        else:
            expanded.append(p)
    unknown = [p for p in expanded if p.partition("@")[0] not in GROUPS]
    if unknown:
        raise ValueError(f"unknown FLAME group(s) {unknown} in reward spec {spec!r}; {valid}")
    for p in expanded:
        column_group(p)  # '@' followed by anything but 'speaking' -> ValueError naming it
    dup = sorted({p for p in expanded if expanded.count(p) > 1})
    if dup:
        raise ValueError(f"duplicate group(s) {dup} in reward spec {spec!r}")
    return [g + suffix for suffix in ("", "@speaking", "@hold") for g in GROUP_NAMES if g + suffix in expanded]


def _plain(x):
    """OmegaConf containers -> plain Python (Hydra passes DictConfig)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra-core depends on omegaconf
        return x
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def _load_class(path: Any, what: str) -> type:
    """A class given as itself or by dotted path (``hydra.utils.get_class``)."""
    if isinstance(path, type):
        return path
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what}: expected a dotted path 'package.module.Class', got {path!r}")
    from hydra.utils import get_class

    try:
        return get_class(path)
    except Exception as e:  # ImportError / ValueError from hydra, with its own explanation
        raise ValueError(f"{what}: cannot load class {path!r}: {e}") from e


def _split_target(spec: Any, what: str) -> tuple[Any, dict]:
    """``"a.b.C"`` or ``{"target"|"_target_": "a.b.C", **kwargs}`` -> (target, kwargs)."""
    spec = _plain(spec)
    if isinstance(spec, (str, type)):
        return spec, {}
    if isinstance(spec, Mapping):
        kw = dict(spec)
        keys = [k for k in ("target", "_target_") if k in kw]
        if len(keys) != 1:
            raise ValueError(f"{what}: needs exactly one of 'target'/'_target_' (a dotted path), got keys {list(kw)}")
        return kw.pop(keys[0]), kw
    raise ValueError(f"{what}: expected a dotted path or a dict with 'target', got {spec!r}")


def build_reward(spec: str | Sequence[str] = "expr+rot",
                 weights: Mapping[str, float] | None = None,
                 lambdas: Mapping[str, float] | None = None,
                 group_reward: str | Mapping[str, Any] | type | None = None,
                 extra_terms: Mapping[str, Mapping[str, Any]] | None = None) -> FlameReward:
    """Build the :class:`FlameReward` of a config.

    spec: groups, see :func:`parse_reward_spec`.
    weights: term weights merged over :data:`DEFAULT_WEIGHTS` (keys ``var vel drift mse``);
      finite, >= 0, not all zero (counting extra terms); a zero-weight term is left out.
    lambdas: ``{group: lambda}`` (missing groups 1.0); only groups of ``spec``; >= 0, not all 0.
    group_reward: dotted path (or ``{"target": path, **kwargs}``) of a GroupReward-like class,
      constructed per group as ``cls(group=name, terms={name: (module, weight)}, **kwargs)``.
    extra_terms: ``{name: {"target": dotted path, "weight": w, **kwargs}}``: the user's own term
      class, constructed per group as ``cls(**kwargs)``, added to every group, e.g.
      ``{"jerk": {"target": "gdpo_listener.rewards.examples.JerkTerm", "weight": 0.5}}``.
    """
    groups = parse_reward_spec(spec)
    w = dict(DEFAULT_WEIGHTS)
    for k, v in (_plain(weights) or {}).items():
        if k not in BUILTIN_TERMS:
            raise ValueError(f"unknown reward weight {k!r}; built-in terms: {', '.join(BUILTIN_TERMS)} "
                             f"(add your own with extra_terms)")
        w[k] = _check_weight(f"reward weight {k!r}", v)

    extras = {}
    for name, espec in (_plain(extra_terms) or {}).items():
        what = f"extra reward term {name!r}"
        if name in BUILTIN_TERMS:
            raise ValueError(f"{what} clashes with a built-in term name ({', '.join(BUILTIN_TERMS)})")
        if not isinstance(espec, Mapping) or "weight" not in espec:
            raise ValueError(f"{what} must be a dict {{'target': 'pkg.module.Class', 'weight': w, ...kwargs}}, "
                             f"got {espec!r}")
        espec = dict(espec)
        ew = _check_weight(f"weight of {what}", espec.pop("weight"))
        target, kwargs = _split_target(espec, what)
        extras[name] = (_load_class(target, what), kwargs, ew)

    if all(v == 0 for v in w.values()) and all(e[2] == 0 for e in extras.values()):
        raise ValueError(f"all reward term weights are zero ({w}); at least one must be > 0")

    if group_reward is None:
        gcls, gkw = GroupReward, {}
    else:
        target, gkw = _split_target(group_reward, "group_reward")
        gcls = _load_class(target, "group_reward")

    modules = []
    for g in groups:
        terms: dict[str, tuple[nn.Module, float]] = {k: (BUILTIN_TERMS[k](), v) for k, v in w.items() if v > 0}
        for name, (cls, kwargs, ew) in extras.items():
            if ew == 0:
                continue
            try:
                module = cls(**kwargs)
            except TypeError as e:
                raise ValueError(f"extra reward term {name!r}: cannot construct {cls.__name__}(**{kwargs}): {e}") from e
            if not isinstance(module, nn.Module):
                raise TypeError(f"extra reward term {name!r}: {cls.__name__} is not an nn.Module")
            terms[name] = (module, ew)
        module = gcls(group=column_group(g)[0], terms=terms, **gkw)
        if not isinstance(module, nn.Module):
            raise TypeError(f"group_reward {gcls.__name__} is not an nn.Module")
        modules.append(module)
    return FlameReward(dict(zip(groups, modules)), _plain(lambdas))
