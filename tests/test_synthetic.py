"""Properties of the synthetic dyadic corpus (envs/synthetic/), version 2 (the default) and,
where the property is new in version 2, version 1 as the corpus that lacks it.

Every property is checked with a threshold that a corpus lacking it would fail, and the measured
figure is printed (run with ``pytest -s`` to see them).
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from gdpo_listener.envs import reference_stats as rs
from gdpo_listener.envs.dataset import (
    SAMPLES_PER_FRAME,
    DyadicWindows,
    load_conversation,
    read_split,
)
from gdpo_listener.envs.flame import FPS, GROUP_NAMES, GROUPS
from gdpo_listener.envs.synthetic import (
    EX_BROW_ONE,
    EX_FROWN,
    EX_LIP_DOWN,
    EX_PRESS,
    EX_SMILE,
    EX_SQUINT,
    INTENT_WORDS,
    INTENTS,
    JAW_OPEN,
    TEXT_KINDS,
    VAGUE_TEXTS,
    corpus_params,
    generate_corpus,
    listener_reaction,
    speaker_pool,
    synthesize_conversation,
)

N_CONV, SECONDS = 4, 32.0
N_STATS_CONV = 8  # conversations of 64 s for the corpus statistics (both versions, in memory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "ds"
    summary = generate_corpus(root, n_conversations=N_CONV, seconds=SECONDS, seed=0, progress=False)
    labels = json.loads((root / "synthetic_labels.json").read_text())
    convs = [load_conversation(root, cid) for cid in sorted(labels)]
    return root, summary, labels, convs


@pytest.fixture(scope="module")
def stats():
    """Reference statistics of a small corpus of each version: {version: corpus_statistics}."""
    out = {}
    for version in (1, 2):
        pool = speaker_pool(0)
        convs = [synthesize_conversation(f"c{i}", 64.0, seed=0, index=i, speakers=pool, version=version)[0]
                 for i in range(N_STATS_CONV)]
        out[version] = rs.corpus_statistics(convs)
    return out


def frame_rms(wav: np.ndarray, n_frames: int) -> np.ndarray:
    w = np.asarray(wav[: n_frames * SAMPLES_PER_FRAME], dtype=np.float64).reshape(n_frames, SAMPLES_PER_FRAME)
    return np.sqrt((w**2).mean(1))


def role_masks(conv, s):
    vad = conv.vad
    return vad[s], vad[1 - s] & ~vad[s]


# ----------------------------------------------------------------------------------------------
# corpus layout


def test_summary_and_split(corpus):
    _, summary, _, convs = corpus
    assert summary["conversations"] == N_CONV and summary["train"] + summary["test"] == N_CONV
    assert summary["test"] >= 1 and summary["train"] >= 1
    assert abs(summary["hours"] - N_CONV * SECONDS / 3600) < 1e-3
    print(f"\nspeaking share {summary['speaking_share']:.3f} listening share {summary['listening_share']:.3f}")
    # turn-taking: both roles are well represented
    assert 0.25 < summary["speaking_share"] < 0.6 and 0.25 < summary["listening_share"] < 0.6
    for conv in convs:
        conv.validate()
        assert conv.has_motion.all() and conv.group_valid.all()
        assert len(conv.text[0]) == len(conv.text[1]) == int(SECONDS * FPS) // 200
        # each side speaks somewhere, and overlap is rare
        assert conv.vad[0].mean() > 0.1 and conv.vad[1].mean() > 0.1
        assert (conv.vad[0] & conv.vad[1]).mean() < 0.05


def test_dyadic_windows_reads_both_roles(corpus):
    root = corpus[0]
    ds = DyadicWindows(root, "train")
    n_train = len(read_split(root, "train"))
    assert len(ds) == n_train * 2 * (int(SECONDS * FPS) // 200)
    assert {ix.actor for ix in ds.index} == {0, 1}
    items = {(ix.conversation, ix.actor, ix.window): i for i, ix in enumerate(ds.index)}
    cid = ds.index[0].conversation
    a, b = ds[items[(cid, 0, 0)]], ds[items[(cid, 1, 0)]]
    assert a["actor_motion"].shape == (200, 67) and a["actor_audio"].shape == (200 * SAMPLES_PER_FRAME,)
    np.testing.assert_array_equal(a["actor_motion"], b["partner_motion"])
    np.testing.assert_array_equal(a["partner_audio"], b["actor_audio"])
    np.testing.assert_array_equal(a["actor_vad"], b["partner_vad"])
    sp = sum(int(ds[i]["speaking"].sum()) for i in range(len(ds)))
    li = sum(int(ds[i]["listening"].sum()) for i in range(len(ds)))
    assert sp > 0 and li > 0
    # each window carries its own text of the conversation (possibly empty in version 2)
    for i in range(len(ds)):
        ix = ds.index[i]
        assert ds[i]["text"] == ds.conversation(ix.conversation).text[ix.actor][ix.window]
    assert sum(bool(ds[i]["text"]) for i in range(len(ds))) > 0.6 * len(ds)


# ----------------------------------------------------------------------------------------------
# statistics against real tracker FLAME (envs/reference_stats.py)


def test_statistics_convention_reproduces_the_issue_figures_of_version_1(stats):
    """The statistic is the one the reference was measured with: on corpus version 1 it gives
    the figures issue 10 reports for version 1 (to within 25 % on this small corpus)."""
    st = stats[1]
    for g, ref in rs.SYNTHETIC_V1.items():
        for fig, val in ref.items():
            got = st["groups"][g][fig]
            assert val / 1.25 <= got <= val * 1.25, (g, fig, got, val)
    assert rs.SYNTHETIC_V1_PARTNER_TIE * 1.4 <= st["partner_tie"] <= rs.SYNTHETIC_V1_PARTNER_TIE / 1.4


def test_version_2_statistics_match_the_real_reference(stats):
    print("\n" + rs.format_table(stats[2]))
    rows = rs.compare(stats[2])
    assert len(rows) == len(rs.FIGURES) * len(rs.REFERENCE) == 12
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    # version 1 is far from it (expr dynamics ~20x too small): the check can fail
    assert sum(not r["ok"] for r in rs.compare(stats[1])) >= 6
    # groups without a reference have plausible values: they move, more slowly than the eyelid's blinks
    g = stats[2]["groups"]
    assert 2e-4 < g["neck"]["listen_vel"] < g["rot"]["listen_vel"]
    assert 1e-3 < g["eyepose"]["listen_vel"] < 0.03 and 0.02 < g["eyelid"]["listen_vel"] < 0.2


def all_channels_active(st) -> bool:
    """Every block of ten expression channels in the real DualTalk ranges (no decay)."""
    return all(lo <= v <= hi for kind, (lo, hi) in rs.REFERENCE_EXPR_BLOCKS.items() for v in st["expr_blocks"][kind])


def test_all_expression_channels_are_active(stats):
    blocks = stats[2]["expr_blocks"]
    print(f"\nexpr blocks of 10 channels: position std {np.round(blocks['position'], 3)}, "
          f"velocity std {np.round(blocks['velocity'], 3)} (version 1: {np.round(stats[1]['expr_blocks']['position'], 3)})")
    assert all_channels_active(stats[2])
    assert not all_channels_active(stats[1])
    # no decay over the channel index: the last block moves as much as the first (within 30 %)
    for kind in ("position", "velocity"):
        assert blocks[kind][-1] > 0.7 * blocks[kind][0], kind


def test_every_expression_channel_moves_with_tracker_jitter():
    conv, _ = synthesize_conversation("x", 32.0, seed=5, index=0)
    x = conv.motion[0][:, GROUPS["expr"]].astype(np.float64)  # (T, 50)
    pos, vel = x.std(0), np.diff(x, axis=0).std(0)
    # high-frequency component: the second difference is large against the first (a smooth
    # signal has acc/vel ~ 0.2-0.5 at 25 fps; white noise ~ 1.7)
    acc = np.diff(x, n=2, axis=0).std(0)
    print(f"\nper-channel expr std: position [{pos.min():.3f}, {pos.max():.3f}], velocity [{vel.min():.3f}, "
          f"{vel.max():.3f}]; acceleration / velocity std median {np.median(acc / vel):.2f}")
    assert pos.min() > 0.2 and vel.min() > 0.07
    assert np.median(acc / vel) > 0.9
    v1, _ = synthesize_conversation("x", 32.0, seed=5, index=0, version=1)
    y = v1.motion[0][:, GROUPS["expr"]].astype(np.float64)
    assert np.median(np.diff(y, n=2, axis=0).std(0) / np.diff(y, axis=0).std(0)) < 0.9


def test_partner_audio_tie_is_weak(stats):
    """Real listener motion is only weakly tied to the partner's voice (issue 10: correlation of
    the partner's VAD with the own head speed about -0.07 on real data, -0.15 in version 1)."""
    r2, r1 = stats[2]["partner_tie"], stats[1]["partner_tie"]
    print(f"\npartner VAD vs own head speed: version 2 {r2:.3f}, version 1 {r1:.3f}, real {rs.REFERENCE_PARTNER_TIE}")
    assert -0.12 < r2 < 0.0
    assert r1 < -0.12
    assert corpus_params(2).anchor_share < corpus_params(1).anchor_share


