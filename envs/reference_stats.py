"""Reference statistics of real conversational FLAME motion, and the same statistics of a dataset.

Source of the reference figures: issue 10 ("A faithful testbed"), table "per-group statistics in
raw FLAME units, mean over channels", *measured on real DualTalk conversations, tracker FLAME,
25 fps, with this project's converter* (on clips that are not in this repository). DualTalk has
no eyelid, eyepose or separate neck, so only ``expr``, ``jaw`` and ``rot`` have reference figures.

Conventions (written once; :func:`side_statistics` implements them). They reproduce the issue's
figures for the old synthetic corpus (``SYNTHETIC_V1``) to within about 10 %, which is how they
were chosen:

- raw FLAME units (no normalisation); one *side* of a conversation (its whole sequence) at a time;
- speaking frames = own VAD; listening frames = partner VAD and not own VAD (docs/design.md section 2);
- position std of a channel: population std over the side's frames of the role;
- velocity std of a channel: population std of the frame differences ``x[t+1] - x[t]`` over the
  pairs whose *both* frames are in the role (a turn boundary never makes a jump), as in
  ``rewards.stats.velocity_std``;
- a group's figure: mean over its channels, then mean over the sides that have motion, a valid
  group and at least ``MIN_FRAMES`` frames of the role;
- listening / speaking ratio: listening velocity std / speaking velocity std (group figures);
- partner tie: per side, Pearson correlation over all frames of the partner's VAD at frame
  ``t + 1`` with the own head speed ``|rot[t+1] - rot[t]|`` (L2 over the 3 rotation channels),
  mean over sides;
- expression blocks: per channel, position and velocity std over *all* frames of the side, mean
  over sides, then mean within each block of ten channels 0-9, ..., 40-49.

Public API::

    REFERENCE, REFERENCE_PARTNER_TIE, REFERENCE_EXPR_BLOCKS, SYNTHETIC_V1, TOLERANCE, FIGURES
    side_statistics(motion, own_vad, partner_vad, group_valid=None) -> dict
    corpus_statistics(root_or_conversations, splits=("train", "test")) -> dict
    compare(stats, tolerance=TOLERANCE) -> list[dict]      one row per (figure, group) with a reference
    format_table(stats, tolerance=TOLERANCE) -> str         corpus vs reference side by side
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

from .dataset import WINDOW
from .flame import GROUP_NAMES, GROUPS

SOURCE = ("issue 10: measured on real DualTalk conversations, tracker FLAME, 25 fps, with this "
          "project's converter (raw FLAME units, mean over channels)")

# figure keys, in table order, with their printed names
FIGURES: dict[str, str] = {
    "listen_vel": "velocity std, listening frames",
    "speak_vel": "velocity std, speaking frames",
    "listen_pos": "position std, listening frames",
    "ratio": "listening / speaking velocity std",
}

REFERENCE: dict[str, dict[str, float]] = {  # real DualTalk (SOURCE)
    "expr": {"listen_vel": 0.092, "speak_vel": 0.213, "listen_pos": 0.33, "ratio": 0.43},
    "jaw": {"listen_vel": 0.0032, "speak_vel": 0.0126, "listen_pos": 0.012, "ratio": 0.25},
    "rot": {"listen_vel": 0.0038, "speak_vel": 0.0103, "listen_pos": 0.017, "ratio": 0.37},
}
REFERENCE_PARTNER_TIE = -0.07  # correlation of partner VAD with own head speed (real DualTalk)
# every block of ten expression channels 0-49 lies in these ranges on real DualTalk (no decay)
REFERENCE_EXPR_BLOCKS = {"position": (0.30, 0.64), "velocity": (0.12, 0.25)}

# the synthetic corpus version 1, as measured in issue 10 (for the record and the convention test)
SYNTHETIC_V1: dict[str, dict[str, float]] = {
    "expr": {"listen_vel": 0.0045, "speak_vel": 0.011, "listen_pos": 0.079, "ratio": 0.40},
    "jaw": {"listen_vel": 0.0014, "speak_vel": 0.0104, "listen_pos": 0.0042, "ratio": 0.13},
    "rot": {"listen_vel": 0.0024, "speak_vel": 0.0029, "listen_pos": 0.038, "ratio": 0.82},
}
SYNTHETIC_V1_PARTNER_TIE = -0.15

TOLERANCE = 1.5  # a corpus figure is "within tolerance" if corpus / reference lies in [1/1.5, 1.5]
MIN_FRAMES = 10  # a side contributes to a role's figures only with at least this many frames of it
N_EXPR_BLOCKS = 5


def _role_std(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-channel (position std, velocity std) of ``x (T, C)`` over ``mask (T,)`` frames.

    None where the role has fewer than ``MIN_FRAMES`` frames (or fewer than 2 velocity pairs).
    """
    if mask.sum() < MIN_FRAMES:
        return None, None
    pos = x[mask].std(0)  # (C,)
    pair = mask[1:] & mask[:-1]  # (T-1,)
    vel = np.diff(x, axis=0)[pair].std(0) if pair.sum() >= 2 else None  # (C,)
    return pos, vel


