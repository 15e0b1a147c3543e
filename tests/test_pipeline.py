"""Smoke tests of the real entry points with tiny overrides: data -> VAE -> SFT -> GDPO/GRPO, resume.

Every test here starts entry-point subprocesses on conftest's ``tiny_pipeline`` corpus.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tiny_pipeline, run_entry):
    """The main job with tiny overrides (it trains the VAE and SFT prerequisites unless an earlier test did)."""
    d, args = tiny_pipeline.root, tiny_pipeline.gdpo_args
    res = run_entry("gdpo.py", "reward=expr+rot", *args("optim.iterations=2", f"out_dir={d / 'gdpo'}"), cwd=d)
    assert res.returncode == 0
    return res


def test_gdpo_main_job_with_prerequisites_then_resumes(tiny_pipeline, run_entry, first_run):
    d, args, res = tiny_pipeline.root, tiny_pipeline.gdpo_args, first_run
    out = d / "gdpo"
    assert (d / "vae" / "meta.json").is_file() and (d / "sft" / "meta.json").is_file() and (out / "meta.json").is_file()
    assert "supervised" in res.stdout and "expr/vel_std_dev" in res.stdout  # the before/after table
    logs = list((out / "logs").rglob("*.csv"))
    names = {p.stem for p in logs}
    assert {"mean", "loss_objective", "loss_kl", "clip_fraction"} <= names, names
    # a second run reuses the cached stages and continues the killed run from its last checkpoint
    res2 = run_entry("gdpo.py", "reward=expr+rot", *args("optim.iterations=3", f"out_dir={out}", "resume=true"), cwd=d)
    assert res2.returncode == 0
    assert "resumed at iteration 2" in res2.stdout and "[pipeline] running" not in res2.stdout
    # ... exactly: 2 iterations + resume to 3 equals 3 iterations straight (optimiser, noise and window draws restored)
    res_straight = run_entry("gdpo.py", "reward=expr+rot", *args("optim.iterations=3", f"out_dir={d / 'straight'}"), cwd=d)
    assert res_straight.returncode == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(d / "straight" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    def logged_steps(run):  # the steps of the expr reward's CSV log
        rows = (run / "logs" / "gdpo" / "scalars" / "reward" / "expr" / "mean.csv").read_text().split()
        return [int(r.split(",")[0]) for r in rows]

    assert logged_steps(out) == [1, 2, 3]  # the resumed part logs after the first part, in the same files
    # a run moved (or copied) elsewhere resumes there and logs there, not into the folder it was first written to
    moved = d / "moved"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns(".lock"))
    res_moved = run_entry("gdpo.py", "reward=expr+rot", *args("optim.iterations=4", f"out_dir={moved}", "resume=true"), cwd=d)
    assert res_moved.returncode == 0 and "resumed at iteration 3" in res_moved.stdout
    assert logged_steps(moved) == [1, 2, 3, 4] and logged_steps(out) == [1, 2, 3]
    # resuming with another config is refused clearly
    res3 = run_entry("gdpo.py", "reward=expr", *args("optim.iterations=3", f"out_dir={out}", "resume=true"), cwd=d)
    assert res3.returncode != 0 and "another config" in (res3.stderr + res3.stdout)


def test_grpo_runs_the_same(tiny_pipeline, run_entry, first_run):
    """GRPO on all six groups plus the jaw scored on the speaking frames (speaking tokens on its advantage)."""
    d, args = tiny_pipeline.root, tiny_pipeline.gdpo_args
    res = run_entry("gdpo.py", "algo=grpo", "reward=all+jaw@speaking", "algo.objective_tokens=matched",
                    *args("optim.iterations=1", f"out_dir={d / 'grpo'}"), cwd=d)
    assert res.returncode == 0 and (d / "grpo" / "meta.json").is_file()
    assert "jaw@speaking/vel_std_dev" in res.stdout and "eyepose/vel_std_dev" in res.stdout  # the before/after table
    scalars = d / "grpo" / "logs" / "grpo" / "scalars"
    assert (scalars / "reward" / "jaw@speaking" / "mean.csv").is_file() and (scalars / "loss" / "loss_objective_speaking.csv").is_file()


def test_running_std_scope_resumes_exactly(tiny_pipeline, run_entry, first_run):
    """algo.std_scope=running: the running reward spread is saved with the run, so 1 iteration + resume to 2
    equals 2 straight (without it the resumed iteration would divide by its own batch's spread)."""
    d, args = tiny_pipeline.root, tiny_pipeline.gdpo_args
    run = ("reward=expr+rot", "algo.std_scope=running", "algo.std_momentum=0.5")
    out, straight = d / "running", d / "running_straight"
    assert run_entry("gdpo.py", *run, *args("optim.iterations=1", f"out_dir={out}"), cwd=d).returncode == 0
    res = run_entry("gdpo.py", *run, *args("optim.iterations=2", f"out_dir={out}", "resume=true"), cwd=d)
    assert res.returncode == 0 and "resumed at iteration 1" in res.stdout
    assert run_entry("gdpo.py", *run, *args("optim.iterations=2", f"out_dir={straight}"), cwd=d).returncode == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(straight / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    logged = [(r / "logs" / "gdpo" / "scalars" / "adv" / "running_std" / "expr.csv").read_text().split() for r in (out, straight)]
    assert logged[0] == logged[1] and len(logged[0]) == 2


def test_condition_dropout_in_rl_runs(tiny_pipeline, run_entry, first_run):
    """env.cond_drop: the real entry point trains with some prompts' conditions nulled (the CFG branch)."""
    d, args = tiny_pipeline.root, tiny_pipeline.gdpo_args
    res = run_entry("gdpo.py", "reward=expr+rot", "env.cond_drop=0.5", "env.drop_keys=[text,motion]",
                    *args("optim.iterations=2", f"out_dir={d / 'cond_drop'}"), cwd=d)
    assert res.returncode == 0 and (d / "cond_drop" / "model.safetensors").is_file()


def test_mixed_sde_window_in_rl_runs(tiny_pipeline, run_entry, first_run):
    """env.sde_window: the real entry point samples the SDE on the first denoising step only and trains on it."""
    d, args = tiny_pipeline.root, tiny_pipeline.gdpo_args
    res = run_entry("gdpo.py", "reward=expr+rot", "env.sde_window=[0,1]",
                    *args("optim.iterations=2", f"out_dir={d / 'sde_window'}"), cwd=d)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "x 50 transitions, SDE on step 0 of 2 (25 trained)" in res.stdout
    assert (d / "sde_window" / "model.safetensors").is_file()
    res = run_entry("gdpo.py", "reward=expr+rot+jaw@speaking", "algo.objective_tokens=matched", "env.sde_window=[0,1]",
                    "algo.kl_steps=all", "algo.group_kl={jaw:0.5}",
                    *args("optim.iterations=1", f"out_dir={d / 'sde_window_kl'}"), cwd=d)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SDE on step 0 of 2 (25 trained, KL on all 50)" in res.stdout
    scalars = d / "sde_window_kl" / "logs" / "gdpo" / "scalars"
    assert (scalars / "loss" / "loss_objective_speaking.csv").is_file()  # the speaking tokens trained on their own columns
    assert (scalars / "loss" / "loss_kl_jaw.csv").is_file() and (scalars / "policy" / "kl_jaw.csv").is_file()  # algo.group_kl


def test_listening_parts_rl_run_trains_them_alone(tiny_pipeline, run_entry, first_run):
    """algo.listen_adapter and algo.listen_lora (here from preset=listening_lora, its rank overridden on the command
    line): the real entry point adds the listening adapter and the listening low-rank updates, trains them alone (every
    other weight is the supervised checkpoint's to the bit), saves them, and the evaluation at the end samples with them."""
    from gdpo_listener.agents.arflow import load_arflow

    d, args = tiny_pipeline.root, tiny_pipeline.gdpo_args
    res = run_entry("gdpo.py", "reward=expr+rot", "preset=listening_lora", "env.sde_window=[0,1]", "algo.kl_steps=all",
                    "algo.listen_adapter=8", "algo.listen_lora=4",
                    *args("optim.iterations=2", f"out_dir={d / 'adapter'}"), cwd=d)
    assert res.returncode == 0, res.stderr[-2000:]
    rl, _ = load_arflow(d / "adapter")
    sft, _ = load_arflow(d / "sft")
    assert rl.cfg.listen_adapter == 8 and sft.listen_adapter is None
    assert rl.cfg.listen_lora == 4 and rl.cfg.lora_scope == "listening_context" and sft.listen_lora is None
    for n, p in sft.state_dict().items():
        assert torch.equal(p, rl.state_dict()[n]), n
    assert rl.listen_adapter.proj.weight.abs().sum() > 0  # trained away from its zero start
    assert all(blk.qkv.up.weight.abs().sum() > 0 for blk in rl.listen_lora.blocks)
    for bad in ("algo.listen_adapter=-2", "algo.listen_lora=-2", "algo.lora_scope=all"):
        res = run_entry("gdpo.py", "reward=expr+rot", bad, *args(f"out_dir={d / 'adapter_bad'}"), cwd=d)
        assert res.returncode != 0 and bad in (res.stderr + res.stdout)


def test_hold_column_rl_run(tiny_pipeline, run_entry, first_run):
    """reward=...+jaw@hold: the real entry point draws the supervised model's rollouts, trains on the hold column,
    logs it and reports it against the supervised sample."""
    d, args = tiny_pipeline.root, tiny_pipeline.gdpo_args
    res = run_entry("gdpo.py", "reward=expr+jaw@hold", *args("optim.iterations=1", f"out_dir={d / 'hold'}"), cwd=d)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "(expr, jaw@hold)" in res.stdout and "jaw@hold/reward" in res.stdout  # the before/after table
    assert (d / "hold" / "logs" / "gdpo" / "scalars" / "reward" / "jaw@hold" / "mean.csv").is_file()


def test_bad_config_fails_early(tiny_pipeline, run_entry):
    """The real entry point stops on a bad config before the pipeline runs (every case: tests/test_reliability.py)."""
    d = tiny_pipeline.root
    override, msg = "reward=expr+nose", "unknown"
    res = run_entry("gdpo.py", override, *tiny_pipeline.gdpo_args(), f"out_dir={d / 'bad'}", cwd=d)
    assert res.returncode != 0 and msg in (res.stderr + res.stdout).lower()
    assert "[pipeline] running" not in res.stdout


def test_gdpo_long_episodes_by_sliding_windows(tiny_pipeline, run_entry, first_run):
    """env.episode_tokens > 25: 400-frame episodes generated by two sliding windows, replayed window by window."""
    d, args = tiny_pipeline.root, tiny_pipeline.gdpo_args
    res = run_entry("gdpo.py", "reward=expr+rot", *args("optim.iterations=1", "env.episode_tokens=50", f"out_dir={d / 'long'}"), cwd=d)
    assert res.returncode == 0 and "x 100 transitions" in res.stdout and (d / "long" / "meta.json").is_file()
    res = run_entry("gdpo.py", "reward=expr", *args("optim.iterations=1", "env.episode_tokens=80", f"out_dir={d / 'long2'}"), cwd=d)
    assert res.returncode != 0 and "env.episode_tokens=80" in (res.stderr + res.stdout)


def test_long_generation_check_runs(tiny_pipeline, run_entry, first_run):
    d = tiny_pipeline.root
    res = run_entry("long_generation.py", f"checkpoint={d / 'sft'}", f"long_data.root={d / 'long_data'}", "long_data.n_conversations=1",
                    "long_data.seconds=24", "frames=600", "segment_seconds=2", "steps=2", f"features.cache_dir={d / 'cache'}",
                    f"out={d / 'long.json'}", cwd=d)
    assert res.returncode == 0
    assert "gen/gt decay" in res.stdout and (d / "long.json").is_file()
    rep = json.loads((d / "long.json").read_text())
    assert rep["sequences"] == 2 and rep["frames"] == 600 and set(rep["groups"]) >= {"expr", "rot"}


def _write_wav(path: Path, seconds: float, sr: int) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 0.5 * t) > 0)).astype(np.float32), sr)
    return path


