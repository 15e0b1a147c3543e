"""Long-sequence check (paper 4.3): does sliding-window generation decay into stillness?

    python train/long_generation.py                                  # default supervised checkpoint
    python train/long_generation.py checkpoint=runs/gdpo_small_expr+rot frames=3600

Both sides of held-out long synthetic conversations (``long_data``: 4 x 144 s, seed 1, produced on
first use) are generated for ``frames`` frames by ``ARFlow.generate_long`` (windows of the model's
tokens, the latest ``k`` latents as prefix, each window conditioned on its own audio, partner
motion and text). Per FLAME group, the velocity std is measured on consecutive ``segment_seconds``
segments of generated and ground-truth motion; the *decay* is the mean over the last 1/``parts``
of the segments divided by the mean over the first 1/``parts`` (1 = as lively at the end as at the
start). The check passes when, for every group, the generated decay is at least ``tolerance``
times the ground truth's: generation does not grow still faster than the data does
(``gdpo_listener.evaluation.long_sequences``). Writes a JSON report.
"""
from __future__ import annotations

import os

from gdpo_listener.pipeline.threads import omp_wait_defaults  # imports no torch

os.environ.update(omp_wait_defaults())  # before torch loads: OpenMP threads spin briefly, then sleep (pipeline/threads.py)

import time  # noqa: E402

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gdpo_listener.agents.arflow import load_arflow  # noqa: E402
from gdpo_listener.agents.checkpoint import atomic_write_json  # noqa: E402
from gdpo_listener.agents.encoders import precompute_features  # noqa: E402
from gdpo_listener.envs.flame import FPS  # noqa: E402
from gdpo_listener.envs.windows import decode_latents, window_cond  # noqa: E402
from gdpo_listener.evaluation.checkpoints import ensure_checkpoint, read_arflow_meta, recorded_vae_dir, vae_frames_per_token  # noqa: E402
from gdpo_listener.evaluation.long_sequences import decay_passes, decay_table, format_decay_table, long_sequence_bank  # noqa: E402
from gdpo_listener.pipeline import factories, stages  # noqa: E402
from gdpo_listener.pipeline.threads import configure_threads  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="long_generation")
def main(cfg: DictConfig) -> None:
    configure_threads(cfg.threads)
    device = factories.make_device(cfg.device)
    t0 = time.perf_counter()
    ckpt = factories.abspath(cfg.checkpoint)
    ensure_checkpoint(cfg, ckpt)
    meta = read_arflow_meta(ckpt)
    vae_dir = recorded_vae_dir(ckpt, meta, cfg.vae_dir)
    frames, parts, r = int(cfg.frames), int(cfg.parts), vae_frames_per_token(vae_dir)
    segment = int(round(float(cfg.segment_seconds) * FPS))
    if frames <= 0 or frames % r:
        raise ValueError(f"frames={cfg.frames} must be a positive multiple of r={r} (frames per latent token of VAE {vae_dir})")
    if parts < 1 or not 3 <= segment <= frames // parts:
        raise ValueError(f"segment_seconds={cfg.segment_seconds} gives {segment}-frame segments; need >= 3 frames and "
                         f">= parts={cfg.parts} segments in frames={frames}")

    vae, normalizer, _ = factories.load_frozen_vae(vae_dir, device)
    feat_cfg = factories.checkpoint_encoders(cfg.features, meta)
    text_enc, audio_enc = factories.make_encoders(feat_cfg, device)
    root = stages.ensure_dataset(cfg.long_data)
    features = precompute_features(root, text_enc, audio_enc, factories.abspath(feat_cfg.cache_dir))
    bank = long_sequence_bank(root, frames, features, vae, normalizer, device)
    model, _ = load_arflow(ckpt, device, expect={"d_latent": vae.cfg.d_latent, "d_text": text_enc.dim, "d_audio": audio_enc.dim,
                                                 "r": r})
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    t1 = time.perf_counter()
    with torch.no_grad():
        z = model.generate_long(lambda f0, nf: window_cond(bank, f0 // r, nf // r, r), frames, k=int(cfg.k),
                                steps=int(cfg.steps), w_speak=float(cfg.w_speak), w_listen=float(cfg.w_listen),
                                speaking_tokens=bank["speaking_tokens"], generator=g)  # (B, frames / r, Dv)
        pred = decode_latents(vae, normalizer, z)  # (B, T, 67)
    t_gen = time.perf_counter() - t1
    table = decay_table(pred, bank["actor_motion"], bank["actor_valid"], segment, parts)
    print("\n" + format_decay_table(table, float(cfg.tolerance), pred.shape[0], frames, segment, parts))
    out = factories.abspath(cfg.out) if cfg.out else ckpt / "long_generation.json"
    atomic_write_json(out, {"checkpoint": str(ckpt), "frames": frames, "sequences": pred.shape[0], "segment_frames": segment,
                            "parts": parts, "tolerance": float(cfg.tolerance), "passed": decay_passes(table, float(cfg.tolerance)),
                            "groups": table, "generation_seconds": t_gen})
    print(f"[long_generation] generated {pred.shape[0]} x {frames / FPS:.0f} s in {t_gen:.1f} s "
          f"(RTF {t_gen / (pred.shape[0] * frames / FPS):.3f} per sequence); total {time.perf_counter() - t0:.1f} s -> {out}")


if __name__ == "__main__":
    main()
