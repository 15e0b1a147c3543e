"""Stage 0: train the motion VAE (paper section 3.1) on normalised actor motion.

    python train/vae.py                          # small CPU model on the synthetic corpus
    python train/vae.py optim.steps=3000 +model.d_latent=32
    python train/vae.py resume=true              # continue a killed run

All train windows (actor motion only, no audio) are loaded once into one tensor and normalised
with the dataset's normaliser; batches are random rows. Loss = reconstruction + velocity + small
KL (agents/vae.py), masked by FLAME-group validity. The training state (model, optimiser, step,
RNG, logger counters) is saved atomically to ``out_dir/last/state.pt`` every ``ckpt_every`` steps;
the final VAE checkpoint (``out_dir/{model,normalizer}.safetensors`` + ``meta.json``, loadable
with ``agents.vae.load_vae``) is written at the end, followed by a per-group report (RMSE in raw
FLAME units, velocity-std ratio) on the held-out split.
"""
from __future__ import annotations

import os

from gdpo_listener.pipeline.threads import omp_wait_defaults  # imports no torch

os.environ.update(omp_wait_defaults())  # before torch loads: OpenMP threads spin briefly, then sleep (pipeline/threads.py)

import math
import time
from dataclasses import asdict

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from gdpo_listener.agents.checkpoint import atomic_write_json
from gdpo_listener.agents.guards import check_finite_step, check_finite_weights
from gdpo_listener.agents.vae import (
    LEGACY_DEFAULTS,
    VAEConfig,
    channel_weight,
    format_report,
    latent_stats,
    make_vae,
    per_group_report,
    raw_channel_std,
    save_vae,
)
from gdpo_listener.envs.dataset import DyadicWindows
from gdpo_listener.pipeline import factories, stages
from gdpo_listener.pipeline.checks import check_count, check_non_negative, check_positive
from gdpo_listener.pipeline.run_dir import claim_run_dir
from gdpo_listener.pipeline.run_state import resolved_config, resume_training, save_run_state, seed_everything
from gdpo_listener.pipeline.threads import configure_threads


def load_train_tensors(root, window: int) -> tuple[torch.Tensor, torch.Tensor, DyadicWindows]:
    """All train windows' raw actor motion ``(n, W, 67)`` and validity ``(n, 6)``, in one pass."""
    windows = DyadicWindows(root, "train", window=window, load_audio=False)
    if len(windows) == 0:
        raise ValueError(f"no training windows of {window} frames in {root} (split 'train')")
    motion = np.empty((len(windows), window, 67), np.float32)
    valid = np.empty((len(windows), 6), bool)
    for i, ix in enumerate(windows.index):
        conv = windows.conversation(ix.conversation)
        motion[i] = conv.motion[ix.actor, ix.window * window : (ix.window + 1) * window]
        valid[i] = conv.group_valid[ix.actor]
    return torch.from_numpy(motion), torch.from_numpy(valid), windows


