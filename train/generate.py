"""Generate an actor's FLAME motion for given audio (+ text, partner motion, CFG weights, length).

    python train/generate.py actor_wav=a.wav partner_wav=b.wav text="joyful, nodding with a smile" \
        seconds=60 w_speak=1.0 w_listen=2.0 out=gen/clip

Writes ``OUT.npz`` (``motion (T, 67)`` raw FLAME at 25 fps, T = round(seconds x 25) exactly, ``vad
(T,)`` of the actor, the FLAME group names) and ``OUT.png`` (the six groups over time); ``out`` is
a stem (``out=gen/take.v1`` -> ``gen/take.v1.npz``). Long clips use the sliding window of paper 4.3
(the model's window, the latest k = 1 latent as causal prefix). The encoders and the VAE are the
checkpoint's (``features: checkpoint``; override with ``features.text_encoder=...`` / ``vae_dir=...``).

Checked before the model loads: CFG weights (finite, |w| <= 20), the audio (readable, long enough
for the requested length and for one latent token, finite), the partner motion. Audio at other sample
rates is resampled to 16 kHz. Motion with NaN/inf values (a diverged checkpoint) is an error and
nothing is written (``gdpo_listener.evaluation.clip``).

Speed. ``precision=auto`` (default) runs the AR-Flow with bf16 linear weights where bf16 is native
(AVX512-BF16 / AMX CPUs, CUDA), else fp32; ``precision=fp32|bf16|int8`` forces one
(``agents/compress.py``; ``train/bench_precision.py`` measures the metrics' change, bf16 within 0.74 %).

Memory. By default (``stream: true``) the audio is read in 10 s blocks and streamed through the
features and the model window by window, and the motion is written to the npz as it comes out:
memory does not grow with the input's length (``train/bench_generate_memory.py`` measures it), and a
progress bar shows from 5 min of audio on (``progress``). The output is bit-identical to the
whole-recording path (``stream=false``), which is also taken, with a note, when the stream cannot
serve the settings: a Wav2Vec2 audio encoder, ``partner_motion``, or ``vad=silero``; its memory grows
with the input (about 2 GB per hour of audio). The streamed PNG shows the first 10 min at most.
"""
from __future__ import annotations

import os

from gdpo_listener.pipeline.threads import omp_wait_defaults  # imports no torch

os.environ.update(omp_wait_defaults())  # before torch loads: OpenMP threads spin briefly, then sleep (pipeline/threads.py)

import hydra  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gdpo_listener.agents.arflow import load_arflow  # noqa: E402
from gdpo_listener.agents.compress import check_precision, compress, linear_weight_bytes, resolve_precision  # noqa: E402
from gdpo_listener.agents.sampling import check_cfg_drop  # noqa: E402
from gdpo_listener.envs.converters.vad import VAD_METHODS, vad_frames  # noqa: E402
from gdpo_listener.envs.flame import FPS  # noqa: E402
from gdpo_listener.evaluation import clip  # noqa: E402
from gdpo_listener.evaluation.checkpoints import read_arflow_meta, recorded_vae_dir, vae_frames_per_token  # noqa: E402
from gdpo_listener.pipeline import factories  # noqa: E402
from gdpo_listener.pipeline.checks import check_count  # noqa: E402
from gdpo_listener.pipeline.threads import configure_threads  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    configure_threads(cfg.threads)
    device = factories.make_device(cfg.device)
    w_speak, w_listen = clip.check_bounded_cfg_weight("w_speak", cfg.w_speak), clip.check_bounded_cfg_weight("w_listen", cfg.w_listen)
    cfg_drop = check_cfg_drop(cfg.cfg_drop)
    check_count(cfg, ["steps"])
    check_precision(cfg.precision)
    if cfg.vad not in VAD_METHODS:
        raise ValueError(f"vad={cfg.vad!r}; valid: {', '.join(VAD_METHODS)}")
    npz, png = clip.output_paths(factories.abspath(cfg.out))

    # -- inputs, checked before anything heavy is loaded -----------------------------------------
    ckpt = factories.abspath(cfg.checkpoint)
    meta = read_arflow_meta(ckpt)
    vae_dir = recorded_vae_dir(ckpt, meta, cfg.vae_dir)
    r = vae_frames_per_token(vae_dir)
    encoders = factories.checkpoint_encoders(cfg.features, meta)
    actor_file = clip.AudioFile.open(factories.abspath(cfg.actor_wav))
    partner_file = clip.AudioFile.open(factories.abspath(cfg.partner_wav)) if cfg.partner_wav else None
    n_frames = clip.clip_frames(cfg.seconds, actor_file.samples, r)
    for name, f in (("actor_wav", actor_file), ("partner_wav", partner_file)):
        if f is not None:
            clip.check_audio_length(name, f.samples, n_frames)
    partner_motion = clip.read_partner_motion(factories.abspath(cfg.partner_motion), n_frames) if cfg.partner_motion else None
    why_not = "stream=false" if not cfg.stream else clip.why_not_streamed(encoders.audio_encoder, cfg.vad, partner_motion is not None)
    if why_not is None:  # one pass over the files in blocks: the actor's VAD, NaN/inf samples refused
        vad = clip.energy_vad_stream(actor_file, n_frames)  # (T,) actor speaks
        if partner_file is not None:
            partner_file.check_finite()
    else:
        print(f"[generate] whole-recording path ({why_not}): memory grows with the input's length")
        actor = clip.read_audio(actor_file.path)
        partner = clip.read_audio(partner_file.path) if partner_file is not None else np.zeros_like(actor)
        vad = vad_frames(actor[: n_frames * clip.SAMPLES_PER_FRAME], n_frames, method=cfg.vad)  # (T,) actor speaks

    # -- the checkpoint's VAE, encoders and AR-Flow (compatibility checked) -----------------------
    vae, normalizer, _ = factories.load_frozen_vae(vae_dir, device)
    text_enc, audio_enc = factories.make_encoders(encoders, device)
    model, _ = load_arflow(ckpt, device, expect={"d_latent": vae.cfg.d_latent, "d_text": text_enc.dim, "d_audio": audio_enc.dim,
                                                 "r": r})
    precision = resolve_precision(cfg.precision, device, linear_weight_bytes(model))
    model = compress(model, precision)  # fp32: the model itself
    print(f"[generate] AR-Flow weights in {precision} (precision={cfg.precision})")

    text = str(cfg.text or "")
    settings = dict(text=text, steps=int(cfg.steps), w_speak=w_speak, w_listen=w_listen, seed=int(cfg.seed), cfg_drop=cfg_drop)
    if why_not is None:
        blocks = clip.stream_motion(model, vae, normalizer, text_enc, audio_enc, actor_file, partner_file, n_frames, vad,
                                    progress=cfg.progress, **settings)  # (m, 67) blocks
        clip.write_clip_stream(npz, png, blocks, n_frames, vad, text, ckpt)
    else:
        motion = clip.generate_clip(model, vae, normalizer, text_enc, audio_enc, actor, partner, n_frames, vad,
                                    partner_motion=partner_motion, **settings)  # (T, 67)
        clip.check_finite_motion(motion, ckpt)
        clip.write_clip(npz, png, motion, vad, text)
    print(f"[generate] {n_frames} frames ({n_frames / FPS:.2f} s) -> {npz} and {png}")


if __name__ == "__main__":
    main()
