"""The benchmark's evaluation phase: every checkpoint evaluated in-process as ``train/evaluate.py`` does, with
the text-control measurement (intent classifiers, prompted windows), the VAE's reference row, and the
report's setup section. ``train/bench.py`` calls these in order."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ..agents.arflow import ARFLOW_KIND
from ..agents.checkpoint import load_checkpoint_meta
from ..envs.flame import GROUP_NAMES
from ..pipeline.run_dir import host_info, host_label, run_host
from . import intent_control as IC
from .bench_runs import git_state, run_meta
from .bench_stats import table1_window_values
from .benchmark import method_label, parse_method, training_budget
from .checkpoints import run_reward_config
from .data import load_eval_model
from .generation import quality_figures
from .report import header, reconstruction_header, write_report
from .scoring import evaluate_model, evaluate_reconstruction
from .seed_stats import flat_metrics

__all__ = ["TextControl", "make_text_control", "Evaluated", "base_run_reward", "evaluate_methods", "reconstruction_reference",
           "report_setup"]


@dataclass
class TextControl:
    """What the text-control measurement needs: the corpus' intent labels, the classifiers trained on the
    ground truth (``clf``) and on its VAE reconstructions (``clf_vae``), the prompted windows and their
    prompts. ``clf`` is None (and ``info`` holds a note) for a corpus without intent labels."""

    labels: dict | None
    intents: list[str]
    clf: IC.IntentClassifier | None
    clf_vae: IC.IntentClassifier | None
    info: dict
    windows: list[int]  # bank rows generated under each intent's prompt
    prompts: dict[str, torch.Tensor]
    min_listen: int


def make_text_control(cfg: DictConfig, data) -> TextControl:
    """Train the intent classifiers (ground truth, VAE reconstructions) and choose the prompted windows."""
    labels, intents = IC.load_labels(data.root), IC.corpus_intents(data.root) or []
    clf, clf_vae, info = None, None, {}
    mf = int(cfg.controls.min_listen)
    if labels is None or not intents:
        info = {"note": f"{data.root} has no synthetic_labels.json / intent list (text control needs the synthetic corpus)"}
    else:
        clf, info = IC.train_intent_classifier(data.root, labels, intents, mf)
        info.update(IC.ground_truth_accuracy(clf, data, labels, intents, mf))
        # supplementary: the same classifier trained on the VAE reconstructions (what a prompt controls within the VAE)
        clf_vae, info["vae_space"] = IC.train_intent_classifier(data.root, labels, intents, mf,
                                                                recode=IC.vae_recode(data.vae, data.normalizer))
        info["vae_space"].update(IC.ground_truth_accuracy(clf_vae, data, labels, intents, mf))
    crow = IC.control_windows(data, int(cfg.controls.n_windows), mf)
    prompts = IC.prompt_embeddings(data, intents, len(crow), 1234) if clf is not None and crow else {}
    return TextControl(labels, intents, clf, clf_vae, info, crow, prompts, mf)


@dataclass
class Evaluated:
    """Every checkpoint's evaluation: ``{method: {seed: ...}}`` flat metrics, controls and per-window Table 1
    values, the first seed's prediction of the shown window (row ``view_row``), and the listening
    deviations' floor for a model that knows each window's intent (ground truth only; None without labels)."""

    flat: dict
    controls: dict
    windows: dict
    first_preds: dict
    view_row: int
    floor: dict | None


def base_run_reward(paths: dict) -> dict | None:
    """The reward the plain post-trained methods (no variant) optimised, read from the first one's checkpoint;
    None when there is none. The supervised model is scored on it too, so the report can say whether training
    raised the reward it optimised on the evaluation sampler (its term weights may differ from the default's)."""
    for m, by_seed in paths.items():
        if m != "supervised" and not parse_method(m).variant:
            return run_reward_config(load_checkpoint_meta(next(iter(by_seed.values())), kind=ARFLOW_KIND))
    return None


def evaluate_methods(cfg: DictConfig, ecfg: DictConfig, data, paths: dict, seeds: list[int], tc: TextControl, out: Path) -> Evaluated:
    """Evaluate each method's checkpoint of every seed in-process (as ``train/evaluate.py``) with its controls;
    the supervised model is also scored on the reward the plain methods optimised (:func:`base_run_reward`)."""
    methods = list(paths)
    base_reward = base_run_reward(paths)
    ev = Evaluated({m: {} for m in methods}, {m: {} for m in methods}, {m: {} for m in methods}, {},
                   int(torch.argmax(data.bank["listening"].sum(-1))), None)
    for m in methods:
        slug = m if m == "supervised" else parse_method(m).slug
        for s in seeds:
            model, meta = load_eval_model(Path(paths[m][s]), data)
            optimised = m != "supervised"
            own_reward = run_reward_config(meta) if optimised else base_reward
            res = evaluate_model(model, data, ecfg, seed=s, progress=bool(cfg.progress), run_reward=own_reward)
            write_report(out / "eval" / f"{slug}_seed{s}", header(data, ecfg, str(paths[m][s]), s, own_reward, optimised), res)
            ev.flat[m][s] = flat_metrics(res)
            # per-window Table 1 values of the same prediction, for the paired comparison
            ev.windows[m][s] = table1_window_values(res["_row_stats"], ecfg.metrics)
            if ev.floor is None and tc.labels is not None and tc.intents:
                ev.floor = IC.intent_floor(data, tc.labels, res["_row_stats"], ecfg.metrics)
            ev.controls[m][s] = IC.run_controls(model, data, tc.windows, cfg.controls, ecfg, s, tc.clf, tc.intents, tc.prompts,
                                                tc.labels, res["_pred"], bool(cfg.progress), clf_vae=tc.clf_vae)
            if s == seeds[0]:
                ev.first_preds[m] = res["_pred"][ev.view_row].cpu().numpy()
            r = ev.flat[m][s]
            print(f"[bench] {method_label(m)} seed {s}: listening FDD {r.get('all/listening/FDD')} PDD {r.get('all/listening/PDD')} "
                  f"JDD {r.get('all/listening/JDD')}; text control {ev.controls[m][s].get('prompt_accuracy')}", flush=True)
    return ev


def reconstruction_reference(data, ecfg: DictConfig, out: Path, sft: Path, vae: Path, seed: int, tc: TextControl) -> dict:
    """The reference row: the ground truth through the VAE (the ceiling of every model decoded by it), and how
    much of the intent the classifiers still read in it (added to ``tc.info``)."""
    recon = evaluate_reconstruction(data, ecfg.metrics)
    write_report(out / "eval" / "vae_reconstruction", reconstruction_header(header(data, ecfg, str(sft), seed), vae), recon)
    reconstruction = {"flat": flat_metrics(recon), "quality": quality_figures(recon["_pred"], data.bank),
                      "windows": table1_window_values(recon["_row_stats"], ecfg.metrics)}  # per window: its deviations per intent
    if tc.clf is not None:
        tc.info.update(IC.ground_truth_accuracy(tc.clf, data, tc.labels, tc.intents, tc.min_listen, motion=recon["_pred"],
                                                key="vae_reconstruction"))
        tc.info["vae_space"].update(IC.ground_truth_accuracy(tc.clf_vae, data, tc.labels, tc.intents, tc.min_listen,
                                                             motion=recon["_pred"], key="vae_reconstruction"))
    print("[bench] VAE reconstruction of the ground truth: listening velocity-std ratio "
          + ", ".join(f"{g} {reconstruction['quality'].get(f'listening/{g}/vel_std_ratio', float('nan')):.3f}" for g in GROUP_NAMES)
          + f"; listening FDD {reconstruction['flat'].get('all/listening/FDD')} PDD {reconstruction['flat'].get('all/listening/PDD')} "
          f"JDD {reconstruction['flat'].get('all/listening/JDD')}", flush=True)
    return reconstruction


def report_setup(cfg: DictConfig, runs: dict, algos: list[str], seeds: list[int], data, ecfg: DictConfig, sft: Path, vae: Path) -> dict:
    """The report's setup section: data, seeds, the runs' shared budget and settings, wall times, code version,
    the host each run trained on and the one evaluating (``hosts``: label -> the runs, ``"method seed S"``)."""
    meta = run_meta(runs, algos, seeds)
    run_cfg = dict(meta.get("config") or {})
    budget = training_budget(run_cfg, meta.get("arch"))
    wall = {a: [runs[a][s]["wall_s"] for s in seeds if runs[a][s]["wall_s"] is not None] for a in algos}
    algo_cfg = {a: run_meta(runs, [a], seeds).get("config") or {} for a in algos}  # each method's own settings
    return {"dataset": str(data.root), "split": data.split, "n_windows": len(data.indices), "n_expressive": int(data.expressive.sum()),
            "seeds": seeds, "algos": algos, "reward": str(cfg.reward), "iterations": budget["iterations"],
            "env": dict(run_cfg.get("env") or {}), "lr": (run_cfg.get("optim") or {}).get("lr"),
            "algo_config": {a: algo_cfg[a].get("algo") for a in algos},
            "sde": {a: (algo_cfg[a].get("env") or {}).get("sde") for a in algos},
            "rollouts_per_run": budget["rollouts"], "episode_tokens": budget["episode_tokens"],
            "transitions_per_run": budget["transitions"],
            "wall_s": {a: round(float(np.mean(wall[a])), 1) if wall[a] else float("nan") for a in algos},
            "extended_from": {a: {str(s): runs[a][s].get("extended_from") for s in seeds if runs[a][s].get("extended_from")}
                              for a in algos},
            "variants": {a: parse_method(a).variant_overrides(cfg.get("variants"), cfg.reward) for a in algos if parse_method(a).variant},
            "run_reward": base_run_reward({a: {s: runs[a][s]["path"] for s in seeds} for a in algos}),
            "steps": int(ecfg.steps), "sft": str(sft), "vae": str(vae), "quick": bool(cfg.quick), "git": git_state(),
            "eval_header": header(data, ecfg, str(sft), seeds[0]),
            "hosts": run_hosts(runs, algos, seeds), "eval_host": host_label(host_info(str(cfg.device)))}


def run_hosts(runs: dict, algos: list[str], seeds: list[int]) -> dict[str, list[str]]:
    """Which host trained which run: ``{host label: ["<method key> seed <S>", ...]}`` (:func:`.run_dir.host_label`)."""
    out: dict[str, list[str]] = {}
    for a in algos:
        for s in seeds:
            out.setdefault(host_label(run_host(runs[a][s]["path"])), []).append(f"{a} seed {s}")
    return out
