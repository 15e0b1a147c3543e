"""Evaluation metrics against hand-computed values, and the FLAME layer on a tiny model file."""
from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from gdpo_listener.envs.flame import FLAME_DIM, GROUP_NAMES, GROUPS
from gdpo_listener.evaluation import metrics as M
from gdpo_listener.evaluation.deviation_parts import deviation_parts, label_floor_rows, label_sampler_rows, weighted_median
from gdpo_listener.evaluation.flame_layer import FlameLayer, FlameModelError, load_flame_masks, load_flame_model, rodrigues
from gdpo_listener.rewards.stats import dynamic_deviation

JAW = GROUPS["jaw"].start  # 50
ROT = GROUPS["rot"].start  # 64
NECK = GROUPS["neck"].start
EYELID = GROUPS["eyelid"].start


def frames(T: int, B: int = 1) -> torch.Tensor:
    return torch.zeros(B, T, FLAME_DIM, dtype=torch.float64)


def valid(**off) -> torch.Tensor:
    v = torch.ones(1, len(GROUP_NAMES), dtype=torch.bool)
    for g in off:
        v[0, GROUP_NAMES.index(g)] = False
    return v


# ----------------------------------------------------------------------------------------------
# FDD / PDD / JDD


def test_jdd_velocity_hand_computed():
    pred, gt = frames(5), frames(5)
    pred[0, :, JAW] = torch.tensor([0.0, 1, 0, 1, 0])  # velocities +-1: population std 1; gt: 0
    mask = torch.ones(1, 5, dtype=torch.bool)
    r = M.dynamic_metric(pred, gt, mask, valid(), M.JAW_GROUPS, min_frames=5)
    assert r.value == pytest.approx(1 / 3 * 1000)  # mean over the 3 jaw channels, x1000
    assert r.n == 1
    # equals the shared statistic when every channel is valid
    assert float(dynamic_deviation(pred[..., GROUPS["jaw"]], gt[..., GROUPS["jaw"]], mask)) == pytest.approx(1 / 3)


def test_jdd_position_convention_hand_computed():
    pred, gt = frames(5), frames(5)
    pred[0, :, JAW] = torch.tensor([0.0, 1, 0, 1, 0])  # positions: mean 0.4, var 0.24
    r = M.dynamic_metric(pred, gt, torch.ones(1, 5, dtype=torch.bool), valid(), M.JAW_GROUPS, convention="position", min_frames=5)
    assert r.value == pytest.approx(math.sqrt(0.24) / 3 * 100)


def test_velocity_never_crosses_a_gap_in_the_mask():
    pred, gt = frames(5), frames(5)
    pred[0, :, JAW] = torch.tensor([0.0, 1, 5, 2, 3])
    full = M.dynamic_metric(pred, gt, torch.ones(1, 5, dtype=torch.bool), valid(), M.JAW_GROUPS, min_frames=2)
    assert full.value == pytest.approx(math.sqrt(6.1875) / 3 * 1000)  # v = 1, 4, -3, 1
    gap = M.dynamic_metric(pred, gt, torch.tensor([[True, True, False, True, True]]), valid(), M.JAW_GROUPS, min_frames=2)
    assert gap.value == pytest.approx(0.0)  # only v(0->1) = 1 and v(3->4) = 1: std 0


def test_fdd_skips_invalid_groups_pdd_uses_rot_and_neck():
    pred, gt = frames(5), frames(5)
    pred[0, :, 0] = torch.tensor([0.0, 1, 0, 1, 0])  # one expression channel, deviation 1
    mask = torch.ones(1, 5, dtype=torch.bool)
    assert M.dynamic_metric(pred, gt, mask, valid(), M.UPPER_FACE_GROUPS, min_frames=5).value == pytest.approx(1000 / 52)
    assert M.dynamic_metric(pred, gt, mask, valid(eyelid=1), M.UPPER_FACE_GROUPS, min_frames=5).value == pytest.approx(1000 / 50)
    pred[0, :, NECK] = torch.tensor([0.0, 2, 0, 2, 0])  # neck deviation 2
    assert M.dynamic_metric(pred, gt, mask, valid(), M.HEAD_POSE_GROUPS, min_frames=5).value == pytest.approx(2 / 6 * 1000)
    assert M.dynamic_metric(pred, gt, mask, valid(neck=1), M.HEAD_POSE_GROUPS, min_frames=5).value == pytest.approx(0.0)
    r = M.dynamic_metric(pred, gt, mask, valid(jaw=1), M.JAW_GROUPS, min_frames=5)
    assert r.value is None and "invalid" in r.note  # an invalid group is never scored as 0


