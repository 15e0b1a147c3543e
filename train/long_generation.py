"""Long-sequence check (paper 4.3): does sliding-window generation decay into stillness?

    python train/long_generation.py                                  # default supervised checkpoint
    python train/long_generation.py checkpoint=runs/gdpo_small_expr+rot frames=3600

Both sides of held-out long synthetic conversations (``long_data``: 4 x 144 s, seed 1, produced on
first use) are generated for ``frames`` frames by ``ARFlow.generate_long`` (windows of 25 tokens,
the latest ``k`` latents as prefix, each window conditioned on its own audio, partner motion and
text). Per FLAME group, the velocity std is measured on consecutive ``segment_seconds`` segments
of generated and ground-truth motion; the *decay* is the mean over the last third of the segments
divided by the mean over the first third (1 = as lively at the end as at the start). The check
passes when, for every group, the generated decay is at least ``tolerance`` times the ground
truth's: generation does not grow still faster than the data does. Writes a JSON report.
"""
from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gdpo_listener.pipeline import factories, stages
from gdpo_listener.agents.arflow import load_arflow
from evaluate import checkpoint_meta, ensure_checkpoint
from gdpo_listener.agents.checkpoint import atomic_write_json
from gdpo_listener.agents.encoders import precompute_features
from gdpo_listener.envs.dataset import DyadicWindows
from gdpo_listener.envs.flame import FPS
from gdpo_listener.envs.windows import build_window_bank, decode_latents, window_cond
from gdpo_listener.evaluation.metrics import decay_ratio, stillness_profile


def make_long_bank(cfg: DictConfig, root: Path, features, vae, normalizer, device):
    """Every ``frames``-frame sequence (both roles) of the long dataset, as one bank of long rows."""
    banks = []
    for split in ("train", "test"):
        windows = DyadicWindows(root, split, load_audio=False, window=int(cfg.frames))
        if len(windows):
            banks.append(build_window_bank(windows, features, vae, normalizer, device=device))
    if not banks:
        raise ValueError(f"long_data {root} has no conversation of frames={cfg.frames} frames "
                         f"({cfg.frames / FPS:.0f} s); raise long_data.seconds or lower frames")
    return torch.cat(banks)


def decay_table(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, segment: int, parts: int) -> dict:
    """Per group: velocity-std profiles over segments and their decay, generated vs ground truth."""
    prof_pred, prof_gt = stillness_profile(pred, segment, valid), stillness_profile(gt, segment, valid)
    table = {}
    for g in prof_gt:
        dp, dg = decay_ratio(prof_pred[g], parts), decay_ratio(prof_gt[g], parts)
        table[g] = {"pred_profile": prof_pred[g].tolist(), "gt_profile": prof_gt[g].tolist(), "pred_decay": dp,
                    "gt_decay": dg, "relative_decay": dp / dg, "level_ratio": float(prof_pred[g].mean() / prof_gt[g].mean())}
    return table


def print_table(table: dict, tolerance: float, n_rows: int, frames: int, segment: int) -> bool:
    print(f"\n== long generation: {n_rows} sequences x {frames} frames ({frames / FPS:.0f} s), velocity std per "
          f"{segment / FPS:.0f} s segment ==")
    print(f"{'group':8s} {'gt first':>9s} {'gt last':>9s} {'gt decay':>9s} {'gen first':>10s} {'gen last':>9s} "
          f"{'gen decay':>10s} {'gen/gt decay':>13s} {'gen/gt level':>13s}")
    ok = True
    for g, r in table.items():
        k = max(1, len(r["gt_profile"]) // 3)
        pf, pl = sum(r["pred_profile"][:k]) / k, sum(r["pred_profile"][-k:]) / k
        gf, gl = sum(r["gt_profile"][:k]) / k, sum(r["gt_profile"][-k:]) / k
        ok &= r["relative_decay"] >= tolerance
        print(f"{g:8s} {gf:9.5f} {gl:9.5f} {r['gt_decay']:9.3f} {pf:10.5f} {pl:9.5f} {r['pred_decay']:10.3f} "
              f"{r['relative_decay']:13.3f} {r['level_ratio']:13.3f}")
    print(f"no faster decay than the data (gen/gt decay >= {tolerance} for every group): {'yes' if ok else 'NO'}")
    return ok


@hydra.main(version_base="1.3", config_path="conf", config_name="long_generation")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))
    device = factories.make_device(cfg.device)
    t0 = time.perf_counter()
    frames, r = int(cfg.frames), 8
    segment = int(round(float(cfg.segment_seconds) * FPS))
    if frames <= 0 or frames % r:
        raise ValueError(f"frames={cfg.frames} must be a positive multiple of r={r}")
    if not 3 <= segment <= frames // int(cfg.parts):
        raise ValueError(f"segment_seconds={cfg.segment_seconds} gives {segment}-frame segments; need >= 3 frames and "
                         f">= parts={cfg.parts} segments in frames={frames}")
    ckpt = factories.abspath(cfg.checkpoint)
    ensure_checkpoint(cfg, ckpt)
    meta = checkpoint_meta(ckpt)
    vae_dir = factories.abspath(cfg.vae_dir) if cfg.vae_dir else Path(meta["vae_dir"])
    vae, normalizer, _ = factories.load_frozen_vae(vae_dir, device)
    text_enc, audio_enc = factories.make_encoders(factories.checkpoint_encoders(cfg.features, meta), device)
    root = stages.ensure_dataset(cfg.long_data)
    features = precompute_features(root, text_enc, audio_enc, factories.abspath(cfg.features.cache_dir))
    bank = make_long_bank(cfg, root, features, vae, normalizer, device)
    model, _ = load_arflow(ckpt, device, expect={"d_latent": vae.cfg.d_latent, "d_text": text_enc.dim, "d_audio": audio_enc.dim})
    r = model.cfg.r
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    t1 = time.perf_counter()
    with torch.no_grad():
        z = model.generate_long(lambda f0, nf: window_cond(bank, f0 // r, nf // r, r), frames, k=int(cfg.k),
                                steps=int(cfg.steps), w_speak=float(cfg.w_speak), w_listen=float(cfg.w_listen),
                                speaking_tokens=bank["speaking_tokens"], generator=g)
        pred = decode_latents(vae, normalizer, z)  # (B, T, 67)
    t_gen = time.perf_counter() - t1
    table = decay_table(pred, bank["actor_motion"], bank["actor_valid"], segment, int(cfg.parts))
    ok = print_table(table, float(cfg.tolerance), pred.shape[0], frames, segment)
    out = factories.abspath(cfg.out) if cfg.out else ckpt / "long_generation.json"
    atomic_write_json(out, {"checkpoint": str(ckpt), "frames": frames, "sequences": pred.shape[0], "segment_frames": segment,
                            "parts": int(cfg.parts), "tolerance": float(cfg.tolerance), "passed": bool(ok), "groups": table,
                            "generation_seconds": t_gen})
    print(f"[long_generation] generated {pred.shape[0]} x {frames / FPS:.0f} s in {t_gen:.1f} s "
          f"(RTF {t_gen / (pred.shape[0] * frames / FPS):.3f} per sequence); total {time.perf_counter() - t0:.1f} s -> {out}")


if __name__ == "__main__":
    main()
