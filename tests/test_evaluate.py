"""train/evaluate.py and train/bench.py (and the evaluation package behind them) on a tiny pipeline
(tiny synthetic corpus, tiny models).

The VAE and the supervised AR-Flow are tiny random-weight checkpoints written in-process (a smoke
test needs their layout, not their quality); the benchmark's GRPO / GDPO runs are real
``train/gdpo.py`` subprocesses with tiny overrides, as in ``tests/test_pipeline.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny corpus (3 conversations of 16 s; test split: 1 conversation = 4 windows) + tiny VAE and AR-Flow."""
    from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
    from gdpo_listener.agents.checkpoint import save_checkpoint
    from gdpo_listener.agents.vae import VAEConfig, make_vae, save_vae
    from gdpo_listener.envs.dataset import Normalizer
    from gdpo_listener.envs.synthetic import generate_corpus

    d = tmp_path_factory.mktemp("evaluate")
    generate_corpus(d / "data", n_conversations=3, seconds=16, seed=0, test_fraction=0.34, progress=False)
    torch.manual_seed(0)
    save_vae(d / "vae", make_vae(VAEConfig.tiny(d_latent=8)), Normalizer.load(d / "data" / "normalizer.npz"),
             extra_meta={"data_root": str(d / "data")})
    arch = ARFlowConfig.small(d_latent=8, d_model=32, n_layers=1, n_heads=2)
    save_checkpoint(d / "sft", "arflow", {"model": ARFlow(arch).state_dict()},
                    {"arch": dataclasses.asdict(arch), "preset": "small", "vae_dir": str(d / "vae"),
                     "config": {"data": {"root": str(d / "data")},
                                "features": {"text_encoder": "bundled-minilm", "audio_encoder": "logmel"}}})
    return d


def compose(name: str, overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "train" / "conf"), version_base="1.3"):
        return hcompose(config_name=name, overrides=overrides)


def eval_args(d: Path, *extra: str) -> list[str]:
    return [f"checkpoint={d / 'sft'}", f"data.root={d / 'data'}", "data.auto_prepare=false",
            f"features.cache_dir={d / 'cache'}", "progress=false", *extra]


def flame_files(d: Path, flame_kit, **drop) -> tuple[Path, Path]:
    m = {k: v for k, v in flame_kit.tiny_model().items() if k not in drop}
    return flame_kit.write_pkl(d / "generic_model.pkl", m), flame_kit.write_pkl(d / "FLAME_masks.pkl", flame_kit.MASKS)


def test_evaluate_writes_table1_and_supplementary_with_flame(tiny, tmp_path, flame_kit):
    import evaluate

    model, masks = flame_files(tmp_path, flame_kit)
    cfg = compose("evaluate", eval_args(tiny, f"out={tmp_path / 'eval'}", f"metrics.flame_model={model}",
                                        f"metrics.flame_masks={masks}"))
    doc = evaluate.run(cfg, verbose=False)
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| all (n=4) |" in md and "Speaking LVE" in md and "Listening FDD" in md and "P-FD exp" in md
    assert "amplitude or timing" in md and "JDD window-blind" in md  # the parts stay on parameter channels
    assert doc["all"]["listening_parts"]["JDD"]["deviation"]["value"] == pytest.approx(doc["all"]["table1"]["listening"]["JDD"]["value"])
    a = doc["all"]
    assert doc["n_windows"] == 4 and 1 <= doc["n_expressive"] < 4
    assert a["table1"]["speaking"]["LVE"]["value"] > 0 and a["table1"]["speaking"]["LVE"]["unit"] == "mm"
    assert a["table1"]["speaking"]["MHD"]["value"] > 0
    assert a["table1"]["listening"]["FDD"]["basis"].startswith("upper-face vertices")
    assert "LVE" not in a["table1"]["listening"]  # vertex errors are speaking-only
    for split in ("speaking", "listening"):
        assert set(a["supplementary"][split]) == {"FD", "P-FD", "MSE", "SID", "rPCC"}
        assert all(set(v) == {"exp", "jaw", "pose"} for v in a["supplementary"][split].values())
        assert a["supplementary"][split]["MSE"]["exp"]["value"] > 0
    assert set(a["listening_groups"]) == {"expr", "jaw", "neck", "eyelid", "eyepose", "rot"}
    assert doc["expressive"]["n_windows"] == doc["n_expressive"]
    # per listener intent: the windows' counts and shares add up, and the count-weighted means give Table 1 back
    assert "Listening deviations per intent" in md
    assert set(doc["per_intent"]) == {"FDD", "PDD", "JDD"}
    for name, by_intent in doc["per_intent"].items():
        n = sum(c["n"] for c in by_intent.values())
        assert 0 < n <= doc["n_windows"] and sum(c["share"] for c in by_intent.values()) == pytest.approx(1.0)
        weighted = sum(c["mean"] * c["n"] for c in by_intent.values()) / n
        assert weighted == pytest.approx(a["table1"]["listening"][name]["value"], rel=1e-6)
    # the floor for a model that knows the intent: ground truth only, never above the window-blind floor,
    # which is the parts table's own; its intents cover the same windows as the per-intent table
    assert "Floor for a model that knows the intent" in md and "knows what the text says" in md
    for name, fl in doc["intent_floor"].items():
        assert fl["intent_aware"] <= fl["window_blind"] + 1e-9 and fl["text_aware"] <= fl["window_blind"] + 1e-9
        assert fl["window_blind"] == pytest.approx(a["listening_parts"][name]["window_blind"]["value"], rel=1e-6)
        assert {i: c["n"] for i, c in fl["per_intent"].items()} == {i: c["n"] for i, c in doc["per_intent"][name].items()}
        # a faithful sampler of each grouping (a random window's amplitude, not the typical one) never beats its floor
        for key in ("intent_aware", "text_aware", "window_blind"):
            assert fl["sampler"][key] >= fl[key] - 1e-9
        assert set(fl["sampler"]["per_intent"]) == set(fl["per_intent"])
    assert "faithful sampler, knows what the text says" in md


