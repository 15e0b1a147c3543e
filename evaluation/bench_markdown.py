"""The benchmark's ``report.md``, rendered section by section from the report dict of
:func:`.benchmark.build_report` (which ``report.json`` holds: ``report_markdown`` of a saved report.json
gives its report.md again)."""
from __future__ import annotations

import numpy as np

from ..envs.flame import GROUP_NAMES
from ..rewards.groups import DEFAULT_WEIGHTS, is_speaking_column
from . import metrics as M
from . import targets as T
from .benchmark import method_label
from .report import supp_markdown, table1_markdown, units_note
from .scoring import LISTENING_DD, SPLITS, SUPP, TABLE1
from .seed_stats import fmt_ms

__all__ = ["report_markdown"]

PAPER_ABLATION = {"FDD": (28.03, 18.85), "PDD": (2.15, 1.90), "JDD": (1.09, 0.87)}  # Table 4: without GDPO -> GDPO
RECON_LABEL = "VAE reconstruction (reference)"
RECON_NOTE = ("the ground truth encoded and decoded by the frozen VAE (posterior means, no generation): what a model that "
              "predicted every latent exactly would score; a method below its dynamic deviations emits latents the VAE never "
              "produces from real motion.")


def _fmt(x: float | None, spec: str = ".3f") -> str:
    if x is None:
        return "n/a"
    return "inf" if np.isinf(x) else format(x, spec)


def _extended_note(setup: dict, post: list[str]) -> str:
    """" Runs continued from a shorter run (bench extend=true): ..." or ""."""
    ext = setup.get("extended_from") or {}
    parts = [f"{method_label(m)} seed {s} from {n}" for m in post for s, n in (ext.get(m) or {}).items()]
    return (" Runs continued from a shorter run of the same settings (`extend=true`, equal to a straight run): "
            + ", ".join(parts) + " iterations.") if parts else ""


def _host_note(setup: dict) -> str:
    """" Runs trained on <host>. Evaluated on <host>." or, when the runs come from several hosts, which run from which:
    a CPU or thread count of their own can give other weights, and RL runs another draw (docs/benchmarks.md, "bench_v14
    re-run from another supervised checkpoint"). Reports before hosts were recorded: ""."""
    hosts = setup.get("hosts")
    if not hosts:
        return ""
    ev = f" Evaluated on {setup.get('eval_host', '?')}."
    if list(hosts) == ["unrecorded"]:
        return f" The runs' host is not recorded (trained before runs recorded it).{ev}"
    if len(hosts) == 1:
        return f" Runs trained on {next(iter(hosts))}.{ev}"
    return (" **Runs trained on several hosts**: " + "; ".join(f"{h}: {', '.join(r)}" for h, r in hosts.items())
            + ". The same settings can give other weights on another CPU or thread count, and RL runs another draw: "
            "compare methods trained on one host (docs/benchmarks.md, \"bench_v14 re-run from another supervised "
            "checkpoint\")." + ev)


def _table_rows(rep, methods) -> list[tuple[str, dict]]:
    """(label, aggregated metrics) of every method, then the VAE reconstruction's reference row when present."""
    recon = rep.get("reconstruction")
    return [(method_label(m), rep["metrics"][m]) for m in methods] + ([(RECON_LABEL, recon["metrics"])] if recon else [])


def _header_markdown(rep, methods, groups) -> list[str]:
    """Title, the setup paragraph (data, seeds, budget, samplers, commit) and the targets."""
    s = rep["setup"]
    git = s["git"]
    local = f" + local changes in {', '.join(x.split()[-1] for x in git['modified'])}" if git.get("modified") else ""
    post = [m for m in methods if m != "supervised"]
    run_sde = s.get("sde") or {}
    wall = ", ".join(f"{method_label(m)} {s['wall_s'].get(m, 'n/a')} s" for m in post)
    L = ["# Benchmark: supervised-only vs GRPO vs GDPO", ""]
    L += [f"Dataset `{s['dataset']}` ({s['split']} split: {s['n_windows']} windows, expressive subset {s['n_expressive']}); "
          f"seeds {s['seeds']}; reward `{s['reward']}` ({', '.join(groups)}); {s['iterations']} RL iterations per run, "
          f"{s['rollouts_per_run']} SDE rollouts ({s['transitions_per_run']} transitions) per run, identical for every method "
          f"(mean wall time per run: {wall}). Post-training methods and the SDE their runs trained with: "
          + ", ".join(f"{method_label(m)}: env.sde={run_sde.get(m, '?')}" for m in post) + ". "
          + "".join(f"Variant {method_label(m)}: {' '.join(o)} (applied last; a budget it changes is its own). "
                    for m, o in (s.get("variants") or {}).items())
          + f"Evaluation: Euler ODE {s['steps']} steps, CFG 1, sampling seed = run seed (supervised-only: the same "
          f"checkpoint sampled with each seed). Values are mean ± std over seeds (sample std). "
          f"Code: commit {git.get('commit')}{local}.{_extended_note(s, post)}{_host_note(s)}", ""]
    L += ["## Targets (issue 10)", "", "Each target computed from the figures below; Welch p over seeds and the 95 % paired-bootstrap "
          "interval over windows both decide significance.", ""]
    L += [T.targets_markdown([T.Target(**t) for t in rep["targets"]]), ""]
    return L


