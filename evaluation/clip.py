"""One clip from audio files (``train/generate.py``): inputs checked early, motion checked before it is written.

Lengths: a clip of ``n_frames`` frames at 25 fps is generated as ``ceil(n_frames / r)`` latent
tokens (r = the VAE's frames per token) and trimmed to exactly ``n_frames``; the audio past the
clip's end (at most r - 1 frames) is silence, the partner motion repeats its last frame. A clip
needs at least one token's worth of audio (r frames).

Outputs: ``out`` is a *stem*: the clip is written to ``<out>.npz`` and ``<out>.png`` (suffixes
appended, so ``gen/take.v1`` and ``gen/take.v2`` are two clips; a trailing ``.npz`` is taken as
the npz file itself). Both files are written atomically and only after the motion is checked finite.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..agents.checkpoint import atomic_write_bytes
from ..envs.flame import FLAME_DIM, FPS, GROUP_NAMES, SAMPLE_RATE
from ..envs.windows import decode_latents, encode_latents, token_majority

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
# CFG weights beyond this magnitude extrapolate so far from the conditional velocity that the
# motion leaves the data's range (1e6 passes silently, 1e38 overflows to NaN).
MAX_CFG_WEIGHT = 20.0


def check_cfg_weight(name: str, w, bound: float = MAX_CFG_WEIGHT) -> float:
    """A CFG weight as a float with ``|w| <= bound``, else ``ValueError`` naming it and the bound."""
    try:
        x = float(w)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={w!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{name}={w} is not a finite CFG weight")
    if abs(x) > bound:
        raise ValueError(f"{name}={w} is beyond the supported CFG range |w| <= {bound:g}")
    return x


def read_audio(path: Path) -> np.ndarray:
    """Mono float32 samples at 16 kHz (other rates are resampled); errors name the file."""
    import soundfile as sf
    from scipy.signal import resample_poly

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


def clip_frames(seconds, actor_samples: int, r: int) -> int:
    """Frames of the clip: ``seconds`` x 25 (rounded), or every whole frame of the actor audio when
    ``seconds`` is None; at least r frames (one latent token)."""
    if seconds is None:
        n = actor_samples // SAMPLES_PER_FRAME
    else:
        s = float(seconds)
        if not math.isfinite(s) or s <= 0:
            raise ValueError(f"seconds={seconds} must be a positive number of seconds (or null: the actor audio's length)")
        n = int(round(s * FPS))
    if n < r:
        raise ValueError(f"the clip would last {n / FPS:.2f} s ({n} frames); at least {r / FPS:.2f} s ({r} frames: one latent "
                         f"token of the VAE) is needed")
    return n


def check_audio_length(name: str, wav: np.ndarray, n_frames: int) -> None:
    if len(wav) < n_frames * SAMPLES_PER_FRAME:
        raise ValueError(f"{name} lasts {len(wav) / SAMPLE_RATE:.2f} s, shorter than the requested {n_frames / FPS:.2f} s of motion")


def read_partner_motion(path: Path, n_frames: int) -> torch.Tensor:
    """The partner's raw FLAME motion ``(n_frames, 67)`` from an npz with ``motion (T >= n_frames, 67)``."""
    if not path.is_file():
        raise FileNotFoundError(f"partner_motion {path} does not exist")
    with np.load(path) as z:
        if "motion" not in z.files:
            raise ValueError(f"partner_motion {path}: no 'motion' array (has {z.files})")
        pm = torch.as_tensor(z["motion"], dtype=torch.float32)
    if pm.ndim != 2 or pm.shape[1] != FLAME_DIM or pm.shape[0] < n_frames:
        raise ValueError(f"partner_motion {path}: need motion (>= {n_frames}, {FLAME_DIM}), got {tuple(pm.shape)}")
    if not torch.isfinite(pm).all():
        raise ValueError(f"partner_motion {path} has NaN/inf values")
    return pm[:n_frames]