def test_evaluation_is_deterministic_given_the_seed_and_flame_free_vertex_metrics_are_unavailable(tiny):
    from gdpo_listener.evaluation.data import load_eval_model, prepare_eval_data
    from gdpo_listener.evaluation.generation import generate_motion
    from gdpo_listener.evaluation.report import to_json
    from gdpo_listener.evaluation.scoring import aggregate, blas_threads, evaluate_model, row_stats

    cfg = compose("evaluate", eval_args(tiny, "max_windows=2", "steps=2"))
    data, _ = prepare_eval_data(cfg, tiny / "sft", tiny / "data", torch.device("cpu"))
    model, _ = load_eval_model(tiny / "sft", data)
    with blas_threads(1):
        r1 = evaluate_model(model, data, cfg, seed=0, progress=False)
        p2, p3 = (generate_motion(model, data.vae, data.normalizer, data.bank, steps=2, seed=s) for s in (0, 1))
        assert torch.equal(r1["_pred"], p2) and not torch.equal(r1["_pred"], p3)
        # the metrics are a deterministic function of the prediction (seeded k-means in SID)
        st = row_stats(p2, data, cfg.metrics)
        again = aggregate(p2, data, st, torch.ones(2, dtype=torch.bool), cfg.metrics)
    assert json.dumps(to_json(again)) == json.dumps(to_json(r1["all"]))
    lve = r1["all"]["table1"]["speaking"]["LVE"]
    assert lve.value is None and "FLAME" in lve.note  # never 0
    assert r1["all"]["table1"]["listening"]["FDD"].extra["basis"] == "parameters: expr+eyelid"


def test_reconstruction_reference_scores_the_decoded_ground_truth(tiny):
    """The benchmark's reference row: the ground truth through the VAE, scored like a prediction; the
    ground truth itself scores 0 on every dynamic deviation, the reconstruction of an untrained VAE does not."""
    from gdpo_listener.envs.windows import decode_latents
    from gdpo_listener.evaluation.data import prepare_eval_data
    from gdpo_listener.evaluation.generation import quality_figures
    from gdpo_listener.evaluation.scoring import blas_threads, evaluate_reconstruction, score_prediction

    cfg = compose("evaluate", eval_args(tiny, "max_windows=4"))
    data, _ = prepare_eval_data(cfg, tiny / "sft", tiny / "data", torch.device("cpu"))
    with blas_threads(1):
        rec = evaluate_reconstruction(data, cfg.metrics)
        assert torch.equal(rec["_pred"], decode_latents(data.vae, data.normalizer, data.bank["actor_latent"]))
        gt = score_prediction(data.bank["actor_motion"].clone(), data, cfg.metrics)
    for name in ("FDD", "PDD", "JDD"):
        assert gt["all"]["table1"]["listening"][name].value == pytest.approx(0.0, abs=1e-9)
        assert rec["all"]["table1"]["listening"][name].value > 0
    # band diagnostics: the ground truth's own bands are its reference (ratio 1), they split its velocity
    g = gt["all"]["listening_groups"]["expr"]
    for band in ("low", "high"):
        assert g[f"vel_{band}_pred"].value == pytest.approx(g[f"vel_{band}_gt"].value)
    assert 0 < g["vel_low_gt"].value < g["vel_high_gt"].value  # the tiny corpus' listening expression is mostly frame-to-frame
    assert quality_figures(rec["_pred"], data.bank)["listening/expr/vel_std_ratio"] > 0
    assert quality_figures(data.bank["actor_motion"], data.bank)["listening/expr/vel_std_ratio"] == pytest.approx(1.0)


def test_before_after_table_carries_the_vae_ceiling(tiny, capsys):
    """The table train/gdpo.py ends with: a model against itself changes nothing; the VAE reconstruction's
    column is the reward table of the decoded ground truth."""
    from gdpo_listener.evaluation.data import load_eval_model, prepare_eval_data
    from gdpo_listener.evaluation.generation import before_after, column_table, reconstruct_motion
    from gdpo_listener.rewards.groups import build_reward

    cfg = compose("evaluate", eval_args(tiny, "max_windows=4"))
    data, _ = prepare_eval_data(cfg, tiny / "sft", tiny / "data", torch.device("cpu"))
    model, _ = load_eval_model(tiny / "sft", data)
    reward = build_reward("expr+rot")
    t = before_after(model, model, data.vae, data.normalizer, data.bank, reward, n_windows=3, steps=2, seed=0)
    assert t["change/expr/reward"] == 0 and t["before/rot/vel_std_ratio"] == t["after/rot/vel_std_ratio"]
    b = data.bank[:3]
    recon, _ = column_table(reconstruct_motion(data.vae, data.normalizer, b), b, reward)
    assert {k: t[f"vae_reconstruction/{k}"] for k in recon} == recon and recon["expr/vel_std_ratio"] != t["before/expr/vel_std_ratio"]
    assert "VAE recon." in capsys.readouterr().out


def test_evaluate_reconstruction_flag_writes_the_reference_report(tiny, tmp_path):
    import evaluate

    cfg = compose("evaluate", eval_args(tiny, f"out={tmp_path / 'eval'}", "max_windows=2", "steps=2", "reconstruction=true"))
    doc = evaluate.run(cfg, verbose=False)
    rec = json.loads((tmp_path / "eval" / "vae_reconstruction" / "metrics.json").read_text())
    assert rec["checkpoint"].startswith("VAE reconstruction: ") and rec["seed"] is None and rec["n_windows"] == doc["n_windows"] == 2
    assert rec["all"]["table1"]["listening"]["FDD"]["value"] != doc["all"]["table1"]["listening"]["FDD"]["value"]
    assert "No generation" in (tmp_path / "eval" / "vae_reconstruction" / "metrics.md").read_text()
    assert set(rec["per_intent"]) == {"FDD", "PDD", "JDD"} and rec["per_intent"] != doc["per_intent"]
    assert rec["intent_floor"] == doc["intent_floor"]  # the ground truth's alone, whatever is scored


def _copy_dataset(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny / "data", dst)
    return dst


def test_bad_inputs_are_clear_errors(tiny, tmp_path, flame_kit):
    import evaluate

    from gdpo_listener.envs.dataset import DatasetFormatError
    from gdpo_listener.evaluation.checkpoints import EvalInputError
    from gdpo_listener.evaluation.flame_layer import FlameModelError

    # dataset in another format version
    other = _copy_dataset(tiny, tmp_path / "v2")
    meta = json.loads((other / "dataset.json").read_text())
    (other / "dataset.json").write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(DatasetFormatError, match="version 2"):
        evaluate.run(compose("evaluate", eval_args(tiny, f"data.root={other}")), verbose=False)

    # checkpoint trained on a dataset with another FLAME layout / format version
    for change, msg in (({"groups": list(reversed(meta["groups"]))}, "FLAME layouts"), ({"version": 2}, "format versions")):
        ck = tmp_path / f"ck_{msg.split()[0]}"
        shutil.copytree(tiny / "sft", ck)
        m = json.loads((ck / "meta.json").read_text())
        m["dataset"] = {**{k: meta[k] for k in ("format", "version", "flame_dim", "groups")}, **change}
        (ck / "meta.json").write_text(json.dumps(m))
        with pytest.raises(EvalInputError, match=msg):
            evaluate.run(compose("evaluate", eval_args(tiny, f"checkpoint={ck}")), verbose=False)

    # a test split without listening frames (both sides always speaking)
    mute = _copy_dataset(tiny, tmp_path / "nolisten")
    for npz in (mute / "conversations").glob("*.npz"):
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["vad"][:] = True
        np.savez(npz, **arrays)
    with pytest.raises(EvalInputError, match="no listening frames"):
        evaluate.run(compose("evaluate", eval_args(tiny, f"data.root={mute}")), verbose=False)

    # a checkpoint that does not exist (only the default supervised one is produced on demand)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.run(compose("evaluate", eval_args(tiny, f"checkpoint={tmp_path / 'nope'}")), verbose=False)

    # a FLAME model file missing keys; a model without its masks file
    model, masks = flame_files(tmp_path, flame_kit, J_regressor=True)
    with pytest.raises(FlameModelError, match="missing keys \\['J_regressor'\\]"):
        evaluate.run(compose("evaluate", eval_args(tiny, f"metrics.flame_model={model}", f"metrics.flame_masks={masks}")), verbose=False)
    with pytest.raises(FlameModelError, match="flame_masks"):
        evaluate.run(compose("evaluate", eval_args(tiny, f"metrics.flame_model={model}")), verbose=False)


