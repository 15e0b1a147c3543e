"""GDPO / GRPO advantages (paper eq. 8-9, docs/design.md section 7)."""
import math

import pytest
import torch

from gdpo_listener.agents.advantages import (
    advantage_diagnostics,
    compute_advantages,
    distinct_per_group,
    effective_eps,
    gdpo_advantages,
    group_normalize,
    grpo_advantages,
    pooled_group_var,
    reward_group_stats,
    whiten_advantages,
    within_group_zscores,
)

# docs/design.md section 7 public vector: prompts A and B, two rollouts each, rewards (r1, r2) per rollout.
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


REF = {"eps_mode": "absolute"}  # the reference code's absolute eps = 1e-4


def published(a, b):
    """``a`` rounds to the published 4-decimal vector ``b`` (half a unit of the last decimal)."""
    return close(a, b, tol=5e-5 + 1e-7)


def test_public_vector_grpo():
    a = grpo_advantages(R_PUB, G_PUB, L_PUB, eps=1e-4, **REF)
    assert published(a, [-0.7070, 0.7070, -0.7071, 0.7071])


def test_public_vector_gdpo_sum_before_division():
    # weighted sum of the per-reward normalised advantages, before eq. 9's division
    a_i = group_normalize(R_PUB, G_PUB, eps=1e-4, **REF)
    assert published((a_i * L_PUB).sum(-1), [-0.7070, 0.7070, -1.4140, 1.4140])


def test_public_vector_gdpo_eq9():
    a = gdpo_advantages(R_PUB, G_PUB, L_PUB, eps=1e-4, eps0=1e-4, **REF)
    assert published(a, [-0.3535, 0.3535, -0.7070, 0.7070])


def test_public_vector_gdpo_whitened():
    a = gdpo_advantages(R_PUB, G_PUB, L_PUB, eps=1e-4, eps0=1e-4, whiten=True, **REF)
    assert published(a, [-0.5477, 0.5477, -1.0954, 1.0954])
    # "either form": whitening the eq. 9 result (after division) agrees up to eps
    b = whiten_advantages(gdpo_advantages(R_PUB, G_PUB, L_PUB, **REF), eps=0.0, **REF)
    assert close(b, [-0.5477, 0.5477, -1.0954, 1.0954])


def test_public_vector_grpo_whitened():
    a = grpo_advantages(R_PUB, G_PUB, L_PUB, eps=1e-4, whiten=True, **REF)
    # not in the list of docs/design.md section 7; by hand from the GRPO vector x = (0.5 / (sqrt(.5) + 1e-4), 1 / (sqrt(2) + 1e-4)):
    # x / (unbiased std of (-x1, x1, -x2, x2) + 1e-4) = 0.86589, 0.86595
    assert published(a, [-0.8659, 0.8659, -0.8659, 0.8659])
    assert float(a[3] - a[1]) > 3e-5  # B's slightly larger std-to-eps ratio survives whitening


def test_reference_mode_is_the_absolute_eps_formula():
    """Reference mode against the naive loop with eps = 1e-4 at small reward scales, where it differs from relative."""
    g = torch.Generator().manual_seed(3)
    r = 1e-4 * torch.randn(12, 2, generator=g)
    ids = torch.arange(4).repeat_interleave(3)
    ref = reference_normalize(r, ids, 1e-4)
    assert torch.allclose(group_normalize(r, ids, 1e-4, eps_mode="absolute"), ref, atol=1e-6)
    assert not torch.allclose(group_normalize(r, ids, 1e-4), ref, atol=1e-2)  # relative: not damped


def _two_scale_batch(scale2: float, n_prompts: int = 64, G: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n_prompts).repeat_interleave(G)
    r = torch.stack([torch.randn(n_prompts * G, generator=g), scale2 * torch.randn(n_prompts * G, generator=g)], -1)
    return r, ids


