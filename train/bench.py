"""Benchmark: supervised-only vs GRPO vs GDPO post-training, several seeds, one report.

    python train/bench.py                       # 3 seeds, reward=all, gdpo.yaml's iterations (about 1 h on 2 CPU cores)
    python train/bench.py seeds=[0,1,2,3,4] iterations=80 reward=expr+rot
    python train/bench.py --quick               # tiny sizes (tests): same as quick=true

Protocol (every seed S):

1. the same supervised AR-Flow (``pretrained.sft``; trained once, with its VAE and the synthetic
   corpus, by their own entry points when missing, as ``train/gdpo.py`` does);
2. ``train/gdpo.py algo=grpo seed=S ...`` and ``train/gdpo.py algo=gdpo seed=S ...`` as subprocesses
   with identical overrides apart from ``algo=`` -- the same compute budget: iterations,
   prompts per batch, G, SDE steps, epochs and chunking;
3. every checkpoint (supervised, GRPO, GDPO) evaluated in-process with ``train/evaluate.py``'s
   code on the test split (ODE sampler, 10 steps, sampling seed S), plus two controls:

   - **text control accuracy**: an intent classifier (multinomial logistic regression on per-window
     statistics of the listening frames: mean, std and velocity std of expression channels 0-9,
     jaw, neck, eyelid, eyepose and rot) is trained on *ground-truth* listener motion of the train
     split with the intent labels of ``synthetic_labels.json``; for each intent, test windows are
     generated with a prompt naming that intent (``envs.synthetic.describe``) and the classifier's
     accuracy on the generated listening motion is reported (chance = 1 / number of intents);
   - **CFG intensity sweep**: listening motion std (per group: mean over channels of the std over
     the listening frames) against the listening CFG weight ``w_listen`` in ``controls.cfg_weights``.

Outputs in ``out_dir`` (default ``runs/bench``): ``report.md`` and ``report.json`` (mean +- std
over seeds of every metric, every group's reward, the controls, the training cost),
``reward_curves.png`` (per-group training reward of GRPO and GDPO, mean +- std over seeds, from the
CSV logs ``runs/<algo>_seed<S>/logs/<algo>/scalars/reward/<group>/mean.csv``),
``listening_motion.png`` (one test window: ground truth vs each method), ``eval/<method>_seed<S>/``
(per-run metrics.json / metrics.md) and ``logs/<algo>_seed<S>.log`` (training output). Finished
training runs are reused when their overrides are unchanged (``reuse=true``).
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy / scipy BLAS (see train/evaluate.py)

import json  # noqa: E402
import math  # noqa: E402
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gdpo_listener.pipeline import factories, run_state, stages
import evaluate as E
from gdpo_listener.agents.checkpoint import atomic_write_bytes, atomic_write_json
from gdpo_listener.envs.dataset import DyadicWindows
from gdpo_listener.envs.flame import FPS, GROUP_NAMES, GROUPS
from gdpo_listener.evaluation import metrics as M
from gdpo_listener.rewards.groups import parse_reward_spec
from gdpo_listener.rewards.stats import masked_mean, masked_std, velocity_std

METHOD_LABEL = {"supervised": "supervised-only", "grpo": "GRPO", "gdpo": "GDPO"}
PAPER_ABLATION = {"FDD": (28.03, 18.85), "PDD": (2.15, 1.90), "JDD": (1.09, 0.87)}  # Table 4: without GDPO -> GDPO


# ----------------------------------------------------------------------------------------------
# training runs (subprocesses of train/gdpo.py)


def train_overrides(cfg: DictConfig, algo: str, seed: int, run_dir: Path, data_root: Path, vae: Path, sft: Path) -> list[str]:
    """Overrides of one ``train/gdpo.py`` run; identical for every algorithm apart from ``algo=``."""
    f = cfg.features
    return [f"algo={algo}", f"seed={seed}", f"out_dir={run_dir}", f"reward={cfg.reward}", f"model={cfg.model.preset}",
            f"data.root={data_root}", "data.auto_prepare=false", f"pretrained.vae={vae}", f"pretrained.sft={sft}",
            "pretrained.auto_train=false", f"features.text_encoder={f.text_encoder}", f"features.audio_encoder={f.audio_encoder}",
            f"features.cache_dir={factories.abspath(f.cache_dir)}",
            *([] if cfg.iterations is None else [f"optim.iterations={int(cfg.iterations)}"]),
            f"device={cfg.device}", f"threads={int(cfg.threads)}", "logger.backend=csv", *map(str, cfg.train_overrides)]


def run_training(cfg: DictConfig, algo: str, seed: int, out: Path, data_root: Path, vae: Path, sft: Path) -> dict:
    """Train (or reuse) ``out/runs/<algo>_seed<S>``; returns {path, wall_s, reused}."""
    run_dir = out / "runs" / f"{algo}_seed{seed}"
    over = train_overrides(cfg, algo, seed, run_dir, data_root, vae, sft)
    stamp = run_dir / "bench_run.json"
    if cfg.reuse and stamp.is_file() and (run_dir / "meta.json").is_file():
        prev = json.loads(stamp.read_text())
        if prev.get("overrides") == over:
            print(f"[bench] reusing {run_dir} ({algo}, seed {seed})", flush=True)
            return {"path": run_dir, "wall_s": prev.get("wall_s"), "reused": True}
    if run_dir.exists():  # stale or different run: start clean (its CSV logs would otherwise be appended to)
        if run_dir.parent != out / "runs":
            raise RuntimeError(f"refusing to delete {run_dir}")
        shutil.rmtree(run_dir)
    log = out / "logs" / f"{algo}_seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(stages.TRAIN_DIR / "gdpo.py"), *over]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(int(cfg.threads))}
    print(f"[bench] training {algo} seed {seed} -> {run_dir} (log {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        res = subprocess.run(cmd, cwd=os.getcwd(), stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"train/gdpo.py {algo} seed {seed} failed (exit {res.returncode}); log {log}:\n{tail}")
    atomic_write_json(stamp, {"overrides": over, "wall_s": wall})
    print(f"[bench] {algo} seed {seed} done in {wall:.0f} s", flush=True)
    return {"path": run_dir, "wall_s": wall, "reused": False}


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
    return {g: read_curve(run_dir / "logs" / algo / "scalars" / "reward" / g / "mean.csv") for g in groups}


# ----------------------------------------------------------------------------------------------
# intent classifier (text control)

CLS_CHANNELS = np.r_[0:10, GROUPS["jaw"], GROUPS["neck"], GROUPS["eyelid"], GROUPS["eyepose"], GROUPS["rot"]]


def window_features(motion: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """``(B, T, 67)`` motion, ``(B, T)`` listening mask -> ``(B, 3 * 27)`` mean / std / velocity std."""
    x = motion[..., torch.as_tensor(CLS_CHANNELS)].double()
    m = mask.to(torch.bool)
    return torch.cat([masked_mean(x, m), masked_std(x, m), velocity_std(x, m)], -1).cpu().numpy()


class IntentClassifier:
    """Multinomial logistic regression (L2) on standardised features, trained with L-BFGS; deterministic."""

    def __init__(self, l2: float = 1e-3, iters: int = 300):
        self.l2, self.iters = float(l2), int(iters)

    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int) -> "IntentClassifier":
        self.mu, self.sd = X.mean(0), X.std(0) + 1e-8
        Xt = torch.as_tensor((X - self.mu) / self.sd, dtype=torch.float64)
        yt = torch.as_tensor(y, dtype=torch.long)
        self.W = torch.zeros(X.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.W, self.b], max_iter=self.iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(Xt @ self.W + self.b, yt) + self.l2 * self.W.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            Xt = torch.as_tensor((X - self.mu) / self.sd, dtype=torch.float64)
            return (Xt @ self.W + self.b).argmax(-1).numpy()


def load_labels(root: Path) -> dict | None:
    p = root / "synthetic_labels.json"
    return json.loads(p.read_text()) if p.is_file() else None


def window_intent(labels: dict, cid: str, actor: int, window: int) -> str | None:
    try:
        return labels[cid]["intents"][actor][window]
    except (KeyError, IndexError, TypeError):
        return None


def train_intent_classifier(root: Path, labels: dict, intents: list[str], min_listen: int) -> tuple[IntentClassifier, dict]:
    """Classifier on ground-truth listening motion of the train split windows."""
    w = DyadicWindows(root, "train", load_audio=False)
    motion, lis, y = [], [], []
    for i in range(len(w)):
        ix = w.index[i]
        item = w[i]
        lab = window_intent(labels, ix.conversation, ix.actor, ix.window)
        if lab not in intents or item["listening"].sum() < min_listen:
            continue
        motion.append(item["actor_motion"])
        lis.append(item["listening"])
        y.append(intents.index(lab))
    if len(set(y)) < 2:
        raise ValueError(f"intent classifier: fewer than 2 intents among train windows with >= {min_listen} listening frames")
    X = window_features(torch.as_tensor(np.stack(motion)), torch.as_tensor(np.stack(lis)))
    y = np.asarray(y)
    clf = IntentClassifier().fit(X, y, len(intents))
    return clf, {"train_windows": int(len(y)), "train_accuracy": float((clf.predict(X) == y).mean())}


# ----------------------------------------------------------------------------------------------
# controls


def control_windows(data: E.EvalData, n: int, min_listen: int) -> list[int]:
    """Evenly spaced bank rows with at least ``min_listen`` listening frames."""
    ok = torch.nonzero(data.bank["listening"].sum(-1) >= min_listen).flatten().tolist()
    if not ok:
        return []
    pick = E.select_indices(len(ok), n)
    return [ok[i] for i in pick]


def prompt_embeddings(data: E.EvalData, intents: list[str], n: int, seed: int) -> dict[str, torch.Tensor]:
    from gdpo_listener.envs.synthetic import describe

    out = {}
    for k, intent in enumerate(intents):
        texts = [describe(intent, np.random.default_rng([seed, k, i]), speaking=False) for i in range(n)]
        out[intent] = torch.as_tensor(data.text_enc.encode(texts))
    return out


def run_controls(model, data: E.EvalData, rows: list[int], ccfg: DictConfig, ecfg: DictConfig, seed: int, clf, intents,
                 prompts, labels, pred_all: torch.Tensor, progress: bool) -> dict:
    """Text-control accuracy (own text and each intent's prompt) and the CFG sweep on bank ``rows``."""
    out: dict = {}
    mf = int(ccfg.min_listen)
    if not rows:
        return {"note": f"no test window with >= {mf} listening frames"}
    sub = data.bank[torch.as_tensor(rows)]
    lis = sub["listening"]
    kw = dict(steps=int(ecfg.steps), seed=seed, batch_size=int(ecfg.batch_size), progress=progress)
    if clf is not None:
        # own text: the evaluation's predictions of these windows, against each window's true intent
        truth = [window_intent(labels, *data.seq_ids[r], data.windows.index[data.indices[r]].window) for r in rows]
        keep = [i for i, t in enumerate(truth) if t in intents]
        if keep:
            yp = clf.predict(window_features(pred_all[torch.as_tensor(rows)][keep], lis[keep]))
            yt = np.array([intents.index(truth[i]) for i in keep])
            out["own_text_accuracy"] = float((yp == yt).mean())
        per, conf = {}, np.zeros((len(intents), len(intents)), dtype=np.int64)
        for k, intent in enumerate(intents):
            pred = E.generate(model, data, bank=sub, text_emb=prompts[intent][: len(rows)], desc=f"prompt {intent}", **kw)
            yp = clf.predict(window_features(pred, lis))
            per[intent] = float((yp == k).mean())
            np.add.at(conf[k], yp, 1)
        out["prompt_accuracy"] = float(np.mean(list(per.values())))
        out["per_intent"] = per
        out["confusion"] = conf.tolist()
    sweep = {}
    for w in ccfg.cfg_weights:
        pred = E.generate(model, data, bank=sub, w_speak=1.0, w_listen=float(w), desc=f"cfg w_listen={float(w):g}", **kw)
        sweep[f"{float(w):g}"] = {g: M.motion_std(pred[..., :], lis, sub["actor_valid"], (g,), mf).value for g in GROUP_NAMES}
    out["cfg_sweep"] = sweep
    out["cfg_sweep_gt"] = {g: M.motion_std(sub["actor_motion"], lis, sub["actor_valid"], (g,), mf).value for g in GROUP_NAMES}
    out["n_windows"] = len(rows)
    return out


# ----------------------------------------------------------------------------------------------
# aggregation over seeds


def flat_metrics(res: dict) -> dict[str, float | None]:
    """One evaluation (evaluate_model output) -> {key: value} of every reported number."""
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
    return out


def mean_std(values: list) -> dict:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v)}