@pytest.mark.slow
def test_bench_quick(tiny):
    """``python train/bench.py --quick`` end to end with GRPO, GDPO and GDPO trained with the marginal SDE:
    real gdpo.py runs, evaluation of every checkpoint, controls, the SDE choice, report with every section."""
    out = tiny / "bench"
    cmd = [sys.executable, str(ROOT / "train" / "bench.py"), "--quick", "jobs=2", "progress=false",
           "algos=[grpo,gdpo,gdpo@marginal,gdpo+nokl]", "variants={nokl:['algo.beta=0']}",
           f"data.root={tiny / 'data'}", "data.auto_prepare=false", f"pretrained.vae={tiny / 'vae'}", f"pretrained.sft={tiny / 'sft'}",
           "pretrained.auto_train=false", f"features.cache_dir={tiny / 'cache'}", f"out_dir={out}"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    res = subprocess.run(cmd, cwd=tiny, capture_output=True, text=True, timeout=900, env=env)
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-4000:])
    assert res.returncode == 0
    for f in ("report.md", "report.json", "reward_curves.png", "mechanism.png", "listening_motion.png"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    post = ["grpo", "gdpo", "gdpo@marginal", "gdpo+nokl"]
    assert rep["methods"] == ["supervised", *post] and rep["setup"]["seeds"] == [0]
    assert rep["setup"]["sde"] == {"grpo": "paper", "gdpo": "paper", "gdpo@marginal": "marginal", "gdpo+nokl": "paper"}  # as recorded
    # quick budget: 1 iteration x 1 prompt x G = 2 rollouts of 25 tokens x 2 SDE steps
    assert rep["setup"]["rollouts_per_run"] == 2 and rep["setup"]["transitions_per_run"] == 2 * 25 * 2
    for m in rep["methods"]:
        assert rep["metrics"][m]["all/listening/FDD"]["mean"] is not None
        assert rep["metrics"][m]["all/speaking/LVE"]["mean"] is None  # no FLAME model: unavailable, not 0
        ctl = rep["controls"][m]  # prompted accuracy = mean over intents of each intent's accuracy
        per_intent = [ctl["per_intent"][i]["mean"] for i in rep["intents"]]
        assert len(per_intent) >= 2 and ctl["prompt_accuracy"]["mean"] == pytest.approx(float(np.mean(per_intent)))
        conf = np.asarray(ctl["confusion"])  # prompted intent x classified intent, one seed: its diagonal gives the accuracies
        assert conf.shape == (len(per_intent),) * 2 and len(set(conf.sum(1))) == 1
        assert np.diag(conf) / conf.sum(1) == pytest.approx(per_intent)
        vs = ctl["vae_space"]  # the same motion scored by the classifier trained on VAE reconstructions
        vs_per = [vs["per_intent"][i]["mean"] for i in rep["intents"]]
        assert vs["prompt_accuracy"]["mean"] == pytest.approx(float(np.mean(vs_per)))
        assert np.asarray(vs["confusion"]).sum() == conf.sum() and np.diag(vs["confusion"]) / conf.sum(1) == pytest.approx(vs_per)
        assert set(rep["controls"][m]["cfg_sweep"]) == {"1", "4"}
        sweeps = rep["controls"][m]["cfg_sweeps"]  # the paper's unconditional branch and partner-motion guidance
        assert list(sweeps) == ["text+audio+motion", "motion"] and sweeps["text+audio+motion"] == rep["controls"][m]["cfg_sweep"]
        assert sweeps["motion"]["1"] == sweeps["text+audio+motion"]["1"]  # w = 1 runs no unconditional branch
    for m, slug, algo in (("grpo", "grpo", "grpo"), ("gdpo", "gdpo", "gdpo"), ("gdpo@marginal", "gdpo-marginal", "gdpo"),
                          ("gdpo+nokl", "gdpo_nokl", "gdpo")):
        # training reward curves and mechanism figures read from the CSV logs, every rewarded group
        assert all(v["final"]["mean"] is not None for v in rep["training"]["reward"][m].values())
        logs = out / "runs" / f"{slug}_seed0" / "logs" / algo / "scalars"
        assert (logs / "reward" / "expr" / "mean.csv").is_file() and (logs / "adv" / "distinct_per_group.csv").is_file()
        mech = rep["mechanism"][m]
        assert 1 <= mech["distinct"]["mean"] <= 2  # G = 2 rollouts per prompt group
        assert set(mech["corr"]) == set(rep["training"]["reward"][m]) and all(abs(d["mean"]) <= 1 + 1e-5 for d in mech["corr"].values())
        assert (out / "eval" / f"{slug}_seed0" / "metrics.json").is_file()
    # report.md is report.json rendered: the saved report alone gives it again
    from gdpo_listener.evaluation.bench_markdown import report_markdown
    from gdpo_listener.rewards.groups import parse_reward_spec

    weights = [float(w) for w in rep["controls"]["supervised"]["cfg_sweep"]]
    md = report_markdown(weights, rep, rep["methods"], parse_reward_spec(rep["setup"]["reward"]), rep["intents"])
    assert md == (out / "report.md").read_text()
    assert "all test windows" in md  # every section names the split it evaluated: a probe's eval.split=train report says so
    train_md = report_markdown(weights, {**rep, "setup": {**rep["setup"], "split": "train"}}, rep["methods"],
                               parse_reward_spec(rep["setup"]["reward"]), rep["intents"])
    assert "test window" not in train_md and "all train windows" in train_md and "one train window" in train_md
    # paired per-window comparison: every method vs supervised, both subsets, the listening metrics
    for m in post:
        for subset in ("all", "expressive"):
            p = rep["paired"][m][subset]["listening/PDD"]
            assert p["ci_low"] <= p["mean_diff"] <= p["ci_high"] and 0 <= p["frac_improved"] <= 1
        assert set(rep["paired"][m]["all"]) >= {"listening/FDD", "listening/PDD", "listening/JDD", "speaking/JDD"}
    # one seed: the paired means are the two evaluations' Table 1 means (same windows, same units)
    p = rep["paired"]["gdpo"]["all"]["listening/PDD"]
    assert p["reference"] == pytest.approx(rep["metrics"]["supervised"]["all/listening/PDD"]["mean"], rel=1e-6)
    assert p["method"] == pytest.approx(rep["metrics"]["gdpo"]["all/listening/PDD"]["mean"], rel=1e-6)
    assert p["mean_diff"] == pytest.approx(p["method"] - p["reference"], abs=1e-9)
    sde = rep["sde_choice"]
    mixed = [f"SDE {k} 2 steps sigma 0.5, SDE on step 0" for k in ("paper", "marginal")]  # quick_settings windows [[0, 1]]
    assert list(sde["dynamics"]) == ["ODE 2 steps", "SDE paper 2 steps sigma 0.5", "SDE marginal 2 steps sigma 0.5", *mixed,
                                     "ODE 2 steps, teacher-forced"]
    assert sde["teacher_forced_quality"]["listening/expr/vel_std_ratio"]["mean"] > 0  # each token given the ground-truth history
    assert sde["dynamics"]["ODE 2 steps"]["listening/expr/vel_std_ratio"]["mean"] > 0
    assert sde["closest_to_ode"]["best"] in ("SDE paper 2 steps sigma 0.5", "SDE marginal 2 steps sigma 0.5", *mixed)
    assert list(sde["models"]) == ["gdpo@marginal vs gdpo"] and sde["models"]["gdpo@marginal vs gdpo"]["method_sde"] == "marginal"
    # a variant: trained with its overrides (the run's recorded config), compared with its base, not in the SDE choice
    beta = {slug: json.loads((out / "runs" / f"{slug}_seed0" / "meta.json").read_text())["config"]["algo"]["beta"]
            for slug in ("gdpo", "gdpo_nokl")}
    assert beta["gdpo_nokl"] == 0 and beta["gdpo"] > 0
    var = rep["variants"]["gdpo+nokl"]
    assert list(rep["variants"]) == ["gdpo+nokl"] and var["base"] == "gdpo"
    pj = var["paired"]["all"]["listening/JDD"]
    assert pj["reference"] == pytest.approx(rep["metrics"]["gdpo"]["all/listening/JDD"]["mean"], rel=1e-6)
    assert pj["method"] == pytest.approx(rep["metrics"]["gdpo+nokl"]["all/listening/JDD"]["mean"], rel=1e-6)
    assert var["welch"]["all/listening/JDD"]["t"] is None  # one seed: no Welch, never a made-up p
    names = [t["name"] for t in rep["targets"]]
    assert all(t["status"] in ("PASS", "FAIL", "N/A") for t in rep["targets"])
    assert "supervised listening velocity-std ratio, expr" in names and "GDPO (marginal SDE) vs supervised, listening FDD" in names
    assert "supervised listening collapse beyond the VAE, expr" in names
    # the VAE reconstruction: a reference row scored like every checkpoint, its report written beside theirs
    rec = rep["reconstruction"]
    assert rec["metrics"]["all/listening/FDD"]["mean"] is not None and rec["quality"]["listening/expr/vel_std_ratio"] > 0
    assert (out / "eval" / "vae_reconstruction" / "metrics.json").is_file()
    ci = rep["intent_classifier"]  # the intent classifier also scores the reconstructed ground truth, same windows
    assert ci["vae_reconstruction_windows"] == ci["gt_test_windows"] and 0 <= ci["vae_reconstruction_accuracy"] <= 1
    vs = ci["vae_space"]
    assert vs["train_windows"] == ci["train_windows"] and vs["vae_reconstruction_windows"] == ci["gt_test_windows"]
    assert any(n.startswith("GRPO's advantage follows one group") for n in names)
    ev = json.loads((out / "eval" / "gdpo_seed0" / "metrics.json").read_text())
    assert "FLAME" in ev["all"]["table1"]["speaking"]["LVE"]["note"]
    md = (out / "report.md").read_text()
    for section in ("## Targets (issue 10)", "Table 1 layout", "## Paired per-window comparison", "## SDE choice",
                    "Better post-trained model", "## GDPO mechanism figures", "Trend over the last third", "Text control",
                    "CFG intensity sweep", "Unconditional branch nulls motion:", "GDPO (marginal SDE)", "## The VAE's ceiling",
                    "VAE reconstruction (reference)", "## Listening deviations: amplitude or timing", "| window-blind floor |",
                    "## Listening deviations per intent", "VAE-space classifier", "## Variants vs their base",
                    "GDPO + nokl vs GDPO"):
        assert section in md, section
    for m in rep["methods"]:  # per intent: the shares of the windows' deviation add up to 1
        shares = [c["share"] for c in rep["per_intent"][m]["listening/JDD"].values()]
        assert shares and sum(shares) == pytest.approx(1.0)
    fl = rep["intent_floor"]["JDD"]  # beside them, the floor for a model that knows the intent (ground truth only)
    assert "floor, knows the intent" in md and fl["intent_aware"] <= fl["window_blind"] + 1e-9
    assert "| all windows, faithful sampler |" in md and fl["sampler"]["intent_aware"] >= fl["intent_aware"] - 1e-9
    rec = rep["reconstruction"]["per_intent"]["listening/JDD"]  # and what perfect latents reach, per intent
    assert "| VAE reconstruction |" in md and sum(c["share"] for c in rec.values()) == pytest.approx(1.0)
    assert (sum(c["mean"] * c["n"] for c in rec.values()) / sum(c["n"] for c in rec.values())
            == pytest.approx(rep["reconstruction"]["metrics"]["all/listening/JDD"]["mean"], rel=1e-6))
    assert set(fl["per_intent"]) == set(rep["per_intent"]["supervised"]["listening/JDD"])
    for m in rep["methods"]:  # amplitude or timing: scaling each channel optimally never raises the deviation
        a = rep["metrics"][m]
        assert a["all/listening/parts/JDD/at_best_amplitude"]["mean"] <= a["all/listening/parts/JDD/deviation"]["mean"] + 1e-9
        assert a["all/listening/parts/PDD/deviation"]["mean"] == pytest.approx(a["all/listening/PDD"]["mean"], rel=1e-6)
    assert "training-reward slope over the last third" in res.stdout


def test_bench_on_train_windows_is_a_seeded_probe(tiny):
    """``train/bench.py eval.split=train``: an ablation (a variant against its base) scored on train windows,
    the way a probe is chosen without looking at the test split, with a composition of two variants; trained on a
    reward with other term weights than the default, which the supervised model is scored on too."""
    out = tiny / "bench_train"
    cmd = [sys.executable, str(ROOT / "train" / "bench.py"), "--quick", "progress=false", "algos=[gdpo,gdpo+nokl,gdpo+nokl+jawkl]",
           "variants={nokl:['algo.beta=0'],jawkl:['algo.group_kl={jaw:0.5}']}", "compare=[[gdpo,gdpo+nokl]]",
           "quick_settings.eval.split=train",
           "quick_settings.eval.max_windows=6",
           "quick_settings.train_overrides=['env.n_prompts=1','env.group_size=2','env.sde_steps=2','eval.n_windows=2',"
           "'ckpt_every=1','+rewards.weights.vel=4']",
           f"data.root={tiny / 'data'}", "data.auto_prepare=false", f"pretrained.vae={tiny / 'vae'}", f"pretrained.sft={tiny / 'sft'}",
           "pretrained.auto_train=false", f"features.cache_dir={tiny / 'cache'}", f"out_dir={out}"]
    res = subprocess.run(cmd, cwd=tiny, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-4000:])
    assert res.returncode == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["setup"]["split"] == "train" and rep["setup"]["n_windows"] == 6
    # each variant against its base, the composition also against what its last variant adds to, then the chosen pair
    assert list(rep["variants"]) == ["gdpo+nokl", "gdpo+nokl+jawkl", "gdpo+nokl+jawkl vs gdpo+nokl", "gdpo vs gdpo+nokl"]
    host = next(iter(rep["setup"]["hosts"]))  # every run trained here, on this host, and evaluated on it
    assert rep["setup"]["hosts"] == {host: ["gdpo seed 0", "gdpo+nokl seed 0", "gdpo+nokl+jawkl seed 0"]}
    assert rep["setup"]["eval_host"] == host
    stamp = json.loads((out / "runs" / "gdpo_nokl_jawkl_seed0.bench_run.json").read_text())
    assert stamp["overrides"][-2:] == ["algo.beta=0", "algo.group_kl={jaw:0.5}"]  # both variants', in order, last
    assert (out / "runs" / "gdpo_nokl_jawkl_seed0" / "logs" / "gdpo" / "scalars" / "loss" / "loss_kl_jaw.csv").is_file()
    ev = json.loads((out / "eval" / "gdpo_nokl_seed0" / "metrics.json").read_text())
    assert ev["split"] == "train"
    # the reward the runs optimised (velocity term x4) scores every checkpoint, the supervised one included
    assert ev["run_reward"]["rewards"]["weights"] == {"vel": 4} and ev["run_reward"]["optimised"]
    sup = json.loads((out / "eval" / "supervised_seed0" / "metrics.json").read_text())
    assert sup["run_reward"]["rewards"]["weights"] == {"vel": 4} and not sup["run_reward"]["optimised"]
    assert "Also scored on reward `all`" in (out / "eval" / "supervised_seed0" / "metrics.md").read_text()
    for m in ("supervised", "gdpo"):
        own, default = (rep["metrics"][m][f"all/listening/group/jaw/{k}"]["mean"] for k in ("run_reward", "reward"))
        assert own < default < 0  # four times the velocity term: a larger penalty
    assert rep["setup"]["run_reward"]["rewards"]["weights"] == {"vel": 4}
    md = (out / "report.md").read_text()
    assert f"Runs trained on {host}. Evaluated on {host}." in md
    assert "under the reward the post-trained runs optimised (term weights var 1, vel 4, drift 0.25, mse 0.1;" in md


