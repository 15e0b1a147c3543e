"""Factories shared by the training entry points (``make_*``), in the order a recipe uses them.

Scripts in ``train/`` import this module as ``common`` (the script folder is on ``sys.path``).
Stage prerequisites (dataset, VAE, supervised AR-Flow) are produced on demand by running the
stage's own entry point, so ``python train/gdpo.py`` works on a fresh clone and later runs reuse
what is already there.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from gdpo_listener.agents.checkpoint import is_checkpoint
from gdpo_listener.envs.dataset import WINDOW, DyadicWindows, load_meta
from gdpo_listener.envs.windows import build_window_bank

TRAIN_DIR = Path(__file__).resolve().parent


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available on this machine")
    return dev


def abspath(p: str | os.PathLike) -> Path:
    return Path(to_absolute_path(str(p)))


def run_stage(script: str, overrides: list[str]) -> None:
    """Run another entry point (``train/<script>``) as a subprocess; fail loudly if it fails."""
    cmd = [sys.executable, str(TRAIN_DIR / script), *overrides]
    print(f"[pipeline] running: {' '.join(cmd[1:])}", flush=True)
    res = subprocess.run(cmd, cwd=os.getcwd())
    if res.returncode != 0:
        raise RuntimeError(f"stage {script} failed with exit code {res.returncode} (command: {' '.join(cmd)})")


def make_dataset(data_cfg: DictConfig) -> Path:
    """The canonical dataset folder; the synthetic corpus is generated if missing and allowed."""
    root = abspath(data_cfg.root)
    if not (root / "dataset.json").is_file():
        if not data_cfg.get("auto_prepare", False):
            raise FileNotFoundError(f"no dataset at {root}; run train/prepare_data.py or set data.auto_prepare=true")
        over = [f"source=synthetic", f"out={root}", f"seed={data_cfg.seed}"]
        for k in ("n_conversations", "seconds"):
            if data_cfg.get(k) is not None:
                over.append(f"synthetic.{k}={data_cfg[k]}")
        run_stage("prepare_data.py", over)
    load_meta(root)
    return root


def make_vae_checkpoint(cfg: DictConfig, data_root: Path) -> Path:
    """Path of the frozen VAE; trained with ``train/vae.py`` if missing and ``auto_train`` is set."""
    path = abspath(cfg.pretrained.vae)
    if not is_checkpoint(path):
        if not cfg.pretrained.get("auto_train", False):
            raise FileNotFoundError(f"no VAE checkpoint at {path}; run train/vae.py or set pretrained.auto_train=true")
        run_stage("vae.py", [f"data.root={data_root}", f"out_dir={path}", f"device={cfg.device}", *cfg.pretrained.get("vae_overrides", [])])
    return path


def make_sft_checkpoint(cfg: DictConfig, data_root: Path, vae_path: Path) -> Path:
    """Path of the supervised AR-Flow; trained with ``train/sft.py`` if missing and allowed."""
    path = abspath(cfg.pretrained.sft)
    if not is_checkpoint(path):
        if not cfg.pretrained.get("auto_train", False):
            raise FileNotFoundError(f"no supervised AR-Flow checkpoint at {path}; run train/sft.py or set pretrained.auto_train=true")
        run_stage("sft.py", [
            f"data.root={data_root}", f"vae_dir={vae_path}", f"out_dir={path}", f"device={cfg.device}",
            f"model={cfg.model.preset}", f"features.cache_dir={cfg.features.cache_dir}",
            f"features.text_encoder={cfg.features.text_encoder}", f"features.audio_encoder={cfg.features.audio_encoder}",
            *cfg.pretrained.get("sft_overrides", []),
        ])
    return path


def make_encoders(feat_cfg: DictConfig, device: torch.device):
    from gdpo_listener.agents.encoders import AudioEncoder, TextEncoder

    return TextEncoder(feat_cfg.text_encoder, device=device), AudioEncoder(feat_cfg.audio_encoder, device=device)


def checkpoint_encoders(feat_cfg: DictConfig, ckpt_meta: dict) -> DictConfig:
    """Encoder config: ``feat_cfg``'s non-null entries, else those recorded in the checkpoint, else the defaults."""
    recorded = ((ckpt_meta.get("config") or {}).get("features") or {})
    return OmegaConf.create({
        "text_encoder": feat_cfg.text_encoder or recorded.get("text_encoder") or "bundled-minilm",
        "audio_encoder": feat_cfg.audio_encoder or recorded.get("audio_encoder") or "logmel",
        "cache_dir": feat_cfg.cache_dir})


