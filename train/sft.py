"""Stage 1: supervised AR-Flow training (rectified flow, paper eq. 4), teacher forced.

    python train/sft.py                       # small CPU preset on the synthetic corpus
    python train/sft.py model=paper           # paper preset (6 layers, 16 heads, D = 512)
    python train/sft.py resume=true           # continue a killed run

One forward pass trains all 25 tokens of a window: the noisy copy of token l attends to the
conditioning prefix, the clean history < l and itself (agents/arflow.py). The loss is logged
overall and binned by flow time. Checkpoints (safetensors + resolved config) are atomic.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle OpenMP threads sleep (pipeline/threads.py)

import time

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from gdpo_listener.agents.arflow import count_parameters
from gdpo_listener.agents.flow import interpolate, velocity_target
from gdpo_listener.agents.guards import check_finite_step, check_finite_weights
from gdpo_listener.envs.windows import cond_from_bank
from gdpo_listener.evaluation.generation import numeric_items, print_quality_report, quality_report
from gdpo_listener.pipeline import factories, stages
from gdpo_listener.pipeline.checks import check_count, check_non_negative, check_positive
from gdpo_listener.pipeline.run_dir import claim_run_dir, truncate_logs
from gdpo_listener.pipeline.run_state import load_run_state, save_run_state, seed_everything
from gdpo_listener.pipeline.threads import configure_threads

T_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def make_optimizer(model, optim_cfg):
    return torch.optim.AdamW(model.parameters(), lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


def make_scheduler(opt, optim_cfg):
    warmup = max(int(optim_cfg.warmup), 1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))


def flow_step(model, batch, generator) -> dict[str, torch.Tensor]:
    """Rectified-flow loss on a batch of bank rows; returns named terms and per-bin losses."""
    x1 = batch["actor_latent"]  # (B, N, Dv)
    x0 = torch.randn(x1.shape, generator=generator, device="cpu").to(x1.device)  # (B, N, Dv)
    t = torch.rand(x1.shape[:2], generator=generator, device="cpu").to(x1.device)  # (B, N)
    xt = interpolate(x0, x1, t.unsqueeze(-1))
    v = model(cond_from_bank(batch), x1, xt, t)  # (B, N, Dv)
    per_token = (v - velocity_target(x0, x1)).pow(2).mean(-1)  # (B, N)
    out = {"loss_flow": per_token.mean()}
    with torch.no_grad():
        for lo, hi in zip(T_BINS[:-1], T_BINS[1:]):
            m = (t >= lo) & (t < hi)
            out[f"loss_flow_t{lo:.2f}-{hi:.2f}"] = (per_token * m).sum() / m.sum().clamp(min=1)
    return out


# config sections that must match for resume=true to continue a run (optim.steps may grow)
RESUME_KEYS = ("model", "data", "features", "vae_dir", "seed")


@hydra.main(version_base="1.3", config_path="conf", config_name="sft")
def main(cfg: DictConfig) -> None:
    configure_threads(cfg.threads)
    device = factories.make_device(cfg.device)
    generator = seed_everything(cfg.seed)
    check_positive(cfg, ["optim.lr", "optim.grad_clip"])
    check_non_negative(cfg, ["optim.weight_decay"])
    check_count(cfg, ["optim.steps", "optim.batch_size", "log_every", "ckpt_every", "eval.n_windows", "eval.steps"])
    check_count(cfg, ["optim.warmup"], minimum=0)
    out_dir, _lock = claim_run_dir(factories.abspath(cfg.out_dir), cfg, stage="sft", resume=cfg.resume)
    data_root = stages.ensure_dataset(cfg.data)

    vae, normalizer, _ = factories.load_frozen_vae(factories.abspath(cfg.vae_dir), device)
    features, text_enc, audio_enc = factories.make_features(cfg.features, data_root, device)
    banks = factories.make_banks(data_root, features, vae, normalizer, device)
    train_bank, test_bank = banks["train"], banks["test"]

    model = factories.make_arflow(cfg.model, d_latent=vae.cfg.d_latent, d_text=text_enc.dim, d_audio=audio_enc.dim).to(device)
    print(f"[sft] AR-Flow preset={cfg.model.preset}: {count_parameters(model) / 1e6:.2f}M trainable parameters"
          + (" (paper: 19.3M)" if cfg.model.preset == "paper" else ""))
    opt = make_optimizer(model, cfg.optim)
    sched = make_scheduler(opt, cfg.optim)

    state_path = out_dir / "last" / "state.pt"
    run_states = {"model": model, "optim": opt, "sched": sched}
    start, logger_state = 0, None
    if cfg.resume:  # batches and flow noise continue the killed run's streams
        state = load_run_state(state_path, cfg, RESUME_KEYS, device, generator, states=run_states)
        start, logger_state = state["step"], state.get("logger")
        truncate_logs(out_dir / "logs", start)  # steps logged after the saved state are logged again
        print(f"[sft] resumed from step {start}")
    logger = factories.make_logger(cfg.logger, out_dir, "sft", state_dict=logger_state)

    n = train_bank.batch_size[0]
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, int(cfg.optim.steps)), desc="sft", initial=start, total=int(cfg.optim.steps))
    for step in bar:
        idx = torch.randint(n, (int(cfg.optim.batch_size),), generator=generator)
        batch = train_bank[idx.to(train_bank.device)]
        terms = flow_step(model, batch, generator)
        opt.zero_grad(set_to_none=True)
        terms["loss_flow"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        check_finite_step({"loss_flow": terms["loss_flow"]}, gnorm, where=f"sft step {step + 1}", hint=f"optim.lr={cfg.optim.lr} too large")
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.optim.steps:
            scalars = {f"loss/{k}": v.item() for k, v in terms.items()}
            scalars["optim/grad_norm"] = gnorm.item()
            scalars["optim/lr"] = sched.get_last_lr()[0]
            scalars["perf/windows_per_s"] = (step + 1 - start) * cfg.optim.batch_size / (time.perf_counter() - t0)
            factories.log_scalars(logger, scalars, step + 1)
            bar.set_postfix(loss=f"{scalars['loss/loss_flow']:.4f}")
        if (step + 1) % cfg.ckpt_every == 0:
            check_finite_weights(model, where=f"sft step {step + 1}", hint=f"optim.lr={cfg.optim.lr} too large")
            save_run_state(state_path, cfg, RESUME_KEYS, step + 1, generator, logger, run_states)
    check_finite_weights(model, where=f"sft step {int(cfg.optim.steps)}", hint=f"optim.lr={cfg.optim.lr} too large")
    save_run_state(state_path, cfg, RESUME_KEYS, int(cfg.optim.steps), generator, logger, run_states)
    elapsed = time.perf_counter() - t0
    model.eval()
    factories.save_run_arflow(out_dir, model, cfg, extra={"vae_dir": str(factories.abspath(cfg.vae_dir)),
                                                   "text_encoder": text_enc.key, "audio_encoder": audio_enc.key})
    print(f"[sft] trained {int(cfg.optim.steps) - start} steps in {elapsed:.1f} s; checkpoint: {out_dir}")
    report = quality_report(model, vae, normalizer, test_bank, n_windows=int(cfg.eval.n_windows), steps=int(cfg.eval.steps), seed=cfg.seed)
    print_quality_report(report, title=f"supervised AR-Flow on held-out windows (ODE, {cfg.eval.steps} steps, CFG 1)")
    factories.log_scalars(logger, {f"eval/{k}": v for k, v in numeric_items(report).items()}, int(cfg.optim.steps))


if __name__ == "__main__":
    main()