def test_bench_helpers():
    import bench
    from omegaconf import OmegaConf

    from gdpo_listener.evaluation.seed_stats import fmt_ms, mean_std, relative_change, welch_t

    assert bench.hydra_argv(["bench.py", "--quick", "jobs=2"]) == ["bench.py", "quick=true", "jobs=2"]
    # a method's overrides differ from another's only in algo= / env.sde=
    from gdpo_listener.evaluation import bench_runs
    from gdpo_listener.evaluation.benchmark import parse_method

    cfg = compose("bench", ["train_overrides=['eval.n_windows=4']"])
    args = (0, Path("/r/x"), Path("/d"), Path("/v"), Path("/s"))
    plain, marginal = (bench_runs.train_overrides(cfg, parse_method(m), *args) for m in ("gdpo", "gdpo@marginal"))
    assert plain[0] == "algo=gdpo" and marginal[:2] == ["algo=gdpo", "env.sde=marginal"] and marginal[2:] == plain[1:]
    assert plain[-1] == "eval.n_windows=4" and not any(o.startswith("env.sde") for o in plain)
    with pytest.raises(ValueError, match="sets env.sde itself"):
        bench_runs.train_overrides(compose("bench", ["train_overrides=['env.sde=paper']"]), parse_method("gdpo@marginal"), *args)
    assert bench.parse_algos(["grpo", "gdpo@marginal"]) == ["grpo", "gdpo@marginal"]
    # a variant's overrides come last, over train_overrides (Hydra: the last value of a key wins)
    vcfg = compose("bench", ["train_overrides=['eval.n_windows=4','env.group_size=8']",
                             "variants={nokl:['algo.beta=0','env.group_size=16']}"])
    base, var = (bench_runs.train_overrides(vcfg, parse_method(m), *args) for m in ("gdpo", "gdpo+nokl"))
    assert var[:len(base)] == base and var[len(base):] == ["algo.beta=0", "env.group_size=16"]
    run_var, run_base = compose("gdpo", var), compose("gdpo", base)
    assert run_var.env.group_size == 16 and run_var.algo.beta == 0 and run_base.env.group_size == 8 and run_base.algo.beta > 0
    assert bench.check_settings(OmegaConf.merge(vcfg, {"algos": ["gdpo", "gdpo+nokl"], "quick": True}))[1] == ["gdpo", "gdpo+nokl"]
    for algos, extra, match in ((["gdpo+other"], {}, "no variant 'other'"),
                                (["gdpo+nokl"], {"variants": {"nokl": ["seed=3"]}}, "not an override a variant may set"),
                                (["gdpo+nokl"], {"variants": {"nokl": ["pretrained.sft=x"]}}, "not an override a variant may set")):
        with pytest.raises(ValueError, match=match):  # early, before any training
            bench.check_settings(OmegaConf.merge(vcfg, {"algos": algos, "quick": True}, extra))
    for bad in (["gdpo", "gdpo"], [], ["ppo"]):
        with pytest.raises(ValueError):
            bench.parse_algos(bad)
    with pytest.raises(ValueError, match="share a run folder name"):  # gdpo+a_b and gdpo+a+b: runs/gdpo_a_b_seed<S> both
        bench.parse_algos(["gdpo+a_b", "gdpo+a+b"])
    # composed variants: the overrides of each, in order, after train_overrides; checked before any training
    kcfg = compose("bench", ["variants={a:['algo.beta=0'],b:['env.group_size=8']}"])
    assert bench_runs.train_overrides(kcfg, parse_method("gdpo+a+b"), *args)[-2:] == ["algo.beta=0", "env.group_size=8"]
    assert bench.check_settings(OmegaConf.merge(kcfg, {"algos": ["gdpo+a", "gdpo+a+b"], "quick": True}))[1] == ["gdpo+a", "gdpo+a+b"]
    with pytest.raises(ValueError, match="both set algo.beta"):
        bench.check_settings(OmegaConf.merge(kcfg, {"algos": ["gdpo+a+b"], "variants": {"b": ["algo.beta=1"]}, "quick": True}))
    # compare: pairs of methods the run trains, from the command line's nested list
    ccfg = compose("bench", ["variants={a:['algo.beta=0'],ab:['algo.beta=0','env.group_size=8']}", "compare=[[gdpo+ab,gdpo+a]]"])
    assert bench.check_settings(OmegaConf.merge(ccfg, {"algos": ["gdpo", "gdpo+a", "gdpo+ab"], "quick": True}))[1][-1] == "gdpo+ab"
    with pytest.raises(ValueError, match="compare entry"):  # early, before any training: gdpo+a is not trained
        bench.check_settings(OmegaConf.merge(ccfg, {"algos": ["gdpo", "gdpo+ab"], "quick": True}))
    # a preset is a variant like any other; it sets the algorithm's scope and the learning rate, the command line wins
    pcfg = compose("bench", ["variants={ctx:['preset=listening_lora']}"])
    assert bench.check_settings(OmegaConf.merge(pcfg, {"algos": ["gdpo", "gdpo+ctx"], "quick": True}))[1] == ["gdpo", "gdpo+ctx"]
    run_ctx = compose("gdpo", bench_runs.train_overrides(pcfg, parse_method("gdpo+ctx"), *args))
    run_gdpo = compose("gdpo", bench_runs.train_overrides(pcfg, parse_method("gdpo"), *args))
    assert (run_ctx.algo.listen_lora, run_ctx.algo.lora_scope, run_ctx.optim.lr) == (16, "listening_context", 3e-3)
    assert (run_gdpo.algo.listen_lora, run_gdpo.algo.lora_scope, run_gdpo.optim.lr) == (0, "listening", run_gdpo.model.rl.lr)
    assert compose("gdpo", ["preset=listening_lora", "optim.lr=1e-3", "algo=grpo"]).optim.lr == 1e-3
    assert compose("gdpo", ["preset=listening_lora", "algo=grpo"]).algo.listen_lora == 16  # whichever algorithm
    assert compose("gdpo", ["preset=listening_lora"]).out_dir == "runs/gdpo_small_expr+rot_listening_lora"

    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([None, 4.0]) == {"mean": 4.0, "std": None, "n": 1}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}
    assert fmt_ms({"mean": 2.0, "std": 1.0}) == "2.00 ± 1.00" and fmt_ms(None) == "n/a"
    # t = (mean b - mean a) / sqrt(var_a / 3 + var_b / 3) = (5 - 2) / sqrt(1/3 + 1/3)
    assert welch_t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(3 / (2 / 3) ** 0.5)
    assert welch_t([1.0, None], [4.0, 5.0]) is None and welch_t([1.0, 1.0], [2.0, 2.0]) is None
    assert relative_change(2.0, 1.5) == pytest.approx(-0.25) and relative_change(0.0, 1.0) is None