def test_relative_eps_gives_equal_influence_across_1e6_spreads():
    r, ids = _two_scale_batch(1e-6)  # spreads 1 and 1e-6
    for fn in (gdpo_advantages, lambda *a, **k: gdpo_advantages(*a, whiten=True, **k)):
        a = fn(r, ids, [1.0, 1.0])
        c = advantage_diagnostics(a, r, ids)["corr_zscore"]
        # ideal (eps -> 0): both within-group z-scores have the same norm, so equal correlations (~0.71)
        assert abs(float(c[0] - c[1])) < 1e-3 and 0.6 < float(c[1]) < 0.8, c
        # the reference's absolute eps ignores the small reward
        c_abs = advantage_diagnostics(fn(r, ids, [1.0, 1.0], eps_mode="absolute"), r, ids)["corr_zscore"]
        assert float(c_abs[0]) > 0.99 and abs(float(c_abs[1])) < 0.1, c_abs


def test_relative_eps_is_scale_free():
    r, ids = _two_scale_batch(1.0, seed=1)
    base = gdpo_advantages(r, ids, [1.0, 2.0])
    for c in (1e-6, 1e-3, 1e4):
        scaled = r * torch.tensor([c, 1.0 / c])
        assert torch.allclose(gdpo_advantages(scaled, ids, [1.0, 2.0]), base, atol=1e-5)
        assert torch.allclose(grpo_advantages(r * c, ids, [1.0, 2.0]), grpo_advantages(r, ids, [1.0, 2.0]), atol=1e-5)
        assert torch.allclose(gdpo_advantages(scaled, ids, [1.0, 2.0], whiten=True),
                              gdpo_advantages(r, ids, [1.0, 2.0], whiten=True), atol=1e-5)
    # absolute mode is not: at scale 1e-4 the reward loses about half its advantage
    small = gdpo_advantages(r * 1e-4, ids, [1.0, 1.0], eps_mode="absolute")
    assert 0.3 < float(small.abs().mean() / gdpo_advantages(r, ids, [1.0, 1.0]).abs().mean()) < 0.7


def test_effective_eps():
    r = torch.tensor([[0.0, 5.0], [2.0, 5.0], [1.0, 5.0], [1.0, 5.0]])
    std = torch.tensor([[2 ** 0.5, 0.0], [0.0, 0.0]])  # within-group stds
    e = effective_eps(r, std, 1e-2, "relative")
    u = torch.finfo(torch.float32).eps
    assert torch.allclose(e, torch.tensor([1e-2 * 2 ** 0.5 / 2 + 2 * u, 5 * u]), rtol=1e-6)
    assert torch.equal(effective_eps(r, std, 1e-2, "absolute"), torch.tensor([1e-2, 1e-2]))
    with pytest.raises(ValueError, match="eps_mode"):
        effective_eps(r, std, 1e-2, "scaled")
    with pytest.raises(ValueError, match="eps_mode"):
        gdpo_advantages(R_PUB, G_PUB, L_PUB, eps_mode="Relative")


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
    for mode in ("relative", "absolute"):
        _zero_std_case(r, ids, mode)


def _zero_std_case(r, ids, mode):
    a_i = group_normalize(r, ids, eps_mode=mode)
    assert torch.isfinite(a_i).all()
    assert (a_i[:3] == 0).all() and (a_i[3:, 0] == 0).all()  # constant rewards -> exactly 0
    assert (a_i[3:, 1] != 0).any()
    a = gdpo_advantages(r, ids, [1.0, 1.0], whiten=True, eps_mode=mode)
    assert torch.isfinite(a).all() and (a[:3] == a[0]).all()
    # 0.3 six times: the float32 group mean is not exactly 0.3, a naive (R - mean) / (std + eps) is ~3e-4
    r6 = torch.cat([torch.full((6, 1), 0.3), torch.arange(6.0).unsqueeze(-1)])
    a6 = gdpo_advantages(r6, torch.tensor([4] * 6 + [9] * 6), [1.0], eps_mode=mode)
    assert (a6[:6] == 0).all() and (a6[6:] != 0).all()
    # every reward constant everywhere -> zeros, also after whitening
    z = gdpo_advantages(torch.ones(4, 3), torch.tensor([0, 0, 1, 1]), [1, 1, 1], whiten=True, eps_mode=mode)
    assert (z == 0).all()
    assert (grpo_advantages(torch.ones(4, 3), torch.tensor([0, 0, 1, 1]), [1, 1, 1], eps_mode=mode) == 0).all()


