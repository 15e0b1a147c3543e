"""Per-frame voice activity for sources that ship none (DualTalk).

``silero_vad_frames`` is the default: the silero-vad model shipped inside the PyPI
``silero-vad`` package (no download), loaded once per process and cached. ``energy_vad_frames``
is a crude loudness gate, used only when explicitly requested (``vad=energy``), e.g. for a very
quick look at a corpus.

Both return ``(n_frames,)`` bool at 25 fps for a 16 kHz mono float32 waveform; frame ``k``
covers samples ``[640 k, 640 (k + 1))``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..dataset import SAMPLES_PER_FRAME
from ..flame import SAMPLE_RATE
from .common import intervals_to_frames

VAD_METHODS = ("silero", "energy")


def _check_wav(wav: np.ndarray) -> np.ndarray:
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"VAD expects a mono 1-d waveform, got shape {wav.shape}")
    if not np.isfinite(wav).all():
        raise ValueError("VAD input has NaN/inf samples")
    return wav


@lru_cache(maxsize=1)
def _silero_model():
    import warnings

    from silero_vad import load_silero_vad

    with warnings.catch_warnings():  # the package's own importlib/torch.jit deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad()  # TorchScript model from the package's data folder (offline)


def silero_vad_frames(wav: np.ndarray, n_frames: int, threshold: float = 0.5, min_speech_ms: int = 250,
                      min_silence_ms: int = 100) -> np.ndarray:
    """Speech frames of a 16 kHz mono waveform from silero-vad.

    Speech segments come from ``silero_vad.get_speech_timestamps`` (speech probability above
    ``threshold``; segments shorter than ``min_speech_ms`` dropped, gaps shorter than
    ``min_silence_ms`` bridged; the package's 30 ms padding) and are rasterised to ``n_frames``
    25 fps frames by frame centre. Audio longer or shorter than ``n_frames`` is simply cut /
    treated as silence past its end.
    """
    import torch
    from silero_vad import get_speech_timestamps

    wav = _check_wav(wav)
    if n_frames <= 0:
        return np.zeros(0, dtype=bool)
    wav = wav[: n_frames * SAMPLES_PER_FRAME]
    if wav.size < 512 or not np.any(wav):
        return np.zeros(n_frames, dtype=bool)
    with torch.inference_mode():
        segs = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(wav)),
            _silero_model(),
            threshold=threshold,
            sampling_rate=SAMPLE_RATE,
            min_speech_duration_ms=min_speech_ms,
            min_silence_duration_ms=min_silence_ms,
        )
    return intervals_to_frames(((s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in segs), n_frames)


def _runs(mask: np.ndarray) -> list[tuple[int, int, bool]]:
    """``[(start, stop, value), ...]`` runs of equal values."""
    if mask.size == 0:
        return []
    edges = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [mask.size]])
    return [(int(a), int(b), bool(mask[a])) for a, b in zip(starts, stops)]


def energy_vad_frames(wav: np.ndarray, n_frames: int, floor_db: float = -50.0, rel_db: float = 30.0,
                      min_gap: int = 3, min_run: int = 3) -> np.ndarray:
    """Loudness-gate VAD: a frame speaks when its RMS is above ``floor_db`` dBFS and within
    ``rel_db`` dB of the clip's 99th-percentile frame RMS; silent gaps of at most ``min_gap``
    frames inside speech are bridged, then speech runs shorter than ``min_run`` frames dropped.

    Fires on any loud sound (music, noise, cross-talk), unlike silero: a fallback only.
    """
    wav = _check_wav(wav)
    if n_frames <= 0:
        return np.zeros(0, dtype=bool)
    n = n_frames * SAMPLES_PER_FRAME
    wav = np.pad(wav[:n], (0, max(0, n - wav.size)))
    rms = np.sqrt(np.mean(wav.reshape(n_frames, SAMPLES_PER_FRAME).astype(np.float64) ** 2, axis=1))  # (T,)
    return energy_gate(rms, floor_db, rel_db, min_gap, min_run)


def energy_gate(rms: np.ndarray, floor_db: float = -50.0, rel_db: float = 30.0, min_gap: int = 3,
                min_run: int = 3) -> np.ndarray:
    """The gate of :func:`energy_vad_frames` on per-frame RMS ``(T,)`` -> ``(T,)`` bool (a caller that
    never holds the whole waveform, e.g. streamed generation, computes the RMS block by block)."""
    db = 20 * np.log10(np.asarray(rms, dtype=np.float64) + 1e-12)  # (T,)
    if db.size == 0:
        return np.zeros(0, dtype=bool)
    mask = db > max(floor_db, float(np.percentile(db, 99)) - rel_db)
    runs = _runs(mask)
    for i, (a, b, v) in enumerate(runs):  # bridge short interior silences
        if not v and 0 < i < len(runs) - 1 and b - a <= min_gap:
            mask[a:b] = True
    for a, b, v in _runs(mask):  # drop short blips
        if v and b - a < min_run:
            mask[a:b] = False
    return mask


def vad_frames(wav: np.ndarray, n_frames: int, method: str = "silero", threshold: float = 0.5) -> np.ndarray:
    """Dispatch to :func:`silero_vad_frames` or :func:`energy_vad_frames` by name."""
    if method == "silero":
        return silero_vad_frames(wav, n_frames, threshold=threshold)
    if method == "energy":
        return energy_vad_frames(wav, n_frames)
    raise ValueError(f"unknown VAD method {method!r}; valid: {', '.join(VAD_METHODS)}")


__all__ = ["silero_vad_frames", "energy_vad_frames", "energy_gate", "vad_frames", "VAD_METHODS"]
