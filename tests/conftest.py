"""Shared fixtures: running the real entry points, and a tiny trained pipeline (data, VAE, SFT) built once.

Tests that start entry-point subprocesses are marked ``slow`` (``pytest -m "not slow"`` skips them
for a quick inner loop; the README's test command runs everything).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def hydra_list(*items: str) -> str:
    """A Hydra list override value: ``['a=1','b=2']``."""
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


TINY_VAE = hydra_list("optim.steps=4", "optim.batch_size=8", "+model.d_model=32", "+model.n_layers=1", "+model.n_heads=2",
                      "+model.d_latent=8")
TINY_SFT = hydra_list("optim.steps=4", "optim.batch_size=8", "+model.arch.d_model=32", "+model.arch.n_layers=1",
                      "+model.arch.n_heads=2", "eval.n_windows=4")


def _run(script: str, *overrides: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train" / script), *overrides]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-4000:])
    return res


@pytest.fixture(scope="session")
def run_entry():
    """``run_entry(script, *overrides, cwd=DIR)``: run ``train/<script>`` in a subprocess, output captured."""
    return _run


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A 3-conversation synthetic corpus with a tiny VAE and a tiny supervised AR-Flow trained on it.

    ``gdpo_args(*extra)`` gives the overrides that point ``train/gdpo.py`` (or evaluate/bench) at them.
    """
    d = tmp_path_factory.mktemp("tiny_pipeline")
    res = _run("prepare_data.py", "source=synthetic", f"out={d / 'data'}", "synthetic.n_conversations=3",
               "synthetic.seconds=16", "test_fraction=0.34", cwd=d)
    assert res.returncode == 0, res.stderr[-2000:]

    def gdpo_args(*extra: str) -> list[str]:
        return [f"data.root={d / 'data'}", "data.auto_prepare=false", f"pretrained.vae={d / 'vae'}", f"pretrained.sft={d / 'sft'}",
                f"pretrained.vae_overrides={TINY_VAE}", f"pretrained.sft_overrides={TINY_SFT}", f"features.cache_dir={d / 'cache'}",
                "env.n_prompts=1", "env.group_size=2", "env.sde_steps=2", "eval.n_windows=4", "ckpt_every=1", *extra]

    return SimpleNamespace(root=d, data=d / "data", vae=d / "vae", sft=d / "sft", cache=d / "cache", gdpo_args=gdpo_args,
                           tiny_vae=TINY_VAE, tiny_sft=TINY_SFT)
