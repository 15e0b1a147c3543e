"""train/generate.py in-process on tiny random-weight checkpoints (no dataset needed): exact clip
length, r and encoders from the checkpoint, checked inputs and outputs (issue 15 item 5)."""
from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))


def write_checkpoints(d: Path, r: int = 8, d_audio: int = 80, **arch_overrides) -> Path:
    """A tiny VAE (r frames per token) and a tiny AR-Flow recording it; returns the AR-Flow folder."""
    from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
    from gdpo_listener.agents.checkpoint import save_checkpoint
    from gdpo_listener.agents.vae import VAEConfig, make_vae, save_vae
    from gdpo_listener.envs.dataset import Normalizer
    from gdpo_listener.envs.flame import FLAME_DIM

    torch.manual_seed(0)
    save_vae(d / "vae", make_vae(VAEConfig.tiny(d_latent=8, r=r)),
             Normalizer(np.zeros(FLAME_DIM, np.float32), np.ones(FLAME_DIM, np.float32)))
    arch = ARFlowConfig.small(d_latent=8, d_model=32, n_layers=1, n_heads=2, r=r, d_audio=d_audio, **arch_overrides)
    save_checkpoint(d / "sft", "arflow", {"model": ARFlow(arch).state_dict()},
                    {"arch": dataclasses.asdict(arch), "preset": "small", "vae_dir": str(d / "vae"),
                     "config": {"features": {"text_encoder": "bundled-minilm", "audio_encoder": "logmel"}}})
    return d / "sft"


def write_wav(path: Path, seconds: float, sr: int = 16000) -> Path:
    import soundfile as sf

    t = np.arange(int(round(seconds * sr))) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 0.5 * t) > 0)).astype(np.float32), sr)
    return path


def generate(ckpt: Path, wav: Path, out: Path, *extra: str) -> None:
    import generate as G
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "train" / "conf"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=[f"checkpoint={ckpt}", f"actor_wav={wav}", "steps=1", "threads=1",
                                                         f"out={out}", *extra])
    G.main(cfg)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("generate")
    write_checkpoints(d)
    write_wav(d / "a20.wav", 20.0)
    return d


def test_seconds_give_exactly_that_many_frames_and_out_is_a_stem(tiny, tmp_path):
    """seconds=20 -> 500 frames (the last partial token is generated and trimmed), not 496; out=take.v1 and
    out=take.v2 are two clips."""
    generate(tiny / "sft", tiny / "a20.wav", tmp_path / "take.v1", "seconds=20")
    generate(tiny / "sft", tiny / "a20.wav", tmp_path / "take.v2", "seconds=20", "w_listen=2")
    with np.load(tmp_path / "take.v1.npz") as a, np.load(tmp_path / "take.v2.npz") as b:
        assert a["motion"].shape == (500, 67) and a["vad"].shape == (500,) and np.isfinite(a["motion"]).all()
        assert not np.array_equal(a["motion"], b["motion"])  # two clips, not one overwritten
    assert (tmp_path / "take.v1.png").is_file() and (tmp_path / "take.v2.png").is_file()
    assert not (tmp_path / "take.npz").exists()
    # null seconds: every whole frame of the audio (10.1 s -> 252 frames, not a multiple of r = 8)
    write_wav(tmp_path / "a10.wav", 10.1)
    generate(tiny / "sft", tmp_path / "a10.wav", tmp_path / "whole.npz")
    with np.load(tmp_path / "whole.npz") as z:
        assert z["motion"].shape == (252, 67)
    assert (tmp_path / "whole.png").is_file()


def test_r_and_encoders_come_from_the_checkpoint(tmp_path):
    """A VAE with r = 4: 1 s -> 25 frames (7 tokens, trimmed); an AR-Flow whose audio size does not fit the
    checkpoint's encoder is refused by the compatibility check, naming d_audio."""
    from gdpo_listener.agents.checkpoint import CheckpointError

    wav = write_wav(tmp_path / "a.wav", 2.0)
    ckpt = write_checkpoints(tmp_path / "r4", r=4)
    generate(ckpt, wav, tmp_path / "r4clip", "seconds=1")
    with np.load(tmp_path / "r4clip.npz") as z:
        assert z["motion"].shape == (25, 67)
    bad = write_checkpoints(tmp_path / "da", d_audio=40)
    with pytest.raises(CheckpointError, match="d_audio=40 but the pipeline needs d_audio=80"):
        generate(bad, wav, tmp_path / "bad", "seconds=1")
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.parametrize("weight,msg", [("w_listen=1e6", "|w| <= 20"), ("w_speak=-25", "|w| <= 20"),
                                        ("w_listen=1e38", "|w| <= 20"), ("w_listen=nan", "finite"),
                                        ("cfg_drop=[text,gaze]", "unknown ['gaze']")])
