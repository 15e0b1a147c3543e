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
3. every checkpoint (supervised, GRPO, GDPO) evaluated in-process as ``train/evaluate.py`` does
   (``gdpo_listener.evaluation``) on the test split (ODE sampler, 10 steps, sampling seed S), plus
   two controls (``evaluation.intent_control``):

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
training runs are reused when their overrides are unchanged (``reuse=true``). A run folder is
replaced only if the benchmark started that run (its record ``runs/<algo>_seed<S>.bench_run.json``)
or it is empty; any other folder in the way stops the benchmark with an error naming it.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy / scipy BLAS (see train/evaluate.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep (pipeline/threads.py)

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from gdpo_listener.agents.checkpoint import atomic_write_bytes, atomic_write_json  # noqa: E402
from gdpo_listener.evaluation import intent_control as IC  # noqa: E402
from gdpo_listener.evaluation.benchmark import (  # noqa: E402
    METHOD_LABEL,
    build_report,
    plot_listening_window,
    plot_reward_curves,
    replaceable_run_dir,
    reward_curves,
    run_stamp,
    training_budget,
)
from gdpo_listener.evaluation.checkpoints import run_reward_config  # noqa: E402
from gdpo_listener.evaluation.data import load_eval_model, prepare_eval_data  # noqa: E402
from gdpo_listener.evaluation.report import header, to_json, write_report  # noqa: E402
from gdpo_listener.evaluation.scoring import blas_threads, evaluate_model  # noqa: E402
from gdpo_listener.evaluation.seed_stats import flat_metrics  # noqa: E402
from gdpo_listener.pipeline import factories, run_state, stages  # noqa: E402
from gdpo_listener.pipeline.threads import configure_threads, resolve_threads  # noqa: E402
from gdpo_listener.rewards.groups import parse_reward_spec  # noqa: E402

ALGOS = ("grpo", "gdpo")


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
            f"device={cfg.device}", f"threads={resolve_threads(cfg.threads)}", "logger.backend=csv", *map(str, cfg.train_overrides)]


