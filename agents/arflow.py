"""AR-Flow: auto-regressive flow matching over VAE motion latents (paper section 3.2, eq. 1-6).

One transformer reads the sequence

    [c_txt (1) ; a_ptn (L) ; m_ptn (N) ; a_act (L) ; m_<l (history) ; m_{l,t} (noisy token)]

and predicts the velocity of the noisy latent token (flow convention in ``agents/flow.py``:
t = 0 noise, t = 1 data, target x1 - x0). L = window frames at 25 fps (200), N = L / r latent tokens
(25), Dv = latent size.

Positions (TMRoPE, eq. 2). Every token gets a timestamp on the audio frame axis: text 0, audio
frame i -> i (both audio streams), motion token j -> j * r + r // 2 (partner tokens, history tokens
and noisy tokens alike). Rotary embeddings with these positions are applied to queries and keys in
every attention layer. Tokens that share a timestamp (partner vs actor audio, history vs noisy)
are told apart by a learned token-type embedding added at the input. With
``ARFlowConfig.audio_stride`` s > 1 (the small CPU preset uses 4) each audio token concatenates
s frames and sits at their centre i * s + (s - 1) / 2; s = 1 is the paper layout above.

Attention (explicit boolean masks, True = may attend). Bidirectional prefix (default,
``ARFlowConfig.causal_prefix`` False):

* prefix tokens attend to the whole prefix (bidirectional) and nothing else;
* clean history token j attends to the prefix and history tokens <= j;
* noisy token l attends to the prefix, history tokens < l and itself.

Causal-in-time prefix (``causal_prefix`` True, for real-time listening). Every prefix entry belongs
to the motion token whose frames hold it (``PrefixLayout.tok``: audio token i -> its last frame
// r, partner token j -> j; text -> 0 and visible to all):

* text attends to text only;
* an audio token (either stream) attends to text and to audio tokens (both streams) with timestamps
  <= its own;
* partner-motion token j attends to the prefix entries of tokens <= j (text, audio, partner motion);
* clean token j / noisy token l attend to the prefix entries of tokens <= j / <= l, and to the
  history as above.

Token l then depends only on the audio up to its own last frame, so a window can be generated as
its audio arrives (one token of algorithmic latency; ``agents/streaming.py``), and a window cut
short equals the first tokens of the full window.

The prefix never sees the history, so its keys/values are computed once per window (KV cache); with
a causal prefix they can also be computed token by token (:meth:`ARFlow.extend`), earlier entries
never changing. Teacher forcing (``forward``) puts all N clean tokens and all N noisy tokens in one
sequence, ``[prefix ; clean_0..N-1 ; noisy_0..N-1]``; the mask makes noisy token l see exactly what
it sees during generation, so one pass trains every token.

Flow time. t enters each noisy token twice: a sinusoidal embedding of t -> MLP is *added* to the
noisy token's input embedding, and the same embedding modulates the final layer norm before the
output head (DiT-style adaLN shift/scale, zero-initialised). Clean and prefix tokens carry no t.
This keeps the per-layer cost and parameter count of a plain pre-LN transformer.

Conditions and classifier-free guidance. Each condition has one learned null embedding (in model
space, after the projector): text (1 token), audio (both streams together, every frame), partner
motion (every token). A row uses the null when it is dropped (training-time condition dropout, or
``drop`` masks) or when the condition is missing (``text_mask`` False, ``partner_has_motion``
False), so "missing" and "dropped" look the same to the network. The unconditional CFG branch drops
all three (the paper's), or the subset ``cfg_drop`` of ``sample``.

Cached generation (``start`` / ``extend`` / ``velocity`` / ``append``) is an inference path (no
autograd; the cache is preallocated and written in place). Gradients go through ``forward`` (all
tokens of one denoising step index at once), ``velocity_uncached``, or the two-stage
``encode_context`` (prefix and clean history of a window, once) + ``velocity_in_context`` (any
number of noisy tokens against it), which the RL replay uses to share one prefix pass between all
chunks of denoising steps. Sampling (ODE / SDE, CFG, sliding windows)
is in ``agents/sampling.py``; ``ARFlow.sample`` / ``ARFlow.generate_long`` delegate to it. The
transformer parts (rotary embeddings, attention, blocks) are shared with the VAE
(``agents/attention.py``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from ..envs.windows import COND_KEYS  # keys of the conditioning dict; text_mask, partner_has_motion optional
from .attention import Block, BlockDelta, apply_rope, gated_delta, rope_cos_sin
from .checkpoint import CheckpointError, load_checkpoint_meta, load_weights, save_checkpoint

__all__ = [
    "ARFlowConfig", "ARFlow", "ListenAdapter", "ListenLoRA", "KVCache", "Context", "PrefixLayout", "CausalSlots",
    "prefix_positions", "prefix_layout", "token_positions", "attention_mask", "causal_prefix_mask", "count_parameters",
    "adapter_kwargs", "takes_speaking", "context_gated", "LORA_SCOPES", "COND_KEYS", "DROP_KEYS", "save_arflow", "load_arflow",
]

DROP_KEYS = ("text", "audio", "motion")  # condition groups a ``drop`` mask can null (CFG, condition dropout)
N_TIME_FREQ = 256  # sinusoidal features of the flow time
# where the low-rank updates (ListenLoRA) act: "listening" the noisy listening tokens only; "listening_context" also
# the context entries (prefix groups, clean history; never the text) of listening tokens; "all" every entry of
# every token, no gate (plain LoRA fine-tuning)
LORA_SCOPES = ("listening", "listening_context", "all")


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class ARFlowConfig:
    d_latent: int = 16         # Dv, VAE latent size
    d_text: int = 384          # text encoder output (bundled MiniLM: 384)
    d_audio: int = 80          # audio features per frame (log-mel: 80)
    d_model: int = 128         # D
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    r: int = 8                 # frames per latent token
    window: int = 200          # L, frames per training window
    dropout: float = 0.0       # residual / embedding dropout (training only)
    attn_dropout: float | None = None  # dropout on attention probabilities; None = dropout (fused kernels need 0)
    p_drop_text: float = 0.1   # condition dropout probabilities (CFG training)
    p_drop_audio: float = 0.1  # audio = both streams together
    p_drop_motion: float = 0.1  # partner motion
    rope_base: float = 10000.0
    audio_stride: int = 1      # audio frames per audio token (1 = paper: one token per frame)
    causal_prefix: bool = False  # True: causal-in-time prefix (module docstring; real-time streaming)
    listen_adapter: int = 0    # width of the listening adapter (ListenAdapter; RL's algo.listen_adapter); 0 = none
    listen_lora: int = 0       # rank of the listening low-rank updates (ListenLoRA; RL's algo.listen_lora); 0 = none
    lora_scope: str = "listening"  # where those updates act: LORA_SCOPES

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"ARFlowConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"ARFlowConfig: head dim {self.d_model // self.n_heads} must be even for rotary embeddings")
        if self.r < 1 or self.window % self.r:
            raise ValueError(f"ARFlowConfig: window={self.window} must be a positive multiple of r={self.r}")
        if self.audio_stride < 1 or self.r % self.audio_stride:
            raise ValueError(f"ARFlowConfig: audio_stride={self.audio_stride} must be a positive divisor of r={self.r}")
        for name in ("dropout", "attn_dropout", "p_drop_text", "p_drop_audio", "p_drop_motion"):
            p = getattr(self, name)
            if p is None and name == "attn_dropout":
                continue
            if not 0.0 <= p < 1.0:
                raise ValueError(f"ARFlowConfig: {name}={p} must be in [0, 1)")
        if int(self.listen_adapter) != self.listen_adapter or self.listen_adapter < 0:
            raise ValueError(f"ARFlowConfig: listen_adapter={self.listen_adapter!r} must be an integer >= 0 (0 = no adapter)")
        if int(self.listen_lora) != self.listen_lora or self.listen_lora < 0:
            raise ValueError(f"ARFlowConfig: listen_lora={self.listen_lora!r} must be an integer >= 0 (0 = none)")
        if self.lora_scope not in LORA_SCOPES:
            raise ValueError(f"ARFlowConfig: lora_scope={self.lora_scope!r} must be one of {list(LORA_SCOPES)}")
        if self.lora_scope != "listening" and not self.listen_lora:
            raise ValueError(f"ARFlowConfig: lora_scope={self.lora_scope} needs low-rank updates (listen_lora > 0)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_tokens(self) -> int:
        """Latent tokens per window (N = L / r)."""
        return self.window // self.r

    @classmethod
    def small(cls, **overrides) -> "ARFlowConfig":
        """CPU default: trains on the synthetic corpus in minutes on 2 cores.

        Audio is tokenised 4 frames per token (TMRoPE position = centre of the 4 frames), which
        cuts the prefix from 426 to 126 tokens; the paper preset keeps one token per frame. The
        prefix is causal in time (``causal_prefix``): a token needs only the audio up to its own
        last frame, which a real-time listener needs (one token of latency when streaming).
        """
        return cls(**{**dict(d_model=128, n_layers=4, n_heads=4, dropout=0.0, audio_stride=4, causal_prefix=True),
                      **overrides})

    @classmethod
    def paper(cls, **overrides) -> "ARFlowConfig":
        """Paper section 4.1: 6 layers, 16 heads, D = 512 (paper reports 19.3M trainable params).

        Dropout is not in the paper: residual and embedding dropout 0.1, none on the attention
        probabilities, so that training runs torch's fused attention kernels (attention dropout forces the
        math path, which materialises the (B, H, S, S) scores and a Bernoulli draw per score: SFT at 33 %
        of the GEMM peak instead of 72 % on the benchmark CPU, ``python train/bench_arflow.py``).
        Checkpoints saved before ``attn_dropout`` existed keep 0.1 there (None = dropout).
        """
        return cls(**{**dict(d_model=512, n_layers=6, n_heads=16, dropout=0.1, attn_dropout=0.0), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# positions and masks (pure functions; rotary embeddings in ``agents/attention.py``)


def token_positions(n: int, r: int, start: int = 0, device=None) -> Tensor:
    """TMRoPE timestamps of motion tokens start .. start+n-1: j * r + r // 2 -> (n,) float."""
    return torch.arange(start, start + n, device=device, dtype=torch.float32) * r + (r // 2)


def prefix_positions(L: int, N: int, r: int, device=None, audio_stride: int = 1) -> Tensor:
    """Timestamps of the prefix [text; partner audio; partner motion; actor audio] -> (1 + 2L/s + N,).

    Audio token i covers frames [i*s, (i+1)*s) and sits at their centre i*s + (s-1)/2 (s = 1: i).
    """
    s = audio_stride
    audio = torch.arange(L // s, device=device, dtype=torch.float32) * s + (s - 1) / 2
    return torch.cat([torch.zeros(1, device=device), audio, token_positions(N, r, device=device), audio])


# kinds of sequence entries (``PrefixLayout.kind``); HISTORY marks clean-token slots of a causal cache
TEXT, AUDIO, MOTION, HISTORY = range(4)


@dataclass(frozen=True)
class PrefixLayout:
    """Per-entry description of prefix entries (or cache slots), each (P,):

    ``pos`` float TMRoPE timestamp; ``kind`` long (TEXT, AUDIO, MOTION = partner motion, HISTORY);
    ``tok`` long: the motion token whose frames hold the entry (audio token covering frames
    [a, b) -> (b - 1) // r; partner or history token j -> j; text -> 0).
    """

    pos: Tensor
    kind: Tensor
    tok: Tensor

    def __len__(self) -> int:
        return self.pos.shape[0]

    def take(self, idx) -> "PrefixLayout":
        return PrefixLayout(self.pos[idx], self.kind[idx], self.tok[idx])

    @staticmethod
    def cat(parts: list["PrefixLayout"]) -> "PrefixLayout":
        return PrefixLayout(*(torch.cat([getattr(p, f) for p in parts]) for f in ("pos", "kind", "tok")))


def prefix_layout(L: int, N: int, r: int, audio_stride: int = 1, device=None) -> PrefixLayout:
    """Layout of the prefix [text; partner audio (L/s); partner motion (N); actor audio (L/s)]."""
    s, na = audio_stride, L // audio_stride
    audio_tok = ((torch.arange(na, device=device) + 1) * s - 1) // r  # (L/s,) token of each audio token's last frame

    def full(n, v):
        return torch.full((n,), v, dtype=torch.long, device=device)

    kind = torch.cat([full(1, TEXT), full(na, AUDIO), full(N, MOTION), full(na, AUDIO)])
    tok = torch.cat([full(1, 0), audio_tok, torch.arange(N, device=device), audio_tok])
    return PrefixLayout(prefix_positions(L, N, r, device=device, audio_stride=s), kind, tok)


def causal_prefix_mask(q: PrefixLayout, k: PrefixLayout) -> Tensor:
    """Causal-in-time prefix attention (module docstring) of queries ``q`` to keys ``k`` -> (Pq, Pk) bool.

    Text sees text; audio sees text and audio with timestamp <= its own; partner motion sees the
    text, audio and partner motion of tokens <= its own. HISTORY keys are never seen.
    """
    kq, kk = q.kind[:, None], k.kind[None, :]
    key_text = kk == TEXT
    audio_ok = key_text | ((kk == AUDIO) & (k.pos[None, :] <= q.pos[:, None]))
    motion_ok = (kk <= MOTION) & (k.tok[None, :] <= q.tok[:, None])
    return ((kq == TEXT) & key_text) | ((kq == AUDIO) & audio_ok) | ((kq == MOTION) & motion_ok)


def attention_mask(P: int, n_clean: int, noisy_idx: Tensor, prefix_tok: Tensor | None = None,
                   prefix_mask: Tensor | None = None) -> Tensor:
    """Boolean mask (S, S), True = may attend, for the sequence [prefix (P); clean (n_clean); noisy (M)].

    ``noisy_idx`` (M,) long: token index of each noisy token. Prefix: ``prefix_mask`` (P, P) among
    the prefix (None: all of it, bidirectional) and nothing else. Clean j: prefix + clean <= j.
    Noisy token with index l: prefix + clean < l + itself. ``prefix_tok`` (P,) (causal prefix):
    clean j / noisy l see only the prefix entries with ``prefix_tok`` <= j / <= l (None: all).
    """
    M = noisy_idx.shape[0]
    S = P + n_clean + M
    dev = noisy_idx.device
    mask = torch.zeros(S, S, dtype=torch.bool, device=dev)
    mask[:, :P] = True
    c = torch.arange(n_clean, device=dev)
    if prefix_mask is not None:
        mask[:P, :P] = prefix_mask
    if prefix_tok is not None:
        mask[P:P + n_clean, :P] = prefix_tok[None, :] <= c[:, None]
        mask[P + n_clean:, :P] = prefix_tok[None, :] <= noisy_idx[:, None]
    mask[P:P + n_clean, P:P + n_clean] = c[None, :] <= c[:, None]
    mask[P + n_clean:, P:P + n_clean] = c[None, :] < noisy_idx[:, None]
    mask[P + n_clean:, P + n_clean:] = torch.eye(M, dtype=torch.bool, device=dev)
    return mask


class CausalSlots:
    """Slot layout of a causal-prefix KV cache for ``n_tokens`` tokens:

        [text; group 0; history 0; group 1; history 1; ...]

    group j = the prefix entries of token j (``tok == j``) in prefix order (partner audio, partner
    motion, actor audio), the text joining group 0. History (or noisy) token l at ``hist[l]`` then
    attends to exactly the slots [0, hist[l]], with no mask; group j can be computed as soon as its
    entries are known (:meth:`ARFlow.extend`). ``layout`` describes every slot.
    """

    def __init__(self, prefix: PrefixLayout, n_tokens: int, r: int):
        parts, self.start, self.hist, at = [], [], [], 0
        for j in range(n_tokens):
            idx = ((prefix.tok == j) & (prefix.kind != TEXT)).nonzero()[:, 0]
            if j == 0:
                idx = torch.cat([(prefix.kind == TEXT).nonzero()[:, 0], idx])
            dev = prefix.pos.device
            hist = PrefixLayout(torch.full((1,), float(j * r + r // 2), device=dev),
                                torch.full((1,), HISTORY, dtype=torch.long, device=dev), torch.full((1,), j, device=dev))
            parts += [prefix.take(idx), hist]
            self.start.append(at)
            at += idx.shape[0]
            self.hist.append(at)
            at += 1
        self.layout = PrefixLayout.cat(parts)
        self.size = at

    def group(self, j: int) -> slice:
        """Slots of group j."""
        return slice(self.start[j], self.hist[j])


# --------------------------------------------------------------------------------------------
# modules, in build-up order


class TimeEmbedding(nn.Module):
    """Flow time t in [0, 1] (any shape) -> (..., D): sinusoidal features of 1000 t -> MLP."""

    def __init__(self, d_model: int, n_freq: int = N_TIME_FREQ):
        super().__init__()
        half = n_freq // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: Tensor) -> Tensor:
        ang = (1000.0 * t.float())[..., None] * self.freqs  # (..., n_freq / 2)
        return self.mlp(torch.cat([ang.cos(), ang.sin()], dim=-1))  # (..., D)


class KVCache:
    """Per-layer rotated keys/values of the prefix and the clean history of one window.

    ``k[i]``, ``v[i]``: (B, H, P + n_tokens, hd). Bidirectional prefix (``slots`` None): slots
    [0, P) hold the prefix, slot P + j the clean token j for j < ``length``. Causal prefix: the
    token-by-token layout of ``slots`` (:class:`CausalSlots`), of which ``groups`` prefix groups are
    computed (slots not yet written hold zeros). The slot of history token j
    (:meth:`history_slot`) is scratch from ``length`` on: ``ARFlow.velocity`` computes the noisy
    token's keys/values there (the valid part is never modified), ``ARFlow.append`` commits a clean
    token there. ``cos``/``sin`` (n_tokens, hd/2): rotary tables of the motion tokens.
    """

    def __init__(self, k: list[Tensor], v: list[Tensor], prefix_len: int, n_tokens: int, cos: Tensor, sin: Tensor,
                 length: int = 0, slots: CausalSlots | None = None, groups: int | None = None):
        self.k, self.v = k, v
        self.prefix_len, self.n_tokens, self.length = prefix_len, n_tokens, length
        self.cos, self.sin = cos, sin
        self.slots = slots
        self.groups = n_tokens if groups is None else groups  # prefix groups computed (all, without a causal layout)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def history_slot(self, l: int) -> int:
        return self.prefix_len + l if self.slots is None else self.slots.hist[l]

    def _map(self, fn) -> "KVCache":
        return KVCache([fn(t) for t in self.k], [fn(t) for t in self.v], self.prefix_len, self.n_tokens, self.cos, self.sin,
                       self.length, self.slots, self.groups)

    def select(self, idx) -> "KVCache":
        """Rows ``idx`` (index tensor, list or slice) as a new cache (copies)."""
        return self._map(lambda t: t[idx].contiguous())

    def repeat_interleave(self, repeats: int) -> "KVCache":
        """Each row repeated ``repeats`` times in place order (row0, row0, ..., row1, ...), e.g. G rollouts per prompt."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def clone(self) -> "KVCache":
        return self._map(lambda t: t.clone())

    @staticmethod
    def cat(caches: list["KVCache"]) -> "KVCache":
        """Stack caches of the same window layout along the batch dim (copies)."""
        c0 = caches[0]
        if any((c.prefix_len, c.n_tokens, c.length, c.groups, c.slots is None) !=
               (c0.prefix_len, c0.n_tokens, c0.length, c0.groups, c0.slots is None) for c in caches):
            raise ValueError("KVCache.cat: caches differ in prefix length, size, layout or progress")
        k = [torch.cat([c.k[i] for c in caches]) for i in range(len(c0.k))]
        v = [torch.cat([c.v[i] for c in caches]) for i in range(len(c0.v))]
        return KVCache(k, v, c0.prefix_len, c0.n_tokens, c0.cos, c0.sin, c0.length, c0.slots, c0.groups)

    def __repr__(self) -> str:
        layout = "" if self.slots is None else f", causal groups={self.groups}"
        return (f"KVCache(batch={self.batch_size}, layers={len(self.k)}, prefix={self.prefix_len}, "
                f"length={self.length}/{self.n_tokens}{layout})")


@dataclass
class Context:
    """Per-layer rotated keys/values ``k[i]``, ``v[i]`` (B, H, P + n_clean, hd) of one window's
    [prefix (P); clean history (n_clean)], from :meth:`ARFlow.encode_context` (with autograd when
    enabled); ``prefix_tok`` (P,) the token of each prefix entry with a causal prefix, else None."""

    k: list[Tensor]
    v: list[Tensor]
    prefix_len: int
    n_clean: int
    prefix_tok: Tensor | None

    def detached(self) -> "Context":
        """The same keys/values as new leaves (requiring grad when these do): gradients of passes
        against it gather in their ``.grad``, to be sent through this context's graph once."""
        def leaf(t):
            return t.detach().requires_grad_(t.requires_grad)

        return Context([leaf(t) for t in self.k], [leaf(t) for t in self.v], self.prefix_len, self.n_clean, self.prefix_tok)


class ListenAdapter(nn.Module):
    """A velocity added to the listening tokens only: an MLP on the head's input, its output layer
    zero-initialised (a new adapter changes nothing). RL can train it alone (``algo.listen_adapter``),
    the transformer frozen: a speaking token's velocity is then the supervised head's, up to what the
    listening tokens before it change in its context."""

    def __init__(self, d_model: int, width: int, d_latent: int):
        super().__init__()
        self.fc = nn.Linear(d_model, width)
        self.proj = nn.Linear(width, d_latent)
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, z: Tensor) -> Tensor:  # (..., D) -> (..., Dv)
        return self.proj(torch.nn.functional.gelu(self.fc(z)))


class ListenLoRA(nn.Module):
    """Low-rank updates of every block's linear maps (:class:`~.attention.BlockDelta`, LoRA) that act on
    the noisy listening tokens only. Noisy tokens are read by no other token (the prefix and the clean
    history never attend to them), so with the transformer frozen a speaking token's velocity is the
    supervised model's given its context, while a listening token can re-weight what it reads there
    (partner motion, audio, its own history) in every layer. RL can train it alone (``algo.listen_lora``).

    ``ARFlowConfig.lora_scope`` (:data:`LORA_SCOPES`) widens that: "listening_context" also on the context
    entries of listening tokens (the prefix group and the clean history token of every token the actor
    listens in; never the text), so the context is re-encoded where the actor listens, which later speaking
    tokens read too (those entries take their mask from ``cond["speaking_tokens"]`` (B, N); ``ARFlow.append``
    its ``speaking``); "all" on every entry of every token with no gate: plain LoRA fine-tuning."""

    def __init__(self, cfg: "ARFlowConfig"):
        super().__init__()
        self.blocks = nn.ModuleList([BlockDelta(cfg.d_model, cfg.mlp_ratio, cfg.listen_lora) for _ in range(cfg.n_layers)])


class ARFlow(nn.Module):
    """AR-Flow transformer. See the module docstring for the sequence, positions and masks."""

    T_TEXT, T_PTN_AUDIO, T_PTN_MOTION, T_ACT_AUDIO, T_HISTORY, T_NOISY = range(6)

    def __init__(self, cfg: ARFlowConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        # condition projectors (paper P_txt, P_audio (shared by both streams), P_motion)
        self.text_proj = nn.Linear(cfg.d_text, D)
        self.audio_proj = nn.Linear(cfg.d_audio * cfg.audio_stride, D)  # audio_stride frames per token
        self.partner_proj = nn.Linear(cfg.d_latent, D)
        self.latent_in = nn.Linear(cfg.d_latent, D)  # actor latents, clean history and noisy tokens
        self.null_text = nn.Parameter(torch.zeros(D))
        self.null_audio = nn.Parameter(torch.zeros(D))
        self.null_motion = nn.Parameter(torch.zeros(D))
        self.type_emb = nn.Parameter(torch.zeros(6, D))
        self.time_emb = TimeEmbedding(D)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(D, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.attn_dropout)
                                     for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(D, elementwise_affine=False)
        self.final_mod = nn.Linear(D, 2 * D)  # t -> (shift, scale) of the final norm
        self.head = nn.Linear(D, cfg.d_latent)
        self._init_weights()
        self.listen_adapter = ListenAdapter(D, cfg.listen_adapter, cfg.d_latent) if cfg.listen_adapter else None
        self.listen_lora = ListenLoRA(cfg) if cfg.listen_lora else None

    @property
    def takes_speaking(self) -> bool:
        """Whether velocities need the tokens' speaking mask (a listening adapter or listening LoRA)."""
        return self.listen_adapter is not None or self._gated_lora

    @property
    def _gated_lora(self) -> bool:
        """Low-rank updates gated per token (every scope but "all")."""
        return self.listen_lora is not None and self.cfg.lora_scope != "all"

    def add_listen_adapter(self, width: int) -> ListenAdapter:
        """Give this model a new (zero-output) :class:`ListenAdapter` of ``width`` hidden units; its
        velocities stay those of the model without it until the adapter is trained."""
        if self.listen_adapter is not None:
            raise ValueError(f"arflow: the model already has a listening adapter (width {self.cfg.listen_adapter})")
        self.cfg.listen_adapter = int(width)
        self.cfg.__post_init__()
        dev = self.head.weight.device
        self.listen_adapter = ListenAdapter(self.cfg.d_model, self.cfg.listen_adapter, self.cfg.d_latent).to(dev)
        return self.listen_adapter

    def add_listen_lora(self, rank: int, scope: str = "listening") -> ListenLoRA:
        """Give this model new (zero) :class:`ListenLoRA` updates of rank ``rank`` acting on ``scope``
        (:data:`LORA_SCOPES`); its velocities stay those of the model without them until they are trained."""
        if self.listen_lora is not None:
            raise ValueError(f"arflow: the model already has listening low-rank updates (rank {self.cfg.listen_lora})")
        self.cfg.listen_lora, self.cfg.lora_scope = int(rank), scope
        self.cfg.__post_init__()
        self.listen_lora = ListenLoRA(self.cfg).to(self.head.weight.device)
        return self.listen_lora

    def _listening(self, speaking: Tensor | None, shape) -> Tensor:
        """The listening gate (*shape, 1) float of tokens whose speaking mask is ``speaking`` (*shape) bool;
        a clear error when a model that needs the mask (:attr:`takes_speaking`) is not given it."""
        if speaking is None:
            raise ValueError(f"arflow: this model has a listening adapter or listening low-rank updates (arch "
                             f"listen_adapter={self.cfg.listen_adapter}, listen_lora={self.cfg.listen_lora}); its "
                             "velocities need the speaking mask of the tokens (speaking_tokens / speaking)")
        if tuple(speaking.shape) != tuple(shape):
            raise ValueError(f"arflow: speaking mask of shape {tuple(speaking.shape)} for tokens {tuple(shape)}")
        return (~speaking.bool()).unsqueeze(-1).float()  # (*shape, 1)

    def _context_gate(self, cond: Mapping[str, Tensor], tok: Tensor, text: Tensor | None = None) -> Tensor | None:
        """The listening gate (B, S, 1) float of context entries (prefix or history) of tokens ``tok`` (S,) long,
        from ``cond["speaking_tokens"]`` (B, N) bool; entries where ``text`` (S,) bool is set get 0. None unless
        the low-rank updates act on the context (``lora_scope="listening_context"``)."""
        if not context_gated(self):
            return None
        spk = cond.get("speaking_tokens")
        B, N = cond["text_emb"].shape[0], cond["partner_latent"].shape[1]
        if spk is None:
            raise ValueError("arflow: this model's listening low-rank updates act on the context (arch "
                             "lora_scope=listening_context); its conditioning needs the tokens' speaking mask "
                             "cond['speaking_tokens'] (B, N) bool")
        if tuple(spk.shape) != (B, N):
            raise ValueError(f"arflow: cond['speaking_tokens'] has shape {tuple(spk.shape)}, expected ({B}, {N}) "
                             "(one per partner token)")
        gate = (~spk.bool())[:, tok].float()  # (B, S)
        if text is not None:
            gate = gate * (~text).float()
        return gate.unsqueeze(-1)  # (B, S, 1)

    def _delta(self, i: int, gate: Tensor | None) -> dict:
        """Block i's keyword arguments for the low-rank updates: none without them, or without a gate unless
        they act everywhere (``lora_scope="all"``: no gate)."""
        if self.listen_lora is None:
            return {}
        if self.cfg.lora_scope == "all":
            return {"delta": self.listen_lora.blocks[i], "gate": None}
        if gate is None:
            return {}
        return {"delta": self.listen_lora.blocks[i], "gate": gate}

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:  # nanoGPT: scaled init of residual projections
            for lin in (blk.attn.proj, blk.mlp.proj):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
        for p in (self.null_text, self.null_audio, self.null_motion, self.type_emb):
            nn.init.normal_(p, std=0.02)
        nn.init.zeros_(self.final_mod.weight)
        nn.init.zeros_(self.final_mod.bias)

    # ---- conditioning ---------------------------------------------------------------------

    def check_cond(self, cond: Mapping[str, Tensor]) -> tuple[int, int, int]:
        """Validate shapes of a conditioning dict; returns (B, L, N)."""
        c = self.cfg
        for key in ("text_emb", "actor_audio", "partner_audio", "partner_latent"):
            if key not in cond:
                raise KeyError(f"arflow: conditioning dict lacks {key!r}; expected keys {COND_KEYS}")
        B = cond["text_emb"].shape[0]
        expect = {"text_emb": (B, c.d_text), "actor_audio": (B, None, c.d_audio), "partner_audio": (B, None, c.d_audio),
                  "partner_latent": (B, None, c.d_latent), "text_mask": (B,), "partner_has_motion": (B,)}
        for key, shape in expect.items():
            if key not in cond or cond[key] is None:
                continue
            got = tuple(cond[key].shape)
            if len(got) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got)):
                want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
                raise ValueError(f"arflow: cond[{key!r}] has shape {got}, expected {want}")
        L = cond["actor_audio"].shape[1]
        if cond["partner_audio"].shape[1] != L:
            raise ValueError(f"arflow: partner_audio has {cond['partner_audio'].shape[1]} frames, actor_audio {L}")
        return B, L, cond["partner_latent"].shape[1]

    def sample_drop(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Training condition dropout: independent Bernoulli masks (B,) per condition."""
        c = self.cfg
        probs = {"text": c.p_drop_text, "audio": c.p_drop_audio, "motion": c.p_drop_motion}
        return {k: torch.rand(batch_size, device=device, generator=generator) < p for k, p in probs.items()}

    def _null_masks(self, cond, drop, B: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """(B,) bool masks, True = use the null embedding, for text, audio and partner motion."""
        if drop is None:
            drop = self.sample_drop(B, device) if self.training else {}
        bad = set(drop) - set(DROP_KEYS)
        if bad:
            raise ValueError(f"arflow: unknown drop keys {sorted(bad)}; valid: {DROP_KEYS}")

        def as_mask(v):
            if v is None or v is False:
                return torch.zeros(B, dtype=torch.bool, device=device)
            if v is True:
                return torch.ones(B, dtype=torch.bool, device=device)
            if v.shape != (B,):
                raise ValueError(f"arflow: drop mask has shape {tuple(v.shape)}, expected ({B},)")
            return v.to(device=device, dtype=torch.bool)

        text = as_mask(drop.get("text"))
        if cond.get("text_mask") is not None:
            text = text | ~cond["text_mask"].to(device=device, dtype=torch.bool)
        motion = as_mask(drop.get("motion"))
        if cond.get("partner_has_motion") is not None:
            motion = motion | ~cond["partner_has_motion"].to(device=device, dtype=torch.bool)
        return text, as_mask(drop.get("audio")), motion

    def embed_prefix(self, cond: Mapping[str, Tensor], drop=None) -> tuple[Tensor, Tensor]:
        """-> prefix tokens (B, P, D) and their TMRoPE positions (P,), P = 1 + 2L/s + N (s = audio_stride)."""
        B, L, N = self.check_cond(cond)
        dev = cond["text_emb"].device
        drop_text, drop_audio, drop_motion = self._null_masks(cond, drop, B, dev)
        c_txt = torch.where(drop_text[:, None], self.null_text, self.text_proj(cond["text_emb"]))  # (B, D)
        s = self.cfg.audio_stride
        a_ptn = self.audio_proj(self._stack_audio(cond["partner_audio"], s))  # (B, L/s, D)
        a_ptn = torch.where(drop_audio[:, None, None], self.null_audio, a_ptn)
        m_ptn = torch.where(drop_motion[:, None, None], self.null_motion, self.partner_proj(cond["partner_latent"]))  # (B, N, D)
        a_act = self.audio_proj(self._stack_audio(cond["actor_audio"], s))  # (B, L/s, D)
        a_act = torch.where(drop_audio[:, None, None], self.null_audio, a_act)
        te = self.type_emb
        h = torch.cat([(c_txt + te[self.T_TEXT])[:, None], a_ptn + te[self.T_PTN_AUDIO],
                       m_ptn + te[self.T_PTN_MOTION], a_act + te[self.T_ACT_AUDIO]], dim=1)  # (B, P, D)
        return h, prefix_positions(L, N, self.cfg.r, device=dev, audio_stride=s)

    @staticmethod
    def _stack_audio(a: Tensor, s: int) -> Tensor:  # (B, L, Da) -> (B, L/s, s*Da): s frames per token
        B, L, Da = a.shape
        return a[:, : L - L % s].reshape(B, L // s, s * Da)

    def _embed_clean(self, x: Tensor) -> Tensor:  # (B, n, Dv) -> (B, n, D)
        return self.latent_in(x) + self.type_emb[self.T_HISTORY]

    def _embed_noisy(self, x_t: Tensor, temb: Tensor) -> Tensor:  # (B, n, Dv), (B, n, D) -> (B, n, D)
        return self.latent_in(x_t) + self.type_emb[self.T_NOISY] + temb

    def _out(self, h: Tensor, temb: Tensor, speaking: Tensor | None = None) -> Tensor:  # (..., D), (..., D), (...) -> (..., Dv)
        """Velocity from the last hidden state; with a listening adapter ``speaking`` (the tokens' bool
        speaking mask, the CFG's ``speaking_tokens``) says which tokens get the adapter's term (the others)."""
        shift, scale = self.final_mod(temb).chunk(2, dim=-1)
        z = self.ln_f(h) * (1.0 + scale) + shift  # (..., D)
        v = self.head(z)  # (..., Dv)
        if self.listen_adapter is None:
            return v
        return v + self._listening(speaking, v.shape[:-1]).to(v.dtype) * self.listen_adapter(z)  # (..., Dv)

    def _rope(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_base)

    # ---- full-sequence passes (training, reference) -----------------------------------------

    def _prefix_structure(self, cond) -> tuple[Tensor | None, Tensor | None]:
        """(prefix_tok (P,), prefix_mask (P, P)) of a causal prefix for ``cond``; (None, None) when bidirectional."""
        if not self.cfg.causal_prefix:
            return None, None
        c = self.cfg
        lay = prefix_layout(cond["actor_audio"].shape[1], cond["partner_latent"].shape[1], c.r, c.audio_stride,
                            cond["actor_audio"].device)
        return lay.tok, causal_prefix_mask(lay, lay)

    def _full_pass(self, cond, x_clean: Tensor, x_noisy: Tensor, t: Tensor, noisy_idx: Tensor, drop,
                   speaking: Tensor | None = None) -> Tensor:
        """Sequence [prefix; x_clean (B, n, Dv); x_noisy (B, M, Dv)] -> velocities (B, M, Dv); ``speaking``
        (B, M) bool: the noisy tokens' speaking mask (needed with listening parts: adapter, LoRA)."""
        h_pre, pos_pre = self.embed_prefix(cond, drop)
        P, n, r = h_pre.shape[1], x_clean.shape[1], self.cfg.r
        temb = self.time_emb(t)  # (B, M, D)
        h = torch.cat([h_pre, self._embed_clean(x_clean), self._embed_noisy(x_noisy, temb)], dim=1)  # (B, S, D)
        pos = torch.cat([pos_pre, token_positions(n, r, device=h.device), noisy_idx.float() * r + (r // 2)])  # (S,)
        cos, sin = self._rope(pos)
        mask = attention_mask(P, n, noisy_idx, *self._prefix_structure(cond))  # (S, S)
        gate = None
        if self._gated_lora:  # the noisy listening tokens; the context's only with lora_scope=listening_context
            listen = self._listening(speaking, x_noisy.shape[:2])  # (B, M, 1)
            ctx = self._context_entries_gate(cond, n)  # (B, P + n, 1) or None
            gate = torch.cat([listen.new_zeros(x_noisy.shape[0], P + n, 1) if ctx is None else ctx, listen], dim=1)  # (B, S, 1)
        h = self.drop(h)
        for i, blk in enumerate(self.blocks):
            h = blk(h, cos, sin, mask, **self._delta(i, gate))
        return self._out(h[:, P + n:], temb, speaking)  # (B, M, Dv)

    def _context_entries_gate(self, cond, n: int) -> Tensor | None:
        """Listening gate (B, P + n, 1) of [prefix; n clean history tokens] (None without context updates)."""
        if not context_gated(self):
            return None
        c, dev = self.cfg, cond["text_emb"].device
        lay = prefix_layout(cond["actor_audio"].shape[1], cond["partner_latent"].shape[1], c.r, c.audio_stride, dev)
        tok = torch.cat([lay.tok, torch.arange(n, device=dev)])  # (P + n,)
        text = torch.cat([lay.kind == TEXT, torch.zeros(n, dtype=torch.bool, device=dev)])
        return self._context_gate(cond, tok, text)

    def forward(self, cond: Mapping[str, Tensor], x_clean: Tensor, x_noisy: Tensor, t: Tensor, drop=None,
                speaking: Tensor | None = None) -> Tensor:
        """Teacher-forced velocities of all N tokens: x_clean, x_noisy (B, N, Dv), t (B, N) -> (B, N, Dv).

        Noisy token l sees the prefix, x_clean[:, :l] and itself. ``drop``: optional dict of (B,)
        bool masks {"text", "audio", "motion"} forcing nulls; None draws condition dropout when
        ``self.training`` (no dropout in eval). ``speaking`` (B, N) bool: the tokens' speaking mask
        (needed with listening parts: adapter, LoRA).
        """
        B, N, _ = x_noisy.shape
        if x_clean.shape[1] < N - 1 or t.shape != (B, N):
            raise ValueError(f"arflow.forward: x_clean {tuple(x_clean.shape)}, x_noisy {tuple(x_noisy.shape)}, "
                             f"t {tuple(t.shape)}: need x_clean with >= N-1 tokens and t (B, N)")
        idx = torch.arange(N, device=x_noisy.device)
        return self._full_pass(cond, x_clean[:, :N], x_noisy, t, idx, drop, speaking)

    def velocity_uncached(self, cond, history: Tensor, x_t: Tensor, t: Tensor, drop=None,
                          speaking: Tensor | None = None) -> Tensor:
        """Velocity of token l = history.shape[1] by a full recompute: history (B, l, Dv), x_t (B, Dv), t (B,),
        speaking (B,) bool (with listening parts: adapter, LoRA) -> (B, Dv)."""
        l = history.shape[1]
        idx = torch.full((1,), l, device=x_t.device, dtype=torch.long)
        spk = None if speaking is None else speaking[:, None]
        return self._full_pass(cond, history, x_t[:, None], t[:, None], idx, drop, spk)[:, 0]

    def _fill_kv(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, K: list[Tensor], V: list[Tensor],
                 at: int, gate: Tensor | None = None) -> None:
        """Write the rotated keys/values of entries whose outputs nobody reads (prefix, context) into
        K[i], V[i] (B, H, C, hd) at slots [at, at + S): h (B, S, D) attends as in ``Block`` with
        ``mask`` (S, at + S); the last block computes its keys/values only (no attention, no MLP).
        ``gate`` (B, S, 1): of the listening low-rank updates on these entries (``lora_scope``)."""
        for i, (blk, k, v) in enumerate(zip(self.blocks[:-1], K, V)):
            h = blk(h, cos, sin, mask, (k, v), at, **self._delta(i, gate))
        last, (B, S, _) = self.blocks[-1], h.shape
        a, x = last.attn, last.ln1(h)
        qkv = a.qkv(x)  # (B, S, 3 D)
        delta = self._delta(len(self.blocks) - 1, gate)
        if delta:
            qkv = gated_delta(qkv, delta["delta"].qkv, x, delta["gate"])
        _, k, v = qkv.view(B, S, 3, a.n_heads, a.head_dim).permute(2, 0, 3, 1, 4)  # as SelfAttention: (B, H, S, hd)
        K[-1][:, :, at:at + S] = apply_rope(k, cos, sin)
        V[-1][:, :, at:at + S] = v

    # ---- two-stage passes (RL replay: one prefix pass shared by many noisy tokens) --------------

    def encode_context(self, cond: Mapping[str, Tensor], x_clean: Tensor, drop=None) -> Context:
        """Keys/values of [prefix; x_clean (B, n, Dv)] in every layer (with autograd when enabled).

        The masks are those of ``forward``; noisy tokens never influence these entries, so
        :meth:`velocity_in_context` against this context equals the full pass up to float rounding.
        """
        h_pre, pos_pre = self.embed_prefix(cond, drop)  # (B, P, D), (P,)
        B, P, _ = h_pre.shape
        n, c = x_clean.shape[1], self.cfg
        h = torch.cat([h_pre, self._embed_clean(x_clean)], dim=1)  # (B, C, D), C = P + n
        cos, sin = self._rope(torch.cat([pos_pre, token_positions(n, c.r, device=h.device)]))
        prefix_tok, prefix_mask = self._prefix_structure(cond)
        mask = attention_mask(P, n, torch.zeros(0, dtype=torch.long, device=h.device), prefix_tok, prefix_mask)  # (C, C)
        K = [h.new_zeros(B, c.n_heads, P + n, c.head_dim) for _ in self.blocks]
        V = [h.new_zeros(B, c.n_heads, P + n, c.head_dim) for _ in self.blocks]
        self._fill_kv(self.drop(h), cos, sin, mask, K, V, 0, self._context_entries_gate(cond, n))
        return Context(K, V, P, n, prefix_tok)

    def velocity_in_context(self, ctx: Context, x_noisy: Tensor, t: Tensor, noisy_idx: Tensor,
                            speaking: Tensor | None = None) -> Tensor:
        """Velocities of noisy tokens against a context: x_noisy (B, M, Dv), t (B, M), noisy_idx (M,) long
        (token index l of each; l <= ctx.n_clean), speaking (B, M) bool (with listening parts: adapter, LoRA)
        -> (B, M, Dv). Token l sees the prefix (of tokens <= l with a causal prefix), clean tokens < l
        and itself, as in ``forward``."""
        B, M, _ = x_noisy.shape
        P, n, c = ctx.prefix_len, ctx.n_clean, self.cfg
        if int(noisy_idx.max()) > n:
            raise ValueError(f"arflow.velocity_in_context: token {int(noisy_idx.max())} needs history the context "
                             f"lacks ({n} clean tokens)")
        temb = self.time_emb(t)  # (B, M, D)
        h = self._embed_noisy(x_noisy, temb)  # (B, M, D)
        cos, sin = self._rope(noisy_idx.float() * c.r + (c.r // 2))
        mask = attention_mask(P, n, noisy_idx, ctx.prefix_tok)[P + n:]  # (M, C + M)
        gate = self._listening(speaking, (B, M)) if self._gated_lora else None  # (B, M, 1)
        h = self.drop(h)
        for i, (blk, k, v) in enumerate(zip(self.blocks, ctx.k, ctx.v)):
            room = k.new_zeros(B, c.n_heads, M, c.head_dim)
            h = blk(h, cos, sin, mask, (torch.cat([k, room], 2), torch.cat([v, room], 2)), P + n,  # fresh buffers
                    **self._delta(i, gate))
        return self._out(h, temb, speaking)  # (B, M, Dv)

    # ---- cached generation ------------------------------------------------------------------

    @torch.no_grad()
    def start(self, cond: Mapping[str, Tensor], drop=None, n_tokens: int | None = None, groups: int | None = None) -> KVCache:
        """Run the prefix once; cache its per-layer rotated K, V (room for ``n_tokens`` history tokens).

        With a causal prefix the cache has the token-by-token layout of :class:`CausalSlots` and holds
        the prefix groups of tokens < ``groups`` (default: all ``n_tokens``; 0: none yet, the caller
        adds them with :meth:`extend`; ``cond`` then needs only its batch size and ``text_emb``).
        """
        if self.cfg.causal_prefix:
            return self._start_causal(cond, drop, n_tokens, groups)
        if groups is not None:
            raise ValueError("arflow.start: groups is for a causal prefix (ARFlowConfig.causal_prefix); this model's is bidirectional")
        h, pos = self.embed_prefix(cond, drop)  # (B, P, D), (P,)
        B, P, _ = h.shape
        N = cond["partner_latent"].shape[1] if n_tokens is None else int(n_tokens)
        c = self.cfg
        K = [h.new_empty(B, c.n_heads, P + N, c.head_dim) for _ in self.blocks]
        V = [h.new_empty(B, c.n_heads, P + N, c.head_dim) for _ in self.blocks]
        cos, sin = self._rope(pos)
        self._fill_kv(self.drop(h), cos, sin, None, K, V, 0, self._context_entries_gate(cond, 0))
        tcos, tsin = self._rope(token_positions(N, c.r, device=h.device))
        return KVCache(K, V, P, N, tcos, tsin)

    def _start_causal(self, cond, drop, n_tokens: int | None, groups: int | None) -> KVCache:
        c = self.cfg
        B, dev = cond["text_emb"].shape[0], cond["text_emb"].device
        N = cond["partner_latent"].shape[1] if n_tokens is None else int(n_tokens)
        G = N if groups is None else int(groups)
        if not 0 <= G <= N:
            raise ValueError(f"arflow.start: groups={groups} must be in [0, n_tokens={N}]")
        slots = CausalSlots(prefix_layout(N * c.r, N, c.r, c.audio_stride, dev), N, c.r)
        K = [torch.zeros(B, c.n_heads, slots.size, c.head_dim, device=dev) for _ in self.blocks]  # zeros: finite if masked
        V = [torch.zeros(B, c.n_heads, slots.size, c.head_dim, device=dev) for _ in self.blocks]
        tcos, tsin = self._rope(token_positions(N, c.r, device=dev))
        cache = KVCache(K, V, slots.size - N, N, tcos, tsin, slots=slots, groups=0)
        if G == 0:
            return cache
        _, L, Np = self.check_cond(cond)
        if L < G * c.r or Np < G:
            raise ValueError(f"arflow.start: {G} prefix groups need {G * c.r} audio frames and {G} partner tokens, "
                             f"cond has {L} and {Np}")
        # groups 0 .. G-1 in one pass (in group order, into a scratch buffer), then scattered to their slots
        h, _ = self.embed_prefix(cond, drop)  # (B, P, D)
        lay = prefix_layout(L, Np, c.r, c.audio_stride, dev)
        idx = torch.cat([((lay.tok == j) & (lay.kind != TEXT)).nonzero()[:, 0] for j in range(G)])
        idx = torch.cat([(lay.kind == TEXT).nonzero()[:, 0], idx])  # (S,) prefix entries in slot order
        dest = torch.cat([torch.arange(slots.start[j], slots.hist[j], device=dev) for j in range(G)])  # (S,) their slots
        sub = lay.take(idx)
        cos, sin = self._rope(sub.pos)
        mask = causal_prefix_mask(sub, sub)  # (S, S)
        Kt = [h.new_empty(B, c.n_heads, idx.shape[0], c.head_dim) for _ in self.blocks]  # (B, H, S, hd) scratch
        Vt = [h.new_empty(B, c.n_heads, idx.shape[0], c.head_dim) for _ in self.blocks]
        gate = self._context_gate(cond, sub.tok, sub.kind == TEXT)  # (B, S, 1) or None
        self._fill_kv(self.drop(h[:, idx]), cos, sin, mask, Kt, Vt, 0, gate)
        for k, v, kt, vt in zip(K, V, Kt, Vt):
            k[:, :, dest], v[:, :, dest] = kt, vt
        cache.groups = G
        return cache

    @torch.no_grad()
    def extend(self, cache: KVCache, cond: Mapping[str, Tensor], drop=None) -> None:
        """Causal prefix: compute the next prefix group j = ``cache.groups`` (the text too when j = 0)
        from ``cond`` (window-local; needs audio frames [0, (j+1) r) and partner tokens [0, j]; only
        token j's are read) into the cache. Token j's velocity needs its group; the groups of earlier
        tokens never change, so a window's prefix grows as its audio arrives."""
        if cache.slots is None:
            raise ValueError("arflow.extend: the cache has a bidirectional prefix (computed whole by start)")
        j, c = cache.groups, self.cfg
        if j >= cache.n_tokens:
            raise IndexError(f"arflow.extend: all {cache.n_tokens} prefix groups are computed")
        _, L, Np = self.check_cond(cond)
        if L < (j + 1) * c.r or Np < j + 1:
            raise ValueError(f"arflow.extend: prefix group {j} needs {(j + 1) * c.r} audio frames and {j + 1} partner "
                             f"tokens, cond has {L} and {Np}")
        f0, f1 = j * c.r, (j + 1) * c.r
        part = {**cond, "actor_audio": cond["actor_audio"][:, f0:f1], "partner_audio": cond["partner_audio"][:, f0:f1],
                "partner_latent": cond["partner_latent"][:, j:j + 1]}
        h, _ = self.embed_prefix(part, drop)  # (B, 1 + 2 r/s + 1, D): [text; partner audio; partner motion; actor audio]
        if j > 0:
            h = h[:, 1:]  # the text is in group 0
        at, S = cache.slots.start[j], h.shape[1]
        lay = cache.slots.layout
        mask = causal_prefix_mask(lay.take(slice(at, at + S)), lay.take(slice(0, at + S)))  # (S, at + S)
        cos, sin = self._rope(lay.pos[at:at + S])
        sub = lay.take(slice(at, at + S))
        gate = self._context_gate(cond, sub.tok, sub.kind == TEXT)  # (B, S, 1) or None
        self._fill_kv(self.drop(h), cos, sin, mask, cache.k, cache.v, at, gate)
        cache.groups = j + 1

    def _one_token(self, cache: KVCache, h: Tensor, l: int, commit: bool, gate: Tensor | None = None) -> Tensor:
        """Pass one token (B, 1, D) at token index l through all layers, attending to the cache slots
        before its own (prefix, history < l) + itself; ``gate`` (B, 1, 1): of the listening low-rank updates."""
        if not 0 <= l < cache.n_tokens:
            raise IndexError(f"arflow: token index {l} outside the cache's 0..{cache.n_tokens - 1}")
        if l > cache.length:
            raise ValueError(f"arflow: token {l} needs history 0..{l - 1}, but the cache holds {cache.length} tokens")
        if l >= cache.groups:
            raise ValueError(f"arflow: token {l} needs its prefix group, but the cache holds {cache.groups} (ARFlow.extend)")
        at = cache.history_slot(l)
        saved = None
        if not commit and l < cache.length:  # slot holds a committed token: restore it afterwards
            saved = [(k[:, :, at].clone(), v[:, :, at].clone()) for k, v in zip(cache.k, cache.v)]
        cos, sin = cache.cos[l:l + 1], cache.sin[l:l + 1]
        h = self.drop(h)
        for i, (blk, k, v) in enumerate(zip(self.blocks, cache.k, cache.v)):
            h = blk(h, cos, sin, None, (k, v), at, **self._delta(i, gate))
        if saved is not None:
            for (sk, sv), k, v in zip(saved, cache.k, cache.v):
                k[:, :, at], v[:, :, at] = sk, sv
        return h  # (B, 1, D)

    @torch.no_grad()
    def velocity(self, cache: KVCache, x_t: Tensor, t: Tensor, l: int, speaking: Tensor | None = None) -> Tensor:
        """One new-token pass: velocity of noisy token l, x_t (B, Dv), t (B,), speaking (B,) bool (with
        listening parts: adapter, LoRA) -> (B, Dv). Cache content unchanged."""
        temb = self.time_emb(t)  # (B, D)
        gate = self._listening(speaking, x_t.shape[:1])[:, None] if self._gated_lora else None  # (B, 1, 1)
        h = self._one_token(cache, self._embed_noisy(x_t, temb)[:, None], l, commit=False, gate=gate)
        return self._out(h[:, 0], temb, speaking)

    @torch.no_grad()
    def append(self, cache: KVCache, x: Tensor, l: int, speaking: Tensor | None = None) -> None:
        """Write clean token l (B, Dv) into the cache (history becomes 0..l; later tokens are discarded);
        ``speaking`` (B,) bool: token l's speaking mask, needed when the listening low-rank updates act on the
        context (``lora_scope="listening_context"``), ignored otherwise."""
        gate = self._listening(speaking, x.shape[:1])[:, None] if context_gated(self) else None  # (B, 1, 1)
        self._one_token(cache, self._embed_clean(x)[:, None], l, commit=True, gate=gate)
        cache.length = l + 1

    # ---- sampling (``agents/sampling.py``) ----------------------------------------------------

    def sample(self, cond: Mapping[str, Tensor], n_tokens: int | None = None, steps: int = 10, w_speak: float = 1.0,
               w_listen: float = 1.0, speaking_tokens: Tensor | None = None, sigma: float = 0.0,
               generator: torch.Generator | None = None, prefix: Tensor | None = None, use_cache: bool = True,
               sde: str = "paper", cfg_drop=DROP_KEYS, sde_window=None) -> Tensor:
        """Generate ``n_tokens`` latents (B, n_tokens, Dv) of one window: :func:`.sampling.sample`."""
        from .sampling import sample  # imported here: sampling.py imports this module

        return sample(self, cond, n_tokens, steps=steps, w_speak=w_speak, w_listen=w_listen, speaking_tokens=speaking_tokens,
                      sigma=sigma, generator=generator, prefix=prefix, use_cache=use_cache, sde=sde, cfg_drop=cfg_drop,
                      sde_window=sde_window)

    def generate_long(self, cond: Mapping[str, Tensor] | Callable[[int, int], Mapping[str, Tensor]], total_frames: int,
                      window: int | None = None, k: int = 1, steps: int = 10, w_speak: float = 1.0, w_listen: float = 1.0,
                      speaking_tokens: Tensor | None = None, sigma: float = 0.0, generator: torch.Generator | None = None,
                      use_cache: bool = True, sde: str = "paper", cfg_drop=DROP_KEYS, sde_window=None) -> Tensor:
        """Sliding-window generation of ``total_frames`` frames -> (B, total_frames / r, Dv): :func:`.sampling.generate_long`."""
        from .sampling import generate_long  # imported here: sampling.py imports this module

        return generate_long(self, cond, total_frames, window=window, k=k, steps=steps, w_speak=w_speak, w_listen=w_listen,
                             speaking_tokens=speaking_tokens, sigma=sigma, generator=generator, use_cache=use_cache, sde=sde,
                             cfg_drop=cfg_drop, sde_window=sde_window)


# --------------------------------------------------------------------------------------------
# helpers


def adapter_kwargs(model, speaking: Tensor | None) -> dict:
    """``{"speaking": speaking}`` for a model with listening parts (:func:`takes_speaking`), else ``{}``: models without one
    (duck-typed stand-ins included) are called with their usual signature."""
    return {"speaking": speaking} if takes_speaking(model) else {}


def context_gated(model) -> bool:
    """Whether ``model``'s listening low-rank updates act on the context entries (``lora_scope="listening_context"``),
    which read the speaking mask from ``cond["speaking_tokens"]`` (duck-typed models: False)."""
    return getattr(model, "listen_lora", None) is not None and getattr(model.cfg, "lora_scope", "") == "listening_context"


def takes_speaking(model) -> bool:
    """Whether ``model``'s velocities need the tokens' speaking mask (:attr:`ARFlow.takes_speaking`; False
    for duck-typed stand-ins without the attribute)."""
    return bool(getattr(model, "takes_speaking", False))


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# checkpoint (beside the VAE's ``save_vae`` / ``load_vae``; folder layout in ``agents/checkpoint.py``)

ARFLOW_KIND = "arflow"


def save_arflow(directory, model: ARFlow, preset: str, config: Mapping | None = None, extra: Mapping | None = None):
    """Write an AR-Flow checkpoint folder (atomic): weights plus ``meta.json`` with the architecture
    (``arch``), the preset it was built from and the run's resolved ``config``; ``extra`` adds meta keys."""
    meta = {"arch": asdict(model.cfg), "preset": preset, "config": dict(config or {}), **(extra or {})}
    return save_checkpoint(directory, ARFLOW_KIND, {"model": model.state_dict()}, meta)


def load_arflow(directory, device="cpu", expect: Mapping | None = None, preset: str | None = None) -> tuple[ARFlow, dict]:
    """Load an AR-Flow checkpoint (eval mode) and its meta.

    ``expect`` (e.g. ``{"d_latent": 4}``) must match its architecture and ``preset`` (if given) the
    preset it was trained with; any mismatch, a bad architecture or weights that do not fit it raise
    ``CheckpointError`` naming the folder.
    """
    meta = load_checkpoint_meta(directory, kind=ARFLOW_KIND)
    if preset is not None and meta.get("preset") != preset:
        raise CheckpointError(f"{directory}: AR-Flow checkpoint of preset {meta.get('preset')!r}, but the run uses model={preset} "
                              f"(point pretrained.sft at a {preset} checkpoint or drop the model override)")
    try:
        cfg = ARFlowConfig(**meta["arch"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory}: bad AR-Flow architecture in meta.json ({e})") from None
    for k, v in (expect or {}).items():
        if getattr(cfg, k) != v:
            raise CheckpointError(f"{directory}: AR-Flow checkpoint has {k}={getattr(cfg, k)} but the pipeline needs {k}={v}")
    model = ARFlow(cfg)
    try:
        model.load_state_dict(load_weights(directory, "model", "cpu"))
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: AR-Flow weights do not match the architecture in meta.json: {e}") from None
    return model.to(device).eval(), meta