# ----------------------------------------------------------------------------------------------
# speaking: jaw follows the own audio


def test_jaw_follows_own_audio_envelope(corpus):
    _, _, _, convs = corpus
    jaw, own, other = [], [], []
    for conv in convs:
        for s in range(2):
            sp = conv.vad[s]
            jaw.append(conv.motion[s, sp, JAW_OPEN])
            own.append(frame_rms(conv.audio[s], conv.n_frames)[sp])
            other.append(frame_rms(conv.audio[1 - s], conv.n_frames)[sp])
    jaw, own, other = map(np.concatenate, (jaw, own, other))
    r_own = np.corrcoef(jaw, own)[0, 1]
    r_other = np.corrcoef(jaw, other)[0, 1]
    print(f"\njaw opening vs own audio RMS (25 fps, speaking frames): r = {r_own:.3f}; vs partner audio: r = {r_other:.3f}")
    assert r_own > 0.7  # audio -> jaw stays learnable
    assert abs(r_other) < 0.3
    # the mouth opens in realistic ranges while speaking and rests nearly closed otherwise
    assert 0.05 < np.percentile(jaw, 90) < 0.3
    rest = np.concatenate([c.motion[s, ~c.vad[s] & ~c.vad[1 - s], JAW_OPEN] for c in convs for s in range(2)])
    assert np.median(rest) < 0.03


