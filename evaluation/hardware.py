"""What this machine can do, and what the AR-Flow asks of it: physical bounds of the speed benchmarks.

Measurements (:func:`measure_machine`), at the thread count the benchmark uses:

* memory bandwidth: a STREAM-like triad ``a = b + 3 c`` over float32 arrays far larger than any
  cache, ``3 * 4 * n`` bytes moved per triad (write-allocate traffic not counted, as in STREAM);
  best of ``repeats``;
* GEMM peak: ``torch.matmul`` of two square float32 matrices of size ``n``, ``2 n^3`` FLOPs; best of
  ``repeats``.

Counting conventions (the only place they are defined; every count is per row = per stream or window):

* one FLOP is one floating-point multiply or add; only matrix products are counted: a product
  ``(m, k) @ (k, n)`` is ``2 m k n`` FLOPs. Linear layers count their weight product (bias, norms,
  GELU, softmax, rotary rotations, residual adds and the optimiser are elementwise and left out);
* attention is counted dense, as ``F.scaled_dot_product_attention`` runs it with a boolean mask:
  each query against every key of the tensor it is given (``Q K^T`` and ``A V``: ``4 D`` FLOPs per
  query-key pair and layer, ``D`` = model width), whether the mask lets it through or not;
* a training pass (forward + backward) is ``TRAIN_FACTOR`` = 3 forward passes (the backward pass
  computes the gradients of the inputs and of the weights, each as costly as the forward pass);
* bytes: float32 (``BYTES_PER_FLOAT``). A pass reads the weights it uses once, whatever its number
  of rows; a one-token pass against a KV cache also reads every cached key and value of every layer
  (per row). Activations are not counted.

Both counts leave work out, so ``max(FLOPs / GEMM peak, bytes / bandwidth)`` (the roofline of
one pass, :meth:`Work.seconds`) is a lower bound of its time, and the sum over passes a lower bound
of the whole computation (:func:`bound_seconds`). One caveat: bytes are charged at the main-memory
bandwidth, so a pass whose weights and cache fit in the last-level cache (the small preset's one-token
passes read ~3.5 MB) can beat its memory part; the paper preset's (~80 MB) cannot. ``reached = bound / measured`` (at most 1 unless
the measurement of the machine was low) is the share of the machine's capability the code achieves;
for compute-bound work it is the fraction of the GEMM peak reached.

The passes mirror the implementation (``agents/arflow.py``, ``agents/sampling.py``,
``agents/policy.py``, ``agents/loss.py``): cached generation runs one prefix pass per window (a
bidirectional prefix: the conditional rows plus one shared unconditional row with CFG; a causal
prefix: one group per token, :meth:`ARFlow.extend`, on every row), then per token ``steps`` velocity
passes and one commit (``append``) of the finished token (none after the last token); with CFG every
one-token pass has 2 rows per stream. The replay of ``chunked_update`` runs, per window and model,
one context pass (prefix + clean history, ``encode_context``) and one pass per chunk of ``S``
denoising steps (``velocity_in_context``: ``S`` copies of each generated token against the context);
the trained model with gradient, the reference without.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from ..pipeline.threads import OMP_WAIT_VARS, describe_omp_wait, omp_wait_env

BYTES_PER_FLOAT = 4  # float32 weights, activations and caches
TRAIN_FACTOR = 3  # forward + backward = 3 forward passes
N_TIME_FREQ = 256  # sinusoidal features of the flow time (agents/arflow.py N_TIME_FREQ)


# --------------------------------------------------------------------------------------------
# the machine


@dataclass(frozen=True)
class Machine:
    """Measured capabilities: ``bandwidth`` bytes/s (triad), ``gemm_peak`` FLOP/s (fp32 matmul) at ``threads``."""

    bandwidth: float
    gemm_peak: float
    threads: int
    stream_mb: float = float("nan")  # size of one triad array
    gemm_size: int = 0

    def describe(self) -> str:
        return (f"memory bandwidth {self.bandwidth / 1e9:.1f} GB/s (triad, 3 x {self.stream_mb:.0f} MB float32 arrays) | "
                f"GEMM peak {self.gemm_peak / 1e9:.1f} GFLOP/s (fp32 {self.gemm_size} x {self.gemm_size} matmul) | "
                f"{self.threads} threads")


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, allocator, kernel selection
    best = math.inf
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(n_elements: int = 1 << 25, repeats: int = 5) -> float:
    """Bytes/s of the triad ``a = b + 3 c`` over float32 arrays of ``n_elements`` (best of ``repeats``)."""
    import torch

    if n_elements < 1 or repeats < 1:
        raise ValueError(f"measure_bandwidth: n_elements={n_elements} and repeats={repeats} must be positive")
    b = torch.rand(n_elements)
    c = torch.rand(n_elements)
    a = torch.empty(n_elements)
    seconds = _best_seconds(lambda: torch.add(b, c, alpha=3.0, out=a), repeats)
    return 3 * BYTES_PER_FLOAT * n_elements / seconds


def measure_gemm_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an fp32 ``(n, n) @ (n, n)`` matmul (best of ``repeats``): ``2 n^3`` FLOPs."""
    import torch

    if n < 1 or repeats < 1:
        raise ValueError(f"measure_gemm_peak: n={n} and repeats={repeats} must be positive")
    a = torch.rand(n, n)
    b = torch.rand(n, n)
    out = torch.empty(n, n)
    seconds = _best_seconds(lambda: torch.matmul(a, b, out=out), repeats)
    return 2.0 * n ** 3 / seconds


