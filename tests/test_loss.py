"""GDPO / GRPO loss modules: replay equality, objective, KL, chunked accumulation, keys."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type

from gdpo_listener.agents.anchor import SupervisedAnchor, flow_matching_loss
from gdpo_listener.agents.flow import gaussian_log_prob
from gdpo_listener.agents.loss import (
    AGGREGATION,
    GDPOLoss,
    GRPOLoss,
    chunked_update,
    listening_token_mask,
    select_steps,
    select_window,
    trajectory_batch,
)
from gdpo_listener.agents.policy import make_policy, transition_core
from gdpo_listener.envs.sde_env import ListenerSDEEnv
from gdpo_listener.rewards.groups import build_reward

K = 4
SIGMA = 0.5


def loss_setup(rl, loss_cls=GDPOLoss, beta=0.01, seed=0, frames=None, sde_steps=K, spec="expr+rot", cond_drop=0.0, **loss_kw):
    """Rollouts of the tiny policy on rows of ``frames`` frames (default one window); ``token_mask`` marks the
    listening tokens (the second half of every window), ``speaking_token_mask`` the speaking ones (first half)."""
    frames = rl.W if frames is None else frames
    bank = rl.tiny_bank(frames=frames)
    vae, norm = rl.tiny_vae()
    g = torch.Generator().manual_seed(seed)
    reward = build_reward(spec)
    env = ListenerSDEEnv(bank, vae, norm, reward, n_prompts=2, group_size=3, sde_steps=sde_steps, sigma=SIGMA,
                         generator=g, seed=seed, cond_drop=cond_drop)
    model = rl.tiny_arflow()
    behaviour = copy.deepcopy(model).requires_grad_(False)
    policy = make_policy(behaviour, env, generator=g)
    n_tokens = frames // rl.R
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        ro = env.rollout(n_tokens * sde_steps, policy, break_when_any_done=False)
    traj = trajectory_batch(ro, n_tokens, sde_steps)
    traj["token_mask"] = listening_token_mask(env.bank["listening"][traj["window"]], n_tokens)
    traj["speaking_token_mask"] = listening_token_mask(env.bank["speaking"][traj["window"]], n_tokens)
    loss = loss_cls(transition_core(policy), model, reward.lambdas, beta=beta,
                    speaking_columns=[f == "speaking" for f in reward.column_frames], **loss_kw)
    return loss, traj, model, behaviour


def shift_velocity_on_tokens(model, tokens, delta: float) -> None:
    """Change ``model`` on the given window-local tokens only: ``delta`` added to every velocity there."""
    full_pass = model._full_pass
    tokens = torch.as_tensor(tokens)

    def patched(cond, x_clean, x_noisy, t, noisy_idx, drop):
        v = full_pass(cond, x_clean, x_noisy, t, noisy_idx, drop)  # (B, M, Dv)
        return v + delta * torch.isin(noisy_idx, tokens).to(v.dtype)[:, None]

    model._full_pass = patched


@pytest.mark.parametrize("cond_drop,seed", [(0.0, 0), (0.5, 1)])
def test_replayed_log_probs_equal_collected(rl, cond_drop, seed):
    """Also with condition dropout (env cond_drop): replay nulls the same conditions as the collection."""
    loss, traj, _, _ = loss_setup(rl, cond_drop=cond_drop, seed=seed)
    if cond_drop:
        n = rl.tiny_bank().batch_size[0]
        assert (traj["window"] >= n).any() and (traj["window"] < n).any(), traj["window"]  # both kinds in the batch
    out_lp = []
    for k0 in range(0, K, 2):
        chunk = select_steps(traj, k0, k0 + 2)
        with torch.no_grad():
            loc = loss.transition[0].replay_loc(chunk["window"], chunk["history"], chunk["x"], chunk["t"])
        out_lp.append(gaussian_log_prob(chunk["action"], loc, torch.full_like(loc, 0.5 * (1 / K) ** 0.5)))
    replayed = torch.cat(out_lp, 1)
    assert replayed.shape == traj["action_log_prob"].shape
    assert torch.allclose(replayed, traj["action_log_prob"], atol=1e-4), (replayed - traj["action_log_prob"]).abs().max()


def test_objective_at_behaviour_params_is_minus_mean_advantage(rl):
    loss, traj, _, _ = loss_setup(rl, beta=0.0)
    assert traj["token_mask"].tolist() == [[False, False, True, True]] * 6  # actor listens in the second half
    loss.compute_advantage(traj)
    out = loss(select_steps(traj, 0, 2))
    assert out["ratio_mean"].item() == pytest.approx(1.0, abs=1e-3)
    assert float(out["clip_fraction"]) == 0.0
    assert out["loss_objective"].item() == pytest.approx(-traj["advantage"].mean().item(), abs=1e-3)
    assert float(out["kl"]) == pytest.approx(0.0, abs=1e-8)
    assert set(out.keys()) >= {"loss_objective", "loss_kl", "clip_fraction", "kl", "ratio_mean", "ratio_max"}
    assert set(out.keys()) <= set(AGGREGATION)  # chunked_update knows how to combine every output


def test_kl_closed_form_after_perturbation(rl):
    loss, traj, model, _ = loss_setup(rl, beta=0.5)
    with torch.no_grad():
        model.head.bias.add_(0.1)  # shifts every velocity by 0.1 -> every mean by dt * 0.1
    loss.compute_advantage(traj)
    out = loss(select_steps(traj, 0, 2))
    dt, sigma, D = 1 / K, 0.5, model.cfg.d_latent
    expected = D * (dt * 0.1) ** 2 / (2 * sigma**2 * dt)
    assert float(out["kl"]) == pytest.approx(expected, rel=1e-3)
    assert out["loss_kl"].item() == pytest.approx(0.5 * expected, rel=1e-3)


def test_chunked_gradient_equals_full_gradient(rl):
    loss, traj, model, _ = loss_setup(rl)
    loss.compute_advantage(traj)

    def grads(chunk):
        model.zero_grad()
        for k0 in range(0, K, chunk):
            out = loss(select_steps(traj, k0, k0 + chunk))
            ((out["loss_objective"] + out["loss_kl"]) * chunk / K).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    g_full, g_chunk = grads(K), grads(2)
    assert g_full.abs().max() > 0
    assert torch.allclose(g_full, g_chunk, atol=1e-6, rtol=1e-4)


def test_gdpo_and_grpo_differ_only_in_advantage(rl):
    lg, traj, _, _ = loss_setup(rl, GDPOLoss)
    lr = GRPOLoss(lg.transition[0], lg.actor_network, lg.lambdas)
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    a_g, a_r = lg.advantage_fn(r, gid), lr.advantage_fn(r, gid)
    assert not torch.allclose(a_g, a_r)
    td = traj.clone()
    td["advantage"] = a_g
    o1 = lg(select_steps(td, 0, 2))
    o2 = lr(select_steps(td, 0, 2))
    assert torch.allclose(o1["loss_objective"], o2["loss_objective"])


def test_set_keys_and_errors(rl):
    loss, traj, _, _ = loss_setup(rl)
    traj.rename_key_("action_log_prob", "old_lp")
    loss.set_keys(sample_log_prob="old_lp")
    loss.compute_advantage(traj)
    out = loss(select_steps(traj, 0, 2, step_keys=("x", "t", "action", "old_lp")))
    assert torch.isfinite(out["loss_objective"])
    with pytest.raises(ValueError, match="no key"):
        loss.set_keys(nonsense="x")
    traj["reward"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        loss.compute_advantage(traj)


def _closed_form_kl(delta: float, d_latent: int, sde_steps: int = K) -> float:
    """KL of one transition whose velocity moved by ``delta`` in every latent dim (same std Gaussians)."""
    dt = 1 / sde_steps
    return d_latent * (dt * delta) ** 2 / (2 * SIGMA**2 * dt)


def test_kl_covers_speaking_tokens(rl):
    loss, traj, model, _ = loss_setup(rl, beta=0.5)
    shift_velocity_on_tokens(model, [0, 1], 0.1)  # the model changes on the speaking tokens only
    loss.compute_advantage(traj)
    out = loss(select_steps(traj, 0, 2))
    # half the generated transitions moved: the mean KL over every transition is half the per-transition KL
    expected = 0.5 * _closed_form_kl(0.1, model.cfg.d_latent)
    assert float(out["kl"]) == pytest.approx(expected, rel=1e-3)
    assert out["loss_kl"].item() == pytest.approx(0.5 * expected, rel=1e-3)
    assert float(out["kl_speaking"]) == pytest.approx(2 * expected, rel=1e-3) and float(out["kl_listening"]) == 0.0
    # the KL's gradient reaches the model although no objective token moved
    out["loss_kl"].backward()
    assert max(p.grad.abs().max() for p in model.parameters() if p.grad is not None) > 0
    # the listening-token objective did not move: ratios there are 1
    assert float(out["ratio_max"]) == pytest.approx(1.0, abs=1e-4) and float(out["clip_fraction"]) == 0.0


def test_beta_speaking_weights_the_kl_of_speaking_tokens(rl):
    """``beta_speaking`` multiplies the KL of the tokens outside ``token_mask`` only; ``None`` = ``beta``."""
    d = rl.tiny_arflow().cfg.d_latent
    for moved, beta_speaking, weight in (([0, 1], 2.0, 2.0), ([0, 1], None, 0.5), ([2, 3], 2.0, 0.5)):
        loss, traj, model, _ = loss_setup(rl, beta=0.5, beta_speaking=beta_speaking)
        shift_velocity_on_tokens(model, moved, 0.1)  # tokens 0, 1 speak, 2, 3 listen
        loss.compute_advantage(traj)
        out = loss(select_steps(traj, 0, 2))
        half = 0.5 * _closed_form_kl(0.1, d)  # half the transitions moved
        assert float(out["kl"]) == pytest.approx(half, rel=1e-3)
        assert out["loss_kl"].item() == pytest.approx(weight * half, rel=1e-3), (moved, beta_speaking)
    with pytest.raises(ValueError, match="beta_speaking"):
        loss_setup(rl, beta_speaking=-1.0)


def test_bf16_reference_scores_the_kl_nearly_as_fp32(rl):
    """``algo.ref_precision=bf16`` (pipeline.rl.make_reference): at equal weights the KL is bf16 rounding only,
    far below the KL of a small real change, which it reproduces to a few per cent."""
    from gdpo_listener.pipeline.rl import make_reference

    d = rl.tiny_arflow().cfg.d_latent
    for delta in (0.0, 0.1):
        loss, traj, model, _ = loss_setup(rl, beta=0.5)
        bf16 = type(loss)(loss.transition[0], model, loss.lambdas, beta=0.5, reference=make_reference(model, "bf16"))
        assert make_reference(model, "fp32") is not model
        shift_velocity_on_tokens(model, [0, 1, 2, 3], delta)
        for lm in (loss, bf16):
            lm.compute_advantage(traj)
        kl32, kl16 = (float(lm(select_steps(traj, 0, 2))["kl"]) for lm in (loss, bf16))
        if delta == 0.0:
            assert kl32 == 0.0 and 0.0 <= kl16 < 1e-2 * _closed_form_kl(0.1, d)
        else:
            assert kl32 == pytest.approx(_closed_form_kl(0.1, d), rel=1e-3)
            assert kl16 == pytest.approx(kl32, rel=0.05)


def test_objective_tokens_listening_or_all(rl):
    results = {}
    for which in ("listening", "all"):
        loss, traj, model, _ = loss_setup(rl, beta=0.0, objective_tokens=which)
        shift_velocity_on_tokens(model, [0, 1], 2.0)  # speaking tokens only, far enough to clip
        loss.compute_advantage(traj)
        results[which] = (loss(select_steps(traj, 0, 2)), traj["advantage"].mean().item())
    out, mean_adv = results["listening"]
    assert out["loss_objective"].item() == pytest.approx(-mean_adv, abs=1e-4)  # ratios 1 on listening tokens
    assert float(out["ratio_max"]) == pytest.approx(1.0, abs=1e-4) and float(out["clip_fraction"]) == 0.0
    out_all, _ = results["all"]
    # speaking transitions moved by 0.5 std-units x 4 dims: their ratios collapse, half the transitions clip
    assert float(out_all["ratio_mean"]) < 0.7 and float(out_all["clip_fraction"]) > 0.4
    assert abs(out_all["loss_objective"].item() + mean_adv) > 1e-2
    with pytest.raises(ValueError, match="objective_tokens"):
        loss_setup(rl, objective_tokens="speaking")


@pytest.mark.parametrize("loss_cls", [GDPOLoss, GRPOLoss])
def test_objective_tokens_matched_credits_each_token_kind_with_its_columns(rl, loss_cls):
    """``matched``: listening tokens on the listening columns' advantage (the listening objective exactly as
    with a listening-only reward), speaking tokens on the speaking columns' (``loss_objective_speaking``)."""
    spec = "expr+rot+jaw@speaking"
    loss, traj, model, _ = loss_setup(rl, loss_cls, beta=0.0, spec=spec, objective_tokens="matched")
    loss.compute_advantage(traj)
    r, gid = traj["reward"], traj["group_id"]
    assert torch.allclose(traj["advantage"], loss.advantage_fn(r[:, :2], gid, loss.lambdas[:2]))
    assert torch.allclose(traj["advantage_speaking"], loss.advantage_fn(r[:, 2:], gid, loss.lambdas[2:]))
    assert not torch.allclose(traj["advantage"], traj["advantage_speaking"])
    out = loss(select_steps(traj, 0, 2))  # at the behaviour parameters every ratio is 1
    assert out["loss_objective"].item() == pytest.approx(-traj["advantage"].mean().item(), abs=1e-3)
    assert out["loss_objective_speaking"].item() == pytest.approx(-traj["advantage_speaking"].mean().item(), abs=1e-3)
    assert set(out.keys()) <= set(AGGREGATION)
    # moving the speaking tokens changes the speaking objective only
    shift_velocity_on_tokens(model, [0, 1], 2.0)
    moved = loss(select_steps(traj, 0, 2))
    assert moved["loss_objective"].item() == pytest.approx(out["loss_objective"].item(), abs=1e-4)
    assert abs(moved["loss_objective_speaking"].item() - out["loss_objective_speaking"].item()) > 1e-3
    # the update's gradient is that of loss_objective + loss_objective_speaking (+ KL) on the whole batch
    loss, traj, model, _ = loss_setup(rl, loss_cls, beta=0.5, spec=spec, objective_tokens="matched")
    loss.compute_advantage(traj)
    with torch.no_grad():
        model.head.bias.add_(0.05)
    model.zero_grad()
    full = loss(traj)
    (full["loss_objective"] + full["loss_objective_speaking"] + full["loss_kl"]).backward()
    expect = [p.grad.clone() for p in model.parameters()]
    stats = chunked_update(loss, traj, torch.optim.SGD(model.parameters(), lr=0.0), chunk_steps=1, grad_clip=1e9)
    assert all(torch.allclose(p.grad, e, atol=1e-6, rtol=1e-4) for p, e in zip(model.parameters(), expect))
    assert stats["loss/loss_objective_speaking"] == pytest.approx(full["loss_objective_speaking"].item(), rel=1e-4)
    # w_s scales the speaking objective only
    heavy = type(loss)(loss.transition[0], model, loss.lambdas, beta=0.5, objective_tokens="matched",
                       speaking_columns=loss.speaking_columns, speaking_objective_weight=3.0, reference=loss.ref_network)
    out3 = heavy(traj)
    assert out3["loss_objective_speaking"].item() == pytest.approx(3 * full["loss_objective_speaking"].item(), rel=1e-5)
    assert out3["loss_objective"].item() == pytest.approx(full["loss_objective"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="speaking_objective_weight"):
        type(loss)(loss.transition[0], model, loss.lambdas, objective_tokens="matched",
                   speaking_columns=loss.speaking_columns, speaking_objective_weight=-1.0)
    # a speaking column needs both kinds of columns and the trajectories' speaking tokens
    with pytest.raises(ValueError, match="matched"):
        loss_setup(rl, objective_tokens="matched")  # expr+rot: no speaking column
    del traj["speaking_token_mask"]
    with pytest.raises(KeyError, match="speaking_token_mask"):
        loss(traj)


def test_a_batch_without_listening_tokens_is_a_zero_objective_not_a_divergence(rl):
    """n_prompts=2 with windows where the actor only speaks: no objective transition in the whole batch.
    The update still applies the KL; loss_objective reports 0 (its exact contribution), not NaN."""
    loss, traj, model, _ = loss_setup(rl, GDPOLoss, beta=0.5)
    traj["token_mask"] = torch.zeros_like(traj["token_mask"])  # every token speaking
    loss.compute_advantage(traj)
    with torch.no_grad():
        model.head.bias.add_(0.05)
    stats = chunked_update(loss, traj, torch.optim.SGD(model.parameters(), lr=0.0), chunk_steps=1, grad_clip=1e9)
    assert stats["loss/loss_objective"] == 0.0 and stats["loss/loss_kl"] > 0  # the KL still regularises every token
    assert math.isnan(stats["policy/clip_fraction"])  # a diagnostic of no transition: not measured


def test_chunked_update_over_windows_equals_batch_objective_and_kl(rl):
    """Several sliding windows, objective on listening tokens only, KL on every token.

    Expected gradient: d/dtheta [mean over objective transitions of the PPO term + beta * mean over
    all transitions of the KL], from one full pass per window; diagnostics: means with the same
    weights, ratio_max the maximum over the whole batch.
    """
    n_long, k = 11, 2  # windows [0,4) [3,7) [6,10) [7,11): 4, 3, 3, 1 new tokens
    loss, traj, model, _ = loss_setup(rl, beta=0.5, frames=n_long * rl.R, sde_steps=k)
    spans = loss.transition[0].schedule
    assert len(spans) == 4
    # listening tokens 5..10; keep 5..8: the first window (speaking) and the last (token 10) have no objective token
    traj["token_mask"][:, 9:] = False
    loss.compute_advantage(traj)
    with torch.no_grad():
        model.head.bias.add_(0.05)  # away from the behaviour policy: ratios and KL matter
        model.head.weight.mul_(1.2)  # ratios that differ between windows
    model.zero_grad()
    obj_sum = kl_sum = 0.0
    n_obj = n_all = 0
    diag = {"kl": 0.0, "clip_fraction": 0.0, "ratio_mean": 0.0, "kl_listening": 0.0, "kl_speaking": 0.0}
    n_kind = {"listening": 0, "speaking": 0}
    window_max = []
    for span in spans:
        win = select_window(traj, span)
        out = loss(win)
        c_obj, c_all = int(win["token_mask"].sum()) * k, win["token_mask"].numel() * k
        obj_sum = obj_sum + out["loss_objective"] * c_obj
        kl_sum = kl_sum + out["loss_kl"] * c_all
        n_obj, n_all = n_obj + c_obj, n_all + c_all
        diag["kl"] += float(out["kl"]) * c_all
        c_lis = int(win["token_mask"].sum()) * k
        for kind, c_kind in (("listening", c_lis), ("speaking", c_all - c_lis)):
            diag[f"kl_{kind}"] += float(out[f"kl_{kind}"]) * c_kind
            n_kind[kind] += c_kind
        diag["clip_fraction"] += float(out["clip_fraction"]) * c_obj
        diag["ratio_mean"] += float(out["ratio_mean"]) * c_obj
        window_max.append(float(out["ratio_max"]))
    (obj_sum / n_obj + kl_sum / n_all).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    assert sum(math.isnan(m) for m in window_max) == 2  # windows without objective tokens have no ratio_max
    true_max = max(m for m in window_max if not math.isnan(m))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the parameters, read the gradient
    for chunk_steps in (1, 2):
        stats = chunked_update(loss, traj, opt, chunk_steps=chunk_steps, grad_clip=1e9)
        for e, g in zip(expected, (p.grad for p in model.parameters())):
            assert torch.allclose(e, g, atol=1e-6, rtol=1e-4)
        assert stats["loss/loss_objective"] == pytest.approx((obj_sum / n_obj).item(), rel=1e-4)
        assert stats["loss/loss_kl"] == pytest.approx((kl_sum / n_all).item(), rel=1e-4)
        assert stats["policy/kl"] == pytest.approx(diag["kl"] / n_all, rel=1e-4)
        for kind in ("listening", "speaking"):  # each over its own tokens' transitions
            assert stats[f"policy/kl_{kind}"] == pytest.approx(diag[f"kl_{kind}"] / n_kind[kind], rel=1e-4)
        assert stats["policy/clip_fraction"] == pytest.approx(diag["clip_fraction"] / n_obj, abs=1e-6)
        assert stats["policy/ratio_mean"] == pytest.approx(diag["ratio_mean"] / n_obj, rel=1e-5)
        assert stats["policy/ratio_max"] == pytest.approx(true_max, rel=1e-6)
        assert stats["policy/ratio_max"] > stats["policy/ratio_mean"]
        assert not any(key.startswith("loss/") and "loss_" not in key for key in stats)
    # the windows' maxima differ: any mean of them would fall short of the maximum checked above
    assert min(m for m in window_max if not math.isnan(m)) < true_max - 1e-2


def test_chunked_update_and_loss_argument_errors(rl):
    loss, traj, model, _ = loss_setup(rl)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError, match="epochs"):
        chunked_update(loss, traj, opt, epochs=0)
    with pytest.raises(ValueError, match="chunk_steps"):
        chunked_update(loss, traj, opt, chunk_steps=0)
    with pytest.raises(ValueError, match="eps_mode"):
        GDPOLoss(loss.transition[0], model, loss.lambdas, eps_mode="scaled")


