"""Text control and CFG intensity of generated listening motion (synthetic corpus with intent labels).

- **Intent classifier**: multinomial logistic regression (L2, L-BFGS, deterministic) on per-window
  statistics of the listening frames -- mean, std and velocity std of expression channels 0-9,
  jaw, neck, eyelid, eyepose and rot -- trained on *ground-truth* listener motion of the train
  split with the intent labels of ``synthetic_labels.json``.
- **Text control accuracy** (:func:`run_controls`): test windows generated with a prompt naming one
  intent (``envs.synthetic.describe``); the classifier's accuracy on the generated listening motion
  (chance = 1 / number of intents); also on the windows' own text.
- **VAE-space classifier** (supplementary, never the target's figure): the same classifier trained on
  the *VAE reconstructions* of the same train windows (:func:`vae_recode`), applied to the same
  generated motion. The ground-truth classifier reads intent partly from expression jitter that no
  model decoded by the VAE can emit (its reconstruction of real motion scores 0.77 on the default
  corpus); this one asks whether the prompt is followed within what the VAE represents.
- **CFG intensity sweep**: listening motion std (per group: mean over channels of the std over the
  listening frames) against the listening CFG weight ``w_listen``, for each unconditional branch of
  ``cfg_drops`` (the conditions it nulls; the paper's nulls all three).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ..agents.sampling import check_cfg_drop
from ..envs.dataset import DyadicWindows
from ..envs.flame import GROUP_NAMES, GROUPS
from ..envs.windows import decode_latents, encode_latents
from ..rewards.stats import masked_mean, masked_std, velocity_std
from . import metrics as M
from .bench_stats import per_label_means, table1_window_values
from .data import EvalData, select_indices
from .deviation_parts import label_floor_rows, label_sampler_rows
from .generation import generate_motion
from .scoring import LISTENING_DD

CLS_CHANNELS = np.r_[0:10, GROUPS["jaw"], GROUPS["neck"], GROUPS["eyelid"], GROUPS["eyepose"], GROUPS["rot"]]


def window_features(motion: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """``(B, T, 67)`` motion, ``(B, T)`` listening mask -> ``(B, 3 * 27)`` mean / std / velocity std."""
    x = motion[..., torch.as_tensor(CLS_CHANNELS)].double()  # (B, T, 27)
    m = mask.to(torch.bool)
    return torch.cat([masked_mean(x, m), masked_std(x, m), velocity_std(x, m)], -1).cpu().numpy()


class IntentClassifier:
    """Multinomial logistic regression (L2) on standardised features, trained with L-BFGS; deterministic."""

    def __init__(self, l2: float = 1e-3, iters: int = 300):
        self.l2, self.iters = float(l2), int(iters)

    def fit(self, X: np.ndarray, y: np.ndarray, n_classes: int) -> "IntentClassifier":
        self.mu, self.sd = X.mean(0), X.std(0) + 1e-8
        Xt = torch.as_tensor((X - self.mu) / self.sd, dtype=torch.float64)
        yt = torch.as_tensor(y, dtype=torch.long)
        self.W = torch.zeros(X.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
        self.b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([self.W, self.b], max_iter=self.iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(Xt @ self.W + self.b, yt) + self.l2 * self.W.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            Xt = torch.as_tensor((X - self.mu) / self.sd, dtype=torch.float64)
            return (Xt @ self.W + self.b).argmax(-1).numpy()


# ----------------------------------------------------------------------------------------------
# labels of the synthetic corpus


def load_labels(root: Path) -> dict | None:
    """``synthetic_labels.json`` of a synthetic corpus, or None."""
    p = root / "synthetic_labels.json"
    if not p.is_file():
        return None
    try:
        labels = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read the intent labels ({e}); delete the file to evaluate without them") from e
    if not isinstance(labels, dict):
        raise ValueError(f"{p}: expected a JSON object of conversations, got {type(labels).__name__}")
    return labels


def corpus_intents(root: Path) -> list[str] | None:
    """The intent names of a synthetic corpus (its ``dataset.json``), or None."""
    try:
        meta = json.loads((root / "dataset.json").read_text())
        return list(meta["synthetic"]["intents"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


def window_intent(labels: dict, cid: str, actor: int, window: int) -> str | None:
    try:
        return labels[cid]["intents"][actor][window]
    except (KeyError, IndexError, TypeError):
        return None


def row_intents(data: EvalData, labels: dict, rows: list[int]) -> list[str | None]:
    """The labelled intent of bank rows ``rows`` of ``data``."""
    return [window_intent(labels, *data.seq_ids[r], data.windows.index[data.indices[r]].window) for r in rows]


def window_text_intent(labels: dict, cid: str, actor: int, window: int) -> str | None:
    """The intent a window's text names: its labelled intent when the text is a full description, None
    when it is vague or missing (``text_kinds`` of the labels; labels without them: every text is full)."""
    intent = window_intent(labels, cid, actor, window)
    try:
        kind = labels[cid]["text_kinds"][actor][window]
    except (KeyError, IndexError, TypeError):
        kind = "full"
    return intent if kind == "full" else None


def row_text_intents(data: EvalData, labels: dict, rows: list[int]) -> list[str | None]:
    """The intent named by the text of bank rows ``rows`` of ``data`` (:func:`window_text_intent`)."""
    return [window_text_intent(labels, *data.seq_ids[r], data.windows.index[data.indices[r]].window) for r in rows]


def listening_per_intent(data: EvalData, labels: dict, row_stats: dict, mcfg: DictConfig) -> dict:
    """Listening FDD / PDD / JDD of one prediction per labelled listener intent.

    ``row_stats``: the prediction's per-window quantities (``score_prediction(...)["_row_stats"]``);
    ``mcfg``: the ``metrics`` group. Returns ``{"FDD": {intent: {"mean", "n", "share"}}, ...}``: the
    mean over the intent's counted windows (Table 1 units), their count, and the share of the summed
    deviation over all counted windows they carry (the benchmark's "per intent" section, one model).
    """
    rows = list(range(int(data.bank.batch_size[0])))
    per = per_label_means({"model": {0: table1_window_values(row_stats, mcfg)}}, row_intents(data, labels, rows), LISTENING_DD)
    return {k.split("/")[-1]: v for k, v in per["model"].items()}


def intent_floor(data: EvalData, labels: dict, row_stats: dict, mcfg: DictConfig) -> dict:
    """Listening FDD / PDD / JDD floors of a model that knows each window's labelled listener intent.

    The best constant per channel and intent (:func:`.deviation_parts.label_floor_rows`; unlabelled
    windows form a group of their own) over the windows each metric counts, from the ground truth of
    ``row_stats`` (any prediction's :func:`.scoring.row_stats`; parameter channels, Table 1 units).
    Returns ``{metric: {"intent_aware", "text_aware", "window_blind", "n", "per_intent": {intent: {"mean", "n"}},
    "sampler": {"intent_aware", "text_aware", "window_blind", "per_intent": {intent: mean}}}}``:
    the mean over all counted windows, the same with the groups a model reading only the text can form
    (the intent its text names; the windows whose text is vague or missing together: ``text_aware``), and
    with one group (the window-blind floor), and the mean over each labelled intent's windows. ``text_aware``
    is never above ``window_blind``; it is not ordered against ``intent_aware`` (neither grouping refines the other).
    ``sampler``: the same groupings for a faithful sampler instead of the best constant
    (:func:`.deviation_parts.label_sampler_rows`: each window plays the stds of a random window of its
    group), what a generative model reaches that samples exactly the spread its conditions leave open;
    each is at or above the matching floor.
    """
    scale = M.DYNAMIC_SCALE[str(mcfg.get("convention", "velocity"))]
    rows = list(range(int(data.bank.batch_size[0])))
    lab, text_lab = row_intents(data, labels, rows), row_text_intents(data, labels, rows)
    out = {}
    for name, (_, sg, cv, ok) in row_stats["param_std"].items():
        sel = ok.cpu().numpy().astype(bool)
        if not sel.any():
            continue
        g, v = sg[ok].double().cpu().numpy(), cv[ok].cpu().numpy()
        la = np.asarray([lab[i] for i in np.flatnonzero(sel)], dtype=object)
        tl = [text_lab[i] for i in np.flatnonzero(sel)]
        floor = label_floor_rows(g, v, la) * scale  # (n,)
        text = label_floor_rows(g, v, tl) * scale  # (n,)
        blind = label_floor_rows(g, v, [None] * len(la)) * scale
        samp = {k: label_sampler_rows(g, v, groups) * scale for k, groups in
                (("intent_aware", la), ("text_aware", tl), ("window_blind", [None] * len(la)))}  # (n,) each
        known = sorted({x for x in la if x is not None})
        per = {i: {"mean": float(floor[la == i].mean()), "n": int((la == i).sum())} for i in known}
        out[name] = {"intent_aware": float(floor.mean()), "text_aware": float(text.mean()), "window_blind": float(blind.mean()),
                     "n": int(sel.sum()), "per_intent": per,
                     "sampler": {**{k: float(r.mean()) for k, r in samp.items()},
                                 "per_intent": {i: float(samp["intent_aware"][la == i].mean()) for i in known}}}
    return out


def vae_recode(vae, normalizer, batch_size: int = 64):
    """A callable ``(B, T, 67)`` raw motion -> the same motion through the VAE (posterior mean, decoded)."""
    dev = next(vae.parameters()).device

    def recode(motion: torch.Tensor) -> torch.Tensor:
        out = [decode_latents(vae, normalizer, encode_latents(vae, normalizer, motion[i:i + batch_size].to(dev))).cpu()
               for i in range(0, motion.shape[0], batch_size)]
        return torch.cat(out)

    return recode


def train_intent_classifier(root: Path, labels: dict, intents: list[str], min_listen: int,
                            recode=None) -> tuple[IntentClassifier, dict]:
    """Classifier on ground-truth listening motion of the train split windows; ``recode``: a callable
    applied to that motion first (:func:`vae_recode`: the VAE-space classifier)."""
    w = DyadicWindows(root, "train", load_audio=False)
    motion, lis, y = [], [], []
    for i in range(len(w)):
        ix = w.index[i]
        item = w[i]
        lab = window_intent(labels, ix.conversation, ix.actor, ix.window)
        if lab not in intents or item["listening"].sum() < min_listen:
            continue
        motion.append(item["actor_motion"])
        lis.append(item["listening"])
        y.append(intents.index(lab))
    if len(set(y)) < 2:
        raise ValueError(f"intent classifier: fewer than 2 intents among train windows with >= {min_listen} listening frames")
    motion = torch.as_tensor(np.stack(motion))  # (N, T, 67)
    if recode is not None:
        motion = recode(motion)
    X = window_features(motion, torch.as_tensor(np.stack(lis)))
    y = np.asarray(y)
    clf = IntentClassifier().fit(X, y, len(intents))
    return clf, {"train_windows": int(len(y)), "train_accuracy": float((clf.predict(X) == y).mean())}


def ground_truth_accuracy(clf: IntentClassifier, data: EvalData, labels: dict, intents: list[str], min_listen: int,
                          motion: torch.Tensor | None = None, key: str = "gt_test") -> dict:
    """Accuracy of ``clf`` on the ground-truth listening motion of the labelled bank rows with
    >= ``min_listen`` listening frames (empty dict when there is none), as ``{key}_accuracy`` and
    ``{key}_windows``. ``motion (B, W, 67)``: score this version of the rows' ground truth instead
    (e.g. its VAE reconstruction: how much of the intent survives the VAE)."""
    lis = data.bank["listening"]
    truth = row_intents(data, labels, list(range(len(data.indices))))
    keep = [r for r, t in enumerate(truth) if t in intents and int(lis[r].sum()) >= min_listen]
    if not keep:
        return {}
    X = window_features((data.bank["actor_motion"] if motion is None else motion)[keep], lis[keep])
    acc = float((clf.predict(X) == np.array([intents.index(truth[r]) for r in keep])).mean())
    return {f"{key}_accuracy": acc, f"{key}_windows": len(keep)}


# ----------------------------------------------------------------------------------------------
# controls


def control_windows(data: EvalData, n: int, min_listen: int) -> list[int]:
    """Evenly spaced bank rows with at least ``min_listen`` listening frames."""
    ok = torch.nonzero(data.bank["listening"].sum(-1) >= min_listen).flatten().tolist()
    if not ok:
        return []
    return [ok[i] for i in select_indices(len(ok), n)]


def prompt_embeddings(data: EvalData, intents: list[str], n: int, seed: int) -> dict[str, torch.Tensor]:
    """Per intent, ``(n, Dt)`` text embeddings of ``n`` listener prompts naming it (seeded wording)."""
    from ..envs.synthetic import describe

    out = {}
    for k, intent in enumerate(intents):
        texts = [describe(intent, np.random.default_rng([seed, k, i]), speaking=False) for i in range(n)]
        out[intent] = torch.as_tensor(data.text_enc.encode(texts))
    return out


def run_controls(model, data: EvalData, rows: list[int], ccfg: DictConfig, ecfg: DictConfig, seed: int, clf, intents,
                 prompts, labels, pred_all: torch.Tensor, progress: bool, clf_vae: IntentClassifier | None = None) -> dict:
    """Text-control accuracy (own text and each intent's prompt) and the CFG sweep on bank ``rows``.

    ``ccfg``: ``min_listen``, ``cfg_weights``, ``cfg_drops`` (optional; None = the paper's branch only);
    ``ecfg``: ``steps``, ``batch_size``; ``pred_all``: the
    evaluation's prediction of every bank row (the windows' own text). ``clf_vae``: the VAE-space
    classifier; when given, the same generated motion is also scored by it (``out["vae_space"]``, same keys).
    """
    out: dict = {}
    mf = int(ccfg.min_listen)
    if not rows:
        return {"note": f"no test window with >= {mf} listening frames"}
    sub = data.bank[torch.as_tensor(rows)]
    lis = sub["listening"]
    kw = dict(steps=int(ecfg.steps), seed=seed, batch_size=int(ecfg.batch_size), progress=progress)
    if clf is not None:
        truth = row_intents(data, labels, rows)
        keep = [i for i, t in enumerate(truth) if t in intents]
        scorers = {"": clf, **({"vae_space": clf_vae} if clf_vae is not None else {})}
        res = {k: {"per_intent": {}, "confusion": np.zeros((len(intents), len(intents)), dtype=np.int64)} for k in scorers}
        if keep:
            X = window_features(pred_all[torch.as_tensor(rows)][keep], lis[keep])
            yt = np.array([intents.index(truth[i]) for i in keep])
            for k, c in scorers.items():
                res[k]["own_text_accuracy"] = float((c.predict(X) == yt).mean())
        for k, intent in enumerate(intents):
            pred = generate_motion(model, data.vae, data.normalizer, sub, text_emb=prompts[intent][: len(rows)],
                                   desc=f"prompt {intent}", **kw)
            X = window_features(pred, lis)
            for name, c in scorers.items():
                yp = c.predict(X)
                res[name]["per_intent"][intent] = float((yp == k).mean())
                np.add.at(res[name]["confusion"][k], yp, 1)
        for name, r in res.items():
            r["prompt_accuracy"] = float(np.mean(list(r["per_intent"].values())))
            r["confusion"] = r["confusion"].tolist()
        out.update(res.pop(""))
        out.update(res)
    sweeps, no_cfg = {}, None  # w_listen = 1 runs no unconditional branch: one generation serves every variant
    for drop in [check_cfg_drop(d) for d in (ccfg.get("cfg_drops") or [None])]:
        sweep = {}
        for w in ccfg.cfg_weights:
            if float(w) == 1.0 and no_cfg is not None:
                pred = no_cfg
            else:
                pred = generate_motion(model, data.vae, data.normalizer, sub, w_speak=1.0, w_listen=float(w), cfg_drop=drop,
                                       desc=f"cfg w_listen={float(w):g} (null {'+'.join(drop)})", **kw)
                no_cfg = pred if float(w) == 1.0 else no_cfg
            sweep[f"{float(w):g}"] = {g: M.motion_std(pred, lis, sub["actor_valid"], (g,), mf).value for g in GROUP_NAMES}
        sweeps["+".join(drop)] = sweep
    out["cfg_sweep"] = next(iter(sweeps.values()))  # the first variant's (the paper's by default)
    out["cfg_sweeps"] = sweeps
    out["cfg_sweep_gt"] = {g: M.motion_std(sub["actor_motion"], lis, sub["actor_valid"], (g,), mf).value for g in GROUP_NAMES}
    out["n_windows"] = len(rows)
    return out
