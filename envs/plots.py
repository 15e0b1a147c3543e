"""Quick-look plots of dataset windows (matplotlib, Agg canvas; no global backend change)."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np

from .flame import FPS, GROUP_NAMES, GROUPS

# channels drawn per group (all channels except for the 50 expression coefficients)
_MAX_EXPR_LINES = 10


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) frame runs where ``mask`` is True."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    d = np.flatnonzero(m[1:] != m[:-1])
    return list(zip(d[::2], d[1::2]))


def plot_window(item: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write a PNG of one window: the actor's six FLAME groups over time.

    ``item`` is a :class:`~gdpo_listener.envs.dataset.DyadicWindows` item (needs
    ``actor_motion``, ``speaking``, ``listening``; uses ``partner_vad``, ``text``,
    ``conversation``, ``actor``, ``window``, ``actor_valid`` when present). Speaking frames are
    shaded green, listening frames blue; the partner's VAD is drawn as a strip in the top panel.
    The window's text is the title. Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    motion = np.asarray(item["actor_motion"])
    T = motion.shape[0]
    t = np.arange(T) / FPS
    speaking = np.asarray(item.get("speaking", np.zeros(T, bool)), dtype=bool)
    listening = np.asarray(item.get("listening", np.zeros(T, bool)), dtype=bool)
    partner_vad = item.get("partner_vad")
    valid = np.asarray(item.get("actor_valid", np.ones(len(GROUP_NAMES), bool)), dtype=bool)

    fig = Figure(figsize=(12, 13), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(GROUP_NAMES), 1, sharex=True)
    for gi, (ax, name) in enumerate(zip(axes, GROUP_NAMES)):
        for a, b in _spans(speaking):
            ax.axvspan(a / FPS, b / FPS, color="tab:green", alpha=0.15, lw=0)
        for a, b in _spans(listening):
            ax.axvspan(a / FPS, b / FPS, color="tab:blue", alpha=0.12, lw=0)
        x = motion[:, GROUPS[name]]
        if name == "expr":
            x = x[:, :_MAX_EXPR_LINES]
        for c in range(x.shape[1]):
            ax.plot(t, x[:, c], lw=1.0, label=f"{GROUPS[name].start + c}")
        ax.set_ylabel(name + ("" if valid[gi] else "\n(invalid)"))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=6, ncol=min(x.shape[1], 10), framealpha=0.6)
        if gi == 0 and partner_vad is not None:
            lo, hi = ax.get_ylim()
            pv = np.asarray(partner_vad, dtype=bool)
            for a, b in _spans(pv):
                ax.hlines(hi, a / FPS, b / FPS, color="tab:red", lw=4)
            ax.set_ylim(lo, hi + 0.02 * (hi - lo))
    axes[-1].set_xlabel("time (s)   green: actor speaking   blue: listening   red bar: partner VAD")
    head = title or (f"{item.get('conversation', '?')}  actor {item.get('actor', '?')}  window {item.get('window', '?')}  "
                     f"speaking {speaking.mean():.0%}  listening {listening.mean():.0%}")
    text = item.get("text") or "(no text)"
    fig.suptitle(head + "\n" + "\n".join(textwrap.wrap(repr(text), 110)), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
