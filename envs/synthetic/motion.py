"""Motion components, ``(n, 67)`` arrays in raw FLAME units: listening reactions, speaking behaviour,
blinks, saccades, idle motion and the tracker-like jitter."""
from __future__ import annotations

import numpy as np

from ..flame import FLAME_DIM, FPS, GROUPS
from .params import (
    CORPUS_VERSION,
    EX_BROW_ONE,
    EX_BROW_UP,
    EX_FROWN,
    EX_MOUTH_OPEN,
    EX_ROUND,
    EX_SMILE,
    EX_SQUINT,
    EX_STRETCH,
    EYE_L,
    EYE_R,
    EYELID,
    IDLE_MIX_SEED,
    INTENTS,
    JAW_OPEN,
    N_SEMANTIC,
    NECK,
    ROT,
    SPEECH_BASIS,
    STYLES,
    CorpusParams,
    corpus_params,
    texture,
)
from .signals import bump, onsets, smooth_noise
from .voice import Speaker, default_speaker

# motion components: (n, 67) arrays; eyelid channels hold the *resting* closure (blinks added last)


def _add_expr(m: np.ndarray, intent: str, gain: np.ndarray | float, speaker: Speaker, P: CorpusParams) -> None:
    """Add the intent's expression levels (channels 0..9) and texture (10..49) times ``gain``."""
    st = STYLES[intent]
    for ch, lv in st.expr.items():
        m[:, ch] += lv * gain * speaker.expr_scale * P.expr_gain
    m[:, N_SEMANTIC:50] += np.outer(np.broadcast_to(gain, (m.shape[0],)), texture(P.version)[intent])


def listen_component(intent: str, n: int, rng: np.random.Generator, partner_vad, speaker: Speaker,
                      P: CorpusParams) -> np.ndarray:
    """Intent-driven listening behaviour for ``n`` frames (no blinks/saccades/idle noise)."""
    st = STYLES[intent]
    m = np.zeros((n, FLAME_DIM))
    amp = rng.uniform(0.6, 1.4)  # intensity of this reaction
    drift = 1 + 0.2 * smooth_noise(rng, n, 1, 30)[:, 0]
    _add_expr(m, intent, amp * drift, speaker, P)
    m[:, EYELID] += st.eyelid * rng.uniform(0.7, 1.3)
    sign = rng.choice([-1.0, 1.0])
    head = np.array(st.head) * rng.uniform(0.6, 1.4) * np.array([1.0, sign, sign]) * P.head_offset
    m[:, ROT:ROT + 3] += head * (1 + 0.15 * smooth_noise(rng, n, 1, 40))
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
            s0 = onsets(rng, 1, n, cyc / f, partner_vad, P.anchor_share)[0]
            tau = (t - s0) * f
            on = (tau > 0) & (tau < cyc)
            m[:, ROT] += np.where(on, 0.5 * (1 - np.cos(2 * np.pi * tau)), 0) * rng.uniform(0.04, 0.11) * amp * hs
    elif intent == "sad":  # slow head shake, head low
        for _ in range(rng.integers(1, 3)):
            f = rng.uniform(0.6, 1.1) / FPS
            cyc = rng.integers(2, 4)
            s0 = onsets(rng, 1, n, cyc / f, partner_vad, P.anchor_share)[0]
            m[:, ROT + 1] += (np.sin(2 * np.pi * (t - s0) * f) * bump(n, s0, cyc / f)
                              * rng.uniform(0.05, 0.13) * amp * hs)
    elif intent == "attentive":  # still; at most a couple of tiny nods
        for _ in range(rng.integers(0, 3)):
            f = rng.uniform(1.2, 1.8) / FPS
            s0 = onsets(rng, 1, n, 1 / f, partner_vad, P.anchor_share)[0]
            m[:, ROT] += bump(n, s0, 1 / f) * rng.uniform(0.01, 0.025)
    elif intent == "skeptical":  # tilt accents and extra brow raises
        for _ in range(rng.integers(1, 3)):
            d = rng.uniform(1.0, 2.2) * FPS
            s0 = onsets(rng, 1, n, d, partner_vad, P.anchor_share)[0]
            b = bump(n, s0, d)
            m[:, ROT + 2] += sign * b * rng.uniform(0.03, 0.07) * hs
            m[:, EX_BROW_ONE] += b * rng.uniform(0.3, 0.7)
            m[:, EX_BROW_UP] += b * rng.uniform(0.1, 0.4)
    elif intent == "amused":  # laughter bursts: ha-ha jaw modulation, big smile, head back
        for _ in range(rng.integers(1, 4)):
            d = rng.uniform(1.0, 2.5) * FPS
            s0 = onsets(rng, 1, n, d, partner_vad, P.anchor_share)[0]
            e = bump(n, s0, d)
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
            s0 = onsets(rng, 1, n, d, partner_vad, P.anchor_share)[0]
            b = bump(n, s0, d)
            m[:, ROT + 1] += rng.choice([-1, 1]) * b * rng.uniform(0.02, 0.05) * hs
            m[:, EX_FROWN] += b * rng.uniform(0.3, 0.7)
            m[:, EX_SQUINT] += b * rng.uniform(0.2, 0.4)
    elif intent == "bored":  # slow look shifts and sighs with heavy lids
        for _ in range(rng.integers(1, 3)):
            d = rng.uniform(1.5, 3.0) * FPS
            s0 = onsets(rng, 1, n, d, partner_vad, P.anchor_share)[0]
            b = bump(n, s0, d)
            m[:, [EYE_L + 1, EYE_R + 1]] += (sign * b * rng.uniform(0.04, 0.08))[:, None]
            m[:, ROT] += -0.04 * b * hs + 0.04 * bump(n, s0 + 0.4 * d, 0.6 * d) * hs
            m[:, EYELID] += (b * 0.12)[:, None]
    if P.listen_jaw:  # lips part and close, swallowing: the jaw is never perfectly still
        m[:, JAW_OPEN:JAW_OPEN + 3] += P.listen_jaw * smooth_noise(rng, n, 3, 6) * np.array([1.0, 0.5, 0.5])
    return m