def _split(rep) -> str:
    """The split the report evaluated (``eval.split``: test, or train for the probes), as its sections name it."""
    return str(rep["setup"].get("split", "test"))


def _table1_markdown(rep, methods) -> list[str]:
    """Table 1 layout on all windows of the evaluated split and on the expressive subset."""
    recon = rep.get("reconstruction")
    L = []
    titles = (("all", f"all {_split(rep)} windows"), ("expressive", "expressive subset (top quartile of ground-truth variance)"))
    for subset, title in titles:
        L += [f"## Table 1 layout, {title}", ""]
        rows = [(label, {sp: {n: a.get(f"{subset}/{sp}/{n}") for n in TABLE1[sp]} for sp in TABLE1})
                for label, a in _table_rows(rep, methods)]
        L += [table1_markdown(rows, fmt=fmt_ms), ""]
    L += ["Lower is better. " + units_note(rep["setup"]["eval_header"]) + (f" {RECON_LABEL}: {RECON_NOTE}" if recon else ""), ""]
    return L


def _findings_markdown(rep) -> list[str]:
    """Each method against supervised-only: relative change and Welch's test over seeds, then the paired comparison."""
    L = ["## Findings (computed)", ""]
    pa = ", ".join(f"{k} {a:g} -> {b:g} ({(b - a) / a:+.0%})" for k, (a, b) in PAPER_ABLATION.items())
    L += [f"Paper ablation (Seamless, listening, without GDPO -> GDPO): {pa}.", ""]
    L += ["| method | metric | supervised-only | method | relative change | Welch t | p |", "|---|---|---|---|---|---|---|"]
    for m, fm in rep["findings"].items():
        for k, d in fm.items():
            if "/" not in k or d.get("rel_change") is None:
                continue
            L.append(f"| {method_label(m)} | {k} | {d['supervised']:.3f} | {d[m]:.3f} | {d['rel_change']:+.1%} | "
                     f"{_fmt(d.get('welch_t'), '+.2f')} | {_fmt(d.get('welch_p'))} |")
    L += ["", "Negative change = closer to the ground-truth dynamics (better). Welch's two-sided test over seeds "
          "(|t| > ~2.8 is significant at 5 % with 3 + 3 seeds).", ""]
    return L + paired_markdown(rep["paired"], rep["findings"])


def _evenness_markdown(rep, methods) -> list[str]:
    """Per-group listening velocity-std deviation and how evenly the rewarded groups improved."""
    L = ["### Per-group listening dynamics and evenness", ""]
    head = ["method", *[f"{g} dd" for g in GROUP_NAMES], "rewarded: mean rel. change", "std across groups", "improved", "worst"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, a), m in zip(_table_rows(rep, methods), [*methods, None]):  # None: the reconstruction row (no findings)
        cells = [fmt_ms(a.get(f"all/listening/group/{g}/dd")) for g in GROUP_NAMES]
        ev = rep["findings"].get(m, {}).get("evenness") if m else None
        if ev and ev["mean_rel_change"] is not None:
            cells += [f"{ev['mean_rel_change']:+.1%}", f"{ev['std_rel_change']:.1%}", f"{ev['n_improved']}/{len(ev['rewarded_groups'])}",
                      str(ev["worst_group"])]
        else:
            cells += ["–"] * 4
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    L += ["", "dd = listening velocity-std deviation of one FLAME group (x1000, lower is better); relative changes vs supervised-only "
          "over the rewarded groups (negative = better; a small std across groups = even improvement).", ""]
    return L


