"""evaluation/hardware.py: FLOP and byte counts of the AR-Flow passes (against hand counts and against
torch's FLOP counter on the real model) and the arithmetic of the bounds. No timing assertions."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig, CausalSlots, count_parameters, prefix_layout
from gdpo_listener.evaluation import hardware as hw
from gdpo_listener.pipeline.threads import OMP_WAIT_VARS


def tiny(causal: bool = False) -> ARFlowConfig:
    # D = 8, H = 16, 2 layers, Dv = 2, Dt = 3, Da = 4, r = 2, s = 2, window 4 frames = N = 2 tokens
    return ARFlowConfig(d_model=8, n_layers=2, n_heads=2, mlp_ratio=2.0, d_latent=2, d_text=3, d_audio=4, r=2, window=4,
                        audio_stride=2, causal_prefix=causal)


def counted(fn):
    """Matmul FLOPs torch counts for ``fn`` (math attention: its Q K^T and A V are counted as bmm)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = fn()
    return fc.get_total_flops(), out


def test_hand_counts_of_a_tiny_config():
    c = tiny()
    # block: 2 norms 2*2*8 + qkv 8*24+24 + proj 8*8+8 + fc 8*16+16 + proj 16*8+8
    assert hw.block_params(c) == 32 + 216 + 72 + 144 + 136 == 600
    # 3 queries, 5 keys: 2*3*(qkv 192 + proj 64 + mlp 2*128) + attention 4*3*5*8
    assert hw.block_flops(c, 3, 5) == 6 * 512 + 480 == 3552
    assert hw.stack_flops(c, 3, 5, keys_only_last=True) == 3552 + 2 * 3 * 192
    # prefix: text 1 + audio 2 streams x 2 tokens + partner 2 tokens
    assert hw.prefix_len(c) == 1 + 4 + 2 == 7
    # noisy token side: latent_in 2*8 + time MLP 256*8 + 8*8 + final_mod 8*16 + head 8*2, times 2 FLOPs
    assert hw.noisy_io_flops(c, 1) == 2 * (16 + 2048 + 64 + 128 + 16)
    # bytes of a one-token pass: blocks and token side, float32; KV: 2 layers x (K, V) x keys x 8
    assert hw.token_pass_weight_bytes(c) == 4 * (2 * 600 + hw.token_side_params(c))
    assert hw.kv_bytes(c, 7) == 4 * 2 * 2 * 7 * 8


@pytest.mark.parametrize("causal", [False, True])
def test_parameter_counts_match_the_model(causal):
    c = tiny(causal)
    m = ARFlow(c)
    assert hw.total_params(c) == count_parameters(m)
    assert hw.block_params(c) == sum(p.numel() for p in m.blocks[0].parameters())
    token_side = [m.latent_in, m.time_emb, m.final_mod, m.head]
    assert hw.token_side_params(c) == sum(p.numel() for mod in token_side for p in mod.parameters()) + m.type_emb.numel()
    paper = ARFlowConfig.paper()
    assert hw.total_params(paper) == count_parameters(ARFlow(paper))


def test_cache_slots_match_the_model_layouts():
    for c in (tiny(True), ARFlowConfig.small()):
        slots = CausalSlots(prefix_layout(c.window, c.n_tokens, c.r, c.audio_stride), c.n_tokens, c.r)
        assert [hw.history_slot(c, l) for l in range(c.n_tokens)] == slots.hist
        assert slots.size == hw.history_slot(c, c.n_tokens - 1) + 1
    c = tiny(False)
    m = ARFlow(c)
    h, _ = m.embed_prefix(hw.synthetic_cond(c, 1, torch.Generator().manual_seed(0)))
    assert h.shape[1] == hw.prefix_len(c)
    assert [hw.history_slot(c, l) for l in range(c.n_tokens)] == [7, 8]


