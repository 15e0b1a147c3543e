"""Smoke tests of the real entry points with tiny overrides: data -> VAE -> SFT -> GDPO/GRPO, resume."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def hydra_list(*items: str) -> str:
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


TINY_VAE = hydra_list("optim.steps=4", "optim.batch_size=8", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_latent=8")
TINY_SFT = hydra_list("optim.steps=4", "optim.batch_size=8", "+model.arch.d_model=32", "+model.arch.n_layers=1",
                      "+model.arch.n_heads=2", "eval.n_windows=4")


def run(script: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train" / script), *overrides]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-4000:])
    return res


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    res = run("prepare_data.py", "source=synthetic", f"out={d / 'data'}", "synthetic.n_conversations=3",
              "synthetic.seconds=16", "test_fraction=0.34", cwd=d)
    assert res.returncode == 0
    return d


def gdpo_args(d: Path, *extra: str) -> list[str]:
    return [f"data.root={d / 'data'}", "data.auto_prepare=false", f"pretrained.vae={d / 'vae'}", f"pretrained.sft={d / 'sft'}",
            f"pretrained.vae_overrides={TINY_VAE}", f"pretrained.sft_overrides={TINY_SFT}", f"features.cache_dir={d / 'cache'}",
            "env.n_prompts=1", "env.group_size=2", "env.sde_steps=2", "eval.n_windows=4", "ckpt_every=1", *extra]


@pytest.fixture(scope="module")
def first_run(workdir):
    """The main job with tiny overrides on a folder without VAE or SFT checkpoints."""
    res = run("gdpo.py", "reward=expr+rot", *gdpo_args(workdir, "optim.iterations=2", f"out_dir={workdir / 'gdpo'}"), cwd=workdir)
    assert res.returncode == 0
    return res


def test_gdpo_main_job_trains_prerequisites_then_resumes(workdir, first_run):
    d, res = workdir, first_run
    out = d / "gdpo"
    assert (d / "vae" / "meta.json").is_file() and (d / "sft" / "meta.json").is_file() and (out / "meta.json").is_file()
    assert "supervised" in res.stdout and "expr/vel_std_dev" in res.stdout  # the before/after table
    logs = list((out / "logs").rglob("*.csv"))
    names = {p.stem for p in logs}
    assert {"mean", "loss_objective", "loss_kl", "clip_fraction"} <= names, names
    # a second run reuses the cached stages and continues the killed run from its last checkpoint
    res2 = run("gdpo.py", "reward=expr+rot", *gdpo_args(d, "optim.iterations=3", f"out_dir={out}", "resume=true"), cwd=d)
    assert res2.returncode == 0
    assert "resumed at iteration 2" in res2.stdout and "[pipeline] running" not in res2.stdout
    # resuming with another config is refused clearly
    res3 = run("gdpo.py", "reward=expr", *gdpo_args(d, "optim.iterations=3", f"out_dir={out}", "resume=true"), cwd=d)
    assert res3.returncode != 0 and "another config" in (res3.stderr + res3.stdout)


def test_grpo_runs_the_same(workdir, first_run):
    d = workdir
    res = run("gdpo.py", "algo=grpo", "reward=all", *gdpo_args(d, "optim.iterations=1", f"out_dir={d / 'grpo'}"), cwd=d)
    assert res.returncode == 0 and (d / "grpo" / "meta.json").is_file()


@pytest.mark.parametrize("override,msg", [
    ("reward=expr+nose", "unknown"),
    ("env.group_size=1", "group_size"),
    ("+rewards.lambdas.expr=-1", "lambda"),
])
def test_bad_config_fails_early(workdir, override, msg):
    res = run("gdpo.py", override, *[a for a in gdpo_args(workdir) if not a.startswith("env.group_size")],
              f"out_dir={workdir / 'bad'}", cwd=workdir)
    assert res.returncode != 0 and msg in (res.stderr + res.stdout).lower()
    assert "[pipeline] running" not in res.stdout