def _rewards_markdown(rep, methods, groups) -> list[str]:
    """Evaluation reward per FLAME group, and the training reward's first and last iterations with its trend."""
    L = ["## Rewards per FLAME group", "",
         f"Evaluation reward on the {_split(rep)} windows' listening frames (ODE samples; higher is better):", ""]
    head = ["method", *GROUP_NAMES]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, a in _table_rows(rep, methods):
        L.append(f"| {label} | " + " | ".join(fmt_ms(a.get(f"all/listening/group/{g}/reward"), 4) for g in GROUP_NAMES) + " |")
    L += _run_reward_markdown(rep, methods)
    L += ["", "Training reward (batch mean over the SDE rollouts; first 5 -> last 5 iterations), see `reward_curves.png`:", ""]
    head = ["method", *groups]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo, by_g in rep["training"]["reward"].items():
        cells = [f"{fmt_ms(by_g[g]['first'], 4)} -> {fmt_ms(by_g[g]['final'], 4)}" for g in groups]
        L.append(f"| {method_label(algo)} | " + " | ".join(cells) + " |")
    L += trend_markdown(rep["training"]["trend_last_third"], groups)
    return L + ["", "![reward curves](reward_curves.png)", ""]


def _run_reward_markdown(rep, methods) -> list[str]:
    """The evaluation reward under the reward the runs optimised, when its per-group terms are not the default's
    (the supervised model scored on it too): did training raise what it optimised, on the evaluation sampler?"""
    key = "all/listening/group/{}/run_reward"
    own = [g for g in GROUP_NAMES if any(key.format(g) in rep["metrics"][m] for m in methods)]
    if not own:
        return []
    L = ["", "The same, under the reward the post-trained runs optimised (" + _reward_terms_text(rep["setup"].get("run_reward"))
         + "; the supervised model scored on it too):", "", "| method | " + " | ".join(own) + " |", "|" + "---|" * (len(own) + 1)]
    return L + [f"| {method_label(m)} | " + " | ".join(fmt_ms(rep["metrics"][m].get(key.format(g)), 4) for g in own) + " |"
                for m in methods]


def _reward_terms_text(run_reward: dict | None) -> str:
    """'term weights var 1, vel 4, drift 0.25, mse 0.1' (the defaults with the run's overrides), plus any other
    group reward class or extra terms the runs recorded."""
    if not run_reward:
        return "its own per-group terms"
    r = run_reward.get("rewards") or {}
    weights = {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in (r.get("weights") or {}).items()}}
    text = "term weights " + ", ".join(f"{k} {v:g}" for k, v in weights.items())
    if r.get("group_reward"):
        text += f", group reward {r['group_reward']}"
    if r.get("extra_terms"):
        text += ", extra terms " + ", ".join(sorted(r["extra_terms"]))
    return text


def _supplementary_markdown(rep, methods) -> list[str]:
    """Table 6 layout (per DualTalk group, both turns) on all windows of the evaluated split."""
    rows = [(label, {sp: {mm: {g: a.get(f"all/{sp}/{mm}/{g}") for g in M.DUALTALK_GROUPS} for mm in SUPP} for sp in SPLITS})
            for label, a in _table_rows(rep, methods)]
    return [f"## Supplementary (Table 6 layout), all {_split(rep)} windows", "", supp_markdown(rows, fmt=fmt_ms), ""]


def _text_control_markdown(rep, methods, intents) -> list[str]:
    """The intent classifier, the accuracy of prompted generations and their confusion, in both classifiers' eyes."""
    L = ["## Text control", ""]
    ci = rep["intent_classifier"]
    if ci.get("note"):
        return L + [f"Not measured: {ci['note']}", ""]
    L += [f"Intent classifier (logistic regression on listening-motion statistics) trained on {ci['train_windows']} ground-truth "
          f"train windows (train accuracy {ci['train_accuracy']:.0%}); on ground-truth {_split(rep)} windows: {ci['gt_test_accuracy']:.0%}"
          + (f" (their VAE reconstruction: {ci['vae_reconstruction_accuracy']:.0%}, what survives the VAE)"
             if ci.get("vae_reconstruction_accuracy") is not None else "")
          + f"; chance {1 / len(intents):.0%}. Accuracy of the generated listening motion:", ""]
    L += _accuracy_table(rep["controls"], methods, intents)
    L += _confusion_tables(rep["controls"], methods, intents)
    vs = ci.get("vae_space")
    if vs and any("vae_space" in rep["controls"][m] for m in methods):
        L += ["Supplementary (not the target's figure): the same generated motion scored by the same classifier trained on the "
              f"VAE reconstructions of the same {vs['train_windows']} train windows (train accuracy {vs['train_accuracy']:.0%}; "
              f"on the reconstructed {_split(rep)} windows {vs.get('vae_reconstruction_accuracy', float('nan')):.0%}, on the ground "
              f"truth {vs.get('gt_test_accuracy', float('nan')):.0%}). The ground-truth classifier reads intent partly from "
              "motion the VAE cannot carry; this one asks whether the prompt is followed within what the VAE represents.", ""]
        sub = {m: rep["controls"][m]["vae_space"] for m in methods if "vae_space" in rep["controls"][m]}
        L += _accuracy_table(sub, list(sub), intents)
        L += _confusion_tables(sub, list(sub), intents, "VAE-space classifier")
    return L