def test_bench_transitions_follow_the_episode_length():
    """Transitions per run = iterations x prompts x G x tokens per episode x SDE steps, with the run's
    env.episode_tokens (not a fixed 25)."""
    from gdpo_listener.evaluation.benchmark import training_budget

    arch = {"window": 200, "r": 8}
    env = {"n_prompts": 2, "group_size": 3, "sde_steps": 4, "episode_tokens": None}
    one_window = training_budget({"env": env, "optim": {"iterations": 5}}, arch)
    assert one_window == {"iterations": 5, "rollouts": 30, "episode_tokens": 25, "transitions": 30 * 25 * 4}
    long = training_budget({"env": {**env, "episode_tokens": 100}, "optim": {"iterations": 5}}, arch)
    assert long["episode_tokens"] == 100 and long["transitions"] == 30 * 100 * 4
    assert training_budget({"env": env, "optim": {"iterations": 5}}, {"window": 160, "r": 4})["transitions"] == 30 * 40 * 4


def test_bench_refuses_to_delete_a_folder_it_did_not_write(tiny, tmp_path):
    """A run folder in the way is replaced only if the benchmark started that run (its record beside the
    folder) or it is empty."""
    import bench

    from gdpo_listener.evaluation import bench_runs
    from gdpo_listener.evaluation.benchmark import replaceable_run_dir, run_stamp

    out = tmp_path / "bench"
    runs = out / "runs"
    mine, empty, theirs = runs / "gdpo_seed0", runs / "grpo_seed0", runs / "gdpo_seed1"
    for d in (mine, empty, theirs):
        d.mkdir(parents=True)
    run_stamp(mine).write_text("{}")
    (theirs / "notes.txt").write_text("my notes")
    assert replaceable_run_dir(mine, runs) and replaceable_run_dir(empty, runs) and replaceable_run_dir(runs / "new", runs)
    assert not replaceable_run_dir(theirs, runs)
    assert not replaceable_run_dir(runs / ".." / "elsewhere", runs)  # '..' resolved: not a run folder
    (runs / "link").symlink_to(mine, target_is_directory=True)
    assert not replaceable_run_dir(runs / "link", runs)

    cfg = compose("bench", [f"out_dir={out}", "quick=true", f"features.cache_dir={tiny / 'cache'}"])
    cfg = bench.apply_quick(cfg)
    with pytest.raises(RuntimeError, match="refusing to delete .*gdpo_seed1"):
        bench_runs.run_training(cfg, "gdpo", 1, out, tiny / "data", tiny / "vae", tiny / "sft")
    assert (theirs / "notes.txt").read_text() == "my notes"


