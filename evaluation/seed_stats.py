"""Statistics over seeds: one evaluation per (method, seed) -> mean +- std, relative changes, Welch t.

Conventions, written once: a value ``None`` (or non-finite) is a metric that was unavailable for
that seed and is left out; ``std`` is the sample std (ddof = 1), None with fewer than 2 values;
relative change = (method - supervised) / supervised, negative = lower (better for the deviation
metrics); Welch's t = (mean b - mean a) / sqrt(var_a / n_a + var_b / n_b) with sample variances,
its two-sided p-value from Student's t with the Welch-Satterthwaite degrees of freedom.
"""
from __future__ import annotations

import math

import numpy as np

from ..envs.flame import GROUP_NAMES
from .scoring import TABLE1


def flat_metrics(res: dict) -> dict[str, float | None]:
    """One evaluation (``scoring.evaluate_model`` output) -> ``{key: value}`` of every reported number,
    keys ``<subset>/<split>/<metric>[/<group>]``, ``<subset>/listening/group/<group>/<figure>`` and
    ``<subset>/listening/parts/<metric>/<part>`` (:mod:`.deviation_parts`)."""
    out: dict[str, float | None] = {}
    for subset in ("all", "expressive"):
        r = res[subset]
        for split, t in r["table1"].items():
            for m, v in t.items():
                out[f"{subset}/{split}/{m}"] = v.value
        for split, t in r["supplementary"].items():
            for m, by_g in t.items():
                for g, v in by_g.items():
                    out[f"{subset}/{split}/{m}/{g}"] = v.value
        for g, d in r["listening_groups"].items():
            for k, v in d.items():
                out[f"{subset}/listening/group/{g}/{k}"] = v.value
        for m, d in r.get("listening_parts", {}).items():
            for k, v in d.items():
                out[f"{subset}/listening/parts/{m}/{k}"] = v.value
    return out


def _present(values: list) -> list[float]:
    return [float(x) for x in values if x is not None and math.isfinite(float(x))]


def mean_std(values: list) -> dict:
    """``{"mean", "std", "n"}`` over the available values (module docstring)."""
    v = _present(values)
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v)}


def fmt_ms(d: dict | None, digits: int = 2) -> str:
    """``mean_std`` output -> "m ± s" (or "m" with one value, "n/a" with none)."""
    if not d or d.get("mean") is None:
        return "n/a"
    s = f"{d['mean']:.{digits}f}"
    return s + (f" ± {d['std']:.{digits}f}" if d.get("std") is not None else "")


def welch_t(a: list, b: list) -> float | None:
    """Welch t statistic of mean(b) - mean(a); None with < 2 values on a side or zero spread."""
    xa, xb = _present(a), _present(b)
    if len(xa) < 2 or len(xb) < 2:
        return None
    se = math.sqrt(np.var(xa, ddof=1) / len(xa) + np.var(xb, ddof=1) / len(xb))
    return None if se == 0 else float((np.mean(xb) - np.mean(xa)) / se)


def welch_test(a: list, b: list) -> dict:
    """Welch's two-sided test of mean(b) != mean(a): ``{"t", "df", "p"}`` (Welch-Satterthwaite degrees of
    freedom); every value None when :func:`welch_t` is undefined."""
    t = welch_t(a, b)
    if t is None:
        return {"t": None, "df": None, "p": None}
    from scipy.stats import t as student_t

    xa, xb = _present(a), _present(b)
    va, vb = np.var(xa, ddof=1) / len(xa), np.var(xb, ddof=1) / len(xb)
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    return {"t": t, "df": float(df), "p": float(2 * student_t.sf(abs(t), df))}


def relative_change(before: float | None, after: float | None) -> float | None:
    """(after - before) / before; None when either is missing or ``before`` is 0."""
    if before is None or after is None or before == 0:
        return None
    return (after - before) / before


def aggregate_seeds(per_seed: dict[int, dict[str, float | None]]) -> dict[str, dict]:
    """``{seed: flat metrics}`` -> ``{key: mean_std over seeds}``."""
    keys = sorted({k for s in per_seed.values() for k in s})
    return {k: mean_std([per_seed[s].get(k) for s in per_seed]) for k in keys}


def findings(agg: dict, flat: dict, methods: list[str], groups: list[str]) -> dict:
    """Per method other than ``supervised``: relative change, Welch t and p of every Table 1 metric
    vs supervised-only, and the evenness over the rewarded ``groups`` of the relative change of the
    listening dynamic deviation (mean, std, worst group, number improved)."""
    out: dict = {}
    if "supervised" not in methods:
        return out
    for m in methods:
        if m == "supervised":
            continue
        fm = {}
        for subset in ("all", "expressive"):
            for split, names in TABLE1.items():
                for name in names:
                    k = f"{subset}/{split}/{name}"
                    a, b = agg["supervised"].get(k), agg[m].get(k)
                    if not a or not b or a["mean"] is None or b["mean"] is None:
                        continue
                    w = welch_test([flat["supervised"][s].get(k) for s in flat["supervised"]], [flat[m][s].get(k) for s in flat[m]])
                    fm[k] = {"supervised": a["mean"], m: b["mean"], "rel_change": relative_change(a["mean"], b["mean"]),
                             "welch_t": w["t"], "welch_p": w["p"]}
        rel = {}
        for g in GROUP_NAMES:
            k = f"all/listening/group/{g}/dd"
            a, b = agg["supervised"].get(k), agg[m].get(k)
            change = relative_change(a and a["mean"], b and b["mean"])
            if change is not None:
                rel[g] = change
        rewarded = [g for g in groups if g in rel]
        vals = [rel[g] for g in rewarded]
        fm["group_dd_rel_change"] = rel
        fm["evenness"] = {"rewarded_groups": rewarded, "mean_rel_change": float(np.mean(vals)) if vals else None,
                          "std_rel_change": float(np.std(vals)) if vals else None,
                          "worst_group": max(rewarded, key=lambda g: rel[g]) if rewarded else None,
                          "n_improved": int(sum(v < 0 for v in vals))}
        out[m] = fm
    return out