def test_speaking_has_head_motion_and_expressions(corpus):
    _, _, _, convs = corpus
    rot_std, brow_std = [], []
    for conv in convs:
        for s in range(2):
            sp = conv.vad[s]
            rot_std.append(conv.motion[s, sp][:, GROUPS["rot"]].std(0).mean())
            brow_std.append(conv.motion[s, sp][:, :10].std(0).mean())
    print(f"\nspeaking frames: head rotation std {np.mean(rot_std):.4f} rad, expr[0:10] std {np.mean(brow_std):.3f}")
    assert 0.005 < np.mean(rot_std) < 0.1
    assert np.mean(brow_std) > 0.1


def test_audio_is_voiced_at_speaker_f0(corpus):
    """Autocorrelation pitch of voiced frames is near the speaker's f0 (source-filter audio)."""
    _, _, labels, convs = corpus
    pool = {p.id: p for p in speaker_pool(0)}
    errs = []
    for conv in convs[:2]:
        for s in range(2):
            f0 = pool[labels[conv.id]["speakers"][s]].f0
            rms = frame_rms(conv.audio[s], conv.n_frames)
            frames = np.flatnonzero(conv.vad[s] & (rms > np.percentile(rms[conv.vad[s]], 60)))[:40]
            est = []
            for f in frames:
                x = conv.audio[s][f * SAMPLES_PER_FRAME:(f + 1) * SAMPLES_PER_FRAME].astype(np.float64)
                x = x - x.mean()
                ac = np.correlate(x, x, "full")[len(x) - 1:]
                lo, hi = 16000 // 400, 16000 // 60
                est.append(16000 / (lo + np.argmax(ac[lo:hi])))
            errs.append(np.median(est) / f0)
    print(f"\nestimated pitch / speaker f0 per side: {np.round(errs, 3)}")
    assert all(0.75 < e < 1.35 for e in errs)


