"""Evaluate an AR-Flow checkpoint (supervised or post-trained) on a dataset split.

    python train/evaluate.py checkpoint=runs/sft_small
    python train/evaluate.py checkpoint=runs/gdpo_small_expr+rot
    python train/evaluate.py checkpoint=runs/sft_small metrics.flame_model=FLAME2020/generic_model.pkl \
        metrics.flame_masks=FLAME2020/FLAME_masks.pkl        # + LVE / MHD / vertex FDD
    python train/evaluate.py checkpoint=runs/sft_small metrics.convention=position   # ARTalk/UniLS convention

Every window of the split (each side of each conversation as the actor once) is generated with
the deterministic Euler ODE sampler (``steps=10``, CFG weights ``w_speak`` / ``w_listen``, noise
from ``seed``) and scored against the ground truth with ``evaluation/metrics.py``: the paper's
Table 1 (speaking LVE, MHD, FDD, PDD, JDD; listening FDD, PDD, JDD), the supplementary Table 6
(FD, P-FD, MSE, SID, rPCC per group exp / jaw / pose, speaking and listening), per-FLAME-group
listening dynamics and rewards, on all windows and on the *expressive subset* (windows whose
ground-truth variance is in the top quartile; variance = mean over valid channels of the
per-channel variance over the window of the ground truth normalised with the dataset's
normaliser). Writes ``OUT/metrics.json`` and ``OUT/metrics.md`` (default ``OUT`` =
``<checkpoint>/eval_<split>``).

On a fresh clone the default checkpoint (``runs/sft_small``) is produced first -- dataset, VAE and
supervised AR-Flow by their own entry points, cached -- as ``train/gdpo.py`` does; any other
checkpoint must exist. Bad input stops with a clear error: a checkpoint trained on a dataset
with another FLAME layout or format version, a split without listening frames, a FLAME model
file missing keys.
"""
from __future__ import annotations

import os

# numpy / scipy BLAS: one thread unless the caller says otherwise (set before numpy is imported; the
# Frechet distances' sqrtm is 30x slower with two BLAS threads on a busy 2-core machine)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gdpo_listener.pipeline import factories, run_state, stages
from gdpo_listener.agents.arflow import load_arflow
from gdpo_listener.agents.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_json
from gdpo_listener.agents.checkpoint import load_meta as load_ckpt_meta
from gdpo_listener.envs.dataset import DyadicWindows, load_meta
from gdpo_listener.envs.flame import GROUP_NAMES, GROUPS, channel_mask
from gdpo_listener.envs.windows import build_window_bank, cond_from_bank
from gdpo_listener.evaluation import metrics as M
from gdpo_listener.rewards.stats import masked_std

SPLITS = ("speaking", "listening")
TABLE1 = {"speaking": ("LVE", "MHD", "FDD", "PDD", "JDD"), "listening": ("FDD", "PDD", "JDD")}
SUPP = ("FD", "P-FD", "MSE", "SID", "rPCC")


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


class EvalInputError(ValueError):
    """The checkpoint, dataset or FLAME model given to the evaluation do not fit together."""


# ----------------------------------------------------------------------------------------------
# compatibility checks


def dataset_signature(meta: dict) -> dict:
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


def load_flame(mcfg: DictConfig):
    """The FLAME layer of ``metrics.flame_model`` (+ masks), or None (vertex metrics unavailable)."""
    if not mcfg.get("flame_model"):
        return None
    from gdpo_listener.evaluation.flame_layer import FlameLayer, FlameModelError

    if not mcfg.get("flame_masks"):
        raise FlameModelError("metrics.flame_model is set but metrics.flame_masks is not: LVE needs the lip vertices "
                              "and the vertex FDD the forehead / eye-region vertices (FLAME_masks.pkl)")
    return FlameLayer(factories.abspath(mcfg.flame_model), factories.abspath(mcfg.flame_masks),
                      n_shape=int(mcfg.get("flame_n_shape", 300)))


# ----------------------------------------------------------------------------------------------
# data shared by every checkpoint evaluated on one split


