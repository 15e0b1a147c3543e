"""The benchmark's figures (``train/bench.py``): per-group training reward of every run
(``reward_curves.png``), the GDPO paper's mechanism figures per iteration (``mechanism.png``) and one
window's listening motion (of the evaluated split), ground truth against each method (``listening_motion.png``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..envs.flame import FPS, GROUP_NAMES, GROUPS
from ..rewards.groups import column_group
from .bench_stats import common_curve, moving_average, smoothing_window
from .benchmark import method_label, parse_method
from .data import EvalData

__all__ = ["plot_reward_curves", "plot_mechanism", "plot_listening_window"]

METHOD_COLOR = {"supervised": "tab:gray", "grpo": "tab:orange", "gdpo": "tab:blue"}
SDE_LINESTYLE = {None: "-", "paper": "-.", "marginal": "--"}


def method_style(key: str) -> dict:
    """Matplotlib colour and line style of a method (colour by algorithm, line style by SDE; dotted: a variant)."""
    if key == "supervised":
        return {"color": METHOD_COLOR["supervised"], "ls": "-"}
    m = parse_method(key)
    return {"color": METHOD_COLOR[m.algo], "ls": SDE_LINESTYLE[m.sde] if m.variant is None else ":"}


def _figure(n_panels: int, cols: int, w: float = 4.5, h: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(1, min(cols, n_panels))
    rows = -(-n_panels // cols)
    fig = Figure(figsize=(w * cols, h * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, path: Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_reward_curves(curves: dict, groups: list[str], path: Path) -> Path:
    """``curves[method][seed][group] = (steps, values)`` -> one panel per group: every run (thin) and
    the seed mean smoothed by a trailing moving average (:func:`.bench_stats.smoothing_window`, thick)."""
    fig, axes = _figure(len(groups), 3)
    for ax, g in zip(axes, groups):
        for m, by_seed in curves.items():
            st = method_style(m)
            for s in by_seed:
                steps, vals = by_seed[s][g]
                if len(steps):
                    ax.plot(steps, vals, color=st["color"], ls=st["ls"], lw=0.6, alpha=0.35)
            cc = common_curve([by_seed[s][g] for s in by_seed])
            if cc is None:
                continue
            steps, vals = cc
            k = smoothing_window(len(steps))
            ax.plot(steps, moving_average(vals.mean(0), k), color=st["color"], ls=st["ls"], lw=2.0,
                    marker="o" if len(steps) < 20 else None, ms=3, label=f"{method_label(m)} (n={len(vals)}, smoothed {k})")
        ax.set_title(f"reward/{g}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, "training reward per FLAME group (batch mean of the SDE rollouts): every run (thin) and the "
                 "smoothed mean over seeds (thick)")


def plot_mechanism(mech: dict, groups: list[str], path: Path, group_size: int | None = None) -> Path:
    """GDPO paper mechanism figures per iteration (mean over seeds, smoothed like the reward curves):
    distinct advantage values per prompt group for every method (first panel), then per method the
    correlation of the final advantage with each group's within-group z-scored reward.
    ``mech[method][seed]``: :func:`.bench_stats.mechanism_curves`."""
    fig, axes = _figure(1 + len(mech), 3)
    ax = axes[0]
    for m, by_seed in mech.items():
        cc = common_curve([c["distinct"] for c in by_seed.values()])
        if cc is not None:
            st = method_style(m)
            ax.plot(cc[0], moving_average(cc[1].mean(0), smoothing_window(len(cc[0]))), color=st["color"], ls=st["ls"], lw=1.8,
                    marker="o" if len(cc[0]) < 20 else None, ms=3, label=method_label(m))
    if group_size:
        ax.axhline(group_size, color="black", lw=0.8, ls=":", label=f"G = {group_size} (all distinct)")
    ax.set_title("distinct advantage values per prompt group")
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    colors = {g: f"C{i}" for i, g in enumerate(GROUP_NAMES)}
    for ax, (m, by_seed) in zip(axes[1:], mech.items()):
        for g in groups:
            cc = common_curve([c["corr"][g] for c in by_seed.values()])
            if cc is not None:
                group, frames = column_group(g)  # a <group>@speaking column: the group's colour, dashed
                ax.plot(cc[0], moving_average(cc[1].mean(0), smoothing_window(len(cc[0]))), color=colors[group], lw=1.5,
                        ls={"speaking": "--", "hold": ":"}.get(frames, "-"), marker="o" if len(cc[0]) < 20 else None, ms=3, label=g)
        if len(groups) > 0:
            ax.axhline(1 / np.sqrt(len(groups)), color="black", lw=0.8, ls=":", label="1/sqrt(n): even")
        ax.set_title(f"{method_label(m)}: corr(advantage, group z-score)")
        ax.set_xlabel("iteration")
        ax.set_ylim(-0.2, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path, "GDPO paper mechanism figures per iteration (mean over seeds, smoothed)")


def plot_listening_window(data: EvalData, row: int, preds: dict[str, np.ndarray], path: Path, seed: int = 0) -> Path:
    """One test window: ground truth vs each method on a few channels; listening frames shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..envs.plots import _spans

    b = data.bank[row]
    gt = b["actor_motion"].cpu().numpy()
    lis = b["listening"].cpu().numpy().astype(bool)
    spk = b["speaking"].cpu().numpy().astype(bool)
    sel = lis if lis.any() else np.ones_like(lis)
    top_expr = int(np.argmax(gt[sel, :50].std(0)))
    chans = [(top_expr, f"expr[{top_expr}] (most active)"), (GROUPS["jaw"].start, "jaw[0] (open)"),
             (GROUPS["eyelid"].start, "eyelid[0]"), (GROUPS["rot"].start, "rot[0] (pitch, nod)"),
             (GROUPS["rot"].start + 1, "rot[1] (yaw, shake)")]
    t = np.arange(gt.shape[0]) / FPS
    fig = Figure(figsize=(12, 2.2 * len(chans)), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(chans), 1, sharex=True)
    for ax, (c, name) in zip(axes, chans):
        for a, e in _spans(lis):
            ax.axvspan(a / FPS, e / FPS, color="tab:blue", alpha=0.10, lw=0)
        for a, e in _spans(spk):
            ax.axvspan(a / FPS, e / FPS, color="tab:green", alpha=0.10, lw=0)
        ax.plot(t, gt[:, c], color="black", lw=2.0, label="ground truth")
        for m, p in preds.items():
            st = method_style(m)
            ax.plot(t, p[:, c], color=st["color"], ls=st["ls"], lw=1.2, label=method_label(m))
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=7, ncol=4)
    axes[-1].set_xlabel("time (s)   blue: listening frames   green: speaking frames")
    cid, actor = data.seq_ids[row]
    fig.suptitle(f"listening motion, {data.split} window {cid} actor {actor} window {data.windows.index[data.indices[row]].window} "
                 f"({lis.mean():.0%} listening): ground truth vs each method (sampling seed {seed})")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