def test_eps_mode_reaches_the_advantage_and_diagnostics(rl):
    loss, traj, model, _ = loss_setup(rl)
    ref = GRPOLoss(loss.transition[0], model, loss.lambdas, eps_mode="absolute")
    r = torch.tensor([[0.0, 0.0], [1e-4, 0.0], [0.0, 0.0], [1e-4, 1e-4]])  # rewards at the scale of eps
    gid = torch.tensor([0, 0, 1, 1])
    a_rel, a_abs = loss.advantage_fn(r, gid), GDPOLoss(loss.transition[0], model, loss.lambdas,
                                                       eps_mode="absolute").advantage_fn(r, gid)
    std_a = 2 ** 0.5 / 2 * 1e-4  # prompt A's within-group std of reward 1
    assert a_rel[1].item() == pytest.approx(0.5e-4 / std_a / 2, rel=1e-3)  # a full z-score, / sum lambda
    assert a_abs[1].item() == pytest.approx(0.5e-4 / (std_a + 1e-4) / (2 + 1e-4), rel=1e-4)  # damped by eps
    assert ref.advantage_fn(r, gid)[1].item() == pytest.approx(0.5e-4 / (std_a + 1e-4), rel=1e-4)
    loss.compute_advantage(traj)
    d = loss.batch_diagnostics(traj)
    assert d["frac_std_below_eps"].shape == (2,) and d["corr_zscore"].shape == (2,)
    assert float(d["distinct_per_group"]) == 3.0  # 3 rollouts per prompt, continuous rewards


