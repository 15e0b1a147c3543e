"""algo.group_kl: the KL measured in one FLAME group's decoded-motion metric (agents/group_metric.py).

The closed form against the plain KL, the metric of a known linear decoder and of a real (tiny) VAE against
finite differences, and the loss term against its definition, through the chunked update."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from test_sde import SIGMA
from torchrl.envs.utils import ExplorationType, set_exploration_type

from gdpo_listener.agents import flow
from gdpo_listener.agents.group_metric import decoded_group_metric
from gdpo_listener.agents.loss import GDPOLoss, chunked_update, collect_trajectories, listening_token_mask
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.flame import FLAME_DIM, group_slice
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.envs.windows import decode_normalised
from gdpo_listener.rewards.groups import build_reward

K = 4


def test_kl_metric_of_the_identity_is_the_plain_kl_and_a_null_direction_costs_nothing():
    g = torch.Generator().manual_seed(0)
    mu_p, mu_q = torch.randn(3, 5, 6, generator=g), torch.randn(3, 5, 6, generator=g)  # (B, N, D)
    dt = torch.tensor([0.25, 0.5, 0.125])  # (B,) leading dims
    assert torch.allclose(flow.gaussian_kl_metric(mu_p, mu_q, 0.7, dt, torch.eye(6)),
                          flow.gaussian_kl_same_std(mu_p, mu_q, 0.7, dt), rtol=1e-5)
    P = torch.zeros(6, 6)
    P[0, 0] = 1.0  # weighs the first dim only
    moved = mu_q.clone()
    moved[..., 1:] += 3.0  # a difference in the other dims only
    assert torch.equal(flow.gaussian_kl_metric(moved, mu_q, 0.7, dt, P), torch.zeros(3, 5))
    moved[..., 0] += 0.2
    expected = torch.full((3, 5), 0.04) / (2 * 0.49 * dt[:, None])
    assert torch.allclose(flow.gaussian_kl_metric(moved, mu_q, 0.7, dt, P), expected, rtol=1e-5)


class LinearDecoder(torch.nn.Module):
    """``decode(z)``: each token's latent (Dv) -> its r frames (r, 67) by one matrix, no mixing of tokens."""

    def __init__(self, W: torch.Tensor, r: int, window: int):
        super().__init__()
        self.W, self.cfg = W, SimpleNamespace(r=r, window=window)  # W (Dv, r * 67)

    def decode(self, z):  # (B, n, Dv) -> (B, n r, 67)
        return (z @ self.W).reshape(z.shape[0], -1, FLAME_DIM)


def test_metric_of_a_linear_decoder_is_its_normalised_gram():
    g = torch.Generator().manual_seed(1)
    Dv, r = 5, 2
    dec = LinearDecoder(torch.randn(Dv, r * FLAME_DIM, generator=g), r=r, window=4)
    z = torch.randn(3, 6, Dv, generator=g)  # (B, N, Dv): three VAE windows of 2 tokens
    M = decoded_group_metric(dec, z, group_slice("jaw"))
    Wg = dec.W.reshape(Dv, r, FLAME_DIM)[:, :, group_slice("jaw")].reshape(Dv, -1)  # (Dv, r C_jaw)
    gram = Wg @ Wg.T
    assert torch.allclose(M, gram / torch.linalg.eigvalsh(gram).max(), atol=1e-4)


def test_metric_of_a_vae_weighs_directions_by_the_motion_they_decode_to(rl):
    """Real (tiny) VAE: symmetric, PSD, largest eigenvalue 1, and two directions' weights in the ratio of the squared
    jaw motion a small step along each decodes to (first order)."""
    vae, _ = rl.tiny_vae()
    z = rl.tiny_bank()["actor_latent"]  # (B, N, Dv)
    M = decoded_group_metric(vae, z, group_slice("jaw"))
    ev = torch.linalg.eigvalsh(M.double())
    assert torch.allclose(M, M.T, atol=1e-6) and ev.min() > -1e-6 and ev.max() == pytest.approx(1.0, abs=1e-5)

    def energy(u, h=1e-3):
        d = decode_normalised(vae, z + h * u) - decode_normalised(vae, z - h * u)
        return (d[..., group_slice("jaw")] / (2 * h)).pow(2).sum()

    u1, u2 = torch.linalg.eigh(M.double())[1][:, -1].float(), torch.randn(rl.DV, generator=torch.Generator().manual_seed(3))
    assert (energy(u2) / energy(u1)).item() == pytest.approx((u2 @ M @ u2 / (u1 @ M @ u1)).item(), rel=2e-2)