def test_arbitrary_group_ids_and_shuffle():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(12, 3, generator=g)
    lam = torch.tensor([1.0, 0.5, 2.0])
    ids = torch.tensor([7, 7, 7, 7, 2, 2, 2, 2, 40, 40, 40, 40])
    a = gdpo_advantages(r, ids, lam, **REF)
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
    assert torch.allclose(grpo_advantages(r2, ids2, lam[:2], **REF), ref2, atol=1e-5)
    # relative mode: the same loop with the column's effective eps (mean within-group std * 1e-4 + resolution)
    zr = within_group_zscores(r, ids)
    s_mean = torch.stack([r[ids == g].std(0) for g in (7, 2, 40)]).mean(0)  # (3,)
    e = 1e-4 * s_mean + torch.finfo(r.dtype).eps * r.abs().amax(0)
    rel = torch.stack([reference_normalize(r[:, c:c + 1], ids, float(e[c])).squeeze(-1) for c in range(3)], -1)
    assert torch.allclose(group_normalize(r, ids), rel, atol=1e-6)
    assert torch.allclose(zr, reference_normalize(r, ids, 0.0), atol=1e-6)


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


def test_reward_group_stats():
    s = reward_group_stats(R_PUB, G_PUB, eps_mode="absolute")
    assert all(torch.is_tensor(v) for v in s.values())
    assert torch.equal(s["frac_zero_std"], torch.tensor([0.0, 0.5]))  # r2 is constant in prompt A
    assert torch.equal(s["frac_std_below_eps"], torch.tensor([0.0, 0.5]))
    assert float(s["frac_all_zero_std"]) == 0.0
    assert int(s["n_groups"]) == 2
    assert close(s["group_std_mean"], [math.sqrt(0.5), math.sqrt(0.5) / 2])
    assert close(s["reward_mean"], [0.5, 0.25])
    assert float(reward_group_stats(torch.ones(4, 2), G_PUB)["frac_all_zero_std"]) == 1.0


def test_frac_std_below_eps_is_scale_free_in_relative_mode():
    # three prompt groups with within-group stds 1, 1e-3 and 0
    r = torch.tensor([[0.0], [2 ** 0.5], [0.0], [1e-3 * 2 ** 0.5], [0.5], [0.5]])
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    for scale, frac_abs in ((1.0, 1 / 3), (1e-3, 2 / 3)):  # absolute eps 1e-4: the 1e-6 group falls below it
        s_abs = reward_group_stats(r * scale, ids, eps=1e-4, eps_mode="absolute")
        assert close(s_abs["frac_std_below_eps"], [frac_abs], tol=1e-6)
        s_rel = reward_group_stats(r * scale, ids, eps=1e-4)
        assert close(s_rel["frac_std_below_eps"], [1 / 3], tol=1e-6)  # only the constant group
        resolution = torch.finfo(torch.float32).eps * 2 ** 0.5  # float resolution of the largest |reward|
        assert close(s_rel["eps_effective"] / scale, [1e-4 * (1 + 1e-3) / 3 + resolution], tol=1e-9)


def test_distinct_per_group_grpo_collapses_gdpo_keeps():
    # one prompt, 4 rollouts: reward 1 = (1, 0, 0, 0), reward 2 = (0, 1, 1, 0)
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    ids = torch.zeros(4, dtype=torch.long)
    grpo = grpo_advantages(r, ids, [1.0, 1.0])  # sums 1, 1, 1, 0: two distinct values
    gdpo = gdpo_advantages(r, ids, [1.0, 1.0])  # 0.634, 0.366, 0.366, -1.366 (/2): three
    assert int(distinct_per_group(grpo, ids)) == 2
    assert int(distinct_per_group(gdpo, ids)) == 3
    d = distinct_per_group(torch.tensor([5.0, 1.0, 1.0 + 1e-9, 5.0, 2.0, 3.0]), torch.tensor([9, 9, 9, 9, 3, 3]))
    assert d.tolist() == [2, 2]  # groups in sorted-id order (3, 9); 1 and 1 + 1e-9 are one value
    s = advantage_diagnostics(torch.cat([grpo, gdpo]), torch.cat([r, r]), torch.tensor([0] * 4 + [1] * 4))
    assert float(s["distinct_per_group"]) == 2.5


