"""The benchmark's statistics beyond mean +- std over seeds (``train/bench.py``, issue 10).

- **training curves** (:func:`common_curve`, :func:`moving_average`, :func:`last_third_trend`): the
  per-iteration logs of a run, aligned over seeds, smoothed, and whether they still rise at the end;
- **GDPO paper mechanism figures** (:func:`mechanism_curves`, :func:`mechanism_summary`,
  :func:`dominance`): distinct advantage values per prompt group and the correlation of the final
  advantage with each group's within-group z-scored reward, per iteration, as ``train/gdpo.py``
  logs them (``adv/distinct_per_group``, ``adv/corr_zscore/<group>``);
- **paired per-window comparison** (:func:`table1_window_values`, :func:`paired_windows`): two
  methods sampled with the same seed share their noise, so a window's metric difference is paired.

Conventions, written once:

- a *curve* is ``(steps (L,), values (L,))`` int / float arrays as :func:`.benchmark.read_curve`
  returns them; curves of several seeds are compared on the steps they all logged;
- *dominance* of a method = ``max_g c_g / median_g c_g`` with ``c_g`` the correlation of the final
  advantage with group g's within-group z-score, averaged over iterations then seeds. An even
  advantage (GDPO, equal weights, independent rewards: every ``c_g`` about ``1 / sqrt(n)``) gives
  about 1; an advantage that follows one group only gives a large value. Undefined (None) with
  fewer than 2 groups or when no correlation is positive; ``inf`` when the largest correlation is
  positive and the median is not;
- paired difference = method - reference (supervised-only, or the run with the other SDE) per
  window (lower is better for every metric compared here: dynamic deviations, LVE, MHD), averaged
  over seeds per window; *improved* = the window's averaged difference is < 0; relative change =
  mean difference / mean reference value over the same windows.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..rewards.groups import is_speaking_column
from . import metrics as M
from .seed_stats import mean_std

Curve = tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------------------------
# training curves


def read_curve(path: Path) -> Curve:
    """A torchrl CSVLogger scalar file (``step,value`` lines) -> (steps, values); later duplicates win;
    empty arrays when the file is missing."""
    rows: dict[int, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            parts = line.strip().split(",")
            try:
                rows[int(float(parts[0]))] = float(parts[1])
            except (ValueError, IndexError):
                continue
    steps = np.array(sorted(rows), dtype=np.int64)
    return steps, np.array([rows[s] for s in steps], dtype=np.float64)


def common_curve(series: list[Curve]) -> tuple[np.ndarray, np.ndarray] | None:
    """Curves of several seeds -> ``(steps (L,), values (S, L))`` on the steps every curve logged;
    None when there is no curve or no common step."""
    series = [s for s in series if len(s[0])]
    if not series:
        return None
    steps = series[0][0]
    for s, _ in series[1:]:
        steps = np.intersect1d(steps, s)
    if not len(steps):
        return None
    vals = np.stack([v[np.searchsorted(s, steps)] for s, v in series])  # (S, L)
    return steps, vals


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average of ``values (L,)`` over ``window`` points (fewer at the start), (L,)."""
    v = np.asarray(values, dtype=np.float64)
    if window < 1:
        raise ValueError(f"moving_average: window must be >= 1, got {window}")
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def smoothing_window(n: int) -> int:
    """The moving-average window of a curve of ``n`` iterations: a tenth of it, at least 1."""
    return max(1, n // 10)


def last_third_trend(steps: np.ndarray, values: np.ndarray) -> dict:
    """Least-squares slope (per iteration) of ``values`` over the last third of ``steps``, its standard
    error, and the share of the whole curve's gain made there: ``slope x span of the last third /
    (end - start)``, with start / end the means of the first / last tenth (at least one point each).

    A share near 0 means the curve has flattened; near 1/3 or above, it still rises as fast as on
    average. The share alone is ill-conditioned for a curve with almost no net gain (a flat, noisy
    curve can show any share), hence ``slope_se`` (ordinary least squares, residuals of the last
    third): :func:`.targets.still_rising` also asks the slope to stand out of the noise. ``share`` is
    None when the curve has no net change; ``slope_se`` None with fewer than 3 points in the last
    third. Needs >= 3 points (else all None).
    """
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    n = len(x)
    if n < 3:
        return {"slope": None, "slope_se": None, "share": None, "n": n}
    k = max(2, -(-n // 3))
    xs, ys = x[-k:], y[-k:]
    slope, icpt = (float(c) for c in np.polyfit(xs, ys, 1))
    sxx = float(((xs - xs.mean()) ** 2).sum())
    resid = ys - (slope * xs + icpt)
    slope_se = float(np.sqrt((resid ** 2).sum() / (k - 2) / sxx)) if k > 2 and sxx > 0 else None
    edge = max(1, n // 10)
    gain = float(y[-edge:].mean() - y[:edge].mean())
    share = None if gain == 0 else slope * float(xs[-1] - xs[0]) / gain
    return {"slope": slope, "slope_se": slope_se, "share": share, "n": n}


def curve_trends(curves: Mapping, groups: list[str]) -> dict:
    """``curves[method][seed][group] = curve`` -> ``{method: {group: last_third_trend of the seed mean}}``."""
    out: dict = {}
    for m, by_seed in curves.items():
        out[m] = {}
        for g in groups:
            cc = common_curve([by_seed[s][g] for s in by_seed])
            out[m][g] = last_third_trend(cc[0], cc[1].mean(0)) if cc else {"slope": None, "slope_se": None, "share": None, "n": 0}
    return out


# ----------------------------------------------------------------------------------------------
# GDPO paper mechanism figures


def mechanism_curves(run_dir: Path, logger_name: str, groups: list[str]) -> dict:
    """The per-iteration advantage diagnostics of one run from its CSV logs
    ``logs/<logger_name>/scalars/adv/...``: ``{"distinct": curve, "corr": {group: curve}}``."""
    root = Path(run_dir) / "logs" / logger_name / "scalars" / "adv"
    return {"distinct": read_curve(root / "distinct_per_group.csv"),
            "corr": {g: read_curve(root / "corr_zscore" / f"{g}.csv") for g in groups}}


def dominance(corr: Mapping[str, float | None]) -> float | None:
    """``max / median`` over groups of the correlations ``corr`` (module docstring)."""
    c = np.array([float(v) for v in corr.values() if v is not None and math.isfinite(float(v))])
    if len(c) < 2 or c.max() <= 0:
        return None
    med = float(np.median(c))
    return math.inf if med <= 0 else float(c.max() / med)


def mechanism_summary(by_seed: Mapping[int, dict], groups: list[str]) -> dict:
    """One method's :func:`mechanism_curves` per seed -> mean over iterations per seed, then mean +- std
    over seeds: ``distinct``, ``corr[group]``; ``dominance`` and ``top_group`` from the seed means of
    ``corr`` (:func:`dominance`) over the listening columns, the ones one advantage combines
    (``<group>@speaking`` columns train the speaking tokens through an advantage of their own)."""
    distinct = [float(c["distinct"][1].mean()) for c in by_seed.values() if len(c["distinct"][1])]
    corr = {g: mean_std([float(c["corr"][g][1].mean()) for c in by_seed.values() if len(c["corr"][g][1])]) for g in groups}
    means = {g: d["mean"] for g, d in corr.items() if d["mean"] is not None and not is_speaking_column(g)}
    return {"distinct": mean_std(distinct), "corr": corr, "dominance": dominance(means),
            "top_group": max(means, key=means.get) if means else None}


# ----------------------------------------------------------------------------------------------
# paired per-window comparison


def table1_window_values(st: dict, mcfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per Table 1 metric ``"<split>/<name>"``: the value of every window in Table 1 units ``(B,)``
    and whether the window counts ``(B,)`` bool, from :func:`.scoring.row_stats`' ``st`` -- the
    per-window quantities Table 1 averages (vertex FDD and LVE / MHD with a FLAME model,
    parameter deviations otherwise). Metrics that are unavailable are left out. LVE / MHD of a window
    are its mean over its speaking frames (Table 1 pools the frames of all windows instead)."""
    from .scoring import TABLE1

    conv = str(mcfg.get("convention", "velocity"))
    scale = M.DYNAMIC_SCALE[conv]
    vx = st.get("vertex") or {}
    out = {}
    for split, names in TABLE1.items():
        for name in names:
            if name in ("LVE", "MHD"):
                if not vx:
                    continue
                frames = vx["frames"].double()
                val = vx["lve_sum" if name == "LVE" else "mhd_sum"].double() / frames.clamp(min=1)  # (B,) mm per frame
                ok = frames > 0
            elif name == "FDD" and vx:
                val, ok = vx[f"fdd_{split}"].double() * scale, vx[f"fdd_{split}_ok"]
            else:
                v, ok = st["param"][(split, name)]
                val = v.double() * scale
            out[f"{split}/{name}"] = (torch.as_tensor(val).cpu().numpy(), torch.as_tensor(ok).cpu().numpy().astype(bool))
    return out


def paired_windows(reference: Mapping[int, tuple[np.ndarray, np.ndarray]], method: Mapping[int, tuple[np.ndarray, np.ndarray]],
                   subset: np.ndarray | None = None, seed: int = 0) -> dict | None:
    """Paired per-window comparison of one metric (module docstring).

    ``reference`` / ``method``: ``{seed: (values (B,), ok (B,))}`` on the same window bank; the
    seeds both have are used, and the windows that count in every one of them (and in ``subset``
    (B,) bool). Returns ``n_windows``, ``n_seeds``, ``reference`` and ``method`` (mean values),
    ``mean_diff`` with its 95 % percentile-bootstrap interval ``ci_low`` / ``ci_high`` over windows,
    ``rel_change``, ``frac_improved``; None when no window counts.
    """
    seeds = sorted(set(reference) & set(method))
    if not seeds:
        return None
    ok = np.ones_like(reference[seeds[0]][1], dtype=bool)  # (B,)
    for s in seeds:
        ok &= reference[s][1] & method[s][1]
    if subset is not None:
        ok &= np.asarray(subset, dtype=bool)
    if not ok.any():
        return None
    a = np.stack([reference[s][0][ok] for s in seeds]).mean(0)  # (n,) reference, mean over seeds
    b = np.stack([method[s][0][ok] for s in seeds]).mean(0)  # (n,)
    diff = b - a  # (n,) paired per window
    mean, lo, hi = M.paired_bootstrap_ci(diff, seed=seed)
    base = float(a.mean())
    return {"n_windows": int(ok.sum()), "n_seeds": len(seeds), "reference": base, "method": float(b.mean()),
            "mean_diff": mean, "ci_low": lo, "ci_high": hi, "rel_change": None if base == 0 else mean / base,
            "frac_improved": float((diff < 0).mean())}


def paired_report(windows: Mapping[str, Mapping[int, dict]], methods: list[str], expressive: np.ndarray,
                  reference: str = "supervised") -> dict:
    """``windows[method][seed]`` = :func:`table1_window_values` -> ``{method: {subset: {metric: paired_windows}}}``
    for every method other than ``reference`` against it, on all windows and the ``expressive`` (B,) subset."""
    out: dict = {}
    ref = windows[reference]
    keys = sorted({k for s in ref.values() for k in s})
    for m in methods:
        if m == reference:
            continue
        out[m] = {}
        for subset, mask in (("all", None), ("expressive", expressive)):
            res = {}
            for k in keys:
                a = {s: w[k] for s, w in ref.items() if k in w}
                b = {s: w[k] for s, w in windows[m].items() if k in w}
                r = paired_windows(a, b, mask)
                if r is not None:
                    res[k] = r
            out[m][subset] = res
    return out


def per_label_means(windows: Mapping[str, Mapping[int, dict]], labels: list, keys: tuple[str, ...]) -> dict:
    """Mean per window label (e.g. the listener's intent) of per-window metric values:
    ``windows[method][seed][key] = (values (B,), counts (B,) bool)`` (:func:`table1_window_values`),
    ``labels`` one per bank row (None = unlabelled, left out). Returns ``{method: {key: {label:
    {"mean", "n", "share"}}}}``: mean over the label's counted windows of the seed-mean value, its
    window count, and its share of the method's summed value over all counted windows (how much of
    the metric the label carries)."""
    out: dict = {}
    lab = np.asarray([None if x is None else str(x) for x in labels], dtype=object)
    for m, by_seed in windows.items():
        out[m] = {}
        for k in keys:
            runs = [w[k] for w in by_seed.values() if k in w]
            if not runs:
                continue
            vals = np.stack([np.asarray(v, dtype=np.float64) for v, _ in runs])  # (S, B)
            ok = np.all(np.stack([np.asarray(c, dtype=bool) for _, c in runs]), 0)  # (B,) counted in every seed
            if len(lab) != vals.shape[1]:
                raise ValueError(f"per_label_means: {len(lab)} labels for {vals.shape[1]} windows")
            v = vals.mean(0)
            total = float(v[ok].sum())
            res = {}
            for g in sorted({x for x in lab[ok] if x is not None}):
                sel = ok & (lab == g)
                res[g] = {"mean": float(v[sel].mean()), "n": int(sel.sum()),
                          "share": float(v[sel].sum() / total) if total else None}
            out[m][k] = res
    return out
