"""Replay two wav files through the streaming generator at real-time pace and report per-token latency.

    python train/stream.py actor_wav=a.wav partner_wav=b.wav chunk_ms=20
    python train/stream.py actor_wav=a.wav k=24 decode=causal        # bidirectional model: one token of latency

With a causal-prefix model (``model.arch.causal_prefix=true``; the small preset's default) every token
runs as soon as its own audio is in, for any k: one token (0.32 s) of algorithmic latency, with
``decode=causal`` (``decode=auto``, the default, picks it for such a model).

Chunk i (``chunk_ms`` of both sides) arrives at t0 + (its last sample + 1) / 16 kHz; with
``realtime=true`` the replay sleeps until then, so a slow generator falls behind instead of being
fed early. Per token j:

    latency_j = (time its frames are out) - (arrival time of its last audio sample)

(with ``realtime=false`` the arrival time is when that sample's chunk was pushed), and its compute
latency: output time - start of the push (or finish) that produced it, i.e. without the time a late
push waited for the previous one (on a busy machine the two differ). Tokens finished
by the end of the stream (the last window, the last VAE chunk) count from the last chunk's arrival.
The latency includes the algorithmic wait (module docstring of ``agents/streaming.py``: with a
bidirectional prefix and k = 1 a token waits for the rest of its window; with a causal prefix it
does not wait) and the compute. ``kept_up``: no chunk finished more
than one token (0.32 s) after its arrival, i.e. the generator never fell behind the audio by a token.

Writes ``OUT.npz`` (``motion (T, 67)`` raw FLAME at 25 fps, ``vad (T,)`` the stream's speaking
decision per frame (its token's), ``speaking_tokens (N,)``, ``latency_s (N,)``, ``latents (N, Dv)``,
the FLAME group names) and ``OUT.json`` (the latency report and the settings).
"""
from __future__ import annotations

import json
import os
import time

from gdpo_listener.pipeline.threads import omp_wait_defaults  # imports no torch

os.environ.update(omp_wait_defaults())  # before torch loads: OpenMP threads spin briefly, then sleep (pipeline/threads.py)
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gdpo_listener.agents.arflow import load_arflow
from gdpo_listener.agents.compress import check_precision, compress, linear_weight_bytes, resolve_precision
from gdpo_listener.agents.sampling import check_cfg_drop
from gdpo_listener.agents.streaming import DECODE_MODES, StreamingGenerator
from gdpo_listener.envs.flame import FPS, GROUP_NAMES, SAMPLE_RATE
from gdpo_listener.evaluation.clip import read_audio
from gdpo_listener.pipeline import factories
from gdpo_listener.pipeline.threads import configure_threads


def latency_report(latency: np.ndarray, compute: np.ndarray, lag: np.ndarray, token_s: float, audio_s: float,
                   busy_s: float) -> dict:
    """Summary of per-token latencies and compute latencies (s) and per-chunk lags (finish time - arrival, s)."""
    def q(x, p):
        return float(np.percentile(x, p)) if x.size else float("nan")

    return {"tokens": int(latency.size), "latency_p50_s": q(latency, 50), "latency_p99_s": q(latency, 99),
            "latency_max_s": q(latency, 100), "compute_latency_p50_s": q(compute, 50), "compute_latency_p99_s": q(compute, 99),
            "max_lag_s": float(lag.max()) if lag.size else 0.0, "kept_up": bool(lag.size == 0 or lag.max() <= token_s),
            "audio_s": audio_s, "busy_s": busy_s, "rtf": busy_s / audio_s if audio_s > 0 else float("nan")}


