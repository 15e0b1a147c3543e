"""Generate an actor's FLAME motion for given audio (+ text, partner motion, CFG weights, length).

    python train/generate.py actor_wav=a.wav partner_wav=b.wav text="joyful, nodding with a smile" \
        seconds=60 w_speak=1.0 w_listen=2.0 out=gen/clip

Writes ``OUT.npz`` (``motion (T, 67)`` raw FLAME at 25 fps, ``vad (T,)`` of the actor, the FLAME
group names) and ``OUT.png`` (the six groups over time). Long clips use the sliding window of
paper 4.3 (W = 25 tokens, the latest k = 1 latent as causal prefix). Audio at other sample rates
is resampled to 16 kHz; audio shorter than the requested length is an error.
"""
from __future__ import annotations

import math
from pathlib import Path

import hydra
import numpy as np
import soundfile as sf
import torch
from omegaconf import DictConfig
from scipy.signal import resample_poly

from gdpo_listener.pipeline import factories
from gdpo_listener.agents.arflow import load_arflow
from gdpo_listener.envs.converters.vad import vad_frames
from gdpo_listener.envs.flame import FLAME_DIM, FPS, GROUP_NAMES, SAMPLE_RATE
from gdpo_listener.envs.windows import decode_latents, encode_latents, token_majority


def read_audio(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read audio {path}: {e}") from e
    wav = wav.mean(1)
    if sr != SAMPLE_RATE:
        g = math.gcd(sr, SAMPLE_RATE)
        wav = resample_poly(wav, SAMPLE_RATE // g, sr // g).astype(np.float32)
    if not np.isfinite(wav).all():
        raise ValueError(f"audio {path} has NaN/inf samples")
    return wav


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    device = factories.make_device(cfg.device)
    for name in ("w_speak", "w_listen"):
        if not math.isfinite(float(cfg[name])):
            raise ValueError(f"{name}={cfg[name]} is not a finite CFG weight")
    actor = read_audio(factories.abspath(cfg.actor_wav))
    partner = read_audio(factories.abspath(cfg.partner_wav)) if cfg.partner_wav else np.zeros_like(actor)
    r, spf = 8, SAMPLE_RATE // FPS
    n_frames = int(round(cfg.seconds * FPS)) if cfg.seconds else len(actor) // spf
    n_frames -= n_frames % r
    for name, wav in (("actor_wav", actor), ("partner_wav", partner)):
        if len(wav) < n_frames * spf:
            raise ValueError(f"{name} lasts {len(wav) / SAMPLE_RATE:.2f} s, shorter than the requested {n_frames / FPS:.2f} s of motion")

    model, meta = load_arflow(factories.abspath(cfg.checkpoint), device)
    vae, normalizer, _ = factories.load_frozen_vae(Path(meta["vae_dir"]) if cfg.vae_dir is None else factories.abspath(cfg.vae_dir), device)
    text_enc, audio_enc = factories.make_encoders(cfg.features, device)
    feats = {k: torch.as_tensor(audio_enc.encode(w[: n_frames * spf], n_frames))[None].to(device) for k, w in (("actor_audio", actor), ("partner_audio", partner))}
    text = str(cfg.text or "")
    text_emb = torch.as_tensor(text_enc.encode([text]))[:, :].to(device) if text else torch.zeros(1, text_enc.dim, device=device)
    if cfg.partner_motion:
        with np.load(factories.abspath(cfg.partner_motion)) as z:
            pm = torch.as_tensor(z["motion"], dtype=torch.float32)
        if pm.ndim != 2 or pm.shape[1] != FLAME_DIM or pm.shape[0] < n_frames:
            raise ValueError(f"partner_motion {cfg.partner_motion}: need motion (>= {n_frames}, {FLAME_DIM}), got {tuple(pm.shape)}")
        partner_latent, has_pm = encode_latents(vae, normalizer, pm[None, :n_frames].to(device)), True  # (1, N, Dv)
    else:
        partner_latent, has_pm = torch.zeros(1, n_frames // r, vae.cfg.d_latent, device=device), False
    vad = torch.as_tensor(vad_frames(actor[: n_frames * spf], n_frames, method=cfg.vad))[None]
    cond = {"text_emb": text_emb, "text_mask": torch.tensor([bool(text)], device=device), **feats,
            "partner_latent": partner_latent, "partner_has_motion": torch.tensor([has_pm], device=device)}
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    with torch.no_grad():
        z = model.generate_long(cond, n_frames, steps=int(cfg.steps), w_speak=float(cfg.w_speak), w_listen=float(cfg.w_listen),
                                speaking_tokens=token_majority(vad, r).to(device), generator=g)
        motion = decode_latents(vae, normalizer, z)[0].cpu().numpy()
    out = factories.abspath(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out.with_suffix(".npz"), motion=motion.astype(np.float32), vad=vad[0].numpy(), groups=np.array(GROUP_NAMES))
    from gdpo_listener.envs.plots import plot_window

    plot_window({"actor_motion": motion, "speaking": vad[0].numpy(), "listening": np.zeros(n_frames, bool),
                 "partner_vad": np.zeros(n_frames, bool), "text": text or "(no text)"}, out.with_suffix(".png"))
    print(f"[generate] {n_frames} frames ({n_frames / FPS:.1f} s) -> {out.with_suffix('.npz')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