# ----------------------------------------------------------------------------------------------
# listening: one-to-many


def _partner_context():
    conv, _ = synthesize_conversation("ctx", 16.0, seed=3, index=0)
    return conv.vad[1][:200]


def test_listening_is_one_to_many_and_mean_is_static():
    pvad = _partner_context()
    rng = np.random.default_rng(0)
    draws = {k: [listener_reaction(k, 200, rng, partner_vad=pvad) for _ in range(40)] for k in INTENTS}
    all_draws = [d for v in draws.values() for d in v]
    ratios = {}
    for g in ("rot", "expr"):
        x = np.stack([d[g] for d in all_draws]).astype(np.float64)  # (D, T, C)
        ratios[g] = x.mean(0).std(0).mean() / x.std(1).mean()
    # a corpus without the property: the same reaction every time (same rng state) -> ratio 1
    same = np.stack([listener_reaction("joyful", 200, np.random.default_rng(5), pvad)["rot"] for _ in range(10)])
    ratio_same = same.mean(0).std(0).mean() / same.std(1).mean()
    print(f"\nstd_t(mean over {len(all_draws)} draws) / mean std_t(single draw): "
          f"rot {ratios['rot']:.3f}, expr {ratios['expr']:.3f} (one fixed reaction: {ratio_same:.3f})")
    assert ratios["rot"] < 0.3 and ratios["expr"] < 0.3
    assert ratio_same > 0.99

    # the intents are distinct behaviours: nearest-centroid classification from simple features
    def feats(d):
        e, r = d["expr"], d["rot"]
        return np.r_[e[:, [EX_SMILE, EX_FROWN, EX_SQUINT, EX_LIP_DOWN, EX_PRESS, EX_BROW_ONE]].mean(0),
                     np.abs(r.mean(0)[1:]) * 10, np.diff(r, axis=0).std(0) * 100, d["jaw"][:, 0].std() * 50]

    F = {k: np.stack([feats(d) for d in v]) for k, v in draws.items()}
    cent = {k: f[:20].mean(0) for k, f in F.items()}
    correct = total = 0
    for k, f in F.items():
        for row in f[20:]:
            pred = min(cent, key=lambda c: np.linalg.norm(row - cent[c]))
            correct += pred == k
            total += 1
    acc = correct / total
    print(f"intent classification accuracy from reaction features ({len(INTENTS)} intents): {acc:.3f}")
    assert len(INTENTS) >= 5 and acc > 0.8