def speak_component(intent: str, feats: dict, rng: np.random.Generator, speaker: Speaker,
                     P: CorpusParams) -> np.ndarray:
    """Speaking behaviour for the frames of ``feats`` (per-frame drives from the own audio)."""
    st = STYLES[intent]
    n = feats["open"].shape[0]
    m = np.zeros((n, FLAME_DIM))
    amp = rng.uniform(0.6, 1.2)
    _add_expr(m, intent, 0.6 * amp * (1 + 0.15 * smooth_noise(rng, n, 1, 30)[:, 0]), speaker, P)
    jaw = 0.22 * st.jaw * feats["open"]
    m[:, JAW_OPEN] += P.jaw_rest + jaw
    m[:, JAW_OPEN + 1:JAW_OPEN + 3] += 0.01 * smooth_noise(rng, n, 2, 3) * feats["env"][:, None]
    m[:, EX_MOUTH_OPEN] += 4.0 * jaw
    m[:, EX_ROUND] += 1.2 * feats["round"]
    m[:, EX_STRETCH] += 0.9 * feats["stretch"]
    if P.speech_mix:  # the tracker's expression basis mixes mouth movement into every channel
        drives = np.stack([feats["open"], feats["round"], feats["stretch"]], 1)  # (n, 3)
        m[:, :50] += P.speech_mix * drives @ SPEECH_BASIS  # (n, 50)
    m[:, EX_BROW_UP] += 0.5 * st.head_motion * feats["stress"]
    hm = st.head_motion * speaker.head_scale
    if P.beat_share is None:  # head beats on stressed syllables
        m[:, ROT] += P.speak_beat * hm * feats["stress"]
    else:
        m[:, ROT:ROT + 3] += hm * _sparse_beats(feats["stress"], rng, P.speak_beat, P.beat_share)
    m[:, ROT:ROT + 3] += P.speak_head_noise * hm * smooth_noise(rng, n, 3, P.speak_head_sigma) * np.array([1.0, 1.2, 0.6])
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
    out += 0.003 * smooth_noise(rng, n, 2, 4)  # fixational drift
    return out


def _jitter_std(P: CorpusParams) -> np.ndarray:
    """(67,) std of the tracker-like high-frequency component per channel (eye roll stays 0)."""
    amp = np.zeros(FLAME_DIM)
    for g, a in P.jitter.items():
        amp[GROUPS[g]] = a
    amp[[EYE_L + 2, EYE_R + 2]] = 0.0
    return amp


def finish(comp: np.ndarray, rng: np.random.Generator, speaker: Speaker, P: CorpusParams) -> np.ndarray:
    """Add the always-on behaviour (blinks, saccades, idle noise, neck, resting face, tracker
    jitter) and clip."""
    n = comp.shape[0]
    m = comp.copy()
    m[:, :50] += speaker.rest_expr
    profile = 1.0 if P.idle_expr_decay is None else 0.4 + 0.6 * np.exp(-np.arange(50) / P.idle_expr_decay)
    m[:, :50] += P.idle_expr * idle_expression(rng, n, P) * profile
    m[:, JAW_OPEN:JAW_OPEN + 3] += 0.002 * smooth_noise(rng, n, 3, 6)
    m[:, ROT:ROT + 3] += speaker.rest_rot + P.idle_rot * speaker.head_scale * smooth_noise(rng, n, 3, P.idle_rot_sigma)
    # neck carries part of the head motion (trackers split it) plus its own small sway
    m[:, NECK:NECK + 3] = 0.3 * (m[:, ROT:ROT + 3] - speaker.rest_rot) + 0.008 * smooth_noise(rng, n, 3, 15)
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
    base = np.clip(m[:, EYELID] + 0.02 * smooth_noise(rng, n, 1, 15), 0.0, 0.45)  # stays below blink level
    blink = _blinks(n, rng, speaker.blink_rate)
    m[:, EYELID] = base + (1 - base) * (blink[:, None] * np.array([1.0, rng.uniform(0.95, 1.0)]))
    if P.jitter:  # tracker output: frame-to-frame estimation noise, barely smoothed
        m += _jitter_std(P) * smooth_noise(rng, n, FLAME_DIM, P.jitter_sigma)
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
    comp = listen_component(intent, n_frames, rng, partner_vad, speaker, P)
    return _as_groups(finish(comp, rng, speaker, P))


def idle_expression(rng: np.random.Generator, n: int, P: CorpusParams) -> np.ndarray:
    """``(n, 50)`` idle expression of unit std per channel: independent smooth noise per channel, or
    ``P.idle_expr_rank`` smooth factors through a fixed unit-norm mixing (rows of the mixing: factors)."""
    if P.idle_expr_rank is None:
        return smooth_noise(rng, n, 50, P.idle_expr_sigma)
    mix = np.random.default_rng(IDLE_MIX_SEED).standard_normal((P.idle_expr_rank, 50))
    mix /= np.linalg.norm(mix, axis=0, keepdims=True)  # every channel: a unit-norm combination of the factors
    return smooth_noise(rng, n, P.idle_expr_rank, P.idle_expr_sigma) @ mix
