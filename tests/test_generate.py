"""train/generate.py in-process on tiny random-weight checkpoints (no dataset needed): exact clip
length, r and encoders from the checkpoint, checked inputs and outputs (issue 15 item 5)."""
from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
torch.set_num_threads(1)


def write_checkpoints(d: Path, r: int = 8, d_audio: int = 80) -> Path:
    """A tiny VAE (r frames per token) and a tiny AR-Flow recording it; returns the AR-Flow folder."""
    from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
    from gdpo_listener.agents.checkpoint import save_checkpoint
    from gdpo_listener.agents.vae import VAEConfig, make_vae, save_vae
    from gdpo_listener.envs.dataset import Normalizer
    from gdpo_listener.envs.flame import FLAME_DIM

    torch.manual_seed(0)
    save_vae(d / "vae", make_vae(VAEConfig.tiny(d_latent=8, r=r)),
             Normalizer(np.zeros(FLAME_DIM, np.float32), np.ones(FLAME_DIM, np.float32)))
    arch = ARFlowConfig.small(d_latent=8, d_model=32, n_layers=1, n_heads=2, r=r, d_audio=d_audio)
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
                                        ("w_listen=1e38", "|w| <= 20"), ("w_listen=nan", "finite")])
def test_cfg_weights_beyond_the_bound_are_refused(tiny, tmp_path, weight, msg):
    with pytest.raises(ValueError, match=msg.replace("|", r"\|")):
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
