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

Physical bounds (``evaluation/hardware.py``: conventions, FLOP and byte counts). The script first
measures this machine at the benchmark's thread count: memory bandwidth (triad) and fp32 GEMM peak.
Next to each time it prints the least time the machine allows for the same passes (each pass at
least its weight + KV-cache bytes over the bandwidth and its FLOPs over the GEMM peak, summed), the
resource limiting most of it (single-stream decoding: memory; batched work and SFT: compute) and
``reached`` = bound / measured. Per preset it prints the bytes read per generated token of one
stream (weights of ``steps`` + 1 one-token passes, and the KV cache they read) and the least
seconds per token they take. The bounds leave elementwise work and activations out: they are
optimistic, the figures that reach them are not.

OpenMP waiting (``pipeline/threads.py``). On a CPU shared with other busy processes, OpenMP's
default spin-wait at the end of every parallel region makes each of the many small ops of a
one-token pass wait for a descheduled sibling thread; never spinning (passive) costs a thread
wake-up per op instead. This script sets ``omp_wait`` (default ``short``, as the entry points:
a brief spin, then sleep) before torch is imported, unless an OpenMP wait variable is already
exported.

Precisions. ``precisions`` lists the weight precisions (``agents/compress.py``: fp32, bf16, int8)
timed for one stream of each preset (B = 1, one window, the same noise); each line gives the RTF,
the speed-up over fp32 and the relative error of the generated latents against fp32.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import hydra
from omegaconf import DictConfig

from gdpo_listener.evaluation import hardware as hw  # no torch at import: the OpenMP wait is set first
from gdpo_listener.pipeline.checks import check_choice, check_count
from gdpo_listener.pipeline.threads import OMP_WAIT_MODES, describe_omp_wait, omp_wait_defaults, resolve_threads

SECONDS_PER_WINDOW = 8.0
PAPER_PARAMS = 19.3e6


def _import_torch():
    """Import torch only after the OpenMP wait is settled (OpenMP reads it once, at start-up)."""
    global torch, ARFlow, ARFlowConfig, count_parameters, make_cond, compress, PRECISIONS
    import torch

    from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig, count_parameters
    from gdpo_listener.agents.compress import PRECISIONS, compress
    from gdpo_listener.evaluation.hardware import synthetic_cond as make_cond


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def setup_window(preset: str, batch: int, bcfg: DictConfig, device) -> tuple:
    """A random-weight model of ``preset``, one window of conditioning for ``batch`` streams and the
    sampling settings (CFG on) -> (arch, model, cond, g, speaking (B, N), sample kwargs)."""
    seed = int(bcfg.seed)
    torch.manual_seed(seed)
    arch = getattr(ARFlowConfig, preset)()
    model = ARFlow(arch).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    cond = make_cond(arch, batch, g, device)
    speaking = (torch.rand(batch, arch.n_tokens, generator=g) < 0.5).to(device)  # (B, N)
    kw = dict(steps=int(bcfg.steps), w_speak=float(bcfg.w_speak), w_listen=float(bcfg.w_listen), speaking_tokens=speaking)
    return arch, model, cond, g, speaking, kw


def bench_one(preset: str, batch: int, bcfg: DictConfig, device) -> dict:
    """Seconds for one window of ``batch`` streams with and without the KV cache (uncached: extrapolated)."""
    n_unc = int(bcfg.uncached_tokens)
    cfg, model, cond, g, speaking, kw = setup_window(preset, batch, bcfg, device)
    N = cfg.n_tokens
    w_speak, w_listen = kw["w_speak"], kw["w_listen"]

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
    resolve_threads(cfg.threads)
    check_count(cfg, ["steps", "uncached_tokens", "repeats", "hw_repeats", "gemm_size"])
    check_choice(cfg, "omp_wait", OMP_WAIT_MODES, None)
    if float(cfg.w_speak) == 1.0 and float(cfg.w_listen) == 1.0:
        raise ValueError("CFG is off with w_speak = w_listen = 1; this benchmark measures CFG on")
    if not float(cfg.stream_mb) > 0:
        raise ValueError(f"stream_mb={cfg.stream_mb} must be positive (MB per triad array, far above the caches)")