def lr_at(step: int, optim_cfg) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr`` (a pure function of the step)."""
    lr, total, warm = float(optim_cfg.lr), int(optim_cfg.steps), max(int(optim_cfg.warmup), 1)
    if step < warm:
        return lr * (step + 1) / warm
    p = min((step - warm) / max(total - warm, 1), 1.0)
    lo = lr * float(optim_cfg.min_lr_ratio)
    return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * p))


# config sections that must match for resume=true to continue a run (optim.steps may grow); the model is compared
# as the resolved VAEConfig (check_resumed_config)
RESUME_KEYS = ("data", "seed")


def check_settings(cfg: DictConfig) -> None:
    """Refuse a bad optimiser, logging or evaluation setting before anything is claimed or generated."""
    check_positive(cfg, ["optim.lr", "optim.grad_clip"])
    check_non_negative(cfg, ["optim.weight_decay", "optim.min_lr_ratio"])
    check_count(cfg, ["optim.steps", "optim.batch_size", "log_every", "ckpt_every", "eval.batch_size"])
    check_count(cfg, ["optim.warmup"], minimum=0)


def optimizer_step(cfg: DictConfig, step: int, model, opt, x: torch.Tensor, w: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """One update on normalised windows ``x (B, W, 67)`` with channel weights ``w (B, 67)`` (0-based ``step``):
    ``(loss terms, gradient norm)``."""
    terms = model.loss(x, model(x), w)
    opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.optim.grad_clip))
    check_finite_step({k: v for k, v in terms.items() if k.startswith("loss")}, gnorm, where=f"vae step {step + 1}",
                      hint=f"optim.lr={cfg.optim.lr} too large")
    opt.step()
    return terms, gnorm


def print_progress(scalars: dict, done: int, steps: int) -> None:
    print(f"[vae] step {done}/{steps}  loss {scalars['loss/loss']:.4f}  recon {scalars['loss/loss_recon']:.4f}  "
          f"vel {scalars['loss/loss_vel']:.5f}  dyn {scalars['loss/loss_dyn']:.5f}  kl {scalars['loss/loss_kl']:.2f}  "
          f"({scalars['perf/windows_per_s']:.0f} windows/s)", flush=True)


def print_report(report: dict, split: str, n_windows: int) -> None:
    """The per-group reconstruction report of the evaluation split (or why there is none)."""
    if not report:
        print(f"[vae] no windows in split {split!r}: no per-group report")
        return
    print(f"[vae] per-group reconstruction on the {split!r} split ({n_windows} windows, raw FLAME units):")
    print(format_report(report))
    print("[vae] (listening / speaking: the velocity-std ratio on the actor's listening / speaking frames only; every model "
          "decoded by this VAE inherits its listening figure as a ceiling)")


def check_resumed_config(state: dict, cfg: VAEConfig, state_path) -> None:
    """The resolved VAE config must be the one the state was trained with. The Hydra ``model`` section holds only
    overrides, so comparing it would let a default that changed between the two runs (``dyn_window``) through;
    a state written before the resolved config was recorded is resolved from its overrides over the defaults of
    then (``LEGACY_DEFAULTS``)."""
    then = state.get("vae_config")
    if then is None:
        then = asdict(VAEConfig.small(**{**LEGACY_DEFAULTS, **((state.get("config") or {}).get("model") or {})}))
    diff = {k: (then.get(k), v) for k, v in asdict(cfg).items() if then.get(k) != v}
    if diff:
        said = ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in diff.items())
        again = " ".join(f"+model.{k}={a}" for k, (a, _) in diff.items())
        raise ValueError(f"resume=true: the VAE state {state_path} was trained with another VAE config ({said}); "
                         f"resume it with {again}, or start over without resume=true")


@hydra.main(version_base="1.3", config_path="conf", config_name="vae")
def main(cfg: DictConfig) -> None:
    configure_threads(cfg.threads, announce=True)
    device = factories.make_device(cfg.device)
    generator = seed_everything(int(cfg.seed))
    check_settings(cfg)
    out_dir, _lock = claim_run_dir(factories.abspath(cfg.out_dir), cfg, stage="vae", resume=cfg.resume)
    root = stages.ensure_dataset(cfg.data)

    model = make_vae(cfg.model).to(device)
    W = model.cfg.window
    raw, valid, windows = load_train_tensors(root, W)
    normalizer = windows.normalizer
    model.set_loss_weights(raw_channel_std(raw, valid))  # weight channels by their raw variance in a group
    x_all = normalizer.normalize(raw).to(device)  # (n, W, 67) normalised
    w_all = channel_weight(valid).to(device)  # (n, 67)
    n = x_all.shape[0]
    print(f"[vae] {n} train windows of {W} frames from {root}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg.optim.lr), weight_decay=float(cfg.optim.weight_decay))
    state_path = out_dir / "last" / "state.pt"
    run_states = {"model": model, "optim": opt}
    state = resume_training("vae", state_path, out_dir / "logs", cfg, RESUME_KEYS, run_states, generator, device,
                            check=lambda saved: check_resumed_config(saved, model.cfg, state_path)) if cfg.resume else {"step": 0}
    start, logger_state = int(state["step"]), state.get("logger")
    logger = factories.make_logger(cfg.logger, out_dir, "vae", state_dict=logger_state)

    steps, bs = int(cfg.optim.steps), int(cfg.optim.batch_size)
    model.train()
    t0 = time.perf_counter()
    running: dict[str, float] = {}
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.optim)
        idx = torch.randint(n, (bs,), generator=generator).to(device)
        terms, gnorm = optimizer_step(cfg, step, model, opt, x_all[idx], w_all[idx])
        for k, v in terms.items():
            running[k] = running.get(k, 0.0) + v.item()
        running["grad_norm"] = running.get("grad_norm", 0.0) + gnorm.item()
        done = step + 1
        if done % int(cfg.log_every) == 0 or done == steps:
            k_avg = int(cfg.log_every) if done % int(cfg.log_every) == 0 else done % int(cfg.log_every)
            scalars = {f"loss/{k}" if k.startswith("loss") else f"optim/{k}": v / k_avg for k, v in running.items()}
            scalars["optim/lr"] = opt.param_groups[0]["lr"]
            scalars["perf/windows_per_s"] = (done - start) * bs / (time.perf_counter() - t0)
            factories.log_scalars(logger, scalars, done)
            print_progress(scalars, done, steps)
            running = {}
        if done % int(cfg.ckpt_every) == 0 and done < steps:
            check_finite_weights(model, where=f"vae step {done}", hint=f"optim.lr={cfg.optim.lr} too large")
            save_run_state(state_path, cfg, RESUME_KEYS, done, generator, logger, run_states, vae_config=asdict(model.cfg))
    elapsed = time.perf_counter() - t0
    check_finite_weights(model, where=f"vae step {steps}", hint=f"optim.lr={cfg.optim.lr} too large")
    save_run_state(state_path, cfg, RESUME_KEYS, steps, generator, logger, run_states, vae_config=asdict(model.cfg))

    model.eval()
    mean, std = latent_stats(model, x_all)
    model.latent_mean.copy_(mean)
    model.latent_std.copy_(std)
    eval_windows = DyadicWindows(root, cfg.eval.split, window=W, load_audio=False)
    report = per_group_report(model, normalizer, eval_windows, device, batch_size=int(cfg.eval.batch_size))
    save_vae(out_dir, model, normalizer, extra_meta={
        "config": resolved_config(cfg), "data_root": str(root), "steps": steps,
        "train_windows": n, "report": {"split": cfg.eval.split, "groups": report},
    })
    atomic_write_json(out_dir / "report.json", {"split": cfg.eval.split, "windows": len(eval_windows), "groups": report})
    factories.log_scalars(logger, {f"eval/{g}/{k}": v for g, r in report.items() for k, v in r.items() if k != "windows"}, steps)
    print(f"[vae] trained {steps - start} steps in {elapsed:.1f} s; checkpoint: {out_dir}")
    print(f"[vae] latent std per dim (train, posterior mean): {[round(float(v), 3) for v in std.cpu()]}")
    print_report(report, cfg.eval.split, len(eval_windows))


if __name__ == "__main__":
    main()