def whole_tokens(n_frames: int, r: int) -> int:
    """Frames of the generated tokens: ``n_frames`` rounded up to a multiple of r."""
    return -(-n_frames // r) * r


def pad_samples(wav: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` samples of ``wav``, silence after its end."""
    out = np.zeros(n, dtype=np.float32)
    m = min(n, len(wav))
    out[:m] = wav[:m]
    return out


@torch.no_grad()
def generate_clip(model, vae, normalizer, text_enc, audio_enc, actor: np.ndarray, partner: np.ndarray, n_frames: int,
                  vad: np.ndarray, text: str = "", partner_motion: torch.Tensor | None = None, steps: int = 10,
                  w_speak: float = 1.0, w_listen: float = 1.0, seed: int = 0) -> np.ndarray:
    """The actor's raw FLAME motion ``(n_frames, 67)`` for 16 kHz ``actor`` / ``partner`` audio.

    ``vad (n_frames,)`` bool: the actor speaks (CFG weight ``w_speak`` on those tokens, ``w_listen``
    elsewhere); ``partner_motion (n_frames, 67)`` or None (audio only); ``text`` "" = no text.
    Sliding windows of the model (paper 4.3, k = 1); see the module docstring for lengths.
    """
    r = vae.cfg.r
    dev = next(model.parameters()).device
    n_gen = whole_tokens(n_frames, r)
    feats = {key: torch.as_tensor(audio_enc.encode(pad_samples(w, n_gen * SAMPLES_PER_FRAME), n_gen))[None].to(dev)
             for key, w in (("actor_audio", actor), ("partner_audio", partner))}  # (1, n_gen, Da)
    text_emb = torch.as_tensor(text_enc.encode([text])).to(dev) if text else torch.zeros(1, text_enc.dim, device=dev)  # (1, Dt)
    if partner_motion is not None:
        pm = torch.cat([partner_motion, partner_motion[-1:].expand(n_gen - n_frames, -1)])[None].to(dev)  # (1, n_gen, 67)
        partner_latent = encode_latents(vae, normalizer, pm)  # (1, n_gen / r, Dv)
    else:
        partner_latent = torch.zeros(1, n_gen // r, vae.cfg.d_latent, device=dev)
    speaking = torch.zeros(1, n_gen, dtype=torch.bool)
    speaking[0, :n_frames] = torch.as_tensor(np.asarray(vad[:n_frames], dtype=bool))
    cond = {"text_emb": text_emb, "text_mask": torch.tensor([bool(text)], device=dev), **feats,
            "partner_latent": partner_latent, "partner_has_motion": torch.tensor([partner_motion is not None], device=dev)}
    g = torch.Generator(device=dev).manual_seed(int(seed))
    z = model.generate_long(cond, n_gen, steps=int(steps), w_speak=float(w_speak), w_listen=float(w_listen),
                            speaking_tokens=token_majority(speaking, r).to(dev), generator=g)  # (1, n_gen / r, Dv)
    return decode_latents(vae, normalizer, z)[0, :n_frames].cpu().numpy()  # (n_frames, 67)


def check_finite_motion(motion: np.ndarray, ckpt) -> None:
    """Refuse motion with NaN/inf values (a diverged checkpoint or an extreme CFG weight)."""
    bad = int((~np.isfinite(motion)).sum())
    if bad:
        raise ValueError(f"generated motion has {bad} non-finite values of {motion.size}: checkpoint {ckpt} may hold "
                         f"diverged (NaN) weights, or the CFG weights are too large; nothing was written")


def output_paths(out: Path) -> tuple[Path, Path]:
    """``(<out>.npz, <out>.png)``: suffixes appended to the stem ``out`` (a trailing ``.npz`` is kept as is)."""
    stem = out.with_name(out.name[: -len(".npz")]) if out.name.endswith(".npz") and out.name != ".npz" else out
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".png")


def write_clip(npz: Path, png: Path, motion: np.ndarray, vad: np.ndarray, text: str) -> None:
    """Write the clip (``motion (T, 67)`` float32, ``vad (T,)``, the FLAME group names) and its plot, atomically."""
    from ..envs.plots import plot_window

    buf = io.BytesIO()
    np.savez(buf, motion=motion.astype(np.float32), vad=np.asarray(vad, dtype=bool), groups=np.array(GROUP_NAMES))
    atomic_write_bytes(npz, buf.getvalue())
    tmp = png.with_name(f".{png.stem}.tmp-{os.getpid()}.png")
    try:
        n = motion.shape[0]
        plot_window({"actor_motion": motion, "speaking": np.asarray(vad, dtype=bool), "listening": np.zeros(n, bool),
                     "partner_vad": np.zeros(n, bool), "text": text or "(no text)"}, tmp)
        os.replace(tmp, png)
    finally:
        if tmp.exists():
            tmp.unlink()
