"""Held-out generation and the reports the training stages print.

- :func:`generate_motion`: ODE-sample every row of a window bank and decode to raw FLAME (:func:`sample_latents`:
  the latents it decodes);
- :func:`teacher_forced_motion`: the same ODE for every token at once, each given the ground-truth
  history (the model's one-step conditionals, without its own rollout: where the collapse arises);
- :func:`quality_report`: speaking jaw correlation and listening dynamics of a supervised model
  (:func:`quality_figures` of any prediction, e.g. :func:`reconstruct_motion`'s: the ground truth
  through the VAE, the ceiling of any model decoded by it);
- :func:`column_table` / :func:`before_after`: the supervised-vs-post-trained table, paired per window.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from ..agents.arflow import DROP_KEYS, adapter_kwargs
from ..agents.flow import euler_step, time_grid
from ..envs.flame import GROUP_NAMES, GROUPS
from ..envs.windows import cond_from_bank, decode_latents
from ..rewards.stats import dynamic_deviation, velocity_std
from .metrics import paired_bootstrap_ci


@torch.no_grad()
def generate_motion(model, vae, normalizer, bank, steps: int = 10, w_speak: float = 1.0, w_listen: float = 1.0,
                    seed: int = 0, batch_size: int = 32, text_emb: torch.Tensor | None = None, progress: bool = False,
                    desc: str = "generate", cfg_drop=DROP_KEYS) -> torch.Tensor:
    """ODE-sample every row of ``bank`` and decode to raw FLAME ``(B, W, 67)``.

    CFG weights ``w_speak`` / ``w_listen`` against an unconditional branch that nulls ``cfg_drop``
    (``agents.sampling.check_cfg_drop``; default all conditions, the paper's).

    Deterministic given ``seed`` and ``batch_size``: one generator, seeded once, draws the noise of
    every batch in row order. ``text_emb (B, Dt)`` replaces the rows' text condition (text control:
    every row then has text). ``progress`` shows a bar over the batches.
    """
    batches = _sampled_batches(model, bank, steps, w_speak, w_listen, seed, batch_size, text_emb, progress, desc, cfg_drop)
    return torch.cat([decode_latents(vae, normalizer, z) for z in batches])  # (B, W, 67)


@torch.no_grad()
def sample_latents(model, bank, steps: int = 10, w_speak: float = 1.0, w_listen: float = 1.0, seed: int = 0,
                   batch_size: int = 32, cfg_drop=DROP_KEYS) -> torch.Tensor:
    """The latents ``(B, N, Dv)`` :func:`generate_motion` decodes (the same noise for the same arguments)."""
    return torch.cat(list(_sampled_batches(model, bank, steps, w_speak, w_listen, seed, batch_size, None, False, "", cfg_drop)))


def _sampled_batches(model, bank, steps, w_speak, w_listen, seed, batch_size, text_emb, progress, desc, cfg_drop):
    """ODE samples of ``bank``'s rows, one ``(b, N, Dv)`` batch at a time (one generator, seeded once)."""
    B = bank.batch_size[0]
    if text_emb is not None and text_emb.shape[0] != B:
        raise ValueError(f"generate_motion: text_emb has {text_emb.shape[0]} rows, the bank {B}")
    g = torch.Generator(device=bank.device).manual_seed(int(seed))
    n_tokens = bank["actor_latent"].shape[1]
    for i in tqdm(range(0, B, batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        b = bank[i : i + batch_size]
        cond = cond_from_bank(b)
        if text_emb is not None:
            te = text_emb[i : i + batch_size].to(bank.device)  # (b, Dt)
            cond = {**cond, "text_emb": te, "text_mask": torch.ones(te.shape[0], dtype=torch.bool, device=bank.device)}
        yield model.sample(cond, n_tokens, steps=int(steps), w_speak=float(w_speak), w_listen=float(w_listen),
                           speaking_tokens=b["speaking_tokens"], generator=g, cfg_drop=cfg_drop)  # (b, N, Dv)


@torch.no_grad()
def teacher_forced_motion(model, vae, normalizer, bank, steps: int = 10, seed: int = 0, batch_size: int = 32) -> torch.Tensor:
    """Euler-ODE sample of every token of every row of ``bank`` at once, token l given the rows' ground-truth
    latents ``< l`` as history (the teacher-forced pass of training; CFG 1), decoded to raw FLAME ``(B, W, 67)``.

    A free-running sample (:func:`generate_motion`) conditions each token on the model's own earlier
    tokens; this one on the ground truth's. Where the free-running motion has less dynamics than this,
    the collapse comes from the rollout, not from the one-token conditionals. Deterministic given ``seed``
    and ``batch_size``.
    """
    g = torch.Generator(device=bank.device).manual_seed(int(seed))
    grid = time_grid(int(steps), device=bank.device)
    outs = []
    for i in range(0, bank.batch_size[0], batch_size):
        b = bank[i : i + batch_size]
        cond, gt = cond_from_bank(b), b["actor_latent"]  # gt (b, N, Dv)
        spk = adapter_kwargs(model, b["speaking_tokens"])  # (b, N) speaking mask, for listening parts (adapter, LoRA)
        x = torch.randn(gt.shape, generator=g, device=gt.device, dtype=gt.dtype)  # t = 0: noise
        for k in range(int(steps)):
            t = grid[k].expand(gt.shape[:2])  # (b, N)
            v = model(cond, gt, x, t, drop={}, **spk)  # (b, N, Dv); no condition nulled
            x = euler_step(x, v, grid[k + 1] - grid[k])
        outs.append(decode_latents(vae, normalizer, x))  # (b, W, 67)
    return torch.cat(outs)


def _vel_std_ratio(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> float:
    return float(velocity_std(pred, mask).mean() / velocity_std(gt, mask).mean().clamp(min=1e-8))


def quality_report(model, vae, normalizer, bank, n_windows: int = 64, steps: int = 10, seed: int = 0, **cfg_w) -> dict:
    """:func:`quality_figures` of ``model``'s ODE samples of the first ``n_windows`` rows of ``bank``."""
    b = bank[: min(n_windows, bank.batch_size[0])]
    return quality_figures(generate_motion(model, vae, normalizer, b, steps=steps, seed=seed, **cfg_w), b)


@torch.no_grad()
def reconstruct_motion(vae, normalizer, bank) -> torch.Tensor:
    """The rows' ground truth through the VAE: ``bank["actor_latent"]`` (posterior means) decoded to raw
    FLAME ``(B, W, 67)``. The best any model decoded by this VAE reaches without emitting latents off
    the VAE's data manifold (on the default corpus its listening expr velocity-std ratio is 0.33)."""
    return decode_latents(vae, normalizer, bank["actor_latent"])


def quality_figures(pred: torch.Tensor, b) -> dict:
    """Speaking: Pearson correlation and MSE of the jaw opening (channel 50); listening: per group,
    velocity-std ratio (pred / gt) and dynamic deviation. ``pred (B, W, 67)``: raw FLAME of the rows of ``b``."""
    gt = b["actor_motion"]
    rep: dict = {"n_windows": int(b.batch_size[0])}
    spk = b["speaking"]
    pj, gj = pred[..., GROUPS["jaw"].start], gt[..., GROUPS["jaw"].start]  # (B, W) jaw opening
    m = spk.float()
    n = m.sum().clamp(min=2)
    pc = pj - (pj * m).sum() / n
    gc = gj - (gj * m).sum() / n
    rep["speaking/jaw_corr"] = float((pc * gc * m).sum() / ((pc.pow(2) * m).sum().sqrt() * (gc.pow(2) * m).sum().sqrt() + 1e-8))
    rep["speaking/jaw_mse"] = float(((pj - gj).pow(2) * m).sum() / n)
    lis = b["listening"]
    for gi, g in enumerate(GROUP_NAMES):
        rows = b["actor_valid"][:, gi] & (lis.sum(1) > 2)
        if not rows.any():
            continue
        sl = GROUPS[g]
        rep[f"listening/{g}/vel_std_ratio"] = _vel_std_ratio(pred[rows][..., sl], gt[rows][..., sl], lis[rows])
        rep[f"listening/{g}/vel_std_dev"] = float(dynamic_deviation(pred[rows][..., sl], gt[rows][..., sl], lis[rows]).mean())
    return rep


def numeric_items(d: dict) -> dict:
    """The entries of ``d`` that are plain numbers (for logging)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def print_quality_report(rep: dict, title: str) -> None:
    print(f"\n== {title} ==")
    for k, v in rep.items():
        print(f"  {k:40s} {v:.4f}" if isinstance(v, float) else f"  {k:40s} {v}")


def column_table(pred: torch.Tensor, b, reward, reference: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Per reward column of a prediction ``pred (B, W, 67)`` of the rows of ``b``: velocity-std deviation
    (|std(vel pred) - std(vel gt)|), ratio and reward on the column's frames (listening; speaking for
    ``<group>@speaking`` columns; ``<group>@hold`` columns are rewarded against ``reference (B, W, 67)``, their
    deviation is against the ground truth).

    Returns the table and the per-window values ``{"{g}/vel_std_dev": (n,), "{g}/reward": (n,)}`` of the
    windows with more than 2 of those frames (for paired comparisons).
    """
    from ..rewards.groups import column_frame_key, column_group, reward_kwargs

    gt, lis = b["actor_motion"], b["listening"]
    rewards = reward(pred, gt, lis, b["actor_valid"], **reward_kwargs(reward, b, reference))  # (B, n_groups)
    out, per_window = {}, {}
    for i, g in enumerate(reward.group_names):
        group, frames = column_group(g)
        m = b[column_frame_key(frames)]  # (B, W) the column's frames
        rows, sl = m.sum(1) > 2, GROUPS[group]
        dev = dynamic_deviation(pred[rows][..., sl], gt[rows][..., sl], m[rows])  # (n,) one per window
        per_window[f"{g}/vel_std_dev"], per_window[f"{g}/reward"] = dev, rewards[rows, i]
        out[f"{g}/vel_std_dev"] = float(dev.mean())
        out[f"{g}/vel_std_ratio"] = _vel_std_ratio(pred[rows][..., sl], gt[rows][..., sl], m[rows])
        out[f"{g}/reward"] = float(rewards[rows, i].mean())
    return out, per_window


def before_after(supervised, trained, vae, normalizer, bank, reward, n_windows: int, steps: int, seed: int,
                 label: str = "post-trained") -> dict:
    """Print and return the supervised-vs-post-trained table on held-out windows (ODE sampler).

    Both policies sample with the same noise, so windows are paired: the table adds, per rewarded
    group, the mean change with a 95 % paired-bootstrap interval and the share of windows improved.
    A ``<group>@hold`` column is rewarded against the supervised model's sample here (0 for the supervised row).
    """
    b = bank[: min(int(n_windows), bank.batch_size[0])]
    sup = generate_motion(supervised, vae, normalizer, b, steps=int(steps), seed=int(seed))  # (n, W, 67)
    before, pw_before = column_table(sup, b, reward, reference=sup)
    after, pw_after = column_table(generate_motion(trained, vae, normalizer, b, steps=int(steps), seed=int(seed)), b, reward,
                                   reference=sup)
    recon, _ = column_table(reconstruct_motion(vae, normalizer, b), b, reward, reference=sup)  # the VAE's ceiling
    print(f"\n== listening frames, held-out windows (n={b.batch_size[0]}), ODE {int(steps)} steps ==")
    print(f"  {'metric':32s} {'supervised':>12s} {label:>12s}   {'change [95% CI]':>28s} {'windows better':>15s} {'VAE recon.':>11s}")
    out = {}
    for k in before:
        line = f"  {k:32s} {before[k]:12.4f} {after[k]:12.4f}"
        if k in pw_before:
            diff = pw_after[k] - pw_before[k]  # (n,) paired per window
            frac_better = float((diff < 0 if k.endswith("vel_std_dev") else diff > 0).float().mean())
            mean, lo, hi = paired_bootstrap_ci(diff, seed=int(seed))
            out.update({f"change/{k}": mean, f"change/{k}/ci_low": lo, f"change/{k}/ci_high": hi, f"change/{k}/frac_better": frac_better})
            line += f"   {mean:+10.5f} [{lo:+.5f}, {hi:+.5f}] {100 * frac_better:14.0f}%"
        else:
            line += " " * 46
        print(line + f" {recon[k]:11.4f}")
    print("  (VAE recon.: the ground truth through the VAE, the ceiling of any policy decoded by it; "
          "docs/benchmarks.md, \"The VAE's ceiling\")")
    return {**{f"before/{k}": v for k, v in before.items()}, **{f"after/{k}": v for k, v in after.items()},
            **{f"vae_reconstruction/{k}": v for k, v in recon.items()}, **out}