def test_advantage_diagnostics_correlations():
    r, ids = _two_scale_batch(1.0, seed=2)
    only_first = gdpo_advantages(r, ids, [1.0, 0.0])  # lambda 0 switches reward 2 off
    s = advantage_diagnostics(only_first, r, ids)
    assert close(s["corr_zscore"][0], 1.0, tol=1e-4) and abs(float(s["corr_zscore"][1])) < 0.15
    z = within_group_zscores(r, ids)
    assert close(s["corr_reward"][0], float(torch.corrcoef(torch.stack([only_first, r[:, 0]]))[0, 1]), tol=1e-5)
    assert float(s["corr_reward"][0]) < float(s["corr_zscore"][0])  # the raw reward also has between-prompt spread
    assert close(s["adv_abs_max"], float(only_first.abs().max()))
    # a constant reward: correlation 0, never NaN
    r_c = torch.cat([r[:, :1], torch.ones_like(r[:, :1])], -1)
    s_c = advantage_diagnostics(gdpo_advantages(r_c, ids, [1.0, 1.0]), r_c, ids)
    assert torch.isfinite(s_c["corr_zscore"]).all() and float(s_c["corr_zscore"][1]) == 0.0
    assert float(s_c["corr_reward"][1]) == 0.0
    assert torch.equal(z[:, 1] == 0, torch.zeros(len(ids), dtype=torch.bool))
    with pytest.raises(ValueError, match="advantages"):
        advantage_diagnostics(only_first[:-1], r, ids)


def test_shared_scale_keeps_each_prompts_spread_and_stays_scale_free():
    # prompt 0's rollouts differ 10x more than prompt 1's; eq. 8 gives both unit spread, a shared scale does not
    r = torch.tensor([[0.0], [10.0], [0.0], [1.0]])
    ids = torch.tensor([0, 0, 1, 1])
    var = pooled_group_var(r, ids)
    assert torch.allclose(var, torch.tensor([(50.0 + 0.5) / 2]))  # unbiased within-group variances 50 and 0.5
    a_group = group_normalize(r, ids, eps=0.0, eps_mode="absolute").squeeze(-1)
    a_batch = group_normalize(r, ids, eps=0.0, eps_mode="absolute", scale=var.sqrt()).squeeze(-1)
    assert torch.allclose(a_group.abs(), torch.full((4,), 2 ** -0.5))
    s = var.sqrt().item()
    assert torch.allclose(a_batch, torch.tensor([-5.0, 5.0, -0.5, 0.5]) / s)  # deviations from the prompt mean / s
    assert torch.allclose(a_batch[:2].abs() / a_batch[2:].abs(), torch.tensor([10.0, 10.0]))
    # per column scale-free: multiplying a reward and its scale by c leaves its advantages (relative eps)
    r2, ids2 = _two_scale_batch(1e-5, seed=3)
    sc = pooled_group_var(r2, ids2).sqrt()
    base = gdpo_advantages(r2, ids2, [1.0, 1.0], scale=sc)
    k = torch.tensor([1e3, 1e-3])
    assert torch.allclose(gdpo_advantages(r2 * k, ids2, [1.0, 1.0], scale=sc * k), base, atol=1e-5)
    # and two columns whose spreads differ by 1e5 keep equal influence, as with eq. 8
    c = advantage_diagnostics(base, r2, ids2)["corr_zscore"]
    assert abs(float(c[0] - c[1])) < 0.1, c
    # GRPO's shared scale is the summed reward's; a constant prompt stays exactly 0
    rc = torch.tensor([[1.0, 2.0], [3.0, 1.0], [5.0, 5.0], [5.0, 5.0]])
    g = grpo_advantages(rc, ids, [1.0, 1.0], scale=pooled_group_var(rc.sum(-1), ids).sqrt())
    assert g[2:].eq(0).all() and g[0] < 0 < g[1]
    assert compute_advantages("grpo", rc, ids, [1.0, 1.0], scale=torch.tensor([2.0])).shape == (4,)
    with pytest.raises(ValueError, match="scale"):
        gdpo_advantages(r2, ids2, [1.0, 1.0], scale=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="scale"):
        gdpo_advantages(r2, ids2, [1.0, 1.0], scale=torch.tensor([1.0, float("nan")]))
