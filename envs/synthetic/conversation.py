"""One conversation: the turn-taking plan, both sides' audio and motion crossfaded window by window."""
from __future__ import annotations

import numpy as np

from ..dataset import WINDOW, Conversation
from ..flame import FLAME_DIM, FPS, N_GROUPS
from .captions import caption
from .motion import finish, listen_component, speak_component
from .params import CORPUS_VERSION, INTENTS, STYLES, corpus_params
from .signals import hann, smooth_mask
from .voice import VOWEL_P, VOWELS, Side, Speaker, speaker_pool, synthesize_side


def plan_turns(rng: np.random.Generator, seconds: float, intents: list[list[str]], speakers: list[Speaker]) -> list[Side]:
    """Turn-taking timeline; each utterance holds syllables (start, dur, vowel, stress, amp, f0)."""
    sides = [Side(), Side()]
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
                v = rng.choice(len(VOWELS), p=VOWEL_P)
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


def frame_mask(spans, n_frames: int) -> np.ndarray:
    """Frames covered at least half by one of the (start_s, end_s) spans."""
    m = np.zeros(n_frames, dtype=bool)
    for a, b in spans:
        fa, fb = int(round(a * FPS)), int(round(b * FPS))
        m[max(fa, 0):min(fb, n_frames)] = True
    return m


def window_weights(n_frames: int, n_win: int, margin: int) -> np.ndarray:
    """(n_win, T) crossfade weights: smoothed window indicators that sum to 1 per frame."""
    ind = np.zeros((n_win, n_frames))
    for k in range(n_win):
        ind[k, k * WINDOW:(k + 1) * WINDOW] = 1.0
    ker = hann(2 * margin + 1)
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
    plan = plan_turns(rng, n_frames / FPS, intents, spk)

    audio, feats, vad, role = [], [], [], []
    for s in range(2):
        wav, fr = synthesize_side(plan[s], spk[s], n_frames, rng)
        audio.append(wav)
        feats.append(fr)
        vad.append(frame_mask([(a, b) for a, b, _ in plan[s].utterances], n_frames))
        role.append(smooth_mask(frame_mask(plan[s].turns, n_frames), 5))

    margin = 10
    weights = window_weights(n_frames, n_win, margin)
    motion = np.zeros((2, n_frames, FLAME_DIM), dtype=np.float32)
    text: list[list[str]] = [[], []]
    kinds: list[list[str]] = [[], []]
    for s in range(2):
        acc = np.zeros((n_frames, FLAME_DIM))
        for k in range(n_win):
            a, b = max(k * WINDOW - margin, 0), min((k + 1) * WINDOW + margin, n_frames)
            lis = listen_component(intents[s][k], b - a, rng, vad[1 - s][a:b], spk[s], P)
            spe = speak_component(intents[s][k], {key: v[a:b] for key, v in feats[s].items()}, rng, spk[s], P)
            r = role[s][a:b, None]
            acc[a:b] += weights[k, a:b, None] * (r * spe + (1 - r) * lis)
            ws, we = k * WINDOW, min((k + 1) * WINDOW, n_frames)
            speaking = vad[s][ws:we].mean() > 0.5
            txt, kind = caption(intents[s][k], rng, bool(speaking), version)
            text[s].append(txt)
            kinds[s].append(kind)
        motion[s] = finish(acc, rng, spk[s], P)

    conv = Conversation(
        id=cid, motion=motion, group_valid=np.ones((2, N_GROUPS), dtype=bool), has_motion=np.ones(2, dtype=bool),
        vad=np.stack(vad), audio=audio, text=text,
    )
    info = {"intents": intents, "text_kinds": kinds, "speakers": [p.id for p in spk],
            "turns": [plan[s].turns for s in range(2)], "role": np.stack(role)}
    return conv, info


