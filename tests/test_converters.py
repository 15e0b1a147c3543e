"""Converters (DualTalk, Seamless) and VAD: small synthetic inputs in each source's own layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gdpo_listener.envs.converters import (
    ConversionError,
    ConversionWarning,
    convert_dualtalk,
    convert_seamless,
    energy_vad_frames,
    silero_vad_frames,
)
from gdpo_listener.envs.converters.common import intervals_to_frames, resample_frames, smooth_frames
from gdpo_listener.envs.dataset import DyadicWindows, load_conversation, load_dataset_meta, read_split
from gdpo_listener.envs.flame import FPS, GROUP_NAMES, GROUPS, SAMPLE_RATE

SR = SAMPLE_RATE


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


DT_SECONDS, DT_SPEECH = 8.0, ((0.8, 3.5), (4.5, 7.2))


@pytest.fixture(scope="module")
def dualtalk_silero(tmp_path_factory, write_dualtalk):
    """Three conversations (one with an audio-only speaker2), converted once with silero VAD."""
    root = tmp_path_factory.mktemp("dualtalk")
    inp = root / "in"
    for i in range(3):  # c2: speaker2 has audio only
        write_dualtalk(inp, f"c{i}", seconds=DT_SECONDS, seed=i, motion_sides=(1,) if i == 2 else (1, 2), speech=DT_SPEECH)
    summary = convert_dualtalk(inp, root / "out", verbose=False)
    return inp, root / "out", summary


def test_dualtalk_shapes_groups_and_placement(dualtalk_silero):
    inp, out, summary = dualtalk_silero
    assert summary["conversations"] == 3 and summary["skipped"] == []
    assert summary["train"] >= 1 and summary["train"] + summary["test"] == 3
    assert load_dataset_meta(out)["source"] == "dualtalk"
    T = int(DT_SECONDS * FPS)
    for cid in ("c0", "c1", "c2"):
        conv = load_conversation(out, cid)
        assert conv.motion.shape == (2, T, 67) and conv.vad.shape == (2, T)
        assert all(a.shape == (T * 640,) for a in conv.audio)
        assert conv.text == [[""], [""]]  # one empty description per 200-frame window
        for s in range(2):
            if cid == "c2" and s == 1:
                continue
            src = dict(np.load(inp / f"{cid}_speaker{s + 1}.npz"))
            np.testing.assert_allclose(conv.motion[s, :, GROUPS["expr"]], src["exp"], rtol=1e-6)
            np.testing.assert_allclose(conv.motion[s, :, 64:67], src["pose"][:, :3], rtol=1e-6)
            np.testing.assert_allclose(conv.motion[s, :, 50:53], src["pose"][:, 3:], rtol=1e-6)
            assert not conv.motion[s, :, 53:64].any()  # neck, eyelid, eyepose absent -> zeros
            valid = dict(zip(GROUP_NAMES, conv.group_valid[s]))
            assert valid == {"expr": True, "jaw": True, "neck": False, "eyelid": False, "eyepose": False, "rot": True}
        assert conv.has_motion.tolist() == ([True, False] if cid == "c2" else [True, True])


def test_dualtalk_audio_only_partner_in_windows(dualtalk_silero):
    _, out, _ = dualtalk_silero
    conv = load_conversation(out, "c2")
    assert not conv.group_valid[1].any() and not conv.motion[1].any()
    items = []
    for split in ("train", "test"):
        ds = DyadicWindows(out, split, load_audio=False)
        items += [ds[i] for i in range(len(ds)) if ds[i]["conversation"] == "c2"]
    assert len(items) == 1  # only side 0 can be the actor
    assert items[0]["actor"] == 0 and not items[0]["partner_has_motion"] and not items[0]["partner_valid"].any()


def test_dualtalk_silero_vad_matches_speech(dualtalk_silero):
    _, out, summary = dualtalk_silero
    t = (np.arange(int(DT_SECONDS * FPS)) + 0.5) / FPS
    for cid in ("c0", "c1", "c2"):
        vad = load_conversation(out, cid, audio=False).vad
        for s, (a, b) in enumerate(DT_SPEECH):
            inside = (t > a + 0.3) & (t < b - 0.3)
            outside = (t < a - 0.3) | (t > b + 0.3)
            assert vad[s, inside].mean() > 0.9, (cid, s, vad[s, inside].mean())
            assert vad[s, outside].mean() < 0.05, (cid, s, vad[s, outside].mean())
    assert 0.2 < summary["speaking_share"] < 0.5 and summary["listening_share"] > 0.2


def test_silero_vad_frames_speech_vs_silence_and_tone(track_audio):
    n = 6 * FPS
    wav = track_audio(6.0, [(2.0, 4.0)], seed=7)
    vad = silero_vad_frames(wav, n)
    assert vad.shape == (n,) and vad.dtype == bool
    t = (np.arange(n) + 0.5) / FPS
    assert vad[(t > 2.2) & (t < 3.8)].all()
    assert not vad[(t < 1.7) | (t > 4.3)].any()
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(6 * SR) / SR)).astype(np.float32)
    assert silero_vad_frames(tone, n).mean() < 0.1  # a steady tone is not speech
    assert not silero_vad_frames(np.zeros(6 * SR, np.float32), n).any()
    assert silero_vad_frames(wav, n, threshold=0.999).sum() <= vad.sum()
    with pytest.raises(ValueError, match="mono"):
        silero_vad_frames(np.zeros((2, 100), np.float32), 1)


def test_energy_vad_frames(track_audio):
    n = 6 * FPS
    vad = energy_vad_frames(track_audio(6.0, [(2.0, 4.0)], seed=3), n)
    t = (np.arange(n) + 0.5) / FPS
    assert vad[(t > 2.2) & (t < 3.8)].mean() > 0.9 and not vad[(t < 1.7) | (t > 4.3)].any()


def test_dualtalk_train_test_subfolders(tmp_path, write_dualtalk):
    write_dualtalk(tmp_path / "in" / "train", "a", seconds=4, seed=0, speech=((0.5, 1.5), (2.0, 3.5)))
    write_dualtalk(tmp_path / "in" / "train", "b", seconds=4, seed=1, speech=((0.5, 1.5), (2.0, 3.5)))
    write_dualtalk(tmp_path / "in" / "test", "c", seconds=4, seed=2, speech=((0.5, 1.5), (2.0, 3.5)))
    s = convert_dualtalk(tmp_path / "in", tmp_path / "out", vad="energy", verbose=False)
    assert (s["train"], s["test"]) == (2, 1)
    assert read_split(tmp_path / "out", "train") == ["a", "b"] and read_split(tmp_path / "out", "test") == ["c"]
    for p in (tmp_path / "in" / "train").iterdir():
        p.unlink()
    with pytest.raises(ConversionError, match="no valid conversation in train/"):  # test/ is never moved to train
        convert_dualtalk(tmp_path / "in", tmp_path / "out", vad="energy", verbose=False)
    assert read_split(tmp_path / "out", "train") == ["a", "b"]


def test_dualtalk_hash_split_is_deterministic_and_keeps_a_train_conversation(tmp_path, write_dualtalk):
    for i in range(4):
        write_dualtalk(tmp_path / "in", f"id{i}", seconds=2, seed=i, speech=((0.2, 0.8), (1.0, 1.8)))
    s1 = convert_dualtalk(tmp_path / "in", tmp_path / "o1", vad="energy", test_fraction=0.5, verbose=False)
    s2 = convert_dualtalk(tmp_path / "in", tmp_path / "o2", vad="energy", test_fraction=0.5, verbose=False)
    assert read_split(tmp_path / "o1", "test") == read_split(tmp_path / "o2", "test")
    assert s1["train"] == s2["train"] >= 1
    s3 = convert_dualtalk(tmp_path / "in", tmp_path / "o3", vad="energy", test_fraction=1.0, verbose=False)
    assert (s3["train"], s3["test"]) == (1, 3)
    with pytest.raises(ValueError, match="test_fraction"):
        convert_dualtalk(tmp_path / "in", tmp_path / "o4", vad="energy", test_fraction=1.5, verbose=False)


def test_dualtalk_stereo_and_other_sample_rate_audio(tmp_path, track_audio, write_dualtalk):
    write_dualtalk(tmp_path / "in", "x", seconds=3, seed=0, speech=((0.5, 1.5), (1.8, 2.8)))
    wav = track_audio(3.0, [(1.8, 2.8)], seed=5, sr=48_000)
    sf.write(tmp_path / "in" / "x_speaker2.wav", np.stack([wav, wav], 1), 48_000, subtype="FLOAT")  # stereo, 48 kHz
    s = convert_dualtalk(tmp_path / "in", tmp_path / "out", vad="energy", verbose=False)
    assert s["skipped"] == []
    a = load_conversation(tmp_path / "out", "x").audio[1]
    assert a.shape == (3 * SR,)
    assert np.abs(a[: SR]).max() < 0.05 and np.abs(a[int(2 * SR) : int(2.6 * SR)]).max() > 0.1


# ----------------------------------------------------------------------------------------------
# bad input


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _rewrite_npz(p: Path, **changes) -> None:
    d = dict(np.load(p))
    d.update(changes)
    np.savez(p, **d)


def _nan_exp(p):
    d = dict(np.load(p))
    d["exp"][10, 3] = np.nan
    np.savez(p, **d)


def _inf_pose(p):
    d = dict(np.load(p))
    d["pose"][5, 0] = np.inf
    np.savez(p, **d)


BAD_DUALTALK = {
    "truncated npz": ("bad_speaker1.npz", _truncate, "cannot read npz"),
    "garbage npz": ("bad_speaker1.npz", lambda p: p.write_bytes(b"not a zip file at all"), "cannot read npz"),
    "corrupt wav": ("bad_speaker2.wav", lambda p: p.write_bytes(b"RIFF\x00\x00garbage" * 10), "cannot read audio"),
    "truncated wav": ("bad_speaker2.wav", _truncate, "mismatch"),  # libsndfile reads the part that is there
    "nan exp": ("bad_speaker1.npz", _nan_exp, "NaN/inf"),
    "inf pose": ("bad_speaker2.npz", _inf_pose, "NaN/inf"),
    "exp not 50 wide": ("bad_speaker1.npz", lambda p: _rewrite_npz(p, exp=np.zeros((100, 40), np.float32)), "50 channels"),
    "pose not 6 wide": ("bad_speaker2.npz", lambda p: _rewrite_npz(p, pose=np.zeros((100, 5), np.float32)), "6 channels"),
    "exp missing": ("bad_speaker1.npz", lambda p: np.savez(p, pose=np.zeros((100, 6), np.float32)), "missing key 'exp'"),
    "audio too short": ("bad_speaker1.wav", lambda p: sf.write(p, np.zeros(int(3.5 * SR), np.float32), SR), "mismatch"),
    "nan audio": ("bad_speaker1.wav", lambda p: sf.write(p, np.full(4 * SR, np.nan, np.float32), SR, subtype="FLOAT"), "NaN"),
    "4-channel audio": ("bad_speaker2.wav", lambda p: sf.write(p, np.zeros((4 * SR, 4), np.float32), SR), "4 channels"),
    "wav missing": ("bad_speaker2.wav", lambda p: p.unlink(), "missing audio file bad_speaker2.wav"),
}


@pytest.mark.parametrize("case", list(BAD_DUALTALK))
def test_dualtalk_bad_file_is_skipped_with_warning_naming_it(tmp_path, case, capsys, write_dualtalk):
    name, corrupt, reason = BAD_DUALTALK[case]
    inp = tmp_path / "in"
    for i, cid in enumerate(("ok1", "bad", "ok2")):
        write_dualtalk(inp, cid, seconds=4, seed=i, speech=((0.5, 1.5), (2.0, 3.5)))
    corrupt(inp / name)
    with pytest.warns(ConversionWarning, match=name) as rec:
        s = convert_dualtalk(inp, tmp_path / "out", vad="energy")
    assert any(reason in str(w.message) for w in rec), [str(w.message) for w in rec]
    assert s["conversations"] == 2 and len(s["skipped"]) == 1
    file, why = s["skipped"][0]
    assert reason in why and name in Path(file).name + why
    assert "skipped 1 file(s)" in capsys.readouterr().out
    assert not (tmp_path / "out" / "conversations" / "bad.npz").exists()
    # the same file alone: nothing valid remains -> error naming it; strict mode raises at once
    for other in ("ok1", "ok2"):
        for p in inp.glob(f"{other}_*"):
            p.unlink()
    with pytest.warns(ConversionWarning), pytest.raises(ConversionError, match=name.split("_")[0]) as e:
        convert_dualtalk(inp, tmp_path / "out2", vad="energy", verbose=False)
    assert "no valid conversation" in str(e.value) and reason in str(e.value)
    with pytest.raises(ConversionError, match=reason):
        convert_dualtalk(inp, tmp_path / "out3", vad="energy", strict=True, verbose=False)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()
    assert siblings(tmp_path / "out") == ["in", "out"]  # no temporary folders left behind


def test_dualtalk_side_mismatch_and_no_motion(tmp_path, dualtalk_motion, write_dualtalk):
    inp = tmp_path / "in"
    write_dualtalk(inp, "ok", seconds=4, seed=0, speech=((0.5, 1.5), (2.0, 3.5)))
    write_dualtalk(inp, "nomotion", seconds=4, seed=1, motion_sides=(), speech=((0.5, 1.5), (2.0, 3.5)))
    write_dualtalk(inp, "long", seconds=4, seed=2, speech=((0.5, 1.5), (2.0, 3.5)))
    _rewrite_npz(inp / "long_speaker2.npz", **{k: v[:90] for k, v in dualtalk_motion(100, 0).items()})
    write_dualtalk(inp, "tol", seconds=4, seed=3, speech=((0.5, 1.5), (2.0, 3.5)))
    _rewrite_npz(inp / "tol_speaker2.npz", **{k: v[:99] for k, v in dualtalk_motion(100, 0).items()})  # within 2 frames
    sf.write(inp / "tol_speaker1.wav", np.zeros(int(3.95 * SR), np.float32), SR)  # audio 1.25 frames short: accepted
    with pytest.warns(ConversionWarning) as rec:
        s = convert_dualtalk(inp, tmp_path / "out", vad="energy", verbose=False)
    msgs = " | ".join(str(w.message) for w in rec)
    assert "nomotion_speaker1.wav" in msgs and "neither speaker" in msgs
    assert "long_speaker1.npz" in msgs and "motion lengths differ" in msgs
    assert s["conversations"] == 2 and load_conversation(tmp_path / "out", "tol").n_frames == 99


def test_missing_or_empty_input_folder(tmp_path):
    with pytest.raises(ConversionError, match="does not exist") as e:
        convert_dualtalk(tmp_path / "nope", tmp_path / "out")
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(ConversionError, match="no DualTalk files found") as e:
        convert_dualtalk(tmp_path / "empty", tmp_path / "out")
    assert str(tmp_path / "empty") in str(e.value)
    with pytest.raises(ConversionError, match="no Seamless files found"):
        convert_seamless(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConversionError, match="must not be the input"):
        convert_dualtalk(tmp_path / "empty", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_failed_conversion_keeps_existing_dataset(tmp_path, monkeypatch, dualtalk_motion, write_dualtalk):
    inp = tmp_path / "in"
    write_dualtalk(inp, "a", seconds=3, seed=0, speech=((0.5, 1.5), (1.8, 2.8)))
    out = tmp_path / "data"
    convert_dualtalk(inp, out, vad="energy", verbose=False)
    before = tree(out)
    # 1) nothing valid in the new input
    bad = tmp_path / "bad"
    write_dualtalk(bad, "b", seconds=3, seed=1, speech=((0.5, 1.5), (1.8, 2.8)))
    _truncate(bad / "b_speaker1.npz")
    with pytest.warns(ConversionWarning), pytest.raises(ConversionError, match="b_speaker1.npz"):
        convert_dualtalk(bad, out, vad="energy", verbose=False)
    assert tree(out) == before and siblings(out) == ["bad", "data", "in"]
    # 2) an unexpected error half-way through the conversion propagates; no partial output
    write_dualtalk(bad, "c", seconds=3, seed=2, speech=((0.5, 1.5), (1.8, 2.8)))
    import gdpo_listener.envs.converters.dualtalk as dt

    calls = []

    def flaky(wav, n, method, threshold):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("disk on fire")
        return np.zeros(n, bool)

    monkeypatch.setattr(dt, "vad_frames", flaky)
    (bad / "b_speaker1.npz").unlink()
    np.savez(bad / "b_speaker1.npz", **dualtalk_motion(75, 0))
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_dualtalk(bad, out, verbose=False)
    assert tree(out) == before and siblings(out) == ["bad", "data", "in"]
    with pytest.raises(RuntimeError):
        convert_dualtalk(bad, tmp_path / "fresh", verbose=False)
    assert siblings(out) == ["bad", "data", "in"]


# ----------------------------------------------------------------------------------------------
# Seamless layout

SEAMLESS_FPS = 30


def seamless_tracker(T30: int, seed: int, rot_key: str = "global_rot", jaw_freq: float = 1.5) -> dict:
    t = np.arange(T30)[:, None] / SEAMLESS_FPS
    const = lambda v, w: np.full((T30, w), v, np.float32)  # noqa: E731
    expr = np.tile(np.arange(100, dtype=np.float32), (T30, 1)) + seed
    return {
        "expr": expr,
        "jaw_pose": (0.2 * np.sin(2 * np.pi * jaw_freq * t) * np.ones((1, 3))).astype(np.float32),
        "neck_pose": const(0.3, 3),
        "eye_l_pose": const(0.4, 3),
        "eye_r_pose": const(0.5, 3),
        "eyelids": const(0.6, 2),
        rot_key: const(0.7, 3),
    }


@pytest.fixture(scope="session")
def write_seamless(track_audio):
    """``write_seamless(folder, interaction, ...)``: one Seamless interaction (tracker ``.npz``, ``.wav``, ``.json`` per participant)."""

    def write(folder: Path, interaction: str, participants=("P1", "P2"), seconds: float = 10.0, seed: int = 0,
              vad=((1.0, 4.0), (5.0, 9.0)), text=None, rot_keys=("global_rot", "rotation"), sr: int = SR,
              motion=(True, True)) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        T30 = int(round(seconds * SEAMLESS_FPS))
        for i, pid in enumerate(participants):
            stem = folder / f"{interaction}_{pid}"
            if motion[i % 2]:
                np.savez(f"{stem}.npz", **seamless_tracker(T30, seed + i, rot_keys[i % 2]))
            a, b = vad[i % 2]
            sf.write(f"{stem}.wav", track_audio(seconds, [(a, b)], seed=seed + i, sr=sr), sr)
            meta = {"id": stem.name, "metadata:vad": [{"start": a, "end": b}]}
            if text is not None:
                meta["text"] = text[i % 2]
            (Path(f"{stem}.json")).write_text(json.dumps(meta))

    return write


def test_seamless_converts_resamples_and_places_channels(tmp_path, write_seamless):
    inp = tmp_path / "in"
    write_seamless(inp, "V00_S01_I001", seed=0, sr=48_000,
                   text=(["nods eagerly", "smiles"], [{"start": 1.0, "end": 3.0, "text": "frowns"},
                                                      {"start_ts": 8.5, "end_ts": 9.5, "annotation": "laughs"}]))
    write_seamless(inp, "V00_S01_I002", seed=1)
    write_seamless(inp, "V00_S01_I003", participants=("P1", "P2", "P3"), seed=2)
    with pytest.warns(ConversionWarning, match=r"I003_\*.*3 participant"):
        s = convert_seamless(inp, tmp_path / "out", verbose=False)
    assert s["conversations"] == 2 and len(s["skipped"]) == 1
    conv = load_conversation(tmp_path / "out", "V00_S01_I001")
    T = 10 * FPS  # 300 frames at 30 fps -> 250 at 25 fps
    assert conv.motion.shape == (2, T, 67) and conv.vad.shape == (2, T) and conv.audio[0].shape == (T * 640,)
    assert conv.group_valid.all() and conv.has_motion.all()
    mid = slice(20, T - 20)
    m = conv.motion[0, mid]
    np.testing.assert_allclose(m[:, 0:50], np.tile(np.arange(50), (T - 40, 1)), atol=1e-3)  # first 50 of 100 kept
    for sl, v in ((slice(53, 56), 0.3), (slice(58, 61), 0.4), (slice(61, 64), 0.5), (slice(56, 58), 0.6),
                  (slice(64, 67), 0.7)):
        np.testing.assert_allclose(m[:, sl], v, atol=1e-4)
    np.testing.assert_allclose(conv.motion[1, mid, 64:67], 0.7, atol=1e-4)  # alias 'rotation' on side 1
    # a 1.5 Hz jaw sinusoid at 30 fps is the same 1.5 Hz sinusoid at 25 fps
    t25 = np.arange(T) / FPS
    jaw = conv.motion[0, :, 50]
    np.testing.assert_allclose(jaw[mid], 0.2 * np.sin(2 * np.pi * 1.5 * t25[mid]), atol=0.01)
    spec = np.abs(np.fft.rfft(jaw))
    assert np.fft.rfftfreq(T, 1 / FPS)[spec.argmax()] == pytest.approx(1.5, abs=0.1)
    # VAD intervals rasterised by frame centre
    centre = (np.arange(T) + 0.5) / FPS
    np.testing.assert_array_equal(conv.vad[0], (centre >= 1.0) & (centre < 4.0))
    np.testing.assert_array_equal(conv.vad[1], (centre >= 5.0) & (centre < 9.0))
    assert conv.text == [["nods eagerly", "smiles"], ["frowns", "laughs"]]
    assert load_conversation(tmp_path / "out", "V00_S01_I002").text == [["", ""], ["", ""]]


def test_seamless_resampling_keeps_frequency():
    for f in (0.5, 2.0, 4.0):
        t30 = np.arange(600) / 30
        x = np.stack([np.sin(2 * np.pi * f * t30), np.cos(2 * np.pi * f * t30)], 1)
        y = resample_frames(x, 30, 25)
        assert y.shape == (500, 2)
        t25 = np.arange(500) / 25
        np.testing.assert_allclose(y[10:-10, 0], np.sin(2 * np.pi * f * t25[10:-10]), atol=0.02)
        assert np.fft.rfftfreq(500, 1 / 25)[np.abs(np.fft.rfft(y[:, 0])).argmax()] == pytest.approx(f, abs=0.05)


def test_savgol_smoothing_reduces_high_frequency_noise(tmp_path, write_seamless):
    rng = np.random.default_rng(0)
    t = np.arange(500) / 25
    clean = np.sin(2 * np.pi * 0.8 * t)[:, None]
    noisy = clean + 0.1 * rng.standard_normal((500, 1))
    sm = smooth_frames(noisy, window=5, order=2)
    assert np.std(sm - clean) < 0.75 * np.std(noisy - clean)
    assert np.std(np.diff(sm - clean, axis=0)) < 0.5 * np.std(np.diff(noisy - clean, axis=0))  # high frequencies
    np.testing.assert_allclose(smooth_frames(clean, 5, 2)[5:-5], clean[5:-5], atol=2e-3)  # signal kept
    assert smooth_frames(noisy, window=1) is noisy and smooth_frames(noisy[:3], 9, 2).shape == (3, 1)
    # end to end: jitter on the tracker's jaw is reduced by the default smoothing
    inp = tmp_path / "in"
    write_seamless(inp, "I1", seconds=8, vad=((1.0, 3.0), (4.0, 7.0)))
    d = dict(np.load(inp / "I1_P1.npz"))
    d["jaw_pose"] = 0.05 * rng.standard_normal(d["jaw_pose"].shape).astype(np.float32)  # tracker jitter only
    np.savez(inp / "I1_P1.npz", **d)
    convert_seamless(inp, tmp_path / "raw", smooth_window=1, verbose=False)
    convert_seamless(inp, tmp_path / "sm", verbose=False)
    hf = lambda root: np.std(np.diff(load_conversation(root, "I1", audio=False).motion[0, :, 50:53], axis=0))  # noqa: E731
    assert hf(tmp_path / "sm") < 0.5 * hf(tmp_path / "raw")


def test_intervals_to_frames_edges():
    np.testing.assert_array_equal(intervals_to_frames([(0.0, 0.04)], 3), [True, False, False])
    np.testing.assert_array_equal(intervals_to_frames([(0.02, 0.06)], 3), [True, False, False])
    np.testing.assert_array_equal(intervals_to_frames([(0.021, 0.061)], 3), [False, True, False])
    np.testing.assert_array_equal(intervals_to_frames([(0.05, 0.07), (-1, 0.01), (0.1, 9)], 4), [False, True, True, True])
    assert not intervals_to_frames([(0.03, 0.03)], 3).any()


def _seamless_bad(p: Path, key: str, value) -> None:
    d = dict(np.load(p))
    if value is None:
        del d[key]
    else:
        d[key] = value
    np.savez(p, **d)


def _nan_eyelid(p):
    d = dict(np.load(p))
    d["eyelids"][3, 1] = np.nan
    np.savez(p, **d)


BAD_SEAMLESS = {
    "expr too narrow": ("I2_P1.npz", lambda p: _seamless_bad(p, "expr", np.zeros((240, 40), np.float32)), "at least 50"),
    "neck missing": ("I2_P2.npz", lambda p: _seamless_bad(p, "neck_pose", None), "'neck'"),
    "nan eyelid": ("I2_P1.npz", _nan_eyelid, "NaN/inf"),
    "uneven keys": ("I2_P1.npz", lambda p: _seamless_bad(p, "jaw_pose", np.zeros((200, 3), np.float32)), "different numbers"),
    "truncated npz": ("I2_P2.npz", _truncate, "cannot read npz"),
    "no vad key": ("I2_P1.json", lambda p: p.write_text(json.dumps({"id": "x"})), "metadata:vad"),
    "bad vad interval": ("I2_P2.json", lambda p: p.write_text(json.dumps({"metadata:vad": [{"start": 3, "end": 1}]})),
                         "not a valid interval"),
    "broken json": ("I2_P2.json", lambda p: p.write_text("{not json"), "cannot read JSON"),
    "json missing": ("I2_P1.wav", lambda p: p.with_suffix(".json").unlink(), "missing I2_P1.json"),
    "audio too long": ("I2_P1.wav", lambda p: sf.write(p, np.zeros(12 * SR, np.float32), SR), "mismatch"),
}


@pytest.mark.parametrize("case", list(BAD_SEAMLESS))
def test_seamless_bad_file_is_skipped_with_warning_naming_it(tmp_path, case, write_seamless):
    name, corrupt, reason = BAD_SEAMLESS[case]
    inp = tmp_path / "in"
    for i, iid in enumerate(("I1", "I2", "I3")):
        write_seamless(inp, iid, seconds=8, seed=i, vad=((1.0, 3.0), (4.0, 7.0)))
    corrupt(inp / name)
    with pytest.warns(ConversionWarning, match=name) as rec:
        s = convert_seamless(inp, tmp_path / "out", verbose=False)
    assert any(reason in str(w.message) for w in rec), [str(w.message) for w in rec]
    assert s["conversations"] == 2 and s["skipped"][0][0].endswith(name)


def test_seamless_partial_tracker_and_audio_only(tmp_path, write_seamless):
    inp = tmp_path / "in"
    write_seamless(inp, "I1", seconds=8, vad=((1.0, 3.0), (4.0, 7.0)), motion=(True, False))
    _seamless_bad(inp / "I1_P1.npz", "eyelids", None)
    with pytest.warns(ConversionWarning, match="eyelid"), pytest.raises(ConversionError, match="I1_P1.npz"):
        convert_seamless(inp, tmp_path / "strict", verbose=False)  # all groups required by default
    s = convert_seamless(inp, tmp_path / "out", required_groups=("expr", "jaw", "rot"), vad="energy", verbose=False)
    conv = load_conversation(tmp_path / "out", "I1")
    assert s["conversations"] == 1 and conv.has_motion.tolist() == [True, False]
    valid = dict(zip(GROUP_NAMES, conv.group_valid[0].tolist()))
    assert valid == {"expr": True, "jaw": True, "neck": True, "eyelid": False, "eyepose": True, "rot": True}
    assert not conv.motion[0, :, 56:58].any() and not conv.group_valid[1].any()
