"""train/bench_rl.py and train/bench_arflow.py are Hydra entry points (overrides, documented configs) with
tiny settings: they run, print their tables, and refuse bad settings by name."""
from __future__ import annotations

import os

import pytest

from gdpo_listener.pipeline.threads import OMP_WAIT_VARS

pytestmark = pytest.mark.slow


@pytest.fixture
def run(run_entry):
    """``run(script, *overrides, cwd=DIR)`` on one thread, without OpenMP wait variables (the scripts set them)."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_WAIT_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return lambda script, *overrides, cwd: run_entry(script, *overrides, cwd=cwd, env=env)


HW = ["stream_mb=8", "gemm_size=256", "hw_repeats=1"]  # a quick machine measurement (bandwidth, GEMM peak)


def test_bench_arflow_hydra_overrides(tmp_path, run):
    res = run("bench_arflow.py", "presets=[small]", "batch=[1]", "steps=1", "threads=1", "sft_batch=2", "sft_steps=1",
              "min_speedup=0", *HW, cwd=tmp_path)
    assert res.returncode == 0
    assert "reached" in res.stdout and "of the GEMM peak" in res.stdout  # each figure beside its physical bound
    assert "OpenMP wait GOMP_SPINCOUNT=10000" in res.stdout  # set before torch was imported
    assert "small  bf16" in res.stdout and "latent error vs fp32" in res.stdout  # one stream per precision
    assert "small" in res.stdout and "windows/s" in res.stdout and "paper preset" not in res.stdout
    res = run("bench_arflow.py", "w_speak=1", "w_listen=1", cwd=tmp_path)
    assert res.returncode != 0 and "CFG is off" in res.stderr
    assert not list(tmp_path.glob("*.log"))  # no Hydra log files in the launch folder


def test_bench_rl_hydra_overrides_throughput_and_memory(tmp_path, run):
    tiny = ["presets=[small]", "n_prompts=1", "group_size=2", "sde_steps=1", "threads=1", *HW]
    res = run("bench_rl.py", *tiny[:3], "sde_steps=2", *tiny[4:], "sde_window=[0,1]", "uncached_tokens=1",
              "listen_lora={rank:4,scope:listening_context}", cwd=tmp_path)
    assert res.returncode == 0
    lora = [ln for ln in res.stdout.splitlines() if "algo.listen_lora=4 algo.lora_scope=listening_context vs" in ln]
    assert len(lora) == 1 and "vs the whole model (best of 3" in lora[0] and "x the checkpoint reference's" in lora[0]
    assert "replay/update with env.sde_window=[0,1], algo.kl_steps=sde (1 of 2 steps replayed)" in res.stdout  # beside the full update
    assert "replay/update with env.sde_window=[0,1], algo.kl_steps=all (2 of 2 steps replayed)" in res.stdout
    mixed = [ln for ln in res.stdout.splitlines() if "steps replayed)" in ln]
    assert len(mixed) == 2 and all("| bound >= " in ln for ln in mixed)
    assert "bounds:" in res.stdout
    assert "kv-cache" in res.stdout and "recompute" in res.stdout and "replay/update" in res.stdout
    kl = [float(line.split("equal weights ")[1].split()[0]) for line in res.stdout.splitlines() if "equal weights" in line]
    assert "reference fp32 (fp32)" in res.stdout and "reference bf16 (bf16)" in res.stdout
    assert len(kl) == 2 and kl[0] == 0.0 and kl[1] > 0.0  # a fresh fp32 copy scores no KL; bf16 rounding a little
    # memory=true: one child process per episode length, started with Hydra overrides
    res = run("bench_rl.py", *tiny, "memory=true", "memory_tokens=[25,50]", cwd=tmp_path)
    assert res.returncode == 0
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("small ") and "ratio" not in line]
    assert [int(r[1]) for r in rows] == [25, 50] and [int(r[2]) for r in rows] == [1, 3]  # tokens, sliding windows
    assert "update memory ratio 50 / 25 tokens" in res.stdout
    res = run("bench_rl.py", "presets=[big]", cwd=tmp_path)
    assert res.returncode != 0 and "presets=['big']" in res.stderr
    res = run("bench_rl.py", *tiny, "sde_window=[0,2]", cwd=tmp_path)  # 2 steps of a 1-step SDE
    assert res.returncode != 0 and "sde_window" in res.stderr
    res = run("bench_rl.py", *tiny, "listen_lora={rank:4,scope:context}", cwd=tmp_path)
    assert res.returncode != 0 and "listen_lora=" in res.stderr


def test_bench_generate_rtf_times_generate_end_to_end(tmp_path):
    """--rtf: generate.py run as a user runs it for 4 s and 20 s; the RTF line names preset, precision and the target."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "train" / "bench_generate_memory.py"
    res = subprocess.run([sys.executable, str(script), "--rtf", "small", "--steps", "1", "--precisions", "fp32",
                          "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["preset"] == "small" and row["precision"] == "fp32" and row["wall_20s"] > 0 and row["target"] == 0.3
    assert (tmp_path / "rtf_small_fp32_20s.npz").is_file()