def test_empty_split_and_short_windows_are_unavailable_not_zero():
    pred, gt = frames(20, B=2), frames(20, B=2)
    none = torch.zeros(2, 20, dtype=torch.bool)
    r = M.dynamic_metric(pred, gt, none, None, M.JAW_GROUPS, split="listening")
    assert r.value is None and r.note == "no listening frames" and r.to_json()["value"] is None
    few = torch.zeros(2, 20, dtype=torch.bool)
    few[:, :5] = True
    assert M.dynamic_metric(pred, gt, few, None, M.JAW_GROUPS, min_frames=10).value is None
    # rows below min_frames are left out of the mean
    pred[0, :, JAW] = torch.arange(20) % 2
    pred[1, :, JAW] = 5 * (torch.arange(20) % 2)
    mixed = torch.ones(2, 20, dtype=torch.bool)
    mixed[1, 5:] = False
    r = M.dynamic_metric(pred, gt, mixed, None, M.JAW_GROUPS, min_frames=10)
    # row 0: 19 velocities, ten +1 and nine -1: std sqrt(1 - (1/19)^2)
    assert r.n == 1 and r.value == pytest.approx(math.sqrt(1 - 1 / 19**2) / 3 * 1000)


def test_vertex_fdd_lve_mhd_hand_computed():
    # 2 frames, 2 lip vertices; distances frame 0: 5 and 1, frame 1: 0 and 2
    pred = torch.zeros(1, 2, 2, 3)
    gt = torch.zeros(1, 2, 2, 3)
    pred[0, 0, 0] = torch.tensor([3.0, 4, 0])
    pred[0, 0, 1] = torch.tensor([0.0, 0, 1])
    pred[0, 1, 1] = torch.tensor([0.0, 0, 2])
    mask = torch.ones(1, 2, dtype=torch.bool)
    s, n = M.lve_rows(pred, gt, mask)
    assert M.frame_mean(s, n).value == pytest.approx((5 + 2) / 2)
    s, n = M.mhd_rows(pred, gt, mask)
    assert M.frame_mean(s, n).value == pytest.approx((3 + 1) / 2)
    s, n = M.lve_rows(pred, gt, torch.tensor([[False, True]]))
    assert M.frame_mean(s, n).value == pytest.approx(2.0)
    assert M.frame_mean(s * 0, n * 0).value is None
    # vertex FDD: 3 frames of one vertex, x moves 0, 1, 0 (velocities +-1, std 1); 3 coordinates
    pv, gv = torch.zeros(1, 3, 1, 3), torch.zeros(1, 3, 1, 3)
    pv[0, :, 0, 0] = torch.tensor([0.0, 1, 0])
    val, ok = M.vertex_dynamic_deviation_rows(pv, gv, torch.ones(1, 3, dtype=torch.bool), min_frames=3)
    assert bool(ok[0]) and float(val[0]) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# DualTalk metrics


def test_frechet_distance_hand_computed():
    # 1-d: means 1 and 3, unbiased variances 2 and 4: 4 + 2 + 4 - 2 sqrt(8)
    assert M.frechet_distance(np.array([[0.0], [2.0]]), np.array([[1.0], [3.0], [5.0]])) == pytest.approx(10 - 2 * math.sqrt(8))
    # 2-d, diagonal covariances 4/3 I and 16/3 I, means (1, 1) and (3, 2): 5 + 2 (sqrt(4/3) - sqrt(16/3))^2
    x = np.array([[0.0, 0], [2, 0], [0, 2], [2, 2]])
    y = np.array([[0.0, 0], [4, 0], [0, 4], [4, 4]]) + np.array([1.0, 0])
    assert M.frechet_distance(x, y) == pytest.approx(5 + 8 / 3)
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_paired_fd_mse_sid_rpcc_hand_computed():
    o = np.arange(4.0)[:, None]  # partner
    g = o.copy()  # ground truth perfectly correlated with the partner
    p = o[::-1].copy()  # prediction anti-correlated, same marginal distribution
    assert M.frechet_distance(p, g) == pytest.approx(0.0, abs=1e-9)
    # joint covariances 5/3 [[1, 1], [1, 1]] and 5/3 [[1, -1], [-1, 1]]: product 0, FD = 4 * 5/3
    assert M.paired_frechet_distance(p, g, o) == pytest.approx(20 / 3)
    assert M.mse(np.full((3, 2), 0.1), np.zeros((3, 2))) == pytest.approx(0.01)
    gt = np.array([0.0, 0, 0, 10, 10, 10])[:, None]
    assert M.sid(np.zeros((4, 1)), gt, k=2) == pytest.approx(0.0)
    assert M.sid(np.array([[0.0], [10], [0], [10]]), gt, k=2) == pytest.approx(1.0)
    assert M.sid(np.array([[0.0], [10], [10], [10]]), gt, k=2) == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))
    # rPCC: PCC(g, o) = 1, PCC([0, 1, 3, 2], o) = 0.8
    assert M.rpcc(np.array([0.0, 1, 3, 2]), g, o) == pytest.approx(0.2)
    assert M.rpcc(np.zeros(4), g, o) is None  # undefined, not 0


