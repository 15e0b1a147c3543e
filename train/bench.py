"""Benchmark: supervised-only vs GRPO vs GDPO post-training, several seeds, one report.

    python train/bench.py                       # 3 seeds, reward=all, 900 iterations (about 60 min with jobs=2 on 2 CPU cores)
    python train/bench.py seeds=[0,1,2,3,4] iterations=80 reward=expr+rot
    python train/bench.py algos=[grpo,gdpo,gdpo@marginal]   # also GDPO trained with env.sde=marginal
    python train/bench.py --quick               # tiny sizes (tests): same as quick=true

Protocol (every seed S):

1. the same supervised AR-Flow (``pretrained.sft``; trained once, with its VAE and the synthetic
   corpus, by their own entry points when missing, as ``train/gdpo.py`` does);
2. one ``train/gdpo.py algo=<algo> seed=S ...`` subprocess per method of ``algos`` (``grpo``,
   ``gdpo``, or ``<algo>@<sde>`` = that algorithm with ``env.sde=<sde>``, run folder
   ``runs/<algo>-<sde>_seed<S>``), with identical overrides apart from ``algo=`` / ``env.sde=`` --
   the same compute budget: iterations, prompts per batch, G, SDE steps, epochs and chunking;
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
     the listening frames) against the listening CFG weight ``w_listen`` in ``controls.cfg_weights``;

4. the supervised model sampled with the evaluation ODE and each SDE of ``sde_dynamics`` (no
   training): which SDE's final samples have the ODE's dynamics (``evaluation.sde_choice``);
5. the ground truth passed through the VAE (``evaluation.scoring.evaluate_reconstruction``): a
   reference row in every table and the VAE's ceiling on the listening dynamics, so the report
   separates the collapse the VAE causes from the AR-Flow's regression to the mean.

The report (``evaluation.benchmark.build_report``) adds to the mean +- std over seeds: Welch's test
over seeds, the paired per-window comparison of every method vs supervised-only (all windows and
the expressive subset), the GDPO paper mechanism figures per iteration from the runs' logs, the
slope of the training reward over the last third of iterations, the SDE verdicts and the targets
of issue 10 with pass / fail (``evaluation.targets``).

Outputs in ``out_dir`` (default ``runs/bench``): ``report.md`` and ``report.json`` (mean +- std
over seeds of every metric, every group's reward, the controls, the training cost),
``reward_curves.png`` (per-group training reward of every run and the smoothed mean over seeds, from
the CSV logs ``runs/<slug>_seed<S>/logs/<algo>/scalars/reward/<group>/mean.csv``), ``mechanism.png``
(distinct advantage values per prompt group and advantage / group-reward correlations per
iteration, from ``.../scalars/adv/``), ``listening_motion.png`` (one test window: ground truth vs
each method), ``eval/<slug>_seed<S>/`` (per-run metrics.json / metrics.md; ``eval/vae_reconstruction/``
for the reference row) and
``logs/<slug>_seed<S>.log`` (training output). Finished
training runs are reused when their overrides are unchanged (``reuse=true``); a finished run with
fewer iterations is continued from its last state (``extend=true``, e.g. ``iterations=600`` after a
300-iteration benchmark: the same result as a straight 600-iteration run). A run folder is
replaced only if the benchmark started that run (its record ``runs/<algo>_seed<S>.bench_run.json``)
or it is empty; any other folder in the way stops the benchmark with an error naming it.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy / scipy BLAS (see train/evaluate.py)
from gdpo_listener.pipeline.threads import omp_wait_defaults  # imports no torch

os.environ.update(omp_wait_defaults())  # before torch loads: OpenMP threads spin briefly, then sleep (pipeline/threads.py)

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from gdpo_listener.agents.checkpoint import atomic_write_bytes, atomic_write_json  # noqa: E402
from gdpo_listener.agents.sampling import check_cfg_drop  # noqa: E402
from gdpo_listener.evaluation import intent_control as IC  # noqa: E402
from gdpo_listener.evaluation.bench_eval import evaluate_methods, make_text_control, reconstruction_reference, report_setup  # noqa: E402
from gdpo_listener.evaluation.bench_markdown import report_markdown  # noqa: E402
from gdpo_listener.evaluation.bench_plots import plot_listening_window, plot_mechanism, plot_reward_curves  # noqa: E402
from gdpo_listener.evaluation.bench_runs import train_runs  # noqa: E402
from gdpo_listener.evaluation.bench_stats import mechanism_curves  # noqa: E402
from gdpo_listener.evaluation.benchmark import build_report, check_pairs, method_label, parse_method, reward_curves  # noqa: E402
from gdpo_listener.evaluation.data import load_eval_model, prepare_eval_data  # noqa: E402
from gdpo_listener.evaluation.report import to_json  # noqa: E402
from gdpo_listener.evaluation.scoring import blas_threads  # noqa: E402
from gdpo_listener.evaluation.sde_choice import final_sample_dynamics, sampler_variants  # noqa: E402
from gdpo_listener.pipeline import factories, run_state, stages  # noqa: E402
from gdpo_listener.pipeline.threads import configure_threads, resolve_threads  # noqa: E402
from gdpo_listener.rewards.groups import parse_reward_spec  # noqa: E402

# ----------------------------------------------------------------------------------------------
# main


def apply_quick(cfg: DictConfig) -> DictConfig:
    q = cfg.quick_settings
    return OmegaConf.merge(cfg, {"seeds": q.seeds, "iterations": q.iterations, "train_overrides": q.train_overrides,
                                 "eval": q.eval, "controls": q.controls, "sde_dynamics": q.sde_dynamics})


def eval_config(cfg: DictConfig, vae_path: Path, seed: int) -> DictConfig:
    """The evaluation settings of every checkpoint (as ``train/evaluate.py``'s config, CFG 1)."""
    return OmegaConf.create({"data": OmegaConf.to_container(cfg.data, resolve=True), "vae_dir": str(vae_path),
                             "split": cfg.eval.split, "max_windows": cfg.eval.max_windows, "steps": cfg.eval.steps,
                             "w_speak": 1.0, "w_listen": 1.0, "batch_size": cfg.eval.batch_size, "seed": seed,
                             "progress": bool(cfg.progress), "features": OmegaConf.to_container(cfg.features, resolve=True),
                             "metrics": OmegaConf.to_container(cfg.metrics, resolve=True)})


def parse_algos(algos) -> list[str]:
    """The ``algos`` entries as method keys (each checked by ``parse_method``), without duplicates."""
    methods = [parse_method(str(a)) for a in algos]
    keys, slugs = [m.key for m in methods], [m.slug for m in methods]
    if not keys or len(set(keys)) != len(keys):
        raise ValueError(f"algos={list(algos)} must list at least one method, each once (grpo, gdpo, gdpo@marginal, gdpo+<variant>, ...)")
    if len(set(slugs)) != len(slugs):  # gdpo+a_b and gdpo+a+b would share run folders
        raise ValueError(f"algos={list(algos)}: two methods share a run folder name ({sorted(s for s in slugs if slugs.count(s) > 1)[0]}); "
                         f"rename a variant")
    return keys


def check_settings(cfg: DictConfig) -> tuple[list[int], list[str], list[str]]:
    """``(seeds, algos, rewarded groups)`` of ``cfg``; a bad setting fails here, before any training."""
    seeds, algos = [int(s) for s in cfg.seeds], parse_algos(cfg.algos)
    for a in algos:  # every variant named in algos is defined, with overrides a variant may set
        parse_method(a).variant_overrides(cfg.get("variants"), cfg.reward)
    check_pairs(cfg.get("compare"), ["supervised", *algos])
    groups = parse_reward_spec(cfg.reward)
    for drop in cfg.controls.get("cfg_drops") or []:
        check_cfg_drop(drop)
    if not seeds:
        raise ValueError("seeds must list at least one seed")
    if len(seeds) < 3 and not cfg.quick:
        print(f"[bench] warning: {len(seeds)} seed(s); the benchmark protocol asks for at least 3", flush=True)
    return seeds, algos, groups


def print_summary(rep: dict, md: str, out: Path) -> None:
    """The report, each method's late training-reward trend, and where the outputs are."""
    print(md)
    for a, by_g in rep["training"]["trend_last_third"].items():
        print(f"[bench] {method_label(a)}: training-reward slope over the last third of iterations (share of the whole gain): "
              + ", ".join(f"{g} {'n/a' if t['slope'] is None else format(t['slope'], '+.2e')}"
                          f" ({'n/a' if t['share'] is None else format(t['share'], '.0%')})" for g, t in by_g.items()), flush=True)
    print(f"[bench] done in {rep['total_s']:.0f} s -> {out / 'report.md'}, {out / 'report.json'}, {out / 'reward_curves.png'}, "
          f"{out / 'mechanism.png'}, {out / 'listening_motion.png'}")


def run(cfg: DictConfig) -> dict:
    """The whole benchmark of ``cfg`` (see ``conf/bench.yaml``); returns the report dict."""
    if cfg.quick:
        cfg = apply_quick(cfg)
    configure_threads(cfg.threads)
    device = factories.make_device(cfg.device)
    run_state.seed_everything(0)
    out = factories.abspath(cfg.out_dir)
    seeds, algos, groups = check_settings(cfg)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. prerequisites, produced by their own entry points when missing (cached)
    data_root = stages.ensure_dataset(cfg.data)
    vae_path = stages.ensure_vae(cfg, data_root)
    sft_path = stages.ensure_sft(cfg, data_root, vae_path)

    # 2. RL runs: same budget for every method
    runs = train_runs(cfg, algos, seeds, out, data_root, vae_path, sft_path)

    # 3. evaluation of every checkpoint, in-process, on one window bank, with the controls; the VAE's reference row
    ecfg = eval_config(cfg, vae_path, seeds[0])
    data, _ = prepare_eval_data(ecfg, sft_path, data_root, device)
    methods = ["supervised", *algos]
    paths = {"supervised": {s: sft_path for s in seeds}, **{a: {s: runs[a][s]["path"] for s in seeds} for a in algos}}
    tc = make_text_control(cfg, data)
    ev = evaluate_methods(cfg, ecfg, data, paths, seeds, tc, out)
    reconstruction = reconstruction_reference(data, ecfg, out, sft_path, vae_path, seeds[0], tc)

    # 4. final-sample dynamics of the supervised model under the ODE and each SDE, and teacher-forced (no training)
    sd = cfg.sde_dynamics
    variants = sampler_variants(int(ecfg.steps), int(sd.steps), float(sd.sigma), [str(x) for x in sd.sdes], teacher_forced=True,
                                windows=[list(w) for w in sd.get("windows") or []])
    sup_model, _ = load_eval_model(Path(sft_path), data)
    dynamics = final_sample_dynamics(sup_model, data, variants, seeds)

    # 5. report: training curves and mechanism from the runs' logs, figures, tables
    curves = {a: {s: reward_curves(runs[a][s]["path"], parse_method(a).algo, groups) for s in seeds} for a in algos}
    mechanism = {a: {s: mechanism_curves(runs[a][s]["path"], parse_method(a).algo, groups) for s in seeds} for a in algos}
    hdr = report_setup(cfg, runs, algos, seeds, data, ecfg, sft_path, vae_path)
    plot_reward_curves(curves, groups, out / "reward_curves.png")
    plot_mechanism(mechanism, groups, out / "mechanism.png", hdr["env"].get("group_size"))
    plot_listening_window(data, ev.view_row, ev.first_preds, out / "listening_motion.png", seeds[0])
    train_info = {a: {str(s): {"path": str(runs[a][s]["path"]), "wall_s": runs[a][s]["wall_s"], "reused": runs[a][s]["reused"]}
                      for s in seeds} for a in algos}
    window_labels = (IC.row_intents(data, tc.labels, list(range(int(data.bank.batch_size[0]))))
                     if tc.labels is not None and tc.intents else None)
    cfg_weights = list(cfg.controls.cfg_weights)
    rep = build_report(cfg_weights, methods, ev.flat, ev.controls, curves, train_info, groups, hdr, tc.info, tc.intents,
                       windows=ev.windows, expressive=data.expressive.cpu().numpy(), mechanism=mechanism, sde_dynamics=dynamics,
                       sde_variants=variants, reconstruction=reconstruction, window_labels=window_labels, intent_floor=ev.floor,
                       compare=check_pairs(cfg.get("compare"), methods))
    md = report_markdown(cfg_weights, rep, methods, groups, tc.intents)
    rep["total_s"] = time.perf_counter() - t_start
    atomic_write_json(out / "report.json", to_json(rep))
    atomic_write_bytes(out / "report.md", md.encode())
    print_summary(rep, md, out)
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
