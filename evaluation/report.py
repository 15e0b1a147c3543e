"""The evaluation report of one checkpoint: JSON document and Markdown tables (paper layouts).

:func:`header` describes the setting, :func:`markdown_report` lays out Table 1, the supplementary
Table 6 and the per-group listening table, :func:`write_report` writes ``metrics.json`` and
``metrics.md`` atomically. The table functions take a ``fmt`` so the benchmark reuses them for
mean +- std over seeds. Unavailable values are ``null`` / "n/a", never 0.
"""
from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from ..agents.arflow import DROP_KEYS
from ..agents.checkpoint import atomic_write_bytes, atomic_write_json
from ..agents.sampling import check_cfg_drop
from ..envs.flame import GROUP_NAMES
from . import metrics as M
from .checkpoints import terms_differ_from_default
from .data import EvalData
from .scoring import SPLITS, SUPP, TABLE1


def to_json(x):
    """Metric results, nested dicts and lists -> plain JSON values (non-finite floats -> null)."""
    if isinstance(x, M.MetricResult):
        return to_json(x.to_json())
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def header(data: EvalData, cfg: DictConfig, ckpt: str, seed: int, run_reward: dict | None = None, optimised: bool = True) -> dict:
    """The setting of one evaluation (goes first in ``metrics.json``). ``run_reward``: the reward the checkpoint
    optimised, or (``optimised=False``) the one it is scored on beside the default, e.g. a supervised baseline
    scored on the reward of the runs it is compared with."""
    mc = cfg.metrics
    conv = str(mc.get("convention", "velocity"))
    own = None
    if run_reward is not None:
        own = {**run_reward, "scored_separately": terms_differ_from_default(run_reward), "optimised": optimised}
    return {
        "checkpoint": str(ckpt), "dataset": str(data.root), "split": data.split, "n_windows": len(data.indices),
        "n_expressive": int(data.expressive.sum()), "expressive_quantile": float(mc.get("expressive_quantile", 0.75)),
        "seed": seed, "steps": int(cfg.steps), "w_speak": float(cfg.w_speak), "w_listen": float(cfg.w_listen),
        "cfg_drop": list(check_cfg_drop(cfg.get("cfg_drop"))),
        "precision": str(cfg.get("precision", "fp32")),  # train/evaluate.py replaces "auto" with the one used
        "convention": conv, "dynamic_scale": M.DYNAMIC_SCALE[conv],
        "min_frames": int(mc.get("min_frames", 10)), "publication_scale": bool(mc.get("publication_scale", True)),
        "flame_model": str(mc.flame_model) if mc.get("flame_model") else None,
        "flame_eyelids": None if data.flame is None else bool(data.flame.has_eyelids),
        "run_reward": own,
        "notes": list(data.notes),
    }


def reconstruction_header(h: dict, vae_dir) -> dict:
    """The header of the VAE reconstruction's report: ``h`` (a checkpoint's :func:`header` on the same
    data) with the VAE in place of the checkpoint and no sampler (no seed, no steps)."""
    return {**h, "checkpoint": f"VAE reconstruction: {vae_dir}", "seed": None, "steps": None}


def fmt_value(x, digits: int = 2) -> str:
    """A metric result (or its JSON dict, or a number) -> text; "n/a" when unavailable."""
    if isinstance(x, M.MetricResult):
        x = x.value
    elif isinstance(x, dict):
        x = x.get("value")
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def table1_markdown(rows: list[tuple[str, dict]], fmt=fmt_value) -> str:
    """``rows``: (label, table1 dict {split: {metric: result}}) -> the paper's Table 1 layout."""
    head = ["", *[f"Speaking {m}" if i == 0 else m for i, m in enumerate(TABLE1["speaking"])],
            *[f"Listening {m}" if i == 0 else m for i, m in enumerate(TABLE1["listening"])]]
    return _table(head, [[label, *[fmt(t["speaking"][m]) for m in TABLE1["speaking"]],
                          *[fmt(t["listening"][m]) for m in TABLE1["listening"]]] for label, t in rows])


def supp_markdown(rows: list[tuple[str, dict]], fmt=fmt_value) -> str:
    """``rows``: (label, supplementary dict {split: {metric: {group: result}}}) -> Table 6 layout."""
    groups = list(M.DUALTALK_GROUPS)
    head = ["", "split"] + [f"{m} {g}" for m in SUPP for g in groups]
    return _table(head, [[label, split, *[fmt(s[split][m][g]) for m in SUPP for g in groups]]
                         for label, s in rows for split in SPLITS])