def test_evaluate_scores_a_run_with_its_own_reward_too(tiny, tmp_path):
    """A post-trained run recorded reward=expr with its own term weights: its groups get a 'run_reward'
    (that run's reward) beside the default reward, and the report says so."""
    import evaluate

    from gdpo_listener.evaluation.data import load_eval_model, prepare_eval_data
    from gdpo_listener.evaluation.scoring import evaluate_model
    from gdpo_listener.rewards.groups import build_reward

    ck = tmp_path / "rl"
    shutil.copytree(tiny / "sft", ck)
    meta = json.loads((ck / "meta.json").read_text())
    meta["config"] = {**meta["config"], "reward": "expr",
                      "rewards": {"weights": {"mse": 50.0}, "lambdas": {}, "group_reward": None, "extra_terms": {}}}
    (ck / "meta.json").write_text(json.dumps(meta))
    doc = evaluate.run(compose("evaluate", eval_args(tiny, f"checkpoint={ck}", f"out={tmp_path / 'eval'}", "steps=2")),
                       verbose=False)
    groups = doc["all"]["listening_groups"]
    assert [g for g, d in groups.items() if "run_reward" in d] == ["expr"]
    assert doc["run_reward"]["reward"] == "expr" and doc["run_reward"]["scored_separately"] is True
    assert "expr run reward" in (tmp_path / "eval" / "metrics.md").read_text()
    # the value is that run's reward of the same prediction, on windows with >= min_frames listening frames
    cfg = compose("evaluate", eval_args(tiny, "steps=2"))
    data, _ = prepare_eval_data(cfg, ck, tiny / "data", torch.device("cpu"))
    model, _ = load_eval_model(ck, data)
    pred = evaluate_model(model, data, cfg, progress=False)["_pred"]
    b = data.bank
    r = build_reward("expr", weights={"mse": 50.0}).compute(pred, b["actor_motion"], b["listening"], b["actor_valid"])
    ok = r["valid"][:, 0] & (b["listening"].sum(-1) >= 10)
    assert groups["expr"]["run_reward"]["value"] == pytest.approx(float(r["reward"][ok, 0].mean()), rel=1e-5)
    assert groups["expr"]["run_reward"]["value"] < groups["expr"]["reward"]["value"]  # mse weighted 500x more

    # a run with the default per-group terms is not scored twice
    meta["config"]["rewards"]["weights"] = {}
    (ck / "meta.json").write_text(json.dumps(meta))
    doc = evaluate.run(compose("evaluate", eval_args(tiny, f"checkpoint={ck}", f"out={tmp_path / 'eval2'}", "steps=2")),
                       verbose=False)
    assert doc["run_reward"]["scored_separately"] is False
    assert not any("run_reward" in d for d in doc["all"]["listening_groups"].values())