def make_features(feat_cfg: DictConfig, data_root: Path, device: torch.device):
    from gdpo_listener.agents.encoders import precompute_features

    text_enc, audio_enc = make_encoders(feat_cfg, device)
    feats = precompute_features(data_root, text_enc, audio_enc, abspath(feat_cfg.cache_dir))
    return feats, text_enc, audio_enc


def make_banks(data_root: Path, features, vae, normalizer, device, splits=("train", "test"), max_windows: int | None = None,
               window: int | None = None):
    """Window banks per split; ``window`` (frames, default the dataset's 200) > 200 gives long rows."""
    banks = {}
    for split in splits:
        windows = DyadicWindows(data_root, split, load_audio=False, window=window or WINDOW)
        idx = None
        if max_windows is not None and len(windows) > max_windows:
            idx = np.random.default_rng(0).choice(len(windows), max_windows, replace=False).tolist()
        banks[split] = build_window_bank(windows, features, vae, normalizer, device=device, indices=idx)
    return banks


def make_logger(log_cfg: DictConfig, out_dir: Path, exp_name: str, state_dict=None):
    from torchrl.record.loggers import get_logger

    if not log_cfg.backend:
        return None
    kwargs = {}
    if log_cfg.backend == "wandb":
        kwargs = {"project": log_cfg.get("project", "gdpo-listener")}
    return get_logger(log_cfg.backend, logger_name=str(out_dir / "logs"), experiment_name=exp_name, state_dict=state_dict, **kwargs)


def log_scalars(logger, scalars: dict, step: int) -> None:
    if logger is None:
        return
    for k, v in scalars.items():
        logger.log_scalar(k, float(v), step=step)


