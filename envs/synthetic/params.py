"""The synthetic faces' layout (what the leading expression channels mean), the intents and how each
shows in the face, and the corpus versions' parameters."""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import numpy as np

from ..flame import GROUPS

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
SPEECH_BASIS = np.random.default_rng([20260325, 101]).standard_normal((3, 50))  # (3, 50)


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


@cache
def texture(version: int) -> dict[str, np.ndarray]:
    p = corpus_params(version)
    return _texture_table(p.texture_amp, p.texture_decay)


