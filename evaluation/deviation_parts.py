"""What a dynamic deviation (FDD / PDD / JDD) is made of: amplitude or timing.

A dynamic deviation averages, over windows and channels, ``|s_pred - s_gt|`` of the per-window stds
(:func:`.metrics.dynamic_std_rows`). A model can miss in two ways: its motion is too small or too
large overall (amplitude), or it moves in the wrong windows (timing: where the ground truth reacts
and where it rests). Two reference figures separate them, both exact minimisers of the same
weighted absolute deviation (the metric's own weights: windows equal, channels equal within a window):

- **at the best amplitude**: ``mean_c min_a_c mean_n |a_c s_pred[n, c] - s_gt[n, c]|``, the model's
  own per-window pattern scaled by one factor per channel (``a_c`` is the weighted median of
  ``s_gt / s_pred`` with weights ``w s_pred``). What is left is timing; what it removes is amplitude
  (too little or too much motion in a channel, whichever window);
- **window-blind floor**: ``mean_c min_k mean_n |k - s_gt[n, c]|``, the best constant per channel in
  every window (the weighted median of ``s_gt`` per channel): what a model reaches that gets each
  channel's typical amplitude right and knows nothing about which window calls for more motion. It
  depends on the ground truth only.

- **label-aware floor** (:func:`label_floor_rows`): the best constant per channel *and window label*
  (e.g. the listener intent the window's text names): what a model reaches that knows each window's
  label and that label's typical amplitude per channel, and nothing else about the window. With one
  label for every window it is the window-blind floor. A model goes below it only by reading cues
  beyond the label (audio, the partner's motion) that predict how much a window moves. Ground truth only.
- **label-aware sampler** (:func:`label_sampler_rows`): the expected deviation of a *faithful sampler*
  that knows the labels: in each window it plays the stds of another window of the same label drawn
  at random, independently of the window (leave-one-out: the unbiased estimate of ``E|X - Y|`` for
  independent draws of the label's distribution). A generative model that samples exactly what its
  conditions leave open sits here, not at the floor: ``E|X - Y| >= E|X - median|``, and
  ``<= 2 E|X - median|`` (triangle inequality), so the sampler lies at or above the floor and, for
  a label of ``n`` windows with the same valid channels, at most ``2 n / (n - 1)`` times it. A model
  goes below it by being more deterministic than the data (a typical amplitude instead of the
  spread) or by reading cues beyond the label. Ground truth only.

Pure functions of ``(N, C)`` arrays; the scoring (:mod:`.scoring`) feeds them the windows a
metric counts.
"""
from __future__ import annotations

import numpy as np

__all__ = ["weighted_median", "deviation_parts", "label_floor_rows", "label_sampler_rows"]


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """A minimiser of ``sum_i w_i |x - v_i|`` (``w >= 0``, ``sum w > 0``): the smallest value at which
    the cumulative weight of the sorted values reaches half the total."""
    v, w = np.asarray(values, dtype=np.float64).ravel(), np.asarray(weights, dtype=np.float64).ravel()
    if v.shape != w.shape or v.size == 0:
        raise ValueError(f"weighted_median: values {v.shape} and weights {w.shape} must be non-empty and alike")
    if np.any(w < 0) or not w.sum() > 0:
        raise ValueError("weighted_median: weights must be >= 0 with a positive sum")
    order = np.argsort(v, kind="stable")
    cum = np.cumsum(w[order])
    return float(v[order][np.searchsorted(cum, 0.5 * cum[-1])])