def measure_machine(stream_mb: float = 256.0, gemm_size: int = 2048, repeats: int = 5) -> Machine:
    """Both measurements at torch's current thread count (set it first)."""
    import torch

    n = int(stream_mb * 2 ** 20) // BYTES_PER_FLOAT
    return Machine(measure_bandwidth(n, repeats), measure_gemm_peak(int(gemm_size), repeats), torch.get_num_threads(),
                   stream_mb=n * BYTES_PER_FLOAT / 2 ** 20, gemm_size=int(gemm_size))


# --------------------------------------------------------------------------------------------
# work and bounds


@dataclass(frozen=True)
class Work:
    """FLOPs and bytes of one pass (or of a sum of passes, where only the total matters)."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k: float) -> "Work":
        return Work(self.flops * k, self.bytes * k)

    __rmul__ = __mul__

    def compute_seconds(self, machine: Machine) -> float:
        return self.flops / machine.gemm_peak

    def memory_seconds(self, machine: Machine) -> float:
        return self.bytes / machine.bandwidth

    def seconds(self, machine: Machine) -> float:
        """Roofline: the pass cannot be faster than its FLOPs at the peak nor its bytes at the bandwidth."""
        return max(self.compute_seconds(machine), self.memory_seconds(machine))


def total(passes: list[Work]) -> Work:
    return sum(passes, Work())


@dataclass(frozen=True)
class Bound:
    """Lower bound of a computation's time: ``seconds``, of which ``memory_seconds`` come from passes
    limited by the memory bandwidth (the rest by the GEMM peak)."""

    seconds: float
    memory_seconds: float

    @property
    def limit(self) -> str:
        """``memory`` or ``compute``: what limits most of the bound."""
        return "memory" if self.memory_seconds >= self.seconds / 2 else "compute"

    def scaled(self, k: float) -> "Bound":
        return Bound(self.seconds * k, self.memory_seconds * k)


def bound_seconds(passes: list[Work], machine: Machine) -> Bound:
    """Sum of the passes' rooflines (passes run one after the other)."""
    secs = [p.seconds(machine) for p in passes]
    mem = sum(s for p, s in zip(passes, secs) if p.memory_seconds(machine) >= p.compute_seconds(machine))
    return Bound(sum(secs), mem)


