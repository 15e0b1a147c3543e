"""Masked statistics, reward terms, FLAME-group reward composition, spec parsing, build_reward."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from gdpo_listener.envs.flame import FLAME_DIM, GROUP_NAMES, GROUPS
from gdpo_listener.rewards import (
    DEFAULT_WEIGHTS,
    FlameReward,
    GroupReward,
    MeanDriftTerm,
    MSETerm,
    VarianceTerm,
    VelocityVarianceTerm,
    build_reward,
    dynamic_deviation,
    frame_velocity,
    masked_mean,
    masked_std,
    parse_reward_spec,
    velocity_std,
)
from gdpo_listener.rewards.examples import JerkTerm, LogPenaltyGroupReward, PeakVelocityTerm


def seq(*cols, mask=None):
    """(1, T, C) tensor from per-channel value lists, and a (1, T) bool mask (default all valid)."""
    x = torch.tensor(cols, dtype=torch.float32).T.unsqueeze(0)
    m = torch.ones(1, x.shape[1], dtype=torch.bool) if mask is None else torch.tensor([mask])
    return x, m


def t(v):
    return torch.tensor(v, dtype=torch.float32)


# ---------------------------------------------------------------- stats


def test_mean_std_velocity_hand_values():
    x, m = seq([0, 1, 3, 6])
    assert torch.allclose(masked_mean(x, m), t([[2.5]]))
    assert torch.allclose(masked_std(x, m), t([[math.sqrt((6.25 + 2.25 + 0.25 + 12.25) / 4)]]))  # population
    v, vm = frame_velocity(x, m)
    assert torch.equal(v, t([[[1], [2], [3]]])) and vm.all()
    assert torch.allclose(velocity_std(x, m), t([[math.sqrt(2 / 3)]]))


def test_masked_frames_are_ignored_even_nan():
    x, m = seq([0, 2, math.nan, 4], mask=[True, True, False, True])
    assert torch.allclose(masked_mean(x, m), t([[2.0]]))
    assert torch.allclose(masked_std(x, m), t([[math.sqrt(8 / 3)]]))
    v, vm = frame_velocity(x, m)
    assert vm.tolist() == [[True, False, False]]  # a velocity needs both frames valid
    assert torch.isfinite(v).all() and float(v[0, 0, 0]) == 2.0
    assert float(velocity_std(x, m)) == 0.0  # a single valid velocity -> std 0


def test_degenerate_cases_are_zero_not_nan():
    x, _ = seq([3, 3, 3, 3])
    assert float(masked_std(x)) == 0.0 and float(velocity_std(x)) == 0.0
    one, m1 = seq([5, 7, 9], mask=[False, True, False])
    assert float(masked_mean(one, m1)) == 7.0 and float(masked_std(one, m1)) == 0.0
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert float(masked_mean(one, none)) == 0.0 and float(masked_std(one, none)) == 0.0
    assert float(dynamic_deviation(one, one * 2, none)) == 0.0
    # the gradient at zero variance is 0, not NaN
    xg = torch.full((2, 5, 3), 0.1, requires_grad=True)
    (masked_std(xg) + velocity_std(xg)).sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_stats_batched_match_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 4, generator=g)
    m = torch.rand(3, 9, generator=g) > 0.3
    m[2] = False
    m[2, 4] = True  # one valid frame in row 2
    mean, std, vstd = masked_mean(x, m), masked_std(x, m), velocity_std(x, m)
    for b in range(3):
        xb, mb = x[b].numpy(), m[b].numpy()
        n = mb.sum()
        exp_mean = xb[mb].mean(0) if n else np.zeros(4)
        exp_std = xb[mb].std(0) if n >= 2 else np.zeros(4)
        vel = np.stack([xb[i + 1] - xb[i] for i in range(8) if mb[i] and mb[i + 1]] or [np.zeros(4)] * 1)
        nv = sum(1 for i in range(8) if mb[i] and mb[i + 1])
        exp_v = vel.std(0) if nv >= 2 else np.zeros(4)
        np.testing.assert_allclose(mean[b].numpy(), exp_mean, atol=1e-5)
        np.testing.assert_allclose(std[b].numpy(), exp_std, atol=1e-5)
        np.testing.assert_allclose(vstd[b].numpy(), exp_v, atol=1e-5)
    # extra leading dims behave like a flattened batch
    x4, m4 = x.reshape(1, 3, 9, 4), m.reshape(1, 3, 9)
    assert torch.allclose(masked_std(x4, m4).reshape(3, 4), std)


def test_dynamic_deviation_hand_value():
    pred, m = seq([0, 1, 3, 6], [0, 1, 2, 3])
    target, _ = seq([0, 1, 2, 3], [0, 1, 2, 3])
    # channel 0: |sqrt(2/3) - 0|, channel 1: 0 -> mean over channels
    assert torch.allclose(dynamic_deviation(pred, target, m), t([math.sqrt(2 / 3) / 2]))


def test_stats_shape_errors():
    x = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="mask"):
        masked_mean(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        dynamic_deviation(x, torch.zeros(2, 5, 2))


# ---------------------------------------------------------------- terms


def test_terms_hand_values():
    pred, m = seq([0, 2, 0, 2], [0, 2, 0, 2])  # std 1 and 1; velocity (2, -2, 2): population std s
    target, _ = seq([0, 0, 0, 0], [0, 6, 0, 6])  # std 0 and 3; velocity std 0 and 3 s
    s = math.sqrt(32) / 3  # (2, -2, 2): mean 2/3, squared deviations (16 + 64 + 16) / 9 / 3 = 32 / 9
    assert torch.allclose(VarianceTerm()(pred, target, m), t([(1 + 2) / 2]))
    assert torch.allclose(VelocityVarianceTerm()(pred, target, m), t([(s + 2 * s) / 2]))
    assert torch.allclose(MeanDriftTerm()(pred, target, m), t([(1 + 2) / 2]))  # means 1,1 vs 0,3
    # MSE: mean over (t, c): ch0 (0+4+0+4), ch1 (0+16+0+16) -> 40 / 8
    assert torch.allclose(MSETerm()(pred, target, m), t([5.0]))


def test_terms_with_masks():
    pred, _ = seq([1, 1, 1, 1], [0, 0, 0, 0])
    target, _ = seq([0, 2, 4, 100], [1, 2, 3, 100])
    m = torch.tensor([[True, True, True, False]])
    assert torch.allclose(MeanDriftTerm()(pred, target, m), t([(1 + 2) / 2]))  # target means 2 and 2
    assert torch.allclose(MSETerm()(pred, target, m), t([(1 + 1 + 9 + 1 + 4 + 9) / 6]))
    assert torch.allclose(VarianceTerm()(pred, target, m), t([(math.sqrt(8 / 3) + math.sqrt(2 / 3)) / 2]))
    # velocities: target (2, 2) and (1, 1), the jump to frame 3 is masked -> std 0; pred std 0
    assert float(VelocityVarianceTerm()(pred, target, m)) == 0.0


def test_terms_single_frame_and_empty_mask():
    pred, _ = seq([1, 5, 9], [2, 2, 2])
    target, _ = seq([4, 0, 0], [0, 0, 0])
    single = torch.tensor([[True, False, False]])
    empty = torch.zeros(1, 3, dtype=torch.bool)
    assert float(VarianceTerm()(pred, target, single)) == 0.0
    assert float(VelocityVarianceTerm()(pred, target, single)) == 0.0
    assert torch.allclose(MeanDriftTerm()(pred, target, single), t([(3 + 2) / 2]))
    assert torch.allclose(MSETerm()(pred, target, single), t([(9 + 4) / 2]))
    for term in (VarianceTerm(), VelocityVarianceTerm(), MeanDriftTerm(), MSETerm(), JerkTerm()):
        assert float(term(pred, target, empty)) == 0.0


def test_jerk_term_example():
    pred, m = seq([0, 1, 0, 1, 0])  # second differences (-2, 2, -2)
    target, _ = seq([0, 0, 1, 3, 6])  # second differences (1, 1, 1): std 0
    assert torch.allclose(JerkTerm()(pred, target, m), t([math.sqrt(32) / 3]))
    m2 = torch.tensor([[True, True, True, False, True]])  # only one full triple -> std 0
    assert float(JerkTerm()(pred, target, m2)) == 0.0


def test_peak_velocity_term_scores_the_strongest_burst_whatever_its_timing():
    T = 60
    burst = torch.tensor([1.0, -1.0] * 5)  # 10 frames of alternating motion: velocities +-2
    def at(start, amp=1.0):
        x = torch.zeros(1, T, 1)
        x[0, start:start + 10, 0] = amp * burst
        return x
    m = torch.ones(1, T, dtype=torch.bool)
    term = PeakVelocityTerm(frames=10, hop=1)
    target = at(40)
    assert float(term(at(5), target, m)) == pytest.approx(0.0, abs=1e-6)  # same burst, another time: no penalty
    assert float(VelocityVarianceTerm()(at(5), target, m)) == pytest.approx(0.0, abs=1e-6)  # (the window term agrees)
    peak = float(term(torch.zeros(1, T, 1), target, m))  # no burst: the target's peak std
    v = torch.diff(torch.cat([torch.zeros(1), burst, torch.zeros(1)]))[:10]  # the strongest 10-velocity sub-window
    assert peak == pytest.approx(float(v.std(unbiased=False)), rel=1e-5)
    assert float(term(at(5, 0.5), target, m)) == pytest.approx(peak / 2, rel=1e-5)  # half the amplitude: half the penalty
    # the peak is not diluted by the window's length: a burst in a 4x longer window costs the same
    long_m = torch.ones(1, 4 * T, dtype=torch.bool)
    long_t = torch.cat([target, torch.zeros(1, 3 * T, 1)], 1)
    assert float(term(torch.zeros(1, 4 * T, 1), long_t, long_m)) == pytest.approx(peak, rel=1e-5)
    assert float(VelocityVarianceTerm()(torch.zeros(1, 4 * T, 1), long_t, long_m)) < 0.6 * float(
        VelocityVarianceTerm()(torch.zeros(1, T, 1), target, m))
    # masked frames are never read; sub-windows with too few valid velocities do not count
    masked = m.clone()
    masked[0, 35:] = False
    assert float(term(torch.zeros(1, T, 1), target, masked)) == 0.0
    bad = target.clone()
    bad[0, 35:] = float("nan")
    assert float(term(torch.zeros(1, T, 1), bad, masked)) == 0.0
    assert float(term(at(5), target, torch.zeros(1, T, dtype=torch.bool))) == 0.0
    assert float(PeakVelocityTerm(frames=100)(at(5), target, m)) == pytest.approx(0.0, abs=1e-6)  # short window: one sub-window
    with pytest.raises(ValueError, match="frames"):
        PeakVelocityTerm(frames=1)


# ---------------------------------------------------------------- groups


def flame(B=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, FLAME_DIM, generator=g), torch.randn(B, T, FLAME_DIM, generator=g)


def test_group_reward_composes_weighted_terms():
    pred, target = flame()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    gr = GroupReward("jaw", {"var": (VarianceTerm(), 2.0), "mse": (MSETerm(), 0.5)})
    p, g = pred[..., 50:53], target[..., 50:53]
    expect = -(2.0 * VarianceTerm()(p, g, mask) + 0.5 * MSETerm()(p, g, mask))
    assert torch.allclose(gr(pred, target, mask), expect)
    assert torch.allclose(gr(p, g, mask), expect)  # the group's own channels work too
    pen = gr.penalties(pred, target, mask)
    assert set(pen) == {"var", "mse"} and torch.allclose(pen["mse"], MSETerm()(p, g, mask))
    with pytest.raises(ValueError, match="expects"):
        gr(pred[..., :10], target[..., :10], mask)


def test_group_reward_validation():
    with pytest.raises(ValueError, match="valid groups: expr, jaw"):
        GroupReward("head", {"var": (VarianceTerm(), 1.0)})
    with pytest.raises(ValueError, match="finite and >= 0"):
        GroupReward("jaw", {"var": (VarianceTerm(), -1.0)})
    with pytest.raises(ValueError, match="at least one term"):
        GroupReward("jaw", {})
    with pytest.raises(TypeError, match="nn.Module"):
        GroupReward("jaw", {"var": (lambda p, g, m: p.sum(), 1.0)})


class NaNTerm(nn.Module):
    def forward(self, pred, target, mask):
        return torch.full(pred.shape[:1], math.nan)


class RowCounter(nn.Module):
    """A group reward that records which batch sizes it was called with."""

    def __init__(self, group):
        super().__init__()
        self.group, self.calls = group, []

    def forward(self, pred, target, mask):
        self.calls.append(pred.shape[0])
        return -torch.ones(pred.shape[0])


def test_flame_reward_vector_lambdas_and_invalid_entries():
    pred, target = flame(B=3)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2] = False  # row 2: no listening frame -> 0 everywhere
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, GROUP_NAMES.index("rot")] = False  # row 1: rot invalid
    expr = GroupReward("expr", {"vel": (VelocityVarianceTerm(), 1.0)})
    rot = GroupReward("rot", {"drift": (MeanDriftTerm(), 1.0)})
    fr = FlameReward([expr, rot], lambdas={"rot": 2.0})
    assert fr.group_names == ("expr", "rot")
    assert torch.equal(fr.lambdas, t([1.0, 2.0]))
    out = fr.compute(pred, target, mask, valid)
    r, ok = out["reward"], out["valid"]
    assert r.shape == (3, 2)
    assert ok.tolist() == [[True, True], [True, False], [False, False]]
    assert torch.allclose(r[:2, 0], expr(pred[:2], target[:2], mask[:2]))
    assert torch.allclose(r[0, 1], rot(pred[:1], target[:1], mask[:1])[0])
    assert r[1, 1] == 0 and (r[2] == 0).all()
    assert torch.equal(fr(pred, target, mask, valid), r)
    assert torch.equal(fr.reward_valid(mask, valid), ok)
    # invalid rows are never passed to the group module
    counter = RowCounter("rot")
    FlameReward([counter])(pred, target, mask, valid)
    assert counter.calls == [1]
    # extra leading batch dims
    r4 = fr(pred.reshape(1, 3, 6, FLAME_DIM), target.reshape(1, 3, 6, FLAME_DIM), mask.reshape(1, 3, 6),
            valid.reshape(1, 3, 6))
    assert torch.allclose(r4.reshape(3, 2), r)


def test_flame_reward_term_values():
    pred, target = flame(B=3)
    mask = torch.ones(3, 6, dtype=torch.bool)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[0, GROUP_NAMES.index("jaw")] = False
    fr = build_reward("jaw", weights={"mse": 0.5})
    tv = fr.term_values(pred, target, mask, valid, reduce="none")
    assert set(tv) == {f"reward/jaw/{k}" for k in ("var", "vel", "drift", "mse")}
    sl = GROUPS["jaw"]
    mse = MSETerm()(pred[..., sl], target[..., sl], mask)
    assert tv["reward/jaw/mse"][0] == 0 and torch.allclose(tv["reward/jaw/mse"][1:], mse[1:])
    tm = fr.term_values(pred, target, mask, valid)  # mean over the valid rows only
    assert tm["reward/jaw/mse"].dim() == 0 and torch.allclose(tm["reward/jaw/mse"], mse[1:].mean())
    w = fr.groups["jaw"].weights
    total = -sum(w[k] * tv[f"reward/jaw/{k}"] for k in w)
    assert torch.allclose(fr(pred, target, mask, valid)[:, 0], total)


def test_nan_from_user_module_names_it():
    pred, target = flame()
    mask = torch.ones(2, 6, dtype=torch.bool)
    fr = FlameReward([GroupReward("eyelid", {"bad": (NaNTerm(), 1.0)})])
    with pytest.raises(RuntimeError, match="NaNTerm.*eyelid"):
        fr(pred, target, mask)

    class BadGroup(nn.Module):
        group = "neck"

        def forward(self, pred, target, mask):
            return torch.full((pred.shape[0],), math.inf)

    with pytest.raises(RuntimeError, match="BadGroup.*neck"):
        FlameReward([BadGroup()])(pred, target, mask)


def test_flame_reward_validation():
    g = GroupReward("jaw", {"var": (VarianceTerm(), 1.0)})
    with pytest.raises(ValueError, match="duplicate"):
        FlameReward([g, GroupReward("jaw", {"var": (VarianceTerm(), 1.0)})])
    with pytest.raises(ValueError, match="not all be zero"):
        FlameReward([g], lambdas=[0.0])
    with pytest.raises(ValueError, match=">= 0"):
        FlameReward([g], lambdas=[-1.0])
    with pytest.raises(ValueError, match="not in the reward"):
        FlameReward([g], lambdas={"rot": 1.0})
    pred, target = flame()
    with pytest.raises(ValueError, match="valid"):
        FlameReward([g])(pred, target, torch.ones(2, 6, dtype=torch.bool), torch.ones(2, 5, dtype=torch.bool))


# ---------------------------------------------------------------- spec + build


def test_parse_reward_spec():
    assert parse_reward_spec("expr+rot") == ["expr", "rot"]
    assert parse_reward_spec(" rot +  expr ") == ["expr", "rot"]  # FLAME order, whitespace ok
    assert parse_reward_spec("jaw") == ["jaw"]
    assert parse_reward_spec("all") == list(GROUP_NAMES)
    assert parse_reward_spec(["eyelid", "jaw"]) == ["jaw", "eyelid"]
    with pytest.raises(ValueError) as e:
        parse_reward_spec("expr+head")
    assert "'head'" in str(e.value) and all(n in str(e.value) for n in GROUP_NAMES)
    with pytest.raises(ValueError, match="duplicate"):
        parse_reward_spec("jaw+expr+jaw")
    for bad in ("", "  ", "expr+", "all+jaw"):
        with pytest.raises(ValueError):
            parse_reward_spec(bad)


def test_parse_speaking_columns():
    assert parse_reward_spec("expr+rot+jaw@speaking") == ["expr", "rot", "jaw@speaking"]
    assert parse_reward_spec("jaw@speaking+rot") == ["rot", "jaw@speaking"]  # listening columns first
    assert parse_reward_spec("all+jaw@speaking") == [*GROUP_NAMES, "jaw@speaking"]
    assert parse_reward_spec("all@speaking") == [f"{g}@speaking" for g in GROUP_NAMES]
    with pytest.raises(ValueError, match="'jaw@listen'"):
        parse_reward_spec("expr+jaw@listen")
    with pytest.raises(ValueError, match="head@speaking"):
        parse_reward_spec("head@speaking")
    with pytest.raises(ValueError, match="duplicate"):
        parse_reward_spec("jaw@speaking+all@speaking")
    with pytest.raises(ValueError, match="'all' cannot"):
        parse_reward_spec("all+jaw")


def test_speaking_column_scores_the_speaking_frames():
    """A ``<group>@speaking`` column is the group's reward with the speaking mask in place of the
    listening one; a listening column of the same reward is unchanged by the speaking mask."""
    torch.manual_seed(0)
    B, T = 5, 30
    pred, target = torch.randn(B, T, FLAME_DIM), torch.randn(B, T, FLAME_DIM)
    listening = torch.zeros(B, T, dtype=torch.bool)
    listening[:, :12] = True
    speaking = ~listening
    speaking[0] = False  # row 0 never speaks: its speaking column is invalid (0), its listening ones are not
    fr = build_reward("expr+jaw@speaking")
    assert fr.group_names == ("expr", "jaw@speaking") and fr.column_frames == ("listening", "speaking")
    assert fr.scores_speaking and not build_reward("expr+jaw").scores_speaking
    out = fr.compute(pred, target, listening, speaking=speaking, with_terms=True)
    assert torch.allclose(out["reward"][:, 0], build_reward("expr")(pred, target, listening)[:, 0])
    assert torch.allclose(out["reward"][:, 1], build_reward("jaw")(pred, target, speaking)[:, 0])
    assert out["reward"][0, 1] == 0 and out["valid"][:, 1].tolist() == [False, True, True, True, True]
    assert out["valid"][:, 0].all() and "reward/jaw@speaking/mse" in out["terms"]
    # the speaking frames, not the listening ones, move it
    moved = pred.clone()
    moved[:, :12, GROUPS["jaw"]] += 5.0  # listening frames only
    assert torch.allclose(fr(moved, target, listening, speaking=speaking)[:, 1], out["reward"][:, 1])
    # invalid jaw group -> 0 on its speaking column too
    valid = torch.ones(B, len(GROUP_NAMES), dtype=torch.bool)
    valid[2, GROUP_NAMES.index("jaw")] = False
    assert fr(pred, target, listening, valid, speaking=speaking)[2, 1] == 0
    with pytest.raises(ValueError, match="speaking="):
        fr(pred, target, listening)
    with pytest.raises(ValueError, match="speaking mask"):
        fr(pred, target, listening, speaking=speaking[:, :-1])


def test_hold_column_scores_the_listening_frames_against_the_reference():
    """A ``<group>@hold`` column is the group's listening reward with the reference motion in place of the
    ground truth; the other columns do not see the reference; without one it refuses."""
    torch.manual_seed(1)
    B, T = 4, 30
    pred, target, ref = (torch.randn(B, T, FLAME_DIM) for _ in range(3))
    listening = torch.zeros(B, T, dtype=torch.bool)
    listening[:, 5:20] = True
    assert parse_reward_spec("jaw@hold+expr+rot+jaw@speaking") == ["expr", "rot", "jaw@speaking", "jaw@hold"]
    assert parse_reward_spec("all@hold") == [f"{g}@hold" for g in GROUP_NAMES]
    fr = build_reward("expr+rot+jaw@hold")
    assert fr.column_frames == ("listening", "listening", "hold") and fr.hold_columns == ["jaw@hold"]
    assert fr.scores_reference and not fr.scores_speaking and not build_reward("expr+jaw").scores_reference
    out = fr.compute(pred, target, listening, reference=ref, with_terms=True)
    assert torch.allclose(out["reward"][:, :2], build_reward("expr+rot")(pred, target, listening))
    assert torch.allclose(out["reward"][:, 2], build_reward("jaw")(pred, ref, listening)[:, 0])
    assert not torch.allclose(out["reward"][:, 2], build_reward("jaw")(pred, target, listening)[:, 0])
    assert "reward/jaw@hold/vel" in out["terms"]
    assert torch.equal(fr(ref, target, listening, reference=ref)[:, 2], torch.zeros(B))  # the reference holds itself
    moved = ref.clone()
    moved[:, :5, GROUPS["jaw"]] += 5.0  # outside the listening frames: no effect
    assert torch.equal(fr(moved, target, listening, reference=ref)[:, 2], torch.zeros(B))
    with pytest.raises(ValueError, match="reference="):
        fr(pred, target, listening)
    with pytest.raises(ValueError, match="reference shape"):
        fr(pred, target, listening, reference=ref[:, :-1])


def test_evaluation_scores_a_runs_reward_without_its_hold_columns():
    """Evaluation has no rollouts of the training run's supervised model: a recorded reward's hold columns
    (and their lambdas) are left out; a reward of hold columns only has nothing left."""
    from gdpo_listener.evaluation.checkpoints import build_run_reward

    rewards = {"weights": {"vel": 2.0}, "lambdas": {"rot": 2.0, "jaw@hold": 0.5}, "group_reward": None, "extra_terms": {}}
    fr = build_run_reward({"reward": "expr+rot+jaw@hold", "rewards": rewards})
    assert fr.group_names == ("expr", "rot") and fr.lambdas.tolist() == [1.0, 2.0]
    assert fr.groups["rot"].weights["vel"] == 2.0
    assert build_run_reward({"reward": "jaw@hold", "rewards": rewards}) is None


def test_build_reward_defaults_and_weights():
    fr = build_reward()
    assert fr.group_names == ("expr", "rot") and torch.equal(fr.lambdas, t([1.0, 1.0]))
    assert fr.groups["expr"].weights == DEFAULT_WEIGHTS == {"var": 1.0, "vel": 1.0, "drift": 0.25, "mse": 0.1}
    fr = build_reward("jaw+rot", weights={"mse": 0.0, "var": 2.0}, lambdas={"jaw": 3.0})
    assert fr.groups["jaw"].weights == {"var": 2.0, "vel": 1.0, "drift": 0.25}  # zero weight left out
    assert torch.equal(fr.lambdas, t([3.0, 1.0]))
    pred, target = flame()
    mask = torch.ones(2, 6, dtype=torch.bool)
    p, g = pred[..., GROUPS["jaw"]], target[..., GROUPS["jaw"]]
    expect = -(2 * VarianceTerm()(p, g, mask) + VelocityVarianceTerm()(p, g, mask) + 0.25 * MeanDriftTerm()(p, g, mask))
    assert torch.allclose(fr(pred, target, mask)[:, 0], expect)


def test_build_reward_validation_errors():
    with pytest.raises(ValueError, match="'mse'"):
        build_reward(weights={"mse": -0.1})
    with pytest.raises(ValueError, match="'var'"):
        build_reward(weights={"var": math.nan})
    with pytest.raises(ValueError, match="unknown reward weight 'jerk'"):
        build_reward(weights={"jerk": 1.0})
    with pytest.raises(ValueError, match="all reward term weights are zero"):
        build_reward(weights={k: 0.0 for k in DEFAULT_WEIGHTS})
    with pytest.raises(ValueError, match="not in the reward"):
        build_reward("expr+rot", lambdas={"jaw": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        build_reward("expr+rot", lambdas={"rot": -1.0})
    with pytest.raises(ValueError, match="not all be zero"):
        build_reward("expr+rot", lambdas={"rot": 0.0, "expr": 0})
    with pytest.raises(ValueError, match="valid groups"):
        build_reward("mouth")
    with pytest.raises(ValueError, match="no_such_module"):
        build_reward(extra_terms={"x": {"target": "gdpo_listener.rewards.no_such_module.X", "weight": 1.0}})
    with pytest.raises(ValueError, match="weight"):
        build_reward(extra_terms={"jerk": {"target": "gdpo_listener.rewards.examples.JerkTerm"}})
    with pytest.raises(ValueError, match="built-in"):
        build_reward(extra_terms={"var": {"target": "gdpo_listener.rewards.examples.JerkTerm", "weight": 1.0}})


def test_user_term_and_group_reward_by_dotted_path():
    from omegaconf import OmegaConf

    pred, target = flame()
    mask = torch.ones(2, 6, dtype=torch.bool)
    sl = GROUPS["rot"]
    base = build_reward("rot")
    # extra term, config given as a Hydra DictConfig
    extra = OmegaConf.create({"jerk": {"target": "gdpo_listener.rewards.examples.JerkTerm", "weight": 0.5}})
    fr = build_reward("rot", extra_terms=extra)
    assert isinstance(fr.groups["rot"].terms["jerk"], JerkTerm)
    jerk = JerkTerm()(pred[..., sl], target[..., sl], mask)
    assert torch.allclose(fr(pred, target, mask)[:, 0], base(pred, target, mask)[:, 0] - 0.5 * jerk)
    assert "reward/rot/jerk" in fr.term_values(pred, target, mask)
    # own group reward class with a constructor kwarg
    fr = build_reward("rot", group_reward={"target": "gdpo_listener.rewards.examples.LogPenaltyGroupReward",
                                           "scale": 2.0})
    assert isinstance(fr.groups["rot"], LogPenaltyGroupReward)
    assert torch.allclose(fr(pred, target, mask)[:, 0], -torch.log1p(-2.0 * base(pred, target, mask)[:, 0]))
    fr = build_reward("rot", group_reward="gdpo_listener.rewards.examples.LogPenaltyGroupReward")
    assert fr.groups["rot"].scale == 1.0


def test_a_columns_lambda_from_the_command_line(compose_config):
    """A column name with '@' is Hydra's package syntax in a dotted key; the dict form sets its lambda."""
    from gdpo_listener.pipeline.factories import make_reward

    cfg = compose_config("gdpo", ["reward=expr+rot+jaw@hold", "+rewards.lambdas={jaw@hold:0.5,rot:2}"])
    assert make_reward(cfg).lambdas.tolist() == [1.0, 2.0, 0.5]