def test_generate_cli_long_clip_and_bad_inputs(tiny_pipeline, run_entry, first_run):
    d = tiny_pipeline.root
    actor = _write_wav(d / "actor.wav", 20.0, 16000)
    partner = _write_wav(d / "partner_22k.wav", 20.0, 22050)  # resampled to 16 kHz
    np.savez(d / "partner_motion.npz", motion=np.random.default_rng(0).normal(0, 0.05, (500, 67)).astype(np.float32))
    base = [f"checkpoint={d / 'sft'}", f"actor_wav={actor}", f"partner_wav={partner}", "steps=2", "seconds=18"]
    res = run_entry("generate.py", *base, f"partner_motion={d / 'partner_motion.npz'}", "text=nodding", "w_listen=2",
                    f"out={d / 'gen' / 'clip'}", cwd=d)
    assert res.returncode == 0
    with np.load(d / "gen" / "clip.npz") as z:
        motion, vad = z["motion"], z["vad"]
    assert motion.shape == (450, 67) and np.isfinite(motion).all() and vad.shape == (450,)  # 18 s -> exactly 450 frames
    assert (d / "gen" / "clip.png").is_file()
    np.savez(d / "short_motion.npz", motion=np.zeros((300, 67), np.float32))  # 12 s of partner motion for 18 s of audio
    # bad inputs through the CLI (weights out of range and too long a clip: tests/test_generate.py, in-process)
    res = run_entry("generate.py", *base, f"partner_motion={d / 'short_motion.npz'}", f"out={d / 'gen' / 'bad'}", cwd=d)
    assert res.returncode != 0 and "short_motion.npz" in (res.stderr + res.stdout), res.stderr[-500:]
    assert not list((d / "gen").glob("bad*"))
    res = run_entry("generate.py", f"checkpoint={d / 'sft'}", f"actor_wav={d / 'missing.wav'}", cwd=d)
    assert res.returncode != 0 and "missing.wav" in res.stderr


