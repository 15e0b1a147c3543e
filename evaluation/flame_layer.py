"""FLAME vertices from the 67-d motion frames, for the vertex metrics (LVE, MHD, vertex FDD).

The FLAME head model is licence-gated: it is never shipped with this project. Download it from
https://flame.is.tue.mpg.de (FLAME 2020 or 2023: ``generic_model.pkl`` and ``FLAME_masks.pkl``)
and pass the paths (``metrics.flame_model=... metrics.flame_masks=...`` in ``train/evaluate.py``).
Without a model file the vertex metrics are reported as unavailable, never as 0.

Model file (``generic_model.pkl`` layout; a ``.npz`` with the same keys works too)::

    v_template     (V, 3)        mean head, metres
    shapedirs      (V, 3, K)     identity (first n_shape = 300 columns) then expression blendshapes
    posedirs       (V, 3, 9(J-1)) pose-corrective blendshapes
    J_regressor    (J, V)        joint locations from vertices (dense or scipy.sparse)
    kintree_table  (2, J)        row 0 = parent of each joint (root parent: -1 or 2**32 - 1)
    weights        (V, J)        skinning weights
    f              (F, 3)        triangles
    l_eyelid, r_eyelid (V, 3)    optional eyelid-closure blendshapes (SMIRK / SHeaP style)

FLAME has J = 5 joints in the order global (root), neck, jaw, left eye, right eye. Original
pickles hold chumpy arrays; they are read without chumpy (a stand-in class takes their array).

Masks file (``FLAME_masks.pkl``): a dict of vertex-index arrays; ``lips``, ``forehead`` and
``eye_region`` are required (the upper face of the vertex FDD is ``forehead`` + ``eye_region``).

Motion -> FLAME parameters (channels of :mod:`gdpo_listener.envs.flame`):

- ``expr`` 0:50 -> the first 50 expression blendshapes, i.e. ``shapedirs[..., n_shape:n_shape+50]``
  (FLAME 2020: 300 shape + 100 expression columns). Identity (shape) is the template: the motion
  carries no shape coefficients, so every metric compares prediction and ground truth on the same
  mean head.
- ``rot`` 64:67 -> global (root) rotation, ``neck`` 53:56 -> neck, ``jaw`` 50:53 -> jaw,
  ``eyepose`` 58:64 -> left eye (58:61) and right eye (61:64); axis-angle, Rodrigues' formula.
- ``eyelid`` 56:58 -> ``l_eyelid`` / ``r_eyelid`` blendshapes scaled by the closure values when the
  model file has them; otherwise the eyelid channels are ignored (:attr:`FlameLayer.has_eyelids`
  is False) -- the stock FLAME 2020 file has no eyelid blendshapes.

Vertices: ``v = LBS(v_template + expr blendshapes + eyelids + pose correctives, joints, pose)``
(linear blend skinning exactly as in FLAME: joints regressed from the unposed shape, pose
correctives from ``R_j - I`` of the non-root joints, skinning with the rest-pose joints removed).
No global translation.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..envs.flame import FLAME_DIM, GROUPS

__all__ = [
    "FlameModelError",
    "REQUIRED_KEYS",
    "MASK_KEYS",
    "load_flame_model",
    "load_flame_masks",
    "FlameLayer",
    "rodrigues",
    "motion_to_flame_params",
]

REQUIRED_KEYS: tuple[str, ...] = ("v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "f")
MASK_KEYS: tuple[str, ...] = ("lips", "forehead", "eye_region")
N_JOINTS = 5  # global, neck, jaw, left eye, right eye


class FlameModelError(ValueError):
    """A FLAME model or masks file is missing, unreadable or not in the expected layout."""


# ----------------------------------------------------------------------------------------------
# reading the files


class _ChumpyStandIn:
    """Takes the place of any chumpy class while unpickling; :func:`_plain` takes its array."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyStandIn
        return super().find_class(module, name)


def _plain(v):
    """chumpy stand-ins and scipy.sparse matrices -> numpy arrays; other values unchanged."""
    if isinstance(v, _ChumpyStandIn):
        state = v.__dict__.get("_state")
        if isinstance(state, Mapping) and "x" in state:
            return np.asarray(state["x"])
        if isinstance(state, tuple) and state and isinstance(state[-1], Mapping) and "x" in state[-1]:
            return np.asarray(state[-1]["x"])
        raise FlameModelError("a chumpy object in the FLAME file holds no plain array ('x'); "
                              "convert the file with chumpy installed (np.asarray on every entry) and save it as .npz")
    if hasattr(v, "toarray") and callable(v.toarray):  # scipy.sparse
        return np.asarray(v.toarray())
    return v


