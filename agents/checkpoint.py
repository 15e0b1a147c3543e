"""Atomic checkpoints: safetensors weights plus a JSON document (resolved config, metadata).

A checkpoint is a folder ``DIR`` holding ``model.safetensors`` (or several named weight files) and
``meta.json``. Every file is written to a temporary name and renamed into place, and the folder's
``meta.json`` is written last, so a reader never sees a half-written checkpoint: a folder without
``meta.json`` is not a checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_FORMAT = "gdpo-listener-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match what the caller expects."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` of ``obj`` (e.g. a resumable training state) written atomically."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=_json_default).encode())


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(
    directory: str | os.PathLike,
    kind: str,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    meta: Mapping[str, Any],
) -> Path:
    """Write ``weights`` (name -> state dict) as ``<name>.safetensors`` and ``meta.json`` last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, sd in weights.items():
        atomic_save_tensors(directory / f"{name}.safetensors", sd)
    doc = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": kind, "weights": sorted(weights), **meta}
    atomic_write_json(directory / "meta.json", doc)
    return directory


def load_meta(directory: str | os.PathLike, kind: str | None = None) -> dict:
    directory = Path(directory)
    path = directory / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {path} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON ({e})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')}, this code reads {CHECKPOINT_VERSION}")
    if kind is not None and meta.get("kind") != kind:
        raise CheckpointError(f"{path}: checkpoint holds a {meta.get('kind')!r}, expected a {kind!r}")
    return meta


def load_weights(directory: str | os.PathLike, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(directory) / f"{name}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read weights {path}: {e}") from e


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / "meta.json").is_file()
