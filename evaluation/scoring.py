"""Score one checkpoint on an :class:`~.data.EvalData`: generate every window, then every metric
(:func:`evaluate_model`); or score the ground truth passed through the VAE (:func:`evaluate_reconstruction`).

Per window (:func:`row_stats`, computed once per prediction) -> per subset of windows
(:func:`aggregate`: all windows, the expressive subset). Metric conventions are those of
:mod:`.metrics`; ``mcfg`` is the ``metrics`` config group (``train/conf/metrics/default.yaml``).

Rewards: every checkpoint is scored with the default reward (:data:`.checkpoints.DEFAULT_EVAL_REWARD`,
all six groups at the default term weights: comparable across checkpoints). A post-trained run
whose recorded reward has other per-group terms (weights, group reward class, extra terms) is
also scored with its own reward (``run_reward``, on the groups it rewarded).
"""
from __future__ import annotations

import contextlib
import time

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ..envs.flame import GROUP_NAMES, GROUPS, channel_mask
from ..rewards.groups import speaking_kwargs
from ..rewards.stats import frame_velocity, masked_std
from . import metrics as M
from .checkpoints import DEFAULT_EVAL_REWARD, build_run_reward, terms_differ_from_default
from .data import EvalData
from .deviation_parts import deviation_parts
from .generation import generate_motion, reconstruct_motion

SPLITS = ("speaking", "listening")
TABLE1 = {"speaking": ("LVE", "MHD", "FDD", "PDD", "JDD"), "listening": ("FDD", "PDD", "JDD")}
SUPP = ("FD", "P-FD", "MSE", "SID", "rPCC")
LISTENING_DD = tuple(f"listening/{n}" for n in TABLE1["listening"])  # listening keys of bench_stats.table1_window_values


@contextlib.contextmanager
def blas_threads(n: int):
    """Limit numpy / scipy BLAS threads to ``n`` inside the block (threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=int(n), user_api="blas"):
        yield


def _convention(mcfg: DictConfig) -> tuple[str, int]:
    return str(mcfg.get("convention", "velocity")), int(mcfg.get("min_frames", 10))


def _std_rows(x, mask, cv, min_frames):
    """Per window: mean over valid channels of the std over the masked frames, and whether it counts."""
    s = masked_std(x, mask)  # (B, C)
    n_c = cv.sum(-1)
    val = torch.where(cv, s, torch.zeros_like(s)).sum(-1) / n_c.clamp(min=1)
    return val, (mask.sum(-1) >= min_frames) & (n_c > 0)


def reward_rows(reward, pred: torch.Tensor, gt: torch.Tensor, listening: torch.Tensor, valid: torch.Tensor,
                min_frames: int, speaking: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window and reward column: the reward on the column's frames (listening, or ``speaking`` for
    ``<group>@speaking`` columns) ``(B, n_groups)`` and whether it counts (valid group and >= ``min_frames``
    of those frames) ``(B, n_groups)``."""
    r = reward.compute(pred, gt, listening, valid, **speaking_kwargs(reward, speaking))
    enough = torch.stack([m.sum(-1) >= min_frames for m in reward.column_masks(listening, speaking)], -1)  # (B, n)
    return r["reward"], r["valid"] & enough