def deviation_parts(sp: np.ndarray, sg: np.ndarray, valid: np.ndarray | None = None) -> dict:
    """Deviation, best-amplitude deviation and factor, and the window-blind floor.

    ``sp``, ``sg`` ``(N, C)``: per-window, per-channel stds of prediction and ground truth of the
    ``N`` windows the metric counts; ``valid`` ``(N, C)`` bool (None = all), each window with at
    least one valid channel. Returns unscaled values: ``deviation`` (the metric),
    ``at_best_amplitude``, ``amplitude`` (the median over channels of the factors ``a_c``) and
    ``window_blind``.
    """
    sp, sg = np.asarray(sp, dtype=np.float64), np.asarray(sg, dtype=np.float64)
    if sp.ndim != 2 or sp.shape != sg.shape:
        raise ValueError(f"deviation_parts: sp {sp.shape} and sg {sg.shape} must be alike (N, C)")
    valid = np.ones(sp.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    n_c = valid.sum(1)  # (N,)
    if sp.shape[0] == 0 or np.any(n_c == 0):
        raise ValueError("deviation_parts: needs at least one window, each with a valid channel")
    w = np.where(valid, 1.0 / (sp.shape[0] * n_c[:, None]), 0.0)  # (N, C) the metric's weights, sum 1

    scaled, factors, floor = 0.0, [], 0.0
    for c in range(sp.shape[1]):
        rows = valid[:, c]
        if not rows.any():
            continue
        p, g, wc = sp[rows, c], sg[rows, c], w[rows, c]
        pos = p > 0
        a = weighted_median(g[pos] / p[pos], wc[pos] * p[pos]) if pos.any() else 1.0  # a motionless channel stays so
        factors.append(a)
        scaled += float((wc * np.abs(a * p - g)).sum())
        k = weighted_median(g, wc)
        floor += float((wc * np.abs(k - g)).sum())
    return {"deviation": float((w * np.abs(sp - sg)).sum()), "at_best_amplitude": scaled,
            "amplitude": float(np.median(factors)), "window_blind": floor}


def _label_inputs(sg, valid, labels, name: str):
    """``sg`` ``(N, C)`` float64, ``valid`` ``(N, C)`` bool, labels ``(N,)`` object, valid channels per window ``(N,)``."""
    sg = np.asarray(sg, dtype=np.float64)
    if sg.ndim != 2:
        raise ValueError(f"{name}: sg {sg.shape} must be (N, C)")
    valid = np.ones(sg.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    lab = np.asarray([None if x is None else str(x) for x in labels], dtype=object)
    if valid.shape != sg.shape or lab.shape != (sg.shape[0],):
        raise ValueError(f"{name}: sg {sg.shape}, valid {valid.shape} and {lab.shape[0]} labels must agree")
    n_c = valid.sum(1)  # (N,)
    if np.any(n_c == 0):
        raise ValueError(f"{name}: every window needs a valid channel")
    return sg, valid, lab, n_c


def label_floor_rows(sg: np.ndarray, valid: np.ndarray | None, labels) -> np.ndarray:
    """Per window, the deviation of the best constant per channel and label: ``(N,)``, unscaled.

    ``sg`` ``(N, C)`` ground-truth stds, ``valid`` ``(N, C)`` bool (None = all; each window with a valid
    channel), ``labels`` ``N`` hashables (None is a label of its own). For label ``L`` and channel
    ``c`` the constant ``k`` is the median of ``sg[n, c]`` over ``L``'s valid windows weighted as the
    metric weighs them (``1 / valid channels of n``); window ``n``'s value is the mean over its valid
    channels of ``|k - sg[n, c]|``. The mean over windows is the metric's floor for a model that
    knows the labels; with a single label it equals :func:`deviation_parts`' ``window_blind``.
    """
    sg, valid, lab, n_c = _label_inputs(sg, valid, labels, "label_floor_rows")
    dev = np.zeros(sg.shape)  # (N, C) |k - sg| on valid entries
    for g in dict.fromkeys(lab.tolist()):
        in_g = lab == g  # (N,)
        for c in range(sg.shape[1]):
            rows = in_g & valid[:, c]
            if rows.any():
                k = weighted_median(sg[rows, c], 1.0 / n_c[rows])
                dev[rows, c] = np.abs(k - sg[rows, c])
    return (dev * valid).sum(1) / n_c


def label_sampler_rows(sg: np.ndarray, valid: np.ndarray | None, labels) -> np.ndarray:
    """Per window, the expected deviation of a faithful sampler that knows the labels: ``(N,)``, unscaled.

    Same inputs as :func:`label_floor_rows`. For label ``L`` and channel ``c``, the sampler plays
    ``sg[m, c]`` of a window ``m != n`` drawn uniformly from ``L``'s other windows valid in ``c``,
    whatever window ``n`` it is in; window ``n``'s value is the mean over its valid channels of
    ``mean_{m != n} |sg[m, c] - sg[n, c]|``. Each window's value is at or above its value under
    :func:`label_floor_rows`' constant on average over a label; a window with no other window of its
    label in a channel costs nothing there (no estimate; as a lone window costs nothing there).
    """
    sg, valid, lab, n_c = _label_inputs(sg, valid, labels, "label_sampler_rows")
    dev = np.zeros(sg.shape)  # (N, C) E_m |sg[m, c] - sg[n, c]| on valid entries
    for g in dict.fromkeys(lab.tolist()):
        in_g = lab == g  # (N,)
        for c in range(sg.shape[1]):
            rows = np.flatnonzero(in_g & valid[:, c])
            if rows.size > 1:
                x = sg[rows, c]  # (n_g,)
                dev[rows, c] = np.abs(x[:, None] - x[None, :]).sum(1) / (rows.size - 1)  # (n_g,) the diagonal is 0
    return (dev * valid).sum(1) / n_c