def test_kmeans_is_deterministic_and_finds_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(5, 0.1, (50, 2))])
    c1, c2 = M.kmeans(x, 2, seed=3), M.kmeans(x, 2, seed=3)
    assert np.array_equal(c1, c2)
    assert sorted(np.round(c1[:, 0]).tolist()) == [0.0, 5.0]


def test_dualtalk_metrics_publication_scaling_sequences_and_invalid_groups():
    T = 12
    pred, gt, partner = frames(T, B=2), frames(T, B=2), frames(T, B=2)
    pred[..., GROUPS["expr"]] = 0.1
    pred[..., GROUPS["jaw"]] = 0.01
    pred[..., GROUPS["rot"]] = 0.1
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 6:] = False
    v = torch.ones(2, len(GROUP_NAMES), dtype=torch.bool)
    out = M.dualtalk_metrics(pred, gt, mask, v, partner, v, seq_ids=["a", "a"], metrics=("MSE",), min_frames=10)
    mse = out["MSE"]
    assert mse["exp"].value == pytest.approx(0.01 * 10) and mse["jaw"].value == pytest.approx(1e-4 * 1000)
    assert mse["pose"].value == pytest.approx(0.01 * 100) and mse["exp"].n == 1  # one sequence of 18 frames
    # separate sequences: the second has 6 < 10 frames and is skipped
    out = M.dualtalk_metrics(pred, gt, mask, v, seq_ids=["a", "b"], metrics=("MSE", "P-FD"), min_frames=10)
    assert out["MSE"]["exp"].n == 1 and "skipped" in out["MSE"]["exp"].note
    assert out["P-FD"]["exp"].value is None and "partner" in out["P-FD"]["exp"].note
    # FD with jaw x1000: prediction offset by 0.01 on 3 channels (identical spread): 3e-4 * 1000
    pred[..., GROUPS["jaw"]] = gt[..., GROUPS["jaw"]] + 0.01
    gt[:, :, JAW] = torch.arange(T) % 3
    pred[:, :, JAW] = gt[:, :, JAW] + 0.01
    out = M.dualtalk_metrics(pred, gt, mask, v, seq_ids=["a", "a"], metrics=("FD",), min_frames=10)
    assert out["FD"]["jaw"].value == pytest.approx(3e-4 * 1000, rel=1e-4)
    # an invalid group is unavailable, never 0
    v[:, GROUP_NAMES.index("rot")] = False
    out = M.dualtalk_metrics(pred, gt, mask, v, partner, v, metrics=("FD", "rPCC"))
    assert out["FD"]["pose"].value is None and out["rPCC"]["pose"].value is None
    out = M.dualtalk_metrics(pred, gt, torch.zeros(2, T, dtype=torch.bool), v, partner, v, split="listening")
    assert all(r.value is None for m in out.values() for r in m.values())


def test_motion_std():
    x = frames(5)
    x[0, :, JAW] = torch.tensor([0.0, 1, 0, 1, 0])
    r = M.motion_std(x, torch.ones(1, 5, dtype=torch.bool), valid(), ("jaw",), min_frames=5)
    assert r.value == pytest.approx(math.sqrt(0.24) / 3)


# ----------------------------------------------------------------------------------------------
# FLAME layer on a tiny model in the generic_model.pkl layout (conftest's flame_kit)


def rx(t):
    c, s = math.cos(t), math.sin(t)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def ry(t):
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


