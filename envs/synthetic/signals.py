"""Small signal helpers: smooth noise, Hann bumps and masks, reaction onsets."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d

from ..flame import FPS


def smooth_noise(rng: np.random.Generator, n: int, c: int, sigma: float) -> np.ndarray:
    """(n, c) smooth Gaussian noise with unit marginal std (white noise, Gaussian-filtered)."""
    x = gaussian_filter1d(rng.standard_normal((n, c)), sigma, axis=0, mode="reflect")
    return x * np.sqrt(2 * np.sqrt(np.pi) * sigma)


_HANN_TAB = 0.5 * (1 - np.cos(2 * np.pi * (np.arange(8192) + 0.5) / 8192))


def hann(n: int) -> np.ndarray:
    """(n,) symmetric Hann window sampled at bin centres (table lookup: this is called a lot)."""
    if n <= 1:
        return np.ones(max(n, 0))
    return _HANN_TAB[((np.arange(n) + 0.5) * (8192.0 / n)).astype(np.int64)]


def bump(n: int, start: float, length: float) -> np.ndarray:
    """(n,) Hann bump over frames [start, start + length), zero elsewhere (fractional ok)."""
    t = (np.arange(n) - start) / max(length, 1e-6)
    return np.where((t > 0) & (t < 1), 0.5 * (1 - np.cos(2 * np.pi * np.clip(t, 0, 1))), 0.0)


def smooth_mask(mask: np.ndarray, half: int) -> np.ndarray:
    """Float version of a bool mask with Hann ramps of about ``2 * half`` frames."""
    k = hann(2 * half + 1)
    k /= k.sum()
    return np.convolve(np.pad(mask.astype(np.float64), half, mode="edge"), k, mode="valid")


def onsets(rng: np.random.Generator, k: int, n: int, dur: float, partner_vad: np.ndarray | None,
            anchor_share: float = 0.5) -> np.ndarray:
    """Start frames of ``k`` reaction events lasting ``dur`` frames.

    A share ``anchor_share`` of the events (on average) is anchored near the end of a partner
    utterance (a listener reacts at the partner's pauses) with +-0.4 s jitter; the rest are
    uniform. Events may start before 0 or run past the end so the timing distribution is flat
    over the window.
    """
    starts = rng.uniform(-0.5 * dur, n - 0.5 * dur, k)
    if partner_vad is not None and k:
        pv = np.asarray(partner_vad, dtype=bool)
        ends = np.flatnonzero(pv[:-1] & ~pv[1:]) + 1
        if ends.size:
            anchored = rng.random(k) < anchor_share
            picks = ends[rng.integers(ends.size, size=k)] + rng.normal(0, 0.4 * FPS, k) - 0.2 * dur
            starts = np.where(anchored, picks, starts)
    return starts


