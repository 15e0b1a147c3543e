"""Nothing lost, nothing silent (issue 15): run folders, locks, resumed logs, divergence, range checks."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from entry_runner import load_script  # tests/ is on sys.path (the rootdir conftest)
from omegaconf import OmegaConf

from gdpo_listener.agents.guards import DivergenceError, check_finite_step, check_finite_weights
from gdpo_listener.pipeline.checks import check_count, check_positive
from gdpo_listener.pipeline.run_dir import RunDirError, RunLock, claim_run_dir, host_label, run_host, truncate_logs
from gdpo_listener.pipeline.run_state import load_run_state, save_run_state


def cfg_of(**kw):
    return OmegaConf.create({"seed": 0, "optim": {"lr": 1e-3, "iterations": 60}, "out_dir": "x", "device": "cpu", **kw})


# ----------------------------------------------------------------------------------------------
# run folders


def test_a_run_records_the_host_it_trained_on_beside_its_settings(tmp_path):
    out = tmp_path / "run"
    folder, lock = claim_run_dir(out, cfg_of(), stage="gdpo")
    lock.release()
    host = run_host(folder)
    assert host["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and host["torch"] == torch.__version__
    assert host["gpu"] is None and host["cpu"] and host["threads"] == torch.get_num_threads()
    n = host["threads"]
    assert host_label(host) == f"{host['cpu']} ({host['cpu_capability']}), {n} thread{'s' if n != 1 else ''}, torch {torch.__version__}"
    # not a setting: another host's record of the same settings is the same run, and the folder is reused
    doc = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**doc, "host": {**host, "cpu_capability": "AVX2"}}))
    (folder / "model.safetensors").write_bytes(b"w")
    again, lock = claim_run_dir(out, cfg_of(), stage="gdpo")
    lock.release()
    assert again == folder and run_host(folder) == host  # rewritten by the rerun on this host
    assert host_label(None) == "unrecorded" and run_host(tmp_path / "nothing") is None
    assert host_label({"gpu": "NVIDIA A100", "torch": "2.13.0"}) == "NVIDIA A100, torch 2.13.0"


def test_a_run_with_other_settings_gets_its_own_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "gdpo_small_expr+rot"
    first, lock = claim_run_dir(out, cfg_of(), stage="gdpo")
    assert first == out
    (out / "model.safetensors").write_bytes(b"the real run")
    lock.release()
    quick, lock2 = claim_run_dir(out, cfg_of(optim={"lr": 1e-3, "iterations": 2}), stage="gdpo")
    assert quick == out.with_name(out.name + "-2")
    assert "optim.iterations" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == b"the real run"  # the real run is untouched
    lock2.release()
    # the same settings again (device and out_dir do not count) reuse the matching folder and start fresh logs
    (out / "logs").mkdir()
    (out / "logs" / "old.csv").write_text("1,0.5\n")
    again, lock3 = claim_run_dir(out, cfg_of(device="cuda"), stage="gdpo")
    assert again == out and not (out / "logs").exists()
    lock3.release()


def test_a_folder_that_is_not_a_run_is_never_written_into(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "a.jpg").write_bytes(b"user data")
    folder, lock = claim_run_dir(out, cfg_of(), stage="vae")
    assert folder != out and (out / "a.jpg").read_bytes() == b"user data" and sorted(p.name for p in out.iterdir()) == ["a.jpg"]
    lock.release()


def test_a_busy_folder_is_refused_and_a_killed_runs_lock_is_not_stuck(tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out)
    with pytest.raises(RunDirError, match="in use by another run"):
        claim_run_dir(out, cfg_of(), stage="gdpo", resume=True)
    lock.release()
    # a process that dies holding the lock releases it (flock belongs to the open file)
    code = f"from gdpo_listener.pipeline.run_dir import RunLock; RunLock(__import__('pathlib').Path({str(out)!r})); import os; os._exit(9)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    folder, lock = claim_run_dir(out, cfg_of(), stage="gdpo", resume=True)
    assert folder == out
    lock.release()


def test_resumed_logs_drop_the_steps_after_the_saved_state(tmp_path):
    f = tmp_path / "logs" / "gdpo" / "scalars" / "reward" / "expr" / "mean.csv"
    f.parent.mkdir(parents=True)
    f.write_text("1,0.1\n2,0.2\n3,0.3\n4,0.4\n")
    truncate_logs(tmp_path / "logs", 2)
    assert f.read_text() == "1,0.1\n2,0.2\n"


def test_a_truncated_training_state_is_named(tmp_path):
    cfg = cfg_of()
    path = tmp_path / "last" / "state.pt"
    model = torch.nn.Linear(2, 2)
    save_run_state(path, cfg, ["optim"], 3, torch.Generator(), states={"model": model})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="state.pt cannot be read"):
        load_run_state(path, cfg, ["optim"], "cpu", states={"model": model})


def test_a_state_saved_before_a_setting_existed_resumes_with_its_no_op_value(tmp_path):
    """``added``: a saved section without a later setting compares as if it had the no-op value; any other
    value of that setting is another config."""
    path = tmp_path / "last" / "state.pt"
    old = OmegaConf.create({"algo": {"beta": 0.01}})
    save_run_state(path, old, ["algo"], 3, torch.Generator())
    added = {"algo": {"sft_coef": 0.0}}
    assert load_run_state(path, OmegaConf.create({"algo": {"beta": 0.01, "sft_coef": 0.0}}), ["algo"], "cpu", added=added)["step"] == 3
    with pytest.raises(ValueError, match="another config"):
        load_run_state(path, OmegaConf.create({"algo": {"beta": 0.01, "sft_coef": 0.5}}), ["algo"], "cpu", added=added)
    with pytest.raises(ValueError, match="another config"):  # without ``added`` the new setting is a difference
        load_run_state(path, OmegaConf.create({"algo": {"beta": 0.01, "sft_coef": 0.0}}), ["algo"], "cpu")


def test_a_gdpo_state_saved_before_env_sde_window_resumes_under_the_default(tmp_path, compose_config):
    """train/gdpo.py's ADDED_SETTINGS: a GDPO state whose env section lacks sde_window (written before the
    setting existed) resumes under today's default config, and not with a window set."""
    gdpo = load_script("gdpo")
    now = compose_config("gdpo")
    old = OmegaConf.to_container(now.env, resolve=True)
    old.pop("sde_window")
    path = tmp_path / "last" / "state.pt"
    save_run_state(path, OmegaConf.create({"env": old}), ["env"], 3, torch.Generator())
    assert load_run_state(path, now, ["env"], "cpu", added=gdpo.ADDED_SETTINGS)["step"] == 3
    with pytest.raises(ValueError, match="another config"):
        load_run_state(path, compose_config("gdpo", ["env.sde_window=[0,2]"]), ["env"], "cpu", added=gdpo.ADDED_SETTINGS)
    algo = OmegaConf.to_container(now.algo, resolve=True)
    algo.pop("kl_steps")  # likewise algo.kl_steps (the KL's steps under a mixed env)
    save_run_state(path, OmegaConf.create({"algo": algo}), ["algo"], 4, torch.Generator())
    assert load_run_state(path, now, ["algo"], "cpu", added=gdpo.ADDED_SETTINGS)["step"] == 4
    with pytest.raises(ValueError, match="another config"):
        load_run_state(path, compose_config("gdpo", ["algo.kl_steps=all"]), ["algo"], "cpu", added=gdpo.ADDED_SETTINGS)