def _cfg_sweep_markdown(cfg_weights: list[float], rep, methods) -> list[str]:
    """Listening motion std against w_listen for each unconditional branch, beside the ground truth's."""
    L = ["## CFG intensity sweep", "", "Listening motion std (mean over channels of the std over listening frames) against w_listen "
         "(w_speak = 1), for each unconditional branch (the conditions it nulls; the paper's nulls text, audio and partner "
         "motion):", ""]
    show = [g for g in ("expr", "jaw", "rot", "eyelid") if g in GROUP_NAMES]
    variants = rep["controls"][methods[0]].get("cfg_sweeps") or {"text+audio+motion": rep["controls"][methods[0]]["cfg_sweep"]}
    gt = rep["controls_gt_listening_std"]
    for name in variants:
        L += [f"Unconditional branch nulls {name}:", ""]
        head = ["w_listen", *[f"{method_label(m)} {g}" for m in methods for g in show]]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        sweep = {m: (rep["controls"][m].get("cfg_sweeps") or {}).get(name, rep["controls"][m]["cfg_sweep"]) for m in methods}
        for w in [f"{float(x):g}" for x in cfg_weights]:
            L.append(f"| {w} | " + " | ".join(fmt_ms(sweep[m][w][g], 4) for m in methods for g in show) + " |")
        L.append("| ground truth | " + " | ".join(("n/a" if gt.get(g) is None else f"{gt[g]:.4f}") for m in methods for g in show) + " |")
        L += [""]
    return L


def _all_metrics_markdown(rep, methods) -> list[str]:
    """Every aggregated metric of every method (mean ± std over seeds)."""
    agg = rep["metrics"]
    L = ["## All metrics (mean ± std over seeds)", "", "| metric | " + " | ".join(method_label(m) for m in methods) + " |",
         "|" + "---|" * (len(methods) + 1)]
    for k in sorted({k for m in methods for k in agg[m]}):
        L.append(f"| {k} | " + " | ".join(fmt_ms(agg[m].get(k), 4) for m in methods) + " |")
    return L + [""]


def report_markdown(cfg_weights: list[float], rep, methods, groups, intents) -> str:
    """The benchmark's report.md from its report dict, section by section."""
    agg, recon = rep["metrics"], rep.get("reconstruction")
    L = _header_markdown(rep, methods, groups)
    L += _table1_markdown(rep, methods)
    L += _findings_markdown(rep)
    L += _evenness_markdown(rep, methods)
    L += vae_ceiling_markdown(recon, rep["sde_choice"].get("ode_quality") or {}, agg, methods)
    L += parts_section_markdown(agg, methods, recon)
    L += per_intent_markdown(rep.get("per_intent") or {}, methods, rep.get("intent_floor"),
                             (rep.get("reconstruction") or {}).get("per_intent"), split=_split(rep))
    L += sde_markdown(rep["sde_choice"])
    L += variants_markdown(rep.get("variants") or {})
    L += mechanism_markdown(rep["mechanism"], groups, rep["setup"].get("env") or {})
    L += _rewards_markdown(rep, methods, groups)
    L += _supplementary_markdown(rep, methods)
    L += _text_control_markdown(rep, methods, intents)
    L += _cfg_sweep_markdown(cfg_weights, rep, methods)
    L += ["", f"## Listening motion, one {_split(rep)} window", "", "![listening motion](listening_motion.png)", ""]
    L += _all_metrics_markdown(rep, methods)
    return "\n".join(L)


def _accuracy_table(controls: dict, methods, intents) -> list[str]:
    """Markdown rows: own-text, mean prompted and per-intent accuracy of each method (mean ± std over seeds)."""
    head = ["method", "window's own text", "prompted intent (mean)", *intents]
    L = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        c = controls[m]
        L.append(f"| {method_label(m)} | {fmt_ms(c['own_text_accuracy'])} | {fmt_ms(c['prompt_accuracy'])} | "
                 + " | ".join(fmt_ms(c["per_intent"][i]) for i in intents) + " |")
    return L + [""]