@pytest.mark.slow
def test_bench_extends_a_shorter_run_to_the_same_model_as_a_straight_run(tiny, tmp_path):
    """``iterations=2`` after a finished 1-iteration run continues it (resume) instead of retraining it,
    and ends with the model of a straight 2-iteration run; anything else about the run still retrains."""
    import bench

    from gdpo_listener.evaluation import bench_runs
    from gdpo_listener.evaluation.benchmark import run_stamp

    def cfg_for(out, iterations, *extra):
        cfg = bench.apply_quick(compose("bench", [f"out_dir={out}", "quick=true", f"features.cache_dir={tiny / 'cache'}",
                                                  "threads=1", *extra]))
        cfg.iterations = iterations
        return cfg

    def train(out, iterations, *extra):
        return bench_runs.run_training(cfg_for(out, iterations, *extra), "gdpo", 0, out, tiny / "data", tiny / "vae", tiny / "sft")

    out, straight = tmp_path / "bench", tmp_path / "straight"
    first = train(out, 1)
    assert not first["reused"] and first["wall_s"] > 0
    assert train(out, 1)["reused"]  # unchanged: reused
    assert train(out, 1, "threads=2")["reused"]  # where it runs is not what it is (as for run folders)
    copied = tmp_path / "copied"  # finished runs copied into another out_dir are scored there, on any split
    shutil.copytree(out / "runs", copied / "runs")
    assert train(copied, 1, "eval.split=train")["reused"]
    ext = train(out, 2)
    run_dir = Path(ext["path"])
    log = (out / "logs" / "gdpo_seed0.log").read_text()
    assert "resumed at iteration 1" in log and not ext["reused"] and ext["wall_s"] > first["wall_s"]
    rec = json.loads(run_stamp(run_dir).read_text())
    assert rec["extended_from"] == 1 and "optim.iterations=2" in rec["overrides"] and rec["status"] == "done"
    assert ext["extended_from"] == 1 and train(out, 2)["extended_from"] == 1  # the report names the extended runs
    train(straight, 2)
    a, b = (load_file(str(d / "runs" / "gdpo_seed0" / "model.safetensors")) for d in (out, straight))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # an extension that stopped half-way (stamp "extending") is continued only towards at least its target
    stamp = run_stamp(run_dir)
    over3 = [o if not o.startswith("optim.iterations=") else "optim.iterations=3" for o in rec["overrides"]]
    stamp.write_text(json.dumps({**rec, "status": "extending", "target": over3}))
    assert bench_runs.previous_run(cfg_for(out, 3), run_dir, over3)[0] == "extend"
    assert bench_runs.previous_run(cfg_for(out, 2), run_dir, rec["overrides"]) is None  # past 2 already: retrain
    assert bench_runs.previous_run(cfg_for(out, 3, "extend=false"), run_dir, over3) is None
    stamp.write_text(json.dumps(rec))
    # another setting (or extend=false) retrains from scratch
    assert train(out, 3, "extend=false")["reused"] is False
    assert "resumed" not in (out / "logs" / "gdpo_seed0.log").read_text()