def reached(bound: float, measured: float) -> float:
    """Share of the bound reached: ``bound / measured`` seconds (1 = as fast as the machine allows)."""
    if not measured > 0:
        raise ValueError(f"reached: measured time {measured} must be positive")
    return bound / measured


# --------------------------------------------------------------------------------------------
# sizes of the AR-Flow sequence (``cfg``: an ``agents.arflow.ARFlowConfig`` or anything with its fields)


def mlp_hidden(cfg) -> int:
    return int(cfg.mlp_ratio * cfg.d_model)


def audio_tokens(cfg, n_tokens: int) -> int:
    """Audio tokens per stream of ``n_tokens`` motion tokens (``r / audio_stride`` each)."""
    return n_tokens * cfg.r // cfg.audio_stride


def prefix_len(cfg, n_tokens: int | None = None) -> int:
    """P = 1 (text) + 2 x audio tokens + partner tokens, for a window of ``n_tokens`` (default: the config's)."""
    n = cfg.n_tokens if n_tokens is None else int(n_tokens)
    return 1 + 2 * audio_tokens(cfg, n) + n


def causal_group_size(cfg, j: int) -> int:
    """Prefix entries of token j in a causal cache: its audio tokens of both streams and its partner
    token (``agents.arflow.CausalSlots``), plus the text for token 0."""
    return 2 * cfg.r // cfg.audio_stride + 1 + (1 if j == 0 else 0)


def history_slot(cfg, l: int) -> int:
    """Cache slot of history (or noisy) token l = the number of cache slots before it.

    Bidirectional prefix: P + l. Causal prefix: the groups of tokens 0..l and the history tokens
    0..l-1 come first (``CausalSlots.hist[l]``).
    """
    if cfg.causal_prefix:
        return sum(causal_group_size(cfg, j) for j in range(l + 1)) + l
    return prefix_len(cfg) + l


# --------------------------------------------------------------------------------------------
# parameters (weights read by a pass)


def block_params(cfg) -> int:
    """One transformer block: 2 layer norms, qkv, output projection, MLP (weights and biases)."""
    D, H = cfg.d_model, mlp_hidden(cfg)
    return 2 * 2 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D)


def token_side_params(cfg) -> int:
    """Modules of a motion-token pass besides the blocks: latent_in, time embedding MLP, final
    modulation, head and the token-type table."""
    D, Dv = cfg.d_model, cfg.d_latent
    return (Dv * D + D) + (N_TIME_FREQ * D + D) + (D * D + D) + (D * 2 * D + 2 * D) + (D * Dv + Dv) + 6 * D


def prefix_side_params(cfg) -> int:
    """Condition projectors and the three null embeddings."""
    D = cfg.d_model
    return (cfg.d_text * D + D) + (cfg.audio_stride * cfg.d_audio * D + D) + (cfg.d_latent * D + D) + 3 * D


def total_params(cfg) -> int:
    return cfg.n_layers * block_params(cfg) + token_side_params(cfg) + prefix_side_params(cfg)


def token_pass_weight_bytes(cfg) -> int:
    """Weights read by one velocity / append pass (all blocks and the token side)."""
    return BYTES_PER_FLOAT * (cfg.n_layers * block_params(cfg) + token_side_params(cfg))


def kv_bytes(cfg, n_keys: int) -> int:
    """Keys and values of ``n_keys`` cache slots in every layer, one row."""
    return BYTES_PER_FLOAT * cfg.n_layers * 2 * n_keys * cfg.d_model


# --------------------------------------------------------------------------------------------
# FLOPs of the pieces (one row)


def block_flops(cfg, n_q: int, n_k: int) -> int:
    """One block, ``n_q`` queries attending (dense) to ``n_k`` keys: qkv, projection, MLP, Q K^T, A V."""
    D, H = cfg.d_model, mlp_hidden(cfg)
    return 2 * n_q * (3 * D * D + D * D + 2 * D * H) + 4 * n_q * n_k * D