@pytest.mark.parametrize("causal", [False, True])
def test_pass_flops_equal_torch_flop_counter(causal):
    c = tiny(causal)
    m = ARFlow(c).eval()
    B, N = 3, c.n_tokens
    g = torch.Generator().manual_seed(0)
    cond = hw.synthetic_cond(c, B, g)
    x = torch.randn(B, N, c.d_latent, generator=g)  # (B, N, Dv)
    t = torch.rand(B, N, generator=g)  # (B, N)
    assert counted(lambda: m(cond, x, x, t))[0] == B * hw.sft_forward_flops(c)
    ctx_flops, chunk_flops = hw.replay_forward_flops(c, (0, N, 0), sde_steps=2, chunk_steps=2)
    n_ctx, ctx = counted(lambda: m.encode_context(cond, x))
    assert n_ctx == B * ctx_flops
    xs = torch.randn(B, 2 * N, c.d_latent, generator=g)  # (B, S*N, Dv): 2 denoising steps of every token
    ts = torch.rand(B, 2 * N, generator=g)
    assert counted(lambda: m.velocity_in_context(ctx, xs, ts, torch.arange(N).repeat(2)))[0] == B * chunk_flops
    speaking = torch.ones(B, N, dtype=torch.bool)
    for cfg_on, w in ((True, (1.5, 2.0)), (False, (1.0, 1.0))):
        for cached in (True, False):
            n, _ = counted(lambda: m.sample(cond, N, steps=3, w_speak=w[0], w_listen=w[1], speaking_tokens=speaking,
                                            use_cache=cached))
            assert n == hw.total(hw.generation_passes(c, B, 3, cfg_on, cached=cached)).flops, (cfg_on, cached)


def test_rollout_passes_equal_the_policy_calls():
    c = tiny(False)
    m = ARFlow(c).eval()
    B, N, K = 2, c.n_tokens, 3
    g = torch.Generator().manual_seed(0)
    cond = hw.synthetic_cond(c, B, g)

    def rollout():  # what SDETransition does per episode with its cache
        cache = m.start(cond, {"text": False, "audio": False, "motion": False})
        for l in range(N):
            for k in range(K):
                m.velocity(cache, torch.randn(B, c.d_latent, generator=g), torch.full((B,), k / K), l)
            if l + 1 < N:
                m.append(cache, torch.randn(B, c.d_latent, generator=g), l)

    assert counted(rollout)[0] == hw.total(hw.rollout_passes(c, B, K)).flops


def test_replay_work_and_chunks():
    c = tiny(False)
    assert hw.chunk_sizes(5, 2) == [2, 2, 1]
    assert hw.chunk_sizes(4, 4) == [4]
    with pytest.raises(ValueError, match="chunk_steps=0"):
        hw.chunk_sizes(4, 0)
    ctx, chunks = hw.replay_forward_flops(c, (0, 2, 0), sde_steps=5, chunk_steps=2)
    # chunk passes: M = 2, 2, 1 steps x 2 tokens against context C = 7 + 2 = 9 (dense, plus themselves)
    expect = sum(hw.noisy_io_flops(c, M) + hw.stack_flops(c, M, 9 + M) for M in (4, 4, 2))
    assert chunks == expect
    w = hw.replay_work(c, batch=6, sde_steps=5, chunk_steps=2)
    assert w.flops == 6 * (hw.TRAIN_FACTOR + 1) * (ctx + chunks)  # trained model x3, reference x1
    assert w.bytes == (hw.TRAIN_FACTOR + 1) * 4 * 4 * hw.total_params(c)  # 4 passes per model (context + 3 chunks)
    # a window with a given prefix token generates fewer tokens: less work
    ctx2, chunks2 = hw.replay_forward_flops(c, (0, 2, 1), sde_steps=5, chunk_steps=2)
    assert ctx2 == ctx and chunks2 < chunks


def test_decode_bytes_per_token_hand_count():
    c = tiny(False)
    steps, N = 3, c.n_tokens
    weights, kv = hw.decode_bytes_per_token(c, batch=1, steps=steps, cfg_on=True)
    # 2 tokens: 3 velocity passes each, 1 commit after token 0 -> 7 passes over 2 tokens
    assert weights == 7 * hw.token_pass_weight_bytes(c) / 2
    # token 0 sees slots 0..7 (8 keys) in 4 passes, token 1 slots 0..8 (9 keys) in 3; 2 rows (CFG)
    assert kv == 2 * (4 * hw.kv_bytes(c, 8) + 3 * hw.kv_bytes(c, 9)) / N
    # the same bytes as the generation passes' one-token passes
    passes = hw.generation_passes(c, 1, steps, True)
    assert hw.total(passes[2:]).bytes == pytest.approx(N * (weights + kv))  # passes[:2]: conditional + unconditional prefix