def test_pretrained_checkpoint_mismatch_is_refused(tiny_pipeline, run_entry, first_run):
    """A VAE whose latent size differs from the supervised AR-Flow's, or an SFT checkpoint of another preset."""
    d, args = tiny_pipeline.root, tiny_pipeline.gdpo_args
    res = run_entry("vae.py", f"data.root={d / 'data'}", f"out_dir={d / 'vae4'}", "optim.steps=2", "optim.batch_size=8",
                    "+model.d_model=32", "+model.n_layers=1", "+model.n_heads=2", "+model.d_latent=4", cwd=d)
    assert res.returncode == 0
    res = run_entry("gdpo.py", *args("optim.iterations=1", f"out_dir={d / 'mismatch'}", f"pretrained.vae={d / 'vae4'}"), cwd=d)
    assert res.returncode != 0 and "d_latent=8 but the pipeline needs d_latent=4" in res.stderr
    res = run_entry("gdpo.py", *args("optim.iterations=1", f"out_dir={d / 'mismatch'}", "model=paper"), cwd=d)
    assert res.returncode != 0 and "preset 'small'" in res.stderr and "model=paper" in res.stderr


def test_sft_resume_continues_exactly_and_refuses_another_config(tiny_pipeline, run_entry, first_run):
    """2 steps + resume to 4 gives the same weights as 4 steps straight (optimiser, schedule and RNG restored)."""
    d = tiny_pipeline.root
    tiny = ["optim.batch_size=8", "+model.arch.d_model=32", "+model.arch.n_layers=1", "+model.arch.n_heads=2",
            "eval.n_windows=4", f"data.root={d / 'data'}", f"vae_dir={d / 'vae'}", f"features.cache_dir={d / 'cache'}"]
    assert run_entry("sft.py", *tiny, "optim.steps=4", f"out_dir={d / 'sft_a'}", cwd=d).returncode == 0
    assert run_entry("sft.py", *tiny, "optim.steps=2", f"out_dir={d / 'sft_b'}", cwd=d).returncode == 0
    res = run_entry("sft.py", *tiny, "optim.steps=4", f"out_dir={d / 'sft_b'}", "resume=true", cwd=d)
    assert res.returncode == 0 and "resumed from step 2" in res.stdout
    a, b = load_file(str(d / "sft_a" / "model.safetensors")), load_file(str(d / "sft_b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    res = run_entry("sft.py", *tiny, "optim.steps=6", f"out_dir={d / 'sft_b'}", "resume=true", "seed=1", cwd=d)
    assert res.returncode != 0 and "another config" in res.stderr and "seed" in res.stderr
    no_vae = [a for a in tiny if not a.startswith("vae_dir=")] + [f"vae_dir={d / 'no_vae'}"]
    res = run_entry("sft.py", *no_vae, "optim.steps=2", f"out_dir={d / 'sft_c'}", cwd=d)  # the VAE stage was skipped
    assert res.returncode != 0 and "no VAE checkpoint" in res.stderr and "python train/vae.py" in res.stderr
    assert not (d / "sft_c").exists()  # refused before a run folder is claimed


def test_bench_precision_compares_every_metric_with_fp32(tiny_pipeline, run_entry, first_run):
    """train/bench_precision.py: evaluate at fp32 and each precision (same windows and noise), verdict per precision."""
    d = tiny_pipeline.root
    res = run_entry("bench_precision.py", f"checkpoint={d / 'sft'}", f"data.root={tiny_pipeline.data}", "steps=2",
                    "threads=1", "precisions=[bf16,int8]", f"out_dir={d / 'prec'}", cwd=d)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((d / "prec" / "report.json").read_text())
    assert set(report["precisions"]) == {"bf16", "int8"}
    for p, r in report["precisions"].items():
        assert r["n_metrics"] > 20 and r["ok"] == (not r["over_limit"]) and f"{p}: {r['n_metrics']} metrics" in res.stdout
    assert json.loads((d / "prec" / "bf16" / "metrics.json").read_text())["precision"] == "bf16"
    res = run_entry("bench_precision.py", f"checkpoint={d / 'sft'}", "precisions=[fp32]", cwd=d)
    assert res.returncode != 0 and "precisions=['fp32']" in res.stderr
