"""Training on several processes (pipeline/distributed.py, train/sft.py, train/gdpo.py under torchrun).

Fast tests start 2 CPU processes with ``torch.multiprocessing`` on the gloo backend, joined through
the same torchrun variables (``RANK``, ``WORLD_SIZE`` ...) the recipes read; the ``slow`` ones run
the real entry points under ``torchrun`` with tiny overrides.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from entry_runner import load_script  # tests/ is on sys.path (the rootdir conftest)

from gdpo_listener.agents.loss import GDPOLoss, chunked_update
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.pipeline.distributed import Dist, init_distributed, launch_info, rank_seed, shard
from gdpo_listener.rewards.groups import build_reward

ROOT = Path(__file__).resolve().parents[1]
K = 2  # SDE steps per token in the GDPO tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, timeout_min: float) -> None:
    """One spawned rank: torchrun's variables, then the recipes' own init."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    d = init_distributed("cpu", timeout_min=timeout_min)
    fn(d, *args)
    d.destroy()


def spawn(fn, *args, world: int = 2, timeout_min: float = 2.0, join: bool = True):
    """Run ``fn(dist, *args)`` on ``world`` CPU ranks (gloo)."""
    return mp.start_processes(_entry, args=(world, free_port(), fn, args, timeout_min), nprocs=world, join=join, start_method="spawn")


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------
# conventions