def test_malformed_intent_labels_name_the_file(tmp_path):
    from gdpo_listener.evaluation.intent_control import load_labels

    assert load_labels(tmp_path) is None  # no labels: a corpus without intents
    (tmp_path / "synthetic_labels.json").write_text("{not json")
    with pytest.raises(ValueError, match="synthetic_labels.json"):
        load_labels(tmp_path)
    (tmp_path / "synthetic_labels.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_labels(tmp_path)


def test_the_text_aware_floor_groups_windows_by_the_intent_their_text_names():
    """A vague or missing text names no intent: such windows join the unlabelled group; labels without text kinds
    (corpus version 1, every text full) name every window's intent."""
    from gdpo_listener.evaluation.intent_control import window_text_intent

    labels = {"c0": {"intents": [["amused", "sad", "bored"], ["joyful"]], "text_kinds": [["full", "vague", "missing"], ["full"]]},
              "c1": {"intents": [["sad"]]}}
    assert [window_text_intent(labels, "c0", 0, w) for w in range(3)] == ["amused", None, None]
    assert window_text_intent(labels, "c0", 1, 0) == "joyful" and window_text_intent(labels, "c1", 0, 0) == "sad"
    assert window_text_intent(labels, "c9", 0, 0) is None and window_text_intent(labels, "c0", 0, 7) is None


def test_vae_space_classifier_sees_the_recoded_motion(tiny_pipeline, rl):
    """The supplementary text-control classifier is fitted on the recoded train motion (one call, every window),
    and ``vae_recode`` is the VAE's encode -> decode of raw motion, in any batch size."""
    from gdpo_listener.envs.windows import decode_latents, encode_latents
    from gdpo_listener.evaluation import intent_control as IC

    root = tiny_pipeline.data
    labels, intents = IC.load_labels(root), IC.corpus_intents(root)
    seen = []

    def double(m):
        seen.append(tuple(m.shape))
        return 2 * m

    clf, info = IC.train_intent_classifier(root, labels, intents, 1)
    clf2, info2 = IC.train_intent_classifier(root, labels, intents, 1, recode=double)
    assert len(seen) == 1 and seen[0][0] == info["train_windows"] == info2["train_windows"]
    # features (mean, std, velocity std per channel) all scale with the motion: fitted on the recoded windows
    assert np.allclose(clf2.mu, 2 * clf.mu, rtol=1e-9, atol=1e-12) and np.allclose(clf2.sd, 2 * clf.sd, rtol=1e-6)
    vae, norm = rl.tiny_vae(0)
    m = torch.randn(5, rl.W, 67)
    want = decode_latents(vae, norm, encode_latents(vae, norm, m))
    assert torch.allclose(IC.vae_recode(vae, norm, batch_size=2)(m), want, atol=1e-6) and want.shape == m.shape


def test_teacher_forced_motion_integrates_each_token_given_the_ground_truth_history(rl):
    """Euler ODE from seeded noise over the flow-time grid, the model called with the rows' ground-truth latents
    as history and no condition nulled, then decoded; a constant velocity field gives noise + velocity exactly."""
    from gdpo_listener.envs.windows import decode_latents
    from gdpo_listener.evaluation.generation import teacher_forced_motion

    class Const(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, cond, x_clean, x_noisy, t, drop=None):
            self.calls.append((x_clean, t.clone(), drop))
            return torch.arange(1.0, x_noisy.shape[1] + 1)[None, :, None].expand_as(x_noisy)  # token l moves by l + 1

    vae, norm = rl.tiny_vae(0)
    bank = rl.tiny_bank(3)
    model = Const()
    out = teacher_forced_motion(model, vae, norm, bank, steps=4, seed=5)
    gt = bank["actor_latent"]
    x0 = torch.randn(gt.shape, generator=torch.Generator().manual_seed(5))
    want = decode_latents(vae, norm, x0 + torch.arange(1.0, gt.shape[1] + 1)[None, :, None])
    assert out.shape == bank["actor_motion"].shape and torch.allclose(out, want, atol=1e-5)
    assert len(model.calls) == 4 and all(torch.equal(c[0], gt) and c[2] == {} for c in model.calls)
    assert [float(c[1][0, 0]) for c in model.calls] == [0.0, 0.25, 0.5, 0.75]  # t = 0 noise ... (flow convention)
    assert torch.equal(teacher_forced_motion(model, vae, norm, bank, steps=4, seed=5), out)


def test_decoder_fit_entry_point(tiny, tmp_path, capsys):
    """train/decoder_fit.py: both models sampled with the same noise (the latents generate_motion decodes), the
    run's motion with the supervised jaw fitted and the control, a JSON report; a bad group fails first."""
    import decoder_fit

    from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig, load_arflow
    from gdpo_listener.agents.checkpoint import save_checkpoint
    from gdpo_listener.envs.windows import decode_latents
    from gdpo_listener.evaluation.data import prepare_eval_data
    from gdpo_listener.evaluation.generation import generate_motion, sample_latents

    meta = json.loads((tiny / "sft" / "meta.json").read_text())
    torch.manual_seed(5)
    run = ARFlow(ARFlowConfig(**meta["arch"]))
    save_checkpoint(tmp_path / "run", "arflow", {"model": run.state_dict()}, meta)
    args = [f"checkpoint={tmp_path / 'run'}", f"supervised={tiny / 'sft'}", f"data.root={tiny / 'data'}", "data.auto_prepare=false",
            f"features.cache_dir={tiny / 'cache'}", "split=test", "max_windows=4", "fit_steps=20", f"out={tmp_path / 'fit.json'}"]
    cfg = compose("decoder_fit", args)
    rep = decoder_fit.run(cfg)
    names = [r["motion"] for r in rep["rows"]]
    assert names[:3] == ["supervised", "run", "splice target (run, supervised jaw)"] and len(names) == 5
    sup, r, target, fit, control = rep["rows"]
    assert target["jaw deviation"] == pytest.approx(sup["jaw deviation"]) and target["FDD"] == pytest.approx(r["FDD"])
    assert fit["latent move"] > 0 and control["latent move"] > 0 and rep["windows"] == 4
    assert rep["share_removed"] == pytest.approx((r["jaw deviation"] - fit["jaw deviation"]) / (r["jaw deviation"] - sup["jaw deviation"]))
    decoder_fit.print_report(rep)
    assert "share of the run's change in jaw deviation" in capsys.readouterr().out
    # sample_latents gives the latents generate_motion decodes (the same noise)
    data, _ = prepare_eval_data(cfg, tmp_path / "run", tiny / "data", torch.device("cpu"))
    model, _ = load_arflow(tmp_path / "run")
    z = sample_latents(model, data.bank, steps=2, seed=3, batch_size=2)
    torch.testing.assert_close(decode_latents(data.vae, data.normalizer, z),
                               generate_motion(model, data.vae, data.normalizer, data.bank, steps=2, seed=3, batch_size=2))
    with pytest.raises(ValueError, match="group='nose'"):
        decoder_fit.run(compose("decoder_fit", [*args, "group=nose"]))
    with pytest.raises(FileNotFoundError, match="supervised="):
        decoder_fit.run(compose("decoder_fit", [*args, f"supervised={tmp_path / 'none'}"]))
    other_vae = tmp_path / "vae2"
    shutil.copytree(tiny / "vae", other_vae)
    save_checkpoint(tmp_path / "sup2", "arflow", {"model": run.state_dict()}, {**meta, "vae_dir": str(other_vae)})
    with pytest.raises(ValueError, match="same VAE"):
        decoder_fit.run(compose("decoder_fit", [*[a for a in args if not a.startswith("supervised=")], f"supervised={tmp_path / 'sup2'}"]))
