"""Transformer parts shared by the motion VAE and the AR-Flow: rotary positions, self-attention, MLP, block.

Rotary convention (the only place it is defined). For a head of size ``hd`` and a position ``p``
(any real number: the AR-Flow uses fractional and repeated timestamps), feature ``i < hd / 2`` is
paired with feature ``i + hd / 2`` (the "half split", not neighbouring features) and the pair is
rotated by the angle ``p * base ** (-2 i / hd)``::

    (x_i, x_{i + hd/2}) -> (x_i cos a - x_{i + hd/2} sin a,  x_i sin a + x_{i + hd/2} cos a)

Applied to queries and keys, the score ``q(p) . k(p')`` then depends on ``p - p'`` only.

Masks are boolean, ``True`` = may attend (the convention of ``F.scaled_dot_product_attention``);
``None`` = every query sees every key.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rope_cos_sin", "apply_rope", "LowRank", "BlockDelta", "gated_delta", "SelfAttention", "MLP", "Block"]


def rope_cos_sin(pos: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Rotary tables for positions ``pos (S,)`` (float, may repeat) -> cos, sin each ``(S, head_dim / 2)``."""
    if head_dim % 2:
        raise ValueError(f"rope_cos_sin: head_dim={head_dim} must be even")
    if pos.dim() != 1:
        raise ValueError(f"rope_cos_sin: positions must be a 1-d tensor, got shape {tuple(pos.shape)}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)  # (hd/2,)
    ang = pos.float()[:, None] * inv_freq[None, :]  # (S, hd/2)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the feature pairs (i, i + hd/2) of ``x (..., S, hd)`` by the tables ``cos, sin (S, hd/2)``."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]  # (..., S, hd/2) each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., S, hd)


class LowRank(nn.Module):
    """A low-rank linear map ``x -> up(down(x))`` of rank ``rank``, ``up`` zero-initialised (a new one
    outputs zeros): the update of one linear layer under LoRA (Hu et al., 2021)."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        nn.init.normal_(self.down.weight, std=d_in ** -0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:  # (..., d_in) -> (..., d_out)
        return self.up(self.down(x))


class BlockDelta(nn.Module):
    """Low-rank updates of the four linear maps of a :class:`Block` (attention ``qkv`` and ``proj``,
    MLP ``fc`` and ``proj``), applied per token through a gate: ``W x -> W x + gate * delta(x)`` with
    ``gate`` (B, S, 1) in [0, 1] (0 = the block's own output, exactly; None = no gate, every token)."""

    def __init__(self, d_model: int, mlp_ratio: float, rank: int):
        super().__init__()
        hidden = int(mlp_ratio * d_model)
        self.qkv = LowRank(d_model, 3 * d_model, rank)
        self.attn_proj = LowRank(d_model, d_model, rank)
        self.fc = LowRank(d_model, hidden, rank)
        self.mlp_proj = LowRank(hidden, d_model, rank)


def gated_delta(y: Tensor, delta: LowRank | None, x: Tensor, gate: Tensor | None) -> Tensor:
    """``y + gate * delta(x)`` (``y + delta(x)`` without a gate), or ``y`` without a delta."""
    if delta is None:
        return y
    return y + delta(x) if gate is None else y + gate.to(y.dtype) * delta(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions, optionally reading/writing a KV cache."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, attn_dropout: float | None = None):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"SelfAttention: d_model={d_model} must split into n_heads={n_heads} heads of even size")
        # dropout on the output projection; attn_dropout (None = dropout) on the attention probabilities.
        # attn_dropout > 0 sends training through torch's math attention (no fused CPU kernel takes dropout)
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.p = dropout if attn_dropout is None else attn_dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                kv: tuple[Tensor, Tensor] | None = None, at: int = 0, delta: BlockDelta | None = None,
                gate: Tensor | None = None) -> Tensor:
        """x (B, S, D); cos/sin (S, hd/2) for these S tokens; ``delta``/``gate`` (B, S, 1): optional
        gated low-rank updates of ``qkv`` and ``proj`` (:class:`BlockDelta`).

        kv None: attention among the S tokens under ``mask`` (S, S).
        kv = (K, V) each (B, H, C, hd): the S new rotated keys/values are written in place to slots
        [at, at + S) and the queries attend to slots [0, at + S) (``mask`` (S, at + S) or None = all).
        """
        B, S, D = x.shape
        qkv = gated_delta(self.qkv(x), None if delta is None else delta.qkv, x, gate)  # (B, S, 3 D)
        q, k, v = qkv.view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            K, V = kv
            K[:, :, at:at + S] = k
            V[:, :, at:at + S] = v
            k, v = K[:, :, :at + S], V[:, :, :at + S]  # (B, H, at + S, hd) views, no copy
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)  # (B, H, S, hd)
        y = y.transpose(1, 2).reshape(B, S, D)  # (B, S, D)
        return self.resid_drop(gated_delta(self.proj(y), None if delta is None else delta.attn_proj, y, gate))


class MLP(nn.Module):
    """Linear -> GELU -> Linear -> dropout, hidden size ``mlp_ratio * d_model``."""

    def __init__(self, d_model: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(mlp_ratio * d_model)
        self.fc = nn.Linear(d_model, hidden)
        self.proj = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, delta: BlockDelta | None = None, gate: Tensor | None = None) -> Tensor:  # (B, S, D) -> (B, S, D)
        a = F.gelu(gated_delta(self.fc(x), None if delta is None else delta.fc, x, gate))  # (B, S, hidden)
        return self.drop(gated_delta(self.proj(a), None if delta is None else delta.mlp_proj, a, gate))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)). Arguments as :class:`SelfAttention`;
    ``dropout`` also on the MLP output; ``delta``/``gate``: gated low-rank updates of its four linear maps."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 attn_dropout: float | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout, attn_dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio, dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                kv: tuple[Tensor, Tensor] | None = None, at: int = 0, delta: BlockDelta | None = None,
                gate: Tensor | None = None) -> Tensor:  # (B, S, D) -> (B, S, D)
        x = x + self.attn(self.ln1(x), cos, sin, mask, kv, at, delta, gate)
        return x + self.mlp(self.ln2(x), delta, gate)
