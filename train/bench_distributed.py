"""Benchmark of distributed training: SFT windows/s and GDPO iterations/s on 1, 2, ... processes,
their scaling efficiency, and the communication volume per optimiser step of a model preset.

    python train/bench_distributed.py                                   # small preset, 1 and 2 processes, 1 thread each
    python train/bench_distributed.py preset=paper processes=[1,2]      # the paper-sized AR-Flow on this machine
    python train/bench_distributed.py sft.steps=2 gdpo.iterations=1 gdpo.n_prompts=2 gdpo.group_size=2 \\
        gdpo.sde_steps=1 sft.batch_size=4 measure=[sft,gdpo]           # smoke run

Every process count is measured by ``torchrun --standalone --nproc_per_node=N`` on this script in
child mode (one fresh job each), with the recipes' own training steps (train/sft.py ``draw_batch``,
``flow_step``, ``wrap_ddp``; train/gdpo.py ``collect``, ``global_advantages``, ``combine_rank_stats``
and ``chunked_update(sync=...)``) on random weights and a random window bank of the real shapes
(throughput does not depend on the weights). The global batch is fixed (``sft.batch_size`` windows,
``gdpo.n_prompts`` prompts), so N processes each do 1/N of it; scaling efficiency = rate(N) / (N rate(1)).

Communication per optimiser step (the gradient all-reduce, ring algorithm): every rank sends and
receives ``2 (N - 1) / N x 4 bytes x parameters``; GDPO adds the behaviour re-sync, a broadcast of
the weights (``4 x parameters`` bytes) every ``gdpo.sync_every`` iterations; the gathered rewards,
RNG states and statistics are a few kB. Times at given link bandwidths are the volume over the
bandwidth (no latency, no overlap with the backward pass, which DDP does for SFT).
"""
from __future__ import annotations

import os

from gdpo_listener.pipeline.threads import omp_wait_defaults  # imports no torch

os.environ.update(omp_wait_defaults())  # before torch loads: OpenMP threads spin briefly, then sleep (pipeline/threads.py)

import copy
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig, count_parameters
from gdpo_listener.agents.loss import GDPOLoss, chunked_update
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.agents.vae import MotionVAE, VAEConfig
from gdpo_listener.envs.dataset import Normalizer
from gdpo_listener.envs.flame import FLAME_DIM
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.evaluation import rl_timing
from gdpo_listener.pipeline.checks import check_count
from gdpo_listener.pipeline.distributed import Dist, distributed, rank_seed
from gdpo_listener.rewards.groups import build_reward

TRAIN_DIR = Path(__file__).resolve().parent
RESULT = "BENCH_DISTRIBUTED "  # prefix of the child's result line


def load_recipe(name: str):
    """``train/<name>.py`` as a module (the entry points are scripts, not package modules)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", TRAIN_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------
# communication volume


def allreduce_factor(world_size: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce, per byte of the reduced buffer: 2 (N - 1) / N."""
    return 2.0 * (world_size - 1) / world_size


def comm_bytes_per_step(n_params: int, world_size: int, stage: str, sync_every: int = 8) -> float:
    """Bytes each rank sends per optimiser step: the fp32 gradient all-reduce (+ GDPO's amortised behaviour broadcast)."""
    volume = 4.0 * n_params * allreduce_factor(world_size)
    if stage == "gdpo" and world_size > 1:
        volume += 4.0 * n_params / sync_every
    return volume