def _confusion_tables(controls: dict, methods, intents, scorer: str = "") -> list[str]:
    """Markdown: per method, prompted intent x classified intent (windows summed over seeds)."""
    L = []
    for m in methods:
        conf = controls[m].get("confusion")
        if conf is not None:
            L += [f"{method_label(m)}, what each prompted intent's motion is classified as{f' ({scorer})' if scorer else ''} "
                  "(windows, summed over seeds; rows: the prompt, columns: the classifier's answer):", "",
                  "| prompt | " + " | ".join(intents) + " |", "|" + "---|" * (len(intents) + 1)]
            L += [f"| {i} | " + " | ".join(str(v) for v in row) + " |" for i, row in zip(intents, conf)] + [""]
    return L


def _mean_ratio(a: dict, g: str, figure: str) -> str:
    """``<figure>_pred / <figure>_gt`` of group ``g`` in the aggregated metrics ``a`` (listening, all windows)."""
    p, t = ((a.get(f"all/listening/group/{g}/{figure}_{w}") or {}).get("mean") for w in ("pred", "gt"))
    return _fmt(p / t if p is not None and t else None, ".2f")


def vae_ceiling_markdown(recon: dict | None, sup_quality: dict, agg: dict, methods: list[str]) -> list[str]:
    """How much of the listening collapse is the VAE's: velocity-std ratios of the reconstruction and
    of the supervised model, and every method's listening position std and band velocity stds against
    the reconstruction's."""
    if not recon:
        return []
    q = recon["quality"]
    L = ["## The VAE's ceiling", "", f"{RECON_LABEL}: {RECON_NOTE} Listening velocity-std ratio pred / gt per group "
         "(the collapse targets' figure) of the reconstruction and of the supervised model (ODE, mean over seeds), and the "
         "supervised model's share of what the VAE reproduces:", ""]
    head = ["", *GROUP_NAMES]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rv = {g: q.get(f"listening/{g}/vel_std_ratio") for g in GROUP_NAMES}
    sv = {g: (sup_quality.get(f"listening/{g}/vel_std_ratio") or {}).get("mean") for g in GROUP_NAMES}
    L.append("| VAE reconstruction | " + " | ".join(_fmt(rv[g]) for g in GROUP_NAMES) + " |")
    L.append("| supervised-only | " + " | ".join(_fmt(sv[g]) for g in GROUP_NAMES) + " |")
    L.append("| supervised / reconstruction | " + " | ".join(_fmt(sv[g] / rv[g] if sv[g] and rv[g] else None, ".2f")
                                                          for g in GROUP_NAMES) + " |")
    rows = [(method_label(m), agg[m]) for m in methods] + [(RECON_LABEL, recon["metrics"])]
    table_head = ["| " + " | ".join(["method", *GROUP_NAMES]) + " |", "|" + "---|" * (len(GROUP_NAMES) + 1)]
    L += ["", "Listening position std pred / gt per group (mean over windows of the std over listening frames; above the "
          "reconstruction's = the method's decoded motion moves more than anything the VAE reproduces from real latents):", ""]
    L += table_head + [f"| {label} | " + " | ".join(_mean_ratio(a, g, "std") for g in GROUP_NAMES) + " |" for label, a in rows]
    L += ["", f"Listening velocity std by band, pred / gt, as low / high: low = the motion Gaussian-smoothed over "
          f"{M.BAND_SIGMA:g} frames (slow movement: reactions, nods), high = the rest (frame-to-frame movement: jitter, "
          "tracker noise). Where a method's extra motion goes:", ""]
    L += table_head + [f"| {label} | " + " | ".join(f"{_mean_ratio(a, g, 'vel_low')} / {_mean_ratio(a, g, 'vel_high')}"
                                                    for g in GROUP_NAMES) + " |" for label, a in rows]
    return L + [""]