def groups_markdown(rows: list[tuple[str, dict]], fmt=fmt_value) -> str:
    """``rows``: (label, listening_groups dict) -> dynamic deviation and reward per FLAME group; a
    "run reward" column per group the run rewarded with other terms than the default reward."""
    own = [g for g in GROUP_NAMES if any("run_reward" in gr[g] for _, gr in rows)]
    head = ["", *[f"{g} dd" for g in GROUP_NAMES], *[f"{g} reward" for g in GROUP_NAMES], *[f"{g} run reward" for g in own]]
    return _table(head, [[label, *[fmt(gr[g]["dd"]) for g in GROUP_NAMES], *[fmt(gr[g]["reward"], 4) for g in GROUP_NAMES],
                          *[fmt(gr[g].get("run_reward"), 4) for g in own]] for label, gr in rows])


PARTS_NOTE = ("'at best amplitude' = the deviation after scaling each channel of the prediction by the factor that "
              "minimises it (the prediction's own timing, the right amplitude per channel); amplitude = the median of those "
              "factors (> 1: too little motion); window-blind = the best constant per channel in every window (the right "
              "typical amplitude, no idea which window calls for motion; ground truth only). Parameter channels, Table 1 "
              "units (evaluation/deviation_parts.py).")


def parts_markdown(rows: list[tuple[str, dict]], fmt=fmt_value) -> str:
    """``rows``: (label, listening_parts dict) -> per listening dynamic metric the deviation, the same
    at the best amplitude (and the factor) and the window-blind floor (:mod:`.deviation_parts`)."""
    names = [n for n in M.DYNAMIC_METRICS if any(n in p for _, p in rows)]
    head = ["", *[f"{n} {k}" for n in names for k in ("deviation", "at best amplitude", "amplitude", "window-blind")]]
    return _table(head, [[label, *[fmt(p[n][k], 3 if k == "amplitude" else 2) for n in names
                                   for k in ("deviation", "at_best_amplitude", "amplitude", "window_blind")]]
                         for label, p in rows])


def _run_reward_note(h: dict) -> str:
    own = h.get("run_reward")
    if not own:
        return ""
    r = own["rewards"]
    setting = ", ".join(f"{k} {v}" for k, v in r.items() if v not in (None, {}, []))
    if own["scored_separately"] and not own.get("optimised", True):
        return (f" Also scored on reward `{own['reward']}` ({setting}), which the post-trained runs it is compared with "
                f"optimised: the 'run reward' column (the 'reward' columns keep the default reward).")
    if own["scored_separately"]:
        return (f" The run optimised reward `{own['reward']}` ({setting}): its own per-group reward is the "
                f"'run reward' column (the 'reward' columns keep the default reward, comparable across checkpoints).")
    return (f" The run optimised reward `{own['reward']}`{' (' + setting + ')' if setting else ''} with the default "
            f"per-group terms: its rewards are the 'reward' columns of its groups.")


def units_note(h: dict) -> str:
    conv = h["convention"]
    dyn = ("velocity std (paper): |std_t(vel P) - std_t(vel G)|" if conv == "velocity" else
           "position std (ARTalk/UniLS): |std_t(P) - std_t(G)|")
    flame = f"FLAME model {h['flame_model']}" if h["flame_model"] else "n/a: no FLAME model given"
    return (f"FDD / PDD / JDD: {dyn}, x{h['dynamic_scale']:g}, mean over windows with >= {h['min_frames']} frames of the split; "
            f"FDD on {'upper-face FLAME vertices (mm)' if h['flame_model'] else 'expr + eyelid parameters (no FLAME model)'}, "
            f"PDD on rot + neck, JDD on jaw. LVE / MHD in mm ({flame}). "
            f"Table 6: FD, P-FD (jaw x1000, pose x100), MSE (exp x10, jaw x1000, pose x100), SID (bits, higher = more diverse), "
            f"rPCC; exp = expr, pose = rot; per (conversation, actor) sequence, then averaged. "
            f"'dd' = listening velocity-std deviation of one FLAME group (same scale as FDD); reward = the default per-group reward "
            f"(weights var 1, vel 1, drift 0.25, mse 0.1) on listening frames.{_run_reward_note(h)} "
            f"n/a = unavailable (see the JSON notes), never 0.")


