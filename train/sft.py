"""Stage 1: supervised AR-Flow training (rectified flow, paper eq. 4), teacher forced.

    python train/sft.py                       # small CPU preset on the synthetic corpus
    python train/sft.py model=paper           # paper preset (6 layers, 16 heads, D = 512)
    python train/sft.py resume=true           # continue a killed run
    torchrun --nproc_per_node=2 train/sft.py  # 2 processes (DistributedDataParallel); also --nnodes=...

One forward pass trains all 25 tokens of a window: the noisy copy of token l attends to the
conditioning prefix, the clean history < l and itself (agents/arflow.py). The loss is logged
overall and binned by flow time. Checkpoints (safetensors + resolved config) are atomic.

Under torchrun (pipeline/distributed.py) ``optim.batch_size`` stays the GLOBAL batch: every rank
draws the same global batch of windows and flow noise from the run's generator (seeded ``seed``)
and trains on its block of ``batch_size / world_size`` rows; DistributedDataParallel averages the
gradients, so the update is the single-process update of the same global batch (condition dropout
excepted: each rank draws it from its own stream, seeded ``rank_seed(seed, rank)``). Rank 0 claims
the run folder, logs and writes the checkpoints, which also hold every rank's RNG states.
"""
from __future__ import annotations

import os

from gdpo_listener.pipeline.threads import omp_wait_defaults  # imports no torch

os.environ.update(omp_wait_defaults())  # before torch loads: OpenMP threads spin briefly, then sleep (pipeline/threads.py)

import math
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gdpo_listener.agents.anchor import flow_matching_loss
from gdpo_listener.agents.arflow import count_parameters
from gdpo_listener.agents.checkpoint import is_checkpoint
from gdpo_listener.agents.guards import check_finite_step, check_finite_weights
from gdpo_listener.evaluation.generation import numeric_items, print_quality_report, quality_report
from gdpo_listener.pipeline import factories, stages
from gdpo_listener.pipeline.checks import check_count, check_non_negative, check_positive
from gdpo_listener.pipeline.distributed import Dist, distributed, main_first, rank_seed, run_config
from gdpo_listener.pipeline.run_dir import claim_run_dir
from gdpo_listener.pipeline.run_state import resume_training, rng_state, save_run_state, seed_everything
from gdpo_listener.pipeline.threads import configure_threads