def parts_section_markdown(agg: dict, methods: list[str], recon: dict | None) -> list[str]:
    """Listening FDD / PDD / JDD per method as deviation, at the best amplitude per channel (median
    factor) and the window-blind floor (:mod:`.deviation_parts`), means over seeds; changes vs supervised."""
    names = [n for n in M.DYNAMIC_METRICS if any(f"all/listening/parts/{n}/deviation" in agg[m] for m in methods)]
    if not names or "supervised" not in methods:
        return []

    def get(a: dict, n: str, k: str) -> float | None:
        return (a.get(f"all/listening/parts/{n}/{k}") or {}).get("mean")

    ref = {n: get(agg["supervised"], n, "deviation") for n in names}

    def rel(x: float | None, n: str) -> str:
        return "" if x is None or not ref[n] else f" ({x / ref[n] - 1:+.0%})"

    def cell(a: dict, n: str) -> str:
        d, b, amp = get(a, n, "deviation"), get(a, n, "at_best_amplitude"), get(a, n, "amplitude")
        return f"{_fmt(d, '.3f')}{rel(d, n)} / {_fmt(b, '.3f')}{rel(b, n)} x{_fmt(amp, '.2f')}"

    rows = [(method_label(m), agg[m]) for m in methods] + ([(RECON_LABEL, recon["metrics"])] if recon else [])
    L = ["## Listening deviations: amplitude or timing", "",
         "Each listening dynamic deviation (parameter channels, x1000, mean over seeds) as measured / at the best amplitude "
         "(each channel's per-window stds times the factor that minimises its deviation: the method's own timing, the right "
         "amplitude per channel; x = the median factor, > 1 = too little motion), change vs supervised-only in brackets. A "
         "target the 'at best amplitude' figure meets is missed by amplitude alone; one it misses needs motion in other "
         "windows (timing). Window-blind floor: the best constant per channel in every window (ground truth only; "
         "evaluation/deviation_parts.py).", ""]
    L += ["| method | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    L += [f"| {label} | " + " | ".join(cell(a, n) for n in names) + " |" for label, a in rows]
    blind = {n: get(agg["supervised"], n, "window_blind") for n in names}
    L.append("| window-blind floor | " + " | ".join(f"{_fmt(blind[n], '.3f')}{rel(blind[n], n)}" for n in names) + " |")
    return L + [""]


def per_intent_markdown(per_intent: dict, methods: list[str], floor: dict | None = None,
                        reconstruction: dict | None = None, split: str = "test") -> list[str]:
    """Listening FDD / PDD / JDD per listener intent: per method the mean over the intent's windows and
    (in brackets) the share of the method's summed deviation those windows carry; ``reconstruction``
    (the VAE reconstruction's own ``{metric: {intent: ...}}``): a column after the methods, what perfect
    latents reach; ``floor`` (:func:`.intent_control.intent_floor`): a last column, the floor for a model
    that knows the intent."""
    if not per_intent:
        return []
    L = ["## Listening deviations per intent", "",
         "Mean over the windows of each labelled listener intent (the window's text; seed-mean per window, Table 1 units) "
         "and, in brackets, the share of the method's total over all windows that they carry: where a deviation comes from.", ""]
    if floor:
        L += ["Last column, the floor for a model that knows the intent: per intent, the best constant per channel over its "
              "windows (its typical amplitude; ground truth only, evaluation/deviation_parts.py). A method goes below it only "
              "by reading cues beyond the intent that predict how much a window moves; the row 'all windows' gives the "
              "mean over every counted window, beside the window-blind floor (one constant for all). The row 'faithful "
              "sampler': a model that plays, in each window, the amplitude of a random window of the same group instead of "
              "the typical one, what a generative model reaches that samples exactly the spread its conditions leave open "
              "(per intent in brackets).", ""]
    if reconstruction:
        L += [f"Column 'VAE reconstruction': the {split} windows' ground truth encoded and decoded by the frozen VAE, what a model "
              "that predicted every latent exactly reaches per intent (a method goes below it only with latents the VAE never "
              "produces from real motion).", ""]
    for k in LISTENING_DD:
        ms = [m for m in methods if k in per_intent.get(m, {})]
        if not ms:
            continue
        fk = (floor or {}).get(k.split("/")[-1])
        rk = (reconstruction or {}).get(k)
        intents = sorted({g for m in ms for g in per_intent[m][k]})
        L += [f"{k.split('/')[-1]}:", "", "| intent | windows | " + " | ".join(method_label(m) for m in ms)
              + (" | VAE reconstruction" if rk else "") + (" | floor, knows the intent |" if fk else " |"),
              "|" + "---|" * (len(ms) + 2 + bool(rk) + bool(fk))]
        def share_cell(c: dict | None) -> str:
            return "n/a" if c is None else f"{_fmt(c['mean'])} ({_fmt(c['share'], '.0%')})"

        for g in intents:
            cells = [share_cell(per_intent[m][k].get(g)) for m in ms] + ([share_cell(rk.get(g))] if rk else [])
            if fk:
                fs_g = ((fk.get("sampler") or {}).get("per_intent") or {}).get(g)
                cells.append(_fmt((fk["per_intent"].get(g) or {}).get("mean")) + ("" if fs_g is None else f" (sampler {_fmt(fs_g)})"))
            n = next(per_intent[m][k][g]["n"] for m in ms if g in per_intent[m][k])
            L.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
        # the floor's rows over all windows, and the faithful sampler's (what a model reaches that samples the
        # spread its conditions leave open, not the typical amplitude) where the report has it
        for row, f in (("all windows", fk), ("all windows, faithful sampler", (fk or {}).get("sampler"))):
            if f:
                L.append(f"| {row} | {fk['n']} | " + " | ".join("" for _ in ms) + (" | " if rk else "")
                         + f" | {_fmt(f['intent_aware'])} (knows what the text says {_fmt(f.get('text_aware'))}; "
                         f"window-blind {_fmt(f['window_blind'])}) |")
        L += [""]
    return L


def paired_markdown(paired: dict, fnd: dict) -> list[str]:
    """The paired per-window comparison of every method vs supervised-only (with Welch over seeds beside it)."""
    L = ["## Paired per-window comparison vs supervised-only", ""]
    if not paired:
        return L + ["Not computed (no supervised-only evaluation).", ""]
    L += ["Per window, the metric difference method - supervised-only with the same sampling seed (paired), averaged over seeds; "
          "95 % percentile-bootstrap interval over windows; share of windows improved (difference < 0).", ""]
    L += ["| method | subset | metric | supervised-only | method | mean diff [95 % CI] | rel. change | windows improved | Welch t (p) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for m, by_subset in paired.items():
        for subset, res in by_subset.items():
            for k in sorted(res, key=lambda k: (not k.startswith("listening"), k)):
                p = res[k]
                f = (fnd.get(m) or {}).get(f"{subset}/{k}") or {}
                welch = "n/a" if f.get("welch_t") is None else f"{f['welch_t']:+.2f} ({f['welch_p']:.3f})"
                L.append(f"| {method_label(m)} | {subset} | {k} | {p['reference']:.3f} | {p['method']:.3f} | {p['mean_diff']:+.3f} "
                         f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] | {_fmt(p['rel_change'], '+.1%')} | "
                         f"{p['frac_improved']:.0%} of {p['n_windows']} | {welch} |")
    return L + [""]


def sde_markdown(sde: dict) -> list[str]:
    """The SDE choice: final-sample dynamics of the supervised model and, when two SDEs were trained, the verdict."""
    L = ["## SDE choice", ""]
    if sde.get("dynamics"):
        L += ["### Final-sample dynamics (supervised model, no training)", "",
              "Listening velocity-std ratio pred / gt per group (1 = ground-truth dynamics) and speaking jaw correlation, "
              "mean ± std over seeds. RL optimises the rewards of SDE samples and is evaluated on ODE samples.", ""]
        head = ["sampler", *[f"{g} ratio" for g in GROUP_NAMES], "speaking jaw corr", "|log ratio / ODE's|"]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        close = sde["closest_to_ode"]
        for v, row in sde["dynamics"].items():
            cells = [fmt_ms(row.get(f"listening/{g}/vel_std_ratio"), 3) for g in GROUP_NAMES]
            d = close["distance"].get(v)
            hist = (sde.get("variants") or {}).get(v, {}).get("history")
            last = (f"(each token given the {hist} history; not ranked)" if hist else
                    "(reference)" if d is None and v not in close["distance"] else _fmt(d))
            L.append(f"| {v} | " + " | ".join(cells) + f" | {fmt_ms(row.get('speaking/jaw_corr'), 3)} | {last} |")
        best = close.get("best")
        L += ["", f"Better final-sample dynamics (closest to the evaluation ODE's, mean over groups of |log ratio_SDE / ratio_ODE|): "
              f"**{best or 'n/a'}**.", ""]
    models = sde.get("models") or {}
    L += ["### Post-trained model", ""]
    if not models:
        L += ["One SDE per algorithm in this run: add a variant such as `gdpo@marginal` to `algos` to compare the SDEs after training.", ""]
    for name, d in models.items():
        v = d["verdict"]
        per = ", ".join(f"{k}: {w or 'no significant difference'}" for k, w in v["per_metric"].items())
        L += [f"- {method_label(d['method'])} (env.sde={d['method_sde']}) vs {method_label(d['reference'])} "
              f"(env.sde={d['reference_sde']}), listening dynamic deviations paired per window: {per or 'n/a'}. Better post-trained model: "
              f"**{v['better'] or 'neither (no clear difference)'}**."]
        for k, p in sorted(d["paired"]["all"].items()):
            if k.startswith("listening/"):
                L.append(f"  - {k}: {p['reference']:.3f} -> {p['method']:.3f} ({_fmt(p['rel_change'], '+.1%')}), {p['mean_diff']:+.3f} "
                         f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}], {p['frac_improved']:.0%} of {p['n_windows']} windows lower")
    return L + [""]


