"""The benchmark's report logic on hand-made inputs: methods, mechanism figures and dominance, paired
per-window comparison, training-curve trends, the SDE verdicts and the issue-10 target checks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gdpo_listener.evaluation import targets as T
from gdpo_listener.evaluation.bench_stats import (
    common_curve,
    dominance,
    last_third_trend,
    mechanism_curves,
    mechanism_summary,
    moving_average,
    paired_report,
    paired_windows,
    per_label_means,
    read_curve,
    table1_window_values,
)
from gdpo_listener.evaluation.benchmark import method_label, parse_method
from gdpo_listener.evaluation.sde_choice import SDESampling, closest_to_ode, model_verdict, sampler_variants
from gdpo_listener.evaluation.seed_stats import welch_test


def curve(values, start=1):
    v = np.asarray(values, dtype=np.float64)
    return np.arange(start, start + len(v)), v


# ----------------------------------------------------------------------------------------------
# methods


def test_methods_parse_with_their_sde():
    m = parse_method("gdpo@marginal")
    assert (m.algo, m.sde, m.key, m.slug) == ("gdpo", "marginal", "gdpo@marginal", "gdpo-marginal")
    assert m.label == "GDPO (marginal SDE)" and m.overrides() == ["algo=gdpo", "env.sde=marginal"]
    g = parse_method("grpo")
    assert g.sde is None and g.slug == "grpo" and g.overrides() == ["algo=grpo"] and g.label == "GRPO"
    assert method_label("supervised") == "supervised-only" and method_label("grpo@paper") == "GRPO (paper SDE)"
    for bad in ("ppo", "gdpo@", "gdpo@ode", "@marginal", "gdpo+", "gdpo+a b", "gdpo++x", "gdpo@ode+x"):
        with pytest.raises(ValueError, match="unknown benchmark method"):
            parse_method(bad)


def test_a_variant_is_its_base_with_named_overrides():
    v = parse_method("gdpo@marginal+nokl")
    assert (v.algo, v.sde, v.variant, v.key, v.base, v.slug) == ("gdpo", "marginal", "nokl", "gdpo@marginal+nokl", "gdpo@marginal",
                                                                  "gdpo-marginal_nokl")
    assert v.label == "GDPO (marginal SDE) + nokl" and v.overrides() == ["algo=gdpo", "env.sde=marginal"]
    assert v.variant_overrides({"nokl": ["algo.beta=0", "+rewards.weights.vel=4"]}) == ["algo.beta=0", "+rewards.weights.vel=4"]
    assert parse_method("gdpo").variant_overrides(None) == [] and parse_method("grpo+x").base == "grpo"
    with pytest.raises(ValueError, match="no variant 'nokl'"):
        v.variant_overrides({"other": []})
    for bad in ("algo=grpo", "env.sde=paper", "seed=1", "out_dir=x", "reward=all", "optim.iterations=5", "model.d_model=8",
                "data.root=x", "pretrained.sft=x", "features.cache_dir=x", "threads=2", "no_equals"):
        with pytest.raises(ValueError, match="not an override a variant may set"):
            v.variant_overrides({"nokl": [bad]})
    # an anchor ablation: the benchmark's reward plus hold / speaking columns, nothing else
    hold = parse_method("gdpo+hold")
    assert hold.variant_overrides({"hold": ["reward=rot+expr+jaw@hold"]}, "expr+rot") == ["reward=rot+expr+jaw@hold"]
    for bad in ("reward=expr+rot", "reward=expr+jaw@hold", "reward=expr+rot+jaw+jaw@hold", "reward=expr+nose@hold"):
        with pytest.raises(ValueError, match="not an override a variant may set"):
            hold.variant_overrides({"hold": [bad]}, "expr+rot")
    with pytest.raises(ValueError, match="not an override a variant may set"):
        hold.variant_overrides({"hold": ["reward=expr+rot+jaw@hold"]})  # the benchmark's reward unknown


def test_variants_compose_in_order_and_may_not_set_one_key_twice():
    lora, kl = ["algo.listen_lora=16", "optim.lr=3e-3"], ["algo.group_kl={jaw:0.2}"]
    m = parse_method("gdpo@marginal+lora+jawkl")
    assert (m.variant, m.variant_names, m.base, m.parent) == ("lora+jawkl", ("lora", "jawkl"), "gdpo@marginal", "gdpo@marginal+lora")
    assert (m.key, m.slug, m.label) == ("gdpo@marginal+lora+jawkl", "gdpo-marginal_lora_jawkl", "GDPO (marginal SDE) + lora + jawkl")
    assert m.variant_overrides({"lora": lora, "jawkl": kl}) == lora + kl
    assert parse_method("gdpo+jawkl+lora").variant_overrides({"lora": lora, "jawkl": kl}) == kl + lora  # in the order named
    assert parse_method("gdpo+lora").parent is None and parse_method("gdpo").parent is None
    with pytest.raises(ValueError, match="no variant 'jawkl'"):
        m.variant_overrides({"lora": lora})
    with pytest.raises(ValueError, match="variants.lora and variants.jawkl both set optim.lr"):
        m.variant_overrides({"lora": lora, "jawkl": [*kl, "optim.lr=1e-3"]})
    with pytest.raises(ValueError, match="variants.jawkl: 'seed=1' is not an override a variant may set"):
        m.variant_overrides({"lora": lora, "jawkl": ["seed=1"]})
    assert parse_method("gdpo+a").variant_overrides({"a": ["optim.lr=1", "optim.lr=2"]}) == ["optim.lr=1", "optim.lr=2"]  # as before
    for bad in ("gdpo+a+a", "gdpo+a+", "gdpo+a++b", "gdpo+a+b c"):
        with pytest.raises(ValueError, match="unknown benchmark method"):
            parse_method(bad)


def test_variant_report_compares_each_variant_with_its_base_over_seeds_and_windows():
    from gdpo_listener.evaluation.bench_markdown import variants_markdown
    from gdpo_listener.evaluation.benchmark import variant_report

    rng = np.random.default_rng(0)
    base_w = rng.uniform(1.0, 2.0, size=40)
    ok = np.ones(40, dtype=bool)
    windows = {"gdpo": {s: {"listening/JDD": (base_w + 0.01 * s, ok)} for s in range(3)},
               "gdpo+nokl": {s: {"listening/JDD": (0.8 * base_w + 0.01 * s, ok)} for s in range(3)}}
    flat = {m: {s: {"all/listening/JDD": float(w[s]["listening/JDD"][0].mean())} for s in range(3)}
            for m, w in windows.items()}
    rep = variant_report(["supervised", "gdpo", "gdpo+nokl", "grpo+x"], flat, windows, None)
    assert set(rep) == {"gdpo+nokl"}  # grpo+x has no base in the run: not compared
    d = rep["gdpo+nokl"]
    w = d["welch"]["all/listening/JDD"]
    assert d["base"] == "gdpo" and w["rel_change"] == pytest.approx(-0.2, abs=0.01) and w["t"] < 0 and w["p"] < 0.05
    p = d["paired"]["all"]["listening/JDD"]
    assert p["ci_high"] < 0 and p["frac_improved"] == 1.0 and p["n_windows"] == 40
    assert w["base"]["n"] == 3 and d["welch"]["all/listening/FDD"]["t"] is None  # a metric the runs lack: n/a, not 0
    md = "\n".join(variants_markdown(rep))
    assert "## Variants vs their base" in md and "GDPO + nokl vs GDPO" in md and "| listening/JDD |" in md
    assert variants_markdown({}) == []

    # a chosen pair: the base the other way round, under its own key beside the variant's default comparison
    both = variant_report(["supervised", "gdpo", "gdpo+nokl"], flat, windows, None, pairs=[("gdpo", "gdpo+nokl")])
    assert set(both) == {"gdpo+nokl", "gdpo vs gdpo+nokl"} and both["gdpo+nokl"] == rep["gdpo+nokl"]
    r = both["gdpo vs gdpo+nokl"]
    w = r["welch"]["all/listening/JDD"]
    assert (r["method"], r["base"]) == ("gdpo", "gdpo+nokl") and w["rel_change"] == pytest.approx(0.25, abs=0.01) and w["t"] > 0
    p = r["paired"]["all"]["listening/JDD"]
    assert p["ci_low"] > 0 and p["frac_improved"] == 0.0
    assert "GDPO vs GDPO + nokl" in "\n".join(variants_markdown(both))

    # a composition: against its base and against what its last variant adds to, when that ran
    windows["gdpo+nokl+x"] = {s: {"listening/JDD": (0.6 * base_w + 0.01 * s, ok)} for s in range(3)}
    flat["gdpo+nokl+x"] = {s: {"all/listening/JDD": float(windows["gdpo+nokl+x"][s]["listening/JDD"][0].mean())} for s in range(3)}
    comp = variant_report(["gdpo", "gdpo+nokl", "gdpo+nokl+x"], flat, windows, None)
    assert set(comp) == {"gdpo+nokl", "gdpo+nokl+x", "gdpo+nokl+x vs gdpo+nokl"}
    assert comp["gdpo+nokl+x"]["base"] == "gdpo" and comp["gdpo+nokl+x vs gdpo+nokl"]["base"] == "gdpo+nokl"
    assert comp["gdpo+nokl+x vs gdpo+nokl"]["welch"]["all/listening/JDD"]["rel_change"] == pytest.approx(-0.25, abs=0.01)
    assert set(variant_report(["gdpo", "gdpo+nokl+x"], flat, windows, None)) == {"gdpo+nokl+x"}  # its parent did not run


def test_compare_pairs_name_two_methods_of_the_run():
    from gdpo_listener.evaluation.benchmark import check_pairs

    methods = ["supervised", "gdpo", "gdpo+a", "gdpo+ab"]
    assert check_pairs([["gdpo+ab", "gdpo+a"], ("gdpo", "supervised")], methods) == [("gdpo+ab", "gdpo+a"), ("gdpo", "supervised")]
    assert check_pairs(None, methods) == [] and check_pairs([], methods) == []
    for bad in (["gdpo+ab"], ["gdpo", "gdpo"], ["gdpo", "grpo"], ["gdpo+ab", "gdpo+a", "gdpo"], ["gdpo", "ppo"]):
        with pytest.raises(ValueError, match="compare entry"):
            check_pairs([bad], methods)


def test_the_report_names_the_hosts_of_its_runs():
    from gdpo_listener.evaluation.bench_markdown import _host_note

    one = {"hosts": {"CPU A (AVX512), torch 2.13.0": ["gdpo seed 0", "grpo seed 0"]}, "eval_host": "CPU A (AVX512), torch 2.13.0"}
    assert _host_note(one) == " Runs trained on CPU A (AVX512), torch 2.13.0. Evaluated on CPU A (AVX512), torch 2.13.0."
    two = {"hosts": {"CPU A (AVX512), torch 2.13.0": ["gdpo seed 0"], "unrecorded": ["grpo seed 0"]}, "eval_host": "CPU A"}
    note = _host_note(two)
    assert "**Runs trained on several hosts**" in note and "unrecorded: grpo seed 0" in note
    assert "compare methods trained on one host" in note
    assert _host_note({}) == ""  # a report written before hosts were recorded
    assert _host_note({"hosts": {"unrecorded": ["gdpo seed 0"]}, "eval_host": "CPU A"}).startswith(" The runs' host is not recorded")


# ----------------------------------------------------------------------------------------------
# mechanism figures


def test_dominance_is_max_over_median():
    assert dominance({"a": 0.5, "b": 0.5, "c": 0.5}) == pytest.approx(1.0)  # even
    assert dominance({"a": 0.9, "b": 0.1, "c": 0.2}) == pytest.approx(0.9 / 0.2)  # follows a
    assert dominance({"a": 0.9, "b": 0.3}) == pytest.approx(0.9 / 0.6)  # median of two = their mean
    assert dominance({"a": 0.9, "b": -0.1, "c": 0.0}) == math.inf  # median <= 0 < max
    assert dominance({"a": 0.9}) is None and dominance({"a": -0.1, "b": -0.2}) is None
    assert dominance({"a": 0.6, "b": None, "c": 0.3, "d": float("nan")}) == pytest.approx(0.6 / 0.45)


def test_mechanism_summary_averages_iterations_then_seeds(tmp_path):
    # two seeds of a run that follows 'expr': corr expr ~0.9, rot ~0.1; 2 and 4 distinct values per group
    runs = {0: {"distinct": curve([2, 2, 2]), "corr": {"expr": curve([0.8, 0.9, 1.0]), "rot": curve([0.1, 0.1, 0.1])}},
            1: {"distinct": curve([4, 4]), "corr": {"expr": curve([0.8, 0.8]), "rot": curve([0.3, 0.1])}}}
    s = mechanism_summary(runs, ["expr", "rot"])
    assert s["distinct"]["mean"] == pytest.approx(3.0) and s["distinct"]["n"] == 2
    assert s["corr"]["expr"]["mean"] == pytest.approx((0.9 + 0.8) / 2)
    assert s["corr"]["rot"]["mean"] == pytest.approx((0.1 + 0.2) / 2)
    assert s["top_group"] == "expr" and s["dominance"] == pytest.approx(0.85 / ((0.85 + 0.15) / 2))

    # the same figures read from CSV logs as train/gdpo.py writes them (later duplicate steps win)
    adv = tmp_path / "logs" / "gdpo" / "scalars" / "adv"
    (adv / "corr_zscore").mkdir(parents=True)
    (adv / "distinct_per_group.csv").write_text("1,2.0\n2,3.0\n2,4.0\n")
    (adv / "corr_zscore" / "expr.csv").write_text("1,0.5\n2,0.7\n")
    c = mechanism_curves(tmp_path, "gdpo", ["expr", "rot"])
    assert c["distinct"][0].tolist() == [1, 2] and c["distinct"][1].tolist() == [2.0, 4.0]
    assert c["corr"]["expr"][1].tolist() == [0.5, 0.7] and len(c["corr"]["rot"][0]) == 0  # missing file: empty
    assert read_curve(tmp_path / "nope.csv")[0].shape == (0,)


def test_curves_align_smooth_and_flatten():
    st, vals = common_curve([curve([1, 2, 3, 4]), curve([5, 6, 7], start=2)])
    assert st.tolist() == [2, 3, 4] and vals.tolist() == [[2, 3, 4], [5, 6, 7]]
    assert common_curve([curve([])]) is None
    assert moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]

    x = np.arange(1, 61)
    rising = last_third_trend(x, 0.01 * x)  # still rising at a constant rate
    assert rising["slope"] == pytest.approx(0.01) and rising["share"] == pytest.approx(0.01 * 19 / (0.01 * 54), rel=1e-6)
    assert rising["share"] > T.STILL_RISING_SHARE
    flat = last_third_trend(x, 1 - np.exp(-x / 5.0))  # saturated long before the last third
    assert abs(flat["slope"]) < 1e-3 and flat["share"] < 0.01
    assert last_third_trend(x[:2], x[:2])["slope"] is None
    assert T.still_rising({"expr": rising, "rot": flat}, ["expr", "rot"]) == ["expr"]
    # a curve falling all along has a positive share too: it is not "rising"
    falling = last_third_trend(x, -0.01 * x)
    assert falling["share"] > T.STILL_RISING_SHARE and T.still_rising({"rot": falling}, ["rot"]) == []
    # a noisy, nearly flat curve: positive slope and a large share of a tiny gain, but the slope is noise
    noisy = last_third_trend(x, (-1.0) ** x + 1e-3 * x)
    assert noisy["slope"] > 0 and noisy["share"] > T.STILL_RISING_SHARE
    assert noisy["slope"] < T.RISING_SLOPE_SE * noisy["slope_se"] and T.still_rising({"eyelid": noisy}, ["eyelid"]) == []
    assert rising["slope_se"] == pytest.approx(0.0, abs=1e-9)  # an exact line: no noise


# ----------------------------------------------------------------------------------------------
# paired per-window comparison


def test_paired_windows_averages_seeds_per_window_and_keeps_the_pairing():
    # window values vary 100x more between windows than the method's consistent gain of 1 per window:
    # the paired interval excludes 0 (an unpaired comparison of the window means would not)
    base = np.array([100.0, 300.0, 50.0, 800.0, 20.0, 500.0])
    ok = np.ones(6, dtype=bool)
    sup = {0: (base, ok), 1: (base + 2.0, ok)}
    meth = {0: (base - 1.0, ok), 1: (base + 2.0 - 1.5, ok)}
    p = paired_windows(sup, meth, seed=0)
    assert p["n_windows"] == 6 and p["n_seeds"] == 2
    assert p["mean_diff"] == pytest.approx(-1.25) and p["ci_low"] == pytest.approx(-1.25) and p["ci_high"] == pytest.approx(-1.25)
    assert p["frac_improved"] == 1.0 and p["rel_change"] == pytest.approx(-1.25 / (base.mean() + 1.0))
    assert p["reference"] == pytest.approx(base.mean() + 1.0)

    # mixed signs: the interval covers 0; a window that does not count in one seed is left out everywhere
    ok1 = ok.copy()
    ok1[5] = False
    meth2 = {0: (base + np.array([-3, 2, -1, 4, -2, 100.0]), ok), 1: (base + 2.0 + np.array([-3, 2, -1, 4, -2, 0.0]), ok1)}
    q = paired_windows(sup, meth2, seed=0)
    assert q["n_windows"] == 5 and q["mean_diff"] == pytest.approx(0.0)
    assert q["ci_low"] < 0 < q["ci_high"] and q["frac_improved"] == pytest.approx(3 / 5)
    # subset and seeds in common only; nothing counts -> None
    r = paired_windows(sup, {0: meth2[0]}, subset=np.array([1, 1, 0, 0, 0, 0], bool))
    assert r["n_seeds"] == 1 and r["n_windows"] == 2 and r["mean_diff"] == pytest.approx(-0.5)
    assert paired_windows(sup, meth, subset=np.zeros(6, bool)) is None and paired_windows(sup, {5: meth[0]}) is None


def test_per_label_means_average_seeds_then_windows_and_give_each_label_its_share():
    ok = np.array([True, True, True, False])
    w = {"supervised": {0: {"listening/JDD": (np.array([1.0, 2.0, 6.0, 99.0]), ok)},
                        1: {"listening/JDD": (np.array([3.0, 2.0, 2.0, 99.0]), ok)}}}
    r = per_label_means(w, ["amused", "sad", "amused", "sad"], ("listening/JDD",))["supervised"]["listening/JDD"]
    # seed means per window 2, 2, 4 (the uncounted 4th window is left out); amused = windows 0 and 2
    assert r["amused"] == {"mean": 3.0, "n": 2, "share": pytest.approx(6 / 8)}
    assert r["sad"] == {"mean": 2.0, "n": 1, "share": pytest.approx(2 / 8)}
    assert per_label_means(w, [None, None, None, None], ("listening/JDD",))["supervised"]["listening/JDD"] == {}
    with pytest.raises(ValueError, match="3 labels for 4 windows"):
        per_label_means(w, ["a", "b", "c"], ("listening/JDD",))


def test_paired_report_every_method_both_subsets():
    ok = np.ones(4, dtype=bool)
    w = lambda v: {"listening/FDD": (np.asarray(v, dtype=np.float64), ok)}  # noqa: E731
    windows = {"supervised": {0: w([4, 4, 4, 4])}, "gdpo": {0: w([2, 3, 4, 5])}}
    rep = paired_report(windows, ["supervised", "gdpo"], np.array([1, 1, 0, 0], bool))
    assert set(rep) == {"gdpo"}
    assert rep["gdpo"]["all"]["listening/FDD"]["mean_diff"] == pytest.approx(-0.5)
    assert rep["gdpo"]["expressive"]["listening/FDD"]["mean_diff"] == pytest.approx(-1.5)
    assert rep["gdpo"]["expressive"]["listening/FDD"]["n_windows"] == 2


def test_table1_window_values_use_table1_bases_and_units():
    B = 3
    param = {(sp, n): (torch.tensor([0.001, 0.002, 0.003]), torch.tensor([True, False, True]))
             for sp, names in (("speaking", ("FDD", "PDD", "JDD")), ("listening", ("FDD", "PDD", "JDD"))) for n in names}
    v = table1_window_values({"param": param, "vertex": {}}, {"convention": "velocity"})
    assert set(v) == {f"{sp}/{n}" for sp, n in param}  # no FLAME: no LVE / MHD
    vals, ok = v["listening/PDD"]
    assert vals.tolist() == pytest.approx([1.0, 2.0, 3.0]) and ok.tolist() == [True, False, True]  # x1000 as Table 1
    vx = {"lve_sum": torch.tensor([10.0, 0.0, 6.0], dtype=torch.float64), "mhd_sum": torch.tensor([4.0, 0.0, 3.0]),
          "frames": torch.tensor([5, 0, 3]),
          **{f"fdd_{sp}": torch.full((B,), 0.5, dtype=torch.float64) for sp in ("speaking", "listening")},
          **{f"fdd_{sp}_ok": torch.ones(B, dtype=torch.bool) for sp in ("speaking", "listening")}}
    v = table1_window_values({"param": param, "vertex": vx}, {"convention": "velocity"})
    assert v["speaking/LVE"][0].tolist() == pytest.approx([2.0, 0.0, 2.0]) and v["speaking/LVE"][1].tolist() == [True, False, True]
    assert v["speaking/MHD"][0].tolist() == pytest.approx([0.8, 0.0, 1.0])
    assert v["listening/FDD"][0].tolist() == pytest.approx([500.0] * 3)  # vertex FDD replaces the parameter one
    assert v["listening/JDD"][0].tolist() == pytest.approx([1.0, 2.0, 3.0])


def test_welch_test_matches_scipy():
    from scipy.stats import ttest_ind

    a, b = [1.0, 2.0, 3.5], [4.0, 6.0, 5.5, 7.0]
    w = welch_test(a, b)
    ref = ttest_ind(b, a, equal_var=False)
    assert w["t"] == pytest.approx(ref.statistic) and w["p"] == pytest.approx(ref.pvalue)
    assert welch_test([1.0], [2.0, 3.0]) == {"t": None, "df": None, "p": None}


# ----------------------------------------------------------------------------------------------
# SDE choice


def test_sde_sampling_passes_sigma_and_sde():
    class Fake:
        def sample(self, *a, **kw):
            return a, kw

    a, kw = SDESampling(Fake(), 0.5, "marginal").sample("cond", 3, steps=4)
    assert a == ("cond", 3) and kw == {"steps": 4, "sigma": 0.5, "sde": "marginal", "sde_window": None}
    assert SDESampling(Fake(), 0.5, "paper", [0, 2]).sample("cond", 3)[1]["sde_window"] == (0, 2)
    with pytest.raises(ValueError, match="sigma"):
        SDESampling(Fake(), 0.0, "paper")


def test_closest_to_ode_and_model_verdict():
    v = sampler_variants(10, 4, 0.5, ["paper", "marginal"], teacher_forced=True)
    assert list(v) == ["ODE 10 steps", "SDE paper 4 steps sigma 0.5", "SDE marginal 4 steps sigma 0.5", "ODE 10 steps, teacher-forced"]
    assert list(sampler_variants(10, 4, 0.5, ["paper"])) == ["ODE 10 steps", "SDE paper 4 steps sigma 0.5"]
    mixed = sampler_variants(10, 4, 0.5, ["paper"], windows=[[0, 2]])
    assert mixed["SDE paper 4 steps sigma 0.5, SDE on steps 0-1"] == {"steps": 4, "sigma": 0.5, "sde": "paper", "sde_window": [0, 2]}
    with pytest.raises(ValueError, match="sde_window"):
        sampler_variants(10, 4, 0.5, ["paper"], windows=[[0, 5]])
    r = lambda e, j: {"listening/expr/vel_std_ratio": {"mean": e}, "listening/jaw/vel_std_ratio": {"mean": j}}  # noqa: E731
    table = {"ODE 10 steps": r(0.6, 0.5), "SDE paper 4 steps sigma 0.5": r(0.9, 0.75), "SDE marginal 4 steps sigma 0.5": r(0.55, 0.5),
             "ODE 10 steps, teacher-forced": r(0.6, 0.5)}  # identical to the ODE: it would win if it were ranked
    c = closest_to_ode(table, v, groups=("expr", "jaw"))
    assert c["best"] == "SDE marginal 4 steps sigma 0.5" and "ODE 10 steps, teacher-forced" not in c["distance"]
    assert c["distance"]["SDE paper 4 steps sigma 0.5"] == pytest.approx(math.log(1.5))

    p = lambda lo, hi: {"ci_low": lo, "ci_high": hi}  # noqa: E731
    d = model_verdict({"listening/FDD": p(-2, -1), "listening/PDD": p(-1, 1), "listening/JDD": p(-0.5, -0.1)}, "paper", "marginal")
    assert d["better"] == "marginal" and d["per_metric"] == {"FDD": "marginal", "PDD": None, "JDD": "marginal"}
    d = model_verdict({"listening/FDD": p(1, 2), "listening/PDD": p(-2, -1)}, "paper", "marginal")
    assert d["better"] is None and d["wins"] == {"reference": 1, "method": 1}
    assert model_verdict({"listening/FDD": p(-2, -1)}, "paper", "paper")["better"] is None


# ----------------------------------------------------------------------------------------------
# targets


def finding(rel, t, p):
    return {"rel_change": rel, "welch_t": t, "welch_p": p}


def paired_ci(lo, hi):
    return {"mean_diff": (lo + hi) / 2, "ci_low": lo, "ci_high": hi, "frac_improved": 0.7, "n_windows": 40}


def test_listening_gain_targets():
    f = {"all/listening/FDD": finding(-0.40, -4.0, 0.01), "all/listening/PDD": finding(-0.10, -5.0, 0.001),
         "all/listening/JDD": finding(-0.30, -1.0, 0.4)}
    pr = {"all": {"listening/FDD": paired_ci(-3, -1), "listening/PDD": paired_ci(-3, -1), "listening/JDD": paired_ci(-3, 1)}}
    trends = {"expr": {"slope": 1.0, "share": 0.5}}
    rows = {r.name.split()[-1]: r for r in T.listening_gains("GDPO", f, pr, trends, ["expr"])}
    assert rows["FDD"].status == T.PASS and "-40.0%" in rows["FDD"].measured
    assert rows["PDD"].status == T.FAIL and "short of -12%" in rows["PDD"].note and "still rising" in rows["PDD"].note
    assert rows["JDD"].status == T.FAIL and "not significant over seeds; not significant over windows" in rows["JDD"].note
    # a significant change in the wrong direction fails and says so
    worse = {"all": {"listening/FDD": paired_ci(1, 3)}}
    bad = T.listening_gains("GDPO", {"all/listening/FDD": finding(-0.5, +4.0, 0.01)}, worse)[0]
    assert bad.status == T.FAIL and bad.note == "significantly worse over seeds; significantly worse over windows"
    # one seed: no Welch test -> not decided; no figures at all -> not measured
    one = T.listening_gains("GDPO", {"all/listening/FDD": finding(-0.5, None, None)}, pr)[0]
    assert one.status == T.NA and "needs >= 2 seeds" in one.note
    assert T.listening_gains("GDPO", {}, None)[0].status == T.NA


def test_a_missed_listening_target_says_whether_amplitude_or_timing_misses_it():
    def parts(dev, best, amp, blind):
        return {f"all/listening/parts/JDD/{k}": {"mean": v} for k, v in
                (("deviation", dev), ("at_best_amplitude", best), ("amplitude", amp), ("window_blind", blind))}
    f = {"all/listening/JDD": finding(-0.05, -3.0, 0.01)}
    pr = {"all": {"listening/JDD": paired_ci(-3, -1)}}
    sup = parts(1.0, 0.8, 1.3, 0.6)
    amp = T.listening_gains("GDPO", f, pr, supervised=sup, method=parts(0.95, 0.70, 1.2, 0.6))[2]
    assert amp.status == T.FAIL and "(median x1.20) it would reach -30.0%: the amplitude is what is missing" in amp.note
    assert "window-blind model with the right amplitude per channel -40.0%" in amp.note
    timing = T.listening_gains("GDPO", f, pr, supervised=sup, method=parts(0.95, 0.90, 1.0, 0.6))[2]
    assert "-10.0%: its timing (which windows move) misses the target" in timing.note
    assert "knows each window's intent" not in timing.note  # no floor given
    floor = {"JDD": {"intent_aware": 0.48, "window_blind": 0.6, "n": 10, "per_intent": {}}}
    knows = T.listening_gains("GDPO", f, pr, supervised=sup, method=parts(0.95, 0.90, 1.0, 0.6), intent_floor=floor)[2]
    assert "one that knows each window's intent, at that intent's typical amplitude, -52.0%" in knows.note
    assert "knows only the intent its text names" not in knows.note  # an older floor without the text-aware figure
    floor["JDD"]["text_aware"] = 0.55
    text = T.listening_gains("GDPO", f, pr, supervised=sup, method=parts(0.95, 0.90, 1.0, 0.6), intent_floor=floor)[2]
    assert "-52.0%; one that knows only the intent its text names -45.0% (parameter channels)" in text.note
    floor["JDD"]["sampler"] = {"intent_aware": 0.7, "text_aware": 0.85, "window_blind": 1.2, "per_intent": {}}
    samp = T.listening_gains("GDPO", f, pr, supervised=sup, method=parts(0.95, 0.90, 1.0, 0.6), intent_floor=floor)[2]
    assert ("-45.0%; a faithful sampler of that intent's amplitudes (a random window's, not the typical one) -15.0% "
            "(parameter channels)") in samp.note
    # no parts (an older report): no such note; a met target: no note at all
    assert "amplitude" not in T.listening_gains("GDPO", f, pr, supervised=sup, method={})[2].note
    met = {"all/listening/JDD": finding(-0.30, -3.0, 0.01)}
    assert T.listening_gains("GDPO", met, pr, supervised=sup, method=parts(0.7, 0.6, 1.1, 0.6))[2].note == ""


def test_collapse_cost_reward_dominance_control_targets():
    q = {"listening/expr/vel_std_ratio": {"mean": 0.7}, "listening/jaw/vel_std_ratio": {"mean": 0.8},
         "listening/rot/vel_std_ratio": {"mean": 1.14}, "speaking/jaw_corr": {"mean": 0.85}}
    st = [r.status for r in T.supervised_collapse(q)]
    assert st == [T.PASS, T.PASS, T.FAIL, T.PASS]
    assert T.supervised_collapse({})[0].status == T.NA

    # with the VAE reconstruction: the collapse beyond the VAE (supervised / reconstruction) is checked per group
    recon = {"listening/expr/vel_std_ratio": 0.75, "listening/jaw/vel_std_ratio": 1.0, "listening/rot/vel_std_ratio": None}
    rows = T.supervised_collapse(q, recon)
    assert [r.status for r in rows[:4]] == [T.PASS, T.PASS, T.FAIL, T.PASS]  # the original targets are unchanged
    assert "VAE reconstruction 0.750" in rows[0].note and "VAE" not in rows[2].note  # rot: no reconstruction figure
    beyond = {r.name.rsplit(", ", 1)[1]: r for r in rows[4:]}
    assert list(beyond) == ["expr", "jaw", "rot"]
    assert beyond["expr"].status == T.FAIL and beyond["expr"].measured.startswith("0.933")  # 0.7 / 0.75: the VAE's collapse
    assert "comes from the VAE" in beyond["expr"].note
    assert beyond["jaw"].status == T.PASS and beyond["rot"].status == T.NA
    # the teacher-forced figures (each token given the ground-truth history) are named, and decide nothing
    tf = {"listening/expr/vel_std_ratio": {"mean": 1.4}, "listening/jaw/vel_std_ratio": {"mean": 0.7}}
    rows_tf = T.supervised_collapse(q, recon, tf)
    assert [r.status for r in rows_tf] == [r.status for r in rows]
    assert "ground-truth history 1.400" in rows_tf[0].note and "history" not in rows_tf[2].note  # rot: no teacher-forced figure
    expr_tf = rows_tf[4]
    assert "the rollout keeps 50%" in expr_tf.note and "comes from the VAE" not in expr_tf.note  # 0.7 / 1.4
    assert "comes from the VAE" in T.supervised_collapse(q, recon, {"listening/expr/vel_std_ratio": {"mean": 0.72}})[4].note

    ms = lambda x: {"mean": x}  # noqa: E731
    sup = {f"all/speaking/{n}/{g}": ms(1.0) for n in ("FD", "MSE") for g in ("exp", "jaw", "pose")}
    meth = {**sup, "all/speaking/FD/exp": ms(1.05), "all/speaking/FD/pose": ms(0.9), "all/speaking/MSE/jaw": ms(1.15)}
    fd, mse = T.speaking_cost("GDPO", sup, meth)
    assert fd.status == T.PASS and "exp +5.0%" in fd.measured
    assert mse.status == T.FAIL and "jaw" in mse.note

    sup_r = {"all/listening/group/expr/reward": ms(-0.5), "all/listening/group/rot/reward": ms(-0.2)}
    assert T.reward_gains("GDPO", sup_r, {"all/listening/group/expr/reward": ms(-0.4), "all/listening/group/rot/reward": ms(-0.1)},
                          ["expr", "rot"]).status == T.PASS
    r = T.reward_gains("GDPO", sup_r, {"all/listening/group/expr/reward": ms(-0.4), "all/listening/group/rot/reward": ms(-0.2)},
                       ["expr", "rot"])
    assert r.status == T.FAIL and r.note == "not improved: rot"

    mech = {"grpo": {"dominance": 3.0, "top_group": "expr"}, "gdpo": {"dominance": 1.1}, "gdpo@marginal": {"dominance": 1.2}}
    assert T.grpo_dominance(mech, "grpo", ["gdpo", "gdpo@marginal"]).status == T.PASS
    assert T.grpo_dominance({**mech, "grpo": {"dominance": 1.3}}, "grpo", ["gdpo"]).status == T.FAIL  # below 1.5
    assert T.grpo_dominance({**mech, "gdpo": {"dominance": 3.5}}, "grpo", ["gdpo"]).status == T.FAIL  # GDPO more dominated
    assert T.grpo_dominance({"grpo": {"dominance": None}}, "grpo", []).status == T.NA

    assert T.text_control("GDPO", ms(0.93)).status == T.PASS and T.text_control("GDPO", ms(0.5)).status == T.FAIL
    assert T.text_control("GDPO", ms(None)).status == T.NA
    assert "VAE reconstruction of the ground truth itself 0.80" in T.text_control("GDPO", ms(0.86), 0.80).note
    assert T.text_control("GDPO", ms(0.86), 0.95).note == ""  # the VAE keeps the intent: the miss is the policy's
    t = T.text_control("GDPO", ms(0.72), 0.77, ms(0.95))  # the VAE-space figure is named in a miss, never decides it
    assert t.status == T.FAIL and t.measured == "0.72" and "reconstructions scores the same motion 0.95" in t.note
    assert T.text_control("GDPO", ms(0.93), 0.77, ms(0.5)).note == ""  # a pass needs no explanation

    sweep = {w: {"expr": ms(0.1 * k), "rot": ms(0.01 * k)} for k, w in enumerate(["1", "2", "3", "4"], 1)}
    assert T.cfg_monotone("GDPO", sweep).status == T.PASS
    flat = {**sweep, "3": {"expr": ms(0.3), "rot": ms(0.02)}}  # rot: 0.02 -> 0.02 is not rising
    c = T.cfg_monotone("GDPO", flat)
    assert c.status == T.FAIL and c.note == "not monotone: rot"
    assert T.cfg_monotone("GDPO", {"1": sweep["1"], "2": sweep["2"]}).status == T.NA  # w = 4 not swept
    assert T.cfg_monotone("GDPO", sweep, "motion").name == "GDPO (unconditional branch nulls motion) listening std rises with w_listen"


def test_check_targets_covers_every_gdpo_method_and_reports_misses():
    ms = lambda x: {"mean": x}  # noqa: E731
    sw = {"1": {"expr": ms(0.1)}, "4": {"expr": ms(0.2)}}
    ctl = {m: {"prompt_accuracy": ms(0.95), "cfg_sweep": sw, "cfg_sweeps": {"text+audio+motion": sw, "motion": sw}}
           for m in ("supervised", "grpo", "gdpo", "gdpo@marginal")}
    rows = T.check_targets(quality={}, findings={}, paired={}, metrics={}, mechanism={}, controls=ctl, trends={},
                           groups=["expr"], algo_of={"supervised": "supervised", "grpo": "grpo", "gdpo": "gdpo", "gdpo@marginal": "gdpo"},
                           labels={"supervised": "supervised-only", "grpo": "GRPO", "gdpo": "GDPO", "gdpo@marginal": "GDPO (marginal SDE)"})
    names = [r.name for r in rows]
    assert sum(n.startswith("GDPO vs supervised, listening") for n in names) == 3
    assert sum(n.startswith("GDPO (marginal SDE) vs supervised, listening") for n in names) == 3
    assert sum("text-control" in n for n in names) == 4 and sum("w_listen" in n for n in names) == 8  # two sweeps
    assert sum("(unconditional branch nulls motion)" in n for n in names) == 4
    md = T.targets_markdown(rows)
    assert "not measured in this run" in md and "Missed targets" not in md  # nothing measured failed
    md = T.targets_markdown(rows + [T.Target("x", T.FAIL, "1", "<= 0", "why")])
    assert "Missed targets" in md and "- **x**: measured 1, needed <= 0 -- why." in md


def test_report_names_the_extended_runs_and_skips_speaking_columns_in_reward_gains():
    from gdpo_listener.evaluation.bench_markdown import _extended_note

    note = _extended_note({"extended_from": {"gdpo": {"0": 600, "2": 300}, "grpo": {}}}, ["grpo", "gdpo"])
    assert "GDPO seed 0 from 600" in note and "GDPO seed 2 from 300" in note and "GRPO" not in note
    assert _extended_note({"extended_from": {"gdpo": {}}}, ["gdpo"]) == "" and _extended_note({}, ["gdpo"]) == ""
    # a <group>@speaking column has no listening evaluation reward: judged by the speaking targets, not as "n/a"
    sup = {"all/listening/group/expr/reward": {"mean": -0.2}}
    gd = {"all/listening/group/expr/reward": {"mean": -0.1}}
    out = T.check_targets(quality={}, findings={}, paired={}, metrics={"supervised": sup, "gdpo": gd}, mechanism={},
                          controls={}, trends={}, groups=["expr", "jaw@speaking"], algo_of={"supervised": "supervised", "gdpo": "gdpo"},
                          labels={"supervised": "supervised-only", "gdpo": "GDPO"})
    gain = next(t for t in out if t.name == "GDPO improves the evaluation reward of every rewarded group")
    assert gain.status == "PASS" and "jaw@speaking" not in gain.measured


def test_mechanism_figures_of_a_matched_run_use_each_column_s_own_advantage():
    """objective_tokens=matched: a <group>@speaking column is correlated with the speaking tokens'
    advantage (one column: its own z-score, correlation 1) and left out of the dominance."""
    from omegaconf import OmegaConf
    from tensordict import TensorDict

    from gdpo_listener.agents.advantages import gdpo_advantages
    from gdpo_listener.pipeline.rl import advantage_log_stats

    g = torch.Generator().manual_seed(0)
    reward = torch.randn(16, 3, generator=g)  # columns expr, rot, jaw@speaking
    gid = torch.arange(4).repeat_interleave(4)
    lam = torch.ones(2)
    traj = TensorDict({"reward": reward, "group_id": gid, "advantage": gdpo_advantages(reward[:, :2], gid, lam),
                       "advantage_speaking": gdpo_advantages(reward[:, 2:], gid, lam[:1])}, batch_size=[16])
    algo = OmegaConf.create({"eps": 1e-4, "eps_mode": "relative"})
    out = advantage_log_stats(traj, ("expr", "rot", "jaw@speaking"), algo)
    assert out["adv/corr_zscore/jaw@speaking"].item() == pytest.approx(1.0, abs=1e-4)
    plain = advantage_log_stats(traj.exclude("advantage_speaking"), ("expr", "rot", "jaw@speaking"), algo)
    assert abs(plain["adv/corr_zscore/jaw@speaking"].item()) < 0.9  # the listening advantage does not contain it
    assert out["adv/corr_zscore/expr"] == plain["adv/corr_zscore/expr"]
    runs = {0: {"distinct": curve([4.0]), "corr": {"expr": curve([0.7]), "rot": curve([0.7]), "jaw@speaking": curve([1.0])}}}
    s = mechanism_summary(runs, ["expr", "rot", "jaw@speaking"])
    assert s["dominance"] == pytest.approx(1.0) and s["top_group"] in ("expr", "rot")