# ----------------------------------------------------------------------------------------------
# divergence and settings


def test_non_finite_step_or_weights_stop_training():
    check_finite_step({"loss": torch.tensor(1.0)}, torch.tensor(2.0), where="step 1", hint="lr")
    with pytest.raises(DivergenceError, match=r"step 7: non-finite loss_kl=nan.*optim.lr=10000"):
        check_finite_step({"loss_objective": torch.tensor(0.2), "loss_kl": torch.tensor(math.nan)}, torch.tensor(1.0),
                          where="step 7", hint="optim.lr=10000 too large")
    with pytest.raises(DivergenceError, match="grad_norm=inf"):
        check_finite_step({"loss": torch.tensor(1.0)}, torch.tensor(math.inf), where="step 1", hint="lr")
    m = torch.nn.Linear(2, 2)
    check_finite_weights(m, where="it 1", hint="lr")
    with torch.no_grad():
        m.bias[0] = math.inf
    with pytest.raises(DivergenceError, match="bias"):
        check_finite_weights(m, where="it 1", hint="lr")


@pytest.mark.parametrize("key,value,msg", [("optim.lr", "abc", "not a number"), ("optim.lr", "inf", "not finite"),
                                           ("optim.lr", 0, "must be > 0"), ("env.sigma", 0.0, "must be > 0")])