def side_statistics(motion: np.ndarray, own_vad: np.ndarray, partner_vad: np.ndarray,
                    group_valid: Sequence[bool] | None = None) -> dict:
    """Statistics of one side: ``motion (T, 67)`` raw FLAME, ``own_vad``/``partner_vad (T,)`` bool.

    Returns ``{"groups": {g: {"listen_vel", "speak_vel", "listen_pos", "speak_pos": float | None}},
    "partner_tie": float | None, "expr_pos": (50,), "expr_vel": (50,)}`` (channel means per group;
    None where the role has too few frames or the group is invalid).
    """
    x = np.asarray(motion, dtype=np.float64)
    own, ptn = np.asarray(own_vad, dtype=bool), np.asarray(partner_vad, dtype=bool)
    if x.ndim != 2 or x.shape[1] != 67 or own.shape != (x.shape[0],) or ptn.shape != own.shape:
        raise ValueError(f"side_statistics: need motion (T, 67) and two (T,) VAD masks, got {x.shape}, "
                         f"{own.shape}, {ptn.shape}")
    valid = np.ones(len(GROUP_NAMES), bool) if group_valid is None else np.asarray(group_valid, bool)
    roles = {"speak": own, "listen": ptn & ~own}
    groups = {}
    for gi, g in enumerate(GROUP_NAMES):
        row = dict.fromkeys(("listen_vel", "speak_vel", "listen_pos", "speak_pos"))
        if valid[gi]:
            for role, mask in roles.items():
                pos, vel = _role_std(x[:, GROUPS[g]], mask)
                row[f"{role}_pos"] = None if pos is None else float(pos.mean())
                row[f"{role}_vel"] = None if vel is None else float(vel.mean())
        groups[g] = row
    speed = np.linalg.norm(np.diff(x[:, GROUPS["rot"]], axis=0), axis=1)  # (T-1,)
    pv = ptn[1:].astype(np.float64)
    tie = None
    if valid[GROUP_NAMES.index("rot")] and speed.std() > 0 and pv.std() > 0:
        tie = float(np.corrcoef(pv, speed)[0, 1])
    e = x[:, GROUPS["expr"]]
    return {"groups": groups, "partner_tie": tie, "expr_pos": e.std(0), "expr_vel": np.diff(e, axis=0).std(0)}


def _mean(values: Iterable) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _conversations(source, splits: Sequence[str]):
    if isinstance(source, (str, os.PathLike)):
        from .dataset import load_conversation, read_split

        for split in splits:
            for cid in read_split(source, split):
                yield load_conversation(source, cid, audio=False)
    else:
        yield from source