def fmt_ms(d: dict | None, digits: int = 2) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    s = f"{d['mean']:.{digits}f}"
    return s + (f" ± {d['std']:.{digits}f}" if d.get("std") is not None else "")


def welch_t(a: dict, b: dict, va: list, vb: list) -> float | None:
    """Welch t statistic of mean(b) - mean(a) (None with < 2 values on a side)."""
    xa = [x for x in va if x is not None]
    xb = [x for x in vb if x is not None]
    if len(xa) < 2 or len(xb) < 2:
        return None
    se = math.sqrt(np.var(xa, ddof=1) / len(xa) + np.var(xb, ddof=1) / len(xb))
    return None if se == 0 else (np.mean(xb) - np.mean(xa)) / se


# ----------------------------------------------------------------------------------------------
# figures


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


def plot_listening_window(data: E.EvalData, row: int, preds: dict[str, np.ndarray], path: Path, seed: int = 0) -> Path:
    """One test window: ground truth vs each method on a few channels; listening frames shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gdpo_listener.envs.plots import _spans

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


def build_report(cfg, methods, flat, controls, curves, train_info, groups, hdr, clf_info, intents) -> tuple[dict, str]:
    agg = {m: {} for m in methods}
    for m in methods:
        keys = sorted({k for s in flat[m].values() for k in s})
        for k in keys:
            agg[m][k] = mean_std([flat[m][s].get(k) for s in flat[m]])
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
                  "cfg_sweep": {w: {g: mean_std([r.get("cfg_sweep", {}).get(w, {}).get(g) for r in runs.values()]) for g in GROUP_NAMES}
                                for w in [f"{float(x):g}" for x in cfg.controls.cfg_weights]}}
    any_run = next(iter(next(iter(controls.values())).values()), {})
    gt_sweep = any_run.get("cfg_sweep_gt", {})
    report = {"setup": hdr, "methods": list(methods), "metrics": agg, "per_seed": flat, "training": {"reward": final, "runs": train_info},
              "controls": ctl, "controls_gt_listening_std": gt_sweep, "intent_classifier": clf_info, "intents": intents,
              "findings": findings(agg, flat, methods, groups)}
    return report, report_markdown(cfg, report, methods, groups, intents)


def findings(agg, flat, methods, groups) -> dict:
    """Relative changes vs supervised-only with Welch t statistics, and per-group evenness."""
    out: dict = {}
    if "supervised" not in methods:
        return out
    for m in methods:
        if m == "supervised":
            continue
        fm = {}
        for subset in ("all", "expressive"):
            for split, names in E.TABLE1.items():
                for name in names:
                    k = f"{subset}/{split}/{name}"
                    a, b = agg["supervised"].get(k), agg[m].get(k)
                    if not a or not b or a["mean"] is None or b["mean"] is None:
                        continue
                    rel = (b["mean"] - a["mean"]) / a["mean"] if a["mean"] else None
                    t = welch_t(a, b, [flat["supervised"][s].get(k) for s in flat["supervised"]],
                                [flat[m][s].get(k) for s in flat[m]])
                    fm[k] = {"supervised": a["mean"], m: b["mean"], "rel_change": rel, "welch_t": t}
        # evenness over the six FLAME groups: relative change of the listening velocity-std deviation
        rel = {}
        for g in GROUP_NAMES:
            k = f"all/listening/group/{g}/dd"
            a, b = agg["supervised"].get(k), agg[m].get(k)
            if a and b and a["mean"] and b["mean"] is not None:
                rel[g] = (b["mean"] - a["mean"]) / a["mean"]
        rewarded = [g for g in groups if g in rel]
        vals = [rel[g] for g in rewarded]
        fm["group_dd_rel_change"] = rel
        fm["evenness"] = {"rewarded_groups": rewarded, "mean_rel_change": float(np.mean(vals)) if vals else None,
                          "std_rel_change": float(np.std(vals)) if vals else None,
                          "worst_group": max(rewarded, key=lambda g: rel[g]) if rewarded else None,
                          "n_improved": int(sum(v < 0 for v in vals))}
        out[m] = fm
    return out


def report_markdown(cfg, rep, methods, groups, intents) -> str:
    s, agg = rep["setup"], rep["metrics"]
    L = []
    L += ["# Benchmark: supervised-only vs GRPO vs GDPO", ""]
    L += [f"Dataset `{s['dataset']}` ({s['split']} split: {s['n_windows']} windows, expressive subset {s['n_expressive']}); "
          f"seeds {s['seeds']}; reward `{s['reward']}` ({', '.join(groups)}); {s['iterations']} RL iterations per run, "
          f"{s['rollouts_per_run']} SDE rollouts ({s['transitions_per_run']} transitions) per run, identical for GRPO and GDPO "
          f"(mean wall time per run: GRPO {s['wall_s'].get('grpo', 'n/a')} s, GDPO {s['wall_s'].get('gdpo', 'n/a')} s). "
          f"Evaluation: Euler ODE {s['steps']} steps, CFG 1, sampling seed = run seed (supervised-only: the same "
          f"checkpoint sampled with each seed). Values are mean ± std over seeds (sample std). "
          f"Code: commit {s['git'].get('commit')}{' + local changes in ' + ', '.join(x.split()[-1] for x in s['git']['modified']) if s['git'].get('modified') else ''}.", ""]
    for subset, title in (("all", "all test windows"), ("expressive", "expressive subset (top quartile of ground-truth variance)")):
        L += [f"## Table 1 layout, {title}", ""]
        rows = [(METHOD_LABEL[m], {sp: {n: agg[m].get(f"{subset}/{sp}/{n}") for n in E.TABLE1[sp]} for sp in E.TABLE1}) for m in methods]
        L += [E.table1_markdown(rows, fmt=fmt_ms), ""]
    L += ["Lower is better. " + E.units_note(s["eval_header"]), ""]
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
        L.append(f"| {METHOD_LABEL[m]} | " + " | ".join(fmt_ms(agg[m].get(f"all/listening/group/{g}/reward"), 4) for g in GROUP_NAMES) + " |")
    L += ["", "Training reward (batch mean over the SDE rollouts; first 5 -> last 5 iterations), see `reward_curves.png`:", ""]
    head = ["method", *groups]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for algo, by_g in rep["training"]["reward"].items():
        L.append(f"| {METHOD_LABEL[algo]} | " + " | ".join(f"{fmt_ms(by_g[g]['first'], 4)} -> {fmt_ms(by_g[g]['final'], 4)}" for g in groups) + " |")
    L += ["", "![reward curves](reward_curves.png)", ""]
    L += ["## Supplementary (Table 6 layout), all test windows", ""]
    rows = [(METHOD_LABEL[m], {sp: {mm: {g: agg[m].get(f"all/{sp}/{mm}/{g}") for g in M.DUALTALK_GROUPS} for mm in E.SUPP}
                               for sp in E.SPLITS}) for m in methods]
    L += [E.supp_markdown(rows, fmt=fmt_ms), ""]
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
    for w in [f"{float(x):g}" for x in cfg.controls.cfg_weights]:
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


# ----------------------------------------------------------------------------------------------
# main


def apply_quick(cfg: DictConfig) -> DictConfig:
    q = cfg.quick_settings
    cfg = OmegaConf.merge(cfg, {"seeds": q.seeds, "iterations": q.iterations, "train_overrides": q.train_overrides,
                                "eval": q.eval, "controls": q.controls})
    return cfg


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    run(cfg)


def run(cfg: DictConfig) -> dict:
    """The whole benchmark of ``cfg`` (see ``conf/bench.yaml``); returns the report dict."""
    with E.blas_threads(int(cfg.threads)):
        return _run(cfg)


def _run(cfg: DictConfig) -> dict:
    if cfg.quick:
        cfg = apply_quick(cfg)
    torch.set_num_threads(int(cfg.threads))
    device = factories.make_device(cfg.device)
    run_state.seed_everything(0)
    out = factories.abspath(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in cfg.seeds]
    algos = [str(a) for a in cfg.algos]
    groups = parse_reward_spec(cfg.reward)
    if not seeds:
        raise ValueError("seeds must list at least one seed")
    if len(seeds) < 3 and not cfg.quick:
        print(f"[bench] warning: {len(seeds)} seed(s); the benchmark protocol asks for at least 3", flush=True)
    t_start = time.perf_counter()

    # 1. prerequisites, produced by their own entry points when missing (cached)
    data_root = stages.ensure_dataset(cfg.data)
    vae_path = stages.ensure_vae(cfg, data_root)
    sft_path = stages.ensure_sft(cfg, data_root, vae_path)

    # 2. RL runs: same budget for every algorithm
    jobs = [(a, s) for s in seeds for a in algos]
    with ThreadPoolExecutor(max_workers=max(1, int(cfg.jobs))) as pool:
        done = list(pool.map(lambda j: run_training(cfg, j[0], j[1], out, data_root, vae_path, sft_path), jobs))
    runs = {a: {} for a in algos}
    for (a, s), r in zip(jobs, done):
        runs[a][s] = r

    # 3. evaluation of every checkpoint, in-process, on one window bank
    ecfg = OmegaConf.create({"data": OmegaConf.to_container(cfg.data, resolve=True), "vae_dir": str(vae_path), "split": cfg.eval.split,
                             "max_windows": cfg.eval.max_windows, "steps": cfg.eval.steps, "w_speak": 1.0, "w_listen": 1.0,
                             "batch_size": cfg.eval.batch_size, "seed": seeds[0], "progress": bool(cfg.progress),
                             "features": OmegaConf.to_container(cfg.features, resolve=True),
                             "metrics": OmegaConf.to_container(cfg.metrics, resolve=True)})
    data, _ = E.prepare(ecfg, sft_path, device)
    methods = ["supervised", *algos]
    paths = {"supervised": {s: sft_path for s in seeds}, **{a: {s: runs[a][s]["path"] for s in seeds} for a in algos}}

    labels = load_labels(data.root)
    intents = list((load_meta_intents(data.root) or []))
    clf, clf_info = None, {}
    mf = int(cfg.controls.min_listen)
    if labels is None or not intents:
        clf_info = {"note": f"{data.root} has no synthetic_labels.json / intent list (text control needs the synthetic corpus)"}
    else:
        clf, clf_info = train_intent_classifier(data.root, labels, intents, mf)
        lis = data.bank["listening"]
        truth = [window_intent(labels, cid, a, data.windows.index[i].window) for (cid, a), i in zip(data.seq_ids, data.indices)]
        keep = [r for r, t in enumerate(truth) if t in intents and int(lis[r].sum()) >= mf]
        if keep:
            X = window_features(data.bank["actor_motion"][keep], lis[keep])
            clf_info["gt_test_accuracy"] = float((clf.predict(X) == np.array([intents.index(truth[r]) for r in keep])).mean())
            clf_info["gt_test_windows"] = len(keep)
    crow = control_windows(data, int(cfg.controls.n_windows), mf)
    prompts = prompt_embeddings(data, intents, len(crow), 1234) if clf is not None and crow else {}

    flat, controls, first_preds = {m: {} for m in methods}, {m: {} for m in methods}, {}
    view_row = int(torch.argmax(data.bank["listening"].sum(-1)))
    for m in methods:
        for s in seeds:
            model, _ = E.load_model(Path(paths[m][s]), data)
            res = E.evaluate_model(model, data, ecfg, seed=s, progress=bool(cfg.progress))
            h = E.header(data, ecfg, str(paths[m][s]), s)
            E.write_report(out / "eval" / f"{m}_seed{s}", h, res)
            flat[m][s] = flat_metrics(res)
            controls[m][s] = run_controls(model, data, crow, cfg.controls, ecfg, s, clf, intents, prompts, labels, res["_pred"],
                                          bool(cfg.progress))
            if s == seeds[0]:
                first_preds[m] = res["_pred"][view_row].cpu().numpy()
            r = flat[m][s]
            print(f"[bench] {METHOD_LABEL[m]} seed {s}: listening FDD {r.get('all/listening/FDD')} PDD {r.get('all/listening/PDD')} "
                  f"JDD {r.get('all/listening/JDD')}; text control {controls[m][s].get('prompt_accuracy')}", flush=True)

    # 4. report
    curves = {a: {s: reward_curves(runs[a][s]["path"], a, groups) for s in seeds} for a in algos}
    plot_reward_curves(curves, groups, out / "reward_curves.png")
    plot_listening_window(data, view_row, first_preds, out / "listening_motion.png", seeds[0])
    run_cfg = _run_config(runs, algos, seeds)
    env_cfg, iterations = dict(run_cfg.get("env", {})), int(run_cfg.get("optim", {}).get("iterations", 0))
    rollouts = iterations * env_cfg.get("n_prompts", 0) * env_cfg.get("group_size", 0)
    hdr = {"dataset": str(data.root), "split": data.split, "n_windows": len(data.indices), "n_expressive": int(data.expressive.sum()),
           "seeds": seeds, "algos": algos, "reward": str(cfg.reward), "iterations": iterations, "env": env_cfg,
           "lr": run_cfg.get("optim", {}).get("lr"), "algo_config": {a: _run_config(runs, [a], seeds).get("algo") for a in algos},
           "rollouts_per_run": rollouts, "transitions_per_run": rollouts * 25 * env_cfg.get("sde_steps", 0),
           "wall_s": {a: round(float(np.mean([runs[a][s]["wall_s"] for s in seeds if runs[a][s]["wall_s"] is not None] or [float("nan")])), 1)
                      for a in algos},
           "steps": int(ecfg.steps), "sft": str(sft_path), "vae": str(vae_path), "quick": bool(cfg.quick), "git": git_state(),
           "eval_header": E.header(data, ecfg, str(sft_path), seeds[0])}
    rep, md = build_report(cfg, methods, flat, controls, curves, {a: {str(s): {"path": str(runs[a][s]["path"]), "wall_s": runs[a][s]["wall_s"],
                                                                                "reused": runs[a][s]["reused"]} for s in seeds} for a in algos},
                           groups, hdr, clf_info, intents)
    rep["total_s"] = time.perf_counter() - t_start
    atomic_write_json(out / "report.json", E.to_json(rep))
    atomic_write_bytes(out / "report.md", md.encode())
    print(md)
    print(f"[bench] done in {rep['total_s']:.0f} s -> {out / 'report.md'}, {out / 'report.json'}, {out / 'reward_curves.png'}, "
          f"{out / 'listening_motion.png'}")
    return rep


def _run_config(runs, algos, seeds) -> dict:
    """The resolved config recorded by a finished training run (env, optim, algo sections)."""
    for a in algos:
        for s in seeds:
            try:
                return dict(json.loads((Path(runs[a][s]["path"]) / "meta.json").read_text())["config"])
            except (OSError, KeyError, json.JSONDecodeError):
                continue
    return {}


def git_state() -> dict:
    """Commit and modified files of the code that produced the report (best effort)."""
    def git(*a):
        r = subprocess.run(["git", *a], cwd=stages.TRAIN_DIR.parent, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified": dirty.splitlines() if dirty else []}


def load_meta_intents(root: Path) -> list[str] | None:
    try:
        meta = json.loads((root / "dataset.json").read_text())
        return list(meta["synthetic"]["intents"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def hydra_argv(argv: list[str]) -> list[str]:
    """``--quick`` is accepted as a synonym of the Hydra override ``quick=true``."""
    return ["quick=true" if a == "--quick" else a for a in argv]


if __name__ == "__main__":
    sys.argv = hydra_argv(sys.argv)
    main()