def row_stats(pred: torch.Tensor, data: EvalData, mcfg: DictConfig, progress: bool = False,
              run_reward: dict | None = None) -> dict:
    """Per-window quantities every subset aggregates (computed once per prediction).

    ``run_reward``: the run's recorded reward config (:func:`.checkpoints.run_reward_config`); scored
    separately when its per-group terms differ from the default reward's.
    """
    b = data.bank
    gt, valid = b["actor_motion"], b["actor_valid"]
    conv, mf = _convention(mcfg)
    st: dict = {"param": {}, "param_std": {}, "groups": {}, "vertex": {}}
    for split in SPLITS:
        mask = b[split]
        for name, groups in M.DYNAMIC_METRICS.items():
            cv = M.group_channel_valid(valid, groups, gt.shape[0], gt.device)
            sp, sg, enough = M.dynamic_std_rows(M.group_channels(pred, groups), M.group_channels(gt, groups), mask, conv, mf)
            st["param"][(split, name)] = M.deviation_from_stds(sp, sg, enough, cv)
            if split == "listening":  # what the deviation is made of (amplitude vs timing, .deviation_parts)
                st["param_std"][name] = (sp, sg, cv, enough & cv.any(-1))
    lis = b["listening"]
    bands = {"pred": M.band_split(pred), "gt": M.band_split(gt)}  # (low, high) of (B, W, 67) each
    for g in GROUP_NAMES:
        cv = M.group_channel_valid(valid, (g,), gt.shape[0], gt.device)
        st["groups"][g] = {
            "dd": M.dynamic_deviation_rows(pred[..., GROUPS[g]], gt[..., GROUPS[g]], lis, cv, conv, mf),
            "std_pred": _std_rows(pred[..., GROUPS[g]], lis, cv, mf),
            "std_gt": _std_rows(gt[..., GROUPS[g]], lis, cv, mf),
        }
        for who, (low, high) in bands.items():  # velocity std of the slow and the frame-to-frame band
            for band, x in (("low", low), ("high", high)):
                st["groups"][g][f"vel_{band}_{who}"] = _std_rows(*frame_velocity(x[..., GROUPS[g]], lis), cv, mf)
    st["reward"] = reward_rows(build_run_reward(DEFAULT_EVAL_REWARD), pred, gt, lis, valid, mf)  # all six groups
    own = build_run_reward(run_reward) if run_reward is not None and terms_differ_from_default(run_reward) else None
    if own is not None:
        st["run_reward"] = (own.group_names, *reward_rows(own, pred, gt, lis, valid, mf, speaking=b["speaking"]))
    if data.flame is not None:
        st["vertex"] = vertex_row_stats(pred, data, mcfg, progress)
    return st


@torch.no_grad()
def vertex_row_stats(pred: torch.Tensor, data: EvalData, mcfg: DictConfig, progress: bool = False) -> dict:
    """LVE / MHD sums (speaking) and the vertex FDD per window (both splits), vertices in mm."""
    flame, b = data.flame, data.bank
    gt, valid = b["actor_motion"], b["actor_valid"]
    cm = torch.as_tensor(channel_mask(valid.cpu().numpy()), device=gt.device).to(gt.dtype)  # invalid groups -> 0
    pose = bool(mcfg.get("vertex_pose", False))
    lips, upper = flame.region("lips"), flame.region("upper_face")
    conv, mf = _convention(mcfg)
    B = gt.shape[0]
    out = {k: torch.zeros(B, dtype=torch.float64) for k in ("lve_sum", "mhd_sum")}
    out["frames"] = torch.zeros(B, dtype=torch.long)
    for split in SPLITS:
        out[f"fdd_{split}"] = torch.zeros(B, dtype=torch.float64)
        out[f"fdd_{split}_ok"] = torch.zeros(B, dtype=torch.bool)
    expr_ok = valid[:, GROUP_NAMES.index("expr")].cpu()
    for i in tqdm(range(B), desc="FLAME vertices", disable=not progress, unit="window", leave=False):
        pv = flame((pred[i] * cm[i]).double(), with_global=pose, with_neck=pose)[None] * 1000.0  # (1, T, V, 3) mm
        gv = flame((gt[i] * cm[i]).double(), with_global=pose, with_neck=pose)[None] * 1000.0
        spk = b["speaking"][i : i + 1].cpu()
        s, n = M.lve_rows(pv[:, :, lips], gv[:, :, lips], spk)
        out["lve_sum"][i], out["frames"][i] = s[0], n[0]
        out["mhd_sum"][i] = M.mhd_rows(pv, gv, spk)[0][0]
        for split in SPLITS:
            v, ok = M.vertex_dynamic_deviation_rows(pv[:, :, upper], gv[:, :, upper], b[split][i : i + 1].cpu(), conv, mf)
            out[f"fdd_{split}"][i], out[f"fdd_{split}_ok"][i] = v[0], bool(ok[0]) and bool(expr_ok[i])
    return out