def stack_flops(cfg, n_q: int, n_k: int, keys_only_last: bool = False) -> int:
    """All blocks; ``keys_only_last``: the last block computes only its qkv (``ARFlow._fill_kv``)."""
    D = cfg.d_model
    last = 2 * n_q * 3 * D * D if keys_only_last else block_flops(cfg, n_q, n_k)
    return (cfg.n_layers - 1) * block_flops(cfg, n_q, n_k) + last


def prefix_embed_flops(cfg, n_tokens: int, text: bool = True) -> int:
    """Projectors of the prefix of ``n_tokens`` motion tokens: text, both audio streams, partner motion."""
    D = cfg.d_model
    audio = 2 * audio_tokens(cfg, n_tokens) * 2 * cfg.audio_stride * cfg.d_audio * D
    return (2 * cfg.d_text * D if text else 0) + audio + 2 * n_tokens * cfg.d_latent * D


def clean_embed_flops(cfg, n: int) -> int:
    return 2 * n * cfg.d_latent * cfg.d_model


def noisy_io_flops(cfg, m: int) -> int:
    """Per-noisy-token work outside the blocks: latent_in, time-embedding MLP, final modulation, head."""
    D, Dv = cfg.d_model, cfg.d_latent
    return 2 * m * (Dv * D + N_TIME_FREQ * D + D * D + D * 2 * D + D * Dv)


# --------------------------------------------------------------------------------------------
# passes of the benchmarked computations


def sft_forward_flops(cfg) -> int:
    """Teacher-forced forward of one window: [prefix (P); clean (N); noisy (N)], every block on all of it."""
    N = cfg.n_tokens
    S = prefix_len(cfg) + 2 * N
    return prefix_embed_flops(cfg, N) + clean_embed_flops(cfg, N) + noisy_io_flops(cfg, N) + stack_flops(cfg, S, S)


def sft_step_work(cfg, batch: int) -> Work:
    """One supervised step of ``batch`` windows (forward + backward; every weight read per pass)."""
    return Work(TRAIN_FACTOR * batch * sft_forward_flops(cfg), TRAIN_FACTOR * BYTES_PER_FLOAT * total_params(cfg))


def prefix_passes(cfg, rows: int, by_group: bool) -> list[Work]:
    """The prefix of one window on ``rows`` rows: one pass (``ARFlow.start``), or with a causal
    prefix one pass per token group (``ARFlow.extend``, each group against the slots before it)."""
    if rows == 0:
        return []
    N = cfg.n_tokens
    weights = BYTES_PER_FLOAT * (cfg.n_layers * block_params(cfg) + prefix_side_params(cfg))
    if not by_group:
        P = prefix_len(cfg)
        return [Work(rows * (prefix_embed_flops(cfg, N) + stack_flops(cfg, P, P, keys_only_last=True)), weights)]
    out = []
    for j in range(N):
        g = causal_group_size(cfg, j)
        keys = history_slot(cfg, j)  # group j attends to the slots up to its own end = history token j's slot
        # extend projects the text for every group (dropped after group 0): counted as run
        out.append(Work(rows * (prefix_embed_flops(cfg, 1) + stack_flops(cfg, g, keys, keys_only_last=True)), weights))
    return out


def velocity_pass(cfg, rows: int, l: int) -> Work:
    """One new-token pass of noisy token l against the cache (slots before it + itself)."""
    keys = history_slot(cfg, l) + 1
    return Work(rows * (noisy_io_flops(cfg, 1) + stack_flops(cfg, 1, keys)),
                token_pass_weight_bytes(cfg) + rows * kv_bytes(cfg, keys))


def append_pass(cfg, rows: int, l: int) -> Work:
    """Commit of clean token l into the cache (a full one-token pass, as ``ARFlow.append`` runs it)."""
    keys = history_slot(cfg, l) + 1
    return Work(rows * (clean_embed_flops(cfg, 1) + stack_flops(cfg, 1, keys)),
                token_pass_weight_bytes(cfg) + rows * kv_bytes(cfg, keys))


