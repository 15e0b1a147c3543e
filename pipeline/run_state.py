"""Run state: seeding, RNG state and the resumable training state every stage writes.

A training state is one ``torch.save`` file (``out_dir/last/state.pt``), written atomically, that
holds the state dicts of the run's modules and optimisers, the step, every RNG (torch, CUDA, numpy,
python and the run's own generator), the logger's counters and the config sections a resumed run
must share with the run that wrote it. ``load_run_state`` refuses a missing, unreadable or
foreign state with an error that names the file.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..agents.checkpoint import atomic_save_torch
from .distributed import check_world_size
from .run_dir import truncate_logs


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return the run's own CPU generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Global RNG states (torch, CUDA, numpy, python) and that of the run's ``generator``."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "generator": None if generator is None else generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    # RNG states are CPU byte tensors, also when a training state was loaded with map_location=cuda
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"].cpu())


def resolved_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def resume_config(cfg: DictConfig, keys: Iterable[str]) -> dict:
    """The config sections (``keys``) a resumed run must share with the run that wrote the state."""
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keys}


def save_run_state(path: str | Path, cfg: DictConfig, keys: Iterable[str], step: int, generator: torch.Generator | None,
                   logger=None, states: Mapping[str, Any] | None = None, **extra) -> None:
    """Atomically write the training state: ``states`` (name -> object with ``state_dict``), the
    ``step``, every RNG, the logger's counters and the config sections ``keys``."""
    doc = {name: obj.state_dict() for name, obj in (states or {}).items()}
    doc.update({"step": int(step), "rng": rng_state(generator), "config": resume_config(cfg, keys),
                "logger": logger.state_dict() if logger is not None and hasattr(logger, "state_dict") else None, **extra})
    atomic_save_torch(path, doc)


def load_run_state(path: str | Path, cfg: DictConfig, keys: Iterable[str], device, generator: torch.Generator | None = None,
                   states: Mapping[str, Any] | None = None, added: Mapping[str, Mapping[str, Any]] | None = None,
                   check: Callable[[dict], None] | None = None) -> dict:
    """Read the training state at ``path``, check it was written with the same config sections ``keys``,
    load it into ``states`` (name -> object with ``load_state_dict``) and restore every RNG.

    ``added`` (``{section: {setting: value}}``): settings introduced after a state may have been written,
    each with the value that reproduces the code before it; a saved section without one compares as
    if it had that value (a run saved before ``algo.sft_coef`` existed resumes with ``sft_coef: 0``).

    ``check(state)`` runs after the sections compare equal and before anything is loaded or truncated: a
    stage's own check of what the sections do not hold (train/vae.py: the resolved VAE config)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume=true but no training state at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name it
        raise ValueError(f"resume=true but the training state {path} cannot be read ({type(e).__name__}: {e}); "
                         f"delete it to start over") from None
    keys = tuple(keys)
    now, then = resume_config(cfg, keys), dict(state.get("config") or {})
    for section, defaults in (added or {}).items():
        if isinstance(then.get(section), Mapping):
            then[section] = {**defaults, **then[section]}
    diff = [k for k in keys if then.get(k) != now[k]]
    if diff:
        raise ValueError(f"resume folder {path.parent.parent} was written with another config (differs in: {', '.join(diff)})")
    if check is not None:
        check(state)
    for name, obj in (states or {}).items():
        obj.load_state_dict(state[name])
    set_rng_state(state["rng"], generator)
    return state


def resume_training(stage: str, state_path: str | Path, log_dir: str | Path, cfg: DictConfig, keys: Iterable[str],
                    run_states: Mapping[str, Any], generator: torch.Generator | None, device, dist=None,
                    added: Mapping[str, Mapping[str, Any]] | None = None, where: str = "from step",
                    check: Callable[[dict], None] | None = None) -> dict:
    """Continue a killed run of ``stage`` (vae, sft, gdpo): :func:`load_run_state` into ``run_states`` and the
    RNGs; with ``dist`` (a :class:`~pipeline.distributed.Dist`) also check the process count and restore this
    rank's own streams; then (rank 0) drop the log rows after the saved step and say where it resumes.
    Returns the saved state (``step``, ``logger`` and the stage's own entries)."""
    state = load_run_state(state_path, cfg, keys, device, generator, states=run_states, added=added, check=check)
    if dist is not None:
        check_world_size(state.get("world_size"), dist, state_path)
        if dist.is_distributed:
            set_rng_state(state["ranks"][dist.rank]["rng"], generator)
    if dist is None or dist.is_main:
        truncate_logs(log_dir, int(state["step"]))  # steps logged after the saved state are logged again
        print(f"[{stage}] resumed {where} {int(state['step'])}")
    return state