def test_launch_info_and_single_process_defaults():
    assert launch_info({}) is None
    assert launch_info({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    with pytest.raises(ValueError, match="RANK=4 WORLD_SIZE=4"):
        launch_info({"RANK": "4", "WORLD_SIZE": "4"})
    d = init_distributed("cpu", env={})  # python train/x.py: one process, no-op collectives
    assert (d.rank, d.world_size, d.is_main, d.is_distributed) == (0, 1, True, False)
    x = torch.arange(3.0)
    assert d.broadcast_object("run") == "run" and d.all_gather_object(5) == [5] and d.all_gather_rows(x) is x
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(8)}) == 8  # rank 0 keeps the run's seed
    assert rank_seed(7, 3) == rank_seed(7, 3) != rank_seed(8, 3)
    assert [shard(8, r, 4) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(ValueError, match="optim.batch_size=6 must be a multiple of the number of processes \\(4\\)"):
        shard(6, 0, 4, "optim.batch_size")


# ----------------------------------------------------------------------------------------------
# SFT: 2 processes x B/2 windows = 1 process x B windows

B_SFT = 4


def sft_gradient(model, bank, rows: slice, world_model=None) -> list[torch.Tensor]:
    sft = load_script("sft")
    gen = torch.Generator().manual_seed(3)
    batch = sft.draw_batch(bank, B_SFT, gen, rows)
    loss, _, _ = sft.flow_step(world_model or model, batch, gen, rows, B_SFT)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _sft_rank(d: Dist, rl, out: str) -> None:
    sft = load_script("sft")
    model = rl.tiny_arflow(seed=d.rank).train()  # other initial weights on rank 1: DDP starts from rank 0's
    ddp = sft.wrap_ddp(model, d)
    grads = sft_gradient(model, rl.tiny_bank(), d.shard(B_SFT), world_model=ddp)
    torch.save([g for g in grads], Path(out) / f"sft{d.rank}.pt")


def test_sft_gradient_two_processes_equals_one_process(tmp_path, rl):
    spawn(_sft_rank, rl, str(tmp_path))  # the builders travel to the spawned ranks by reference
    bank = rl.tiny_bank()
    one = flat(sft_gradient(rl.tiny_arflow(seed=0).train(), bank, slice(None)))  # 1 process x B windows
    half = flat(sft_gradient(rl.tiny_arflow(seed=0).train(), bank, slice(0, B_SFT // 2)))  # rank 0's rows alone
    g0, g1 = (flat(torch.load(tmp_path / f"sft{r}.pt")) for r in range(2))
    assert torch.equal(g0, g1)  # every rank holds the averaged gradient
    assert rel_err(g0, one) < 1e-5
    assert rel_err(half, one) > 1e-2  # without the all-reduce the test would fail


# ----------------------------------------------------------------------------------------------
# GDPO: 2 processes x 2 prompts = 1 process x 4 prompts on the same trajectories

G = 2


def gdpo_setup(rl, n_prompts: int, matched: bool = False):
    """Deterministic tiny env, policy and loss (whiten + relative eps: batch-level advantage statistics);
    ``matched``: a speaking jaw column with ``objective_tokens="matched"`` (two advantages, two objectives)."""
    bank = rl.tiny_bank(n_windows=6)
    vae, norm = rl.tiny_vae()
    reward = build_reward("expr+rot+jaw@speaking" if matched else "expr+rot")
    gen = torch.Generator().manual_seed(0)
    env = ListenerSDEEnv(bank, vae, norm, reward, n_prompts=n_prompts, group_size=G, sde_steps=K, sigma=0.5, generator=gen, seed=0)
    model = rl.tiny_arflow()
    policy = make_policy(copy.deepcopy(model).requires_grad_(False), env, generator=gen)
    loss = GDPOLoss(transition_core(policy), model, reward.lambdas, beta=0.1, whiten=True,
                    objective_tokens="matched" if matched else "listening",
                    speaking_columns=[f == "speaking" for f in reward.column_frames])
    with torch.no_grad():
        model.head.bias.add_(0.05)  # away from the behaviour and reference policies: ratios and KL matter
    return env, policy, loss, model


def gdpo_update(rl, traj, n_prompts: int, d: Dist, sync: bool = True, matched: bool = False):
    """The recipe's advantage + update on ``traj`` (this rank's rows); returns (weights after, stats)."""
    from gdpo_listener.pipeline import rl as gdpo  # the RL stage's components
    _, _, loss, model = gdpo_setup(rl, n_prompts, matched)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gdpo.global_advantages(loss, traj, d, n_prompts)
    stats = chunked_update(loss, traj, opt, chunk_steps=1, epochs=2, grad_clip=1.0, sync=d if sync and d.is_distributed else None)
    if d.is_distributed:
        stats = gdpo.combine_rank_stats(d.all_gather_object((stats, gdpo.objective_counts(loss, traj))))
    return [p.detach().clone() for p in model.parameters()], stats


def collect_four_prompts(rl, matched: bool = False):
    from gdpo_listener.pipeline import rl as gdpo  # the RL stage's components
    env, policy, _, _ = gdpo_setup(rl, 4, matched)
    traj = gdpo.collect(env, policy)
    traj["token_mask"][:3] = False  # uneven objective counts: rank 0 has fewer listening transitions
    traj["speaking_token_mask"][5:] = False  # ... and rank 1 fewer speaking ones
    return traj


def _gdpo_rank(d: Dist, rl, traj_path: str, out: str, matched: bool) -> None:
    traj = torch.load(traj_path, weights_only=False)
    local = traj[d.shard(traj.batch_size[0])].clone()
    local["group_id"] -= d.rank * 2  # the env numbers a rank's prompts 0 .. n_prompts-1
    weights, stats = gdpo_update(rl, local, 2, d, matched=matched)
    adv = torch.stack([local["advantage"], local.get("advantage_speaking", local["advantage"])])
    torch.save((weights, stats, adv), Path(out) / f"gdpo{d.rank}.pt")


@pytest.mark.parametrize("matched", [False, True])
def test_gdpo_update_two_processes_equals_one_process(tmp_path, rl, matched):
    traj = collect_four_prompts(rl, matched)
    assert traj["group_id"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.save(traj, tmp_path / "traj.pt")
    spawn(_gdpo_rank, rl, str(tmp_path / "traj.pt"), str(tmp_path), matched)

    w_init = flat(gdpo_setup(rl, 4, matched)[3].parameters()).detach()
    ref_traj = traj.clone()
    w_one, stats_one = gdpo_update(rl, ref_traj, 4, Dist(), matched=matched)
    (w0, stats0, adv0), (w1, _, adv1) = (torch.load(tmp_path / f"gdpo{r}.pt", weights_only=False) for r in range(2))
    ref_adv = torch.stack([ref_traj["advantage"], ref_traj.get("advantage_speaking", ref_traj["advantage"])])
    assert torch.allclose(torch.cat([adv0, adv1], 1), ref_adv, atol=1e-6)  # advantages of the global batch
    assert ("loss/loss_objective_speaking" in stats_one) == matched
    assert torch.equal(flat(w0), flat(w1))  # the same weights on every rank
    step_one, step_two = flat(w_one) - w_init, flat(w0) - w_init
    assert step_one.abs().max() > 1e-4 and rel_err(step_two, step_one) < 1e-5
    for k, v in stats_one.items():
        assert stats0[k] == pytest.approx(v, rel=1e-4, abs=1e-7), k
    # control: rank 0's half alone (no gradient all-reduce, local shares) takes another step
    half = traj[:4].clone()
    w_half, _ = gdpo_update(rl, half, 2, Dist(), matched=matched)
    assert rel_err(flat(w_half) - w_init, step_one) > 1e-2


def test_combine_rank_stats_weights_by_transitions_and_ignores_nan():
    from gdpo_listener.pipeline import rl as gdpo  # the RL stage's components
    a = {"loss/loss_objective": 1.0, "loss/loss_kl": 2.0, "policy/ratio_max": float("nan"), "optim/grad_norm": 3.0,
         "policy/kl_speaking": 5.0}
    b = {"loss/loss_objective": 4.0, "loss/loss_kl": 6.0, "policy/ratio_max": 1.5, "optim/grad_norm": 3.0,
         "policy/kl_speaking": 7.0}

    def counts(n_obj, n_all, n_speak):
        return {"objective": n_obj, "all": n_all, "listening": n_all - n_speak, "speaking": n_speak}

    out = gdpo.combine_rank_stats([(a, counts(1.0, 10.0, 2.0)), (b, counts(3.0, 30.0, 6.0))])
    assert out["loss/loss_objective"] == pytest.approx((1 * 1 + 4 * 3) / 4)
    assert out["loss/loss_kl"] == pytest.approx((2 * 10 + 6 * 30) / 40)
    assert out["policy/kl_speaking"] == pytest.approx((5 * 2 + 7 * 6) / 8)
    assert out["policy/ratio_max"] == 1.5 and out["optim/grad_norm"] == 3.0
    nan_obj = gdpo.combine_rank_stats([({**a, "loss/loss_objective": float("nan")}, counts(0.0, 10.0, 2.0)),
                                       (b, counts(3.0, 30.0, 6.0))])
    assert nan_obj["loss/loss_objective"] == 4.0  # a rank without objective transitions has weight 0


# ----------------------------------------------------------------------------------------------
# feature cache split over ranks


def test_feature_cache_shards_write_every_entry_once(tmp_path, monkeypatch, make_tiny_dataset):
    from gdpo_listener.agents import encoders

    root = make_tiny_dataset(tmp_path / "data", n_conversations=3, seconds=8.0, seed=3)
    text_enc, audio_enc = encoders.TextEncoder(), encoders.AudioEncoder("logmel")
    written: dict[int, list[str]] = {}
    put = encoders.FeatureCache.put
    for rank in range(2):
        keys = written.setdefault(rank, [])
        monkeypatch.setattr(encoders.FeatureCache, "put", lambda self, k, a, keys=keys: keys.append(k) or put(self, k, a))
        encoders.precompute_features(root, text_enc, audio_enc, tmp_path / "cache", progress=False, shard=(rank, 2))
    monkeypatch.setattr(encoders.FeatureCache, "put", put)
    assert written[0] and written[1] and not set(written[0]) & set(written[1])
    assert all(encoders.shard_owner(k, 2) == r for r, ks in written.items() for k in ks)
    full = encoders.precompute_features(root, text_enc, audio_enc, tmp_path / "cache", progress=False)
    assert full.stats["audio_misses"] == 0 and full.stats["text_misses"] == 0 and full.stats["audio_hits"] == 6
    with pytest.raises(ValueError, match="shard=\\(2, 2\\)"):
        encoders.precompute_features(root, text_enc, audio_enc, tmp_path / "cache", progress=False, shard=(2, 2))


# ----------------------------------------------------------------------------------------------
# a failing rank stops the job


def _fail_rank(d: Dist, hang: bool, entered: str) -> None:
    if d.rank == 1:
        if hang:
            time.sleep(15)  # alive but never joins the collective
            return
        raise RuntimeError("rank 1 broke on purpose")
    Path(entered).write_text(repr(time.time()))  # when rank 0 starts waiting (process start-up excluded)
    d.barrier()


def rank_error(ctx, rank: int) -> str:
    """The traceback a spawned rank raised (torch.multiprocessing writes it to the rank's error file)."""
    import pickle

    path = Path(ctx.error_files[rank])
    return pickle.loads(path.read_bytes()) if path.is_file() and path.stat().st_size else ""


@pytest.mark.parametrize("hang", [False, True])
def test_a_rank_that_fails_or_hangs_does_not_block_the_others(hang, tmp_path):
    """Rank 0 waits in a barrier; rank 1 dies (or never comes): rank 0 fails by itself, within the timeout.
    The 45 s bound counts from rank 0 entering the barrier: spawning and importing torch in two processes
    can take longer than that on a loaded 2-core machine, and is not what this test measures."""
    entered = tmp_path / "entered"
    ctx = spawn(_fail_rank, hang, str(entered), timeout_min=0.1, join=False)  # 6 s
    p0, p1 = ctx.processes
    p0.join(timeout=180)
    assert not p0.is_alive(), "rank 0 is still blocked in the barrier"
    waited = time.time() - float(entered.read_text())
    assert p0.exitcode != 0 and waited < 45, f"rank 0 left the barrier after {waited:.0f} s"
    p1.join(timeout=60)
    assert p1.exitcode == (0 if hang else 1)
    if not hang:
        assert "rank 1 broke on purpose" in rank_error(ctx, 1)
    assert "barrier" in rank_error(ctx, 0).lower()


# ----------------------------------------------------------------------------------------------
# the entry points under torchrun


def torchrun(script: str, *overrides: str, cwd: Path, nproc: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "train" / script),
           "threads=1", *overrides]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-6000:])
    return res


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_torchrun_job_fails_with_the_failing_ranks_error(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(  # the recipes' pattern: a @record-ed body inside the distributed context
        "from torch.distributed.elastic.multiprocessing.errors import record\n"
        "from gdpo_listener.pipeline.distributed import distributed\n"
        "@record\n"
        "def body(d):\n"
        "    if d.rank == 1:\n"
        "        raise ValueError('rank 1 cannot read its shard')\n"
        "    d.barrier()\n"
        "    print('rank 0 passed the barrier')\n"
        "with distributed('cpu', timeout_min=1) as d:\n"
        "    body(d)\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0 and time.perf_counter() - t0 < 90
    out = res.stdout + res.stderr
    assert "rank 1 cannot read its shard" in out and "rank 0 passed the barrier" not in out
    root_cause = out[out.index("Root Cause"):]  # torchrun's failure summary names the failing rank and its error
    assert "rank      : 1" in root_cause and "ValueError: rank 1 cannot read its shard" in root_cause


@pytest.mark.slow
def test_two_process_gdpo_writes_one_checkpoint_and_resumes_exactly(tiny_pipeline):
    d = tiny_pipeline.root
    args = [a for a in tiny_pipeline.gdpo_args() if not a.startswith("env.n_prompts")] + ["env.n_prompts=2", "reward=expr+rot"]
    straight = torchrun("gdpo.py", *args, "optim.iterations=3", f"out_dir={d / 'dist_straight'}", cwd=d)
    assert straight.returncode == 0
    assert "2 processes x 2" in straight.stdout
    assert torchrun("gdpo.py", *args, "optim.iterations=2", f"out_dir={d / 'dist_resumed'}", cwd=d).returncode == 0
    res = torchrun("gdpo.py", *args, "optim.iterations=3", f"out_dir={d / 'dist_resumed'}", "resume=true", cwd=d)
    assert res.returncode == 0 and res.stdout.count("resumed at iteration 2") == 1  # printed by rank 0 only
    assert_same_weights(weights(d / "dist_resumed"), weights(d / "dist_straight"))
    # one run folder, one training state, the process count among the run's settings
    assert not list(d.glob("dist_resumed-*")) and len(list((d / "dist_resumed").rglob("state.pt"))) == 1
    assert json.loads((d / "dist_resumed" / "run.json").read_text())["settings"]["world_size"] == 2
    state = torch.load(d / "dist_resumed" / "last" / "state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["env_rng"]["noise"], state["ranks"][1]["env_rng"]["noise"])  # own streams
    # a single-process resume of a 2-process state is refused, naming the process counts
    one = subprocess.run([sys.executable, str(ROOT / "train" / "gdpo.py"), *args, "optim.iterations=4", f"out_dir={d / 'dist_resumed'}",
                          "resume=true"], cwd=d, capture_output=True, text=True, timeout=600)
    assert one.returncode != 0 and "written by a run of 2 process(es); this run has 1" in one.stderr


@pytest.mark.slow
def test_two_process_sft_resumes_exactly(tiny_pipeline, run_entry):
    d = tiny_pipeline.root
    vae = d / "vae_dist"
    res = run_entry("vae.py", f"data.root={tiny_pipeline.data}", f"out_dir={vae}", "optim.steps=2", "optim.batch_size=8",
                    "+model.d_model=32", "+model.n_layers=1", "+model.n_heads=2", "+model.d_latent=8", cwd=d)
    assert res.returncode == 0
    tiny = ["optim.batch_size=8", "+model.arch.d_model=32", "+model.arch.n_layers=1", "+model.arch.n_heads=2", "eval.n_windows=4",
            f"data.root={tiny_pipeline.data}", f"vae_dir={vae}", f"features.cache_dir={d / 'cache_dist'}", "ckpt_every=2"]
    assert torchrun("sft.py", *tiny, "optim.steps=4", f"out_dir={d / 'sft_straight'}", cwd=d).returncode == 0
    assert any((d / "cache_dist").rglob("*.npy"))  # the feature cache written by the two ranks
    assert torchrun("sft.py", *tiny, "optim.steps=2", f"out_dir={d / 'sft_resumed'}", cwd=d).returncode == 0
    res = torchrun("sft.py", *tiny, "optim.steps=4", f"out_dir={d / 'sft_resumed'}", "resume=true", cwd=d)
    assert res.returncode == 0 and "resumed from step 2" in res.stdout
    assert_same_weights(weights(d / "sft_resumed"), weights(d / "sft_straight"))
    assert not list(d.glob("sft_resumed-*"))


# ----------------------------------------------------------------------------------------------
# benchmark


def test_communication_volume_per_step():
    bench = load_script("bench_distributed")
    assert bench.allreduce_factor(1) == 0.0 and bench.allreduce_factor(2) == 1.0 and bench.allreduce_factor(8) == 1.75
    P = 1_000_000
    assert bench.comm_bytes_per_step(P, 8, "sft") == 4 * P * 1.75
    assert bench.comm_bytes_per_step(P, 8, "gdpo", sync_every=8) == 4 * P * 1.75 + 4 * P / 8  # + amortised weight broadcast
    assert bench.comm_bytes_per_step(P, 1, "gdpo") == 0.0


@pytest.mark.slow
def test_bench_distributed_smoke(run_entry, tmp_path):
    res = run_entry("bench_distributed.py", "sft.batch_size=4", "sft.steps=1", "sft.warmup=0", "gdpo.n_prompts=2", "gdpo.group_size=2",
                    "gdpo.sde_steps=1", "gdpo.iterations=1", "gdpo.warmup=0", "gdpo.chunk_steps=1", "comm.preset=small", cwd=tmp_path)
    assert res.returncode == 0
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.strip().startswith(("1 ", "2 "))]
    assert [r[0] for r in rows[:2]] == ["1", "2"] and float(rows[0][2]) == 1.0  # the baseline's efficiency
    assert "MB/step" in res.stdout