def test_roofline_and_bound_arithmetic():
    machine = hw.Machine(bandwidth=10.0, gemm_peak=100.0, threads=1)
    compute = hw.Work(flops=1000.0, bytes=50.0)  # 10 s of FLOPs, 5 s of bytes
    memory = hw.Work(flops=100.0, bytes=40.0)  # 1 s, 4 s
    assert compute.seconds(machine) == 10.0 and memory.seconds(machine) == 4.0
    b = hw.bound_seconds([compute, memory, memory], machine)
    assert b.seconds == 18.0 and b.memory_seconds == 8.0 and b.limit == "compute"
    assert hw.bound_seconds([memory, memory, compute], machine).limit == "compute"
    assert hw.bound_seconds([memory] * 3, machine).limit == "memory"
    assert b.scaled(0.5).seconds == 9.0 and b.scaled(0.5).memory_seconds == 4.0
    # the bound of a sum is at most the sum of bounds
    assert hw.total([compute, memory]).seconds(machine) <= hw.bound_seconds([compute, memory], machine).seconds
    assert (compute + memory) * 2 == hw.Work(2200.0, 180.0) == 2 * (compute + memory)
    assert hw.reached(2.0, 8.0) == 0.25
    with pytest.raises(ValueError, match="measured time 0"):
        hw.reached(1.0, 0)


def test_sft_step_work_is_three_forward_passes():
    c = ARFlowConfig.small()
    w = hw.sft_step_work(c, batch=32)
    assert w.flops == 3 * 32 * hw.sft_forward_flops(c)
    machine = hw.Machine(bandwidth=1e10, gemm_peak=1e11, threads=2)
    assert w.seconds(machine) == pytest.approx(w.flops / 1e11)  # compute-bound


def test_measurements_return_positive_rates():
    assert math.isfinite(hw.measure_bandwidth(1 << 12, repeats=1)) and hw.measure_bandwidth(1 << 12, repeats=1) > 0
    assert hw.measure_gemm_peak(32, repeats=1) > 0
    with pytest.raises(ValueError, match="repeats=0"):
        hw.measure_gemm_peak(32, repeats=0)


def test_busy_ratios_and_process():
    r = hw.busy_ratios({"default idle": 0.5, "default busy": 0.75, "passive idle": 0.8, "passive busy": 1.0,
                        "old idle": 0.4, "old busy": 2.0})
    assert r == {"default": 1.5, "passive": 1.25, "old": 5.0}
    assert hw.busy_ratios({"default idle": 0.5}) == {}
    with pytest.raises(ValueError, match="busy='gpu'"):
        with hw.busy_process("gpu"):
            pass
    with hw.busy_process("python") as proc:
        assert proc.poll() is None  # running
    assert proc.poll() is not None  # killed at the end of the block


@pytest.mark.slow
def test_sft_child_runs_in_a_fresh_process():
    cond = hw.Condition("default idle", "short", "1", False)
    r = hw.run_condition(cond, {"preset": "small", "batch": 1, "steps": 1, "warmup": 0, "bank_rows": 2}, timeout=300)
    assert r["omp_wait"] == "GOMP_SPINCOUNT=10000" and r["threads"] == 1 and r["seconds_per_step"] > 0
    assert r["flops_per_step"] == hw.sft_step_work(ARFlowConfig.small(), 1).flops
    with pytest.raises(RuntimeError, match="preset='big'"):
        hw.run_condition(cond, {"preset": "big"}, timeout=300)


@pytest.mark.slow
def test_bench_threads_entry_point(tmp_path):
    """train/bench_threads.py with tiny settings: six conditions in fresh processes, ratios printed; bad settings refused."""
    script = Path(__file__).resolve().parents[1] / "train" / "bench_threads.py"
    env = {k: v for k, v in os.environ.items() if k not in OMP_WAIT_VARS}
    res = subprocess.run([sys.executable, str(script), "batch=1", "steps=1", "warmup=0", "bank_rows=2"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split()[:2] for line in res.stdout.splitlines() if line.startswith(("default ", "passive ", "old ", "one core "))]
    assert [" ".join(r) for r in rows] == ["default idle", "default busy", "passive idle", "passive busy", "old idle", "old busy",
                                           "one core"]
    assert "busy / one core idle" in res.stdout
    assert "busy / idle: default" in res.stdout and "target <= 1.6x" in res.stdout
    res = subprocess.run([sys.executable, str(script), "busy=gpu"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)
    assert res.returncode != 0 and "busy='gpu'" in res.stderr
    assert not list(tmp_path.glob("*.log"))
