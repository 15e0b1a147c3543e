"""Speed of AR-Flow generation with and without the KV cache (random weights; speed only).

    python train/bench_arflow.py                                  # presets small + paper, B = 1 and 8
    python train/bench_arflow.py presets=[paper] batch=[8] threads=2 uncached_tokens=1

Settings and their defaults: ``train/conf/bench_arflow.yaml`` (Hydra overrides, as every entry point).

One window = 200 frames = 25 latent tokens = 8 s of motion, generated with 10 Euler steps per
token and CFG on (w_speak != 1 or w_listen != 1: cond + uncond rows, 2B rows per model call).

* cached:   ``ARFlow.sample(use_cache=True)``: the prefix runs once per window (``start``), then each
            denoising step is one new-token pass over the cached keys/values.
* uncached: ``ARFlow.sample(use_cache=False)``: every denoising step recomputes the whole sequence
            (prefix + history + noisy token). It is slow, so only ``--uncached-tokens`` tokens are
            generated, starting mid-window (token ``uncached_from``, earlier tokens given as a
            prefix, which costs nothing without a cache); the per-token time is scaled to 25 tokens.

Real-time factor (RTF) = seconds of compute / seconds of generated motion: "wall" divides the
wall time of the batch by 8 s, "per stream" by B x 8 s. RTF < 1 is faster than real time.

OpenMP wait policy. On a CPU shared with other busy processes (more runnable threads than
cores), OpenMP's default active spin-wait at the end of every parallel region makes each of the
many small ops of a one-token pass wait for a descheduled sibling thread: on the 2-core team
machine under load ~4 the cached small-preset window took 54 s with 2 threads vs 0.9 s with 1
thread and 2.2 s with ``OMP_WAIT_POLICY=PASSIVE``. This script therefore sets
``OMP_WAIT_POLICY=PASSIVE`` (setting ``omp_wait_policy``) before torch is imported, unless the
variable is already set in the environment.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import hydra
from omegaconf import DictConfig

SECONDS_PER_WINDOW = 8.0
PAPER_PARAMS = 19.3e6


def _import_torch():
    """Import torch only after OMP_WAIT_POLICY is settled (OpenMP reads it once, at start-up)."""
    global torch, ARFlow, ARFlowConfig, count_parameters
    import torch

    from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig, count_parameters


def make_cond(cfg: ARFlowConfig, batch: int, generator: torch.Generator, device) -> dict:
    L, N = cfg.window, cfg.n_tokens

    def rnd(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    return {
        "text_emb": rnd(batch, cfg.d_text), "text_mask": torch.ones(batch, dtype=torch.bool, device=device),
        "actor_audio": rnd(batch, L, cfg.d_audio), "partner_audio": rnd(batch, L, cfg.d_audio),
        "partner_latent": rnd(batch, N, cfg.d_latent), "partner_has_motion": torch.ones(batch, dtype=torch.bool, device=device),
    }


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(preset: str, batch: int, bcfg: DictConfig, device) -> dict:
    """Seconds for one window of ``batch`` streams with and without the KV cache (uncached: extrapolated)."""
    seed, n_unc = int(bcfg.seed), int(bcfg.uncached_tokens)
    torch.manual_seed(seed)
    cfg = getattr(ARFlowConfig, preset)()
    model = ARFlow(cfg).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    cond = make_cond(cfg, batch, g, device)
    N = cfg.n_tokens
    speaking = (torch.rand(batch, N, generator=g) < 0.5).to(device)  # (B, N)
    w_speak, w_listen = float(bcfg.w_speak), float(bcfg.w_listen)
    kw = dict(steps=int(bcfg.steps), w_speak=w_speak, w_listen=w_listen, speaking_tokens=speaking)

    # warm-up (allocator, kernels)
    model.sample(cond, 2, steps=1, w_speak=w_speak, w_listen=w_listen, speaking_tokens=speaking[:, :2])

    t_cached = timed(lambda: model.sample(cond, N, generator=torch.Generator(device=device).manual_seed(0), **kw), int(bcfg.repeats))

    k0 = min(int(bcfg.uncached_from), N - n_unc)
    n_u = k0 + n_unc
    prefix = torch.randn(batch, k0, cfg.d_latent, generator=g).to(device) if k0 else None  # (B, k0, Dv)
    kw_u = dict(kw, speaking_tokens=speaking[:, :n_u])
    t_unc_part = timed(lambda: model.sample(cond, n_u, prefix=prefix, use_cache=False,
                                            generator=torch.Generator(device=device).manual_seed(0), **kw_u), 1)
    t_uncached = t_unc_part / n_unc * N
    return dict(preset=preset, batch=batch, params=count_parameters(model), cached=t_cached, uncached=t_uncached,
                uncached_tokens=n_unc, uncached_from=k0)


def check_settings(cfg: DictConfig) -> None:
    if not cfg.presets or set(cfg.presets) - {"small", "paper"}:
        raise ValueError(f"presets={list(cfg.presets)} must be a non-empty subset of [small, paper]")
    if not cfg.batch or any(int(b) < 1 for b in cfg.batch):
        raise ValueError(f"batch={list(cfg.batch)} must list positive batch sizes (streams generated together)")
    for key in ("threads", "steps", "uncached_tokens", "repeats"):
        if int(cfg[key]) != cfg[key] or cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]} must be a positive integer")
    if cfg.omp_wait_policy not in ("PASSIVE", "ACTIVE"):
        raise ValueError(f"omp_wait_policy={cfg.omp_wait_policy!r} must be PASSIVE or ACTIVE")
    if float(cfg.w_speak) == 1.0 and float(cfg.w_listen) == 1.0:
        raise ValueError("CFG is off with w_speak = w_listen = 1; this benchmark measures CFG on")


@hydra.main(version_base="1.3", config_path="conf", config_name="bench_arflow")
def main(cfg: DictConfig) -> None:
    check_settings(cfg)
    if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        print("NOTE: torch was imported before OMP_WAIT_POLICY was set; omp_wait_policy has no effect")
    os.environ.setdefault("OMP_WAIT_POLICY", str(cfg.omp_wait_policy))
    _import_torch()
    torch.set_num_threads(int(cfg.threads))
    device = torch.device(cfg.device)
    n_unc = int(cfg.uncached_tokens)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"AR-Flow generation speed | torch {torch.__version__} | device {device} | threads {torch.get_num_threads()} "
          f"| cpus {os.cpu_count()} | load avg (1 min) {load:.2f} | OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"window 200 frames = 25 tokens = {SECONDS_PER_WINDOW:.0f} s | {cfg.steps} Euler steps/token | CFG on "
          f"(w_speak {cfg.w_speak}, w_listen {cfg.w_listen}; 2B rows per call)")
    print(f"uncached: {n_unc} token(s) from token {cfg.uncached_from} timed, scaled x25/{n_unc} to a window")
    if load > (os.cpu_count() or 1):
        print(f"NOTE: the machine is busy (load {load:.1f} > {os.cpu_count()} cpus): absolute times are inflated")
    print()
    hdr = (f"{'preset':<6} {'params':>8} {'B':>3} | {'cached s':>9} {'RTF wall':>9} {'RTF/strm':>9} | "
           f"{'uncached s*':>11} {'RTF wall':>9} {'RTF/strm':>9} | {'speedup':>8}")
    print(hdr)
    print("-" * len(hdr))
    failed = []
    for preset in cfg.presets:
        for batch in cfg.batch:
            batch = int(batch)
            r = bench_one(preset, batch, cfg, device)
            sp = r["uncached"] / r["cached"]
            wall, stream = SECONDS_PER_WINDOW, SECONDS_PER_WINDOW * batch
            print(f"{preset:<6} {r['params'] / 1e6:>7.2f}M {batch:>3} | {r['cached']:>9.2f} {r['cached'] / wall:>9.3f} "
                  f"{r['cached'] / stream:>9.3f} | {r['uncached']:>11.1f} {r['uncached'] / wall:>9.2f} "
                  f"{r['uncached'] / stream:>9.2f} | {sp:>7.1f}x", flush=True)
            if preset == "paper" and sp < float(cfg.min_speedup):
                failed.append((batch, sp))
    print("-" * len(hdr))
    print("* uncached window time extrapolated from the timed tokens (see above); cached includes the prefix pass.")
    if "paper" in cfg.presets:
        n = count_parameters(ARFlow(ARFlowConfig.paper()))
        print(f"paper preset: {n / 1e6:.2f}M trainable parameters (paper reports {PAPER_PARAMS / 1e6:.1f}M, "
              f"{100 * (n - PAPER_PARAMS) / PAPER_PARAMS:+.1f}%)")
        if failed:
            print(f"FAIL: KV cache speedup below {float(cfg.min_speedup):.0f}x for the paper preset at B = "
                  + ", ".join(f"{b} ({s:.1f}x)" for b, s in failed))
            raise SystemExit(1)
        print(f"OK: KV cache speedup >= {float(cfg.min_speedup):.0f}x for the paper preset")
    if int(cfg.sft_batch):
        print(f"\nSFT training throughput (teacher forced, forward + backward + AdamW, batch {cfg.sft_batch})")
        for preset in cfg.presets:
            rate = sft_throughput(preset, int(cfg.sft_batch), int(cfg.sft_steps), device, int(cfg.seed))
            print(f"  {preset:6s} {rate:8.1f} windows/s")


def sft_throughput(preset: str, batch: int, steps: int, device, seed: int) -> float:
    """Windows per second of supervised rectified-flow training steps (random data, real shapes)."""
    _import_torch()
    cfg = getattr(ARFlowConfig, preset)()
    g = torch.Generator().manual_seed(seed)
    model = ARFlow(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cond = make_cond(cfg, batch, g, device)
    x1 = torch.randn(batch, cfg.n_tokens, cfg.d_latent, generator=g).to(device)

    def step():
        x0 = torch.randn_like(x1)
        t = torch.rand(batch, cfg.n_tokens, device=device)
        v = model(cond, x1, t[..., None] * x1 + (1 - t[..., None]) * x0, t)
        loss = (v - (x1 - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    return batch * steps / timed(lambda: [step() for _ in range(steps)], 1)


if __name__ == "__main__":
    main()