def comm_report(cfg: DictConfig) -> None:
    model = ARFlow(getattr(ARFlowConfig, cfg.comm.preset)())
    P = count_parameters(model)
    bw = {k: float(v) for k, v in cfg.comm.bandwidth_gb_s.items()}
    print(f"\ncommunication per optimiser step, preset={cfg.comm.preset} ({P / 1e6:.2f}M parameters, fp32 gradients, "
          f"ring all-reduce factor 2(N-1)/N; GDPO adds a weight broadcast every {cfg.gdpo.sync_every} iterations)")
    print(f"{'stage':6s} {'N':>3s} {'factor':>7s} {'MB/step':>9s}  " + "  ".join(f"{k + ' ms':>12s}" for k in bw))
    for stage in ("sft", "gdpo"):
        for n in cfg.comm.world_sizes:
            v = comm_bytes_per_step(P, int(n), stage, int(cfg.gdpo.sync_every))
            times = "  ".join(f"{1e3 * v / (b * 1e9):12.2f}" for b in bw.values())
            print(f"{stage:6s} {int(n):3d} {allreduce_factor(int(n)):7.3f} {v / 1e6:9.1f}  {times}")


# ----------------------------------------------------------------------------------------------
# child: one measurement job under torchrun


def random_bank(n: int, cfg: ARFlowConfig):
    """A random window bank with the preset's shapes (as train/bench_rl.py's)."""
    return rl_timing.random_bank(n, W=cfg.window, r=cfg.r, dv=cfg.d_latent, dt=cfg.d_text, da=cfg.d_audio)


def timed(fn, n_warmup: int, n: int, dist: Dist) -> float:
    """Seconds of ``n`` calls of ``fn`` after ``n_warmup`` untimed ones, all ranks started together."""
    for _ in range(n_warmup):
        fn()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dist.barrier()
    return time.perf_counter() - t0


def bench_sft(cfg: DictConfig, dist: Dist) -> float:
    """Windows per second of SFT training steps (global batch ``sft.batch_size``, DDP over the ranks)."""
    sft = load_recipe("sft")
    arch = getattr(ARFlowConfig, cfg.preset)()
    torch.manual_seed(0)
    model = ARFlow(arch).to(dist.device).train()
    trained = sft.wrap_ddp(model, dist)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    bank = random_bank(max(64, int(cfg.sft.batch_size)), arch).to(dist.device)
    B = int(cfg.sft.batch_size)
    rows = dist.shard(B, "sft.batch_size")
    gen = torch.Generator().manual_seed(0)

    def step():
        loss, _, _ = sft.flow_step(trained, sft.draw_batch(bank, B, gen, rows), gen, rows, B)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    seconds = timed(step, int(cfg.sft.warmup), int(cfg.sft.steps), dist)
    return int(cfg.sft.steps) * B / seconds


def bench_gdpo(cfg: DictConfig, dist: Dist) -> float:
    """GDPO iterations per second: collect this rank's prompts, global advantages, synchronised update."""
    gdpo = load_recipe("gdpo")
    g = cfg.gdpo
    arch = getattr(ARFlowConfig, cfg.preset)()
    n_prompts = int(g.n_prompts) // dist.world_size
    dist.shard(int(g.n_prompts), "gdpo.n_prompts")
    seed = rank_seed(0, dist.rank)
    torch.manual_seed(0)
    model = ARFlow(arch).eval().to(dist.device)
    bank = random_bank(max(8, int(g.n_prompts)), arch).to(dist.device)
    vae = MotionVAE(VAEConfig.small(d_latent=arch.d_latent)).eval().requires_grad_(False).to(dist.device)
    norm = Normalizer(np.zeros(FLAME_DIM, np.float32), np.ones(FLAME_DIM, np.float32))
    reward = build_reward("expr+rot").to(dist.device)
    gen = torch.Generator(device=dist.device).manual_seed(seed)
    env = ListenerSDEEnv(bank, vae, norm, reward, n_prompts=n_prompts, group_size=int(g.group_size), sde_steps=int(g.sde_steps),
                         generator=gen, seed=seed, device=dist.device)
    behaviour = copy.deepcopy(model).requires_grad_(False)
    policy = make_policy(behaviour, env, generator=gen)
    loss = GDPOLoss(transition_core(policy), model, reward.lambdas)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    sync = dist if dist.is_distributed else None

    def iteration():
        traj = gdpo.collect(env, policy)
        gdpo.global_advantages(loss, traj, dist, n_prompts)
        stats = chunked_update(loss, traj, opt, int(g.chunk_steps), 1, 1.0, sync=sync)
        if dist.is_distributed:
            gdpo.combine_rank_stats(dist.all_gather_object((stats, gdpo.objective_counts(loss, traj))))

    seconds = timed(iteration, int(g.warmup), int(g.iterations), dist)
    return int(g.iterations) / seconds