def decode_bytes_line(arch, steps: int, machine) -> str:
    """Bytes one stream reads per generated token and the least seconds per token they take."""
    weights, kv = hw.decode_bytes_per_token(arch, 1, steps, cfg_on=True)
    sec = (weights + kv) / machine.bandwidth
    return (f"per generated token (1 stream, CFG: 2 rows): {steps} + 1 one-token passes read "
            f"{weights / 1e6:.1f} MB of weights + {kv / 1e6:.1f} MB of KV cache -> >= {sec * 1e3:.1f} ms/token "
            f"at {machine.bandwidth / 1e9:.1f} GB/s, RTF >= {sec * arch.n_tokens / SECONDS_PER_WINDOW:.3f} "
            f"(decoding only; the prefix pass adds compute)")


@hydra.main(version_base="1.3", config_path="conf", config_name="bench_arflow")
def main(cfg: DictConfig) -> None:
    check_settings(cfg)
    if "torch" in sys.modules:
        print("NOTE: torch was imported before the OpenMP wait was set; omp_wait has no effect")
    os.environ.update(omp_wait_defaults(str(cfg.omp_wait)))
    _import_torch()
    for p in cfg.precisions:  # checked once torch (and agents.compress) may load, still before any work
        if p not in PRECISIONS:
            raise ValueError(f"precisions: {p!r} is not one of {', '.join(PRECISIONS)}")
    torch.set_num_threads(resolve_threads(cfg.threads))
    device = torch.device(cfg.device)
    machine = hw.measure_machine(float(cfg.stream_mb), int(cfg.gemm_size), int(cfg.hw_repeats))
    n_unc = int(cfg.uncached_tokens)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"AR-Flow generation speed | torch {torch.__version__} | device {device} | threads {torch.get_num_threads()} "
          f"| cpus {os.cpu_count()} | load avg (1 min) {load:.2f} | OpenMP wait {describe_omp_wait()}")
    print(f"window 200 frames = 25 tokens = {SECONDS_PER_WINDOW:.0f} s | {cfg.steps} Euler steps/token | CFG on "
          f"(w_speak {cfg.w_speak}, w_listen {cfg.w_listen}; 2B rows per call)")
    print(f"uncached: {n_unc} token(s) from token {cfg.uncached_from} timed, scaled x25/{n_unc} to a window")
    print(f"machine: {machine.describe()}")
    if load > (os.cpu_count() or 1):
        print(f"NOTE: the machine is busy (load {load:.1f} > {os.cpu_count()} cpus): absolute times are inflated")
    for preset in cfg.presets:
        print(f"{preset}: " + decode_bytes_line(getattr(ARFlowConfig, preset)(), int(cfg.steps), machine))
    print()
    hdr = (f"{'preset':<6} {'params':>8} {'B':>3} | {'cached s':>9} {'RTF wall':>9} {'RTF/strm':>9} | {'bound s':>8} "
           f"{'bnd/strm':>8} {'limit':>7} {'reached':>7} | {'uncached s*':>11} {'RTF wall':>9} {'RTF/strm':>9} | "
           f"{'bound s*':>8} {'reached':>7} | {'speedup':>8}")
    print(hdr)
    print("-" * len(hdr))
    failed = []
    for preset in cfg.presets:
        for batch in cfg.batch:
            batch = int(batch)
            r = bench_one(preset, batch, cfg, device)
            b, bu = window_bounds(preset, batch, r, cfg, machine)
            sp = r["uncached"] / r["cached"]
            wall, stream = SECONDS_PER_WINDOW, SECONDS_PER_WINDOW * batch
            print(f"{preset:<6} {r['params'] / 1e6:>7.2f}M {batch:>3} | {r['cached']:>9.2f} {r['cached'] / wall:>9.3f} "
                  f"{r['cached'] / stream:>9.3f} | {b.seconds:>8.3f} {b.seconds / stream:>8.3f} {b.limit:>7} "
                  f"{hw.reached(b.seconds, r['cached']):>7.1%} | {r['uncached']:>11.1f} {r['uncached'] / wall:>9.2f} "
                  f"{r['uncached'] / stream:>9.2f} | {bu.seconds:>8.2f} {hw.reached(bu.seconds, r['uncached']):>7.1%} | "
                  f"{sp:>7.1f}x", flush=True)
            if preset == "paper" and sp < float(cfg.min_speedup):
                failed.append((batch, sp))
    print("-" * len(hdr))
    print("* uncached window time extrapolated from the timed tokens (see above); cached includes the prefix pass.")
    print("bound: least seconds of the same passes on this machine (bnd/strm: as an RTF per stream); limit: what bounds "
          "most of it; reached = bound / measured.")
    if "paper" in cfg.presets:
        n = count_parameters(ARFlow(ARFlowConfig.paper()))
        print(f"paper preset: {n / 1e6:.2f}M trainable parameters (paper reports {PAPER_PARAMS / 1e6:.1f}M, "
              f"{100 * (n - PAPER_PARAMS) / PAPER_PARAMS:+.1f}%)")
        if failed:
            print(f"FAIL: KV cache speedup below {float(cfg.min_speedup):.0f}x for the paper preset at B = "
                  + ", ".join(f"{b} ({s:.1f}x)" for b, s in failed))
            raise SystemExit(1)
        print(f"OK: KV cache speedup >= {float(cfg.min_speedup):.0f}x for the paper preset")
    if cfg.precisions:
        print("\nOne stream by weight precision (B = 1, one window, CFG on, the same noise; agents/compress.py)")
        for preset in cfg.presets:
            for p in precision_rows(preset, cfg, device):
                print(f"  {preset:6s} {p['precision']:5s} {p['seconds']:7.2f} s/window  RTF {p['seconds'] / SECONDS_PER_WINDOW:6.3f}  "
                      f"x{p['speedup']:4.2f} vs fp32  latent error vs fp32 {p['error']:.2e}", flush=True)
    if int(cfg.sft_batch):
        target = float(cfg.min_peak_fraction)
        print(f"\nSFT training throughput (teacher forced, forward + backward + AdamW, batch {cfg.sft_batch}); "
              f"bound: the step's FLOPs at the GEMM peak (target: reach >= {target:.0%})")
        for preset, attn_p in ((p, a) for p in cfg.presets for a in cfg.sft_attn_dropout):
            arch = getattr(ARFlowConfig, preset)(**({} if attn_p is None else {"attn_dropout": float(attn_p)}))
            rate = sft_throughput(arch, int(cfg.sft_batch), int(cfg.sft_steps), device, int(cfg.seed))
            step = hw.sft_step_work(arch, int(cfg.sft_batch))
            bound_rate = int(cfg.sft_batch) / step.seconds(machine)
            got = rate / bound_rate
            drop = arch.dropout if arch.attn_dropout is None else arch.attn_dropout
            print(f"  {preset:6s} attn dropout {drop:<4.2g}{'' if attn_p is None else '(set)':6s}{rate:8.1f} windows/s | "
                  f"bound {bound_rate:8.1f} windows/s "
                  f"({step.flops / int(cfg.sft_batch) / 1e9:.2f} GFLOP per window) | reached {got:.1%} of the GEMM peak "
                  f"({got * machine.gemm_peak / 1e9:.1f} GFLOP/s) {'OK' if got >= target else 'BELOW TARGET'}")