def uncached_pass(cfg, rows: int, l: int) -> Work:
    """Velocity of token l by a full recompute of [prefix; history 0..l-1; noisy l] (``velocity_uncached``);
    a causal prefix holds only the conditioning of tokens 0..l (what the sampler has read so far)."""
    n_pre = l + 1 if cfg.causal_prefix else cfg.n_tokens
    S = prefix_len(cfg, n_pre) + l + 1
    flops = prefix_embed_flops(cfg, n_pre) + clean_embed_flops(cfg, l) + noisy_io_flops(cfg, 1) + stack_flops(cfg, S, S)
    return Work(rows * flops, BYTES_PER_FLOAT * total_params(cfg))


def generation_passes(cfg, batch: int, steps: int, cfg_on: bool, tokens: range | None = None,
                      cached: bool = True) -> list[Work]:
    """Every pass of generating one window for ``batch`` streams (module docstring), or only the
    passes of ``tokens`` (then without the prefix; e.g. the timed tokens of an uncached run)."""
    N = cfg.n_tokens
    rows = 2 * batch if cfg_on else batch
    whole = tokens is None
    tokens = range(N) if whole else tokens
    passes = []
    if cached and whole:
        if cfg.causal_prefix:
            passes += prefix_passes(cfg, rows, by_group=True)
        else:
            passes += prefix_passes(cfg, batch, by_group=False) + prefix_passes(cfg, 1 if cfg_on else 0, by_group=False)
    for l in tokens:
        if not cached:
            passes += [uncached_pass(cfg, rows, l)] * steps
            continue
        passes += [velocity_pass(cfg, rows, l)] * steps
        if l + 1 < N:
            passes.append(append_pass(cfg, rows, l))
    return passes


def rollout_passes(cfg, batch: int, sde_steps: int) -> list[Work]:
    """RL collection of one window (``agents.policy.SDETransition`` with its cache): one prefix pass
    (``start``, all groups at once), ``sde_steps`` velocity passes per token, the commits; no CFG."""
    passes = prefix_passes(cfg, batch, by_group=False)
    for l in range(cfg.n_tokens):
        passes += [velocity_pass(cfg, batch, l)] * sde_steps
        if l + 1 < cfg.n_tokens:
            passes.append(append_pass(cfg, batch, l))
    return passes


def chunk_sizes(sde_steps: int, chunk_steps: int) -> list[int]:
    """Denoising steps replayed by each backward pass of ``chunked_update``."""
    if sde_steps < 1 or chunk_steps < 1:
        raise ValueError(f"chunk_sizes: sde_steps={sde_steps} and chunk_steps={chunk_steps} must be positive")
    return [min(chunk_steps, sde_steps - k0) for k0 in range(0, sde_steps, chunk_steps)]


def replay_forward_flops(cfg, span: tuple[int, int, int], sde_steps: int, chunk_steps: int) -> tuple[int, int]:
    """(context, chunks) forward FLOPs of one model on one row of one window ``span = (s0, n, new0)``:
    the context pass [prefix (n tokens); clean history (n)] and the chunks' passes (``S`` copies of
    the window's ``s0 + n - new0`` generated tokens, attending to the context and to themselves, dense)."""
    s0, n, new0 = span
    C = prefix_len(cfg, n) + n
    ctx = prefix_embed_flops(cfg, n) + clean_embed_flops(cfg, n) + stack_flops(cfg, C, C, keys_only_last=True)
    gen = s0 + n - new0
    chunks = 0
    for S in chunk_sizes(sde_steps, chunk_steps):
        M = S * gen
        chunks += noisy_io_flops(cfg, M) + stack_flops(cfg, M, C + M)
    return ctx, chunks


