"""Peak resident memory of ``train/generate.py`` against the input's length (issue 15 item 6).

    python train/bench_generate_memory.py                       # 30 min and 3 h, streamed path
    python train/bench_generate_memory.py --minutes 10 60 --whole 10

For each length: synthetic speech-like audio (16 kHz mono PCM_16, noise bursts) is written to
``--dir`` block by block, then ``train/generate.py`` runs on it in a fresh child process (threads=1,
``--steps`` Euler steps) with a randomly initialised small-preset checkpoint saved to ``--dir``
(ARFlowConfig.small, VAEConfig.small: the model's size, not its training, sets the cost). The peak
resident set of each child is ``ru_maxrss`` from ``os.wait4`` (its own, not the largest of all
children). ``--whole M`` also measures the whole-recording path (``stream=false``) at M minutes.
Prints one line per run and the ratio of the largest to the smallest streamed peak (the issue's
bound: within 1.1).

Speed as a user sees it (issue 11): ``--rtf PRESET`` instead times ``train/generate.py`` end to end
(process start, checkpoint and encoders, log-mel, the sliding windows, the npz) on a random
checkpoint of that preset (``paper``: bidirectional prefix, as the paper), one stream, CFG on
(``w_speak=1.5 w_listen=2.0``), ``--steps`` Euler steps (use 10), ``threads=auto``, for 4 s and 20 s
of audio and each of ``--precisions``; RTF = (time for 20 s - time for 4 s) / 16 s, so start-up
costs cancel::

    python train/bench_generate_memory.py --rtf paper --steps 10
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000


def write_checkpoint(d: Path, preset: str = "small") -> Path:
    """A random VAE and AR-Flow of ``preset`` (log-mel audio, bundled text encoder) -> the AR-Flow folder."""
    import torch

    from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
    from gdpo_listener.agents.checkpoint import save_checkpoint
    from gdpo_listener.agents.vae import VAEConfig, make_vae, save_vae
    from gdpo_listener.envs.dataset import Normalizer
    from gdpo_listener.envs.flame import FLAME_DIM

    torch.manual_seed(0)
    vae_cfg = VAEConfig.small()
    save_vae(d / "vae", make_vae(vae_cfg), Normalizer(np.zeros(FLAME_DIM, np.float32), np.ones(FLAME_DIM, np.float32)))
    arch = getattr(ARFlowConfig, preset)(d_latent=vae_cfg.d_latent, r=vae_cfg.r, d_audio=80)
    out = d / ("arflow" if preset == "small" else f"arflow_{preset}")
    save_checkpoint(out, "arflow", {"model": ARFlow(arch).state_dict()},
                    {"arch": dataclasses.asdict(arch), "preset": preset, "vae_dir": str(d / "vae"),
                     "config": {"features": {"text_encoder": "bundled-minilm", "audio_encoder": "logmel"}}})
    return out


def write_wav(path: Path, seconds: int, seed: int = 0) -> Path:
    """Noise in 0.25 s bursts (loud or quiet at random), written 60 s at a time."""
    import soundfile as sf

    if path.is_file() and sf.info(str(path)).frames == seconds * SAMPLE_RATE:
        return path
    rng = np.random.default_rng(seed)
    burst = SAMPLE_RATE // 4
    with sf.SoundFile(str(path), "w", SAMPLE_RATE, 1, subtype="PCM_16") as f:
        for s0 in range(0, seconds, 60):
            n = min(60, seconds - s0) * SAMPLE_RATE
            env = np.repeat(rng.uniform(0, 1, n // burst) > 0.5, burst) * 0.3 + 0.003  # (n,)
            f.write((rng.standard_normal(n) * env).astype(np.float32))
    return path


def peak_rss(args: list[str]) -> tuple[float, float, int]:
    """Run ``args`` in a child process -> (its peak RSS in MB, wall seconds, exit code)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own usage (RUSAGE_CHILDREN would be the max of all)
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, os.waitstatus_to_exitcode(status)  # ru_maxrss: KB on Linux