def replay(gen: StreamingGenerator, actor: np.ndarray, partner: np.ndarray, chunk: int, realtime: bool):
    """Push the two sides chunk by chunk -> (outputs, per-token latency (N,), per-token compute latency (N,),
    per-chunk lag, busy seconds). Compute latency: output time - start of the push that emitted the token."""
    samples_per_token = gen.r * (SAMPLE_RATE // FPS)
    arrival, outs, lag, busy = [], [], [], 0.0
    t0 = time.perf_counter()
    for a in range(0, len(actor), chunk):
        b = min(a + chunk, len(actor))
        due = t0 + b / SAMPLE_RATE
        if realtime:
            time.sleep(max(0.0, due - time.perf_counter()))
        start = time.perf_counter()
        arrival.append(due if realtime else start)
        out = gen.push(actor[a:b], partner[a:b])
        done = time.perf_counter()
        busy += done - start
        lag.append(done - arrival[-1])
        outs.append((out, done, start))
    start = time.perf_counter()
    out = gen.finish()
    done = time.perf_counter()
    busy += done - start
    outs.append((out, done, start))
    latency, compute = [], []
    for out, done, pushed in outs:
        for j in range(out.frame0 // gen.r, (out.frame0 + out.motion.shape[0]) // gen.r):
            last = min((j + 1) * samples_per_token, len(actor)) - 1  # index of the token's last sample
            latency.append(done - arrival[min(last // chunk, len(arrival) - 1)])
            compute.append(done - pushed)
    return [o for o, _, _ in outs], np.array(latency), np.array(compute), np.array(lag), busy


@hydra.main(version_base="1.3", config_path="conf", config_name="stream")
def main(cfg: DictConfig) -> None:
    threads = configure_threads(cfg.threads)
    device = factories.make_device(cfg.device)
    chunk = int(round(float(cfg.chunk_ms) * SAMPLE_RATE / 1000))
    if chunk < SAMPLE_RATE // 50:
        raise ValueError(f"chunk_ms={cfg.chunk_ms} is below 20 ms (320 samples)")
    if cfg.decode not in (*DECODE_MODES, "auto"):
        raise ValueError(f"decode={cfg.decode!r}; valid: auto, {', '.join(DECODE_MODES)}")
    check_precision(cfg.precision)
    cfg_drop = check_cfg_drop(cfg.cfg_drop)
    actor = read_audio(factories.abspath(cfg.actor_wav))
    partner = read_audio(factories.abspath(cfg.partner_wav)) if cfg.partner_wav else np.zeros_like(actor)
    n = len(actor) if cfg.seconds is None else int(round(float(cfg.seconds) * SAMPLE_RATE))
    if len(actor) < n or len(partner) < n:
        raise ValueError(f"seconds={cfg.seconds}: actor lasts {len(actor) / SAMPLE_RATE:.2f} s, "
                         f"partner {len(partner) / SAMPLE_RATE:.2f} s")
    actor, partner = actor[:n], partner[:n]

    ckpt = factories.abspath(cfg.checkpoint)
    model, meta = load_arflow(ckpt, device)
    if "vae_dir" not in meta and cfg.vae_dir is None:
        raise ValueError(f"{ckpt}: the checkpoint records no VAE; pass vae_dir=...")
    vae, normalizer, _ = factories.load_frozen_vae(Path(meta["vae_dir"]) if cfg.vae_dir is None else factories.abspath(cfg.vae_dir),
                                                   device)
    text_enc, audio_enc = factories.make_encoders(factories.checkpoint_encoders(cfg.features, meta), device)
    decode = ("causal" if model.cfg.causal_prefix else "chunked") if cfg.decode == "auto" else str(cfg.decode)
    precision = resolve_precision(cfg.precision, device, linear_weight_bytes(model))
    model = compress(model, precision)
    text = str(cfg.text or "")
    gen = StreamingGenerator(model, vae, normalizer, audio_enc, k=int(cfg.k), steps=int(cfg.steps), w_speak=cfg.w_speak,
                             w_listen=cfg.w_listen, generator=torch.Generator(device=device).manual_seed(int(cfg.seed)),
                             text_emb=torch.as_tensor(text_enc.encode([text]))[0] if text else None, decode=decode,
                             vad_seconds=float(cfg.vad_seconds), cfg_drop=cfg_drop)

    outs, latency, compute, lag, busy = replay(gen, actor, partner, chunk, bool(cfg.realtime))
    motion = np.concatenate([o.motion for o in outs])  # (T, 67)
    speaking = np.concatenate([o.speaking for o in outs])  # (N,)
    report = latency_report(latency, compute, lag, gen.r / FPS, n / SAMPLE_RATE, busy)
    out = factories.abspath(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out.with_suffix(".npz"), motion=motion.astype(np.float32), vad=np.repeat(speaking, gen.r),
             speaking_tokens=speaking, latency_s=latency, latents=torch.cat([o.latents for o in outs]).numpy(),
             groups=np.array(GROUP_NAMES))
    settings = {**OmegaConf.to_container(cfg, resolve=True), "decode": decode, "threads": threads,
                "causal_prefix": bool(model.cfg.causal_prefix)}
    out.with_suffix(".json").write_text(json.dumps({**report, "settings": settings}, indent=2))
    print(f"[stream] {motion.shape[0]} frames ({motion.shape[0] / FPS:.2f} s), chunks of {chunk} samples, k={cfg.k}, "
          f"{'causal' if model.cfg.causal_prefix else 'bidirectional'} prefix, decode={decode}, precision={precision}, "
          f"{threads} threads: latency p50 {report['latency_p50_s']:.3f} s, p99 {report['latency_p99_s']:.3f} s "
          f"(compute p50 {report['compute_latency_p50_s']:.3f} s, p99 {report['compute_latency_p99_s']:.3f} s), "
          f"max lag {report['max_lag_s']:.3f} s, kept up: {report['kept_up']}, "
          f"RTF {report['rtf']:.3f} -> {out.with_suffix('.npz')}")


if __name__ == "__main__":
    main()