def variants_markdown(variants: dict) -> list[str]:
    """Each variant (``gdpo+nokl``) against its base (``gdpo``), and each chosen ``compare`` pair: Welch over
    seeds and the paired per-window comparison (:func:`.benchmark.variant_report`); nothing without them."""
    if not variants:
        return []
    L = ["## Variants vs their base", "",
         "Each variant (`algos` entry `<method>+<name>`, the overrides of `variants.<name>` applied last) against the same "
         "method without them, and each `compare` pair `[method, base]`, trained with the same seeds, windows and budget: "
         "mean +- std over seeds, relative change, Welch t (p) over seeds, and per window the paired difference method - base "
         "with its 95 % bootstrap interval (lower is better for every metric here; listening on all windows).", ""]
    for key, d in variants.items():
        L += [f"{method_label(d.get('method', key))} vs {method_label(d['base'])}:", "",
              "| metric | base | variant | change | Welch t (p) | paired diff [95 % CI] |", "|---|---|---|---|---|---|"]
        for k, w in d["welch"].items():
            p = ((d.get("paired") or {}).get("all") or {}).get(k.split("/", 1)[1])
            t = "n/a" if w["t"] is None else f"{w['t']:+.2f} ({w['p']:.3f})"
            pair = "n/a" if p is None else f"{p['mean_diff']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"
            L.append(f"| {k.split('/', 1)[1]} | {fmt_ms(w['base'], 3)} | {fmt_ms(w['variant'], 3)} | "
                     f"{_fmt(w['rel_change'], '+.1%')} | {t} | {pair} |")
        L.append("")
    return L