def _read_dict(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (the FLAME model is licence-gated and not shipped: "
                                f"download it from https://flame.is.tue.mpg.de)")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        else:
            with open(path, "rb") as f:
                d = _TolerantUnpickler(f, encoding="latin1").load()
    except FlameModelError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise FlameModelError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e
    if not isinstance(d, Mapping):
        raise FlameModelError(f"{what} {path} holds a {type(d).__name__}, expected a dict of arrays")
    return {str(k): _plain(v) for k, v in d.items()}


def _check_missing(d: Mapping, keys, path, what) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise FlameModelError(f"{what} {path} is missing keys {missing} (has: {sorted(d)}); "
                              f"expected the generic_model.pkl layout: {list(keys)}")


def load_flame_model(path: str | os.PathLike, n_shape: int = 300, n_expr: int = 50) -> dict[str, np.ndarray]:
    """Read and validate a FLAME model file (``.pkl`` or ``.npz``); returns float64/int64 arrays.

    Raises :class:`FlameModelError` naming missing keys or the array with a wrong shape.
    """
    path = Path(path)
    raw = _read_dict(path, "FLAME model file")
    _check_missing(raw, REQUIRED_KEYS, path, "FLAME model file")
    try:
        m = {k: np.asarray(raw[k]) for k in REQUIRED_KEYS}
    except Exception as e:  # noqa: BLE001
        raise FlameModelError(f"FLAME model file {path}: cannot convert entries to arrays: {e}") from e
    for k in ("l_eyelid", "r_eyelid"):
        if k in raw:
            m[k] = np.asarray(raw[k])

    def bad(key, want):
        raise FlameModelError(f"FLAME model file {path}: {key} has shape {m[key].shape}, expected {want}")

    vt = m["v_template"]
    if vt.ndim != 2 or vt.shape[1] != 3:
        bad("v_template", "(V, 3)")
    V = vt.shape[0]
    sd = m["shapedirs"]
    if sd.ndim != 3 or sd.shape[:2] != (V, 3):
        bad("shapedirs", f"({V}, 3, K)")
    if sd.shape[2] < n_shape + n_expr:
        raise FlameModelError(f"FLAME model file {path}: shapedirs has {sd.shape[2]} columns but the motion needs "
                              f"{n_shape} shape + {n_expr} expression columns (FLAME 2020: 300 + 100)")
    kt = m["kintree_table"]
    if kt.ndim != 2 or kt.shape[0] != 2:
        bad("kintree_table", "(2, J)")
    J = kt.shape[1]
    if J != N_JOINTS:
        raise FlameModelError(f"FLAME model file {path}: {J} joints, expected {N_JOINTS} (global, neck, jaw, left eye, right eye)")
    if m["J_regressor"].shape != (J, V):
        bad("J_regressor", f"({J}, {V})")
    if m["weights"].shape != (V, J):
        bad("weights", f"({V}, {J})")
    pd = m["posedirs"]
    if pd.ndim != 3 or pd.shape != (V, 3, 9 * (J - 1)):
        bad("posedirs", f"({V}, 3, {9 * (J - 1)})")
    f = m["f"]
    if f.ndim != 2 or f.shape[1] != 3:
        bad("f", "(F, 3)")
    for k in ("l_eyelid", "r_eyelid"):
        if k in m and m[k].shape != (V, 3):
            bad(k, f"({V}, 3)")
    parents = kt[0].astype(np.int64)
    parents[parents >= J] = -1  # root marker (2**32 - 1 in the original file)
    if parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents[1:], start=1)):
        raise FlameModelError(f"FLAME model file {path}: kintree_table parents {kt[0].tolist()} are not a tree "
                              f"rooted at joint 0 with parents before children")
    out = {k: v.astype(np.float64) for k, v in m.items() if k not in ("kintree_table", "f")}
    out["parents"] = parents
    out["f"] = f.astype(np.int64)
    return out