def test_reaction_timing_depends_weakly_on_partner():
    """Events cluster near the partner's pauses but a single intent still varies draw to draw."""
    pvad = _partner_context()
    ends = np.flatnonzero(pvad[:-1] & ~pvad[1:]) + 1
    assert ends.size
    rng = np.random.default_rng(1)
    x = np.stack([listener_reaction("joyful", 200, rng, partner_vad=pvad)["rot"][:, 0] for _ in range(200)])
    act = np.abs(np.diff(x, axis=1)).mean(0)  # nod activity per frame
    near = np.zeros(199, bool)
    for e in ends:
        near[max(e - 12, 0):e + 12] = True
    lift = act[near].mean() / act[~near].mean()
    r = np.stack([listener_reaction("joyful", 200, rng, partner_vad=pvad)["rot"] for _ in range(60)])
    ratio = r.mean(0).std(0).mean() / r.std(1).mean()
    print(f"\nnod activity near partner pauses / elsewhere: {lift:.2f}; single-intent mean/single std ratio {ratio:.3f}")
    assert lift > 1.1
    assert ratio < 0.5


# ----------------------------------------------------------------------------------------------
# blinks, gaze, ranges, smoothness


def _blinks(el, thr=0.6):
    up = (el[1:] > thr) & (el[:-1] <= thr)
    return np.flatnonzero(up) + 1


def test_blinks_and_saccades_in_all_roles(corpus):
    _, _, _, convs = corpus
    counts = {"speaking": [0, 0, 0], "listening": [0, 0, 0]}  # blinks, saccades, frames
    closed = []
    for conv in convs:
        for s in range(2):
            sp, li = role_masks(conv, s)
            el = conv.motion[s, :, GROUPS["eyelid"]].mean(1)
            b = _blinks(el)
            eye = conv.motion[s, :, GROUPS["eyepose"].start:GROUPS["eyepose"].start + 2]
            vel = np.linalg.norm(np.diff(eye, axis=0), axis=1)
            sac = np.flatnonzero((vel[1:] > 0.02) & (vel[:-1] <= 0.02)) + 1
            for role, m in (("speaking", sp), ("listening", li)):
                counts[role][0] += int(m[b].sum())
                counts[role][1] += int(m[sac].sum())
                counts[role][2] += int(m.sum())
            runs = np.diff(np.flatnonzero(np.diff(np.r_[0, el > 0.5, 0])))[::2]
            closed += list(runs)
    figures = {}
    for role, (nb, ns, nf) in counts.items():
        minutes = nf / FPS / 60
        figures[role] = (nb / minutes, ns / minutes)
    dur_ms = np.median(closed) * 1000 / FPS
    print("\n" + "; ".join(f"{r}: {b:.1f} blinks/min, {s:.1f} saccades/min" for r, (b, s) in figures.items())
          + f"; median closure (eyelid > 0.5) {dur_ms:.0f} ms")
    for role, (b, s) in figures.items():
        assert 8 <= b <= 30, role
        assert 15 <= s <= 60, role
    assert 40 <= dur_ms <= 300
    # fixations dominate: the eye is still on most frames
    eye = np.concatenate([np.diff(c.motion[s, :, 58:60], axis=0) for c in convs for s in range(2)])
    assert (np.linalg.norm(eye, axis=1) < 0.01).mean() > 0.8


def test_realistic_ranges_smoothness_and_motion(corpus):
    _, _, _, convs = corpus
    m = np.concatenate([c.motion[s] for c in convs for s in range(2)]).astype(np.float64)
    expr, jaw, rot, lid = m[:, GROUPS["expr"]], m[:, JAW_OPEN], m[:, GROUPS["rot"]], m[:, GROUPS["eyelid"]]
    print(f"\n|expr| p99.9 {np.percentile(np.abs(expr), 99.9):.2f}; jaw [{jaw.min():.3f}, {jaw.max():.3f}]; "
          f"|rot| max {np.abs(rot).max():.3f}; eyelid [{lid.min():.2f}, {lid.max():.2f}]; "
          f"|eyepose| max {np.abs(m[:, GROUPS['eyepose']]).max():.3f}")
    assert np.abs(expr).max() <= 3.0 and np.percentile(np.abs(expr), 99.9) < 2.5
    assert 0.0 <= jaw.min() and jaw.max() <= 0.35
    assert (jaw <= 0.0).mean() < 0.05  # the clip at a closed jaw is rarely reached
    assert np.percentile(np.abs(rot), 99.9) < 0.3 and np.abs(rot).max() < 0.6
    assert lid.min() >= 0.0 and lid.max() <= 1.0
    assert np.abs(m[:, GROUPS["eyepose"]]).max() < 0.5
    assert np.abs(m[:, GROUPS["neck"]]).max() < 0.2
    line = []
    for g in GROUP_NAMES:
        x = m[:, GROUPS[g]]
        sd = x.std(0)
        live = sd > 1e-6
        xc = x[:, live] - x[:, live].mean(0)
        ac1 = np.median((xc[1:] * xc[:-1]).sum(0) / (xc**2).sum(0))  # white noise ~ 0
        line.append(f"{g}: std {sd.mean():.4f} lag-1 autocorr {ac1:.3f}")
        assert sd.mean() > 1e-3, g  # every group moves
        assert ac1 > 0.7, g  # smooth, not white noise
    print("; ".join(line))


