"""Is a post-trained run's extra motion in one FLAME group forced by the frozen VAE decoder?

    python train/decoder_fit.py checkpoint=runs/gdpo_small_expr+rot group=jaw
    python train/decoder_fit.py checkpoint=runs/gdpo_small_expr+rot supervised=runs/sft_small group=jaw max_windows=null

Both models are sampled on the split's windows with the evaluation ODE and the same noise. The run's decoded
motion with ``group``'s channels from the supervised model's is fitted by moving the run's latents
(``evaluation/decoder_fit.py``); the control fits the run's own decoded motion from the supervised latents.
Prints the listening FDD / PDD / JDD and ``group``'s listening velocity-std deviation of every motion, the
latent moves and the share of the run's change in ``group`` the fit takes back; writes them as JSON.
"""
from __future__ import annotations

import os

from gdpo_listener.pipeline.threads import omp_wait_defaults  # imports no torch

os.environ.update(omp_wait_defaults())  # before torch loads: OpenMP threads spin briefly, then sleep (pipeline/threads.py)

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gdpo_listener.agents.checkpoint import atomic_write_json  # noqa: E402
from gdpo_listener.envs.flame import GROUPS  # noqa: E402
from gdpo_listener.evaluation import decoder_fit as DF  # noqa: E402
from gdpo_listener.evaluation import metrics as M  # noqa: E402
from gdpo_listener.evaluation.checkpoints import read_arflow_meta, recorded_vae_dir  # noqa: E402
from gdpo_listener.evaluation.data import load_eval_model, prepare_eval_data  # noqa: E402
from gdpo_listener.evaluation.generation import sample_latents  # noqa: E402
from gdpo_listener.pipeline import factories, stages  # noqa: E402
from gdpo_listener.pipeline.checks import check_choice  # noqa: E402
from gdpo_listener.pipeline.threads import configure_threads  # noqa: E402


def check(cfg: DictConfig) -> None:
    """Bad settings fail before anything loads: the group, both checkpoint folders, and one VAE for both models
    (both are decoded by the run's)."""
    check_choice(cfg, "group", GROUPS, None)
    for key in ("checkpoint", "supervised"):
        if not factories.abspath(cfg[key]).is_dir():
            raise FileNotFoundError(f"{key}={cfg[key]}: no checkpoint folder there")
    run, sup = (factories.abspath(cfg[k]) for k in ("checkpoint", "supervised"))
    vaes = [recorded_vae_dir(p, read_arflow_meta(p), cfg.get("vae_dir")).resolve() for p in (run, sup)]
    if vaes[0] != vaes[1]:
        raise ValueError(f"checkpoint={cfg.checkpoint} records the VAE {vaes[0]}, supervised={cfg.supervised} the VAE "
                         f"{vaes[1]}: both must be decoded by the same VAE (pass the run's starting point as supervised=)")


def figures(name: str, norm_motion: torch.Tensor, data, group: str, mcfg: DictConfig) -> dict:
    """Listening FDD / PDD / JDD and ``group``'s velocity-std deviation (Table 1 units) of normalised motion."""
    raw = data.normalizer.denormalize(norm_motion)
    b = data.bank
    out = {"motion": name}
    for metric, groups in M.DYNAMIC_METRICS.items():
        out[metric] = M.dynamic_metric(raw, b["actor_motion"], b["listening"], b["actor_valid"], groups, mcfg.convention).value
    out[f"{group} deviation"] = M.dynamic_metric(raw, b["actor_motion"], b["listening"], b["actor_valid"], (group,),
                                                 mcfg.convention).value
    return out


def run(cfg: DictConfig) -> dict:
    check(cfg)
    configure_threads(cfg.threads)
    device = factories.make_device(cfg.device)
    ckpt = factories.abspath(cfg.checkpoint)
    data, _ = prepare_eval_data(cfg, ckpt, stages.ensure_dataset(cfg.data), device)
    vae, group = data.vae, str(cfg.group)
    z = {name: sample_latents(load_eval_model(path, data)[0], data.bank, steps=int(cfg.steps), seed=int(cfg.seed),
                              batch_size=int(cfg.batch_size))
         for name, path in (("supervised", factories.abspath(cfg.supervised)), ("run", ckpt))}  # (B, N, Dv) each
    with torch.no_grad():
        m_sup, m_run = DF.decode_normalised(vae, z["supervised"]), DF.decode_normalised(vae, z["run"])
    target = DF.splice_group(m_run, m_sup, group)
    weights = {group: float(cfg.group_weight)}  # the spliced group's weight in the fit, every other group's 1
    fit = {"fit": DF.fit_latents(vae, z["run"], target, int(cfg.fit_steps), float(cfg.fit_lr), float(cfg.vel_weight), weights),
           "control": DF.fit_latents(vae, z["supervised"], m_run, int(cfg.fit_steps), float(cfg.fit_lr), float(cfg.vel_weight))}

    def fitted(name: str, z_fit: torch.Tensor, err: float, z0: torch.Tensor) -> dict:
        return {**figures(name, DF.decode_normalised(vae, z_fit), data, group, cfg.metrics),
                "error": err, "latent move": float((z_fit - z0).norm() / z0.norm())}

    with torch.no_grad():
        rows = [figures("supervised", m_sup, data, group, cfg.metrics), figures("run", m_run, data, group, cfg.metrics),
                figures(f"splice target (run, supervised {group})", target, data, group, cfg.metrics),
                fitted("decoded fit of the splice target from the run's latents", *fit["fit"], z["run"]),
                fitted("control: decoded fit of the run's motion from the supervised latents", *fit["control"], z["supervised"])]
    key = f"{group} deviation"
    share = DF.share_removed(rows[1][key], rows[3][key], rows[0][key])
    return {"checkpoint": str(ckpt), "supervised": str(factories.abspath(cfg.supervised)), "group": group, "split": cfg.split,
            "windows": len(data.indices), "seed": int(cfg.seed), "fit_steps": int(cfg.fit_steps), "fit_lr": float(cfg.fit_lr),
            "vel_weight": float(cfg.vel_weight), "group_weight": float(cfg.group_weight), "rows": rows, "share_removed": share}


def print_report(rep: dict) -> None:
    key = f"{rep['group']} deviation"
    print(f"listening figures on {rep['windows']} {rep['split']} windows, sampling seed {rep['seed']}, fits of "
          f"{rep['fit_steps']} Adam steps (lr {rep['fit_lr']:g}, velocity weight {rep['vel_weight']:g}, {rep['group']} weighing "
          f"{rep['group_weight']:g} in the fit of the splice target, every other group 1):")
    for r in rep["rows"]:
        extra = f" | error {r['error']:.4f} | latent move {r['latent move']:.3f}" if "error" in r else ""
        print(f"  {r['motion']}: FDD {r['FDD']:.3f} | PDD {r['PDD']:.3f} | JDD {r['JDD']:.3f} | {key} {r[key]:.4f}{extra}")
    s = rep["share_removed"]
    print(f"share of the run's change in {key} that the fit takes back: {'n/a (the run did not change it)' if s is None else f'{s:.0%}'}")


@hydra.main(version_base="1.3", config_path="conf", config_name="decoder_fit")
def main(cfg: DictConfig) -> None:
    rep = run(cfg)
    print_report(rep)
    out = factories.abspath(cfg.out) if cfg.get("out") else factories.abspath(cfg.checkpoint) / f"decoder_fit_{cfg.group}_{cfg.split}.json"
    atomic_write_json(out, rep)
    print(f"[decoder_fit] wrote {out}")


if __name__ == "__main__":
    main()