def corpus_statistics(source, splits: Sequence[str] = ("train", "test")) -> dict:
    """The statistics of a whole dataset (a canonical dataset folder or an iterable of
    :class:`~.dataset.Conversation`): every side with motion counts once (conventions above).

    Returns ``{"groups": {g: {"listen_vel", "speak_vel", "listen_pos", "speak_pos", "ratio"}},
    "partner_tie", "expr_blocks": {"position": [5], "velocity": [5]}, "sides": int,
    "empty_text_share": float}``.
    """
    sides, n_text, n_empty = [], 0, 0
    for conv in _conversations(source, splits):
        for s in range(2):
            if not conv.has_motion[s]:
                continue
            sides.append(side_statistics(conv.motion[s], conv.vad[s], conv.vad[1 - s], conv.group_valid[s]))
            texts = list(conv.text[s]) + [""] * max(conv.n_frames // WINDOW - len(conv.text[s]), 0)  # missing = ""
            n_text += len(texts)
            n_empty += sum(not t.strip() for t in texts)
    if not sides:
        raise ValueError("corpus_statistics: no side with motion in the dataset")
    groups = {}
    for g in GROUP_NAMES:
        row = {k: _mean(st["groups"][g][k] for st in sides) for k in ("listen_vel", "speak_vel", "listen_pos", "speak_pos")}
        row["ratio"] = (row["listen_vel"] / row["speak_vel"]) if row["listen_vel"] is not None and row["speak_vel"] else None
        groups[g] = row
    expr_pos = np.mean([st["expr_pos"] for st in sides], 0)  # (50,)
    expr_vel = np.mean([st["expr_vel"] for st in sides], 0)  # (50,)
    return {
        "groups": groups,
        "partner_tie": _mean(st["partner_tie"] for st in sides),
        "expr_blocks": {"position": expr_pos.reshape(N_EXPR_BLOCKS, -1).mean(1).tolist(),
                        "velocity": expr_vel.reshape(N_EXPR_BLOCKS, -1).mean(1).tolist()},
        "sides": len(sides),
        "empty_text_share": n_empty / max(n_text, 1),
    }


def compare(stats: dict, tolerance: float = TOLERANCE) -> list[dict]:
    """One row per (figure, group) that has a reference: corpus value, reference, the factor
    ``corpus / reference`` and ``ok`` (factor within ``[1/tolerance, tolerance]``)."""
    rows = []
    for fig in FIGURES:
        for g, ref in REFERENCE.items():
            val = stats["groups"][g][fig]
            factor = None if val is None else val / ref[fig]
            rows.append({"figure": fig, "group": g, "corpus": val, "reference": ref[fig], "factor": factor,
                         "ok": factor is not None and 1 / tolerance <= factor <= tolerance})
    return rows


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def format_table(stats: dict, tolerance: float = TOLERANCE) -> str:
    """Corpus vs reference, side by side (Markdown table), plus the figures without a reference."""
    lines = [f"corpus vs reference ({SOURCE}); ok = within a factor {tolerance:g}",
             "| figure | group | corpus | reference | factor | ok |", "| --- | --- | --- | --- | --- | --- |"]
    for r in compare(stats, tolerance):
        lines.append(f"| {FIGURES[r['figure']]} | {r['group']} | {_fmt(r['corpus'])} | {r['reference']:g} | "
                     f"{_fmt(r['factor'])} | {'yes' if r['ok'] else 'NO'} |")
    lines.append(f"| partner VAD vs own head speed, corr. | rot | {_fmt(stats['partner_tie'])} | {REFERENCE_PARTNER_TIE:g} | | |")
    for kind, (lo, hi) in REFERENCE_EXPR_BLOCKS.items():
        vals = stats["expr_blocks"][kind]
        ok = all(lo <= v <= hi for v in vals)
        lines.append(f"| expr {kind} std per block of 10 channels | expr | {' '.join(_fmt(v) for v in vals)} | "
                     f"{lo:g}-{hi:g} | | {'yes' if ok else 'NO'} |")
    others = [g for g in GROUP_NAMES if g not in REFERENCE]
    lines.append("no reference (DualTalk lacks them): " + "; ".join(
        f"{g}: " + ", ".join(f"{k} {_fmt(stats['groups'][g][k])}" for k in FIGURES) for g in others))
    lines.append(f"empty text share {stats['empty_text_share']:.3f} over {stats['sides']} sides")
    return "\n".join(lines)
