"""train/prepare_data.py: synthetic smoke run, source dispatch and clear errors before any work."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
from entry_runner import load_script  # tests/ is on sys.path (the rootdir conftest)
from omegaconf import OmegaConf

from gdpo_listener.envs.dataset import DyadicWindows, load_dataset_meta

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(run_entry):
    """``run([overrides], cwd)``: train/prepare_data.py with Hydra's short error messages."""
    return lambda args, cwd: run_entry("prepare_data.py", *args, cwd=cwd, timeout=300, env=dict(os.environ, HYDRA_FULL_ERROR="0"))


@pytest.mark.slow
def test_synthetic_smoke(tmp_path, run):
    res = run(["source=synthetic", "out=ds", "synthetic.n_conversations=2", "synthetic.seconds=16", "seed=3"], tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "ds"  # relative to the launch folder
    meta = load_dataset_meta(out)
    assert meta["source"] == "synthetic" and meta["summary"]["conversations"] == 2
    assert meta["synthetic"]["seed"] == 3
    assert meta["synthetic"]["corpus_version"] == 2  # the default corpus
    for role in ("speaking", "listening"):
        png = out / f"preview_{role}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    ds = DyadicWindows(out, "train", load_audio=False)
    assert len(ds) == 2 * 2  # one train conversation, two windows, two roles
    for word in ("hours", "speaking share", "listening share", "rot=", "time:", "synthetic corpus version: 2",
                 "window texts: full="):
        assert word in res.stdout, word
    # corpus vs real reference, side by side: one row per (figure, group) with both numbers
    assert "corpus vs reference" in res.stdout and "DualTalk" in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("| velocity std, listening frames | expr |")]
    assert len(rows) == 1 and "| 0.092 |" in rows[0], rows
    # no Hydra clutter in the launch folder, no temporary dataset folders left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.slow
def test_unknown_source_fails_before_any_work(tmp_path, run):
    res = run(["source=dualtlak", "out=ds"], tmp_path)
    assert res.returncode != 0
    assert "unknown source 'dualtlak'" in res.stderr
    assert "synthetic, dualtalk, seamless" in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_missing_input_and_out_are_clear_errors(tmp_path, run):
    res = run(["source=seamless", "out=ds"], tmp_path)
    assert res.returncode != 0 and "needs input=DIR" in res.stderr
    res = run(["source=dualtalk", "input=nowhere", "out=ds"], tmp_path)
    assert res.returncode != 0 and "does not exist" in res.stderr
    res = run(["source=synthetic"], tmp_path)
    assert res.returncode != 0 and "out=DIR is required" in res.stderr
    assert list(tmp_path.iterdir()) == []
    # a non-empty folder that is not a dataset is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    res = run(["source=synthetic", "out=mine"], tmp_path)
    assert res.returncode != 0 and "not a canonical dataset" in res.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("source", ["dualtalk", "seamless"])
def test_real_sources_dispatch_to_converters(source, tmp_path, monkeypatch):
    mod = load_script("prepare_data")
    calls = []

    def fake(input_dir, out_dir, **opts):
        calls.append((Path(input_dir), Path(out_dir), opts))
        return {"conversations": 0}

    fake_mod = types.ModuleType(f"gdpo_listener.envs.converters.{source}")
    setattr(fake_mod, f"convert_{source}", fake)
    monkeypatch.setitem(sys.modules, f"gdpo_listener.envs.converters.{source}", fake_mod)
    cfg = OmegaConf.load(REPO / "train" / "conf" / "prepare_data.yaml")
    cfg.source, cfg.input, cfg.out, cfg.test_fraction = source, str(tmp_path), str(tmp_path / "out"), 0.2
    cfg[source].vad = "energy"
    summary = mod.build(cfg, source, tmp_path / "out", tmp_path)
    assert summary == {"conversations": 0}
    assert calls == [(tmp_path, tmp_path / "out", {"vad": "energy", "test_fraction": 0.2})]


def test_synthetic_version_1_stays_reachable(tmp_path, capsys):
    mod = load_script("prepare_data")
    cfg = OmegaConf.load(REPO / "train" / "conf" / "prepare_data.yaml")
    assert cfg.synthetic.version == 2
    cfg.synthetic.n_conversations, cfg.synthetic.seconds, cfg.synthetic.workers = 2, 8, 1
    cfg.synthetic.version = 1
    summary = mod.build(cfg, "synthetic", tmp_path / "v1", None)
    assert summary["corpus_version"] == 1 and load_dataset_meta(tmp_path / "v1")["synthetic"]["corpus_version"] == 1
    mod.print_reference_comparison(tmp_path / "v1")
    out = capsys.readouterr().out
    assert "| velocity std, speaking frames | jaw |" in out and "| NO |" in out  # version 1 is off the reference


def test_preview_windows_are_the_most_speaking_and_listening(tmp_path):
    from gdpo_listener.envs.synthetic import generate_corpus

    generate_corpus(tmp_path / "ds", n_conversations=3, seconds=16.0, seed=1, progress=False)
    ds = DyadicWindows(tmp_path / "ds", "train", load_audio=False)
    chosen = load_script("prepare_data").choose_preview_windows(ds)
    sp = [int(ds[i]["speaking"].sum()) for i in range(len(ds))]
    li = [int(ds[i]["listening"].sum()) for i in range(len(ds))]
    assert sp[chosen["speaking"]] == max(sp) and li[chosen["listening"]] == max(li)
    assert max(sp) > 100 and max(li) > 100  # each preview is dominated by its role