def test_std_scope_reaches_the_advantage_and_the_running_spread_is_bias_corrected(rl):
    loss, traj, model, _ = loss_setup(rl)
    r = torch.tensor([[0.0, 0.0], [2.0, 1.0], [0.0, 0.0], [0.2, 0.1]])  # prompt 0 spreads 10x more
    gid = torch.tensor([0, 0, 1, 1])
    group = loss.advantage_fn(r, gid)
    batch = GDPOLoss(loss.transition[0], model, loss.lambdas, std_scope="batch").advantage_fn(r, gid)
    assert torch.allclose(group[:2].abs(), group[2:].abs(), atol=1e-3)  # eq. 8: both prompts unit spread (up to eps)
    assert torch.allclose(batch[1] / batch[3], torch.tensor(10.0))  # shared scale: prompt 0's larger spread counts for more
    run = GDPOLoss(loss.transition[0], model, loss.lambdas, std_scope="running", std_momentum=0.5)
    a1 = run.advantage_fn(r, gid)
    assert torch.allclose(a1, batch, atol=1e-6)  # first update: the batch's own spread (bias-corrected)
    a2 = run.advantage_fn(r * 3, gid)  # running var = (0.5 * 0.5 * v + 0.5 * 9 v) / 0.75 = 19 v / 3
    assert torch.allclose(a2, batch * 3 / (19 / 3) ** 0.5, atol=1e-5)
    assert int(run.reward_scale.count) == 2
    state = {k: v.clone() for k, v in run.reward_scale.state_dict().items()}
    fresh = GDPOLoss(loss.transition[0], model, loss.lambdas, std_scope="running", std_momentum=0.5)
    fresh.reward_scale.load_state_dict(state)  # a resumed run continues the same average
    assert torch.allclose(fresh.reward_scale.value(), run.reward_scale.value())
    grpo = GRPOLoss(loss.transition[0], model, loss.lambdas, std_scope="running")
    assert grpo.reward_scale.ema.shape == (1,)  # GRPO: one spread, the weighted sum's
    grpo.compute_advantage(traj)
    assert torch.isfinite(traj["advantage"]).all()
    with pytest.raises(ValueError, match="std_scope"):
        GDPOLoss(loss.transition[0], model, loss.lambdas, std_scope="prompt")
    with pytest.raises(ValueError, match="std_momentum"):
        GDPOLoss(loss.transition[0], model, loss.lambdas, std_scope="running", std_momentum=1.0)