@pytest.fixture
def flame(tmp_path, flame_kit):
    model = flame_kit.write_pkl(tmp_path / "generic_model.pkl", flame_kit.tiny_model())
    return FlameLayer(model, flame_kit.write_pkl(tmp_path / "FLAME_masks.pkl", flame_kit.MASKS))


def motion(**groups) -> torch.Tensor:
    x = torch.zeros(FLAME_DIM, dtype=torch.float64)
    for g, v in groups.items():
        x[GROUPS[g]] = torch.as_tensor(v, dtype=torch.float64)
    return x


def test_rodrigues_matches_closed_form():
    R = rodrigues(torch.tensor([[0.3, 0.0, 0.0], [0.0, -0.7, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    assert np.allclose(R[0].numpy(), rx(0.3)) and np.allclose(R[1].numpy(), ry(-0.7)) and np.allclose(R[2].numpy(), np.eye(3))


def test_zero_motion_gives_the_template(flame, flame_kit):
    v = flame(torch.zeros(2, 3, FLAME_DIM))
    assert v.shape == (2, 3, 9, 3)
    assert np.allclose(v.numpy(), np.broadcast_to(flame_kit.V_TEMPLATE, (2, 3, 9, 3)), atol=1e-6)


def test_jaw_rotation_moves_only_jaw_weighted_vertices(flame, flame_kit):
    V0 = flame_kit.V_TEMPLATE  # (9, 3): the rest pose
    t = 0.4
    v = flame(motion(jaw=[t, 0, 0])).numpy()
    J2 = V0[2]
    expect = V0.copy()
    expect[5] = rx(t) @ (V0[5] - J2) + J2
    assert np.allclose(v, expect)
    moved = np.flatnonzero(np.abs(v - V0).sum(1) > 1e-9).tolist()
    assert moved == [5]  # vertex 2 sits on the jaw joint


def test_global_and_chained_neck_jaw_rotations(flame, flame_kit):
    V0 = flame_kit.V_TEMPLATE  # (9, 3): the rest pose
    v = flame(motion(rot=[0, 0.5, 0])).numpy()
    assert np.allclose(v, V0 @ ry(0.5).T)  # everything about the root at the origin
    v = flame(motion(rot=[0, 0.5, 0]), with_global=False).numpy()
    assert np.allclose(v, V0)
    tn, tj = 0.3, 0.2
    v = flame(motion(neck=[tn, 0, 0], jaw=[tj, 0, 0])).numpy()
    J1, J2 = V0[1], V0[2]
    assert np.allclose(v[6], rx(tn) @ (V0[6] - J1) + J1)
    assert np.allclose(v[5], J1 + rx(tn) @ ((J2 - J1) + rx(tj) @ (V0[5] - J2)))
    assert np.allclose(v[:2], V0[:2])  # root-weighted vertices stay


def test_expression_uses_the_columns_after_the_shape_ones(tmp_path, flame_kit):
    m = flame_kit.tiny_model()
    fl = FlameLayer(model=load_flame_model(flame_kit.write_pkl(tmp_path / "m.pkl", m)))
    e = np.zeros(50)
    e[[0, 7]] = [1.5, -2.0]
    v = fl(motion(expr=e)).numpy()
    assert np.allclose(v, flame_kit.V_TEMPLATE + m["shapedirs"][:, :, 300] * 1.5 - m["shapedirs"][:, :, 307] * 2.0)


def test_pose_correctives_and_eye_joints(tmp_path, flame_kit):
    V0 = flame_kit.V_TEMPLATE  # (9, 3): the rest pose
    m = flame_kit.tiny_model(posedirs=True)
    fl = FlameLayer(model=load_flame_model(flame_kit.write_pkl(tmp_path / "m.pkl", m)))
    t = 0.25
    v = fl(motion(neck=[t, 0, 0])).numpy()
    feat = np.zeros(36)
    feat[:9] = (rx(t) - np.eye(3)).reshape(-1)  # neck is the first non-root joint
    # vertex 0 is root-weighted: the corrective offset is all that moves it
    assert np.allclose(v[0], V0[0] + m["posedirs"][0] @ feat)
    # eyes: channels 58:61 rotate the left eye (joint 3), 61:64 the right eye (joint 4)
    fl0 = FlameLayer(model=load_flame_model(flame_kit.write_pkl(tmp_path / "m0.pkl", flame_kit.tiny_model())))
    v = fl0(motion(eyepose=[0, 0.3, 0, 0, 0, 0])).numpy()
    expect = V0.copy()
    expect[7] = ry(0.3) @ (V0[7] - V0[3]) + V0[3]
    assert np.allclose(v, expect)
    v = fl0(motion(eyepose=[0, 0, 0, 0, -0.2, 0])).numpy()
    expect = V0.copy()
    expect[8] = ry(-0.2) @ (V0[8] - V0[4]) + V0[4]
    assert np.allclose(v, expect)


def test_eyelid_blendshapes_optional(tmp_path, flame_kit):
    m = flame_kit.tiny_model(eyelids=True)
    fl = FlameLayer(model=load_flame_model(flame_kit.write_pkl(tmp_path / "m.pkl", m)))
    assert fl.has_eyelids
    v = fl(motion(eyelid=[0.5, 0.2])).numpy()
    assert np.allclose(v, flame_kit.V_TEMPLATE + 0.5 * m["l_eyelid"] + 0.2 * m["r_eyelid"])
    plain = FlameLayer(model=load_flame_model(flame_kit.write_pkl(tmp_path / "p.pkl", flame_kit.tiny_model())))
    assert not plain.has_eyelids and np.allclose(plain(motion(eyelid=[0.5, 0.2])).numpy(), flame_kit.V_TEMPLATE)


def test_missing_keys_and_bad_layout_are_clear_errors(tmp_path, flame_kit):
    m = flame_kit.tiny_model()
    del m["posedirs"], m["weights"]
    with pytest.raises(FlameModelError, match=r"missing keys \['posedirs', 'weights'\]"):
        load_flame_model(flame_kit.write_pkl(tmp_path / "bad.pkl", m))
    m = flame_kit.tiny_model()
    m["shapedirs"] = m["shapedirs"][:, :, :320]
    with pytest.raises(FlameModelError, match="320 columns"):
        load_flame_model(flame_kit.write_pkl(tmp_path / "few.pkl", m))
    with pytest.raises(FileNotFoundError, match="licence"):
        load_flame_model(tmp_path / "nope.pkl")
    masks = dict(flame_kit.MASKS)
    del masks["lips"]
    with pytest.raises(FlameModelError, match="lips"):
        load_flame_masks(flame_kit.write_pkl(tmp_path / "masks.pkl", masks))
    np.savez(tmp_path / "m.npz", **{k: v for k, v in flame_kit.tiny_model().items() if k != "f"})
    with pytest.raises(FlameModelError, match=r"missing keys \['f'\]"):
        load_flame_model(tmp_path / "m.npz")


def test_reads_chumpy_and_sparse_entries_without_chumpy(tmp_path, flame_kit):
    """Original FLAME pickles hold chumpy arrays and a scipy.sparse J_regressor."""
    import scipy.sparse

    pkg, mod = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")

    class Ch:  # pickled like chumpy.ch.Ch: its state dict holds the array under 'x'
        pass

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    mod.Ch = Ch
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = pkg, mod
    try:
        m = flame_kit.tiny_model()
        sd = Ch()
        sd.__dict__.update({"x": m["shapedirs"], "_dirty_vars": set()})
        m["shapedirs"] = sd
        m["J_regressor"] = scipy.sparse.csc_matrix(m["J_regressor"])
        path = flame_kit.write_pkl(tmp_path / "generic_model.pkl", m)
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    fl = FlameLayer(path, flame_kit.write_pkl(tmp_path / "FLAME_masks.pkl", flame_kit.MASKS))
    assert np.allclose(fl(torch.zeros(FLAME_DIM)).numpy(), flame_kit.V_TEMPLATE)
    assert fl.region("upper_face").tolist() == [3, 4, 6] and fl.region("lips").tolist() == [5]


# ----------------------------------------------------------------------------------------------
# long-sequence stillness


def test_segment_velocity_std_and_decay_ratio():
    T, seg = 300, 30
    g = torch.Generator().manual_seed(0)
    steady = torch.randn(2, T, FLAME_DIM, generator=g).cumsum(1) * 0.01  # random walk: constant velocity std
    env = torch.linspace(1.0, 0.1, T)[None, :, None]  # motion that dies out to 10 %
    fading = torch.randn(2, T, FLAME_DIM, generator=g).mul(env).cumsum(1) * 0.01
    vs = M.segment_velocity_std(steady, seg)
    assert vs.shape == (2, T // seg, FLAME_DIM)
    # hand check of one segment: population std of the frame differences inside it
    v = steady[0, seg:2 * seg, 5].diff()
    assert vs[0, 1, 5].item() == pytest.approx(v.std(unbiased=False).item(), rel=1e-5)
    prof_s, prof_f = M.stillness_profile(steady, seg), M.stillness_profile(fading, seg)
    assert set(prof_s) == set(GROUP_NAMES) and prof_s["expr"].shape == (T // seg,)
    for gname in GROUP_NAMES:
        assert 0.8 < M.decay_ratio(prof_s[gname]) < 1.25
        assert M.decay_ratio(prof_f[gname]) < 0.4
    # invalid groups (per row) are left out of the profile
    valid = torch.ones(2, len(GROUP_NAMES), dtype=torch.bool)
    valid[:, GROUP_NAMES.index("eyepose")] = False
    assert "eyepose" not in M.stillness_profile(steady, seg, valid)
    with pytest.raises(ValueError, match="segment"):
        M.segment_velocity_std(steady, 2)


def test_decay_table_compares_generated_with_ground_truth_decay():
    """evaluation.long_sequences: per group, gen/gt decay and level; the check fails for motion that dies out."""
    from gdpo_listener.evaluation.long_sequences import decay_passes, decay_table, format_decay_table

    T, seg = 300, 30
    g = torch.Generator().manual_seed(1)
    gt = torch.randn(2, T, FLAME_DIM, generator=g).cumsum(1) * 0.01  # steady
    fading = torch.randn(2, T, FLAME_DIM, generator=g).mul(torch.linspace(1.0, 0.1, T)[None, :, None]).cumsum(1) * 0.01
    valid = torch.ones(2, len(GROUP_NAMES), dtype=torch.bool)
    same = decay_table(gt, gt, valid, seg, 3)
    assert set(same) == set(GROUP_NAMES)
    assert all(r["relative_decay"] == pytest.approx(1.0) and r["level_ratio"] == pytest.approx(1.0) for r in same.values())
    table = decay_table(fading, gt, valid, seg, 3)
    r = table["expr"]
    assert r["pred_decay"] == pytest.approx(M.decay_ratio(torch.tensor(r["pred_profile"]), 3))
    assert r["relative_decay"] == pytest.approx(r["pred_decay"] / r["gt_decay"]) and r["relative_decay"] < 0.5
    assert decay_passes(same, 0.8) and not decay_passes(table, 0.8)
    text = format_decay_table(table, 0.8, 2, T, seg)
    assert text.splitlines()[-1].endswith("NO") and format_decay_table(same, 0.8, 2, T, seg).endswith("yes")


def test_paired_bootstrap_ci():
    rng = np.random.default_rng(0)
    shifted = rng.normal(0.5, 1.0, 400)  # a real improvement: the interval excludes 0
    mean, lo, hi = M.paired_bootstrap_ci(shifted)
    assert mean == pytest.approx(shifted.mean()) and lo < mean < hi and lo > 0
    # the interval is about mean +- 1.96 standard errors
    se = shifted.std() / math.sqrt(shifted.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    _, lo0, hi0 = M.paired_bootstrap_ci(rng.normal(0.0, 1.0, 400))  # no change: the interval covers 0
    assert lo0 < 0 < hi0
    assert M.paired_bootstrap_ci(torch.ones(5)) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        M.paired_bootstrap_ci(np.array([1.0, np.nan]))


def test_band_split_separates_slow_movement_from_frame_to_frame_noise():
    t = torch.arange(200, dtype=torch.float64)
    slow = torch.sin(2 * math.pi * t / 100)[None, :, None].repeat(1, 1, 3)  # (1, 200, 3) a 4 s period
    noise = torch.as_tensor(np.random.default_rng(0).normal(0, 0.05, (1, 200, 3)))
    low, high = M.band_split(slow + noise)
    assert torch.allclose(low + high, slow + noise)
    v = lambda x: float(x.diff(dim=1).std())  # noqa: E731
    assert v(low) == pytest.approx(v(slow), rel=0.15)  # the slow movement stays in the low band ...
    assert v(high) == pytest.approx(v(noise), rel=0.15)  # ... the noise's velocity in the high band
    lo, hi = M.band_split(slow)
    assert v(hi) < 0.01 * v(lo)
    ramp = 0.01 * t[None, :, None]  # a linear trend stays in the low band up to the window's ends
    assert M.band_split(ramp)[1].abs().max() < 1e-9


# ----------------------------------------------------------------------------------------------
# amplitude or timing (deviation_parts)


def test_weighted_median_minimises_the_weighted_absolute_deviation():
    rng = np.random.default_rng(0)
    v, w = rng.normal(size=41), rng.uniform(0.1, 2.0, size=41)
    m = weighted_median(v, w)
    grid = np.linspace(v.min(), v.max(), 4001)
    best = min(float((w * np.abs(x - v)).sum()) for x in grid)
    assert float((w * np.abs(m - v)).sum()) <= best + 1e-12
    with pytest.raises(ValueError, match="weights"):
        weighted_median(v, -w)


def test_deviation_parts_separate_amplitude_from_timing():
    rng = np.random.default_rng(1)
    sg = rng.uniform(0.5, 2.0, size=(30, 3))  # (N, C) ground-truth per-window stds
    # right timing, half the amplitude in every channel: all of the deviation is amplitude
    p = deviation_parts(sg / 2, sg)
    assert p["deviation"] == pytest.approx(np.abs(sg / 2 - sg).mean())
    assert p["at_best_amplitude"] == pytest.approx(0.0, abs=1e-12) and p["amplitude"] == pytest.approx(2.0)
    # the window-blind floor is the ground truth's spread around its per-channel median, whatever the prediction
    floor = np.abs(sg - np.median(sg, 0)).mean()
    assert p["window_blind"] == pytest.approx(floor, rel=0.05)
    assert deviation_parts(rng.permutation(sg), sg)["window_blind"] == pytest.approx(p["window_blind"])
    # wrong timing (windows shuffled), right amplitude: scaling cannot remove it
    q = deviation_parts(sg[::-1].copy(), sg)
    assert q["at_best_amplitude"] > 0.5 * q["deviation"] and q["amplitude"] == pytest.approx(1.0, abs=0.3)
    # the per-channel factor is the exact minimiser: no factor on a grid does better
    sp = sg * rng.uniform(0.3, 1.5, size=sg.shape)
    r = deviation_parts(sp, sg)
    for c in range(3):
        best = min(np.abs(a * sp[:, c] - sg[:, c]).mean() for a in np.linspace(0.1, 5, 2000))
        assert np.abs(sp[:, c] - sg[:, c]).mean() >= best - 1e-12
    assert r["at_best_amplitude"] <= sum(min(np.abs(a * sp[:, c] - sg[:, c]).mean() for a in np.linspace(0.1, 5, 2000))
                                         for c in range(3)) / 3 + 1e-12


def test_label_floor_knows_the_labels_and_nothing_else():
    rng = np.random.default_rng(2)
    sg = rng.uniform(0.5, 2.0, size=(40, 3))  # (N, C)
    valid = rng.uniform(size=sg.shape) > 0.2
    valid[:, 0] = True  # every window keeps a channel
    # one label for every window: the window-blind floor, with the metric's weights
    one = label_floor_rows(sg, valid, ["x"] * 40)
    assert one.shape == (40,) and one.mean() == pytest.approx(deviation_parts(sg, sg, valid)["window_blind"])
    # two labels whose windows move at different levels: knowing the label removes the level difference
    lab = ["calm"] * 20 + ["laughing"] * 20
    sg2 = sg.copy()
    sg2[20:] += 5.0
    assert label_floor_rows(sg2, valid, lab).mean() == pytest.approx(label_floor_rows(sg, valid, lab).mean())
    assert label_floor_rows(sg2, valid, lab).mean() < 0.2 * label_floor_rows(sg2, valid, ["x"] * 40).mean()
    # per label, the constant is the exact minimiser: no constant on a grid does better for that label's windows
    f = label_floor_rows(sg, None, lab)
    for rows in (slice(0, 20), slice(20, 40)):
        for c in range(3):
            best = min(np.abs(k - sg[rows, c]).mean() for k in np.linspace(0.4, 2.1, 3401))
            assert np.abs(np.median(sg[rows, c]) - sg[rows, c]).mean() <= best + 1e-9
        assert f[rows].mean() <= np.mean([min(np.abs(k - sg[rows, c]).mean() for k in np.linspace(0.4, 2.1, 3401))
                                           for c in range(3)]) + 1e-9
    # a window alone in its label costs nothing; None is a label of its own
    assert label_floor_rows(sg, valid, [str(i) for i in range(40)]) == pytest.approx(np.zeros(40))
    assert label_floor_rows(sg, valid, [None] * 40).mean() == pytest.approx(one.mean())
    with pytest.raises(ValueError, match="labels"):
        label_floor_rows(sg, valid, lab[:-1])


def test_label_sampler_is_a_random_window_of_the_label_and_sits_between_the_floor_and_twice_it():
    # exact on a hand example: one label, stds 1, 2, 4 -> mean over the other windows |x_m - x_n| = 2, 1.5, 2.5
    assert label_sampler_rows(np.array([[1.0], [2.0], [4.0]]), None, ["a"] * 3) == pytest.approx([2.0, 1.5, 2.5])
    rng = np.random.default_rng(3)
    sg = rng.lognormal(0.0, 0.8, size=(60, 3))  # (N, C) a skewed spread within each label, as laughter's
    lab = ["calm"] * 30 + ["laughing"] * 30
    sg[30:] *= 4.0
    samp, floor = label_sampler_rows(sg, None, lab), label_floor_rows(sg, None, lab)
    for rows in (slice(0, 30), slice(30, 60)):  # per label: E|X - Y| >= E|X - median| and <= 2 E|X - median|
        assert floor[rows].mean() <= samp[rows].mean() <= 2 * 30 / 29 * floor[rows].mean()
    assert samp.mean() > 1.2 * floor.mean()  # a spread this wide: sampling it costs well above the typical amplitude
    # what it means: a model that plays a random same-label window's stds scores this in expectation
    n = np.arange(60)
    draws = np.stack([sg[n // 30 * 30 + (n % 30 + rng.integers(1, 30, 60)) % 30]
                      for _ in range(4000)])  # (4000, N, C): each window gets another random window of its label
    assert np.abs(draws - sg).mean((0, 2)) == pytest.approx(samp, rel=0.05)
    # knowing the label helps the sampler as it helps the constant; a window alone in its label costs nothing
    assert samp.mean() < label_sampler_rows(sg, None, ["x"] * 60).mean()
    assert label_sampler_rows(sg, None, [str(i) for i in range(60)]) == pytest.approx(np.zeros(60))
    # invalid channels do not count, as in the metric; bad inputs are named
    valid = np.ones(sg.shape, dtype=bool)
    valid[:10, 2] = False
    v = label_sampler_rows(sg, valid, lab)
    assert v[:10] == pytest.approx(label_sampler_rows(sg[:, :2], None, lab)[:10])  # their channel 2 is left out
    x = sg[10:30, 2]  # and the other calm windows draw channel 2 only from the windows where it is valid
    c2 = np.abs(x[:, None] - x[None, :]).sum(1) / 19
    assert v[10:30] == pytest.approx((label_sampler_rows(sg[:, :2], None, lab)[10:30] * 2 + c2) / 3)
    with pytest.raises(ValueError, match="label_sampler_rows"):
        label_sampler_rows(sg, None, lab[:-1])
    with pytest.raises(ValueError, match="valid channel"):
        label_sampler_rows(sg, np.zeros(sg.shape, dtype=bool), lab)


def test_deviation_parts_weigh_windows_like_the_metric():
    sg = np.array([[1.0, 1.0], [2.0, 4.0]])
    sp = np.array([[0.0, 3.0], [2.0, 0.0]])
    valid = np.array([[True, False], [True, True]])
    # the metric: window 0 has one valid channel (|0 - 1|), window 1 two ((0 + 4) / 2); mean over windows
    assert deviation_parts(sp, sg, valid)["deviation"] == pytest.approx((1.0 + 2.0) / 2)
    # on motion: the parts' deviation is the metric's own value (same stds, same weights)
    g = torch.Generator().manual_seed(0)
    pred, gt = torch.randn(6, 40, 3, generator=g), torch.randn(6, 40, 3, generator=g) * 2
    mask = torch.ones(6, 40, dtype=torch.bool)
    mask[0, 25:] = False
    val, ok = M.dynamic_deviation_rows(pred, gt, mask)
    s_p, s_g, enough = M.dynamic_std_rows(pred, gt, mask)
    assert deviation_parts(s_p[enough].numpy(), s_g[enough].numpy())["deviation"] == pytest.approx(float(val[ok].mean()))
    with pytest.raises(ValueError, match="alike"):
        deviation_parts(sp, sg[:1])
    with pytest.raises(ValueError, match="valid channel"):
        deviation_parts(sp, sg, np.array([[False, False], [True, True]]))
