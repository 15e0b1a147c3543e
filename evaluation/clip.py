"""One clip from audio files (``train/generate.py``): inputs checked early, motion checked before it is written.

Lengths: a clip of ``n_frames`` frames at 25 fps is generated as ``ceil(n_frames / r)`` latent
tokens (r = the VAE's frames per token) and trimmed to exactly ``n_frames``; the audio past the
clip's end (at most r - 1 frames) is silence, the partner motion repeats its last frame. A clip
needs at least one token's worth of audio (r frames).

Outputs: ``out`` is a *stem*: the clip is written to ``<out>.npz`` and ``<out>.png`` (suffixes
appended, so ``gen/take.v1`` and ``gen/take.v2`` are two clips; a trailing ``.npz`` is taken as
the npz file itself). Both files are written atomically and only after the motion is checked finite.

Two paths, equal npz files (bit for bit; ``tests/test_generate.py``):

* **streamed** (:func:`stream_motion` + :func:`write_clip_stream`), memory bounded in the input's
  length (but for the per-frame RMS and VAD, 9 bytes a frame, 0.8 MB an hour): the wav files are
  read in blocks (:class:`AudioFile`; other rates resampled per block with enough overlap that every
  output sample equals the whole-file ``resample_poly``), the energy VAD
  is one first pass over per-frame RMS (``envs.converters.vad.energy_gate``, the gate of
  ``envs.converters.vad.energy_vad_frames``), the model runs window by window in
  ``agents.streaming.StreamingGenerator`` given those per-token decisions, and each block of frames
  is checked finite and appended to the npz as it comes out. The PNG shows at most the first
  ``PLOT_MAX_FRAMES`` frames (10 min; the title says so when the clip is longer).
* **whole-recording** (:func:`read_audio` + :func:`generate_clip` + :func:`write_clip`), memory
  growing with the input, for what the stream cannot serve (:func:`why_not_streamed`): a Wav2Vec2
  audio encoder (no incremental features), given partner motion (not streamed), the silero VAD
  (runs on the whole waveform).
"""
from __future__ import annotations

import io
import itertools
import math
import os
import secrets
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..agents.arflow import DROP_KEYS
from ..agents.checkpoint import atomic_write_bytes
from ..agents.sampling import check_cfg_weight
from ..envs.converters.vad import energy_gate
from ..envs.flame import FLAME_DIM, FPS, GROUP_NAMES, SAMPLE_RATE
from ..envs.windows import decode_latents, encode_latents, token_majority

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS
BLOCK_SAMPLES = 10 * SAMPLE_RATE  # 16 kHz samples per block of the streamed path (a multiple of SAMPLES_PER_FRAME)
PLOT_MAX_FRAMES = 10 * 60 * FPS  # the streamed PNG shows at most the first 10 min
PROGRESS_MIN_FRAMES = 5 * 60 * FPS  # a progress bar from 5 min of motion on
# CFG weights beyond this magnitude extrapolate so far from the conditional velocity that the
# motion leaves the data's range (1e6 passes silently, 1e38 overflows to NaN).
MAX_CFG_WEIGHT = 20.0


def check_bounded_cfg_weight(name: str, w, bound: float = MAX_CFG_WEIGHT) -> float:
    """A CFG weight as a finite float (:func:`agents.sampling.check_cfg_weight`) with ``|w| <= bound``,
    else ``ValueError`` naming it and the bound."""
    x = check_cfg_weight(name, w)
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


# ----------------------------------------------------------------------------------------------
# audio in blocks


def resampling_ratio(rate: int) -> tuple[int, int]:
    """``(up, down)``: 16 kHz = ``rate`` x up / down in lowest terms."""
    g = math.gcd(int(rate), SAMPLE_RATE)
    return SAMPLE_RATE // g, int(rate) // g