def markdown_report(h: dict, res: dict) -> str:
    lines = [f"# Evaluation of `{h['checkpoint']}`", "",
             f"Dataset `{h['dataset']}`, split `{h['split']}`: {h['n_windows']} windows (expressive subset: "
             f"{h['n_expressive']} windows, top {100 * (1 - h['expressive_quantile']):.0f}% of ground-truth variance). "
             + (f"Euler ODE, {h['steps']} steps, CFG w_speak={h['w_speak']:g} w_listen={h['w_listen']:g}"
                + (f" (unconditional branch nulls {'+'.join(h['cfg_drop'])})" if h.get("cfg_drop", list(DROP_KEYS)) != list(DROP_KEYS)
                   and (h["w_speak"], h["w_listen"]) != (1.0, 1.0) else "") + f", seed {h['seed']}."
              if h.get("steps") is not None else "No generation: the ground truth encoded and decoded by the VAE (posterior means)."),
             ""]
    for n in h["notes"]:
        lines.append(f"> note: {n}")
    lines += ["", "## Table 1 layout", "",
              table1_markdown([(f"all (n={res['all']['n_windows']})", res["all"]["table1"]),
                               (f"expressive (n={res['expressive']['n_windows']})", res["expressive"]["table1"])]),
              "", "## Supplementary (Table 6 layout)", "",
              supp_markdown([("all", res["all"]["supplementary"]), ("expressive", res["expressive"]["supplementary"])]),
              "", "## Listening, per FLAME group", "",
              groups_markdown([("all", res["all"]["listening_groups"]), ("expressive", res["expressive"]["listening_groups"])]),
              "", "## Listening dynamic deviations: amplitude or timing", "",
              parts_markdown([("all", res["all"].get("listening_parts", {})),
                              ("expressive", res["expressive"].get("listening_parts", {}))]),
              "", PARTS_NOTE, ""]
    if res.get("per_intent"):
        lines += ["## Listening deviations per intent", "", per_intent_markdown(res["per_intent"]), "", PER_INTENT_NOTE, ""]
    if res.get("intent_floor"):
        lines += ["## Floor for a model that knows the intent", "", intent_floor_markdown(res["intent_floor"]), "",
                  INTENT_FLOOR_NOTE, ""]
    lines += [units_note(h), ""]
    return "\n".join(lines)


PER_INTENT_NOTE = ("Per labelled listener intent (the synthetic corpus' labels): the mean over its windows and, in brackets, "
                   "the share of the split's summed deviation those windows carry: where a deviation comes from.")


INTENT_FLOOR_NOTE = ("Ground truth only: per intent, the best constant per channel over its windows (a model that knows "
                     "each window's listener intent and that intent's typical amplitude, nothing else); the last rows: the "
                     "mean over all counted windows, and the same with one constant for every window (window-blind). A model "
                     "goes below it only by reading cues beyond the intent that predict how much a window moves "
                     "(evaluation/deviation_parts.py). The 'faithful sampler' rows: a model that plays, in each window, the "
                     "amplitude of a random window of the same group instead of the typical one (what a generative model "
                     "reaches that samples exactly the spread its conditions leave open; at or above the matching floor).")


def intent_floor_markdown(floor: dict) -> str:
    """``{metric: {"intent_aware", "text_aware", "window_blind", "n", "per_intent", "sampler"}}``
    (``intent_control.intent_floor``) as one table."""
    metrics = list(floor)
    intents = sorted({g for m in metrics for g in floor[m]["per_intent"]})
    rows = [[g, str(next(floor[m]["per_intent"][g]["n"] for m in metrics if g in floor[m]["per_intent"])),
             *[fmt_value(floor[m]["per_intent"][g]["mean"], 3) if g in floor[m]["per_intent"] else "n/a" for m in metrics]]
            for g in intents]
    rows.append(["all counted windows, knows the intent", "/".join(str(floor[m]["n"]) for m in metrics),
                 *[fmt_value(floor[m]["intent_aware"], 3) for m in metrics]])
    if all("text_aware" in floor[m] for m in metrics):  # reports written before the text-aware floor lack it
        rows.append(["all counted windows, knows what the text says", "", *[fmt_value(floor[m]["text_aware"], 3) for m in metrics]])
    rows.append(["all counted windows, window-blind", "", *[fmt_value(floor[m]["window_blind"], 3) for m in metrics]])
    if all("sampler" in floor[m] for m in metrics):  # reports written before the sampler rows lack them
        for key, what in (("intent_aware", "knows the intent"), ("text_aware", "knows what the text says"),
                          ("window_blind", "window-blind")):
            rows.append([f"faithful sampler, {what}", "", *[fmt_value(floor[m]["sampler"][key], 3) for m in metrics]])
    return _table(["intent", "windows", *metrics], rows)


def per_intent_markdown(per_intent: dict) -> str:
    """``{metric: {intent: {"mean", "n", "share"}}}`` (``intent_control.listening_per_intent``) as one table."""
    metrics = list(per_intent)
    intents = sorted({g for m in metrics for g in per_intent[m]})
    rows = []
    for g in intents:
        n = next(per_intent[m][g]["n"] for m in metrics if g in per_intent[m])
        cells = []
        for m in metrics:
            c = per_intent[m].get(g)
            share = "n/a" if c is None or c["share"] is None else format(c["share"], ".0%")
            cells.append("n/a" if c is None else f"{fmt_value(c['mean'], 3)} ({share})")
        rows.append([g, str(n), *cells])
    return _table(["intent", "windows", *metrics], rows)


def write_report(out: Path, h: dict, res: dict) -> tuple[Path, Path]:
    """``out/metrics.json`` (header + results, without the ``_``-prefixed entries) and ``out/metrics.md``."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {**h, **to_json({k: v for k, v in res.items() if not k.startswith("_")})}
    atomic_write_json(out / "metrics.json", doc)
    atomic_write_bytes(out / "metrics.md", markdown_report(h, res).encode())
    return out / "metrics.json", out / "metrics.md"
