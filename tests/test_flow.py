"""Rectified-flow math (agents/flow.py): convention t = 0 noise, t = 1 data, target x1 - x0."""
import math

import pytest
import torch

from gdpo_listener.agents import flow


@pytest.fixture
def g():
    return torch.Generator().manual_seed(0)


def test_interpolation_endpoints_and_midpoint(g):
    x0, x1 = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    assert torch.equal(flow.interpolate(x0, x1, 0.0), x0)
    assert torch.equal(flow.interpolate(x0, x1, 1.0), x1)
    # per-token t (B, N) broadcasts along the feature dim, never across it
    t = torch.rand(3, 5, generator=g)
    xt = flow.interpolate(x0, x1, t)
    torch.testing.assert_close(xt, t[..., None] * x1 + (1 - t[..., None]) * x0)
    torch.testing.assert_close(flow.interpolate(x0, x1, torch.zeros(3, 5)), x0)
    torch.testing.assert_close(flow.interpolate(x0, x1, torch.ones(3)), x1)  # per-row t (B,)
    # moving along the target velocity from x_t by (1 - t) lands on the data
    torch.testing.assert_close(xt + (1 - t[..., None]) * flow.velocity_target(x0, x1), x1)


def test_velocity_target_and_loss(g):
    x0, x1 = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    assert torch.equal(flow.velocity_target(x0, x1), x1 - x0)
    assert flow.flow_matching_loss(x1 - x0, x0, x1).item() == 0.0
    v = torch.randn(2, 3, 4, generator=g)
    per_tok = flow.flow_matching_loss(v, x0, x1, reduce_dims=-1)
    assert per_tok.shape == (2, 3)
    torch.testing.assert_close(per_tok, ((v - (x1 - x0)) ** 2).mean(-1))
    torch.testing.assert_close(flow.flow_matching_loss(v, x0, x1), per_tok.mean())


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_recovers_straight_line_flow_exactly(g, steps):
    x0, x1 = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    grid = flow.time_grid(steps, dtype=torch.float64)
    assert grid.shape == (steps + 1,) and grid[0] == 0 and grid[-1] == 1
    x = x0
    for s in range(steps):
        v = flow.velocity_target(x0, x1)  # constant field of the straight path
        x = flow.euler_step(x, v, grid[s + 1] - grid[s])
        torch.testing.assert_close(x, flow.interpolate(x0, x1, grid[s + 1]))
    torch.testing.assert_close(x, x1, rtol=0, atol=1e-12)


def test_euler_step_per_row_dt(g):
    x, v = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    dt = torch.tensor([0.1, 0.2, 0.5])
    torch.testing.assert_close(flow.euler_step(x, v, dt), x + dt[:, None] * v)


def test_sde_step_with_given_noise(g):
    x, v, eps = (torch.randn(5, 4, generator=g) for _ in range(3))
    dt, sigma = 0.25, 0.5
    out = flow.sde_step(x, v, dt, sigma, eps)
    torch.testing.assert_close(out, x + dt * v + sigma * math.sqrt(dt) * eps)
    torch.testing.assert_close(flow.sde_step(x, v, dt, 0.0, eps), flow.euler_step(x, v, dt))
    assert flow.transition_std(sigma, dt) == pytest.approx(0.25)
    torch.testing.assert_close(flow.transition_mean(x, v, dt), x + dt * v)
    with pytest.raises(ValueError, match="sigma"):
        flow.transition_std(-1.0, dt)


def test_gaussian_log_prob_matches_torch_normal(g):
    a, mu = torch.randn(3, 7, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    for std in (0.3, torch.rand(3, 7, generator=g) + 0.1):  # scalar, per-row-token
        got = flow.gaussian_log_prob(a, mu, std)
        s = std if not torch.is_tensor(std) else std[..., None]
        ref = torch.distributions.Normal(mu, s).log_prob(a).sum(-1)
        assert got.shape == (3, 7)
        torch.testing.assert_close(got, ref)


def test_kl_closed_form_matches_torch(g):
    mp, mq = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    sigma, dt = 0.5, 0.25
    std = flow.transition_std(sigma, dt)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mp, std), torch.distributions.Normal(mq, std)).sum(-1)
    got = flow.gaussian_kl_same_std(mp, mq, sigma, dt)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got, ((mp - mq) ** 2).sum(-1) / (2 * sigma**2 * dt))
    assert torch.all(flow.gaussian_kl_same_std(mp, mp, sigma, dt) == 0)


def test_cfg_combine(g):
    vc, vu = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    torch.testing.assert_close(flow.cfg_combine(vc, vu, 1.0), vc)
    torch.testing.assert_close(flow.cfg_combine(vc, vu, 0.0), vu)
    # linear in w, per-row weights
    w = torch.tensor([0.0, 1.0, 3.0])
    out = flow.cfg_combine(vc, vu, w)
    torch.testing.assert_close(out[0], vu[0])
    torch.testing.assert_close(out[1], vc[1])
    torch.testing.assert_close(out[2], vu[2] + 3.0 * (vc[2] - vu[2]))
    a, b = flow.cfg_combine(vc, vu, 2.0), flow.cfg_combine(vc, vu, 4.0)
    torch.testing.assert_close(flow.cfg_combine(vc, vu, 3.0), (a + b) / 2)


def test_time_grid_rejects_bad_steps():
    with pytest.raises(ValueError, match="steps"):
        flow.time_grid(0)
    with pytest.raises(ValueError, match="steps"):
        flow.time_grid(2.5)


def test_sde_drift_paper_and_marginal(g):
    x0, x1 = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    t = torch.rand(3, 5, generator=g) * 0.9  # per-token t (B, N)
    x, v = flow.interpolate(x0, x1, t), flow.velocity_target(x0, x1)
    sigma = 0.7
    assert torch.equal(flow.sde_drift(x, v, t, sigma, "paper"), v)
    assert torch.equal(flow.sde_drift(x, v, t, sigma), v)  # default is the paper's eq. 7
    # on the straight path x - t v is the noise x0, so the correction is -sigma^2 x0 / (2 (1 - t))
    got = flow.sde_drift(x, v, t, sigma, "marginal")
    torch.testing.assert_close(got, v - sigma**2 * x0 / (2 * (1 - t[..., None])))
    torch.testing.assert_close(flow.sde_drift(x, v, t, 0.0, "marginal"), v)  # no noise, no correction
    torch.testing.assert_close(flow.sde_drift(x[0, 0], v[0, 0], 0.25, sigma, "marginal"),
                               v[0, 0] - sigma**2 * (x[0, 0] - 0.25 * v[0, 0]) / 1.5)  # python-number t
    with pytest.raises(ValueError, match="sde must be one of"):
        flow.sde_drift(x, v, t, sigma, "ito")
    with pytest.raises(ValueError, match="t < 1"):
        flow.sde_drift(x, v, torch.ones(3, 5), sigma, "marginal")
