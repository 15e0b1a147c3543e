"""Speakers (voice and facial habits) and the source-filter waveform synthesiser of one side."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import butter, lfilter

from ..dataset import SAMPLES_PER_FRAME
from ..flame import SAMPLE_RATE
from .signals import bump, hann

# speakers


VOWELS = ("a", "e", "i", "o", "u", "@")
_FORMANTS = np.array([  # F1, F2, F3 in Hz (adult male reference; scaled per speaker)
    [730, 1090, 2440], [530, 1840, 2480], [300, 2250, 3000],
    [570, 840, 2410], [320, 870, 2240], [500, 1500, 2500]], dtype=np.float64)
_BANDWIDTHS = np.array([80.0, 100.0, 140.0])
_OPEN = np.array([1.0, 0.6, 0.3, 0.7, 0.35, 0.5])  # jaw opening per vowel
_ROUND = np.array([0.0, 0.0, 0.0, 0.9, 1.0, 0.1])
_STRETCH = np.array([0.2, 0.7, 1.0, 0.0, 0.0, 0.2])
_LOUD = 0.55 + 0.45 * _OPEN  # open vowels are louder
VOWEL_P = np.array([0.24, 0.2, 0.18, 0.14, 0.1, 0.14])


@dataclass
class Speaker:
    """Identity of one synthetic person: voice and facial habits."""

    id: str
    f0: float  # Hz
    formant_scale: float
    blink_rate: float  # blinks per minute
    fixation_s: float  # mean time between gaze saccades
    head_scale: float
    expr_scale: float
    talkative: float
    rest_expr: np.ndarray = field(repr=False)  # (50,) resting face offset
    rest_rot: np.ndarray = field(repr=False)  # (3,) resting head pose
    filters: list = field(default_factory=list, repr=False)  # per vowel: IIR denominator

    @classmethod
    def draw(cls, sid: str, rng: np.random.Generator) -> Speaker:
        female = rng.random() < 0.5
        f0 = rng.uniform(170, 235) if female else rng.uniform(90, 140)
        scale = rng.uniform(1.1, 1.2) if female else rng.uniform(0.92, 1.02)
        rest = np.zeros(50)
        rest[:20] = rng.normal(0, 0.15, 20)
        spk = cls(sid, f0, scale, rng.uniform(12, 22), rng.uniform(1.5, 2.3), rng.uniform(0.75, 1.25),
                  rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.25), rest, rng.normal(0, 0.02, 3))
        spk.filters = [_formant_filter(_FORMANTS[v] * scale) for v in range(len(VOWELS))]
        return spk


@dataclass
class Side:
    """What one side of a conversation says: utterances with their syllables, grouped into turns."""

    utterances: list = field(default_factory=list)  # (start_s, end_s, syllables array (k, 6))
    turns: list = field(default_factory=list)  # (start_s, end_s)


def _formant_filter(formants: np.ndarray) -> np.ndarray:
    """Denominator of a cascade of second-order resonators (one pole pair per formant)."""
    poles = []
    for f, bw in zip(formants, _BANDWIDTHS):
        r = np.exp(-np.pi * bw / SAMPLE_RATE)
        th = 2 * np.pi * f / SAMPLE_RATE
        poles += [r * np.exp(1j * th), r * np.exp(-1j * th)]
    return np.poly(poles).real


DEFAULT_SPEAKER_SEED = 12345


def speaker_pool(seed: int, n: int = 20) -> list[Speaker]:
    rng = np.random.default_rng([seed, 7_000_001])
    return [Speaker.draw(f"spk{i:02d}", rng) for i in range(n)]


@lru_cache(maxsize=1)
def default_speaker() -> Speaker:
    """A fixed identity (used by :func:`listener_reaction` when none is given; do not mutate)."""
    return Speaker.draw("default", np.random.default_rng(DEFAULT_SPEAKER_SEED))



_HIGHPASS = butter(2, 2500, btype="highpass", fs=SAMPLE_RATE)
_DRIVE_HOP = 16  # motion drives are accumulated at 1 kHz (40 values per motion frame)


def _glottal_table(n: int = 4096, tp: float = 0.4, tn: float = 0.16) -> np.ndarray:
    """One period of the Rosenberg glottal flow pulse (opening ``tp``, closing ``tn`` of a period)."""
    ph = (np.arange(n) + 0.5) / n
    return np.where(ph < tp, 0.5 * (1 - np.cos(np.pi * ph / tp)),
                    np.where(ph < tp + tn, np.cos(np.pi * np.clip(ph - tp, 0, tn) / (2 * tn)), 0.0))


_GLOTTAL = _glottal_table()


def synthesize_side(side: Side, speaker: Speaker, n_frames: int, rng: np.random.Generator):
    """Waveform (S,) float32 and per-frame drives for one side (open, round, stretch, env, stress).

    Per utterance: f0 contour (syllable targets, declination, accents, jitter) -> phase
    accumulation -> glottal flow derivative (+ aspiration) -> one formant cascade per vowel used
    -> each syllable takes its vowel's output under a Hann syllable envelope; consonant-like
    high-passed noise bursts precede most vowel nuclei.
    """
    fs = SAMPLE_RATE
    n_samp = n_frames * SAMPLES_PER_FRAME
    wav = np.zeros(n_samp)
    n_drv = n_samp // _DRIVE_HOP
    drives = {k: np.zeros(n_drv) for k in ("open", "round", "stretch", "env", "stress")}
    tab_n = _GLOTTAL.shape[0]
    for a_s, b_s, syl in side.utterances:
        a, b = int(a_s * fs), min(int(np.ceil(b_s * fs)), n_samp)
        if b - a < 32:
            continue
        t = np.arange(a, b) / fs
        centers = syl[:, 0] + 0.5 * syl[:, 1]
        n_jit = max(int((b_s - a_s) * 100), 2)
        jit = np.interp(t, np.linspace(a_s, b_s, n_jit), rng.normal(0, 1, n_jit))
        f0 = np.interp(t, centers, syl[:, 5]) * (1 + 0.008 * jit)
        phase = np.cumsum(f0 / fs) + rng.random()
        g = _GLOTTAL[((phase % 1.0) * tab_n).astype(np.int64)]
        noise = rng.standard_normal(b - a, dtype=np.float32)
        exc = np.diff(g, prepend=g[0]) + 0.004 * noise  # glottal flow derivative + aspiration
        voiced = {}
        for v in np.unique(syl[:, 2]).astype(int):
            y = lfilter([1.0], speaker.filters[v], exc)
            voiced[v] = y / (np.sqrt(np.mean(y**2)) + 1e-9)
        cons = np.zeros(b - a)
        for s, d, v, stress, amp, _ in syl:
            v = int(v)
            ba, bb = int((s - 0.2 * d) * fs), int((s + 1.2 * d) * fs)
            sa, sb = max(ba, a), min(bb, b)
            if sb <= sa:
                continue
            syl_env = hann(bb - ba)[sa - ba:sb - ba]
            wav[sa:sb] += (amp * _LOUD[v]) * syl_env * voiced[v][sa - a:sb - a]
            # the same envelope on the 1 kHz drive grid
            da, db = -(-ba // _DRIVE_HOP), bb // _DRIVE_HOP
            dbump = bump(db - da, (ba / _DRIVE_HOP) - da, (bb - ba) / _DRIVE_HOP)
            da0, db0 = max(da, 0), min(db, n_drv)
            dbump = dbump[da0 - da:db0 - da] * amp
            drives["open"][da0:db0] += dbump * _OPEN[v]
            drives["round"][da0:db0] += dbump * _ROUND[v]
            drives["stretch"][da0:db0] += dbump * _STRETCH[v]
            drives["env"][da0:db0] += dbump
            if stress:
                drives["stress"][da0:db0] += dbump / amp
            if rng.random() < 0.7:  # consonant: short noise burst before the vowel nucleus
                ca = int((s - 0.15 * d) * fs) - a
                cl = int(rng.uniform(0.025, 0.06) * fs)
                if ca >= 0 and ca + cl <= b - a:
                    cons[ca:ca + cl] += hann(cl) * amp * rng.uniform(0.5, 1.2)
        wav[a:b] += cons * lfilter(*_HIGHPASS, noise)
    wav *= 0.12
    peak = np.abs(wav).max()
    if peak > 0.95:
        wav *= 0.95 / peak
    wav += 4e-4 * rng.standard_normal(n_samp, dtype=np.float32)  # noise floor (about -68 dBFS)
    per = SAMPLES_PER_FRAME // _DRIVE_HOP
    frames = {k: v.reshape(n_frames, per).mean(1) for k, v in drives.items()}
    frames["stress"] = gaussian_filter1d(frames["stress"], 1.5)
    return wav.astype(np.float32), frames