def test_settings_out_of_range_are_named(key, value, msg):
    cfg = OmegaConf.create({"optim": {"lr": 1e-3}, "env": {"sigma": 0.5}})
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ValueError, match=f"{key}=.*{msg}"):
        check_positive(cfg, ["optim.lr", "env.sigma"])


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_counts_must_be_positive_integers(value):
    with pytest.raises(ValueError, match="ckpt_every"):
        check_count(OmegaConf.create({"ckpt_every": value}), ["ckpt_every"])


# ----------------------------------------------------------------------------------------------
# the real entry points


BAD_GDPO_SETTINGS = [
    ("env.sigma=0", "env.sigma"), ("optim.lr=inf", "optim.lr"), ("optim.lr=abc", "optim.lr"), ("ckpt_every=0", "ckpt_every"),
    ("algo.sync_every=0", "algo.sync_every"), ("algo.chunk_steps=0", "algo.chunk_steps"), ("optim.iterations=0", "optim.iterations"),
    ("optim.iterations=-3", "optim.iterations"), ("algo.beta_speaking=-1", "algo.beta_speaking"),
    ("algo.ref_precision=fp8", "algo.ref_precision"), ("algo.sft_coef=-1", "algo.sft_coef"),
    ("algo.std_scope=prompt", "algo.std_scope"), ("algo.std_momentum=1", "algo.std_momentum"),
    ("algo.std_momentum=abc", "algo.std_momentum"), ("env.cond_drop=1", "env.cond_drop"),
    ("env.drop_keys=[face]", "env.drop_keys"), ("env.sde_window=[3,1]", "env.sde_window"),
    ("env.sde_window=[0,9]", "env.sde_window"), ("algo.kl_steps=ode", "algo.kl_steps"),
    ("algo.lora_scope=tokens", "algo.lora_scope"), ("env.cond_drop=-0.1", "env.cond_drop"),
    ("env.hold_reference=sde", "env.hold_reference"), ("algo.group_kl={nose:1}", "algo.group_kl"),
    ("algo.group_kl={jaw:-1}", "algo.group_kl.jaw"), ("algo.group_kl={jaw:abc}", "algo.group_kl.jaw"),
    ("algo.group_kl=[jaw]", "algo.group_kl")]


@pytest.mark.parametrize("override,named", BAD_GDPO_SETTINGS)
def test_gdpo_settings_check_names_every_bad_setting(compose_config, override, named):
    """The check train/gdpo.py runs first (before seeding a run folder or data), on its composed config."""
    from gdpo_listener.pipeline.rl import check_settings

    with pytest.raises(ValueError, match=re.escape(named)):
        check_settings(compose_config("gdpo", [override]))


def test_gdpo_default_settings_pass_the_check(compose_config):
    from gdpo_listener.pipeline.rl import check_settings

    check_settings(compose_config("gdpo"))


