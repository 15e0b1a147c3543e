"""The GRPO vs GDPO vs supervised-only benchmark (``train/bench.py``): its training budget, run
folders, training curves, figures and report.

- :func:`training_budget`: RL iterations, SDE rollouts and denoising transitions of one run, from
  the resolved config the run recorded (episode length ``env.episode_tokens`` or the model window);
- :func:`replaceable_run_dir`: whether a run folder may be deleted before a fresh run (only a
  run this benchmark started, identified by its :func:`run_stamp`, or an empty folder);
- :func:`read_curve` / :func:`reward_curves`: per-group training reward from the runs' CSV logs;
- :func:`plot_reward_curves` / :func:`plot_listening_window`: the two figures;
- :func:`build_report` / :func:`report_markdown`: ``report.json`` and ``report.md`` (statistics over
  seeds from :mod:`.seed_stats`, tables from :mod:`.report`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..envs.flame import FPS, GROUP_NAMES, GROUPS
from . import metrics as M
from .data import EvalData
from .report import supp_markdown, table1_markdown, units_note
from .scoring import SPLITS, SUPP, TABLE1
from .seed_stats import aggregate_seeds, findings, fmt_ms, mean_std

METHOD_LABEL = {"supervised": "supervised-only", "grpo": "GRPO", "gdpo": "GDPO"}
PAPER_ABLATION = {"FDD": (28.03, 18.85), "PDD": (2.15, 1.90), "JDD": (1.09, 0.87)}  # Table 4: without GDPO -> GDPO
# The benchmark's record of a training run it started: ``runs/<algo>_seed<S>.bench_run.json`` beside the
# run folder (train/gdpo.py accepts only an empty folder or one of its own runs as out_dir), written
# before training starts and completed when it finishes. Older versions kept it inside the folder.
RUN_STAMP_SUFFIX = ".bench_run.json"
LEGACY_RUN_STAMP = "bench_run.json"


# ----------------------------------------------------------------------------------------------
# training runs


def training_budget(run_config: dict, arch: dict | None) -> dict:
    """Iterations, SDE rollouts and transitions of one RL run from its resolved config.

    rollouts = iterations x n_prompts x group_size; transitions = rollouts x tokens per episode x
    sde_steps, with tokens per episode = ``env.episode_tokens`` or, when null, the model's window
    (``arch``: the checkpoint's ``window`` / ``r``). Unknown parts count as 0.
    """
    env, optim = dict(run_config.get("env") or {}), dict(run_config.get("optim") or {})
    iterations = int(optim.get("iterations") or 0)
    rollouts = iterations * int(env.get("n_prompts") or 0) * int(env.get("group_size") or 0)
    tokens = env.get("episode_tokens")
    if tokens is None and arch and arch.get("window") and arch.get("r"):
        tokens = int(arch["window"]) // int(arch["r"])
    return {"iterations": iterations, "rollouts": rollouts, "episode_tokens": int(tokens or 0),
            "transitions": rollouts * int(tokens or 0) * int(env.get("sde_steps") or 0)}


def run_stamp(run_dir: Path) -> Path:
    """The benchmark's record of the training run in ``run_dir`` (a file beside it)."""
    return run_dir.with_name(run_dir.name + RUN_STAMP_SUFFIX)


def replaceable_run_dir(run_dir: Path, runs_root: Path) -> bool:
    """True when ``run_dir`` may be deleted to start a run afresh: it is a direct child of
    ``runs_root`` (symbolic links and ``..`` resolved) and is missing, empty, or a run the
    benchmark started (its :func:`run_stamp` exists)."""
    if run_dir.is_symlink() or run_dir.resolve().parent != runs_root.resolve():
        return False
    if not run_dir.exists():
        return True
    return run_dir.is_dir() and (not any(run_dir.iterdir()) or run_stamp(run_dir).is_file()
                                 or (run_dir / LEGACY_RUN_STAMP).is_file())


# ----------------------------------------------------------------------------------------------
# training curves and figures


def read_curve(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A torchrl CSVLogger scalar file (``step,value`` lines) -> (steps, values); later duplicates win."""
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


def reward_curves(run_dir: Path, algo: str, groups: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per group, the logged batch-mean training reward ``logs/<algo>/scalars/reward/<group>/mean.csv``."""
    return {g: read_curve(run_dir / "logs" / algo / "scalars" / "reward" / g / "mean.csv") for g in groups}


def plot_reward_curves(curves: dict, groups: list[str], path: Path) -> Path:
    """``curves[algo][seed][group] = (steps, values)`` -> one panel per group, mean +- std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(groups)
    cols = min(3, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    colors = {"grpo": "tab:orange", "gdpo": "tab:blue"}
    for ax, g in zip(axes, groups):
        for algo, by_seed in curves.items():
            series = [by_seed[s][g] for s in by_seed if len(by_seed[s][g][0])]
            if not series:
                continue
            L = min(len(s[0]) for s in series)
            steps = series[0][0][:L]
            vals = np.stack([s[1][:L] for s in series])
            mu = vals.mean(0)
            ax.plot(steps, mu, color=colors.get(algo), marker="o" if L < 20 else None, ms=3,
                    label=f"{METHOD_LABEL.get(algo, algo)} (n={len(series)})")
            if len(series) > 1:
                sd = vals.std(0, ddof=1)
                ax.fill_between(steps, mu - sd, mu + sd, color=colors.get(algo), alpha=0.2, lw=0)
        ax.set_title(f"reward/{g}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle("training reward per FLAME group (batch mean of the SDE rollouts; mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


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
    colors = {"supervised": "tab:gray", "grpo": "tab:orange", "gdpo": "tab:blue"}
    for ax, (c, name) in zip(axes, chans):
        for a, e in _spans(lis):
            ax.axvspan(a / FPS, e / FPS, color="tab:blue", alpha=0.10, lw=0)
        for a, e in _spans(spk):
            ax.axvspan(a / FPS, e / FPS, color="tab:green", alpha=0.10, lw=0)
        ax.plot(t, gt[:, c], color="black", lw=2.0, label="ground truth")
        for m, p in preds.items():
            ax.plot(t, p[:, c], color=colors.get(m), lw=1.2, label=METHOD_LABEL.get(m, m))
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=7, ncol=4)
    axes[-1].set_xlabel("time (s)   blue: listening frames   green: speaking frames")
    cid, actor = data.seq_ids[row]
    fig.suptitle(f"listening motion, test window {cid} actor {actor} window {data.windows.index[data.indices[row]].window} "
                 f"({lis.mean():.0%} listening): ground truth vs each method (sampling seed {seed})")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------------------------
# report


def build_report(cfg_weights: list[float], methods, flat, controls, curves, train_info, groups, hdr, clf_info,
                 intents) -> tuple[dict, str]:
    """The report dict (mean +- std over seeds of every metric, training rewards, controls, findings)
    and its Markdown. ``flat[method][seed]``: :func:`.seed_stats.flat_metrics`; ``controls[method][seed]``:
    :func:`.intent_control.run_controls`; ``curves[algo][seed][group]``: :func:`read_curve`."""
    agg = {m: aggregate_seeds(flat[m]) for m in methods}
    # training rewards: mean of the last min(5, n) logged iterations
    final = {}
    for algo in curves:
        final[algo] = {}
        for g in groups:
            vals = [float(np.mean(c[g][1][-5:])) for c in curves[algo].values() if len(c[g][1])]
            first = [float(np.mean(c[g][1][:5])) for c in curves[algo].values() if len(c[g][1])]
            final[algo][g] = {"first": mean_std(first), "final": mean_std(vals)}
    ctl = {}
    for m in methods:
        runs = controls[m]
        ctl[m] = {"prompt_accuracy": mean_std([r.get("prompt_accuracy") for r in runs.values()]),
                  "own_text_accuracy": mean_std([r.get("own_text_accuracy") for r in runs.values()]),
                  "per_intent": {i: mean_std([r.get("per_intent", {}).get(i) for r in runs.values()]) for i in intents},
                  "cfg_sweep": {w: {g: mean_std([r.get("cfg_sweep", {}).get(w, {}).get(g) for r in runs.values()])
                                    for g in GROUP_NAMES} for w in [f"{float(x):g}" for x in cfg_weights]}}
    any_run = next(iter(next(iter(controls.values())).values()), {})
    gt_sweep = any_run.get("cfg_sweep_gt", {})
    report = {"setup": hdr, "methods": list(methods), "metrics": agg, "per_seed": flat,
              "training": {"reward": final, "runs": train_info}, "controls": ctl, "controls_gt_listening_std": gt_sweep,
              "intent_classifier": clf_info, "intents": intents, "findings": findings(agg, flat, methods, groups)}
    return report, report_markdown(cfg_weights, report, methods, groups, intents)


def report_markdown(cfg_weights: list[float], rep, methods, groups, intents) -> str:
    s, agg = rep["setup"], rep["metrics"]
    git = s["git"]
    local = f" + local changes in {', '.join(x.split()[-1] for x in git['modified'])}" if git.get("modified") else ""
    L = []
    L += ["# Benchmark: supervised-only vs GRPO vs GDPO", ""]
    L += [f"Dataset `{s['dataset']}` ({s['split']} split: {s['n_windows']} windows, expressive subset {s['n_expressive']}); "
          f"seeds {s['seeds']}; reward `{s['reward']}` ({', '.join(groups)}); {s['iterations']} RL iterations per run, "
          f"{s['rollouts_per_run']} SDE rollouts ({s['transitions_per_run']} transitions) per run, identical for GRPO and GDPO "
          f"(mean wall time per run: GRPO {s['wall_s'].get('grpo', 'n/a')} s, GDPO {s['wall_s'].get('gdpo', 'n/a')} s). "
          f"Evaluation: Euler ODE {s['steps']} steps, CFG 1, sampling seed = run seed (supervised-only: the same "
          f"checkpoint sampled with each seed). Values are mean ± std over seeds (sample std). "
          f"Code: commit {git.get('commit')}{local}.", ""]
    for subset, title in (("all", "all test windows"), ("expressive", "expressive subset (top quartile of ground-truth variance)")):
        L += [f"## Table 1 layout, {title}", ""]
        rows = [(METHOD_LABEL[m], {sp: {n: agg[m].get(f"{subset}/{sp}/{n}") for n in TABLE1[sp]} for sp in TABLE1}) for m in methods]
        L += [table1_markdown(rows, fmt=fmt_ms), ""]
    L += ["Lower is better. " + units_note(s["eval_header"]), ""]
    L += ["## Findings (computed)", ""]
    pa = ", ".join(f"{k} {a:g} -> {b:g} ({(b - a) / a:+.0%})" for k, (a, b) in PAPER_ABLATION.items())
    L += [f"Paper ablation (Seamless, listening, without GDPO -> GDPO): {pa}.", ""]
    L += ["| method | metric | supervised-only | method | relative change | Welch t |", "|---|---|---|---|---|---|"]
    for m, fm in rep["findings"].items():
        for k, d in fm.items():
            if "/" not in k or d.get("rel_change") is None:
                continue
            t = d.get("welch_t")
            L.append(f"| {METHOD_LABEL[m]} | {k} | {d['supervised']:.3f} | {d[m]:.3f} | {d['rel_change']:+.1%} | "
                     f"{'n/a' if t is None else f'{t:+.2f}'} |")
    L += ["", "Negative change = closer to the ground-truth dynamics (better). |t| > ~2.8 is significant at 5 % with 3 + 3 seeds.", ""]
    L += ["### Per-group listening dynamics and evenness", ""]
    head = ["method", *[f"{g} dd" for g in GROUP_NAMES], "rewarded: mean rel. change", "std across groups", "improved", "worst"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [fmt_ms(agg[m].get(f"all/listening/group/{g}/dd")) for g in GROUP_NAMES]
        ev = rep["findings"].get(m, {}).get("evenness")
        if ev and ev["mean_rel_change"] is not None:
            cells += [f"{ev['mean_rel_change']:+.1%}", f"{ev['std_rel_change']:.1%}", f"{ev['n_improved']}/{len(ev['rewarded_groups'])}",
                      str(ev["worst_group"])]
        else:
            cells += ["–"] * 4
        L.append(f"| {METHOD_LABEL[m]} | " + " | ".join(cells) + " |")
    L += ["", "dd = listening velocity-std deviation of one FLAME group (x1000, lower is better); relative changes vs supervised-only "
          "over the rewarded groups (negative = better; a small std across groups = even improvement).", ""]
    L += ["## Rewards per FLAME group", "", "Evaluation reward on the test windows' listening frames (ODE samples; higher is better):", ""]
    head = ["method", *GROUP_NAMES]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [fmt_ms(agg[m].get(f"all/listening/group/{g}/reward"), 4) for g in GROUP_NAMES]
        L.append(f"| {METHOD_LABEL[m]} | " + " | ".join(cells) + " |")
    L += ["", "Training reward (batch mean over the SDE rollouts; first 5 -> last 5 iterations), see `reward_curves.png`:", ""]
    head = ["method", *groups]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo, by_g in rep["training"]["reward"].items():
        cells = [f"{fmt_ms(by_g[g]['first'], 4)} -> {fmt_ms(by_g[g]['final'], 4)}" for g in groups]
        L.append(f"| {METHOD_LABEL[algo]} | " + " | ".join(cells) + " |")
    L += ["", "![reward curves](reward_curves.png)", ""]
    L += ["## Supplementary (Table 6 layout), all test windows", ""]
    rows = [(METHOD_LABEL[m], {sp: {mm: {g: agg[m].get(f"all/{sp}/{mm}/{g}") for g in M.DUALTALK_GROUPS} for mm in SUPP}
                               for sp in SPLITS}) for m in methods]
    L += [supp_markdown(rows, fmt=fmt_ms), ""]
    L += ["## Text control", ""]
    ci = rep["intent_classifier"]
    if ci.get("note"):
        L += [f"Not measured: {ci['note']}", ""]
    else:
        L += [f"Intent classifier (logistic regression on listening-motion statistics) trained on {ci['train_windows']} ground-truth "
              f"train windows (train accuracy {ci['train_accuracy']:.0%}); on ground-truth test windows: {ci['gt_test_accuracy']:.0%}; "
              f"chance {1 / len(intents):.0%}. Accuracy of the generated listening motion:", ""]
        head = ["method", "window's own text", "prompted intent (mean)", *intents]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            c = rep["controls"][m]
            L.append(f"| {METHOD_LABEL[m]} | {fmt_ms(c['own_text_accuracy'])} | {fmt_ms(c['prompt_accuracy'])} | "
                     + " | ".join(fmt_ms(c["per_intent"][i]) for i in intents) + " |")
        L += [""]
    L += ["## CFG intensity sweep", "", "Listening motion std (mean over channels of the std over listening frames) against w_listen "
          "(w_speak = 1):", ""]
    show = [g for g in ("expr", "jaw", "rot", "eyelid") if g in GROUP_NAMES]
    head = ["w_listen", *[f"{METHOD_LABEL[m]} {g}" for m in methods for g in show]]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in [f"{float(x):g}" for x in cfg_weights]:
        L.append(f"| {w} | " + " | ".join(fmt_ms(rep["controls"][m]["cfg_sweep"][w][g], 4) for m in methods for g in show) + " |")
    gt = rep["controls_gt_listening_std"]
    L.append("| ground truth | " + " | ".join(("n/a" if gt.get(g) is None else f"{gt[g]:.4f}") for m in methods for g in show) + " |")
    L += ["", "## Listening motion, one test window", "", "![listening motion](listening_motion.png)", ""]
    L += ["## All metrics (mean ± std over seeds)", "", "| metric | " + " | ".join(METHOD_LABEL[m] for m in methods) + " |",
          "|" + "---|" * (len(methods) + 1)]
    for k in sorted({k for m in methods for k in agg[m]}):
        L.append(f"| {k} | " + " | ".join(fmt_ms(agg[m].get(k), 4) for m in methods) + " |")
    L += [""]
    return "\n".join(L)