def run_training(cfg: DictConfig, algo: str, seed: int, out: Path, data_root: Path, vae: Path, sft: Path) -> dict:
    """Train (or reuse) ``out/runs/<algo>_seed<S>``; returns {path, wall_s, reused}."""
    run_dir = out / "runs" / f"{algo}_seed{seed}"
    over = train_overrides(cfg, algo, seed, run_dir, data_root, vae, sft)
    stamp = run_stamp(run_dir)
    if cfg.reuse and stamp.is_file() and (run_dir / "meta.json").is_file():
        prev = json.loads(stamp.read_text())
        if prev.get("overrides") == over and prev.get("status", "done") == "done":
            print(f"[bench] reusing {run_dir} ({algo}, seed {seed})", flush=True)
            return {"path": run_dir, "wall_s": prev.get("wall_s"), "reused": True}
    if run_dir.exists():  # stale or different run: start clean (its CSV logs would otherwise be appended to)
        if not replaceable_run_dir(run_dir, out / "runs"):
            raise RuntimeError(f"refusing to delete {run_dir}: it holds files the benchmark did not write (no {stamp.name} "
                               f"beside it); move it away or choose another out_dir")
        shutil.rmtree(run_dir)
    atomic_write_json(stamp, {"overrides": over, "status": "running"})  # the folder is the benchmark's from now on
    log = out / "logs" / f"{algo}_seed{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(stages.TRAIN_DIR / "gdpo.py"), *over]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(resolve_threads(cfg.threads))}
    print(f"[bench] training {algo} seed {seed} -> {run_dir} (log {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        res = subprocess.run(cmd, cwd=os.getcwd(), stdout=fh, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"train/gdpo.py {algo} seed {seed} failed (exit {res.returncode}); log {log}:\n{tail}")
    if not (run_dir / "meta.json").is_file():
        raise RuntimeError(f"train/gdpo.py {algo} seed {seed} wrote no checkpoint into {run_dir}; see its log {log}")
    atomic_write_json(stamp, {"overrides": over, "wall_s": wall, "status": "done"})
    print(f"[bench] {algo} seed {seed} done in {wall:.0f} s", flush=True)
    return {"path": run_dir, "wall_s": wall, "reused": False}


def run_meta(runs: dict, algos: list[str], seeds: list[int]) -> dict:
    """The meta.json of the first finished training run (resolved ``config``, ``arch``); {} if none."""
    for a in algos:
        for s in seeds:
            try:
                return json.loads((Path(runs[a][s]["path"]) / "meta.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
    return {}


def git_state() -> dict:
    """Commit and modified files of the code that produced the report (best effort)."""
    def git(*a):
        r = subprocess.run(["git", *a], cwd=stages.TRAIN_DIR.parent, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified": dirty.splitlines() if dirty else []}


# ----------------------------------------------------------------------------------------------
# main


def apply_quick(cfg: DictConfig) -> DictConfig:
    q = cfg.quick_settings
    return OmegaConf.merge(cfg, {"seeds": q.seeds, "iterations": q.iterations, "train_overrides": q.train_overrides,
                                 "eval": q.eval, "controls": q.controls})


def eval_config(cfg: DictConfig, vae_path: Path, seed: int) -> DictConfig:
    """The evaluation settings of every checkpoint (as ``train/evaluate.py``'s config, CFG 1)."""
    return OmegaConf.create({"data": OmegaConf.to_container(cfg.data, resolve=True), "vae_dir": str(vae_path),
                             "split": cfg.eval.split, "max_windows": cfg.eval.max_windows, "steps": cfg.eval.steps,
                             "w_speak": 1.0, "w_listen": 1.0, "batch_size": cfg.eval.batch_size, "seed": seed,
                             "progress": bool(cfg.progress), "features": OmegaConf.to_container(cfg.features, resolve=True),
                             "metrics": OmegaConf.to_container(cfg.metrics, resolve=True)})


def run(cfg: DictConfig) -> dict:
    """The whole benchmark of ``cfg`` (see ``conf/bench.yaml``); returns the report dict."""
    if cfg.quick:
        cfg = apply_quick(cfg)
    configure_threads(cfg.threads)
    device = factories.make_device(cfg.device)
    run_state.seed_everything(0)
    out = factories.abspath(cfg.out_dir)
    seeds, algos = [int(s) for s in cfg.seeds], [str(a) for a in cfg.algos]
    groups = parse_reward_spec(cfg.reward)
    if not seeds:
        raise ValueError("seeds must list at least one seed")
    if not algos or set(algos) - set(ALGOS):
        raise ValueError(f"algos={algos} must be a non-empty subset of {list(ALGOS)}")
    if len(seeds) < 3 and not cfg.quick:
        print(f"[bench] warning: {len(seeds)} seed(s); the benchmark protocol asks for at least 3", flush=True)
    out.mkdir(parents=True, exist_ok=True)
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
    ecfg = eval_config(cfg, vae_path, seeds[0])
    data, _ = prepare_eval_data(ecfg, sft_path, data_root, device)
    methods = ["supervised", *algos]
    paths = {"supervised": {s: sft_path for s in seeds}, **{a: {s: runs[a][s]["path"] for s in seeds} for a in algos}}

    labels, intents = IC.load_labels(data.root), IC.corpus_intents(data.root) or []
    clf, clf_info = None, {}
    mf = int(cfg.controls.min_listen)
    if labels is None or not intents:
        clf_info = {"note": f"{data.root} has no synthetic_labels.json / intent list (text control needs the synthetic corpus)"}
    else:
        clf, clf_info = IC.train_intent_classifier(data.root, labels, intents, mf)
        clf_info.update(IC.ground_truth_accuracy(clf, data, labels, intents, mf))
    crow = IC.control_windows(data, int(cfg.controls.n_windows), mf)
    prompts = IC.prompt_embeddings(data, intents, len(crow), 1234) if clf is not None and crow else {}

    flat, controls, first_preds = {m: {} for m in methods}, {m: {} for m in methods}, {}
    view_row = int(torch.argmax(data.bank["listening"].sum(-1)))
    for m in methods:
        for s in seeds:
            model, meta = load_eval_model(Path(paths[m][s]), data)
            own_reward = run_reward_config(meta)
            res = evaluate_model(model, data, ecfg, seed=s, progress=bool(cfg.progress), run_reward=own_reward)
            write_report(out / "eval" / f"{m}_seed{s}", header(data, ecfg, str(paths[m][s]), s, own_reward), res)
            flat[m][s] = flat_metrics(res)
            controls[m][s] = IC.run_controls(model, data, crow, cfg.controls, ecfg, s, clf, intents, prompts, labels,
                                             res["_pred"], bool(cfg.progress))
            if s == seeds[0]:
                first_preds[m] = res["_pred"][view_row].cpu().numpy()
            r = flat[m][s]
            print(f"[bench] {METHOD_LABEL[m]} seed {s}: listening FDD {r.get('all/listening/FDD')} PDD {r.get('all/listening/PDD')} "
                  f"JDD {r.get('all/listening/JDD')}; text control {controls[m][s].get('prompt_accuracy')}", flush=True)

    # 4. report
    curves = {a: {s: reward_curves(runs[a][s]["path"], a, groups) for s in seeds} for a in algos}
    plot_reward_curves(curves, groups, out / "reward_curves.png")
    plot_listening_window(data, view_row, first_preds, out / "listening_motion.png", seeds[0])
    meta = run_meta(runs, algos, seeds)
    run_cfg = dict(meta.get("config") or {})
    budget = training_budget(run_cfg, meta.get("arch"))
    wall = {a: [runs[a][s]["wall_s"] for s in seeds if runs[a][s]["wall_s"] is not None] for a in algos}
    hdr = {"dataset": str(data.root), "split": data.split, "n_windows": len(data.indices), "n_expressive": int(data.expressive.sum()),
           "seeds": seeds, "algos": algos, "reward": str(cfg.reward), "iterations": budget["iterations"],
           "env": dict(run_cfg.get("env") or {}), "lr": (run_cfg.get("optim") or {}).get("lr"),
           "algo_config": {a: (run_meta(runs, [a], seeds).get("config") or {}).get("algo") for a in algos},
           "rollouts_per_run": budget["rollouts"], "episode_tokens": budget["episode_tokens"],
           "transitions_per_run": budget["transitions"],
           "wall_s": {a: round(float(np.mean(wall[a])), 1) if wall[a] else float("nan") for a in algos},
           "steps": int(ecfg.steps), "sft": str(sft_path), "vae": str(vae_path), "quick": bool(cfg.quick), "git": git_state(),
           "eval_header": header(data, ecfg, str(sft_path), seeds[0])}
    train_info = {a: {str(s): {"path": str(runs[a][s]["path"]), "wall_s": runs[a][s]["wall_s"], "reused": runs[a][s]["reused"]}
                      for s in seeds} for a in algos}
    rep, md = build_report(list(cfg.controls.cfg_weights), methods, flat, controls, curves, train_info, groups, hdr, clf_info, intents)
    rep["total_s"] = time.perf_counter() - t_start
    atomic_write_json(out / "report.json", to_json(rep))
    atomic_write_bytes(out / "report.md", md.encode())
    print(md)
    print(f"[bench] done in {rep['total_s']:.0f} s -> {out / 'report.md'}, {out / 'report.json'}, {out / 'reward_curves.png'}, "
          f"{out / 'listening_motion.png'}")
    return rep


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    with blas_threads(resolve_threads(cfg.threads)):
        run(cfg)


def hydra_argv(argv: list[str]) -> list[str]:
    """``--quick`` is accepted as a synonym of the Hydra override ``quick=true``."""
    return ["quick=true" if a == "--quick" else a for a in argv]


if __name__ == "__main__":
    sys.argv = hydra_argv(sys.argv)
    main()