# ----------------------------------------------------------------------------------------------
# text


def test_texts_are_varied_and_name_the_intent(corpus):
    _, _, labels, convs = corpus
    texts, intents = [], []
    for conv in convs:
        for s in range(2):  # the full captions of the corpus (vague and missing ones are tested below)
            kinds = labels[conv.id]["text_kinds"][s]
            texts += [t for t, kind in zip(conv.text[s], kinds) if kind == "full"]
            intents += [k for k, kind in zip(labels[conv.id]["intents"][s], kinds) if kind == "full"]
    assert len(texts) >= 16
    rng = np.random.default_rng(0)
    from gdpo_listener.envs.synthetic import describe

    extra = [(k, describe(k, rng, speaking=bool(i % 2))) for i, k in enumerate(INTENTS * 20)]
    texts += [t for _, t in extra]
    intents += [k for k, _ in extra]
    uniq = len(set(texts)) / len(texts)
    print(f"\n{len(set(texts))} unique texts of {len(texts)} ({uniq:.0%}); example: {texts[0]!r}")
    assert uniq > 0.8
    for t, k in zip(texts, intents):
        words = set(re.findall(r"[a-z-]+", t.lower()))
        own = words & set(INTENT_WORDS[k])
        others = {w for j in INTENTS if j != k for w in INTENT_WORDS[j]} & words
        assert own and not others, (k, t)
        assert not words & {"speaking", "talking", "listening"}, t
    # per intent, the texts are not one fixed string
    for k in INTENTS:
        assert len({t for t, j in zip(texts, intents) if j == k}) >= 5, k


def test_vague_and_missing_texts(corpus):
    """A share of windows has a vague text (names no intent) or none, as machine captions do."""
    from gdpo_listener.envs.synthetic import caption

    _, _, labels, convs = corpus
    all_intent_words = {w for k in INTENTS for w in INTENT_WORDS[k]}
    seen = {k: 0 for k in TEXT_KINDS}
    for conv in convs:  # the labels describe the written texts
        for s in range(2):
            for t, kind in zip(conv.text[s], labels[conv.id]["text_kinds"][s]):
                seen[kind] += 1
                assert (t == "") == (kind == "missing"), (t, kind)
                assert (t in VAGUE_TEXTS) == (kind == "vague"), (t, kind)
    assert seen["missing"] > 0 and seen["vague"] > 0
    for t in VAGUE_TEXTS:
        words = set(re.findall(r"[a-z-]+", t.lower()))
        assert not words & (all_intent_words | {"speaking", "talking", "listening"}), t
    # the shares, over many windows: version 2 about 10 % missing and 15 % vague, version 1 none
    rng = np.random.default_rng(0)
    n = 4000
    for version, (lo_m, hi_m, lo_v, hi_v) in ((2, (0.08, 0.12, 0.12, 0.18)), (1, (0.0, 0.0, 0.0, 0.0))):
        kinds = [caption(INTENTS[i % len(INTENTS)], rng, bool(i % 2), version)[1] for i in range(n)]
        missing, vague = kinds.count("missing") / n, kinds.count("vague") / n
        print(f"\nversion {version}: missing text share {missing:.3f}, vague {vague:.3f}")
        assert lo_m <= missing <= hi_m and lo_v <= vague <= hi_v, version