def wall_seconds(cmd: list[str]) -> float:
    """Wall time of ``cmd`` in a child process with the entry point's own thread settings; exits on failure."""
    from gdpo_listener.pipeline.threads import OMP_WAIT_VARS

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", *OMP_WAIT_VARS)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"generate.py failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def bench_rtf(a) -> None:
    """``--rtf PRESET``: generate.py end to end at 4 s and 20 s per precision (module docstring)."""
    ckpt = write_checkpoint(a.dir, a.rtf)
    actor, partner = write_wav(a.dir / "actor_21s.wav", 21, seed=1), write_wav(a.dir / "partner_21s.wav", 21, seed=2)
    load = os.getloadavg()[0]
    print(f"generate.py end to end | preset {a.rtf} (random weights) | {a.steps} Euler steps, CFG on | threads=auto | "
          f"load avg (1 min) {load:.2f}", flush=True)
    for p in a.precisions:
        t = {}
        for sec in (4, 20):
            out = a.dir / f"rtf_{a.rtf}_{p}_{sec}s"
            t[sec] = wall_seconds([sys.executable, str(ROOT / "train" / "generate.py"), f"checkpoint={ckpt}",
                                   f"actor_wav={actor}", f"partner_wav={partner}", f"seconds={sec}", f"steps={a.steps}",
                                   "w_speak=1.5", "w_listen=2.0", f"precision={p}", f"out={out}"])
        rtf = (t[20] - t[4]) / 16
        print(json.dumps({"preset": a.rtf, "precision": p, "wall_4s": round(t[4], 2), "wall_20s": round(t[20], 2),
                          "rtf": round(rtf, 3), "target": 0.3, "within": rtf <= 0.3}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, nargs="+", default=[30, 180], help="input lengths (streamed path)")
    ap.add_argument("--whole", type=int, nargs="*", default=[], help="lengths also run with stream=false")
    ap.add_argument("--steps", type=int, default=1, help="Euler steps per token")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_generate_memory"))
    ap.add_argument("--rtf", choices=["small", "paper"], default=None, help="time generate.py (RTF) instead of memory")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"], help="with --rtf: precisions timed")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    if a.rtf:
        return bench_rtf(a)
    ckpt = write_checkpoint(a.dir)
    runs = [(m, True) for m in a.minutes] + [(m, False) for m in a.whole]
    results = []
    for minutes, stream in runs:
        wav = write_wav(a.dir / f"audio_{minutes}min.wav", minutes * 60, seed=minutes)
        out = a.dir / f"clip_{minutes}min_{'stream' if stream else 'whole'}"
        cmd = [sys.executable, str(ROOT / "train" / "generate.py"), f"checkpoint={ckpt}", f"actor_wav={wav}",
               f"steps={a.steps}", "threads=1", f"stream={str(stream).lower()}", "progress=true", f"out={out}"]
        mb, secs, code = peak_rss(cmd)
        if code:
            raise SystemExit(f"generate.py failed (exit {code}) on {minutes} min: {' '.join(cmd)}")
        with np.load(out.with_name(out.name + ".npz")) as z:
            frames, finite = z["motion"].shape[0], bool(np.isfinite(z["motion"]).all())
        row = {"minutes": minutes, "path": "streamed" if stream else "whole", "peak_rss_mb": round(mb, 1),
               "wall_s": round(secs, 1), "frames": frames, "finite": finite}
        results.append(row)
        print(json.dumps(row), flush=True)
    streamed = [r["peak_rss_mb"] for r in results if r["path"] == "streamed"]
    if len(streamed) > 1:
        print(json.dumps({"streamed_peak_ratio_max_over_min": round(max(streamed) / min(streamed), 4),
                          "bound": 1.1, "within": max(streamed) / min(streamed) <= 1.1}))


if __name__ == "__main__":
    main()