def resolved_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def resume_config(cfg: DictConfig, keys) -> dict:
    """The config sections (``keys``) a resumed run must share with the run that wrote the state."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keys}


def load_resume_state(path: Path, cfg: DictConfig, keys, device) -> dict:
    """The training state at ``path`` (written with ``"config": resume_config(cfg, keys)``), refused clearly
    when missing or written with another config."""
    if not path.is_file():
        raise FileNotFoundError(f"resume=true but no training state at {path}")
    state = torch.load(path, map_location=device, weights_only=False)
    now, then = resume_config(cfg, keys), state.get("config") or {}
    diff = [k for k in keys if then.get(k) != now[k]]
    if diff:
        raise ValueError(f"resume folder {path.parent.parent} was written with another config (differs in: {', '.join(diff)})")
    return state


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Global RNG states (torch, CUDA, numpy, python) and that of the run's ``generator``."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "generator": None if generator is None else generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------
# models


def load_frozen_vae(path: Path, device: torch.device):
    from gdpo_listener.agents.vae import load_vae

    vae, normalizer, vae_cfg = load_vae(path, device)
    vae.eval().requires_grad_(False)
    return vae, normalizer, vae_cfg


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def arflow_config(model_cfg: DictConfig, **dims):
    """ARFlowConfig of the preset ``model_cfg.preset`` with ``model_cfg.arch`` and ``dims`` overrides."""
    import dataclasses

    from gdpo_listener.agents.arflow import ARFlowConfig

    presets = {"small": ARFlowConfig.small, "paper": ARFlowConfig.paper}
    if model_cfg.preset not in presets:
        raise ValueError(f"unknown model preset {model_cfg.preset!r}; valid: {sorted(presets)}")
    arch = {**OmegaConf.to_container(model_cfg.arch, resolve=True), **dims}
    fields = {f.name for f in dataclasses.fields(ARFlowConfig)}
    unknown = sorted(set(arch) - fields)
    if unknown:
        raise ValueError(f"unknown AR-Flow config fields {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(presets[model_cfg.preset](), **arch)


def make_arflow(model_cfg: DictConfig, **dims):
    from gdpo_listener.agents.arflow import ARFlow

    return ARFlow(arflow_config(model_cfg, **dims))


def save_arflow(out_dir: Path, model, cfg: DictConfig, extra: dict | None = None) -> Path:
    import dataclasses

    from gdpo_listener.agents.checkpoint import save_checkpoint

    meta = {"arch": dataclasses.asdict(model.cfg), "preset": cfg.model.preset, "config": resolved_config(cfg), **(extra or {})}
    return save_checkpoint(out_dir, "arflow", {"model": model.state_dict()}, meta)


def load_arflow(path: Path, device: torch.device, expect: dict | None = None, preset: str | None = None):
    """Load an AR-Flow checkpoint; ``expect`` (e.g. ``{"d_latent": 16}``) must match its config and
    ``preset`` (if given) the preset it was trained with."""
    from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
    from gdpo_listener.agents.checkpoint import CheckpointError, load_meta, load_weights

    meta = load_meta(path, kind="arflow")
    if preset is not None and meta.get("preset") != preset:
        raise CheckpointError(f"{path}: AR-Flow checkpoint of preset {meta.get('preset')!r}, but the run uses model={preset} "
                              f"(point pretrained.sft at a {preset} checkpoint or drop the model override)")
    cfg = ARFlowConfig(**meta["arch"])
    for k, v in (expect or {}).items():
        if getattr(cfg, k) != v:
            raise CheckpointError(f"{path}: AR-Flow checkpoint has {k}={getattr(cfg, k)} but the pipeline needs {k}={v}")
    model = ARFlow(cfg).to(device)
    model.load_state_dict(load_weights(path, "model", device))
    return model.eval(), meta


# ----------------------------------------------------------------------------------------------
# quality report (speaking jaw correlation, listening dynamics) on held-out windows


@torch.no_grad()
def generate_motion(model, vae, normalizer, bank, steps: int = 10, w_speak: float = 1.0, w_listen: float = 1.0,
                    seed: int = 0, batch_size: int = 32) -> torch.Tensor:
    """ODE-sample every row of ``bank`` and decode to raw FLAME ``(B, W, 67)``."""
    from gdpo_listener.envs.windows import cond_from_bank

    outs = []
    g = torch.Generator(device=bank.device).manual_seed(seed)
    n_tokens = bank["actor_latent"].shape[1]
    for i in range(0, bank.batch_size[0], batch_size):
        b = bank[i : i + batch_size]
        z = model.sample(cond_from_bank(b), n_tokens, steps=steps, w_speak=w_speak, w_listen=w_listen,
                         speaking_tokens=b["speaking_tokens"], generator=g)
        outs.append(normalizer.denormalize(vae.decode(z)))
    return torch.cat(outs)


def quality_report(model, vae, normalizer, bank, n_windows: int = 64, steps: int = 10, seed: int = 0, **cfg_w) -> dict:
    from gdpo_listener.envs.flame import GROUP_NAMES, GROUPS
    from gdpo_listener.rewards.stats import dynamic_deviation, velocity_std

    b = bank[: min(n_windows, bank.batch_size[0])]
    pred = generate_motion(model, vae, normalizer, b, steps=steps, seed=seed, **cfg_w)
    gt = b["actor_motion"]
    rep: dict = {"n_windows": int(b.batch_size[0])}
    # speaking: Pearson correlation of the jaw opening (channel 50) with ground truth, speaking frames
    spk = b["speaking"]
    pj, gj = pred[..., 50], gt[..., 50]
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
        vs_p = velocity_std(pred[rows][..., sl], lis[rows]).mean()
        vs_g = velocity_std(gt[rows][..., sl], lis[rows]).mean()
        rep[f"listening/{g}/vel_std_ratio"] = float(vs_p / vs_g.clamp(min=1e-8))
        rep[f"listening/{g}/vel_std_dev"] = float(dynamic_deviation(pred[rows][..., sl], gt[rows][..., sl], lis[rows]).mean())
    return rep


def flatten(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


def print_quality_report(rep: dict, title: str) -> None:
    print(f"\n== {title} ==")
    for k, v in rep.items():
        print(f"  {k:40s} {v:.4f}" if isinstance(v, float) else f"  {k:40s} {v}")


# ----------------------------------------------------------------------------------------------
# RL helpers


def make_reward(cfg: DictConfig):
    """The ``FlameReward`` of ``reward=...`` and the ``rewards`` section (validated early)."""
    from gdpo_listener.rewards.groups import build_reward

    r = cfg.rewards
    return build_reward(cfg.reward, weights=r.weights, lambdas=r.lambdas, group_reward=r.group_reward, extra_terms=r.extra_terms)


def advantage_stats(traj, reward) -> dict:
    """Advantage diagnostics for logging (tensors; converted by the caller)."""
    from gdpo_listener.agents.advantages import advantage_stats as group_stats

    a = traj["advantage"]
    out = {"mean": a.mean(), "std": a.std(), "abs_mean": a.abs().mean()}
    for k, v in group_stats(traj["reward"], traj["group_id"]).items():
        if torch.is_tensor(v) and v.numel() == len(reward.group_names):
            for g, x in zip(reward.group_names, v):
                out[f"{k}/{g}"] = x
        elif torch.is_tensor(v) and v.numel() == 1:
            out[k] = v.reshape(())
    return out


@torch.no_grad()
def listening_table(model, vae, normalizer, bank, reward, n_windows: int, steps: int, seed: int) -> tuple[dict, dict]:
    """Per rewarded group: listening velocity-std deviation (|std(vel pred) - std(vel gt)|), ratio and reward.

    Returns the table and the per-window values ``{"{g}/vel_std_dev": (n,), "{g}/reward": (n,)}`` of the
    windows with listening frames (for paired comparisons).
    """
    from gdpo_listener.envs.flame import GROUPS
    from gdpo_listener.rewards.stats import dynamic_deviation, velocity_std

    b = bank[: min(n_windows, bank.batch_size[0])]
    pred = generate_motion(model, vae, normalizer, b, steps=steps, seed=seed)
    gt, lis = b["actor_motion"], b["listening"]
    rewards = reward(pred, gt, lis, b["actor_valid"])  # (B, n_groups)
    rows = lis.sum(1) > 2
    out, per_window = {}, {}
    for i, g in enumerate(reward.group_names):
        sl = GROUPS[g]
        dev = dynamic_deviation(pred[rows][..., sl], gt[rows][..., sl], lis[rows])  # (n,) one per window
        per_window[f"{g}/vel_std_dev"], per_window[f"{g}/reward"] = dev, rewards[rows, i]
        out[f"{g}/vel_std_dev"] = float(dev.mean())
        out[f"{g}/vel_std_ratio"] = float(velocity_std(pred[rows][..., sl], lis[rows]).mean() / velocity_std(gt[rows][..., sl], lis[rows]).mean().clamp(min=1e-8))
        out[f"{g}/reward"] = float(rewards[rows, i].mean())
    return out, per_window


def before_after(supervised, trained, vae, normalizer, bank, reward, cfg) -> dict:
    """Print and return the supervised-vs-post-trained table on held-out windows (ODE sampler).

    Both policies sample with the same noise, so windows are paired: the table adds, per rewarded
    group, the mean change with a 95 % paired-bootstrap interval and the share of windows improved.
    """
    from gdpo_listener.rewards.metrics import paired_bootstrap_ci

    kw = dict(n_windows=int(cfg.eval.n_windows), steps=int(cfg.eval.steps), seed=int(cfg.seed))
    before, pw_before = listening_table(supervised, vae, normalizer, bank, reward, **kw)
    after, pw_after = listening_table(trained, vae, normalizer, bank, reward, **kw)
    print(f"\n== listening frames, held-out windows (n={min(kw['n_windows'], bank.batch_size[0])}), ODE {kw['steps']} steps ==")
    print(f"  {'metric':32s} {'supervised':>12s} {cfg.algo.name:>12s}   {'change [95% CI]':>28s} {'windows better':>15s}")
    out = {}
    for k in before:
        line = f"  {k:32s} {before[k]:12.4f} {after[k]:12.4f}"
        if k in pw_before:
            diff = pw_after[k] - pw_before[k]  # (n,) paired per window
            frac_better = float((diff < 0 if k.endswith("vel_std_dev") else diff > 0).float().mean())
            mean, lo, hi = paired_bootstrap_ci(diff, seed=int(cfg.seed))
            out.update({f"change/{k}": mean, f"change/{k}/ci_low": lo, f"change/{k}/ci_high": hi, f"change/{k}/frac_better": frac_better})
            line += f"   {mean:+10.5f} [{lo:+.5f}, {hi:+.5f}] {100 * frac_better:14.0f}%"
        print(line)
    return {**{f"before/{k}": v for k, v in before.items()}, **{f"after/{k}": v for k, v in after.items()}, **out}