# ----------------------------------------------------------------------------------------------
# audio and VAD


def test_vad_matches_audio_energy_of_written_wav(corpus):
    _, _, _, convs = corpus
    agree = []
    for conv in convs:  # audio read back from the PCM16 files
        for s in range(2):
            db = 20 * np.log10(frame_rms(conv.audio[s], conv.n_frames) + 1e-9)
            agree.append(((db > -45) == conv.vad[s]).mean())
    print(f"\nVAD vs frame energy (> -45 dBFS) agreement: mean {np.mean(agree):.3f}, min {np.min(agree):.3f}")
    assert np.mean(agree) > 0.9 and np.min(agree) > 0.85


def test_silero_vad_agrees_with_the_labels(corpus):
    """silero-vad (a dependency) hears the synthetic voice as speech where the labels say so."""
    import silero_vad as silero

    conv = corpus[3][0]
    model = silero.load_silero_vad(onnx=False)
    ts = silero.get_speech_timestamps(torch.from_numpy(conv.audio[0]), model, sampling_rate=16000)
    m = np.zeros(conv.n_frames, bool)
    for d in ts:
        m[d["start"] // SAMPLES_PER_FRAME: -(-d["end"] // SAMPLES_PER_FRAME)] = True
    agree = (m == conv.vad[0]).mean()
    print(f"\nsilero-vad vs synthetic VAD agreement on {conv.id} side 0: {agree:.3f} "
          f"(silero speech {m.mean():.2f}, labels {conv.vad[0].mean():.2f})")
    assert agree > 0.85
    assert abs(m.mean() - conv.vad[0].mean()) < 0.1


# ----------------------------------------------------------------------------------------------
# determinism


def test_deterministic_by_seed():
    a, ia = synthesize_conversation("x", 16.0, seed=7, index=2)
    b, ib = synthesize_conversation("x", 16.0, seed=7, index=2)
    c, _ = synthesize_conversation("x", 16.0, seed=8, index=2)
    d, _ = synthesize_conversation("x", 16.0, seed=7, index=3)
    np.testing.assert_array_equal(a.motion, b.motion)
    np.testing.assert_array_equal(a.vad, b.vad)
    for s in range(2):
        np.testing.assert_array_equal(a.audio[s], b.audio[s])
    assert a.text == b.text and ia["intents"] == ib["intents"]
    for other in (c, d):
        assert not np.array_equal(a.motion, other.motion)
        assert not np.array_equal(a.audio[0][: len(other.audio[0])], other.audio[0][: len(a.audio[0])])


def test_corpus_independent_of_workers(tmp_path):
    s1 = generate_corpus(tmp_path / "a", n_conversations=2, seconds=8.0, seed=4, progress=False, workers=1)
    s2 = generate_corpus(tmp_path / "b", n_conversations=2, seconds=8.0, seed=4, progress=False, workers=2)
    assert s1["hours"] == s2["hours"]
    for cid in read_split(tmp_path / "a", "train") + read_split(tmp_path / "a", "test"):
        x, y = load_conversation(tmp_path / "a", cid), load_conversation(tmp_path / "b", cid)
        np.testing.assert_array_equal(x.motion, y.motion)
        np.testing.assert_array_equal(x.audio[1], y.audio[1])
        assert x.text == y.text


def test_dataset_json_records_corpus_version(corpus, tmp_path):
    from gdpo_listener.envs.dataset import load_dataset_meta

    root, summary = corpus[0], corpus[1]
    assert load_dataset_meta(root)["synthetic"]["corpus_version"] == summary["corpus_version"] == 2
    s1 = generate_corpus(tmp_path / "v1", n_conversations=1, seconds=8.0, seed=0, progress=False, version=1)
    assert load_dataset_meta(tmp_path / "v1")["synthetic"]["corpus_version"] == s1["corpus_version"] == 1
    assert s1["text_kind_counts"] == {"full": 2, "vague": 0, "missing": 0}
    # version 1 stays the original corpus: same audio and timeline, different motion
    a, _ = synthesize_conversation("x", 8.0, seed=0, index=0, version=1)
    b, _ = synthesize_conversation("x", 8.0, seed=0, index=0, version=2)
    np.testing.assert_array_equal(a.vad, b.vad)
    np.testing.assert_array_equal(a.audio[0], b.audio[0])
    assert not np.allclose(a.motion, b.motion)


def test_bad_arguments():
    with pytest.raises(KeyError, match="valid"):
        listener_reaction("ecstatic", 50, np.random.default_rng(0))
    with pytest.raises(ValueError, match="partner_vad"):
        listener_reaction("sad", 50, np.random.default_rng(0), partner_vad=np.zeros(10, bool))
    with pytest.raises(ValueError, match="seconds"):
        generate_corpus("/nonexistent/never", n_conversations=1, seconds=2.0)
    with pytest.raises(ValueError, match="version 3"):
        generate_corpus("/nonexistent/never", n_conversations=1, seconds=8.0, version=3)
    with pytest.raises(ValueError, match="motion"):
        rs.side_statistics(np.zeros((10, 60)), np.zeros(10, bool), np.zeros(10, bool))


def test_low_rank_idle_expression_is_opt_in_recorded_and_of_that_rank(tmp_path):
    from dataclasses import replace

    from gdpo_listener.envs.dataset import load_dataset_meta
    from gdpo_listener.envs.synthetic import default_speaker
    from gdpo_listener.envs.synthetic.motion import finish

    # the idle expression alone (no reaction, no jitter): k factors -> rank k over the 50 channels, each keeping its std
    spk, n = default_speaker(), 2000
    for rank, P in ((3, replace(corpus_params(2, idle_expr_rank=3), jitter={})), (50, replace(corpus_params(2), jitter={}))):
        idle = finish(np.zeros((n, 67)), np.random.default_rng(0), spk, P)[:, :50] - spk.rest_expr  # (n, 50)
        assert np.linalg.matrix_rank(idle, tol=1e-6) == rank
        assert np.allclose(idle.std(0), P.idle_expr, rtol=0.35)
    # opt-in: the default corpus is unchanged (and its dataset.json has no such key), the option changes the motion only
    a, _ = synthesize_conversation("x", 8.0, seed=0, index=0)
    b, _ = synthesize_conversation("x", 8.0, seed=0, index=0, idle_expr_rank=None)
    c, _ = synthesize_conversation("x", 8.0, seed=0, index=0, idle_expr_rank=4)
    np.testing.assert_array_equal(a.motion, b.motion)
    np.testing.assert_array_equal(a.vad, c.vad)
    np.testing.assert_array_equal(a.audio[0], c.audio[0])
    assert not np.allclose(a.motion, c.motion)
    generate_corpus(tmp_path / "r4", n_conversations=1, seconds=8.0, seed=0, progress=False, idle_expr_rank=4)
    generate_corpus(tmp_path / "r0", n_conversations=1, seconds=8.0, seed=0, progress=False)
    assert load_dataset_meta(tmp_path / "r4")["synthetic"]["idle_expr_rank"] == 4
    assert "idle_expr_rank" not in load_dataset_meta(tmp_path / "r0")["synthetic"]
    for bad in (0, 51, "four", 2.5, True):
        with pytest.raises(ValueError, match="idle_expr_rank"):
            generate_corpus(tmp_path / "bad", n_conversations=1, seconds=8.0, idle_expr_rank=bad)
