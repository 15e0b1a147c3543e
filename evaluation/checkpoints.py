"""What an evaluation reads from a checkpoint, checked before any long work.

- :func:`read_arflow_meta` / :func:`recorded_vae_dir` / :func:`vae_frames_per_token`: the AR-Flow
  checkpoint's ``meta.json``, the VAE it was trained with and that VAE's frames per latent token r
  (JSON only: nothing is loaded);
- :func:`ensure_checkpoint`: the default supervised checkpoint is produced on a fresh clone;
- :func:`check_compatibility`: the checkpoint and the evaluated dataset share the FLAME layout and format;
- :func:`run_reward_config`: the reward a post-trained run optimised (its recorded ``reward`` / ``rewards``).
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..agents.checkpoint import CheckpointError, load_checkpoint_meta
from ..pipeline import factories, stages


class EvalInputError(ValueError):
    """The checkpoint, dataset or FLAME model given to the evaluation do not fit together."""


# ----------------------------------------------------------------------------------------------
# the checkpoint and its VAE


def read_arflow_meta(path: Path) -> dict:
    """The AR-Flow checkpoint's ``meta.json``, with clear errors."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train one with train/sft.py or train/gdpo.py)")
    return load_checkpoint_meta(path, kind="arflow")


def recorded_vae_dir(ckpt: Path, ckpt_meta: dict, override=None) -> Path:
    """The VAE folder: ``override`` (the ``vae_dir`` setting) if given, else the one the checkpoint records."""
    if override:
        vae_dir = factories.abspath(override)
    elif ckpt_meta.get("vae_dir"):
        vae_dir = Path(ckpt_meta["vae_dir"])
    else:
        raise CheckpointError(f"checkpoint {ckpt} records no VAE folder (vae_dir); pass vae_dir=...")
    if not (vae_dir / "meta.json").is_file():
        raise FileNotFoundError(f"VAE {vae_dir} ({'vae_dir' if override else f'recorded in checkpoint {ckpt}'}) "
                                f"does not exist; pass vae_dir=...")
    return vae_dir


