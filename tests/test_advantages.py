"""GDPO / GRPO advantages (paper eq. 8-9, DESIGN section 7)."""
import math

import pytest
import torch

from gdpo_listener.agents.advantages import (advantage_stats, compute_advantages, gdpo_advantages,
                                             group_normalize, grpo_advantages, whiten_advantages)

# DESIGN section 7 public vector: prompts A and B, two rollouts each, rewards (r1, r2) per rollout.
#   A: r1 = (0, 1), r2 = (0, 0);   B: r1 = (0, 1), r2 = (0, 1)
R_PUB = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
G_PUB = torch.tensor([0, 0, 1, 1])
L_PUB = torch.tensor([1.0, 1.0])


def close(a, b, tol=1e-4):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), atol=tol, rtol=0)


def reference_normalize(r, ids, eps):
    """Naive per-group loop (unbiased std, constant group -> 0)."""
    out = torch.zeros_like(r)
    for g in ids.unique().tolist():
        rows = (ids == g).nonzero().squeeze(-1).tolist()
        for c in range(r.shape[1]):
            x = [float(r[j, c]) for j in rows]
            if len(set(x)) == 1:
                continue
            m = sum(x) / len(x)
            sd = math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))
            for j, v in zip(rows, x):
                out[j, c] = (v - m) / (sd + eps)
    return out


def test_public_vector_grpo():
    a = grpo_advantages(R_PUB, G_PUB, L_PUB, eps=1e-4)
    assert close(a, [-0.7070, 0.7070, -0.7071, 0.7071])


def test_public_vector_gdpo_sum_before_division():
    # weighted sum of the per-reward normalised advantages, before eq. 9's division
    a_i = group_normalize(R_PUB, G_PUB, eps=1e-4)
    assert close((a_i * L_PUB).sum(-1), [-0.7070, 0.7070, -1.4140, 1.4140])


def test_public_vector_gdpo_eq9():
    a = gdpo_advantages(R_PUB, G_PUB, L_PUB, eps=1e-4, eps0=1e-4)
    assert close(a, [-0.3535, 0.3535, -0.7070, 0.7070])


def test_public_vector_gdpo_whitened():
    a = gdpo_advantages(R_PUB, G_PUB, L_PUB, eps=1e-4, eps0=1e-4, whiten=True)
    assert close(a, [-0.5477, 0.5477, -1.0954, 1.0954])
    # "either form": whitening the eq. 9 result (after division) agrees up to eps
    b = whiten_advantages(gdpo_advantages(R_PUB, G_PUB, L_PUB), eps=0.0)
    assert close(b, [-0.5477, 0.5477, -1.0954, 1.0954])


def test_gdpo_distinguishes_what_grpo_collapses():
    grpo = grpo_advantages(R_PUB, G_PUB, L_PUB)
    gdpo = gdpo_advantages(R_PUB, G_PUB, L_PUB)
    # GRPO: prompt A (one reward differs) and B (both differ) get the same advantages
    assert torch.allclose(grpo[:2], grpo[2:], atol=1e-3)
    # GDPO: B, where both rewards improve, gets twice A's advantage
    assert torch.allclose(gdpo[2:], 2 * gdpo[:2], atol=1e-3)
    assert not torch.allclose(gdpo[:2], gdpo[2:], atol=1e-2)


def test_zero_std_gives_exact_zero_not_nan():
    r = torch.tensor([[0.1, 5.0], [0.1, 5.0], [0.1, 5.0], [0.3, 1.0], [0.3, 2.0], [0.3, 3.0]])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    a_i = group_normalize(r, ids)
    assert torch.isfinite(a_i).all()
    assert (a_i[:3] == 0).all() and (a_i[3:, 0] == 0).all()  # constant rewards -> exactly 0
    assert (a_i[3:, 1] != 0).any()
    a = gdpo_advantages(r, ids, [1.0, 1.0], whiten=True)
    assert torch.isfinite(a).all() and (a[:3] == a[0]).all()
    # 0.3 six times: the float32 group mean is not exactly 0.3, a naive (R - mean) / (std + eps) is ~3e-4
    r6 = torch.cat([torch.full((6, 1), 0.3), torch.arange(6.0).unsqueeze(-1)])
    a6 = gdpo_advantages(r6, torch.tensor([4] * 6 + [9] * 6), [1.0])
    assert (a6[:6] == 0).all() and (a6[6:] != 0).all()
    # every reward constant everywhere -> zeros, also after whitening
    z = gdpo_advantages(torch.ones(4, 3), torch.tensor([0, 0, 1, 1]), [1, 1, 1], whiten=True)
    assert (z == 0).all()
    assert (grpo_advantages(torch.ones(4, 3), torch.tensor([0, 0, 1, 1]), [1, 1, 1]) == 0).all()