def test_cfg_weights_beyond_the_bound_are_refused(tiny, tmp_path, weight, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        generate(tiny / "sft", tiny / "a20.wav", tmp_path / "clip", "seconds=2", weight)
    assert not list(tmp_path.iterdir())


def test_too_short_audio_fails_before_the_model_loads(tiny, tmp_path):
    """A 0.1 s wav is refused with its length, before any weights are read (here the weights file is broken)."""
    ckpt = tmp_path / "sft"
    shutil.copytree(tiny / "sft", ckpt)
    (ckpt / "model.safetensors").write_bytes(b"broken")
    short = write_wav(tmp_path / "short.wav", 0.1)
    with pytest.raises(ValueError, match="0.08 s .*at least 0.32 s"):
        generate(ckpt, short, tmp_path / "clip")
    with pytest.raises(ValueError, match="shorter than the requested 30.00 s"):
        generate(ckpt, tiny / "a20.wav", tmp_path / "clip", "seconds=30")
    assert not (tmp_path / "clip.npz").exists()


def test_non_finite_motion_is_an_error_and_nothing_is_written(tiny, tmp_path):
    """A diverged (NaN-weight) checkpoint: error naming it, no npz / png."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "nan"
    shutil.copytree(tiny / "sft", ckpt)
    sd = load_file(str(ckpt / "model.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()},
              str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match="non-finite values .*nan"):
        generate(ckpt, tiny / "a20.wav", tmp_path / "out" / "clip", "seconds=2")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_output_paths_append_suffixes():
    from gdpo_listener.evaluation.clip import output_paths

    assert output_paths(Path("gen/take.v1")) == (Path("gen/take.v1.npz"), Path("gen/take.v1.png"))
    assert output_paths(Path("gen/clip.npz")) == (Path("gen/clip.npz"), Path("gen/clip.png"))
    assert output_paths(Path("gen/clip")) == (Path("gen/clip.npz"), Path("gen/clip.png"))
    assert output_paths(Path("a.b.c")) == (Path("a.b.c.npz"), Path("a.b.c.png"))


# ---- the streamed path (issue 15 item 6): bounded memory, same output -------------------------


def write_noise_wav(path: Path, seconds: float, sr: int = 16000, channels: int = 1, seed: int = 0) -> Path:
    """Speech-like bursts of noise (loud and quiet stretches, so the energy VAD has both classes)."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    env = np.repeat(rng.uniform(0, 1, n // (sr // 4) + 1) > 0.5, sr // 4)[:n] * 0.3 + 0.003  # (n,) 0.25 s bursts
    x = (rng.standard_normal((n, channels)) * env[:, None]).astype(np.float32)  # (n, channels)
    sf.write(str(path), x if channels > 1 else x[:, 0], sr, subtype="FLOAT")
    return path


@pytest.mark.parametrize("sr,channels", [(16000, 1), (44100, 2), (8000, 1), (48000, 1)])
def test_audio_blocks_equal_the_whole_file_read(tmp_path, sr, channels):
    """AudioFile.blocks (per-block resampling with overlap, channel mean) is bit-identical to read_audio
    for any block size, with silence past the file's end; its length is known from the header."""
    from gdpo_listener.evaluation.clip import AudioFile, read_audio

    wav = write_noise_wav(tmp_path / "a.wav", 23.37, sr, channels)
    whole = read_audio(wav)
    f = AudioFile.open(wav)
    assert f.samples == whole.shape[0]
    for block in (16000 * 10, 12345, 640):
        n = whole.shape[0] + 1000
        blocks = list(f.blocks(n, block))
        assert all(b.shape[0] == block for b in blocks[:-1]) and 0 < blocks[-1].shape[0] <= block
        got = np.concatenate(blocks)
        assert got.dtype == np.float32 and got.shape == (n,)
        assert np.array_equal(got[: whole.shape[0]], whole) and not got[whole.shape[0]:].any()
    assert np.array_equal(np.concatenate(list(f.blocks(5000, 3000))), whole[:5000])


def test_energy_vad_in_one_pass_equals_energy_vad_frames(tmp_path):
    """energy_vad_stream (RMS per block, then energy_gate) equals energy_vad_frames on the whole clip,
    bridging and blip removal included; energy_gate on the same RMS too."""
    from gdpo_listener.envs.converters.vad import energy_vad_frames
    from gdpo_listener.evaluation.clip import AudioFile, energy_gate, energy_vad_stream, frame_rms, read_audio

    for sr, seed in ((16000, 1), (44100, 2)):
        wav = write_noise_wav(tmp_path / f"v{sr}.wav", 31.3, sr, seed=seed)
        whole = read_audio(wav)
        n_frames = whole.shape[0] // 640 - 3
        expected = energy_vad_frames(whole[: n_frames * 640], n_frames)
        assert 0.2 < expected.mean() < 0.8  # both classes: the comparison means something
        assert np.array_equal(energy_vad_stream(AudioFile.open(wav), n_frames), expected)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(640 * 400) * np.repeat(rng.uniform(0, 1, 400) > 0.6, 640) * 0.2).astype(np.float32)
    x[640 * 100:640 * 102] = 0  # a 2-frame gap inside speech (bridged) and a 1-frame blip (dropped)
    x[640 * 300:640 * 310] = 0
    x[640 * 305:640 * 306] = 0.3
    assert np.array_equal(energy_gate(frame_rms(x)), energy_vad_frames(x, 400))


