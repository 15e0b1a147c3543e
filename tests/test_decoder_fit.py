"""evaluation/decoder_fit.py: the splice swaps one FLAME group's channels and nothing else; the latent fit reaches
a target the decoder can produce, leaves the VAE as it was, and the share it takes back is (run - fit) / (run - sup)."""
from __future__ import annotations

import pytest
import torch

from gdpo_listener.agents.vae import VAEConfig, make_vae
from gdpo_listener.envs.flame import GROUPS
from gdpo_listener.evaluation import decoder_fit as DF


def tiny_vae():
    torch.manual_seed(0)
    return make_vae(VAEConfig.tiny(d_latent=4, window=32, r=8)).eval()


def test_splice_takes_one_group_from_the_donor():
    a, b = torch.randn(2, 16, 67), torch.randn(2, 16, 67)
    s = DF.splice_group(a, b, "jaw")
    jaw = torch.zeros(67, dtype=torch.bool)
    jaw[GROUPS["jaw"]] = True
    assert torch.equal(s[..., jaw], b[..., jaw]) and torch.equal(s[..., ~jaw], a[..., ~jaw])
    with pytest.raises(ValueError, match="unknown FLAME group"):
        DF.splice_group(a, b, "nose")
    with pytest.raises(ValueError, match="differ in shape"):
        DF.splice_group(a, b[:1], "jaw")


def test_group_balanced_error_weighs_every_group_the_same():
    y = torch.zeros(1, 8, 67)
    jaw, expr = y.clone(), y.clone()
    jaw[..., GROUPS["jaw"]] = 1.0  # 3 channels off by 1
    expr[..., GROUPS["expr"]] = 1.0  # 50 channels off by 1
    # a constant offset has no velocity error; each group's mean error is 1, averaged over six groups
    assert DF.group_balanced_error(jaw, y) == pytest.approx(1 / 6) and DF.group_balanced_error(expr, y) == pytest.approx(1 / 6)
    assert DF.group_balanced_error(jaw, y, weights={"jaw": 4.0}) == pytest.approx(4 / 9)  # (4 x 1) / (4 + 5)
    with pytest.raises(ValueError, match="weights"):
        DF.fit_latents(make_vae(VAEConfig.tiny(d_latent=4, window=32, r=8)), torch.zeros(1, 4, 4), torch.zeros(1, 32, 67),
                       weights={"nose": 1.0})


def test_fit_reaches_a_decodable_target_and_leaves_the_vae_alone():
    vae = tiny_vae()
    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    grads = [p.requires_grad for p in vae.parameters()]
    g = torch.Generator().manual_seed(1)
    z_a, z_b = torch.randn(3, 8, 4, generator=g), torch.randn(3, 8, 4, generator=g)  # 2 VAE windows per row
    with torch.no_grad():
        target = DF.decode_normalised(vae, z_b)  # (3, 64, 67)
        start = float(DF.group_balanced_error(DF.decode_normalised(vae, z_a), target))
    z, err = DF.fit_latents(vae, z_a, target, steps=300, lr=0.05)
    assert err < 0.1 * start  # the control: the optimiser gets most of the way to a target the decoder can produce
    assert not z.requires_grad and z.shape == z_a.shape
    assert all(torch.equal(p, before[n]) for n, p in vae.named_parameters())
    assert [p.requires_grad for p in vae.parameters()] == grads
    with pytest.raises(ValueError, match="steps"):
        DF.fit_latents(vae, z_a, target, steps=0)


def test_share_removed():
    assert DF.share_removed(run=1.0, fitted=0.8, supervised=0.6) == pytest.approx(0.5)
    assert DF.share_removed(run=1.0, fitted=1.0, supervised=1.0) is None
