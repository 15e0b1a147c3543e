"""Shared transformer parts (agents/attention.py): rotary convention, masks, KV-cache path."""
import pytest
import torch

from gdpo_listener.agents.attention import Block, SelfAttention, apply_rope, rope_cos_sin


def _block(seed=0, d_model=16, n_heads=2):
    torch.manual_seed(seed)
    return Block(d_model, n_heads).eval()


def test_rotary_score_depends_only_on_position_difference():
    g = torch.Generator().manual_seed(0)
    hd = 16
    q, k = torch.randn(hd, generator=g), torch.randn(hd, generator=g)

    def score(pq, pk):
        cos, sin = rope_cos_sin(torch.tensor([float(pq), float(pk)]), hd)
        qr = apply_rope(q[None], cos[:1], sin[:1])[0]
        kr = apply_rope(k[None], cos[1:], sin[1:])[0]
        return (qr * kr).sum()

    base = score(3, 10)
    for shift in (1, 7, 100, 184, 2.5):  # fractional positions too (AR-Flow audio tokens sit at 1.5, 5.5, ...)
        torch.testing.assert_close(score(3 + shift, 10 + shift), base, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(score(3, 11), base, atol=1e-3)  # a different offset changes it
    cos, sin = rope_cos_sin(torch.tensor([5.0]), hd)
    torch.testing.assert_close(apply_rope(q[None], cos, sin).norm(), q.norm())  # a rotation keeps the norm
    cos0, sin0 = rope_cos_sin(torch.zeros(1), hd)
    assert torch.equal(apply_rope(q[None], cos0, sin0)[0], q)  # position 0: identity


def test_rotary_pairs_feature_i_with_i_plus_half():
    """The convention of the module docstring: (x_i, x_{i + hd/2}) rotates by p * base^(-2i/hd)."""
    hd, p, base = 8, 3.0, 10000.0
    cos, sin = rope_cos_sin(torch.tensor([p]), hd, base)
    for i in range(hd // 2):
        e = torch.zeros(1, hd)
        e[0, i] = 1.0
        a = torch.tensor(p * base ** (-2 * i / hd))
        expect = torch.zeros(hd)
        expect[i], expect[i + hd // 2] = a.cos(), a.sin()
        torch.testing.assert_close(apply_rope(e, cos, sin)[0], expect)
    with pytest.raises(ValueError, match="head_dim=7"):
        rope_cos_sin(torch.zeros(3), 7)
    with pytest.raises(ValueError, match="1-d"):
        rope_cos_sin(torch.zeros(2, 3), 8)


def test_mask_true_means_may_attend():
    torch.manual_seed(1)
    attn = SelfAttention(16, 2).eval()
    S = 5
    x = torch.randn(2, S, 16)
    cos, sin = rope_cos_sin(torch.arange(S, dtype=torch.float32), 8)
    full = attn(x, cos, sin)
    torch.testing.assert_close(attn(x, cos, sin, torch.ones(S, S, dtype=torch.bool)), full, atol=0, rtol=0)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    y = attn(x, cos, sin, causal)
    assert not torch.allclose(y[:, 0], full[:, 0], atol=1e-5)  # the mask acts
    # a query never reads a key it may not attend to: changing the future leaves the past unchanged
    x2 = x.clone()
    x2[:, 3:] = torch.randn(2, S - 3, 16)
    y2 = attn(x2, cos, sin, causal)
    torch.testing.assert_close(y2[:, :3], y[:, :3], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(y2[:, 3], y[:, 3], atol=1e-4)
    # a key a query may attend to does matter
    x3 = x.clone()
    x3[:, 0] = torch.randn(2, 16)
    assert not torch.allclose(attn(x3, cos, sin, causal)[:, 2], y[:, 2], atol=1e-4)


def test_kv_cache_path_equals_causal_full_pass():
    """Feeding tokens one by one into a preallocated cache (slot ``at``) = one causal pass over all tokens."""
    blk = _block()
    S, B, H, hd = 6, 2, 2, 8
    x = torch.randn(B, S, 16)
    cos, sin = rope_cos_sin(torch.tensor([0.0, 4.0, 12.0, 12.0, 20.0, 27.5]), hd)  # repeated and fractional positions
    full = blk(x, cos, sin, torch.ones(S, S, dtype=torch.bool).tril())
    K, V = torch.full((B, H, S, hd), float("nan")), torch.full((B, H, S, hd), float("nan"))  # unwritten slots are never read
    steps = [blk(x[:, j:j + 1], cos[j:j + 1], sin[j:j + 1], None, (K, V), j) for j in range(S)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(K).all() and torch.isfinite(V).all()  # every slot written exactly where expected
    # two tokens at once into slots [2, 4) with their own mask over slots [0, 4)
    K2, V2 = torch.zeros_like(K), torch.zeros_like(V)
    blk(x[:, :2], cos[:2], sin[:2], torch.ones(2, 2, dtype=torch.bool).tril(), (K2, V2), 0)
    two = blk(x[:, 2:4], cos[2:4], sin[2:4], torch.ones(2, 4, dtype=torch.bool).tril(diagonal=2), (K2, V2), 2)
    torch.testing.assert_close(two, full[:, 2:4], atol=1e-5, rtol=1e-5)


def test_block_parameter_names_are_stable():
    """AR-Flow checkpoints store these names (blocks.i.<name>); renaming them breaks every saved model."""
    names = [n for n, _ in _block().named_parameters()]
    assert names == ["ln1.weight", "ln1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                     "ln2.weight", "ln2.bias", "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias"]
    with pytest.raises(ValueError, match="n_heads=3"):
        SelfAttention(16, 3)