def replay_work(cfg, batch: int, sde_steps: int, chunk_steps: int, spans: list[tuple[int, int, int]] | None = None) -> Work:
    """Replay and update of one batch: per window, the trained model with gradient (``TRAIN_FACTOR``)
    and the reference forward only; ``spans`` default: one window of the config's length."""
    spans = [(0, cfg.n_tokens, 0)] if spans is None else spans
    flops, passes = 0, 0
    for span in spans:
        ctx, chunks = replay_forward_flops(cfg, span, sde_steps, chunk_steps)
        flops += batch * (TRAIN_FACTOR + 1) * (ctx + chunks)
        passes += (TRAIN_FACTOR + 1) * (1 + len(chunk_sizes(sde_steps, chunk_steps)))
    return Work(flops, passes * BYTES_PER_FLOAT * total_params(cfg))


def decode_bytes_per_token(cfg, batch: int, steps: int, cfg_on: bool) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) read per generated token of one window, averaged over its tokens:
    ``steps`` velocity passes and one commit per token (none after the last)."""
    N, rows = cfg.n_tokens, (2 * batch if cfg_on else batch)
    n_pass = N * steps + (N - 1)
    kv = sum(kv_bytes(cfg, history_slot(cfg, l) + 1) * rows * (steps + (1 if l + 1 < N else 0)) for l in range(N))
    return n_pass * token_pass_weight_bytes(cfg) / N, kv / N


# --------------------------------------------------------------------------------------------
# supervised steps under load (train/bench_threads.py): a child process times SFT steps


def synthetic_cond(cfg, batch: int, generator, device="cpu") -> dict:
    """A random conditioning dict with the real shapes of one window (speed only)."""
    import torch

    L, N = cfg.window, cfg.n_tokens

    def rnd(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    return {
        "text_emb": rnd(batch, cfg.d_text), "text_mask": torch.ones(batch, dtype=torch.bool, device=device),
        "actor_audio": rnd(batch, L, cfg.d_audio), "partner_audio": rnd(batch, L, cfg.d_audio),
        "partner_latent": rnd(batch, N, cfg.d_latent), "partner_has_motion": torch.ones(batch, dtype=torch.bool, device=device),
    }


def time_sft_steps(preset: str = "small", batch: int = 32, steps: int = 10, warmup: int = 2, threads="auto",
                   bank_rows: int = 64, seed: int = 0, lr: float = 1e-3) -> dict:
    """Seconds of ``steps`` supervised steps as ``train/sft.py`` runs them (batch drawn from a bank,
    rectified-flow loss with condition dropout, backward, gradient clipping at 1, AdamW), on a
    synthetic bank of ``bank_rows`` windows with the real shapes; after ``warmup`` untimed steps."""
    import torch

    from ..agents.arflow import ARFlow, ARFlowConfig
    from ..agents.flow import interpolate, velocity_target
    from ..pipeline.threads import configure_threads

    if preset not in ("small", "paper"):
        raise ValueError(f"time_sft_steps: preset={preset!r} must be small or paper")
    if min(batch, steps, bank_rows) < 1 or warmup < 0:
        raise ValueError(f"time_sft_steps: batch={batch}, steps={steps}, bank_rows={bank_rows} must be positive, warmup={warmup} >= 0")
    n_threads = configure_threads(threads)
    torch.manual_seed(seed)
    cfg = getattr(ARFlowConfig, preset)()
    g = torch.Generator().manual_seed(seed)
    bank = synthetic_cond(cfg, bank_rows, g)
    bank["actor_latent"] = torch.randn(bank_rows, cfg.n_tokens, cfg.d_latent, generator=g)  # (R, N, Dv)
    model = ARFlow(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def step():
        idx = torch.randint(bank_rows, (batch,), generator=g)  # (B,)
        rows = {k: v[idx] for k, v in bank.items()}
        x1 = rows.pop("actor_latent")  # (B, N, Dv)
        x0 = torch.randn(x1.shape, generator=g)
        t = torch.rand(x1.shape[:2], generator=g)  # (B, N)
        v = model(rows, x1, interpolate(x0, x1, t.unsqueeze(-1)), t)  # (B, N, Dv)
        loss = (v - velocity_target(x0, x1)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"seconds_per_step": sum(times) / len(times), "median": statistics.median(times), "max": max(times),
            "threads": n_threads, "omp_wait": describe_omp_wait(),
            "flops_per_step": sft_step_work(cfg, batch).flops}


@dataclass(frozen=True)
class Condition:
    """One measurement of ``train/bench_threads.py``: OpenMP wait mode (``pipeline.threads.OMP_WAIT_MODES``)
    and threads of the timed process, and whether a busy single-threaded process runs beside it."""

    name: str
    omp_wait: str
    threads: str
    busy: bool


SETTINGS = ("default", "passive", "old")


def thread_conditions(old_threads: int = 2) -> tuple[Condition, ...]:
    """The entry points' default (short spin, ``threads: auto``), never spinning (passive, ``auto``)
    and torch's old behaviour (active spin-waiting, ``old_threads`` threads), each idle and then
    beside a busy process; last, one thread on the idle machine ("one core idle"): beside one busy
    process on 2 cores no setting can beat it, so ``busy / one core idle`` is the share of the
    reachable speed a setting keeps under load, whereas ``busy / idle`` also counts the second
    core's speed-up that the busy process takes away."""
    modes = {"default": ("short", "auto"), "passive": ("passive", "auto"), "old": ("active", str(int(old_threads)))}
    return (*(Condition(f"{name} {state}", modes[name][0], modes[name][1], state == "busy")
              for name in SETTINGS for state in ("idle", "busy")),
            Condition("one core idle", "short", "1", False))  # what one free core allows: the busy runs' best case


