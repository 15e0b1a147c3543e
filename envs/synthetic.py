"""A deterministic synthetic dyadic corpus that reproduces the problem the paper attacks.

Two speakers take turns. Every side of every conversation has FLAME motion (all six groups), a
real 16 kHz waveform, per-frame VAD and one text description per 200-frame window. The corpus is
built so that the three regimes of the paper are present and measurable:

* **speaking is near-deterministic**: the actor's jaw opening (channel 50) and mouth expression
  channels follow the syllable envelope and vowel of the actor's *own* waveform, so audio -> jaw
  is learnable;
* **listening is one-to-many**: for one partner context the listener's reaction is drawn from
  several intents (eager nods with a smile, slow sad head shake with a frown, still and
  attentive, skeptical tilt with raised brows, laughing, confused furrow, bored look-away) with
  random amplitude and timing, so the per-frame mean over reactions is near-static -- a model
  trained with MSE collapses to it;
* **text names the intent** in varied free words ("Joyful and upbeat, nodding eagerly with a
  broad smile."), so text control is measurable (in version 2, except for a share of vague or
  missing texts).

Blinks (eyelid) and gaze saccades (eyepose) happen in all roles. The waveform is a small
source-filter synthesiser: a glottal pulse train at a per-speaker f0 (declination, accents,
jitter) filtered by per-vowel formant resonators scaled to the speaker's vocal tract, shaped by
a syllable envelope, with fricative-like noise at syllable onsets and a low noise floor between
utterances.

Expression channels have a fixed (invented) meaning here, like the leading components of a
FLAME expression basis: see ``EX_*`` below.

Two corpus versions (:data:`CORPUS_PARAMS`; the version is recorded in ``dataset.json``):

* **version 2** (default) is calibrated to real tracker FLAME (``envs/reference_stats.py``:
  per-group scales, velocity std and listening/speaking ratios of real DualTalk within a factor
  1.5): all 50 expression channels active (a flat per-intent pattern and idle motion on 10-49,
  speech drives mixed into every channel), a tracker-like high-frequency component on every
  group but the eyelids, brisk sparse head beats while speaking, small head offsets while
  listening, reactions only weakly anchored at the partner's pauses (a fifth of the events), and
  10 % missing / 15 % vague window texts;
* **version 1** is the original corpus, reproduced bit for bit: expression energy decays over
  the channel index, no jitter, all texts name their intent.

The audio and the turn-taking timeline are the same in both versions.

``idle_expr_rank=k`` (opt-in, any version; recorded in ``dataset.json``) draws the idle expression
from ``k`` shared smooth factors mixed into the 50 channels by a fixed random unit-norm mixing
instead of independently per channel: every channel keeps its std, the motion becomes
``k``-dimensional. It exists to test whether the listening collapse comes from the VAE (a
high-dimensional idle expression no r = 8 VAE can carry) or from the AR-Flow (docs/benchmarks.md, "The
VAE's ceiling").

Public API::

    INTENTS, CORPUS_VERSION, CORPUS_PARAMS, corpus_params(version, idle_expr_rank=None)
    listener_reaction(intent, n_frames, rng, partner_vad=None, identity=None, version=2) -> {group: (T, d)}
    describe(intent, rng, speaking=False) -> str
    caption(intent, rng, speaking, version=2) -> (text, kind)      kind in TEXT_KINDS
    synthesize_conversation(cid, seconds=64.0, seed=0, index=0, speakers=None, version=2) -> (Conversation, info)
    generate_corpus(out_dir, n_conversations=60, seconds=64.0, seed=0, test_fraction=0.1, progress=True,
                    workers=1, version=2) -> summary dict (DatasetWriter summary + generation time + counts)

Everything is deterministic given ``seed``: conversation ``i`` of a corpus depends only on
``(seed, i)`` (and the speaker pool of ``seed``), not on how many conversations are generated.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import butter, lfilter

from .dataset import SAMPLES_PER_FRAME, WINDOW, Conversation, DatasetWriter, check_output_folder
from .flame import FLAME_DIM, FPS, GROUPS, N_GROUPS, SAMPLE_RATE

# ----------------------------------------------------------------------------------------------
# layout conventions of the synthetic faces

# meaning given to the leading expression coefficients in this corpus
EX_MOUTH_OPEN, EX_SMILE, EX_ROUND, EX_STRETCH, EX_BROW_UP = 0, 1, 2, 3, 4
EX_FROWN, EX_SQUINT, EX_LIP_DOWN, EX_PRESS, EX_BROW_ONE = 5, 6, 7, 8, 9
N_SEMANTIC = 10  # channels 10..49 are texture

JAW_OPEN = GROUPS["jaw"].start  # 50: jaw opening (rotation about x, positive opens)
ROT = GROUPS["rot"].start  # 64: head pitch (positive = down), 65 yaw, 66 roll
NECK = GROUPS["neck"].start
EYELID = GROUPS["eyelid"]
EYE_L, EYE_R = GROUPS["eyepose"].start, GROUPS["eyepose"].start + 3  # each (pitch, yaw, roll)

INTENTS: tuple[str, ...] = ("joyful", "sad", "attentive", "skeptical", "amused", "confused", "bored")


def _texture_table(amp: float, decay: float | None) -> dict[str, np.ndarray]:
    """Fixed per-intent patterns over expression channels 10..49 (not seed-dependent: an intent
    looks the same in every corpus): ``amp`` times unit normals, times ``exp(-i / decay)``
    (no decay over the channel index when ``decay`` is None)."""
    table = {}
    for i, name in enumerate(INTENTS):
        x = np.random.default_rng([20260325, i]).standard_normal(50 - N_SEMANTIC) * amp
        table[name] = x * np.exp(-np.arange(50 - N_SEMANTIC) / decay) if decay is not None else x
    return table


# fixed projection of the speech drives (open, round, stretch) onto all 50 expression channels
# (a tracker's expression basis mixes mouth movement into most of its components)
_SPEECH_BASIS = np.random.default_rng([20260325, 101]).standard_normal((3, 50))  # (3, 50)


@dataclass(frozen=True)
class IntentStyle:
    """How one intent shows in the face (listening values; speaking uses scaled-down ones)."""

    expr: dict  # semantic channel -> level
    eyelid: float  # resting eyelid closure (0 open .. 1 closed)
    head: tuple  # head offset (pitch, yaw, roll) in rad; yaw/roll signs drawn per reaction
    gaze: tuple  # gaze offset (pitch, yaw) in rad; yaw follows the head yaw sign
    # speaking style: f0 factor, f0 range, syllable rate, loudness, head motion, jaw gain
    f0: float = 1.0
    f0_range: float = 1.0
    rate: float = 1.0
    loud: float = 1.0
    head_motion: float = 1.0
    jaw: float = 1.0


STYLES: dict[str, IntentStyle] = {
    "joyful": IntentStyle({EX_SMILE: 1.3, EX_SQUINT: 0.5, EX_BROW_UP: 0.3, EX_MOUTH_OPEN: 0.15}, 0.12,
                          (-0.02, 0.0, 0.0), (0.0, 0.0), 1.1, 1.4, 1.12, 1.0, 1.3, 1.1),
    "sad": IntentStyle({EX_FROWN: 1.0, EX_LIP_DOWN: 0.9, EX_BROW_UP: 0.3, EX_SMILE: -0.4}, 0.28,
                       (0.08, 0.0, 0.0), (0.1, 0.0), 0.9, 0.6, 0.8, 0.75, 0.6, 0.8),
    "attentive": IntentStyle({EX_BROW_UP: 0.35}, 0.02, (0.02, 0.0, 0.0), (0.0, 0.0), 1.0, 1.0, 1.0, 0.95, 0.8, 1.0),
    "skeptical": IntentStyle({EX_BROW_ONE: 1.1, EX_BROW_UP: 0.5, EX_PRESS: 0.9, EX_SQUINT: 0.3, EX_SMILE: -0.2}, 0.25,
                             (0.0, 0.04, 0.1), (0.0, 0.04), 1.0, 1.2, 0.95, 0.95, 1.0, 0.95),
    "amused": IntentStyle({EX_SMILE: 1.1, EX_SQUINT: 0.6, EX_MOUTH_OPEN: 0.3}, 0.2,
                          (-0.03, 0.0, 0.0), (0.0, 0.0), 1.08, 1.3, 1.08, 1.0, 1.2, 1.1),
    "confused": IntentStyle({EX_FROWN: 0.9, EX_SQUINT: 0.5, EX_BROW_ONE: 0.3, EX_PRESS: 0.3}, 0.22,
                            (0.03, 0.04, 0.07), (0.0, 0.03), 1.02, 1.1, 0.9, 0.9, 0.9, 0.9),
    "bored": IntentStyle({EX_SMILE: -0.2, EX_LIP_DOWN: 0.3, EX_BROW_UP: -0.3}, 0.38,
                         (0.03, 0.08, 0.03), (0.05, 0.15), 0.93, 0.4, 0.85, 0.8, 0.5, 0.75),
}

# ----------------------------------------------------------------------------------------------
# corpus versions


@dataclass(frozen=True)
class CorpusParams:
    """The knobs that differ between corpus versions (amplitudes in raw FLAME units).

    Version 1 is the original corpus (bit for bit). Version 2 is calibrated to real tracker FLAME
    (``envs/reference_stats.py``): all 50 expression channels active, a tracker-like
    high-frequency component, speech mixed into every expression channel, brisk head beats while
    speaking, smaller head offsets while listening, reactions only weakly anchored at the
    partner's pauses, and a share of vague or missing texts.
    """

    version: int
    expr_gain: float  # scale of the semantic expression levels of the intents (channels 0..9)
    texture_amp: float  # per-intent pattern on channels 10..49 ...
    texture_decay: float | None  # ... decaying as exp(-i / decay) over the channel index (None: flat)
    idle_expr: float  # smooth idle expression noise (v1: 0.05 with a decay over the channel index)
    idle_expr_sigma: float  # its Gaussian smoothing (frames)
    idle_expr_decay: float | None  # v1 profile 0.4 + 0.6 exp(-i / decay) over the channel index (None: flat)
    jitter: dict  # group -> std of the tracker-like high-frequency component (0: none)
    jitter_sigma: float  # its Gaussian smoothing (frames)
    head_offset: float  # scale of the intent head / gaze offsets while listening
    head_event: float  # scale of the listening head events (nods, shakes, tilts)
    idle_rot: float  # smooth idle head motion std (rad) ...
    idle_rot_sigma: float  # ... and its smoothing (frames)
    anchor_share: float  # share of listening events anchored at the partner's pauses
    jaw_rest: float  # resting jaw opening (rad)
    listen_jaw: float  # smooth jaw drift while listening (std, rad; 0: none)
    speech_mix: float  # gain of the speech drives projected on all 50 expression channels
    speak_beat: float  # head pitch beat per stressed syllable while speaking (rad) ...
    beat_share: float | None  # ... on every one, smoothly (None), or as sparse brisk nods on this share
    speak_head_noise: float  # smooth head motion while speaking (rad) ...
    speak_head_sigma: float  # ... and its smoothing (frames)
    text_missing: float  # share of windows with no text ("")
    text_vague: float  # share of windows with a vague text that does not name the intent
    idle_expr_rank: int | None = None  # idle expression from this many shared factors (None: independent per channel)


CORPUS_PARAMS: dict[int, CorpusParams] = {
    1: CorpusParams(version=1, expr_gain=1.0, texture_amp=0.12, texture_decay=15.0, idle_expr=0.05, idle_expr_sigma=6.0,
                    idle_expr_decay=12.0, jitter={}, jitter_sigma=0.7, head_offset=1.0, head_event=1.0, idle_rot=0.012,
                    idle_rot_sigma=20.0,
                    anchor_share=0.5, jaw_rest=0.012, listen_jaw=0.0, speech_mix=0.0, speak_beat=0.03, beat_share=None,
                    speak_head_noise=0.03, speak_head_sigma=12.0, text_missing=0.0, text_vague=0.0),
    2: CorpusParams(version=2, expr_gain=1.5, texture_amp=0.4, texture_decay=None, idle_expr=0.2, idle_expr_sigma=3.0,
                    idle_expr_decay=None,
                    jitter={"expr": 0.075, "jaw": 0.0015, "neck": 0.0008, "eyepose": 0.001, "rot": 0.0033},
                    jitter_sigma=0.7, head_offset=0.4, head_event=0.7, idle_rot=0.008, idle_rot_sigma=8.0,
                    anchor_share=0.2, jaw_rest=0.025, listen_jaw=0.012, speech_mix=1.1, speak_beat=0.18, beat_share=0.12,
                    speak_head_noise=0.01, speak_head_sigma=6.0, text_missing=0.1, text_vague=0.15),
}
CORPUS_VERSION = 2  # the default


IDLE_MIX_SEED = 1234  # the fixed mixing of the low-rank idle expression (the same in every conversation)


def corpus_params(version: int, idle_expr_rank: int | None = None) -> CorpusParams:
    """The parameters of corpus ``version``, with the idle expression made ``idle_expr_rank``-dimensional when given."""
    if version not in CORPUS_PARAMS:
        raise ValueError(f"unknown synthetic corpus version {version!r}; valid: {sorted(CORPUS_PARAMS)}")
    if idle_expr_rank is None:
        return CORPUS_PARAMS[version]
    if isinstance(idle_expr_rank, bool) or not isinstance(idle_expr_rank, int) or not 1 <= idle_expr_rank <= 50:
        raise ValueError(f"idle_expr_rank must be an integer 1..50 (the expression channels) or null, got {idle_expr_rank!r}")
    return replace(CORPUS_PARAMS[version], idle_expr_rank=idle_expr_rank)


def _idle_expression(rng: np.random.Generator, n: int, P: CorpusParams) -> np.ndarray:
    """``(n, 50)`` idle expression of unit std per channel: independent smooth noise per channel, or
    ``P.idle_expr_rank`` smooth factors through a fixed unit-norm mixing (rows of the mixing: factors)."""
    if P.idle_expr_rank is None:
        return _smooth_noise(rng, n, 50, P.idle_expr_sigma)
    mix = np.random.default_rng(IDLE_MIX_SEED).standard_normal((P.idle_expr_rank, 50))
    mix /= np.linalg.norm(mix, axis=0, keepdims=True)  # every channel: a unit-norm combination of the factors
    return _smooth_noise(rng, n, P.idle_expr_rank, P.idle_expr_sigma) @ mix


@cache
def _texture(version: int) -> dict[str, np.ndarray]:
    p = corpus_params(version)
    return _texture_table(p.texture_amp, p.texture_decay)


# ----------------------------------------------------------------------------------------------
# text: several emotion words, feature phrases and templates per intent (emotion words are
# disjoint between intents, so each text names its intent)

_WORDS = {
    "joyful": dict(
        emo=["joyful", "happy", "cheerful", "delighted", "elated", "glad"],
        emo2=["energetic", "warm", "enthusiastic", "upbeat", "bright"],
        listen=["nodding eagerly", "nodding along enthusiastically", "giving quick happy nods",
                "bobbing the head in agreement"],
        speak=["animated, with lively head movements", "bouncy and expressive in the head",
               "with upbeat, energetic head motion"],
        face=["with a broad smile", "smiling widely", "with a big grin and crinkled eyes",
              "beaming with raised cheeks"]),
    "sad": dict(
        emo=["sad", "sorrowful", "downcast", "disappointed", "gloomy", "melancholic"],
        emo2=["subdued", "heavy-hearted", "dejected", "low"],
        listen=["slowly shaking the head", "shaking the head gently in dismay",
                "giving a slow, heavy head shake"],
        speak=["with a lowered head and little movement", "quiet, with the head hanging down",
               "with slow, sagging head motion"],
        face=["with a deep frown", "with drooping lip corners and a frown",
              "brows knitted and mouth turned down", "eyes lowered and a frown"]),
    "attentive": dict(
        emo=["attentive", "focused", "engaged", "concentrated", "alert"],
        emo2=["composed", "steady", "poised", "collected"],
        listen=["holding very still", "keeping the head steady", "motionless and watchful",
                "with a slight, rare nod"],
        speak=["calm and measured, with a steady head", "with small, controlled head movements",
               "keeping an even, steady posture"],
        face=["staring directly ahead", "with wide, steady eyes", "eyes fixed forward",
              "with a composed face and open eyes"]),
    "skeptical": dict(
        emo=["skeptical", "doubtful", "suspicious", "unconvinced", "wary"],
        emo2=["guarded", "questioning", "critical", "reserved"],
        listen=["head tilted to one side", "with the head cocked", "tilting the head"],
        speak=["with a cocked head and pointed glances", "tilting the head while making a point",
               "with a sideways tilt of the head"],
        face=["one eyebrow raised", "with raised eyebrows and pursed lips",
              "brows lifted and lips pressed together", "narrowed eyes and a raised brow"]),
    "amused": dict(
        emo=["amused", "laughing", "gleeful", "tickled", "mirthful", "giggly"],
        emo2=["playful", "merry", "jolly", "lighthearted"],
        listen=["laughing heartily", "bursting into laughter", "chuckling with the head thrown back",
                "shaking with laughter"],
        speak=["grinning through a funny story", "chuckling between phrases", "with a playful bounce of the head"],
        face=["eyes squeezed with a wide open smile", "mouth wide open in a grin",
              "crinkled eyes and a huge smile"]),
    "confused": dict(
        emo=["confused", "puzzled", "perplexed", "bewildered", "uncertain"],
        emo2=["hesitant", "unsure", "lost", "baffled"],
        listen=["head tilted slightly", "leaning in with a slight tilt", "with a small hesitant head turn"],
        speak=["searching for words with a tilted head", "with hesitant, halting head motion",
               "with a slight tilt and wandering eyes"],
        face=["with a furrowed brow", "brows drawn together", "squinting in puzzlement",
              "with knitted brows and narrowed eyes"]),
    "bored": dict(
        emo=["bored", "detached", "disinterested", "indifferent", "weary", "apathetic"],
        emo2=["listless", "flat", "sluggish", "distant"],
        listen=["looking away", "gazing off to the side", "eyes wandering away"],
        speak=["monotone, glancing away", "with a flat, barely moving head", "with half-closed eyes, looking aside"],
        face=["with a blank expression", "heavy-lidded and expressionless", "with drooping eyelids"]),
}

_TEMPLATES = (
    "{Emo} and {emo2}, {feat}, {face}.",
    "{Emo}, {feat}, {face}.",
    "{A} {emo}, {emo2} look, {feat}, {face}.",
    "{Face}, {feat}; {emo} and {emo2}.",
    "{Emo} and {emo2}: {face}, {feat}.",
)

INTENT_WORDS: dict[str, tuple[str, ...]] = {k: tuple(v["emo"]) for k, v in _WORDS.items()}


def describe(intent: str, rng: np.random.Generator, speaking: bool = False) -> str:
    """One free-text description of ``intent`` (speaking-style wording if ``speaking``)."""
    if intent not in _WORDS:
        raise KeyError(f"unknown intent {intent!r}; valid: {', '.join(INTENTS)}")
    w = _WORDS[intent]

    def pick(key):
        return w[key][rng.integers(len(w[key]))]

    emo, emo2, face = pick("emo"), pick("emo2"), pick("face")
    feat = pick("speak" if speaking else "listen")
    t = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    return t.format(A="An" if emo[0] in "aeiou" else "A", Emo=emo.capitalize(), emo=emo, emo2=emo2, feat=feat, face=face,
                    Face=face[0].upper() + face[1:])


# machine-written captions are often vague: these name no intent (and no role)
VAGUE_TEXTS: tuple[str, ...] = (
    "A person.", "Someone facing the camera.", "A person in a conversation.", "An adult, front view.",
    "A face in a video call.", "Someone in a conversation, expression unclear.", "A person with a fairly neutral face.",
    "Head and shoulders of a person.", "A man or a woman in front of a plain wall.", "Someone in a dialogue.",
)
TEXT_KINDS = ("full", "vague", "missing")


def caption(intent: str, rng: np.random.Generator, speaking: bool, version: int = 2) -> tuple[str, str]:
    """The text of one window of corpus ``version`` and its kind (one of :data:`TEXT_KINDS`):
    empty ("missing") or one of :data:`VAGUE_TEXTS` ("vague") with the version's shares, else
    :func:`describe` ("full")."""
    p = corpus_params(version)
    if p.text_missing or p.text_vague:
        u = rng.random()
        if u < p.text_missing:
            return "", "missing"
        if u < p.text_missing + p.text_vague:
            return VAGUE_TEXTS[rng.integers(len(VAGUE_TEXTS))], "vague"
    return describe(intent, rng, speaking=speaking), "full"


# ----------------------------------------------------------------------------------------------
# speakers


_VOWELS = ("a", "e", "i", "o", "u", "@")
_FORMANTS = np.array([  # F1, F2, F3 in Hz (adult male reference; scaled per speaker)
    [730, 1090, 2440], [530, 1840, 2480], [300, 2250, 3000],
    [570, 840, 2410], [320, 870, 2240], [500, 1500, 2500]], dtype=np.float64)
_BANDWIDTHS = np.array([80.0, 100.0, 140.0])
_OPEN = np.array([1.0, 0.6, 0.3, 0.7, 0.35, 0.5])  # jaw opening per vowel
_ROUND = np.array([0.0, 0.0, 0.0, 0.9, 1.0, 0.1])
_STRETCH = np.array([0.2, 0.7, 1.0, 0.0, 0.0, 0.2])
_LOUD = 0.55 + 0.45 * _OPEN  # open vowels are louder
_VOWEL_P = np.array([0.24, 0.2, 0.18, 0.14, 0.1, 0.14])


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
        spk.filters = [_formant_filter(_FORMANTS[v] * scale) for v in range(len(_VOWELS))]
        return spk


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


# ----------------------------------------------------------------------------------------------
# small signal helpers


def _smooth_noise(rng: np.random.Generator, n: int, c: int, sigma: float) -> np.ndarray:
    """(n, c) smooth Gaussian noise with unit marginal std (white noise, Gaussian-filtered)."""
    x = gaussian_filter1d(rng.standard_normal((n, c)), sigma, axis=0, mode="reflect")
    return x * np.sqrt(2 * np.sqrt(np.pi) * sigma)


_HANN_TAB = 0.5 * (1 - np.cos(2 * np.pi * (np.arange(8192) + 0.5) / 8192))


def _hann(n: int) -> np.ndarray:
    """(n,) symmetric Hann window sampled at bin centres (table lookup: this is called a lot)."""
    if n <= 1:
        return np.ones(max(n, 0))
    return _HANN_TAB[((np.arange(n) + 0.5) * (8192.0 / n)).astype(np.int64)]


def _bump(n: int, start: float, length: float) -> np.ndarray:
    """(n,) Hann bump over frames [start, start + length), zero elsewhere (fractional ok)."""
    t = (np.arange(n) - start) / max(length, 1e-6)
    return np.where((t > 0) & (t < 1), 0.5 * (1 - np.cos(2 * np.pi * np.clip(t, 0, 1))), 0.0)


def _smooth_mask(mask: np.ndarray, half: int) -> np.ndarray:
    """Float version of a bool mask with Hann ramps of about ``2 * half`` frames."""
    k = _hann(2 * half + 1)
    k /= k.sum()
    return np.convolve(np.pad(mask.astype(np.float64), half, mode="edge"), k, mode="valid")


def _onsets(rng: np.random.Generator, k: int, n: int, dur: float, partner_vad: np.ndarray | None,
            anchor_share: float = 0.5) -> np.ndarray:
    """Start frames of ``k`` reaction events lasting ``dur`` frames.

    A share ``anchor_share`` of the events (on average) is anchored near the end of a partner
    utterance (a listener reacts at the partner's pauses) with +-0.4 s jitter; the rest are
    uniform. Events may start before 0 or run past the end so the timing distribution is flat
    over the window.
    """
    starts = rng.uniform(-0.5 * dur, n - 0.5 * dur, k)
    if partner_vad is not None and k:
        pv = np.asarray(partner_vad, dtype=bool)
        ends = np.flatnonzero(pv[:-1] & ~pv[1:]) + 1
        if ends.size:
            anchored = rng.random(k) < anchor_share
            picks = ends[rng.integers(ends.size, size=k)] + rng.normal(0, 0.4 * FPS, k) - 0.2 * dur
            starts = np.where(anchored, picks, starts)
    return starts


# ----------------------------------------------------------------------------------------------
# motion components: (n, 67) arrays; eyelid channels hold the *resting* closure (blinks added last)


def _add_expr(m: np.ndarray, intent: str, gain: np.ndarray | float, speaker: Speaker, P: CorpusParams) -> None:
    """Add the intent's expression levels (channels 0..9) and texture (10..49) times ``gain``."""
    st = STYLES[intent]
    for ch, lv in st.expr.items():
        m[:, ch] += lv * gain * speaker.expr_scale * P.expr_gain
    m[:, N_SEMANTIC:50] += np.outer(np.broadcast_to(gain, (m.shape[0],)), _texture(P.version)[intent])


def _listen_component(intent: str, n: int, rng: np.random.Generator, partner_vad, speaker: Speaker,
                      P: CorpusParams) -> np.ndarray:
    """Intent-driven listening behaviour for ``n`` frames (no blinks/saccades/idle noise)."""
    st = STYLES[intent]
    m = np.zeros((n, FLAME_DIM))
    amp = rng.uniform(0.6, 1.4)  # intensity of this reaction
    drift = 1 + 0.2 * _smooth_noise(rng, n, 1, 30)[:, 0]
    _add_expr(m, intent, amp * drift, speaker, P)
    m[:, EYELID] += st.eyelid * rng.uniform(0.7, 1.3)
    sign = rng.choice([-1.0, 1.0])
    head = np.array(st.head) * rng.uniform(0.6, 1.4) * np.array([1.0, sign, sign]) * P.head_offset
    m[:, ROT:ROT + 3] += head * (1 + 0.15 * _smooth_noise(rng, n, 1, 40))
    gaze = np.array([st.gaze[0], sign * st.gaze[1]]) * rng.uniform(0.7, 1.3) * P.head_offset
    m[:, [EYE_L, EYE_R]] += gaze[0]
    m[:, [EYE_L + 1, EYE_R + 1]] += gaze[1]
    m[:, JAW_OPEN] += P.jaw_rest
    t = np.arange(n, dtype=np.float64)
    hs = speaker.head_scale * P.head_event

    if intent == "joyful":  # bursts of eager nods
        for _ in range(rng.integers(1, 4)):
            f = rng.uniform(1.6, 2.6) / FPS
            cyc = rng.integers(2, 5)
            s0 = _onsets(rng, 1, n, cyc / f, partner_vad, P.anchor_share)[0]
            tau = (t - s0) * f
            on = (tau > 0) & (tau < cyc)
            m[:, ROT] += np.where(on, 0.5 * (1 - np.cos(2 * np.pi * tau)), 0) * rng.uniform(0.04, 0.11) * amp * hs
    elif intent == "sad":  # slow head shake, head low
        for _ in range(rng.integers(1, 3)):
            f = rng.uniform(0.6, 1.1) / FPS
            cyc = rng.integers(2, 4)
            s0 = _onsets(rng, 1, n, cyc / f, partner_vad, P.anchor_share)[0]
            m[:, ROT + 1] += (np.sin(2 * np.pi * (t - s0) * f) * _bump(n, s0, cyc / f)
                              * rng.uniform(0.05, 0.13) * amp * hs)
    elif intent == "attentive":  # still; at most a couple of tiny nods
        for _ in range(rng.integers(0, 3)):
            f = rng.uniform(1.2, 1.8) / FPS
            s0 = _onsets(rng, 1, n, 1 / f, partner_vad, P.anchor_share)[0]
            m[:, ROT] += _bump(n, s0, 1 / f) * rng.uniform(0.01, 0.025)
    elif intent == "skeptical":  # tilt accents and extra brow raises
        for _ in range(rng.integers(1, 3)):
            d = rng.uniform(1.0, 2.2) * FPS
            s0 = _onsets(rng, 1, n, d, partner_vad, P.anchor_share)[0]
            b = _bump(n, s0, d)
            m[:, ROT + 2] += sign * b * rng.uniform(0.03, 0.07) * hs
            m[:, EX_BROW_ONE] += b * rng.uniform(0.3, 0.7)
            m[:, EX_BROW_UP] += b * rng.uniform(0.1, 0.4)
    elif intent == "amused":  # laughter bursts: ha-ha jaw modulation, big smile, head back
        for _ in range(rng.integers(1, 4)):
            d = rng.uniform(1.0, 2.5) * FPS
            s0 = _onsets(rng, 1, n, d, partner_vad, P.anchor_share)[0]
            e = _bump(n, s0, d)
            fh = rng.uniform(4.0, 5.5) / FPS
            ha = 0.5 * (1 - np.cos(2 * np.pi * (t - s0) * fh))
            a = rng.uniform(0.6, 1.2) * amp
            jaw = e * (0.03 + 0.1 * ha) * a
            m[:, JAW_OPEN] += jaw
            m[:, EX_MOUTH_OPEN] += 4.0 * jaw
            m[:, EX_SMILE] += e * 0.6 * a
            m[:, EX_SQUINT] += e * 0.6 * a
            m[:, EYELID] += (e * 0.25 * a)[:, None]
            m[:, ROT] += (-0.07 * e + 0.015 * e * ha) * a * hs
    elif intent == "confused":  # hesitant head turn and brow furrow
        for _ in range(rng.integers(1, 3)):
            d = rng.uniform(1.2, 2.5) * FPS
            s0 = _onsets(rng, 1, n, d, partner_vad, P.anchor_share)[0]
            b = _bump(n, s0, d)
            m[:, ROT + 1] += rng.choice([-1, 1]) * b * rng.uniform(0.02, 0.05) * hs
            m[:, EX_FROWN] += b * rng.uniform(0.3, 0.7)
            m[:, EX_SQUINT] += b * rng.uniform(0.2, 0.4)
    elif intent == "bored":  # slow look shifts and sighs with heavy lids
        for _ in range(rng.integers(1, 3)):
            d = rng.uniform(1.5, 3.0) * FPS
            s0 = _onsets(rng, 1, n, d, partner_vad, P.anchor_share)[0]
            b = _bump(n, s0, d)
            m[:, [EYE_L + 1, EYE_R + 1]] += (sign * b * rng.uniform(0.04, 0.08))[:, None]
            m[:, ROT] += -0.04 * b * hs + 0.04 * _bump(n, s0 + 0.4 * d, 0.6 * d) * hs
            m[:, EYELID] += (b * 0.12)[:, None]
    if P.listen_jaw:  # lips part and close, swallowing: the jaw is never perfectly still
        m[:, JAW_OPEN:JAW_OPEN + 3] += P.listen_jaw * _smooth_noise(rng, n, 3, 6) * np.array([1.0, 0.5, 0.5])
    return m


def _speak_component(intent: str, feats: dict, rng: np.random.Generator, speaker: Speaker,
                     P: CorpusParams) -> np.ndarray:
    """Speaking behaviour for the frames of ``feats`` (per-frame drives from the own audio)."""
    st = STYLES[intent]
    n = feats["open"].shape[0]
    m = np.zeros((n, FLAME_DIM))
    amp = rng.uniform(0.6, 1.2)
    _add_expr(m, intent, 0.6 * amp * (1 + 0.15 * _smooth_noise(rng, n, 1, 30)[:, 0]), speaker, P)
    jaw = 0.22 * st.jaw * feats["open"]
    m[:, JAW_OPEN] += P.jaw_rest + jaw
    m[:, JAW_OPEN + 1:JAW_OPEN + 3] += 0.01 * _smooth_noise(rng, n, 2, 3) * feats["env"][:, None]
    m[:, EX_MOUTH_OPEN] += 4.0 * jaw
    m[:, EX_ROUND] += 1.2 * feats["round"]
    m[:, EX_STRETCH] += 0.9 * feats["stretch"]
    if P.speech_mix:  # the tracker's expression basis mixes mouth movement into every channel
        drives = np.stack([feats["open"], feats["round"], feats["stretch"]], 1)  # (n, 3)
        m[:, :50] += P.speech_mix * drives @ _SPEECH_BASIS  # (n, 50)
    m[:, EX_BROW_UP] += 0.5 * st.head_motion * feats["stress"]
    hm = st.head_motion * speaker.head_scale
    if P.beat_share is None:  # head beats on stressed syllables
        m[:, ROT] += P.speak_beat * hm * feats["stress"]
    else:
        m[:, ROT:ROT + 3] += hm * _sparse_beats(feats["stress"], rng, P.speak_beat, P.beat_share)
    m[:, ROT:ROT + 3] += P.speak_head_noise * hm * _smooth_noise(rng, n, 3, P.speak_head_sigma) * np.array([1.0, 1.2, 0.6])
    sign = rng.choice([-1.0, 1.0])
    m[:, ROT:ROT + 3] += 0.5 * np.array(st.head) * np.array([1.0, sign, sign]) * P.head_offset
    m[:, EYELID] += 0.7 * st.eyelid
    m[:, [EYE_L, EYE_R]] += 0.5 * st.gaze[0] * P.head_offset
    m[:, [EYE_L + 1, EYE_R + 1]] += 0.5 * sign * st.gaze[1] * P.head_offset
    return m


def _sparse_beats(stress: np.ndarray, rng: np.random.Generator, amp: float, share: float) -> np.ndarray:
    """(n, 3) brisk head beats (pitch nod, some yaw/roll) on a random ``share`` of the stressed
    syllables (peaks of the ``stress`` drive): one sine cycle of 5-9 frames, amplitude ``amp``
    times a log-normal factor (capped at 2), so head speed while speaking is heavy-tailed."""
    n = stress.shape[0]
    out = np.zeros((n, 3))
    peaks = np.flatnonzero((stress[1:-1] > 0.3) & (stress[1:-1] >= stress[:-2]) & (stress[1:-1] > stress[2:])) + 1
    t = np.arange(n, dtype=np.float64)
    for p in peaks[rng.random(peaks.size) < share]:
        d = rng.uniform(5.0, 9.0)
        s0 = p - 0.3 * d
        shape = np.sin(np.pi * np.clip((t - s0) / d, 0.0, 1.0))  # down and back up: a nod
        direction = np.array([1.0, rng.normal(0, 0.5), rng.normal(0, 0.3)])
        out += np.outer(shape, direction) * amp * min(rng.lognormal(0.0, 0.35), 2.0)
    return out


def _blinks(n: int, rng: np.random.Generator, rate_per_min: float) -> np.ndarray:
    """(n,) eyelid closure from blinks: fast close, slower open, 150-300 ms total."""
    out = np.zeros(n)
    mean_iv = 60.0 / rate_per_min
    t = rng.uniform(0, mean_iv)
    frames = np.arange(n) / FPS
    while t * FPS < n + 10:
        peak = round(t * FPS) / FPS  # closure peaks on a frame
        d = rng.uniform(0.15, 0.3)
        dc, do = 0.35 * d, 0.65 * d
        tau = frames - peak
        c = np.where(tau < 0, 0.5 * (1 + np.cos(np.pi * np.clip(tau / dc, -1, 0))),
                     0.5 * (1 + np.cos(np.pi * np.clip(tau / do, 0, 1))))
        out = np.maximum(out, c * rng.uniform(0.88, 1.0))
        # gamma-distributed intervals with a 0.4 s refractory time; 10% double blinks
        iv = 0.3 if rng.random() < 0.1 else 0.4 + rng.gamma(2.0, (mean_iv - 0.4) / 2.0)
        t += iv
    return out


def _saccades(n: int, rng: np.random.Generator, fixation_s: float) -> np.ndarray:
    """(n, 2) gaze (pitch, yaw): fixations held ~1-3 s, joined by 2-frame saccades."""
    out = np.zeros((n, 2))
    cur = np.array([rng.normal(0, 0.05), rng.normal(0, 0.1)])
    f = -int(rng.uniform(0, fixation_s) * FPS)
    while f < n:
        nxt = f + max(int(np.clip(rng.gamma(4.0, fixation_s / 4.0), 0.7, 4.0) * FPS), 3)
        out[max(f, 0):max(min(nxt, n), 0)] = cur
        if nxt < n:  # saccade: half way on the first frame
            new = cur
            while np.hypot(*(new - cur)) < 0.07:
                new = np.array([np.clip(rng.normal(0, 0.06), -0.14, 0.14), np.clip(rng.normal(0, 0.13), -0.3, 0.3)])
            out[nxt] = 0.5 * (cur + new)
            cur = new
            nxt += 1
        f = nxt
    out += 0.003 * _smooth_noise(rng, n, 2, 4)  # fixational drift
    return out


def _jitter_std(P: CorpusParams) -> np.ndarray:
    """(67,) std of the tracker-like high-frequency component per channel (eye roll stays 0)."""
    amp = np.zeros(FLAME_DIM)
    for g, a in P.jitter.items():
        amp[GROUPS[g]] = a
    amp[[EYE_L + 2, EYE_R + 2]] = 0.0
    return amp


def _finish(comp: np.ndarray, rng: np.random.Generator, speaker: Speaker, P: CorpusParams) -> np.ndarray:
    """Add the always-on behaviour (blinks, saccades, idle noise, neck, resting face, tracker
    jitter) and clip."""
    n = comp.shape[0]
    m = comp.copy()
    m[:, :50] += speaker.rest_expr
    profile = 1.0 if P.idle_expr_decay is None else 0.4 + 0.6 * np.exp(-np.arange(50) / P.idle_expr_decay)
    m[:, :50] += P.idle_expr * _idle_expression(rng, n, P) * profile
    m[:, JAW_OPEN:JAW_OPEN + 3] += 0.002 * _smooth_noise(rng, n, 3, 6)
    m[:, ROT:ROT + 3] += speaker.rest_rot + P.idle_rot * speaker.head_scale * _smooth_noise(rng, n, 3, P.idle_rot_sigma)
    # neck carries part of the head motion (trackers split it) plus its own small sway
    m[:, NECK:NECK + 3] = 0.3 * (m[:, ROT:ROT + 3] - speaker.rest_rot) + 0.008 * _smooth_noise(rng, n, 3, 15)
    # gaze: saccades + partial counter-rotation against head motion (vestibulo-ocular reflex)
    gaze = _saccades(n, rng, speaker.fixation_s)
    head = m[:, ROT:ROT + 2] - speaker.rest_rot[:2]
    for e in (EYE_L, EYE_R):
        m[:, e:e + 2] += gaze - 0.3 * head
    m[:, EYE_L + 1] += 0.01  # slight vergence
    m[:, EYE_R + 1] -= 0.01
    m[:, EYE_L + 2] = m[:, EYE_R + 2] = 0.0
    m[:, GROUPS["eyepose"]] = np.clip(m[:, GROUPS["eyepose"]], -0.45, 0.45)  # oculomotor range
    # eyelid: resting closure then blinks on top (left/right slightly different)
    base = np.clip(m[:, EYELID] + 0.02 * _smooth_noise(rng, n, 1, 15), 0.0, 0.45)  # stays below blink level
    blink = _blinks(n, rng, speaker.blink_rate)
    m[:, EYELID] = base + (1 - base) * (blink[:, None] * np.array([1.0, rng.uniform(0.95, 1.0)]))
    if P.jitter:  # tracker output: frame-to-frame estimation noise, barely smoothed
        m += _jitter_std(P) * _smooth_noise(rng, n, FLAME_DIM, P.jitter_sigma)
        m[:, GROUPS["eyepose"]] = np.clip(m[:, GROUPS["eyepose"]], -0.45, 0.45)
    m[:, :50] = np.clip(m[:, :50], -3.0, 3.0)
    m[:, JAW_OPEN] = np.clip(m[:, JAW_OPEN], 0.0, 0.35)
    return m


def _as_groups(m: np.ndarray) -> dict[str, np.ndarray]:
    return {g: m[:, s].astype(np.float32) for g, s in GROUPS.items()}


def listener_reaction(intent: str, n_frames: int, rng: np.random.Generator, partner_vad=None,
                      identity: Speaker | None = None, version: int = CORPUS_VERSION) -> dict[str, np.ndarray]:
    """One listening reaction of ``intent`` over ``n_frames`` frames, as ``{group: (T, dims)}``.

    Draw many reactions for the SAME ``partner_vad`` (``(T,)`` bool or None) to see the
    one-to-many mapping: intensity, timing, frequency and tilt/look-away direction are random;
    a share of the events (half in version 1, a fifth in version 2) is anchored near the
    partner's pauses. Includes blinks, gaze saccades, idle noise and (version 2) tracker jitter
    of ``identity`` (a fixed default speaker when None).
    """
    P = corpus_params(version)
    if intent not in STYLES:
        raise KeyError(f"unknown intent {intent!r}; valid: {', '.join(INTENTS)}")
    speaker = identity if identity is not None else default_speaker()
    if partner_vad is not None and len(partner_vad) != n_frames:
        raise ValueError(f"partner_vad has {len(partner_vad)} frames, expected {n_frames}")
    comp = _listen_component(intent, n_frames, rng, partner_vad, speaker, P)
    return _as_groups(_finish(comp, rng, speaker, P))


# ----------------------------------------------------------------------------------------------
# conversation plan and audio


@dataclass
class _Side:
    utterances: list = field(default_factory=list)  # (start_s, end_s, syllables array (k, 6))
    turns: list = field(default_factory=list)  # (start_s, end_s)


def _plan(rng: np.random.Generator, seconds: float, intents: list[list[str]], speakers: list[Speaker]) -> list[_Side]:
    """Turn-taking timeline; each utterance holds syllables (start, dur, vowel, stress, amp, f0)."""
    sides = [_Side(), _Side()]
    t = rng.uniform(0.3, 1.0)
    who = int(rng.integers(2))

    def intent_at(s, sec):
        k = min(int(sec * FPS) // WINDOW, len(intents[s]) - 1)
        return intents[s][k]

    while t < seconds - 1.0:
        end = min(t + rng.uniform(2.0, 9.0) * speakers[who].talkative, seconds - 0.3)
        u, first, last = t, None, None
        while u < end - 0.5:
            ue = min(u + rng.uniform(0.7, 2.8), end)
            syl, s = [], u
            n_syl = 0
            while True:
                st = STYLES[intent_at(who, s)]
                d = rng.uniform(0.75, 1.3) / (rng.uniform(4.0, 5.5) * st.rate)
                if s + d > ue and n_syl:
                    break
                stress = rng.random() < 0.3
                v = rng.choice(len(_VOWELS), p=_VOWEL_P)
                amp = min(rng.uniform(0.65, 0.9) * (1.15 if stress else 1.0) * st.loud, 1.0)
                pos = (s - u) / max(ue - u, 1e-3)  # declination over the utterance
                f0 = (speakers[who].f0 * st.f0 * (1.08 - 0.16 * pos)
                      * (1 + (0.12 if stress else 0.0) * st.f0_range + 0.03 * st.f0_range * rng.normal()))
                syl.append((s, d, v, stress, amp, f0))
                s += d
                n_syl += 1
            syl = np.array(syl)
            a = syl[0, 0] - 0.2 * syl[0, 1]
            b = syl[-1, 0] + 1.2 * syl[-1, 1]
            if b > seconds - 0.05:
                break
            sides[who].utterances.append((max(a, 0.0), b, syl))
            first = a if first is None else first
            last = b
            u = b + rng.uniform(0.2, 0.7)
        if first is not None:
            sides[who].turns.append((max(first, 0.0), last))
            t = last + rng.uniform(-0.25, 0.9)
        else:
            t = end + 0.3
        who = 1 - who
    return sides


_HIGHPASS = butter(2, 2500, btype="highpass", fs=SAMPLE_RATE)
_DRIVE_HOP = 16  # motion drives are accumulated at 1 kHz (40 values per motion frame)


def _glottal_table(n: int = 4096, tp: float = 0.4, tn: float = 0.16) -> np.ndarray:
    """One period of the Rosenberg glottal flow pulse (opening ``tp``, closing ``tn`` of a period)."""
    ph = (np.arange(n) + 0.5) / n
    return np.where(ph < tp, 0.5 * (1 - np.cos(np.pi * ph / tp)),
                    np.where(ph < tp + tn, np.cos(np.pi * np.clip(ph - tp, 0, tn) / (2 * tn)), 0.0))


_GLOTTAL = _glottal_table()


def _synthesize_side(side: _Side, speaker: Speaker, n_frames: int, rng: np.random.Generator):
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
            bump = _hann(bb - ba)[sa - ba:sb - ba]
            wav[sa:sb] += (amp * _LOUD[v]) * bump * voiced[v][sa - a:sb - a]
            # the same envelope on the 1 kHz drive grid
            da, db = -(-ba // _DRIVE_HOP), bb // _DRIVE_HOP
            dbump = _bump(db - da, (ba / _DRIVE_HOP) - da, (bb - ba) / _DRIVE_HOP)
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
                    cons[ca:ca + cl] += _hann(cl) * amp * rng.uniform(0.5, 1.2)
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


def _frame_mask(spans, n_frames: int) -> np.ndarray:
    """Frames covered at least half by one of the (start_s, end_s) spans."""
    m = np.zeros(n_frames, dtype=bool)
    for a, b in spans:
        fa, fb = int(round(a * FPS)), int(round(b * FPS))
        m[max(fa, 0):min(fb, n_frames)] = True
    return m


def _window_weights(n_frames: int, n_win: int, margin: int) -> np.ndarray:
    """(n_win, T) crossfade weights: smoothed window indicators that sum to 1 per frame."""
    ind = np.zeros((n_win, n_frames))
    for k in range(n_win):
        ind[k, k * WINDOW:(k + 1) * WINDOW] = 1.0
    ker = _hann(2 * margin + 1)
    w = np.stack([np.convolve(row, ker / ker.sum(), mode="same") for row in ind])
    return w / w.sum(0, keepdims=True)


def synthesize_conversation(cid: str, seconds: float = 64.0, seed: int = 0, index: int = 0,
                            speakers: list[Speaker] | None = None,
                            version: int = CORPUS_VERSION, idle_expr_rank: int | None = None) -> tuple[Conversation, dict]:
    """One conversation of corpus ``version`` (idle expression of ``idle_expr_rank`` factors when given);
    deterministic in ``(seed, index)`` (and the speakers).

    Returns the :class:`Conversation` and an info dict with the per-window ``intents`` and
    ``text_kinds`` (see :func:`caption`) per side, the speaker ids, per-side ``turns`` (seconds)
    and the per-frame ``role`` (1 = speaking turn).
    """
    P = corpus_params(version, idle_expr_rank)
    n_frames = int(round(seconds * FPS))
    if n_frames < 8:
        raise ValueError(f"seconds={seconds} is too short (need at least 8 frames)")
    rng = np.random.default_rng([seed, index])
    pool = speakers if speakers is not None else speaker_pool(seed)
    pick = rng.choice(len(pool), size=2, replace=False)
    spk = [pool[i] for i in pick]
    n_win = -(-n_frames // WINDOW)
    intents = []
    for _ in range(2):
        seq = [INTENTS[rng.integers(len(INTENTS))]]
        for _ in range(n_win - 1):
            seq.append(seq[-1] if rng.random() < 0.35 else INTENTS[rng.integers(len(INTENTS))])
        intents.append(seq)
    plan = _plan(rng, n_frames / FPS, intents, spk)

    audio, feats, vad, role = [], [], [], []
    for s in range(2):
        wav, fr = _synthesize_side(plan[s], spk[s], n_frames, rng)
        audio.append(wav)
        feats.append(fr)
        vad.append(_frame_mask([(a, b) for a, b, _ in plan[s].utterances], n_frames))
        role.append(_smooth_mask(_frame_mask(plan[s].turns, n_frames), 5))

    margin = 10
    weights = _window_weights(n_frames, n_win, margin)
    motion = np.zeros((2, n_frames, FLAME_DIM), dtype=np.float32)
    text: list[list[str]] = [[], []]
    kinds: list[list[str]] = [[], []]
    for s in range(2):
        acc = np.zeros((n_frames, FLAME_DIM))
        for k in range(n_win):
            a, b = max(k * WINDOW - margin, 0), min((k + 1) * WINDOW + margin, n_frames)
            lis = _listen_component(intents[s][k], b - a, rng, vad[1 - s][a:b], spk[s], P)
            spe = _speak_component(intents[s][k], {key: v[a:b] for key, v in feats[s].items()}, rng, spk[s], P)
            r = role[s][a:b, None]
            acc[a:b] += weights[k, a:b, None] * (r * spe + (1 - r) * lis)
            ws, we = k * WINDOW, min((k + 1) * WINDOW, n_frames)
            speaking = vad[s][ws:we].mean() > 0.5
            txt, kind = caption(intents[s][k], rng, bool(speaking), version)
            text[s].append(txt)
            kinds[s].append(kind)
        motion[s] = _finish(acc, rng, spk[s], P)

    conv = Conversation(
        id=cid, motion=motion, group_valid=np.ones((2, N_GROUPS), dtype=bool), has_motion=np.ones(2, dtype=bool),
        vad=np.stack(vad), audio=audio, text=text,
    )
    info = {"intents": intents, "text_kinds": kinds, "speakers": [p.id for p in spk],
            "turns": [plan[s].turns for s in range(2)], "role": np.stack(role)}
    return conv, info


# ----------------------------------------------------------------------------------------------
# corpus


def split_ids(n: int, test_fraction: float, seed: int) -> list[str]:
    """Split name per conversation index: a seeded random ``test_fraction`` goes to test
    (at least one when ``n >= 2`` and the fraction is > 0; at least one stays in train)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if test_fraction > 0 and n >= 2:
        n_test = max(n_test, 1)
    n_test = min(n_test, n - 1)
    order = np.random.default_rng([seed, 9_000_001]).permutation(n)
    test = set(order[:n_test].tolist())
    return ["test" if i in test else "train" for i in range(n)]


def _make_conversation(args) -> tuple[Conversation, dict]:
    i, seconds, seed, pool, version, idle_expr_rank = args
    conv, info = synthesize_conversation(f"syn{i:04d}", seconds, seed=seed, index=i, speakers=pool, version=version,
                                         idle_expr_rank=idle_expr_rank)
    info.pop("role")
    return conv, info


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the kernel kills this worker when the parent dies (Linux ``PR_SET_PDEATHSIG``),
    so a killed ``prepare_data`` leaves no synthesising processes behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def generate_corpus(out_dir, n_conversations: int = 60, seconds: float = 64.0, seed: int = 0,
                    test_fraction: float = 0.1, progress: bool = True, workers: int = 1,
                    version: int = CORPUS_VERSION, idle_expr_rank: int | None = None) -> dict:
    """Write the synthetic corpus ``version`` to ``out_dir`` in the canonical format (atomic);
    ``idle_expr_rank``: see the module docstring (None: the version's own idle expression).

    Conversations are synthesised in ``workers`` processes (the result does not depend on it)
    and written in order by this process. ``dataset.json`` records the generator settings under
    ``"synthetic"``, including ``corpus_version``. Returns the :class:`DatasetWriter` summary
    plus ``generation_seconds``, ``intent_counts``, ``text_kind_counts``, ``seed``,
    ``corpus_version`` and ``seconds_per_conversation``. Also writes ``synthetic_labels.json``
    (per conversation: intents and text kinds per side per window, speaker ids, split) into
    the dataset folder.
    """
    if n_conversations < 1:
        raise ValueError(f"n_conversations must be >= 1, got {n_conversations}")
    if seconds * FPS < WINDOW:
        raise ValueError(f"seconds={seconds} gives fewer than {WINDOW} frames (one window); use >= {WINDOW / FPS:g}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    corpus_params(version, idle_expr_rank)  # a clear error for an unknown version or a bad rank, before any work
    check_output_folder(out_dir)  # refuse a folder that is not this project's dataset before synthesising anything
    t0 = time.perf_counter()
    splits = split_ids(n_conversations, test_fraction, seed)
    pool = speaker_pool(seed)
    labels, counts, kind_counts = {}, {k: 0 for k in INTENTS}, {k: 0 for k in TEXT_KINDS}
    jobs = [(i, seconds, seed, pool, version, idle_expr_rank) for i in range(n_conversations)]
    meta = {"synthetic": {"corpus_version": version, "seed": seed, "n_conversations": n_conversations,
                          "seconds": seconds, "test_fraction": test_fraction, "intents": list(INTENTS)}}
    if idle_expr_rank is not None:  # recorded only when set: the default corpus' dataset.json is unchanged
        meta["synthetic"]["idle_expr_rank"] = idle_expr_rank
    executor = (ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),))
                if workers > 1 and n_conversations > 1 else None)
    try:
        results = executor.map(_make_conversation, jobs) if executor else map(_make_conversation, jobs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=n_conversations, desc="synthetic conversations", unit="conv")
        with DatasetWriter(out_dir, source="synthetic", extra_meta=meta) as w:
            for i, (conv, info) in enumerate(results):
                w.add(conv, splits[i])
                labels[conv.id] = {"intents": info["intents"], "text_kinds": info["text_kinds"],
                                   "speakers": info["speakers"], "split": splits[i]}
                for side, side_kinds in zip(info["intents"], info["text_kinds"]):
                    for k, kind in zip(side, side_kinds):
                        counts[k] += 1
                        kind_counts[kind] += 1
            with open(w.tmp / "synthetic_labels.json", "w") as f:
                json.dump(labels, f)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    summary = w.summary()
    summary.update(generation_seconds=time.perf_counter() - t0, intent_counts=counts, text_kind_counts=kind_counts,
                   seed=seed, corpus_version=version, seconds_per_conversation=seconds, workers=workers,
                   path=str(Path(out_dir)))
    return summary