BAD_CONFIGS = [
    ("reward=expr+nose", "unknown"),
    ("env.group_size=1", "group_size"),
    ("+rewards.lambdas.expr=-1", "lambda"),
    ("reward=expr+jaw@speaking", "objective_tokens"),  # a speaking column needs the objective on every token
]


@pytest.mark.parametrize("override,msg", BAD_CONFIGS)
def test_bad_config_is_named_by_the_early_checks(compose_config, override, msg):
    """What train/gdpo.py checks before any long work (settings, then the reward), on its composed config."""
    from gdpo_listener.pipeline.factories import make_reward
    from gdpo_listener.pipeline.rl import check_settings

    cfg = compose_config("gdpo", [override])
    with pytest.raises(ValueError) as err:
        check_settings(cfg)
        make_reward(cfg)
    assert msg in str(err.value).lower()


@pytest.mark.slow
@pytest.mark.parametrize("override,named", [BAD_GDPO_SETTINGS[0], BAD_GDPO_SETTINGS[2]])
def test_gdpo_refuses_bad_settings_before_any_work(run_entry, tmp_path, override, named):
    """The real entry point: refused before any folder or data is made (every setting: the test above)."""
    res = run_entry("gdpo.py", f"data.root={tmp_path / 'none'}", f"out_dir={tmp_path / 'out'}", override, cwd=tmp_path, timeout=120)
    assert res.returncode != 0 and named in res.stderr and "[pipeline] running" not in res.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "none").exists()


@pytest.mark.slow
def test_diverged_gdpo_stops_and_saves_nothing_non_finite(run_entry, tiny_pipeline):
    out = tiny_pipeline.root / "diverged"
    res = run_entry("gdpo.py", *tiny_pipeline.gdpo_args("optim.iterations=4", "optim.lr=1e4", f"out_dir={out}"), cwd=tiny_pipeline.root)
    assert res.returncode != 0 and "non-finite" in res.stderr and "optim.lr=10000" in res.stderr
    assert not (out / "meta.json").exists()  # no final checkpoint
    state = out / "last" / "state.pt"
    if state.exists():  # states written before the divergence hold finite weights only
        sd = torch.load(state, weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


@pytest.mark.slow
def test_second_gdpo_on_a_busy_folder_is_refused(run_entry, tiny_pipeline):
    out = tiny_pipeline.root / "busy"
    lock = RunLock(out)
    try:
        res = run_entry("gdpo.py", *tiny_pipeline.gdpo_args("optim.iterations=1", f"out_dir={out}", "resume=true"), cwd=tiny_pipeline.root)
    finally:
        lock.release()
    assert res.returncode != 0 and "in use by another run" in res.stderr


# ----------------------------------------------------------------------------------------------
# threads


def test_threads_auto_and_bad_values(monkeypatch):
    from gdpo_listener.pipeline import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    assert threads.resolve_threads("auto") == min(3, threads.available_cores()) and threads.resolve_threads(2) == 2
    monkeypatch.setattr(threads, "busy_cores", lambda: 1)  # another process keeps one core busy
    assert threads.resolve_threads("auto") == min(3, threads.available_cores()) - 1
    monkeypatch.setattr(threads, "busy_cores", lambda: 9)
    assert threads.resolve_threads("auto") == 1  # never below one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a user's exported thread count wins
    assert threads.resolve_threads("auto") == 2
    assert threads.resolve_threads("4") == 4
    for bad in (0, -1, "two", 1.5, True, None):
        with pytest.raises(ValueError, match="threads="):
            threads.resolve_threads(bad)


def test_threads_auto_says_when_the_load_took_cores(monkeypatch, capsys):
    import torch

    from gdpo_listener.pipeline import threads

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # this test process keeps its own thread count
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 3)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1)
    note = threads.load_note("auto", threads.resolve_threads("auto"))
    assert "2 of 3 cores" in note and "a run with 3 threads" in note and "OMP_NUM_THREADS=N" in note
    assert threads.configure_threads("auto", announce=True) == 2 and "2 of 3 cores" in capsys.readouterr().out
    threads.configure_threads("auto")  # without announce: silent
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    assert threads.load_note("auto", threads.resolve_threads("auto")) is None  # every core used
    assert threads.load_note(2, 2) is None and threads.load_note("2", 2) is None  # a number is the user's choice
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.load_note("auto", threads.resolve_threads("auto")) is None  # so is an exported count