def test_listening_token_mask():
    lis = torch.tensor([[False] * 8 + [True] + [False] * 7, [False] * 16])
    assert listening_token_mask(lis, 2).tolist() == [[False, True], [False, False]]
    with pytest.raises(ValueError, match="tokens"):
        listening_token_mask(lis, 3)


def test_supervised_anchor_adds_exactly_its_flow_loss_gradient(rl):
    """algo.sft_coef: the update's gradient is the RL batch's plus coef x the gradient of the supervised flow
    loss on the drawn train windows (the same draws as an independent computation); coef 0 changes nothing."""
    loss, traj, model, _ = loss_setup(rl, beta=0.5)
    loss.compute_advantage(traj)
    with torch.no_grad():
        model.head.bias.add_(0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: read the gradient
    chunked_update(loss, traj, opt, chunk_steps=1, grad_clip=1e9)
    rl_grad = [p.grad.clone() for p in model.parameters()]
    bank, coef, B = rl.tiny_bank(seed=3), 0.7, 5
    # the anchor's loss, computed independently from the same generator state
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(bank.batch_size[0], (B,), generator=g)
    rows = bank[idx]
    x0 = torch.randn(rows["actor_latent"].shape, generator=g)
    t = torch.rand(rows["actor_latent"].shape[:2], generator=g)
    model.zero_grad()
    flow = flow_matching_loss(model, rows, x0, t).mean()
    flow.backward()
    flow_grad = [p.grad.clone() for p in model.parameters()]
    assert sum(float(f.abs().sum()) for f in flow_grad) > 0
    anchor = SupervisedAnchor(bank, coef, B, torch.Generator().manual_seed(11))
    stats = chunked_update(loss, traj, opt, chunk_steps=1, grad_clip=1e9, anchor=anchor)
    assert stats["loss/loss_sft"] == pytest.approx(coef * flow.item(), rel=1e-5)
    for p, r, f in zip(model.parameters(), rl_grad, flow_grad):
        assert torch.allclose(p.grad, r + coef * f, atol=1e-6, rtol=1e-4)
    zero = SupervisedAnchor(bank, 0.0, B, torch.Generator().manual_seed(11))
    chunked_update(loss, traj, opt, chunk_steps=1, grad_clip=1e9, anchor=zero)
    assert all(torch.allclose(p.grad, r, atol=1e-7) for p, r in zip(model.parameters(), rl_grad))
    # two processes, each its half of the global batch: the shares sum to one process's loss
    halves = [SupervisedAnchor(bank, coef, 4, torch.Generator().manual_seed(5), rows=s)(model)["loss_sft"]
              for s in (slice(0, 2), slice(2, 4))]
    whole = SupervisedAnchor(bank, coef, 4, torch.Generator().manual_seed(5))(model)["loss_sft"]
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.item(), rel=1e-5)
    with pytest.raises(ValueError, match="coef"):
        SupervisedAnchor(bank, -1.0, B, g)