def precision_rows(preset: str, cfg: DictConfig, device) -> list[dict]:
    """One cached window of one stream per precision: seconds, speed-up over fp32, relative latent error."""
    arch, model, cond, _, speaking, kw = setup_window(preset, 1, cfg, device)
    rows, ref = [], None
    for p in ["fp32", *[q for q in cfg.precisions if q != "fp32"]]:
        m = compress(model, p)
        m.sample(cond, 2, steps=1, w_speak=kw["w_speak"], w_listen=kw["w_listen"], speaking_tokens=speaking[:, :2])  # warm-up
        out = {}
        sec = timed(lambda: out.update(x=m.sample(cond, arch.n_tokens, generator=torch.Generator(device=device).manual_seed(0),
                                                  **kw)), int(cfg.repeats))
        ref = out["x"] if ref is None else ref
        rows.append(dict(precision=p, seconds=sec, error=float((out["x"] - ref).norm() / ref.norm())))
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
    return [r for r in rows if r["precision"] in cfg.precisions]


def window_bounds(preset: str, batch: int, r: dict, cfg: DictConfig, machine) -> tuple:
    """Bounds of the cached window and of the uncached figure (its timed tokens, scaled as the time is)."""
    arch = getattr(ARFlowConfig, preset)()
    steps = int(cfg.steps)
    cached = hw.bound_seconds(hw.generation_passes(arch, batch, steps, cfg_on=True), machine)
    timed = range(r["uncached_from"], r["uncached_from"] + r["uncached_tokens"])
    unc = hw.bound_seconds(hw.generation_passes(arch, batch, steps, cfg_on=True, tokens=timed, cached=False), machine)
    return cached, unc.scaled(arch.n_tokens / r["uncached_tokens"])


def sft_throughput(cfg, batch: int, steps: int, device, seed: int) -> float:
    """Windows per second of supervised rectified-flow training steps of architecture ``cfg`` (random data, real shapes)."""
    _import_torch()
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
