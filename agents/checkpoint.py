"""Atomic checkpoints: safetensors weights plus a JSON document (resolved config, metadata).

A checkpoint is a folder ``DIR`` holding ``model.safetensors`` (or several named weight files) and
``meta.json``. Every file is written to a temporary name and renamed into place, and the folder's
``meta.json`` is written last, so a reader never sees a half-written checkpoint: a folder without
``meta.json`` is not a checkpoint.

The atomic writers here are used for every atomic write of the project. Conventions, written once:

- **Permissions**: a final file is created with mode ``0o666 & ~umask`` (a folder ``0o777 & ~umask``),
  like any file the user creates; no temporary-file default (``0o600``) leaks into it.
- **Temporary names** record the writer: ``.<target>.tmp-<pid>@<host>.<8 hex>`` beside ``<target>``
  (:func:`temp_name`). A temporary whose writer process is gone on this host is *stale*: the next
  atomic write into the same folder removes it (:func:`remove_stale_temps`); a live writer's, or
  one from another host (liveness unknown), is never touched.
- **JSON is strict**: ``NaN``/``Infinity`` are refused with an error naming the file and the key,
  never written as invalid JSON; use :func:`nan_to_null` where "undefined" is a legitimate value.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # torch is imported only by the functions that need it (the dataset writer imports this module)
    import torch

CHECKPOINT_FORMAT = "gdpo-listener-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match what the caller expects."""


# ----------------------------------------------------------------------------------------------
# writer identity, temporary names, stale temporaries


def host_tag() -> str:
    """This machine's short host name, reduced to ``[A-Za-z0-9_-]`` so it can sit in a file name."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0]) or "host"


def writer_tag(pid: int | None = None) -> str:
    """``<pid>@<host>``: who owns a temporary or moved-aside entry."""
    return f"{os.getpid() if pid is None else pid}@{host_tag()}"


def temp_name(target: str) -> str:
    """A fresh temporary name for ``target`` (a file or folder name) owned by this process."""
    return f".{target}.tmp-{writer_tag()}.{secrets.token_hex(4)}"


TEMP_RE = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)\.[0-9a-f]{8}$")


def writer_is_gone(pid: int, host: str) -> bool:
    """True only when process ``pid`` on ``host`` certainly no longer exists: ``host`` is this
    machine and ``os.kill(pid, 0)`` finds no such process. Another host or any doubt -> False."""
    if host != host_tag() or pid <= 0:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, owned by another user
        return False
    return False


def remove_stale_temps(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Remove the stale temporaries (files or folders named by :func:`temp_name`) in ``folder``,
    of ``target`` only if given; return what was removed. Live writers' temporaries are kept."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for e in entries:
        m = TEMP_RE.match(e.name)
        if not m or (target is not None and m["target"] != target):
            continue
        if not writer_is_gone(int(m["pid"]), m["host"]):
            continue
        p = Path(e.path)
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:  # another process cleaned it first
            continue
        removed.append(p)
    return removed


_SWEPT: set[str] = set()


def _sweep_once(folder: Path) -> None:
    """Remove stale temporaries of ``folder`` on this process's first atomic write there (a
    killed run's leftovers go at the next run's first write, without a listing per write)."""
    key = os.path.abspath(folder)
    if key not in _SWEPT:
        remove_stale_temps(folder)
        _SWEPT.add(key)


def create_new_file(path: str | os.PathLike) -> int:
    """Create ``path`` exclusively for writing with mode ``0o666 & ~umask``; return the descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """An exclusively created temporary file beside ``path`` (its descriptor and name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    while True:
        tmp = path.parent / temp_name(path.name)
        try:
            return create_new_file(tmp), tmp
        except FileExistsError:  # 32 random bits collided: draw again
            continue


# ----------------------------------------------------------------------------------------------
# atomic writers


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary beside it, fsync, rename)."""
    path = Path(path)
    fd, tmp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` of ``obj`` (e.g. a resumable training state) written atomically."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def first_non_finite(obj: Any, where: str = "") -> str | None:
    """Key path (``'a.b[2]'``) of the first NaN/inf float in a JSON-like ``obj``, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (where or "<top level>")
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return first_non_finite(obj.tolist(), where)
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            hit = first_non_finite(v, f"{where}.{k}" if where else str(k))
            if hit is not None:
                return hit
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            hit = first_non_finite(v, f"{where}[{i}]")
            if hit is not None:
                return hit
    return None


def strict_json(obj: Any, path: str | os.PathLike, **kw) -> str:
    """``json.dumps(obj, allow_nan=False)``; a NaN/inf raises ValueError naming ``path`` and the key."""
    try:
        return json.dumps(obj, allow_nan=False, default=_json_default, **kw)
    except ValueError as e:
        key = first_non_finite(obj)
        if key is None:
            raise
        raise ValueError(f"{path}: refusing to write a non-finite value at {key!r} (strict JSON has no NaN/Infinity)") from e


def nan_to_null(obj: Any) -> Any:
    """A copy of a JSON-like ``obj`` with every NaN/inf float replaced by None (JSON ``null``):
    for reports where "undefined" is a legitimate value."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_null(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (see :func:`strict_json`) written atomically."""
    atomic_write_bytes(path, strict_json(obj, path, indent=2).encode())


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = _new_temp_file(path)
    umask_mode = os.fstat(fd).st_mode & 0o777  # 0o666 & ~umask; save_file itself creates files 0o600
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.chmod(tmp, umask_mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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


def load_checkpoint_meta(directory: str | os.PathLike, kind: str | None = None) -> dict:
    """Read and check a checkpoint's ``meta.json`` (format, version and, if given, ``kind``: "vae" / "arflow").

    Not a dataset's ``dataset.json``: that is :func:`gdpo_listener.envs.dataset.load_dataset_meta`."""
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
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read weights {path}: {e}") from e


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / "meta.json").is_file()
