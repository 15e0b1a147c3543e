"""The GRPO vs GDPO vs supervised-only benchmark (``train/bench.py``): its methods, training budget,
run folders, training curves and report.

- :class:`BenchMethod` / :func:`parse_method`: a method of ``algos`` -- ``grpo``, ``gdpo``, or one of
  them trained with a given SDE, ``gdpo@marginal`` (``env.sde=marginal``; run folder
  ``runs/gdpo-marginal_seed<S>``), or with a named set of extra overrides from the config's
  ``variants``, ``gdpo+nokl`` (run folder ``runs/gdpo_nokl_seed<S>``), reported against its base
  (:func:`variant_report`), and any two methods against each other by the config's ``compare``
  (:func:`check_pairs`, :func:`compare_methods`);
- :func:`training_budget`: RL iterations, SDE rollouts and denoising transitions of one run, from
  the resolved config the run recorded (episode length ``env.episode_tokens`` or the model window);
- :func:`replaceable_run_dir`: whether a run folder may be deleted before a fresh run (only a
  run this benchmark started, identified by its :func:`run_stamp`, or an empty folder);
- :func:`reward_curves`: per-group training reward from the runs' CSV logs (:func:`.bench_stats.read_curve`);
- :func:`build_report`: ``report.json`` (statistics over seeds from :mod:`.seed_stats`, paired windows and
  mechanism figures from :mod:`.bench_stats`, the SDE choice from :mod:`.sde_choice`, the issue-10 targets
  from :mod:`.targets`); :mod:`.bench_markdown` renders it as ``report.md``, :mod:`.bench_plots` draws the figures.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..envs.flame import GROUP_NAMES
from . import targets as T
from .bench_stats import (
    curve_trends,
    mechanism_summary,
    paired_report,
    per_label_means,
    read_curve,
)
from .scoring import LISTENING_DD
from .sde_choice import closest_to_ode, evaluation_ode, model_verdict
from .seed_stats import aggregate_seeds, findings, mean_std, relative_change, welch_test

__all__ = ["ALGOS", "SDES", "BenchMethod", "parse_method", "method_label", "read_curve", "reward_curves", "training_budget",
           "run_stamp", "replaceable_run_dir", "compare_methods", "variant_report", "check_pairs", "build_report"]

ALGOS = ("grpo", "gdpo")
SDES = ("paper", "marginal")  # train/gdpo.py env.sde
METHOD_LABEL = {"supervised": "supervised-only", "grpo": "GRPO", "gdpo": "GDPO"}

# The benchmark's record of a training run it started: ``runs/<slug>_seed<S>.bench_run.json`` beside the
# run folder (train/gdpo.py accepts only an empty folder or one of its own runs as out_dir), written
# before training starts and completed when it finishes. Older versions kept it inside the folder.
RUN_STAMP_SUFFIX = ".bench_run.json"
LEGACY_RUN_STAMP = "bench_run.json"


VARIANT_NAME = re.compile(r"[A-Za-z0-9_-]+")
# what train/bench.py sets per run or holds equal across methods (the budget, the data, the models it starts from)
VARIANT_FORBIDDEN = ("algo", "env.sde", "seed", "out_dir", "reward", "device", "threads", "resume", "optim.iterations")
VARIANT_FORBIDDEN_GROUPS = ("model", "data", "pretrained", "features", "logger")  # and every key under them


@dataclass(frozen=True)
class BenchMethod:
    """One post-training method of the benchmark: ``algo`` trained with the SDE ``sde`` (None = the
    training config's ``env.sde``) and the extra overrides of the config's variants named in ``variant``
    (None = none; several joined by ``+`` compose, applied in order). ``key`` is how ``algos`` writes it
    (``gdpo``, ``gdpo@marginal``, ``gdpo+nokl``, ``gdpo+lora+jawkl``)."""

    algo: str
    sde: str | None = None
    variant: str | None = None

    @property
    def key(self) -> str:
        return self.base + ("" if self.variant is None else f"+{self.variant}")

    @property
    def base(self) -> str:
        """The key of the same method without its variant (what a variant is compared with)."""
        return self.algo if self.sde is None else f"{self.algo}@{self.sde}"

    @property
    def variant_names(self) -> tuple[str, ...]:
        """The variants this method applies, in order (``gdpo+lora+jawkl``: ``("lora", "jawkl")``)."""
        return () if self.variant is None else tuple(self.variant.split("+"))

    @property
    def parent(self) -> str | None:
        """A composition's key without its last variant (``gdpo+lora`` for ``gdpo+lora+jawkl``: what the last one
        adds to); None for a method with at most one variant."""
        names = self.variant_names
        return "+".join((self.base, *names[:-1])) if len(names) > 1 else None

    @property
    def slug(self) -> str:
        """File-name form of ``key``: run folder ``runs/<slug>_seed<S>``, ``eval/<slug>_seed<S>``."""
        return self.key.replace("@", "-").replace("+", "_")

    @property
    def label(self) -> str:
        base = METHOD_LABEL[self.algo]
        base = base if self.sde is None else f"{base} ({self.sde} SDE)"
        return " + ".join((base, *self.variant_names))

    def overrides(self) -> list[str]:
        """The ``train/gdpo.py`` overrides that select the algorithm and the SDE."""
        return [f"algo={self.algo}", *([] if self.sde is None else [f"env.sde={self.sde}"])]

    def variant_overrides(self, variants=None, reward: str | None = None) -> list[str]:
        """The extra ``train/gdpo.py`` overrides of the method's variants from ``variants`` (the config's mapping
        of names to override lists; the run applies them last, each variant's in the order ``key`` names them).
        A variant may not set what the benchmark holds equal across methods or sets per run
        (:data:`VARIANT_FORBIDDEN`, :data:`VARIANT_FORBIDDEN_GROUPS`), and two composed variants may not set the
        same key (a composition adds overrides, it does not replace them): a ValueError names the override.
        One exception: ``reward=`` that keeps the benchmark's ``reward`` (its listening columns) and only adds
        ``<group>@speaking`` / ``<group>@hold`` columns, an anchor ablation
        (``"variants={hold:['reward=expr+rot+jaw@hold']}"``)."""
        over, set_by = [], {}
        for name in self.variant_names:
            if not variants or name not in variants:
                raise ValueError(f"method {self.key}: no variant {name!r} in variants={dict(variants or {})}; "
                                 f"define it as variants.{name}=[<train/gdpo.py override>, ...]")
            for o in (str(o) for o in variants[name]):
                key = override_key(o)
                if not variant_may_set(o, reward):
                    raise ValueError(f"variants.{name}: {o!r} is not an override a variant may set: key=value, none of "
                                     f"{', '.join(VARIANT_FORBIDDEN)} nor under {', '.join(VARIANT_FORBIDDEN_GROUPS)} (what "
                                     f"the benchmark sets per run or holds equal; the SDE: write {self.algo}@<sde>+{name})")
                if set_by.setdefault(key, name) != name:
                    raise ValueError(f"method {self.key}: variants.{set_by[key]} and variants.{name} both set {key}: a "
                                     f"composition adds overrides, it does not replace them (define one variant with the "
                                     f"value meant)")
                over.append(o)
        return over


def override_key(override: str) -> str:
    """The config key a Hydra override sets (``+algo.x=1`` / ``~algo.x`` / ``algo.x=1``: ``algo.x``)."""
    return override.lstrip("+~").split("=", 1)[0]


def variant_may_set(override: str, reward: str | None) -> bool:
    """Whether a variant may apply ``override`` (``key=value``) in a benchmark of ``reward``: nothing the benchmark
    sets per run or holds equal (:data:`VARIANT_FORBIDDEN`, :data:`VARIANT_FORBIDDEN_GROUPS`), except a ``reward=``
    that only adds anchor columns (:func:`adds_anchor_columns`)."""
    key = override_key(override)
    if key == "reward" and override.startswith("reward="):
        return adds_anchor_columns(reward, override.split("=", 1)[1])
    return not ("=" not in override or key == "" or key in VARIANT_FORBIDDEN
                or any(key == g or key.startswith(g + ".") for g in VARIANT_FORBIDDEN_GROUPS))


def adds_anchor_columns(reward: str | None, spec: str) -> bool:
    """True when reward spec ``spec`` is ``reward`` (the same listening columns) plus ``@speaking`` / ``@hold``
    columns; False for anything else, a malformed spec included."""
    from ..rewards.groups import column_group, parse_reward_spec

    if reward is None:
        return False
    try:
        base, cols = parse_reward_spec(str(reward)), parse_reward_spec(spec)
    except ValueError:
        return False
    listening = [c for c in cols if column_group(c)[1] == "listening"]
    return listening == base and len(cols) > len(base)


def parse_method(spec: str) -> BenchMethod:
    """``"gdpo"`` / ``"grpo@marginal"`` / ``"gdpo+nokl"`` / ``"gdpo+lora+jawkl"`` -> :class:`BenchMethod`; anything
    else is a ValueError naming it (whether the variants are defined is checked where the config is:
    :meth:`BenchMethod.variant_overrides`)."""
    head, plus, variant = str(spec).strip().partition("+")
    algo, _, sde = head.partition("@")
    names = variant.split("+") if plus else []
    if (algo not in ALGOS or (sde and sde not in SDES) or (not sde and "@" in head)
            or not all(VARIANT_NAME.fullmatch(n) for n in names) or len(set(names)) != len(names)):
        raise ValueError(f"unknown benchmark method {spec!r}: write an algorithm ({', '.join(ALGOS)}), optionally "
                         f"followed by @ and an SDE ({', '.join(SDES)}) and by + and the names of the config's "
                         f"variants (letters, digits, _ and -; several, each once, compose in order), e.g. "
                         f"gdpo@marginal, gdpo+nokl or gdpo+lora+jawkl")
    return BenchMethod(algo, sde or None, variant or None)


def method_label(key: str) -> str:
    """Report label of a method key (``supervised`` or an ``algos`` entry)."""
    return METHOD_LABEL["supervised"] if key == "supervised" else parse_method(key).label


def training_budget(run_config: dict, arch: dict | None) -> dict:
    """Iterations, SDE rollouts and transitions of one RL run from its resolved config.

    rollouts = iterations x n_prompts x group_size; transitions = rollouts x tokens per episode x
    sde_steps, with tokens per episode = ``env.episode_tokens`` or, when null, the model's window
    (``arch``: the checkpoint's ``window`` / ``r``). Unknown parts count as 0.
    """
    env, optim = dict(run_config.get("env") or {}), dict(run_config.get("optim") or {})
    iterations = int(optim.get("iterations") or 0)
    rollouts = iterations * int(env.get("n_prompts") or 0) * int(env.get("group_size") or 0)
    tokens = env.get("episode_tokens")
    if tokens is None and arch and arch.get("window") and arch.get("r"):
        tokens = int(arch["window"]) // int(arch["r"])
    return {"iterations": iterations, "rollouts": rollouts, "episode_tokens": int(tokens or 0),
            "transitions": rollouts * int(tokens or 0) * int(env.get("sde_steps") or 0)}


def run_stamp(run_dir: Path) -> Path:
    """The benchmark's record of the training run in ``run_dir`` (a file beside it)."""
    return run_dir.with_name(run_dir.name + RUN_STAMP_SUFFIX)


def replaceable_run_dir(run_dir: Path, runs_root: Path) -> bool:
    """True when ``run_dir`` may be deleted to start a run afresh: it is a direct child of
    ``runs_root`` (symbolic links and ``..`` resolved) and is missing, empty, or a run the
    benchmark started (its :func:`run_stamp` exists)."""
    if run_dir.is_symlink() or run_dir.resolve().parent != runs_root.resolve():
        return False
    if not run_dir.exists():
        return True
    return run_dir.is_dir() and (not any(run_dir.iterdir()) or run_stamp(run_dir).is_file()
                                 or (run_dir / LEGACY_RUN_STAMP).is_file())


def reward_curves(run_dir: Path, algo: str, groups: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per group, the logged batch-mean training reward ``logs/<algo>/scalars/reward/<group>/mean.csv``
    (``algo``: the run's algorithm, the name its logger writes under)."""
    return {g: read_curve(Path(run_dir) / "logs" / algo / "scalars" / "reward" / g / "mean.csv") for g in groups}


VARIANT_METRICS = ("all/listening/FDD", "all/listening/PDD", "all/listening/JDD",
                   *(f"all/speaking/FD/{g}" for g in ("exp", "jaw", "pose")))


def compare_methods(method: str, base: str, flat: dict, windows: dict | None, expressive: np.ndarray | None) -> dict:
    """``method`` against ``base`` (both ran with the same seeds and windows): per metric of :data:`VARIANT_METRICS`
    the mean +- std over seeds of each, the relative change and Welch's test over seeds (``flat[method][seed]``),
    and the paired per-window comparison (:func:`.bench_stats.paired_report` with ``base`` as reference; same
    sampling seeds, so the windows are paired). ``{"method", "base", "welch": {metric: ...}, "paired": {subset: {metric: ...}}}``."""
    welch = {}
    for k in VARIANT_METRICS:
        a = [flat[base][s].get(k) for s in flat[base]]
        b = [flat[method][s].get(k) for s in flat[method]]
        ma, mb = mean_std(a), mean_std(b)
        welch[k] = {"base": ma, "variant": mb, "rel_change": relative_change(ma["mean"], mb["mean"]), **welch_test(a, b)}
    paired = (paired_report(windows, [method], expressive, reference=base)[method]
              if windows and method in windows and base in windows else {})
    return {"method": method, "base": base, "welch": welch, "paired": paired}


def variant_report(methods, flat: dict, windows: dict | None, expressive: np.ndarray | None,
                   pairs: Sequence[tuple[str, str]] = ()) -> dict:
    """Every method with a variant (``gdpo+nokl``) against its base (``gdpo``: same algorithm and SDE, no
    variant), when both ran, keyed by the method; then every chosen pair ``(method, base)`` of ``pairs`` (the
    benchmark's ``compare``: e.g. a variant against another variant it adds to), keyed ``"<method> vs <base>"``.
    A composition (``gdpo+lora+jawkl``) is also compared with its :attr:`BenchMethod.parent` (``gdpo+lora``) when
    that ran, keyed like a pair. Each entry is :func:`compare_methods`'s."""
    out = {}
    for m in methods:
        pm = None if m == "supervised" else parse_method(m)
        if pm is not None and pm.variant is not None and pm.base in methods:
            out[m] = compare_methods(m, pm.base, flat, windows, expressive)
        if pm is not None and pm.parent in methods:
            out[f"{m} vs {pm.parent}"] = compare_methods(m, pm.parent, flat, windows, expressive)
    for m, b in pairs:
        out[f"{m} vs {b}"] = compare_methods(m, b, flat, windows, expressive)
    return out


def check_pairs(pairs, methods: Sequence[str]) -> list[tuple[str, str]]:
    """The benchmark's ``compare`` entries as ``(method, base)`` keys; each must name two different methods of
    ``methods`` (``algos`` or ``supervised``), else a ValueError naming the entry, before any training."""
    out = []
    for p in pairs or []:
        p = [str(x) for x in p]
        try:
            keys = [x if x == "supervised" else parse_method(x).key for x in p] if len(p) == 2 else []
        except ValueError:
            keys = []
        if len(keys) != 2 or keys[0] == keys[1] or any(k not in methods for k in keys):
            raise ValueError(f"compare entry {p}: write [method, base], two different methods of algos={list(methods)} "
                             f"(or supervised), e.g. compare=[[gdpo+lorahold,gdpo+lora]]")
        out.append((keys[0], keys[1]))
    return out


def build_report(cfg_weights: list[float], methods, flat, controls, curves, train_info, groups, hdr, clf_info, intents, *,
                 windows: dict | None = None, expressive: np.ndarray | None = None, mechanism: dict | None = None,
                 sde_dynamics: dict | None = None, sde_variants: dict | None = None,
                 reconstruction: dict | None = None, window_labels: list | None = None,
                 intent_floor: dict | None = None, compare: Sequence[tuple[str, str]] = ()) -> dict:
    """The report dict (``report.json``; :func:`.bench_markdown.report_markdown` renders it as ``report.md``).

    Inputs per method and seed: ``flat[method][seed]`` (:func:`.seed_stats.flat_metrics`),
    ``controls[method][seed]`` (:func:`.intent_control.run_controls`), ``curves[method][seed][group]``
    (:func:`reward_curves`), ``windows[method][seed]`` (:func:`.bench_stats.table1_window_values`;
    ``expressive`` (B,) bool: the expressive subset of the same windows), ``mechanism[method][seed]``
    (:func:`.bench_stats.mechanism_curves`), ``sde_dynamics[variant][seed]`` (the supervised model's
    :func:`.generation.quality_report` under each of ``sde_variants``, :func:`.sde_choice.final_sample_dynamics`).
    ``reconstruction``: the ground truth through the VAE, ``{"flat": flat metrics, "quality":
    :func:`.generation.quality_figures` of it}`` and optionally ``"windows"`` (its
    :func:`.bench_stats.table1_window_values`, for its deviations per intent) (a reference row in the
    tables, the VAE-ceiling section, the per-intent tables and the collapse-beyond-the-VAE targets).
    ``window_labels``: the listener's intent per evaluated window (None = unlabelled corpus), for the
    listening deviations per intent;
    ``intent_floor``: their floor for a model that knows the intent (:func:`.intent_control.intent_floor`);
    ``compare``: chosen ``(method, base)`` pairs reported like a variant against its base (:func:`check_pairs`).
    ``hdr["sde"][method]``: the SDE each post-training method's runs recorded. Derived here: mean +-
    std over seeds, findings (Welch), paired per-window comparisons, training-curve trends, mechanism
    summaries, the SDE verdicts and the issue-10 targets.
    """
    agg = {m: aggregate_seeds(flat[m]) for m in methods}
    # training rewards: mean of the first / last min(5, n) logged iterations
    final = {}
    for algo in curves:
        final[algo] = {}
        for g in groups:
            vals = [float(np.mean(c[g][1][-5:])) for c in curves[algo].values() if len(c[g][1])]
            first = [float(np.mean(c[g][1][:5])) for c in curves[algo].values() if len(c[g][1])]
            final[algo][g] = {"first": mean_std(first), "final": mean_std(vals)}
    ctl = {}
    for m in methods:
        runs = controls[m]
        ctl[m] = {"prompt_accuracy": mean_std([r.get("prompt_accuracy") for r in runs.values()]),
                  "own_text_accuracy": mean_std([r.get("own_text_accuracy") for r in runs.values()]),
                  "per_intent": {i: mean_std([r.get("per_intent", {}).get(i) for r in runs.values()]) for i in intents},
                  "cfg_sweep": _sweep_over_seeds([r.get("cfg_sweep", {}) for r in runs.values()], cfg_weights),
                  "confusion": _summed([r.get("confusion") for r in runs.values()])}
        if any("vae_space" in r for r in runs.values()):  # supplementary: the classifier trained on VAE reconstructions
            vs = [r.get("vae_space", {}) for r in runs.values()]
            ctl[m]["vae_space"] = {"prompt_accuracy": mean_std([r.get("prompt_accuracy") for r in vs]),
                                   "own_text_accuracy": mean_std([r.get("own_text_accuracy") for r in vs]),
                                   "per_intent": {i: mean_std([r.get("per_intent", {}).get(i) for r in vs]) for i in intents},
                                   "confusion": _summed([r.get("confusion") for r in vs])}
        variants = next(iter(runs.values()), {}).get("cfg_sweeps") or {}
        ctl[m]["cfg_sweeps"] = {name: _sweep_over_seeds([r.get("cfg_sweeps", {}).get(name, {}) for r in runs.values()], cfg_weights)
                                for name in variants}
    any_run = next(iter(next(iter(controls.values())).values()), {})
    gt_sweep = any_run.get("cfg_sweep_gt", {})
    fnd = findings(agg, flat, methods, groups)
    trends = curve_trends(curves, groups)
    mech = {m: mechanism_summary(by_seed, groups) for m, by_seed in (mechanism or {}).items()}
    paired = paired_report(windows, list(methods), expressive) if windows and "supervised" in windows else {}
    per_intent = (per_label_means({m: windows[m] for m in methods if m in windows}, window_labels, LISTENING_DD)
                  if windows and window_labels is not None else {})
    sde = sde_report(methods, hdr.get("sde") or {}, windows, expressive, sde_dynamics, sde_variants)
    variants = variant_report(methods, flat, windows, expressive, compare)
    algo_of = {m: "supervised" if m == "supervised" else parse_method(m).algo for m in methods}
    recon = None if reconstruction is None else {"metrics": aggregate_seeds({0: reconstruction["flat"]}),
                                                 "quality": dict(reconstruction["quality"])}
    if recon is not None and reconstruction.get("windows") and window_labels is not None:
        recon["per_intent"] = per_label_means({"r": {0: reconstruction["windows"]}}, window_labels, LISTENING_DD)["r"]
    targets = T.check_targets(quality=sde.get("ode_quality") or {}, teacher_forced=sde.get("teacher_forced_quality") or None,
                              findings=fnd, paired=paired, metrics=agg, mechanism=mech,
                              controls=ctl, trends=trends, groups=list(groups), algo_of=algo_of,
                              labels={m: method_label(m) for m in methods}, reconstruction=None if recon is None else recon["quality"],
                              reconstruction_text_accuracy=clf_info.get("vae_reconstruction_accuracy"), intent_floor=intent_floor)
    report = {"setup": hdr, "methods": list(methods), "metrics": agg, "per_seed": flat, "reconstruction": recon,
              "training": {"reward": final, "trend_last_third": trends, "runs": train_info}, "controls": ctl,
              "controls_gt_listening_std": gt_sweep, "intent_classifier": clf_info, "intents": intents, "findings": fnd,
              "paired": paired, "per_intent": per_intent, "intent_floor": intent_floor, "mechanism": mech, "sde_choice": sde,
              "variants": variants,
              "targets": [t.to_json() for t in targets]}
    return report


def _sweep_over_seeds(sweeps: list[dict], cfg_weights) -> dict:
    """``{w: {group: mean_std}}`` of one CFG sweep ``{w: {group: value}}`` per seed."""
    return {w: {g: mean_std([sw.get(w, {}).get(g) for sw in sweeps]) for g in GROUP_NAMES}
            for w in [f"{float(x):g}" for x in cfg_weights]}


def _summed(mats: list) -> list | None:
    """Element-wise sum of the seeds' count matrices (None when no seed has one)."""
    mats = [np.asarray(x) for x in mats if x is not None]
    return np.sum(mats, 0).astype(int).tolist() if mats else None


def sde_report(methods, run_sde: dict, windows, expressive, dynamics: dict | None, variants: dict | None) -> dict:
    """The SDE choice: the supervised model's final-sample dynamics per sampler (mean over seeds), the
    SDE closest to the ODE (:func:`.sde_choice.closest_to_ode`), the evaluation sampler's figures
    (``ode_quality``) and, per algorithm trained with two SDEs, the paired comparison of its runs
    (the method listed first is the reference) and :func:`.sde_choice.model_verdict`."""
    out: dict = {"run_sde": dict(run_sde)}
    if dynamics and variants:
        table = {v: aggregate_seeds(dynamics[v]) for v in variants}
        ode = evaluation_ode(variants)
        tf = next((v for v, x in variants.items() if x.get("history")), None)
        out.update({"variants": dict(variants), "dynamics": table, "closest_to_ode": closest_to_ode(table, variants),
                    "ode_quality": table.get(ode) or {}, "teacher_forced_quality": table.get(tf) or {}})
    models = {}
    for algo in ALGOS:
        same = [m for m in methods if m != "supervised" and parse_method(m).algo == algo and parse_method(m).variant is None]
        if len(same) < 2 or not windows:
            continue
        ref = same[0]
        for other in same[1:]:
            pr = paired_report(windows, [other], expressive, reference=ref)[other]
            a, b = run_sde.get(ref, "?"), run_sde.get(other, "?")
            models[f"{other} vs {ref}"] = {"reference": ref, "method": other, "reference_sde": a, "method_sde": b,
                                           "paired": pr, "verdict": model_verdict(pr["all"], a, b)}
    out["models"] = models
    return out