def test_arbitrary_group_ids_and_shuffle():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(12, 3, generator=g)
    lam = torch.tensor([1.0, 0.5, 2.0])
    ids = torch.tensor([7, 7, 7, 7, 2, 2, 2, 2, 40, 40, 40, 40])
    a = gdpo_advantages(r, ids, lam)
    ref = (reference_normalize(r, ids, 1e-4) * lam).sum(-1) / (lam.sum() + 1e-4)
    assert torch.allclose(a, ref, atol=1e-5)
    perm = torch.randperm(12, generator=g)
    for fn in (gdpo_advantages, grpo_advantages):
        base = fn(r, ids, lam)
        assert torch.allclose(fn(r[perm], ids[perm], lam), base[perm], atol=1e-6)
        assert torch.allclose(fn(r[perm], ids[perm], lam, whiten=True), fn(r, ids, lam, whiten=True)[perm], atol=1e-5)
    # GRPO against the loop reference, group sizes differ (2 and 3)
    ids2 = torch.tensor([3, 1, 3, 1, 1])
    r2 = torch.randn(5, 2, generator=g)
    ref2 = reference_normalize((r2 * lam[:2]).sum(-1, keepdim=True), ids2, 1e-4).squeeze(-1)
    assert torch.allclose(grpo_advantages(r2, ids2, lam[:2]), ref2, atol=1e-5)


def test_lambdas_weight_rewards():
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([0, 0, 1, 1])
    a = gdpo_advantages(r, ids, [1.0, 3.0], eps0=0.0)
    assert torch.allclose(a[2:], 3 * a[:2], atol=1e-5)
    assert close(a[:2], [-0.7070 / 4, 0.7070 / 4])
    a0 = gdpo_advantages(r, ids, [1.0, 0.0])  # lambda 0 switches a reward off
    assert (a0[2:] == 0).all()


def test_whitening_is_batch_standardisation():
    r = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(4).repeat_interleave(2)
    a = gdpo_advantages(r, ids, [1.0, 1.0], whiten=True)
    assert abs(float(a.mean())) < 1e-5
    assert abs(float(a.std()) - 1.0) < 1e-3


def test_validation_errors():
    with pytest.raises(ValueError, match="rollouts"):
        gdpo_advantages(torch.zeros(3, 2), torch.tensor([0, 0, 1]), [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        gdpo_advantages(torch.tensor([[0.0], [math.nan]]), torch.tensor([0, 0]), [1.0])
    with pytest.raises(ValueError, match="NaN"):
        grpo_advantages(torch.tensor([[0.0], [math.inf]]), torch.tensor([0, 0]), [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        gdpo_advantages(R_PUB, G_PUB, [1.0, -1.0])
    with pytest.raises(ValueError, match="zero"):
        gdpo_advantages(R_PUB, G_PUB, [0.0, 0.0])
    with pytest.raises(ValueError, match="zero"):
        grpo_advantages(R_PUB, G_PUB, [0.0, 0.0])
    with pytest.raises(ValueError, match="one entry per reward"):
        gdpo_advantages(R_PUB, G_PUB, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="integer"):
        gdpo_advantages(R_PUB, G_PUB.float(), L_PUB)
    with pytest.raises(ValueError, match="group_ids"):
        gdpo_advantages(R_PUB, G_PUB[:3], L_PUB)
    with pytest.raises(ValueError, match="gdpo"):
        compute_advantages("ppo", R_PUB, G_PUB, L_PUB)


def test_compute_advantages_dispatch():
    assert torch.equal(compute_advantages("gdpo", R_PUB, G_PUB, L_PUB), gdpo_advantages(R_PUB, G_PUB, L_PUB))
    assert torch.equal(compute_advantages("grpo", R_PUB, G_PUB, L_PUB, whiten=True),
                       grpo_advantages(R_PUB, G_PUB, L_PUB, whiten=True))


def test_advantage_stats():
    a = gdpo_advantages(R_PUB, G_PUB, L_PUB)
    s = advantage_stats(R_PUB, G_PUB, a)
    assert all(torch.is_tensor(v) for v in s.values())
    assert torch.equal(s["frac_zero_std"], torch.tensor([0.0, 0.5]))  # r2 is constant in prompt A
    assert float(s["frac_all_zero_std"]) == 0.0
    assert int(s["n_groups"]) == 2
    assert close(s["group_std_mean"], [math.sqrt(0.5), math.sqrt(0.5) / 2])
    assert close(s["reward_mean"], [0.5, 0.25])
    assert close(s["adv_abs_max"], 0.7070)
    s2 = advantage_stats(torch.ones(4, 2), G_PUB)
    assert float(s2["frac_all_zero_std"]) == 1.0