def resampled_length(n: int, rate: int) -> int:
    """Samples of ``resample_poly`` at 16 kHz for ``n`` samples at ``rate``: ceil(n up / down)."""
    up, down = resampling_ratio(rate)
    return -(-n * up // down)


def resampling_overlap(rate: int) -> int:
    """Input samples each side of a block whose ``resample_poly`` output reaches into it, rounded up to a
    multiple of ``down``: scipy's filter has 10 max(up, down) taps each side at the upsampled rate."""
    up, down = resampling_ratio(rate)
    reach = -(-10 * max(up, down) // up) + 1
    return -(-reach // down) * down


@dataclass(frozen=True)
class AudioFile:
    """A sound file read in blocks as 16 kHz mono float32, equal sample for sample to :func:`read_audio`.

    Channels are averaged per block. At another rate, input block ``[c0, c1)`` (c0 a multiple of
    ``down``) is resampled with :func:`resampling_overlap` input samples of context each side and its
    output samples ``[c0 up / down, c1 up / down)`` kept: each is the whole-file ``resample_poly`` output
    (same taps, same zero padding at the file's ends; bit-identical, ``tests/test_generate.py``).
    """

    path: Path
    rate: int
    frames: int  # samples per channel in the file, at ``rate``

    @classmethod
    def open(cls, path: Path) -> "AudioFile":
        """The file's rate and length (header only); errors name the file."""
        import soundfile as sf

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"audio file {path} does not exist")
        try:
            info = sf.info(str(path))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read audio {path}: {e}") from e
        if info.frames <= 0 or info.samplerate <= 0:
            raise ValueError(f"audio {path} holds no samples ({info.frames} frames at {info.samplerate} Hz)")
        return cls(path, int(info.samplerate), int(info.frames))

    @property
    def samples(self) -> int:
        """Length at 16 kHz."""
        return resampled_length(self.frames, self.rate)

    def _read(self, f, a: int, b: int) -> np.ndarray:
        """Mono input samples [a, b), checked finite."""
        f.seek(a)
        x = f.read(b - a, dtype="float32", always_2d=True).mean(1)  # (b - a,)
        if x.shape[0] != b - a:
            raise ValueError(f"audio {self.path}: read {x.shape[0]} samples at {a}, expected {b - a} (truncated file?)")
        if not np.isfinite(x).all():
            raise ValueError(f"audio {self.path} has NaN/inf samples")
        return x

    def pieces(self, block_seconds: float = BLOCK_SAMPLES / SAMPLE_RATE) -> Iterator[np.ndarray]:
        """The whole file at 16 kHz as consecutive pieces of about ``block_seconds`` (the last shorter)."""
        import soundfile as sf
        from scipy.signal import resample_poly

        up, down = resampling_ratio(self.rate)
        step = max(1, round(block_seconds * self.rate / down)) * down  # input samples per block
        ctx = 0 if up == down == 1 else resampling_overlap(self.rate)
        n_in, n_out = self.frames, self.samples
        try:
            f = sf.SoundFile(str(self.path))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read audio {self.path}: {e}") from e
        with f:
            for c0 in range(0, n_in, step):
                c1 = min(c0 + step, n_in)
                if ctx == 0:
                    yield self._read(f, c0, c1)
                    continue
                a, b = max(0, c0 - ctx), min(n_in, c1 + ctx)
                y = resample_poly(self._read(f, a, b), up, down).astype(np.float32)
                o0, o1 = c0 * up // down, (c1 * up // down if c1 < n_in else n_out)
                off = (c0 - a) * up // down
                yield y[off:off + o1 - o0]

    def blocks(self, n: int, block: int = BLOCK_SAMPLES) -> Iterator[np.ndarray]:
        """The first ``n`` samples at 16 kHz (silence past the file's end) in blocks of ``block`` (the last shorter)."""
        buf, held, done = [], 0, 0  # samples held (not yet yielded) in buf; samples yielded
        for piece in self.pieces():
            buf.append(piece[: n - done - held])
            held += buf[-1].shape[0]
            if held >= block:
                x, k = np.concatenate(buf), 0
                while held - k >= block:
                    yield x[k:k + block]
                    k += block
                buf, held, done = [x[k:]], held - k, done + k
            if done + held >= n:
                break
        rest = np.concatenate(buf) if buf else np.zeros(0, np.float32)
        rest = pad_samples(rest, n - done)  # silence past the file's end
        for a in range(0, rest.shape[0], block):
            yield rest[a:a + block]

    def check_finite(self) -> None:
        """Read every block (no resampling): ``ValueError`` naming the file on a NaN/inf sample."""
        import soundfile as sf

        with sf.SoundFile(str(self.path)) as f:
            for a in range(0, self.frames, BLOCK_SAMPLES):
                self._read(f, a, min(a + BLOCK_SAMPLES, self.frames))


def frame_rms(x: np.ndarray) -> np.ndarray:
    """Per-frame RMS ``(len / 640,)`` float64 of whole frames of 16 kHz samples (as ``energy_vad_frames``)."""
    return np.sqrt(np.mean(x.reshape(-1, SAMPLES_PER_FRAME).astype(np.float64) ** 2, axis=1))


def energy_vad_stream(actor: AudioFile, n_frames: int) -> np.ndarray:
    """The actor's energy VAD ``(n_frames,)`` bool in one pass over blocks, equal to
    ``energy_vad_frames(read_audio(actor)[: n_frames * 640], n_frames)``; also checks the rest of the file."""
    n = n_frames * SAMPLES_PER_FRAME
    if actor.samples < n:
        raise ValueError(f"audio {actor.path} holds {actor.samples} samples, fewer than the {n} of {n_frames} frames")
    rms = np.concatenate([frame_rms(x) for x in actor.blocks(n)])  # (n_frames,)
    actor.check_finite()  # NaN/inf past the clip's end is refused too, as the whole-recording path does
    return energy_gate(rms)


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


def check_audio_length(name: str, n_samples: int, n_frames: int) -> None:
    """``n_samples`` (16 kHz) must cover ``n_frames`` frames, else ``ValueError`` naming ``name``."""
    if n_samples < n_frames * SAMPLES_PER_FRAME:
        raise ValueError(f"{name} lasts {n_samples / SAMPLE_RATE:.2f} s, shorter than the requested {n_frames / FPS:.2f} s of motion")


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
                  w_speak: float = 1.0, w_listen: float = 1.0, seed: int = 0, cfg_drop=DROP_KEYS) -> np.ndarray:
    """The actor's raw FLAME motion ``(n_frames, 67)`` for 16 kHz ``actor`` / ``partner`` audio.

    ``vad (n_frames,)`` bool: the actor speaks (CFG weight ``w_speak`` on those tokens, ``w_listen``
    elsewhere; ``cfg_drop`` the conditions the unconditional branch nulls); ``partner_motion (n_frames, 67)``
    or None (audio only); ``text`` "" = no text.
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
                            speaking_tokens=token_majority(speaking, r).to(dev), generator=g,
                            cfg_drop=cfg_drop)  # (1, n_gen / r, Dv)
    return decode_latents(vae, normalizer, z)[0, :n_frames].cpu().numpy()  # (n_frames, 67)


# ----------------------------------------------------------------------------------------------
# the streamed path


def why_not_streamed(audio_encoder: str, vad: str, partner_motion: bool) -> str | None:
    """None when the streamed path serves these settings, else the reason for the whole-recording path."""
    if str(audio_encoder) != "logmel":
        return f"audio encoder {audio_encoder!r} (streamed features exist for logmel only)"
    if vad != "energy":
        return f"vad={vad} (runs on the whole waveform; the streamed path computes the energy VAD)"
    if partner_motion:
        return "partner_motion given (partner motion is not streamed)"
    return None


@torch.no_grad()
def stream_motion(model, vae, normalizer, text_enc, audio_enc, actor: AudioFile, partner: AudioFile | None, n_frames: int,
                  vad: np.ndarray, text: str = "", steps: int = 10, w_speak: float = 1.0, w_listen: float = 1.0, seed: int = 0,
                  progress: bool | None = None, block: int = BLOCK_SAMPLES, cfg_drop=DROP_KEYS) -> Iterator[np.ndarray]:
    """:func:`generate_clip` (without partner motion) with memory bounded in the clip's length: yields
    the actor's raw FLAME motion as consecutive blocks ``(m, 67)``, ``n_frames`` frames in all.

    The audio is read ``block`` samples at a time and pushed through
    ``agents.streaming.StreamingGenerator`` (log-mel encoder only), whose latents and chunked decoding
    equal ``generate_long`` + ``decode_latents`` on the whole clip; its speaking decisions are the token
    majority of ``vad (n_frames,)`` as in :func:`generate_clip`. ``progress``: a tqdm bar (None = from
    ``PROGRESS_MIN_FRAMES`` frames on).
    """
    from tqdm import tqdm

    from ..agents.streaming import StreamingGenerator

    r = vae.cfg.r
    dev = next(model.parameters()).device
    n_gen = whole_tokens(n_frames, r)
    speaking = torch.zeros(1, n_gen, dtype=torch.bool)
    speaking[0, :n_frames] = torch.as_tensor(np.asarray(vad[:n_frames], dtype=bool))
    tokens = token_majority(speaking, r)[0].numpy()  # (n_gen / r,)
    text_emb = torch.as_tensor(text_enc.encode([text]))[0] if text else None  # (Dt,)
    g = torch.Generator(device=dev).manual_seed(int(seed))
    gen = StreamingGenerator(model, vae, normalizer, audio_enc, steps=int(steps), w_speak=float(w_speak),
                             w_listen=float(w_listen), generator=g, text_emb=text_emb, decode="chunked",
                             speaking=lambda j0, j1: tokens[j0:j1], cfg_drop=cfg_drop)
    n_samples = n_gen * SAMPLES_PER_FRAME
    partner_blocks = partner.blocks(n_samples, block) if partner is not None else itertools.repeat(None)

    def outputs():
        for a in actor.blocks(n_samples, block):
            yield gen.push(a, next(partner_blocks))
        yield gen.finish()

    show = n_frames >= PROGRESS_MIN_FRAMES if progress is None else bool(progress)
    done = 0
    with tqdm(total=n_frames, unit="s", unit_scale=1 / FPS, desc="generate", disable=not show) as bar:
        for out in outputs():
            if out.frame0 != done and done < n_frames:
                raise RuntimeError(f"streamed clip: frames from {out.frame0}, expected {done}")
            m = out.motion[: max(0, n_frames - out.frame0)]  # (m, 67); frames past the clip's end are dropped
            if m.shape[0]:
                done += m.shape[0]
                bar.update(m.shape[0])
                yield m
    if done != n_frames:
        raise RuntimeError(f"streamed clip: {done} frames generated, expected {n_frames}")


def check_finite_motion(motion: np.ndarray, ckpt, first: int | None = None) -> None:
    """Refuse motion with NaN/inf values (a diverged checkpoint or an extreme CFG weight); ``first``: the
    clip frame of ``motion[0]`` when it is a block of the clip (named in the error)."""
    bad = int((~np.isfinite(motion)).sum())
    if bad:
        where = "" if first is None else f" in frames [{first}, {first + motion.shape[0]})"
        raise ValueError(f"generated motion has {bad} non-finite values of {motion.size}{where}: checkpoint {ckpt} may hold "
                         f"diverged (NaN) weights, or the CFG weights are too large; nothing was written")


def output_paths(out: Path) -> tuple[Path, Path]:
    """``(<out>.npz, <out>.png)``: suffixes appended to the stem ``out`` (a trailing ``.npz`` is kept as is)."""
    stem = out.with_name(out.name[: -len(".npz")]) if out.name.endswith(".npz") and out.name != ".npz" else out
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".png")


def write_clip(npz: Path, png: Path, motion: np.ndarray, vad: np.ndarray, text: str) -> None:
    """Write the clip (``motion (T, 67)`` float32, ``vad (T,)``, the FLAME group names) and its plot, atomically."""
    buf = io.BytesIO()
    np.savez(buf, motion=motion.astype(np.float32), vad=np.asarray(vad, dtype=bool), groups=np.array(GROUP_NAMES))
    atomic_write_bytes(npz, buf.getvalue())
    write_plot(png, motion, vad, text)


def write_plot(png: Path, motion: np.ndarray, vad: np.ndarray, text: str, title: str | None = None) -> None:
    """The PNG of the clip (``envs.plots.plot_window``: the six groups over time), atomically."""
    from ..envs.plots import plot_window

    tmp = png.with_name(f".{png.stem}.tmp-{os.getpid()}.png")
    try:
        n = motion.shape[0]
        plot_window({"actor_motion": motion, "speaking": np.asarray(vad, dtype=bool), "listening": np.zeros(n, bool),
                     "partner_vad": np.zeros(n, bool), "text": text or "(no text)"}, tmp, title=title)
        os.replace(tmp, png)
    finally:
        if tmp.exists():
            tmp.unlink()


def npy_header(shape: tuple[int, ...], dtype) -> dict:
    """The ``.npy`` header of a C-order array (``np.lib.format``), for writing its data afterwards in pieces."""
    return {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}


def write_clip_stream(npz: Path, png: Path, blocks: Iterable[np.ndarray], n_frames: int, vad: np.ndarray, text: str,
                      ckpt) -> None:
    """:func:`write_clip` for motion arriving in blocks (:func:`stream_motion`), in memory bounded in ``n_frames``.

    The npz (same members as :func:`write_clip`; ZIP_STORED as ``np.savez``) is written to a temporary
    beside ``npz``: each block is checked finite (:func:`check_finite_motion`) and appended to the
    ``motion`` member as it comes; only when exactly ``n_frames`` finite frames are in is the file
    renamed into place; on any error the temporary is removed and nothing is written. Then the PNG, of
    the first ``PLOT_MAX_FRAMES`` frames at most (its title says so when the clip is longer).
    (Not a memory map of the output: its written pages would count in the resident memory.)
    """
    vad = np.asarray(vad, dtype=bool)
    if vad.shape != (n_frames,):
        raise ValueError(f"write_clip_stream: vad has shape {vad.shape}, expected ({n_frames},)")
    head = np.zeros((min(n_frames, PLOT_MAX_FRAMES), FLAME_DIM), np.float32)  # (<= PLOT_MAX_FRAMES, 67) for the PNG
    npz.parent.mkdir(parents=True, exist_ok=True)
    tmp = npz.with_name(f".{npz.name}.tmp-{os.getpid()}.{secrets.token_hex(4)}")
    done = 0
    try:
        with open(tmp, "xb") as f:  # created 0o666 & ~umask, as any file the user writes
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                with zf.open("motion.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_1_0(member, npy_header((n_frames, FLAME_DIM), "<f4"))
                    for m in blocks:
                        m = np.ascontiguousarray(m, dtype="<f4")  # (m, 67)
                        if m.ndim != 2 or m.shape[1] != FLAME_DIM or done + m.shape[0] > n_frames:
                            raise ValueError(f"write_clip_stream: block of shape {m.shape} after {done} of {n_frames} frames")
                        check_finite_motion(m, ckpt, first=done)
                        member.write(m.tobytes())
                        if done < head.shape[0]:
                            head[done:done + m.shape[0]] = m[: head.shape[0] - done]
                        done += m.shape[0]
                    if done != n_frames:
                        raise ValueError(f"write_clip_stream: {done} frames generated, expected {n_frames}; nothing was written")
                for name, arr in (("vad", vad), ("groups", np.array(GROUP_NAMES))):
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, npz)
    finally:
        tmp.unlink(missing_ok=True)
    title = None
    if n_frames > head.shape[0]:
        title = (f"first {head.shape[0] / FPS / 60:.0f} min of {n_frames / FPS / 60:.1f} min   "
                 f"speaking {vad[:head.shape[0]].mean():.0%}")
    write_plot(png, head, vad[:head.shape[0]], text, title=title)
