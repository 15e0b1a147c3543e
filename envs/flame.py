"""The 67-d FLAME frame layout, defined once for the whole project.

A motion sequence is an array ``(T, 67)`` at 25 fps. Channels are grouped into six FLAME
parameter groups; every reward, metric and converter slices through this module.

=========  ========  ====  =======================================
group      channels  dims  meaning
=========  ========  ====  =======================================
expr       0:50      50    expression coefficients
jaw        50:53     3     jaw pose, axis-angle
neck       53:56     3     neck pose, axis-angle
eyelid     56:58     2     eyelid closure (left, right)
eyepose    58:64     6     left and right eye pose, axis-angle
rot        64:67     3     global head rotation, axis-angle
=========  ========  ====  =======================================

A source lacking a group stores zeros there and marks the group invalid in a per-group
validity mask ``(6,)`` (order of :data:`GROUP_NAMES`); rewards and metrics skip invalid groups.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

FPS = 25
SAMPLE_RATE = 16_000
FLAME_DIM = 67

GROUPS: dict[str, slice] = {
    "expr": slice(0, 50),
    "jaw": slice(50, 53),
    "neck": slice(53, 56),
    "eyelid": slice(56, 58),
    "eyepose": slice(58, 64),
    "rot": slice(64, 67),
}
GROUP_NAMES: tuple[str, ...] = tuple(GROUPS)
N_GROUPS = len(GROUP_NAMES)
GROUP_DIMS: dict[str, int] = {k: s.stop - s.start for k, s in GROUPS.items()}


def group_index(name: str) -> int:
    """Position of a group in :data:`GROUP_NAMES`; clear error for unknown names."""
    try:
        return GROUP_NAMES.index(name)
    except ValueError:
        raise KeyError(f"unknown FLAME group {name!r}; valid groups: {', '.join(GROUP_NAMES)}") from None


def group_slice(name: str) -> slice:
    group_index(name)
    return GROUPS[name]


def get_group(motion, name: str):
    """Channels of group ``name`` from ``(..., 67)`` motion (numpy or torch)."""
    return motion[..., group_slice(name)]


def channel_group_ids() -> np.ndarray:
    """``(67,)`` int array: the group index of every channel."""
    ids = np.empty(FLAME_DIM, dtype=np.int64)
    for i, name in enumerate(GROUP_NAMES):
        ids[GROUPS[name]] = i
    return ids


def group_mask(groups: Iterable[str]) -> np.ndarray:
    """``(6,)`` bool mask with True for the named groups."""
    mask = np.zeros(N_GROUPS, dtype=bool)
    for g in groups:
        mask[group_index(g)] = True
    return mask


def channel_mask(group_valid: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Expand a per-group validity mask ``(..., 6)`` into a per-channel mask ``(..., 67)``."""
    group_valid = np.asarray(group_valid, dtype=bool)
    if group_valid.shape[-1] != N_GROUPS:
        raise ValueError(f"group validity mask must end in {N_GROUPS} entries, got shape {group_valid.shape}")
    return group_valid[..., channel_group_ids()]


def assemble(parts: dict[str, np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Build ``(T, 67)`` motion and a ``(6,)`` validity mask from per-group arrays.

    Groups missing from ``parts`` are zero and marked invalid. Each part must be ``(T, dims)``.
    """
    motion = np.zeros((length, FLAME_DIM), dtype=np.float32)
    valid = np.zeros(N_GROUPS, dtype=bool)
    for name, arr in parts.items():
        arr = np.asarray(arr, dtype=np.float32)
        group_index(name)
        want = (length, GROUP_DIMS[name])
        if arr.shape != want:
            raise ValueError(f"group {name!r} must have shape {want}, got {arr.shape}")
        motion[:, GROUPS[name]] = arr
        valid[group_index(name)] = True
    return motion, valid