@dataclass
class EvalData:
    root: Path
    split: str
    windows: DyadicWindows
    indices: list[int]
    bank: object  # TensorDict of the windows (envs/windows.py)
    seq_ids: list[tuple[str, int]]  # (conversation, actor) of every row
    expressive: torch.Tensor  # (B,) bool
    variance: torch.Tensor  # (B,) expressiveness score
    vae: object
    normalizer: object
    text_enc: object
    audio_enc: object
    device: torch.device
    flame: object = None
    notes: list[str] = field(default_factory=list)


def select_indices(n: int, max_windows) -> list[int]:
    """All windows, or ``max_windows`` evenly spaced ones (deterministic, covers every conversation)."""
    if max_windows is None or int(max_windows) >= n:
        return list(range(n))
    k = max(int(max_windows), 1)
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def expressiveness(windows: DyadicWindows, motion: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B,)``: mean over valid channels of the per-channel variance over the window of the
    ground truth normalised by the dataset's normaliser."""
    x = windows.normalizer.normalize(motion.double().cpu())
    var = x.var(1, unbiased=False)  # (B, 67)
    cm = torch.as_tensor(channel_mask(valid.cpu().numpy()))
    return (var * cm).sum(-1) / cm.sum(-1).clamp(min=1)


def checkpoint_meta(path: Path) -> dict:
    """The AR-Flow checkpoint's meta.json, with clear errors."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train one with train/sft.py or train/gdpo.py)")
    return load_ckpt_meta(path, kind="arflow")


def prepare(cfg: DictConfig, ckpt: Path, device: torch.device) -> tuple[EvalData, dict]:
    """Check inputs, load the VAE, encoders and the window bank of ``cfg.split``; returns (data, ckpt meta)."""
    data_root = stages.ensure_dataset(cfg.data)
    data_meta = load_meta(data_root)
    ckpt_meta = checkpoint_meta(ckpt)
    vae_dir = factories.abspath(cfg.vae_dir) if cfg.get("vae_dir") else (Path(ckpt_meta["vae_dir"]) if ckpt_meta.get("vae_dir") else None)
    if vae_dir is None:
        raise CheckpointError(f"checkpoint {ckpt} records no VAE folder (vae_dir); pass vae_dir=...")
    if not (vae_dir / "meta.json").is_file():
        raise FileNotFoundError(f"VAE {vae_dir} (recorded in checkpoint {ckpt}) does not exist; pass vae_dir=...")
    vae_meta = load_ckpt_meta(vae_dir, kind="vae")
    check_compatibility(ckpt, ckpt_meta, vae_meta, data_root, data_meta)

    windows = DyadicWindows(data_root, cfg.split, load_audio=False)
    if len(windows) == 0:
        raise EvalInputError(f"split {cfg.split!r} of {data_root} has no {windows.window}-frame window")
    n_listen = n_speak = 0
    for ix in windows.index:
        vad = windows.conversation(ix.conversation).vad
        s, e = ix.window * windows.window, (ix.window + 1) * windows.window
        n_speak += int(vad[ix.actor, s:e].sum())
        n_listen += int((vad[1 - ix.actor, s:e] & ~vad[ix.actor, s:e]).sum())
    notes = []
    if n_listen == 0:
        msg = (f"split {cfg.split!r} of {data_root} has no listening frames (partner speaking while the actor is "
               f"silent): the listening metrics cannot be computed; check the dataset's VAD")
        if cfg.metrics.get("require_listening", True):
            raise EvalInputError(msg + " (metrics.require_listening=false reports them as unavailable instead)")
        notes.append(msg)
    if n_speak == 0:
        notes.append(f"split {cfg.split!r} has no speaking frames: speaking metrics are unavailable")
    flame = load_flame(cfg.metrics)  # fails early on a bad model file

    torch_dev = device
    vae, normalizer, _ = factories.load_frozen_vae(vae_dir, torch_dev)
    feat_cfg = factories.checkpoint_encoders(cfg.features, ckpt_meta)
    text_enc, audio_enc = factories.make_encoders(feat_cfg, torch_dev)
    from gdpo_listener.agents.encoders import precompute_features

    features = precompute_features(data_root, text_enc, audio_enc, factories.abspath(feat_cfg.cache_dir),
                                   progress=bool(cfg.get("progress", True)), splits=(cfg.split,))
    idx = select_indices(len(windows), cfg.get("max_windows"))
    bank = build_window_bank(windows, features, vae, normalizer, device=torch_dev, indices=idx)
    seq_ids = [(windows.index[i].conversation, windows.index[i].actor) for i in idx]
    score = expressiveness(windows, bank["actor_motion"], bank["actor_valid"])
    q = float(cfg.metrics.get("expressive_quantile", 0.75))
    thr = float(np.quantile(score.numpy(), q))
    expressive = score >= thr
    data = EvalData(data_root, cfg.split, windows, idx, bank, seq_ids, expressive, score, vae, normalizer, text_enc,
                    audio_enc, torch_dev, flame, notes)
    return data, ckpt_meta


def load_model(ckpt: Path, data: EvalData):
    model, meta = load_arflow(ckpt, data.device, expect={"d_latent": data.vae.cfg.d_latent, "d_text": data.text_enc.dim,
                                                               "d_audio": data.audio_enc.dim})
    return model, meta


# ----------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(model, data: EvalData, bank=None, steps: int = 10, w_speak: float = 1.0, w_listen: float = 1.0, seed: int = 0,
             batch_size: int = 32, text_emb: torch.Tensor | None = None, progress: bool = True, desc: str = "generate") -> torch.Tensor:
    """ODE-sample every row of ``bank`` (default: the split's bank) -> raw FLAME ``(B, W, 67)``.

    Deterministic given ``seed`` and ``batch_size`` (one generator for the whole pass, as in
    ``generation.generate_motion``). ``text_emb (B, Dt)`` replaces the windows' text (text control).
    """
    bank = data.bank if bank is None else bank
    g = torch.Generator(device=bank.device).manual_seed(int(seed))
    n_tokens = bank["actor_latent"].shape[1]
    B = bank.batch_size[0]
    outs = []
    for i in tqdm(range(0, B, batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        b = bank[i : i + batch_size]
        cond = cond_from_bank(b)
        if text_emb is not None:
            te = text_emb[i : i + batch_size].to(bank.device)
            cond = {**cond, "text_emb": te, "text_mask": torch.ones(te.shape[0], dtype=torch.bool, device=bank.device)}
        z = model.sample(cond, n_tokens, steps=int(steps), w_speak=float(w_speak), w_listen=float(w_listen),
                         speaking_tokens=b["speaking_tokens"], generator=g)
        outs.append(data.normalizer.denormalize(data.vae.decode(z)))
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------
# metrics


def row_stats(pred: torch.Tensor, data: EvalData, mcfg: DictConfig, progress: bool = False) -> dict:
    """Per-window quantities every subset aggregates (computed once per prediction)."""
    from gdpo_listener.rewards.groups import build_reward

    b = data.bank
    gt, valid = b["actor_motion"], b["actor_valid"]
    conv, mf = str(mcfg.get("convention", "velocity")), int(mcfg.get("min_frames", 10))
    st: dict = {"param": {}, "groups": {}, "vertex": {}}
    for split in SPLITS:
        mask = b[split]
        for name, groups in M.DYNAMIC_METRICS.items():
            cv = M.group_channel_valid(valid, groups, gt.shape[0], gt.device)
            st["param"][(split, name)] = M.dynamic_deviation_rows(M.group_channels(pred, groups), M.group_channels(gt, groups), mask, cv, conv, mf)
    lis = b["listening"]
    for g in GROUP_NAMES:
        cv = M.group_channel_valid(valid, (g,), gt.shape[0], gt.device)
        st["groups"][g] = {
            "dd": M.dynamic_deviation_rows(pred[..., GROUPS[g]], gt[..., GROUPS[g]], lis, cv, conv, mf),
            "std_pred": _std_rows(pred[..., GROUPS[g]], lis, cv, mf),
            "std_gt": _std_rows(gt[..., GROUPS[g]], lis, cv, mf),
        }
    reward = build_reward("all")
    r = reward.compute(pred, gt, lis, valid)
    st["reward"] = (r["reward"], r["valid"] & (lis.sum(-1, keepdim=True) >= mf))
    if data.flame is not None:
        st["vertex"] = vertex_row_stats(pred, data, mcfg, progress)
    return st


def _std_rows(x, mask, cv, min_frames):
    s = masked_std(x, mask)
    n_c = cv.sum(-1)
    val = torch.where(cv, s, torch.zeros_like(s)).sum(-1) / n_c.clamp(min=1)
    return val, (mask.sum(-1) >= min_frames) & (n_c > 0)


@torch.no_grad()
def vertex_row_stats(pred: torch.Tensor, data: EvalData, mcfg: DictConfig, progress: bool = False) -> dict:
    """LVE / MHD sums (speaking) and the vertex FDD per window (both splits), vertices in mm."""
    flame, b = data.flame, data.bank
    gt, valid = b["actor_motion"], b["actor_valid"]
    cm = torch.as_tensor(channel_mask(valid.cpu().numpy()), device=gt.device).to(gt.dtype)  # invalid groups -> 0
    pose = bool(mcfg.get("vertex_pose", False))
    lips, upper = flame.region("lips"), flame.region("upper_face")
    conv, mf = str(mcfg.get("convention", "velocity")), int(mcfg.get("min_frames", 10))
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


def aggregate(pred: torch.Tensor, data: EvalData, st: dict, rows: torch.Tensor, mcfg: DictConfig) -> dict:
    """JSON-able results of the windows ``rows`` ((B,) bool) from the per-window ``st``."""
    b = data.bank
    conv, mf = str(mcfg.get("convention", "velocity")), int(mcfg.get("min_frames", 10))
    scale = M.DYNAMIC_SCALE[conv]
    rows = rows.to(torch.bool).cpu()
    n_frames = {s: int(b[s][rows].sum()) for s in SPLITS}
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
    supp = {}
    sel = torch.nonzero(rows).flatten()
    seq = [data.seq_ids[i] for i in sel.tolist()]
    for split in SPLITS:
        supp[split] = M.dualtalk_metrics(pred[sel], b["actor_motion"][sel], b[split][sel], b["actor_valid"][sel],
                                         b["partner_motion"][sel], b["partner_valid"][sel], seq_ids=seq, min_frames=mf,
                                         publication_scale=bool(mcfg.get("publication_scale", True)),
                                         seed=int(mcfg.get("sid_seed", 0)), split=split)
    groups = {}
    rew, rvalid = st["reward"]
    for gi, g in enumerate(GROUP_NAMES):
        gs = st["groups"][g]
        dd = M.row_mean(gs["dd"][0][rows], gs["dd"][1][rows], scale, f"window with >= {mf} listening frames and a valid {g} group")
        sp = M.row_mean(gs["std_pred"][0][rows], gs["std_pred"][1][rows], 1.0, "window")
        sg = M.row_mean(gs["std_gt"][0][rows], gs["std_gt"][1][rows], 1.0, "window")
        rv = rvalid[rows, gi]
        rw = M.row_mean(rew[rows, gi], rv, 1.0, f"window with >= {mf} listening frames and a valid {g} group")
        groups[g] = {"dd": dd, "std_pred": sp, "std_gt": sg, "reward": rw}
    return {"n_windows": int(rows.sum()), "frames": n_frames, "table1": table1, "supplementary": supp, "listening_groups": groups}


def to_json(x):
    if isinstance(x, M.MetricResult):
        return x.to_json()
    if isinstance(x, dict):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def evaluate_model(model, data: EvalData, cfg: DictConfig, seed: int | None = None, progress: bool = True) -> dict:
    """Generate the split and compute every metric on all windows and on the expressive subset."""
    seed = int(cfg.seed if seed is None else seed)
    t0 = time.perf_counter()
    pred = generate(model, data, steps=int(cfg.steps), w_speak=float(cfg.w_speak), w_listen=float(cfg.w_listen), seed=seed,
                    batch_size=int(cfg.batch_size), progress=progress)
    t1 = time.perf_counter()
    st = row_stats(pred, data, cfg.metrics, progress)
    allrows = torch.ones(pred.shape[0], dtype=torch.bool)
    res = {"all": aggregate(pred, data, st, allrows, cfg.metrics),
           "expressive": aggregate(pred, data, st, data.expressive.cpu(), cfg.metrics)}
    res["timing"] = {"generate_s": t1 - t0, "metrics_s": time.perf_counter() - t1}
    res["_pred"] = pred
    return res


def header(data: EvalData, cfg: DictConfig, ckpt: str, seed: int) -> dict:
    mc = cfg.metrics
    return {
        "checkpoint": str(ckpt), "dataset": str(data.root), "split": data.split, "n_windows": len(data.indices),
        "n_expressive": int(data.expressive.sum()), "expressive_quantile": float(mc.get("expressive_quantile", 0.75)),
        "seed": seed, "steps": int(cfg.steps), "w_speak": float(cfg.w_speak), "w_listen": float(cfg.w_listen),
        "convention": str(mc.get("convention", "velocity")), "dynamic_scale": M.DYNAMIC_SCALE[str(mc.get("convention", "velocity"))],
        "min_frames": int(mc.get("min_frames", 10)), "publication_scale": bool(mc.get("publication_scale", True)),
        "flame_model": str(mc.flame_model) if mc.get("flame_model") else None,
        "flame_eyelids": None if data.flame is None else bool(data.flame.has_eyelids),
        "notes": list(data.notes),
    }


# ----------------------------------------------------------------------------------------------
# report


def _fmt(x, digits=2) -> str:
    if isinstance(x, M.MetricResult):
        x = x.value
    elif isinstance(x, dict):
        x = x.get("value")
    return "n/a" if x is None else f"{x:.{digits}f}"


def table1_markdown(rows: list[tuple[str, dict]], fmt=_fmt) -> str:
    """``rows``: (label, table1 dict {split: {metric: result}}) -> the paper's Table 1 layout."""
    head = ["", *[f"Speaking {m}" if i == 0 else m for i, m in enumerate(TABLE1["speaking"])],
            *[f"Listening {m}" if i == 0 else m for i, m in enumerate(TABLE1["listening"])]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, t in rows:
        cells = [fmt(t["speaking"][m]) for m in TABLE1["speaking"]] + [fmt(t["listening"][m]) for m in TABLE1["listening"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def supp_markdown(rows: list[tuple[str, dict]], fmt=_fmt) -> str:
    """``rows``: (label, supplementary dict {split: {metric: {group: result}}}) -> Table 6 layout."""
    groups = list(M.DUALTALK_GROUPS)
    head = ["", "split"] + [f"{m} {g}" for m in SUPP for g in groups]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in rows:
        for split in SPLITS:
            cells = [fmt(s[split][m][g]) for m in SUPP for g in groups]
            lines.append(f"| {label} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def groups_markdown(rows: list[tuple[str, dict]], fmt=_fmt) -> str:
    head = ["", *[f"{g} dd" for g in GROUP_NAMES], *[f"{g} reward" for g in GROUP_NAMES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, gr in rows:
        cells = [fmt(gr[g]["dd"]) for g in GROUP_NAMES] + [fmt(gr[g]["reward"], 4) for g in GROUP_NAMES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def units_note(h: dict) -> str:
    conv = h["convention"]
    dyn = ("velocity std (paper): |std_t(vel P) - std_t(vel G)|" if conv == "velocity" else
           "position std (ARTalk/UniLS): |std_t(P) - std_t(G)|")
    return (f"FDD / PDD / JDD: {dyn}, x{h['dynamic_scale']:g}, mean over windows with >= {h['min_frames']} frames of the split; "
            f"FDD on {'upper-face FLAME vertices (mm)' if h['flame_model'] else 'expr + eyelid parameters (no FLAME model)'}, "
            f"PDD on rot + neck, JDD on jaw. LVE / MHD in mm ({'FLAME model ' + h['flame_model'] if h['flame_model'] else 'n/a: no FLAME model given'}). "
            f"Table 6: FD, P-FD (jaw x1000, pose x100), MSE (exp x10, jaw x1000, pose x100), SID (bits, higher = more diverse), "
            f"rPCC; exp = expr, pose = rot; per (conversation, actor) sequence, then averaged. "
            f"'dd' = listening velocity-std deviation of one FLAME group (same scale as FDD); reward = the default per-group reward "
            f"(weights var 1, vel 1, mean 0.25, mse 0.1) on listening frames. n/a = unavailable (see the JSON notes), never 0.")


def markdown_report(h: dict, res: dict) -> str:
    lines = [f"# Evaluation of `{h['checkpoint']}`", "",
             f"Dataset `{h['dataset']}`, split `{h['split']}`: {h['n_windows']} windows (expressive subset: "
             f"{h['n_expressive']} windows, top {100 * (1 - h['expressive_quantile']):.0f}% of ground-truth variance). "
             f"Euler ODE, {h['steps']} steps, CFG w_speak={h['w_speak']:g} w_listen={h['w_listen']:g}, seed {h['seed']}.", ""]
    for n in h["notes"]:
        lines.append(f"> note: {n}")
    lines += ["", "## Table 1 layout", "",
              table1_markdown([(f"all (n={res['all']['n_windows']})", res["all"]["table1"]),
                               (f"expressive (n={res['expressive']['n_windows']})", res["expressive"]["table1"])]),
              "", "## Supplementary (Table 6 layout)", "",
              supp_markdown([("all", res["all"]["supplementary"]), ("expressive", res["expressive"]["supplementary"])]),
              "", "## Listening, per FLAME group", "",
              groups_markdown([("all", res["all"]["listening_groups"]), ("expressive", res["expressive"]["listening_groups"])]),
              "", units_note(h), ""]
    return "\n".join(lines)


def write_report(out: Path, h: dict, res: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    doc = {**h, **to_json({k: v for k, v in res.items() if not k.startswith("_")})}
    atomic_write_json(out / "metrics.json", doc)
    atomic_write_bytes(out / "metrics.md", markdown_report(h, res).encode())
    return out / "metrics.json", out / "metrics.md"


def ensure_checkpoint(cfg: DictConfig, ckpt: Path) -> None:
    """On a fresh clone the default (supervised) checkpoint is produced first, as ``train/gdpo.py`` does:
    dataset, VAE and supervised AR-Flow by their own entry points (cached). Other checkpoints must exist."""
    pre = cfg.get("pretrained")
    if (ckpt / "meta.json").is_file() or pre is None or not pre.get("auto_train", False) or ckpt != factories.abspath(pre.sft):
        if not ckpt.exists():
            raise FileNotFoundError(f"checkpoint {ckpt} does not exist (supervised: train/sft.py; post-trained: "
                                    f"train/gdpo.py, e.g. python train/gdpo.py reward=expr+rot -> runs/gdpo_small_expr+rot)")
        return
    feats = cfg.features
    stage_cfg = OmegaConf.create({
        "pretrained": OmegaConf.to_container(pre, resolve=True), "device": cfg.device, "model": {"preset": str(pre.preset)},
        "features": {"text_encoder": feats.text_encoder or "bundled-minilm", "audio_encoder": feats.audio_encoder or "logmel",
                     "cache_dir": feats.cache_dir}})
    data_root = stages.ensure_dataset(cfg.data)
    vae = stages.ensure_vae(stage_cfg, data_root)
    stages.ensure_sft(stage_cfg, data_root, vae)


def run(cfg: DictConfig, verbose: bool = True) -> dict:
    """The whole evaluation of ``cfg`` (see ``conf/evaluate.yaml``); returns the JSON document written."""
    torch.set_num_threads(int(cfg.threads))
    device = factories.make_device(cfg.device)
    run_state.seed_everything(int(cfg.seed))
    if cfg.metrics.convention not in M.DYNAMIC_SCALE:
        raise ValueError(f"metrics.convention must be one of {list(M.DYNAMIC_SCALE)}, got {cfg.metrics.convention!r}")
    ckpt = factories.abspath(cfg.checkpoint)
    t0 = time.perf_counter()
    ensure_checkpoint(cfg, ckpt)
    data, _ = prepare(cfg, ckpt, device)
    model, _ = load_model(ckpt, data)
    with blas_threads(int(cfg.threads)):
        res = evaluate_model(model, data, cfg, progress=bool(cfg.progress))
    h = header(data, cfg, str(ckpt), int(cfg.seed))
    out = factories.abspath(cfg.out) if cfg.get("out") else ckpt / f"eval_{cfg.split}"
    js, md = write_report(out, h, res)
    if verbose:
        print(markdown_report(h, res))
        print(f"[evaluate] {h['n_windows']} windows in {time.perf_counter() - t0:.1f} s -> {js} and {md}")
    return json.loads(js.read_text())


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