BUSY_CODE = {  # one busy single-threaded process: pure Python, or a 1-thread numpy matmul loop
    "python": "x = 0\nwhile True:\n    x = (x + 1) % 1000003",
    "numpy": "import numpy as np\na = np.random.rand(256, 256)\nwhile True:\n    a = np.tanh(a @ a)",
}

# thread-count variables a user may have exported: cleared for the timed child, 1 for the busy one
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextmanager
def busy_process(kind: str = "python"):
    """A child process keeping one core busy until the block ends (killed by its handle)."""
    if kind not in BUSY_CODE:
        raise ValueError(f"busy={kind!r} must be one of {sorted(BUSY_CODE)}")
    env = {**os.environ, **{k: "1" for k in THREAD_ENV}}
    proc = subprocess.Popen([sys.executable, "-c", BUSY_CODE[kind]], env=env)
    try:
        time.sleep(0.5)  # let it start spinning
        yield proc
    finally:
        proc.kill()
        proc.wait()


def sft_child_command(settings: dict) -> list[str]:
    """Command of a fresh process that runs :func:`time_sft_steps` with ``settings`` and prints its JSON."""
    code = ("import json, sys\nfrom gdpo_listener.evaluation.hardware import time_sft_steps\n"
            "print(json.dumps(time_sft_steps(**json.loads(sys.argv[1]))))")
    return [sys.executable, "-c", code, json.dumps(settings)]


def run_condition(cond: Condition, settings: dict, busy_kind: str = "python", timeout: float | None = None) -> dict:
    """Time SFT steps in a fresh child process under ``cond`` (wait policy set before torch loads)."""
    env = {**{k: v for k, v in os.environ.items() if k not in THREAD_ENV + OMP_WAIT_VARS}, **omp_wait_env(cond.omp_wait)}
    cmd = sft_child_command({**settings, "threads": cond.threads})

    def run():
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"bench_threads: the SFT child of condition {cond.name!r} failed:\n{res.stderr[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    if not cond.busy:
        return run()
    with busy_process(busy_kind):
        return run()


def busy_ratios(results: dict[str, float]) -> dict[str, float]:
    """``{"default": busy / idle, "passive": ..., "old": ...}`` from seconds per step keyed by
    :func:`thread_conditions` names (settings without both figures are left out)."""
    out = {}
    for setting in SETTINGS:
        idle, busy = results.get(f"{setting} idle"), results.get(f"{setting} busy")
        if idle and busy is not None:
            out[setting] = busy / idle
    return out