def vae_frames_per_token(vae_dir: Path) -> int:
    """r, the motion frames per latent token of the VAE at ``vae_dir`` (from its meta.json)."""
    meta = load_checkpoint_meta(vae_dir, kind="vae")
    try:
        r = int(meta["vae_config"]["r"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{vae_dir / 'meta.json'}: no vae_config.r (frames per latent token)") from None
    if r < 1:
        raise CheckpointError(f"{vae_dir / 'meta.json'}: vae_config.r={r} must be >= 1")
    return r


def ensure_checkpoint(cfg: DictConfig, ckpt: Path) -> None:
    """On a fresh clone the default (supervised) checkpoint ``pretrained.sft`` is produced first, as
    ``train/gdpo.py`` does: dataset, VAE and supervised AR-Flow by their own entry points (cached).
    Any other checkpoint must exist. Reads ``cfg.pretrained``, ``cfg.model.preset``, ``cfg.features``,
    ``cfg.data`` and ``cfg.device``."""
    pre = cfg.get("pretrained")
    default = pre is not None and pre.get("auto_train", False) and ckpt == factories.abspath(pre.sft)
    if (ckpt / "meta.json").is_file() or not default:
        if not ckpt.exists():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist (supervised: train/sft.py; post-trained: "
                                    f"train/gdpo.py, e.g. python train/gdpo.py reward=expr+rot -> runs/gdpo_small_expr+rot)")
        return
    feats = factories.checkpoint_encoders(cfg.features, {})  # null encoders -> the training defaults
    stage_cfg = OmegaConf.create({
        "pretrained": OmegaConf.to_container(pre, resolve=True), "device": cfg.device,
        "model": {"preset": str(cfg.model.preset)}, "features": OmegaConf.to_container(feats, resolve=True)})
    data_root = stages.ensure_dataset(cfg.data)
    vae = stages.ensure_vae(stage_cfg, data_root)
    stages.ensure_sft(stage_cfg, data_root, vae)


# ----------------------------------------------------------------------------------------------
# checkpoint vs dataset


def dataset_signature(meta: dict) -> dict:
    """Format, version and FLAME layout of a dataset's ``dataset.json``."""
    return {"format": meta.get("format"), "version": meta.get("version"), "flame_dim": meta.get("flame_dim"),
            "groups": list(meta.get("groups") or [])}


def training_dataset_signature(ckpt_meta: dict, vae_meta: dict) -> tuple[dict, str] | None:
    """Format/layout of the dataset the checkpoint was trained on, and where it was read from.

    Uses a ``dataset`` entry of the checkpoint's (or its VAE's) ``meta.json`` when present, else
    the ``dataset.json`` of the training data folder recorded in the VAE / checkpoint config.
    """
    for where, m in (("checkpoint", ckpt_meta), ("VAE", vae_meta)):
        if isinstance(m.get("dataset"), dict):
            return dataset_signature(m["dataset"]), f"the {where} meta.json"
    roots = [vae_meta.get("data_root"), ((ckpt_meta.get("config") or {}).get("data") or {}).get("root")]
    for r in roots:
        if not r:
            continue
        p = factories.abspath(r) / "dataset.json"
        if p.is_file():
            try:
                return dataset_signature(json.loads(p.read_text())), str(p)
            except json.JSONDecodeError:
                continue
    return None


def check_compatibility(ckpt: Path, ckpt_meta: dict, vae_meta: dict, data_root: Path, data_meta: dict) -> None:
    """Raise :class:`EvalInputError` if the checkpoint and the dataset disagree on the FLAME layout or format."""
    here = dataset_signature(data_meta)
    d_in = (vae_meta.get("vae_config") or {}).get("d_in")
    if d_in is not None and d_in != here["flame_dim"]:
        raise EvalInputError(f"checkpoint {ckpt}: its VAE reads {d_in}-d frames but dataset {data_root} has "
                             f"{here['flame_dim']}-d FLAME frames (different FLAME layouts)")
    found = training_dataset_signature(ckpt_meta, vae_meta)
    if found is None:
        return
    train, where = found
    diff = [k for k in ("format", "version", "flame_dim", "groups") if train.get(k) != here[k]]
    if diff:
        what = ", ".join(f"{k} {train.get(k)!r} vs {here[k]!r}" for k in diff)
        kind = "format versions" if set(diff) <= {"format", "version"} else "FLAME layouts"
        raise EvalInputError(f"checkpoint {ckpt} was trained on a dataset that differs from {data_root} "
                             f"({what}; training dataset read from {where}): different {kind}")


# ----------------------------------------------------------------------------------------------
# the run's reward

# The reward every checkpoint is scored with (comparable across checkpoints): all six groups at the
# default term weights (rewards/groups.py DEFAULT_WEIGHTS).
DEFAULT_EVAL_REWARD = {"reward": "all", "rewards": {"weights": {}, "lambdas": {}, "group_reward": None, "extra_terms": {}}}


def run_reward_config(ckpt_meta: dict) -> dict | None:
    """``{"reward": spec, "rewards": {weights, lambdas, group_reward, extra_terms}}`` a post-trained run
    recorded in its resolved config, or None (a supervised checkpoint optimised no reward)."""
    config = ckpt_meta.get("config") or {}
    if not config.get("reward"):
        return None
    rewards = {**DEFAULT_EVAL_REWARD["rewards"], **(config.get("rewards") or {})}
    return {"reward": str(config["reward"]), "rewards": rewards}


def terms_differ_from_default(reward_cfg: dict) -> bool:
    """True when the per-group reward of ``reward_cfg`` is not the default one: other term weights,
    another group reward class or extra terms (lambdas weight groups, they do not change a group's reward)."""
    from ..rewards.groups import DEFAULT_WEIGHTS

    r = reward_cfg["rewards"]
    weights = {k: float(v) for k, v in {**DEFAULT_WEIGHTS, **(r.get("weights") or {})}.items()}
    return weights != DEFAULT_WEIGHTS or r.get("group_reward") is not None or bool(r.get("extra_terms"))


def build_run_reward(reward_cfg: dict):
    """The ``FlameReward`` of a recorded reward config, without its ``<group>@hold`` columns (they score
    against the supervised model's rollouts of the training run, which evaluation does not have); None when
    nothing else is left."""
    from ..rewards.groups import build_reward, column_group, parse_reward_spec

    r = reward_cfg["rewards"]
    columns = [c for c in parse_reward_spec(reward_cfg["reward"]) if column_group(c)[1] != "hold"]
    if not columns:
        return None
    lambdas = {k: v for k, v in (r.get("lambdas") or {}).items() if k in columns}
    return build_reward(columns, weights=r.get("weights"), lambdas=lambdas,
                        group_reward=r.get("group_reward"), extra_terms=r.get("extra_terms"))