@pytest.mark.parametrize("causal_prefix", [True, False])
def test_streamed_generation_equals_the_whole_recording_path(tiny, tmp_path, capsys, causal_prefix):
    """Same seed and settings (text, CFG weights, a partner wav, an actor at 44.1 kHz stereo): the streamed
    npz equals stream=false bit for bit, for a causal (small preset) and a bidirectional prefix; a
    progress bar when asked."""
    ckpt = tiny / "sft" if causal_prefix else write_checkpoints(tmp_path / "bidir", causal_prefix=False)
    actor = write_noise_wav(tmp_path / "actor.wav", 23.3, 44100, channels=2, seed=3)
    partner = write_noise_wav(tmp_path / "partner.wav", 25.0, 16000, seed=4)
    common = (f"partner_wav={partner}", "seconds=23.1", "w_listen=2", "w_speak=0.5", "seed=5", "text='a nod'", "steps=2")
    generate(ckpt, actor, tmp_path / "whole", *common, "stream=false")
    assert "whole-recording path (stream=false)" in capsys.readouterr().out
    generate(ckpt, actor, tmp_path / "streamed", *common, "progress=true")
    err = capsys.readouterr().err
    assert "generate" in err and "100%" in err  # the tqdm bar
    with np.load(tmp_path / "whole.npz") as a, np.load(tmp_path / "streamed.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["groups", "motion", "vad"]
        assert b["motion"].shape == (578, 67) and b["motion"].dtype == np.float32
        assert a["vad"].any() and not a["vad"].all()
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
    assert (tmp_path / "streamed.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["actor.wav", "partner.wav", "streamed.npz",
                                                                         "streamed.png", "whole.npz", "whole.png"]  # no temporaries


def test_streamed_memory_does_not_grow_with_the_length(tiny, monkeypatch):
    """Peak Python-side (numpy) allocations of stream_motion + write_clip_stream for 40 s and 160 s of audio
    (4 s blocks; the PNG capped at 10 s here, as at 10 min by default) differ by less than one block's
    worth: no buffer holds the whole recording or motion."""
    import tracemalloc

    from gdpo_listener.agents.arflow import load_arflow
    from gdpo_listener.agents.encoders import AudioEncoder
    from gdpo_listener.evaluation import clip
    from gdpo_listener.pipeline import factories

    monkeypatch.setattr(clip, "PLOT_MAX_FRAMES", 250)
    vae, norm, _ = factories.load_frozen_vae(tiny / "vae", torch.device("cpu"))
    model, _ = load_arflow(tiny / "sft", torch.device("cpu"))
    enc = AudioEncoder("logmel")
    peaks = []
    for seconds in (12, 40, 160):  # the first run warms up (imports, one-time tables), not measured
        wav = write_noise_wav(tiny / f"m{seconds}.wav", seconds, seed=seconds)
        f = clip.AudioFile.open(wav)
        n = seconds * 25
        vad = clip.energy_vad_stream(f, n)
        tracemalloc.start()
        blocks = clip.stream_motion(model, vae, norm, None, enc, f, f, n, vad, steps=1, block=4 * 16000, progress=False)
        clip.write_clip_stream(tiny / f"m{seconds}.npz", tiny / f"m{seconds}.png", blocks, n, vad, "", "ckpt")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        with np.load(tiny / f"m{seconds}.npz") as z:
            assert z["motion"].shape == (n, 67)
    assert peaks[2] - peaks[1] < 4 * 16000 * 4, peaks  # 120 s more audio would be 7.7 MB per held side


def test_why_not_streamed_names_the_reason():
    from gdpo_listener.evaluation.clip import why_not_streamed

    assert why_not_streamed("logmel", "energy", False) is None
    assert "audio encoder" in why_not_streamed("facebook/wav2vec2-base", "energy", False)
    assert "vad=silero" in why_not_streamed("logmel", "silero", False)
    assert "partner_motion" in why_not_streamed("logmel", "energy", True)