def test_metric_refuses_bad_latents(rl):
    vae, _ = rl.tiny_vae()
    z = rl.tiny_bank()["actor_latent"]
    z[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite latents"):
        decoded_group_metric(vae, z, group_slice("jaw"))


def _batch(rl):
    bank, (vae, norm) = rl.tiny_bank(), rl.tiny_vae()
    g = torch.Generator().manual_seed(0)
    env = ListenerSDEEnv(bank, vae, norm, build_reward("expr+rot"), n_prompts=2, group_size=2, sde_steps=K,
                         sigma=SIGMA, generator=g, seed=0)
    policy = make_policy(rl.tiny_arflow(), env, generator=g)
    env.set_windows(torch.tensor([2, 5]))
    with set_exploration_type(ExplorationType.RANDOM), torch.no_grad():
        traj = collect_trajectories(env, policy)
    traj["token_mask"] = listening_token_mask(env.bank["listening"][traj["window"]], rl.N)
    trained = copy.deepcopy(transition_core(policy).arflow)
    with torch.no_grad():
        trained.head.bias.add_(0.05)  # moved off the reference
    return policy, trained, traj


def test_group_kl_term_is_the_metric_kl_of_the_listening_transitions(rl):
    """loss_kl_<g> = beta_g x mean over listening transitions of (mu - mu_ref)^T M (mu - mu_ref) / (2 sigma^2 dt):
    with M = I it is beta_g x kl_listening; with M weighing one latent dim, that dim's share; the plain terms unchanged."""
    policy, trained, traj = _batch(rl)
    core = transition_core(policy)
    P = torch.zeros(rl.DV, rl.DV)
    P[1, 1] = 1.0
    plain = GDPOLoss(core, trained, [1.0, 1.0], beta=0.5, reference=copy.deepcopy(core.arflow))
    loss = GDPOLoss(core, trained, [1.0, 1.0], beta=0.5, reference=plain.ref_network,
                    group_kl={"jaw": (0.3, torch.eye(rl.DV)), "rot": (2.0, P)})
    out, ref = loss(traj), plain(traj)
    for k in ("loss_objective", "loss_kl", "kl_listening"):
        assert torch.equal(out[k], ref[k]), k
    assert ref["kl_listening"] > 0
    assert torch.allclose(out["loss_kl_jaw"], 0.3 * ref["kl_listening"], rtol=1e-5)
    assert torch.allclose(out["kl_jaw"], ref["kl_listening"], rtol=1e-5)
    with torch.no_grad():
        mu = core.replay_loc(traj["window"], traj["history"], traj["x"], traj["t"], model=trained)  # (B, K, N, Dv)
        mu_ref = core.replay_loc(traj["window"], traj["history"], traj["x"], traj["t"], model=plain.ref_network)
    lis = traj["token_mask"].bool()[:, None, :].expand(mu.shape[:3])  # (B, K, N)
    kl1 = (mu - mu_ref)[..., 1].pow(2) / (2 * SIGMA**2 / K)  # (B, K, N)
    assert out["kl_rot"] > 0 and torch.allclose(out["loss_kl_rot"], 2.0 * kl1[lis].mean(), rtol=1e-4)


def test_group_kl_is_trained_through_the_chunked_update_and_logged(rl):
    policy, trained, traj = _batch(rl)
    M = torch.zeros(rl.DV, rl.DV)
    M[0, 0] = 1.0
    core = transition_core(policy)
    loss = GDPOLoss(core, trained, [1.0, 1.0], beta=0.0, reference=copy.deepcopy(core.arflow), group_kl={"jaw": (1.0, M)})
    loss.compute_advantage(traj)
    traj["advantage"].zero_()  # no objective, no plain KL: the only gradient is the group KL's
    opt = torch.optim.SGD(trained.parameters(), lr=0.0)
    stats = chunked_update(loss, traj, opt, chunk_steps=2, grad_clip=1e9)
    assert stats["loss/loss_kl_jaw"] > 0 and stats["policy/kl_jaw"] == pytest.approx(stats["loss/loss_kl_jaw"], rel=1e-5)
    assert trained.head.bias.grad[0] != 0 and torch.all(trained.head.bias.grad[1:] == 0)  # only the weighed latent dim


@pytest.mark.parametrize("bad,match", [((-1.0, torch.eye(4)), "finite and >= 0"), ((1.0, torch.ones(4, 3)), "square")])
def test_loss_refuses_a_bad_group_kl(rl, bad, match):
    policy, trained, _ = _batch(rl)
    with pytest.raises(ValueError, match=match):
        GDPOLoss(transition_core(policy), trained, [1.0, 1.0], group_kl={"jaw": bad})