def load_flame_masks(path: str | os.PathLike, n_vertices: int | None = None) -> dict[str, np.ndarray]:
    """Read ``FLAME_masks.pkl`` (or ``.npz``): ``{lips, forehead, eye_region, ...}`` vertex-index arrays."""
    path = Path(path)
    raw = _read_dict(path, "FLAME masks file")
    _check_missing(raw, MASK_KEYS, path, "FLAME masks file")
    out = {}
    for k, v in raw.items():
        a = np.asarray(v)
        if a.dtype == bool:
            a = np.flatnonzero(a)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            if k in MASK_KEYS:
                raise FlameModelError(f"FLAME masks file {path}: {k} must be a non-empty 1-d array of vertex indices, "
                                      f"got {a.dtype} {a.shape}")
            continue
        if n_vertices is not None and (a.min() < 0 or a.max() >= n_vertices):
            raise FlameModelError(f"FLAME masks file {path}: {k} has vertex indices outside [0, {n_vertices})")
        out[k] = a.astype(np.int64)
    return out


# ----------------------------------------------------------------------------------------------
# geometry


def rodrigues(aa: torch.Tensor) -> torch.Tensor:
    """Axis-angle ``(..., 3)`` -> rotation matrices ``(..., 3, 3)`` (exact identity at 0)."""
    angle = aa.norm(dim=-1, keepdim=True)  # (..., 1)
    safe = torch.where(angle > 1e-12, angle, torch.ones_like(angle))
    axis = aa / safe
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*aa.shape[:-1], 3, 3)
    s, c = torch.sin(angle)[..., None], torch.cos(angle)[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(K)
    R = eye + s * K + (1 - c) * (K @ K)
    return torch.where((angle > 1e-12)[..., None], R, eye)


def motion_to_flame_params(motion: torch.Tensor, with_global: bool = True, with_neck: bool = True) -> dict[str, torch.Tensor]:
    """Split ``(..., 67)`` frames into ``expr (..., 50)``, ``pose (..., 5, 3)`` and ``eyelid (..., 2)``.

    ``pose`` rows are FLAME's joints: global (``rot``), neck, jaw, left eye, right eye;
    ``with_global`` / ``with_neck`` = False zero those rotations (face-local geometry).
    """
    if motion.shape[-1] != FLAME_DIM:
        raise ValueError(f"FLAME layer: motion must end in {FLAME_DIM} channels, got {tuple(motion.shape)}")
    eye = motion[..., GROUPS["eyepose"]]
    rot = motion[..., GROUPS["rot"]] if with_global else torch.zeros_like(motion[..., GROUPS["rot"]])
    neck = motion[..., GROUPS["neck"]] if with_neck else torch.zeros_like(motion[..., GROUPS["neck"]])
    pose = torch.stack([rot, neck, motion[..., GROUPS["jaw"]], eye[..., :3], eye[..., 3:]], dim=-2)
    return {"expr": motion[..., GROUPS["expr"]], "pose": pose, "eyelid": motion[..., GROUPS["eyelid"]]}


class FlameLayer(nn.Module):
    """67-d motion frames -> FLAME vertices by linear blend skinning.

    >>> flame = FlameLayer("FLAME2020/generic_model.pkl", "FLAME2020/FLAME_masks.pkl")
    >>> verts = flame(motion)            # (..., 67) -> (..., V, 3), metres

    ``with_global`` / ``with_neck`` (call arguments) zero the global / neck rotation: the vertex
    metrics use face-local geometry by default (see ``rewards/metrics.py``). Computation is in
    float64 for exactness (inputs are cast); the output has the input's dtype.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, masks_path: str | os.PathLike | None = None,
                 n_shape: int = 300, n_expr: int = 50, model: Mapping[str, np.ndarray] | None = None,
                 masks: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        if (model_path is None) == (model is None):
            raise ValueError("FlameLayer: pass exactly one of model_path or model (arrays from load_flame_model)")
        m = load_flame_model(model_path, n_shape, n_expr) if model is None else dict(model)
        self.model_path = None if model_path is None else str(model_path)
        V = m["v_template"].shape[0]
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
        self.register_buffer("v_template", t(m["v_template"]))
        self.register_buffer("expr_dirs", t(m["shapedirs"][:, :, n_shape:n_shape + n_expr]))  # (V, 3, 50)
        self.register_buffer("posedirs", t(m["posedirs"]))  # (V, 3, 36)
        self.register_buffer("J_regressor", t(m["J_regressor"]))  # (J, V)
        self.register_buffer("lbs_weights", t(m["weights"]))  # (V, J)
        self.register_buffer("faces", torch.as_tensor(np.asarray(m["f"]), dtype=torch.long))
        self.parents: list[int] = [int(p) for p in m["parents"]]
        self.has_eyelids = "l_eyelid" in m and "r_eyelid" in m
        if self.has_eyelids:
            self.register_buffer("eyelid_dirs", torch.stack([t(m["l_eyelid"]), t(m["r_eyelid"])], -1))  # (V, 3, 2)
        self.n_vertices = V
        self.masks: dict[str, np.ndarray] = {}
        if masks_path is not None:
            self.masks = load_flame_masks(masks_path, V)
        elif masks is not None:
            self.masks = {k: np.asarray(v, dtype=np.int64) for k, v in masks.items()}
            _check_missing(self.masks, MASK_KEYS, "(given)", "FLAME masks")

    # -- vertex subsets -------------------------------------------------------------------------

    def region(self, name: str) -> torch.Tensor:
        if not self.masks:
            raise FlameModelError("FlameLayer: no masks file was given (needed for lips / upper-face vertices)")
        if name == "upper_face":
            idx = np.union1d(self.masks["forehead"], self.masks["eye_region"])
        elif name in self.masks:
            idx = self.masks[name]
        else:
            raise KeyError(f"FlameLayer: unknown region {name!r}; have {sorted(self.masks)} and 'upper_face'")
        return torch.as_tensor(idx, dtype=torch.long, device=self.v_template.device)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, motion: torch.Tensor, with_global: bool = True, with_neck: bool = True) -> torch.Tensor:
        lead = motion.shape[:-1]
        p = motion_to_flame_params(motion.reshape(-1, FLAME_DIM).to(self.v_template), with_global, with_neck)
        verts = self.lbs(p["expr"], p["pose"], p["eyelid"] if self.has_eyelids else None)
        return verts.reshape(*lead, self.n_vertices, 3).to(motion.dtype)

    def lbs(self, expr: torch.Tensor, pose: torch.Tensor, eyelid: torch.Tensor | None = None) -> torch.Tensor:
        """``expr (N, 50)``, ``pose (N, J, 3)`` axis-angle, ``eyelid (N, 2)`` -> vertices ``(N, V, 3)``."""
        N, J = pose.shape[0], pose.shape[1]
        v = self.v_template + torch.einsum("ne,vke->nvk", expr, self.expr_dirs)  # (N, V, 3)
        if eyelid is not None:
            v = v + torch.einsum("ne,vke->nvk", eyelid, self.eyelid_dirs)
        joints = torch.einsum("jv,nvk->njk", self.J_regressor, v)  # (N, J, 3) rest-pose joints
        R = rodrigues(pose)  # (N, J, 3, 3)
        eye3 = torch.eye(3, dtype=R.dtype, device=R.device)
        pose_feature = (R[:, 1:] - eye3).reshape(N, -1)  # (N, 9 (J-1))
        v = v + torch.einsum("np,vkp->nvk", pose_feature, self.posedirs)
        # kinematic chain: world transform of every joint
        rel = joints.clone()
        rel[:, 1:] = joints[:, 1:] - joints[:, self.parents[1:]]
        local = torch.zeros(N, J, 4, 4, dtype=R.dtype, device=R.device)
        local[:, :, :3, :3] = R
        local[:, :, :3, 3] = rel
        local[:, :, 3, 3] = 1.0
        world = [local[:, 0]]
        for j in range(1, J):
            world.append(world[self.parents[j]] @ local[:, j])
        G = torch.stack(world, 1)  # (N, J, 4, 4)
        # remove the rest-pose joint location: A_j x = G_j (x - j_rest)
        A = G.clone()
        A[:, :, :3, 3] = G[:, :, :3, 3] - torch.einsum("njab,njb->nja", G[:, :, :3, :3], joints)
        # skinning, sum_j w_vj A_j v, one joint at a time (never materialises (N, V, 4, 4))
        out = torch.zeros_like(v)
        for j in range(J):
            w = self.lbs_weights[:, j]  # (V,)
            if not bool((w != 0).any()):
                continue
            vj = torch.einsum("nab,nvb->nva", A[:, j, :3, :3], v) + A[:, j, None, :3, 3]
            out = out + w[None, :, None] * vj
        return out

    def extra_repr(self) -> str:
        return f"vertices={self.n_vertices}, eyelids={self.has_eyelids}, masks={sorted(self.masks)}, file={self.model_path}"
