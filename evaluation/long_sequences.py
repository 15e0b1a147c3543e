"""Long-sequence check (paper 4.3): does sliding-window generation decay into stillness?

Per FLAME group, the velocity std is measured on consecutive segments of generated and
ground-truth motion (:func:`.metrics.stillness_profile`); the *decay* is the mean over the last
``1 / parts`` of the segments divided by the mean over the first ``1 / parts``
(:func:`.metrics.decay_ratio`; 1 = as lively at the end as at the start). The check passes when,
for every group, the generated decay is at least ``tolerance`` times the ground truth's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..envs.dataset import DyadicWindows
from ..envs.flame import FPS
from ..envs.windows import build_window_bank
from .metrics import decay_ratio, stillness_profile


def long_sequence_bank(root: Path, frames: int, features, vae, normalizer, device):
    """Every ``frames``-frame sequence (both roles, train and test splits) of the dataset at ``root``,
    as one bank of long rows."""
    banks = []
    for split in ("train", "test"):
        windows = DyadicWindows(root, split, load_audio=False, window=int(frames))
        if len(windows):
            banks.append(build_window_bank(windows, features, vae, normalizer, device=device))
    if not banks:
        raise ValueError(f"long_data {root} has no conversation of frames={frames} frames "
                         f"({frames / FPS:.0f} s); raise long_data.seconds or lower frames")
    return torch.cat(banks)


def decay_table(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, segment: int, parts: int) -> dict:
    """Per group: velocity-std profiles over ``segment``-frame segments of ``pred`` and ``gt``
    ``(B, T, 67)``, their decays, the generated / ground-truth decay and level ratios."""
    prof_pred, prof_gt = stillness_profile(pred, segment, valid), stillness_profile(gt, segment, valid)
    table = {}
    for g in prof_gt:
        dp, dg = decay_ratio(prof_pred[g], parts), decay_ratio(prof_gt[g], parts)
        table[g] = {"pred_profile": prof_pred[g].tolist(), "gt_profile": prof_gt[g].tolist(), "pred_decay": dp,
                    "gt_decay": dg, "relative_decay": dp / dg, "level_ratio": float(prof_pred[g].mean() / prof_gt[g].mean())}
    return table


def decay_passes(table: dict, tolerance: float) -> bool:
    """True when every group's generated decay is >= ``tolerance`` x the ground truth's."""
    return all(r["relative_decay"] >= tolerance for r in table.values())


def format_decay_table(table: dict, tolerance: float, n_rows: int, frames: int, segment: int, parts: int = 3) -> str:
    """The printed table: per group, first / last part means of both profiles, decays and ratios."""
    lines = [f"== long generation: {n_rows} sequences x {frames} frames ({frames / FPS:.0f} s), velocity std per "
             f"{segment / FPS:.0f} s segment ==",
             f"{'group':8s} {'gt first':>9s} {'gt last':>9s} {'gt decay':>9s} {'gen first':>10s} {'gen last':>9s} "
             f"{'gen decay':>10s} {'gen/gt decay':>13s} {'gen/gt level':>13s}"]
    for g, r in table.items():
        k = max(1, len(r["gt_profile"]) // parts)
        pf, pl = sum(r["pred_profile"][:k]) / k, sum(r["pred_profile"][-k:]) / k
        gf, gl = sum(r["gt_profile"][:k]) / k, sum(r["gt_profile"][-k:]) / k
        lines.append(f"{g:8s} {gf:9.5f} {gl:9.5f} {r['gt_decay']:9.3f} {pf:10.5f} {pl:9.5f} {r['pred_decay']:10.3f} "
                     f"{r['relative_decay']:13.3f} {r['level_ratio']:13.3f}")
    ok = decay_passes(table, tolerance)
    lines.append(f"no faster decay than the data (gen/gt decay >= {tolerance} for every group): {'yes' if ok else 'NO'}")
    return "\n".join(lines)
