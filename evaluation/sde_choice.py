"""The SDE choice of RL post-training (issue 10): which SDE gives the better final samples and the
better post-trained model.

- **final-sample dynamics** (:func:`final_sample_dynamics`): the supervised model sampled with the
  evaluation ODE and with each SDE RL could train on (``env.sde`` = ``paper``: eq. 7 drift;
  ``marginal``: score-corrected drift, see ``agents/sampling.py``), scored by
  :func:`.generation.quality_report` (listening velocity-std ratio pred / gt per group, speaking
  jaw correlation). RL optimises the rewards of SDE samples and is evaluated on ODE samples, so the
  SDE whose samples have the ODE's dynamics is the better one: :func:`closest_to_ode` ranks the
  SDEs by the mean over groups of ``|log(ratio_sde / ratio_ode)|`` (0 = same dynamics);
- a reference row, the evaluation ODE **teacher-forced** (each token given the ground-truth
  history, :func:`.generation.teacher_forced_motion`): the model's one-token conditionals without
  its own rollout; it never takes part in the ranking;
- **post-trained model** (:func:`model_verdict`): the same algorithm trained with either SDE,
  compared per window (:func:`.bench_stats.paired_windows`) on the listening dynamic deviations.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..envs.flame import GROUP_NAMES
from .generation import quality_figures, quality_report, teacher_forced_motion


class SDESampling:
    """``model`` whose ``sample`` draws with the SDE ``sde`` at noise scale ``sigma`` on the steps of
    ``sde_window`` (None: all; else ODE steps outside it; everything else passed through), so the
    evaluation's own generation routine can sample it."""

    def __init__(self, model, sigma: float, sde: str, sde_window=None):
        if not sigma > 0:
            raise ValueError(f"SDESampling: sigma must be > 0 (0 is the ODE), got {sigma}")
        self.model, self.sigma, self.sde = model, float(sigma), str(sde)
        self.sde_window = None if sde_window is None else tuple(int(w) for w in sde_window)

    def sample(self, *args, **kwargs):
        return self.model.sample(*args, sigma=self.sigma, sde=self.sde, sde_window=self.sde_window, **kwargs)


def sampler_variants(ode_steps: int, sde_steps: int, sigma: float, sdes: list[str], teacher_forced: bool = False,
                     windows=()) -> dict[str, dict]:
    """``{name: {"steps", "sigma", "sde"[, "sde_window"]}}``: the ODE (sigma 0) then one SDE per entry of
    ``sdes``, and one mixed SDE/ODE sampler per SDE and entry ``[a, b]`` of ``windows`` (``env.sde_window``:
    SDE steps a .. b-1 only); with ``teacher_forced`` also the ODE given the ground-truth history
    (``"history": "ground truth"``)."""
    from ..agents.flow import sde_window_label, sde_window_steps

    out = {f"ODE {int(ode_steps)} steps": {"steps": int(ode_steps), "sigma": 0.0, "sde": None}}
    for s in sdes:
        out[f"SDE {s} {int(sde_steps)} steps sigma {float(sigma):g}"] = {"steps": int(sde_steps), "sigma": float(sigma), "sde": str(s)}
    for w in windows or ():
        a, b = sde_window_steps(w, int(sde_steps))
        for s in sdes:
            out[f"SDE {s} {int(sde_steps)} steps sigma {float(sigma):g}, SDE on {sde_window_label((a, b))}"] = {
                "steps": int(sde_steps), "sigma": float(sigma), "sde": str(s), "sde_window": [a, b]}
    if teacher_forced:
        out[f"ODE {int(ode_steps)} steps, teacher-forced"] = {"steps": int(ode_steps), "sigma": 0.0, "sde": None,
                                                              "history": "ground truth"}
    return out


def evaluation_ode(variants: Mapping[str, dict]) -> str | None:
    """The name of the free-running ODE among ``variants`` (the evaluation sampler), or None."""
    return next((n for n, v in variants.items() if v["sigma"] == 0 and not v.get("history")), None)


def final_sample_dynamics(model, data, variants: Mapping[str, dict], seeds: list[int]) -> dict[str, dict[int, dict]]:
    """``{variant: {seed: quality_report}}`` of ``model`` on every window of ``data`` (:class:`.data.EvalData`)."""
    out: dict = {}
    n = int(data.bank.batch_size[0])
    for name, v in variants.items():
        if v.get("history"):
            out[name] = {s: quality_figures(teacher_forced_motion(model, data.vae, data.normalizer, data.bank, steps=v["steps"],
                                                                  seed=int(s)), data.bank) for s in seeds}
            continue
        m = model if v["sigma"] == 0 else SDESampling(model, v["sigma"], v["sde"], v.get("sde_window"))
        out[name] = {s: quality_report(m, data.vae, data.normalizer, data.bank, n_windows=n, steps=v["steps"], seed=int(s))
                     for s in seeds}
    return out


def closest_to_ode(table: Mapping[str, Mapping[str, Mapping]], variants: Mapping[str, dict],
                   groups: tuple[str, ...] = GROUP_NAMES) -> dict:
    """Per SDE variant, the mean over ``groups`` of ``|log(ratio_sde / ratio_ode)|`` of the listening
    velocity-std ratios (``table[variant][key]`` = mean over seeds), and the variant with the smallest.
    ``{"distance": {variant: d}, "best": variant | None}``."""
    ode = evaluation_ode(variants)
    dist = {}
    for name, v in variants.items():
        if name == ode or ode is None or v.get("history"):
            continue
        d = []
        for g in groups:
            a = (table[ode].get(f"listening/{g}/vel_std_ratio") or {}).get("mean")
            b = (table[name].get(f"listening/{g}/vel_std_ratio") or {}).get("mean")
            if a and b and a > 0 and b > 0:
                d.append(abs(math.log(b / a)))
        dist[name] = float(np.mean(d)) if d else None
    known = {k: v for k, v in dist.items() if v is not None}
    return {"distance": dist, "best": min(known, key=known.get) if known else None}


def model_verdict(paired: Mapping[str, Mapping], reference_sde: str, other_sde: str,
                  metrics: tuple[str, ...] = ("FDD", "PDD", "JDD")) -> dict:
    """Which SDE gave the better post-trained model: ``paired["listening/<metric>"]`` =
    :func:`.bench_stats.paired_windows` of the ``other_sde`` run against the ``reference_sde`` run
    (difference other - reference, lower = better). A metric is won when its 95 % interval excludes 0;
    the SDE winning more metrics is ``better`` (None on a tie or when both runs used the same SDE).
    ``per_metric``: the winning SDE per metric (None: no significant difference); ``wins``: metrics
    won by the ``reference`` run and by the other (``method``) run."""
    role = {}
    for name in metrics:
        p = paired.get(f"listening/{name}")
        if p is not None:
            role[name] = "method" if p["ci_high"] < 0 else "reference" if p["ci_low"] > 0 else None
    sde = {"method": other_sde, "reference": reference_sde, None: None}
    wins = {r: sum(v == r for v in role.values()) for r in ("reference", "method")}
    better = None if wins["reference"] == wins["method"] or reference_sde == other_sde else sde[max(wins, key=wins.get)]
    return {"per_metric": {k: sde[r] for k, r in role.items()}, "wins": wins, "better": better}