def _table1(data: EvalData, st: dict, rows: torch.Tensor, n_frames: dict, mcfg: DictConfig) -> dict:
    conv, mf = _convention(mcfg)
    scale = M.DYNAMIC_SCALE[conv]
    table1: dict = {s: {} for s in SPLITS}
    for split in SPLITS:
        for name in TABLE1[split]:
            if n_frames[split] == 0:
                res = M.unavailable(f"no {split} frames")
            elif name in ("LVE", "MHD"):
                if data.flame is None:
                    res = M.unavailable("no FLAME model (metrics.flame_model): vertex metrics unavailable")
                else:
                    vx = st["vertex"]
                    key = "lve_sum" if name == "LVE" else "mhd_sum"
                    res = M.frame_mean(vx[key][rows], vx["frames"][rows], 1.0, "speaking frames")
                    res.extra["unit"] = "mm"
            elif name == "FDD" and data.flame is not None:
                vx = st["vertex"]
                res = M.row_mean(vx[f"fdd_{split}"][rows], vx[f"fdd_{split}_ok"][rows], scale,
                                 f"window with >= {mf} {split} frames")
                res.extra["basis"] = "upper-face vertices (mm)"
            else:
                val, ok = st["param"][(split, name)]
                res = M.row_mean(val[rows], ok[rows], scale, f"window with >= {mf} {split} frames and a valid "
                                 f"{'/'.join(M.DYNAMIC_METRICS[name])} group")
                res.extra["basis"] = "parameters: " + "+".join(M.DYNAMIC_METRICS[name])
            table1[split][name] = res
    return table1


def _listening_groups(st: dict, rows: torch.Tensor, mcfg: DictConfig) -> dict:
    conv, mf = _convention(mcfg)
    scale = M.DYNAMIC_SCALE[conv]
    what = f"window with >= {mf} listening frames and a valid {{}} group"
    rew, rvalid = st["reward"]
    own_names, own_rew, own_valid = st.get("run_reward", ((), None, None))
    groups = {}
    for gi, g in enumerate(GROUP_NAMES):
        gs = st["groups"][g]
        groups[g] = {"dd": M.row_mean(gs["dd"][0][rows], gs["dd"][1][rows], scale, what.format(g)),
                     "std_pred": M.row_mean(gs["std_pred"][0][rows], gs["std_pred"][1][rows], 1.0, "window"),
                     "std_gt": M.row_mean(gs["std_gt"][0][rows], gs["std_gt"][1][rows], 1.0, "window"),
                     "reward": M.row_mean(rew[rows, gi], rvalid[rows, gi], 1.0, what.format(g)),
                     **{k: M.row_mean(gs[k][0][rows], gs[k][1][rows], 1.0, "window")
                        for k in (f"vel_{band}_{who}" for band in ("low", "high") for who in ("pred", "gt"))}}
        if g in own_names:
            j = own_names.index(g)
            groups[g]["run_reward"] = M.row_mean(own_rew[rows, j], own_valid[rows, j], 1.0, what.format(g))
    return groups


def _listening_parts(st: dict, rows: torch.Tensor, mcfg: DictConfig) -> dict:
    """Per listening dynamic metric (parameter channels): the deviation, the same at the best amplitude
    per channel and the median factor, and the window-blind floor (:mod:`.deviation_parts`), in Table 1
    units (the factor unscaled)."""
    conv, _ = _convention(mcfg)
    scale = M.DYNAMIC_SCALE[conv]
    out = {}
    for name, (sp, sg, cv, ok) in st["param_std"].items():
        sel = ok & rows
        n = int(sel.sum())
        if n == 0:
            out[name] = {k: M.unavailable("no window counts") for k in ("deviation", "amplitude", "at_best_amplitude", "window_blind")}
            continue
        parts = deviation_parts(sp[sel].double().cpu().numpy(), sg[sel].double().cpu().numpy(), cv[sel].cpu().numpy())
        out[name] = {k: M.MetricResult(v if k == "amplitude" else v * scale, n) for k, v in parts.items()}
    return out


