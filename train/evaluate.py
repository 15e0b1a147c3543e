"""Evaluate an AR-Flow checkpoint (supervised or post-trained) on a dataset split.

    python train/evaluate.py checkpoint=runs/sft_small
    python train/evaluate.py checkpoint=runs/gdpo_small_expr+rot
    python train/evaluate.py checkpoint=runs/sft_small metrics.flame_model=FLAME2020/generic_model.pkl \
        metrics.flame_masks=FLAME2020/FLAME_masks.pkl        # + LVE / MHD / vertex FDD
    python train/evaluate.py checkpoint=runs/sft_small metrics.convention=position   # ARTalk/UniLS convention

Every window of the split (each side of each conversation as the actor once) is generated with
the deterministic Euler ODE sampler (``steps=10``, CFG weights ``w_speak`` / ``w_listen``, noise
from ``seed``) and scored against the ground truth (``gdpo_listener.evaluation``): the paper's
Table 1 (speaking LVE, MHD, FDD, PDD, JDD; listening FDD, PDD, JDD), the supplementary Table 6
(FD, P-FD, MSE, SID, rPCC per group exp / jaw / pose, speaking and listening), per-FLAME-group
listening dynamics and rewards, on all windows and on the *expressive subset* (windows whose
ground-truth variance is in the top quartile; variance = mean over valid channels of the
per-channel variance over the window of the ground truth normalised with the dataset's
normaliser). Rewards: the default reward (all groups, default term weights) for every checkpoint
and, for a post-trained run whose recorded reward has other per-group terms, its own reward too.
Writes ``OUT/metrics.json`` and ``OUT/metrics.md`` (default ``OUT`` = ``<checkpoint>/eval_<split>``);
``reconstruction=true`` also scores the ground truth passed through the VAE (``OUT/vae_reconstruction``),
the ceiling of any model decoded by that VAE. On a corpus with listener-intent labels (the synthetic
one) both reports add the listening FDD / PDD / JDD per intent (``per_intent``): which windows carry a
deviation, on any split (``split=train`` for probes that must not look at the test windows).

On a fresh clone the default checkpoint (``runs/sft_small``) is produced first -- dataset, VAE and
supervised AR-Flow by their own entry points, cached -- as ``train/gdpo.py`` does; any other
checkpoint must exist. Bad input stops with a clear error: a checkpoint trained on a dataset
with another FLAME layout or format version, a split without listening frames, a FLAME model
file missing keys.
"""
from __future__ import annotations

import os

# numpy / scipy BLAS: one thread unless the caller says otherwise (set before numpy is imported; the
# Frechet distances' sqrtm is 30x slower with two BLAS threads on a busy 2-core machine)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from gdpo_listener.pipeline.threads import omp_wait_defaults  # imports no torch

os.environ.update(omp_wait_defaults())  # before torch loads: OpenMP threads spin briefly, then sleep (pipeline/threads.py)

import json  # noqa: E402
import time  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gdpo_listener.agents.compress import check_precision, compress, linear_weight_bytes, resolve_precision  # noqa: E402
from gdpo_listener.agents.sampling import check_cfg_drop  # noqa: E402
from gdpo_listener.evaluation import intent_control as IC  # noqa: E402
from gdpo_listener.evaluation import metrics as M  # noqa: E402
from gdpo_listener.evaluation.checkpoints import ensure_checkpoint, recorded_vae_dir, run_reward_config  # noqa: E402
from gdpo_listener.evaluation.data import load_eval_model, prepare_eval_data  # noqa: E402
from gdpo_listener.evaluation.report import header, markdown_report, reconstruction_header, write_report  # noqa: E402
from gdpo_listener.evaluation.scoring import blas_threads, evaluate_model, evaluate_reconstruction  # noqa: E402
from gdpo_listener.pipeline import factories, run_state, stages  # noqa: E402
from gdpo_listener.pipeline.checks import check_choice  # noqa: E402
from gdpo_listener.pipeline.threads import configure_threads  # noqa: E402


def run(cfg: DictConfig, verbose: bool = True) -> dict:
    """The whole evaluation of ``cfg`` (see ``conf/evaluate.yaml``); returns the JSON document written."""
    threads = configure_threads(cfg.threads)
    device = factories.make_device(cfg.device)
    run_state.seed_everything(int(cfg.seed))
    check_choice(cfg, "metrics.convention", M.DYNAMIC_SCALE, "velocity")
    check_precision(cfg.precision)
    check_cfg_drop(cfg.get("cfg_drop"))
    ckpt = factories.abspath(cfg.checkpoint)
    t0 = time.perf_counter()
    ensure_checkpoint(cfg, ckpt)
    data_root = stages.ensure_dataset(cfg.data)
    data, ckpt_meta = prepare_eval_data(cfg, ckpt, data_root, device)
    model, meta = load_eval_model(ckpt, data)
    precision = resolve_precision(cfg.precision, device, linear_weight_bytes(model))
    model = compress(model, precision)  # fp32: the model itself
    own_reward = run_reward_config(meta)
    labels = IC.load_labels(data.root)  # the synthetic corpus' listener intents: deviations per intent

    def per_intent(res: dict) -> dict:
        if labels is not None:
            res["per_intent"] = IC.listening_per_intent(data, labels, res["_row_stats"], cfg.metrics)
            res["intent_floor"] = IC.intent_floor(data, labels, res["_row_stats"], cfg.metrics)
        return res

    with blas_threads(threads):
        res = per_intent(evaluate_model(model, data, cfg, progress=bool(cfg.progress), run_reward=own_reward))
    h = {**header(data, cfg, str(ckpt), int(cfg.seed), own_reward), "precision": precision}
    out = factories.abspath(cfg.out) if cfg.get("out") else ckpt / f"eval_{cfg.split}"
    js, md = write_report(out, h, res)
    if cfg.get("reconstruction"):
        with blas_threads(threads):
            rec = per_intent(evaluate_reconstruction(data, cfg.metrics, progress=bool(cfg.progress)))
        rh = reconstruction_header(h, recorded_vae_dir(ckpt, ckpt_meta, cfg.get("vae_dir")))
        write_report(out / "vae_reconstruction", rh, rec)
        if verbose:
            print("VAE reconstruction of the ground truth (the ceiling of any model decoded by this VAE):")
            print(markdown_report(rh, rec))
    if verbose:
        print(markdown_report(h, res))
        print(f"[evaluate] {h['n_windows']} windows in {time.perf_counter() - t0:.1f} s -> {js} and {md}")
    return json.loads(js.read_text())


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