T_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def make_optimizer(model, optim_cfg):
    return torch.optim.AdamW(model.parameters(), lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


def make_scheduler(opt, optim_cfg):
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio * lr`` at ``optim.steps``."""
    warmup, total = max(int(optim_cfg.warmup), 1), int(optim_cfg.steps)
    schedule, floor = str(optim_cfg.schedule), float(optim_cfg.min_lr_ratio)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule={schedule!r} must be constant or cosine")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        p = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * p))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def heldout_loss(model, bank, seed: int, batch_size: int = 64) -> float:
    """Rectified-flow loss on every row of ``bank`` (the test split) with fixed noise and flow times,
    so successive evaluations differ only by the weights (the curve shows when training flattens)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(int(seed))
    total = 0.0
    for i in range(0, bank.batch_size[0], batch_size):
        b = bank[i : i + batch_size]
        _, per_token, _ = flow_step(model, b, g)  # (b, N)
        total += float(per_token.mean(-1).sum())
    model.train(was_training)
    return total / bank.batch_size[0]


def draw_batch(bank, batch_size: int, generator, rows: slice = slice(None)):
    """This rank's ``rows`` of a global batch of ``batch_size`` bank rows drawn with replacement."""
    idx = torch.randint(bank.batch_size[0], (int(batch_size),), generator=generator)  # (B,) the global batch
    return bank[idx[rows].to(bank.device)]


def flow_step(model, batch, generator, rows: slice = slice(None), batch_size: int | None = None):
    """Rectified-flow loss on this rank's rows of a global batch.

    ``batch`` holds rows ``rows`` of a global batch of ``batch_size`` rows (default: the batch is
    the whole global batch); the flow noise and times are drawn for the global batch and sliced, so
    the ranks together see what one process would. Returns the loss (mean over the local rows,
    with gradient), the per-token squared errors ``(b, N)`` and the flow times ``(b, N)``, detached.
    """
    x1 = batch["actor_latent"]  # (b, N, Dv)
    B = x1.shape[0] if batch_size is None else int(batch_size)
    x0 = torch.randn((B, *x1.shape[1:]), generator=generator, device="cpu")[rows].to(x1.device)  # (b, N, Dv)
    t = torch.rand((B, x1.shape[1]), generator=generator, device="cpu")[rows].to(x1.device)  # (b, N)
    per_token = flow_matching_loss(model, batch, x0, t)  # (b, N)
    return per_token.mean(), per_token.detach(), t


@torch.no_grad()
def flow_terms(per_token: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logged loss terms of a batch: the mean flow loss and its mean per flow-time bin; ``(B, N)`` inputs."""
    out = {"loss_flow": per_token.mean()}
    for lo, hi in zip(T_BINS[:-1], T_BINS[1:]):
        m = (t >= lo) & (t < hi)
        out[f"loss_flow_t{lo:.2f}-{hi:.2f}"] = (per_token * m).sum() / m.sum().clamp(min=1)
    return out


def wrap_ddp(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """``model`` in DistributedDataParallel under torchrun (rank 0's weights broadcast), else itself."""
    if not dist.is_distributed:
        return model
    return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


# config sections that must match for resume=true to continue a run (optim.steps may grow)
RESUME_KEYS = ("model", "data", "features", "vae_dir", "seed")


def save_state(path, cfg, step, generator, logger, run_states, dist: Dist) -> None:
    """Training state, written once by rank 0; under torchrun it also holds every rank's RNG states."""
    extra = {}
    if dist.is_distributed:  # a collective: every rank calls it at the same step
        extra = {"world_size": dist.world_size, "ranks": dist.all_gather_object({"rng": rng_state()})}
    if dist.is_main:
        save_run_state(path, cfg, RESUME_KEYS, step, generator, logger, run_states, **extra)


@hydra.main(version_base="1.3", config_path="conf", config_name="sft")
def main(cfg: DictConfig) -> None:
    configure_threads(cfg.threads, announce=True)
    with distributed(cfg.device, cfg.dist.timeout_min) as dist:
        train(cfg, dist)


def check_settings(cfg: DictConfig) -> Path:
    """Refuse a bad optimiser / logging setting or a missing VAE before anything is claimed or generated;
    returns the VAE's folder."""
    check_positive(cfg, ["optim.lr", "optim.grad_clip"])
    check_non_negative(cfg, ["optim.weight_decay"])
    check_count(cfg, ["optim.steps", "optim.batch_size", "log_every", "ckpt_every", "eval.n_windows", "eval.steps", "eval.loss_every"])
    check_non_negative(cfg, ["optim.min_lr_ratio"])
    check_count(cfg, ["optim.warmup"], minimum=0)
    vae_dir = factories.abspath(cfg.vae_dir)
    if not is_checkpoint(vae_dir):
        raise FileNotFoundError(f"vae_dir={cfg.vae_dir}: no VAE checkpoint at {vae_dir} (no meta.json); train it first with "
                                f"`python train/vae.py out_dir={cfg.vae_dir}` (train/gdpo.py does both on a fresh clone)")
    return vae_dir


def optimizer_step(cfg: DictConfig, step: int, trained, model, opt, sched, batch, generator: torch.Generator, rows: slice,
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One flow-matching update on ``batch`` (0-based ``step``): ``(per-token loss, flow times, gradient norm)``
    of this rank's rows. ``trained`` is ``model`` or its DistributedDataParallel wrapper."""
    loss, per_token, t = flow_step(trained, batch, generator, rows, batch_size)
    opt.zero_grad(set_to_none=True)
    loss.backward()  # DistributedDataParallel: gradients averaged over ranks = the global batch's mean
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    check_finite_step({"loss_flow": loss}, gnorm, where=f"sft step {step + 1}", hint=f"optim.lr={cfg.optim.lr} too large")
    opt.step()
    sched.step()
    return per_token, t, gnorm


@record  # under torchrun the job's failure summary names this rank's error
def train(cfg: DictConfig, dist: Dist) -> None:
    device = dist.device
    seed_everything(rank_seed(cfg.seed, dist.rank))  # this rank's global streams (condition dropout)
    generator = torch.Generator().manual_seed(int(cfg.seed))  # batches and flow noise: the same on every rank
    vae_dir = check_settings(cfg)
    batch_size = int(cfg.optim.batch_size)
    rows = dist.shard(batch_size, "optim.batch_size")  # this rank's block of the global batch
    out_dir = None
    if dist.is_main:
        out_dir, _lock = claim_run_dir(factories.abspath(cfg.out_dir), run_config(cfg, dist), stage="sft", resume=cfg.resume)
    out_dir = dist.broadcast_object(out_dir)
    data_root = main_first(dist, stages.ensure_dataset, cfg.data)

    vae, normalizer, _ = factories.load_frozen_vae(vae_dir, device)
    features, text_enc, audio_enc = factories.make_features(cfg.features, data_root, device, dist=dist)
    banks = factories.make_banks(data_root, features, vae, normalizer, device)
    train_bank, test_bank = banks["train"], banks["test"]

    model = factories.make_arflow(cfg.model, d_latent=vae.cfg.d_latent, d_text=text_enc.dim, d_audio=audio_enc.dim).to(device)
    if dist.is_main:
        print(f"[sft] AR-Flow preset={cfg.model.preset}: {count_parameters(model) / 1e6:.2f}M trainable parameters"
              + (" (paper: 19.3M)" if cfg.model.preset == "paper" else "")
              + (f"; {dist.world_size} processes x {batch_size // dist.world_size} windows" if dist.is_distributed else ""))
    trained = wrap_ddp(model, dist)
    opt = make_optimizer(model, cfg.optim)
    sched = make_scheduler(opt, cfg.optim)

    state_path = out_dir / "last" / "state.pt"
    run_states = {"model": model, "optim": opt, "sched": sched}
    state = resume_training("sft", state_path, out_dir / "logs", cfg, RESUME_KEYS, run_states, generator, dist.device, dist) \
        if cfg.resume else {"step": 0}  # batches and flow noise continue the killed run's streams
    start, logger_state = int(state["step"]), state.get("logger")
    logger = factories.make_logger(cfg.logger, out_dir, "sft", state_dict=logger_state) if dist.is_main else None

    model.train()
    t0 = time.perf_counter()
    steps = int(cfg.optim.steps)
    curve: dict[int, float] = {}  # held-out flow loss by step (this run's part)
    bar = tqdm(range(start, steps), desc="sft", initial=start, total=steps, disable=not dist.is_main)
    for step in bar:
        batch = draw_batch(train_bank, batch_size, generator, rows)
        per_token, t, gnorm = optimizer_step(cfg, step, trained, model, opt, sched, batch, generator, rows, batch_size)
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            terms = flow_terms(dist.all_gather_rows(per_token), dist.all_gather_rows(t))  # over the global batch
            scalars = {f"loss/{k}": v.item() for k, v in terms.items()}
            scalars["optim/grad_norm"] = gnorm.item()
            scalars["optim/lr"] = sched.get_last_lr()[0]
            scalars["perf/windows_per_s"] = (step + 1 - start) * batch_size / (time.perf_counter() - t0)
            factories.log_scalars(logger, scalars, step + 1)
            bar.set_postfix(loss=f"{scalars['loss/loss_flow']:.4f}")
        if dist.is_main and ((step + 1) % int(cfg.eval.loss_every) == 0 or step + 1 == steps):
            curve[step + 1] = heldout_loss(model, test_bank, seed=int(cfg.seed) + 1)
            factories.log_scalars(logger, {"eval/loss_flow": curve[step + 1]}, step + 1)
        if (step + 1) % cfg.ckpt_every == 0:
            check_finite_weights(model, where=f"sft step {step + 1}", hint=f"optim.lr={cfg.optim.lr} too large")
            save_state(state_path, cfg, step + 1, generator, logger, run_states, dist)
    check_finite_weights(model, where=f"sft step {steps}", hint=f"optim.lr={cfg.optim.lr} too large")
    save_state(state_path, cfg, steps, generator, logger, run_states, dist)
    elapsed = time.perf_counter() - t0
    model.eval()
    if not dist.is_main:
        return
    factories.save_run_arflow(out_dir, model, cfg, extra={"vae_dir": str(factories.abspath(cfg.vae_dir)),
                                                   "text_encoder": text_enc.key, "audio_encoder": audio_enc.key})
    print(f"[sft] trained {int(cfg.optim.steps) - start} steps in {elapsed:.1f} s; checkpoint: {out_dir}")
    print("[sft] held-out flow loss by step: " + ", ".join(f"{k}: {v:.4f}" for k, v in curve.items()))
    report = quality_report(model, vae, normalizer, test_bank, n_windows=int(cfg.eval.n_windows), steps=int(cfg.eval.steps), seed=cfg.seed)
    print_quality_report(report, title=f"supervised AR-Flow on held-out windows (ODE, {cfg.eval.steps} steps, CFG 1)")
    factories.log_scalars(logger, {f"eval/{k}": v for k, v in numeric_items(report).items()}, int(cfg.optim.steps))


if __name__ == "__main__":
    main()