def test_an_old_synthetic_corpus_is_not_reused_silently(tmp_path, monkeypatch):
    from gdpo_listener.pipeline import stages

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text("{}")
    monkeypatch.setattr(stages, "load_dataset_meta", lambda root: {"source": "synthetic", "synthetic": {"corpus_version": 1}})
    cfg = OmegaConf.create({"root": str(tmp_path / "data"), "auto_prepare": True, "seed": 0})
    with pytest.raises(RuntimeError, match="synthetic corpus version 1"):
        stages.ensure_dataset(cfg)
    monkeypatch.setattr(stages, "load_dataset_meta", lambda root: {"source": "synthetic", "synthetic": {"corpus_version": 2}})
    assert stages.ensure_dataset(cfg) == tmp_path / "data"
    # a corpus written with a generator option is used only on purpose (data.auto_prepare=false)
    monkeypatch.setattr(stages, "load_dataset_meta",
                        lambda root: {"source": "synthetic", "synthetic": {"corpus_version": 2, "idle_expr_rank": 4}})
    with pytest.raises(RuntimeError, match="idle_expr_rank=4.*auto_prepare=false"):
        stages.ensure_dataset(cfg)
    assert stages.ensure_dataset(OmegaConf.merge(cfg, {"auto_prepare": False})) == tmp_path / "data"


def test_a_vae_of_an_older_default_is_not_reused_silently(tmp_path, monkeypatch):
    import json

    from gdpo_listener.agents.vae import MotionVAE, VAEConfig, save_vae
    from gdpo_listener.envs.dataset import Normalizer
    from gdpo_listener.envs.flame import FLAME_DIM
    from gdpo_listener.pipeline import stages

    monkeypatch.chdir(tmp_path)
    nz = Normalizer(mean=[0.0] * FLAME_DIM, std=[1.0] * FLAME_DIM)
    save_vae(tmp_path / "vae", MotionVAE(VAEConfig.tiny()), nz)
    cfg = OmegaConf.create({"device": "cpu", "pretrained": {"vae": str(tmp_path / "vae"), "auto_train": True, "vae_overrides": []}})
    assert stages.ensure_vae(cfg, tmp_path) == tmp_path / "vae"  # written by this code: reused
    meta_path = tmp_path / "vae" / "meta.json"  # as an older train/vae.py wrote it: no dyn_window, trained with 0
    meta = json.loads(meta_path.read_text())
    del meta["vae_config"]["dyn_window"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match=r"default dyn_window=50 \(it was trained with dyn_window=0\).*'\+model.dyn_window=0'"):
        stages.ensure_vae(cfg, tmp_path)
    with pytest.raises(RuntimeError, match="dyn_window=0"):  # asking for another value does not make it fit
        stages.ensure_vae(OmegaConf.merge(cfg, {"pretrained": {"vae_overrides": ["+model.dyn_window=25"]}}), tmp_path)
    # kept on purpose: its setting asked for explicitly, or no auto-training
    assert stages.ensure_vae(OmegaConf.merge(cfg, {"pretrained": {"vae_overrides": ["+model.dyn_window=0"]}}), tmp_path)
    assert stages.ensure_vae(OmegaConf.merge(cfg, {"pretrained": {"auto_train": False}}), tmp_path)


def test_busy_cores_counts_other_runnable_processes(monkeypatch):
    from gdpo_listener.pipeline import threads

    readings = iter(["0.5 0.4 0.3 3/200 123\n"] * 5)
    monkeypatch.setattr(threads.Path, "read_text", lambda self: next(readings))
    assert threads.busy_cores(interval=0) == 2  # 3 runnable tasks, one of them this process