def aggregate(pred: torch.Tensor, data: EvalData, st: dict, rows: torch.Tensor, mcfg: DictConfig) -> dict:
    """JSON-able results of the windows ``rows`` ((B,) bool) from the per-window ``st``."""
    b = data.bank
    _, mf = _convention(mcfg)
    rows = rows.to(torch.bool).cpu()
    n_frames = {s: int(b[s][rows].sum()) for s in SPLITS}
    sel = torch.nonzero(rows).flatten()
    seq = [data.seq_ids[i] for i in sel.tolist()]
    supp = {split: M.dualtalk_metrics(pred[sel], b["actor_motion"][sel], b[split][sel], b["actor_valid"][sel],
                                      b["partner_motion"][sel], b["partner_valid"][sel], seq_ids=seq, min_frames=mf,
                                      publication_scale=bool(mcfg.get("publication_scale", True)),
                                      seed=int(mcfg.get("sid_seed", 0)), split=split)
            for split in SPLITS}
    return {"n_windows": int(rows.sum()), "frames": n_frames, "table1": _table1(data, st, rows, n_frames, mcfg),
            "supplementary": supp, "listening_groups": _listening_groups(st, rows, mcfg),
            "listening_parts": _listening_parts(st, rows, mcfg)}


def evaluate_model(model, data: EvalData, cfg: DictConfig, seed: int | None = None, progress: bool = True,
                   run_reward: dict | None = None) -> dict:
    """Generate the split and compute every metric on all windows and on the expressive subset.

    ``cfg``: ``steps``, ``w_speak``, ``w_listen``, ``cfg_drop`` (optional, default all conditions),
    ``batch_size``, ``seed`` (default of ``seed``) and the ``metrics`` group. The prediction ``(B, W, 67)`` is returned under ``_pred``.
    """
    seed = int(cfg.seed if seed is None else seed)
    t0 = time.perf_counter()
    pred = generate_motion(model, data.vae, data.normalizer, data.bank, steps=int(cfg.steps), w_speak=float(cfg.w_speak),
                           w_listen=float(cfg.w_listen), seed=seed, batch_size=int(cfg.batch_size), progress=progress,
                           cfg_drop=cfg.get("cfg_drop"))
    return score_prediction(pred, data, cfg.metrics, progress, run_reward, generate_s=time.perf_counter() - t0)


def evaluate_reconstruction(data: EvalData, mcfg: DictConfig, progress: bool = False) -> dict:
    """Every metric of :func:`evaluate_model` for the ground truth passed through the VAE (no
    generation, no seed): the floor of the dynamic deviations any model decoded by this VAE reaches
    without emitting latents off the VAE's data manifold. ``mcfg``: the ``metrics`` group."""
    t0 = time.perf_counter()
    pred = reconstruct_motion(data.vae, data.normalizer, data.bank)  # (B, W, 67)
    return score_prediction(pred, data, mcfg, progress, generate_s=time.perf_counter() - t0)


def score_prediction(pred: torch.Tensor, data: EvalData, mcfg: DictConfig, progress: bool = False,
                     run_reward: dict | None = None, generate_s: float = 0.0) -> dict:
    """Every metric of ``pred (B, W, 67)`` (raw FLAME of ``data``'s rows) on all windows and on the
    expressive subset; the prediction is returned under ``_pred`` and its per-window quantities
    (:func:`row_stats`) under ``_row_stats``."""
    t1 = time.perf_counter()
    st = row_stats(pred, data, mcfg, progress, run_reward)
    res = {"all": aggregate(pred, data, st, torch.ones(pred.shape[0], dtype=torch.bool), mcfg),
           "expressive": aggregate(pred, data, st, data.expressive.cpu(), mcfg)}
    res["timing"] = {"generate_s": generate_s, "metrics_s": time.perf_counter() - t1}
    res["_pred"], res["_row_stats"] = pred, st
    return res