def mechanism_markdown(mech: dict, groups: list[str], env: dict) -> list[str]:
    """Mean over iterations of the GDPO paper mechanism figures, per method."""
    L = ["## GDPO mechanism figures", ""]
    if not mech:
        return L + ["Not available (no advantage logs).", ""]
    G = env.get("group_size")
    n_lis = max(1, sum(not is_speaking_column(g) for g in groups))
    spk = "" if n_lis == len(groups) else (" Speaking columns (`<group>@speaking`) are correlated with the advantage of the speaking "
                                           "tokens (objective_tokens=matched; runs logged before that figure existed show the listening "
                                           "advantage's) and are left out of the dominance.")
    L += [f"Mean over iterations, then mean ± std over seeds: distinct advantage values per prompt group (of G = {G or '?'} rollouts), "
          "Pearson correlation of the final advantage with each rewarded group's within-group z-scored reward (an even "
          f"advantage gives about 1/sqrt({n_lis}) = {1 / np.sqrt(n_lis):.2f} each), and the dominance "
          "max / median over groups of those correlations (about 1: even; large: the advantage follows one group)." + spk, ""]
    head = ["method", "distinct per group", *[f"corr {g}" for g in groups], "dominance", "top group"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, d in mech.items():
        L.append(f"| {method_label(m)} | {fmt_ms(d['distinct'])} | " + " | ".join(fmt_ms(d["corr"][g]) for g in groups)
                 + f" | {_fmt(d['dominance'], '.2f')} | {d['top_group'] or 'n/a'} |")
    return L + ["", "![mechanism](mechanism.png)", ""]


def _se_units(t: dict) -> str:
    se = t.get("slope_se")
    return "" if not se else f" = {t['slope'] / se:+.1f} se"


def trend_markdown(trends: dict, groups: list[str]) -> list[str]:
    """Slope of the seed-mean training reward over the last third of iterations, per method and group."""
    L = ["", f"Trend over the last third of iterations (least-squares slope per iteration of the mean over seeds, in units of "
         f"its standard error; in brackets the share of the curve's whole gain made in that third). Still rising: slope > 0, "
         f"share >= {T.STILL_RISING_SHARE:.0%} and slope >= {T.RISING_SLOPE_SE:g} standard errors; else flattened:", ""]
    head = ["method", *groups, "verdict"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, by_g in trends.items():
        rising = T.still_rising(by_g, groups)
        known = [g for g in groups if by_g[g]["slope"] is not None]
        verdict = "n/a (< 3 iterations)" if not known else (f"still rising: {', '.join(rising)}" if rising else "flattened")
        L.append(f"| {method_label(m)} | " + " | ".join(
            "n/a" if by_g[g]["slope"] is None else f"{by_g[g]['slope']:+.2e}{_se_units(by_g[g])} ({_fmt(by_g[g]['share'], '.0%')})"
            for g in groups)
            + f" | {verdict} |")
    return L