def child(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    with distributed(cfg.device, timeout_min=10) as dist:
        out = {"processes": dist.world_size}
        if "sft" in cfg.measure:
            out["sft_windows_per_s"] = bench_sft(cfg, dist)
        if "gdpo" in cfg.measure:
            out["gdpo_iterations_per_s"] = bench_gdpo(cfg, dist)
        if dist.is_main:
            print(RESULT + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------
# parent: one torchrun job per process count


def measure(n: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(Path(__file__).resolve()),
           *overrides, "child=true"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"the {n}-process measurement failed (exit code {res.returncode}):\n{res.stderr[-3000:]}")
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(RESULT)]
    if not lines:
        raise RuntimeError(f"the {n}-process measurement printed no result:\n{res.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT):])


def check_settings(cfg: DictConfig) -> None:
    if cfg.preset not in ("small", "paper") or cfg.comm.preset not in ("small", "paper"):
        raise ValueError(f"preset={cfg.preset}, comm.preset={cfg.comm.preset}: each must be small or paper")
    if not cfg.processes or any(int(n) != n or n < 1 for n in cfg.processes):
        raise ValueError(f"processes={list(cfg.processes)} must list positive process counts")
    if set(cfg.measure) - {"sft", "gdpo"}:
        raise ValueError(f"measure={list(cfg.measure)} must be a subset of [sft, gdpo]")
    check_count(cfg, ["threads", "sft.batch_size", "sft.steps", "gdpo.n_prompts", "gdpo.group_size", "gdpo.sde_steps",
                      "gdpo.chunk_steps", "gdpo.iterations", "gdpo.sync_every"])
    for key in ("sft.batch_size", "gdpo.n_prompts"):
        bad = [n for n in cfg.processes if OmegaConf.select(cfg, key) % n]
        if bad:
            raise ValueError(f"{key}={OmegaConf.select(cfg, key)} must be a multiple of every process count; not of {bad}")


def report(cfg: DictConfig) -> None:
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("child=")]
    print(f"preset={cfg.preset}, {cfg.threads} thread(s) per process, device={cfg.device}; global batch: SFT {cfg.sft.batch_size} "
          f"windows, GDPO {cfg.gdpo.n_prompts} prompts x G={cfg.gdpo.group_size}, {cfg.gdpo.sde_steps} SDE steps")
    rows = [measure(int(n), overrides) for n in cfg.processes]
    base = rows[0]
    print(f"\n{'N':>3s} {'SFT windows/s':>14s} {'efficiency':>10s} {'GDPO it/s':>10s} {'efficiency':>10s}")
    for r in rows:
        n, n0 = r["processes"], base["processes"]
        cells = []
        for key in ("sft_windows_per_s", "gdpo_iterations_per_s"):
            if key in r:
                eff = r[key] / base[key] * n0 / n
                cells.append(f"{r[key]:14.3f} {eff:10.2f}" if key.startswith("sft") else f"{r[key]:10.4f} {eff:10.2f}")
            else:
                cells.append(f"{'-':>14s} {'-':>10s}" if key.startswith("sft") else f"{'-':>10s} {'-':>10s}")
        print(f"{n:3d} {' '.join(cells)}")
    print(f"(efficiency = rate(N) / (N / {base['processes']} x rate({base['processes']})); the machine's "
          f"{os.cpu_count()} cores are shared with whatever else runs on it)")
    comm_report(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="bench_distributed")
def main(cfg: DictConfig) -> None:
    check_settings(cfg)
    if cfg.child:
        child(cfg)
    else:
        report(cfg)


if __name__ == "__main__":
    main()
