"""Motion VAE (agents/vae.py) and its training entry point (train/vae.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gdpo_listener.agents.checkpoint import CheckpointError, load_checkpoint_meta
from gdpo_listener.agents.vae import (
    MotionVAE,
    VAEConfig,
    channel_weight,
    format_report,
    kl_standard_normal,
    load_vae,
    local_velocity_std,
    make_vae,
    masked_mse,
    per_group_report,
    save_vae,
)
from gdpo_listener.envs.dataset import DyadicWindows, Normalizer
from gdpo_listener.envs.flame import FLAME_DIM, GROUP_NAMES, GROUPS, N_GROUPS


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory, make_tiny_dataset) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


# ----------------------------------------------------------------------------------------------
# model


def test_shapes_and_latent_length():
    cfg = VAEConfig.tiny()
    vae = MotionVAE(cfg)
    x = torch.randn(3, 200, FLAME_DIM)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 25, cfg.d_latent)
    assert vae.decode(mu).shape == (3, 200, FLAME_DIM)
    # any multiple of r works (sliding windows of other lengths)
    assert vae.decode(vae.encode(torch.randn(2, 64, FLAME_DIM))[0]).shape == (2, 64, FLAME_DIM)
    out = vae(x)
    assert set(out) >= {"recon", "mu", "logvar"}


def test_bad_input_raises():
    vae = MotionVAE(VAEConfig.tiny())
    with pytest.raises(ValueError, match="multiple of r"):
        vae.encode(torch.randn(1, 201, FLAME_DIM))
    with pytest.raises(ValueError, match="67"):
        vae.encode(torch.randn(1, 200, 60))
    with pytest.raises(ValueError, match="unknown VAE config fields"):
        make_vae({"d_model": 32, "n_layer": 1})
    with pytest.raises(ValueError, match="multiple of r"):
        VAEConfig(window=100, r=8)


def test_eval_is_deterministic_and_train_samples():
    """Eval mode decodes z = mu (deterministic); train mode draws z ~ q(z|x)."""
    torch.manual_seed(0)
    vae = MotionVAE(VAEConfig.tiny())
    x = torch.randn(2, 40, FLAME_DIM)
    vae.eval()
    a, b = vae(x)["recon"], vae(x)["recon"]
    assert torch.equal(a, b)
    vae.train()
    out = vae(x)
    assert not torch.equal(out["z"], out["mu"])


def test_loss_terms_and_masking():
    torch.manual_seed(0)
    vae = MotionVAE(VAEConfig.tiny(group_balance=0.0))  # uniform channel weights: plain means
    x = torch.randn(2, 16, FLAME_DIM)
    out = vae(x, sample=False)
    terms = vae.loss(x, out)
    assert set(terms) == {"loss", "loss_recon", "loss_vel", "loss_dyn", "loss_kl"}
    cfg = vae.cfg
    assert torch.allclose(terms["loss"], terms["loss_recon"] + cfg.vel_weight * terms["loss_vel"]
                          + cfg.dyn_weight * terms["loss_dyn"] + cfg.kl_weight * terms["loss_kl"])
    assert torch.allclose(terms["loss_recon"], (out["recon"] - x).pow(2).mean())
    assert torch.allclose(terms["loss_vel"], (out["recon"].diff(dim=1) - x.diff(dim=1)).pow(2).mean())
    vs = lambda a: a.diff(dim=1).std(dim=1, unbiased=False)  # noqa: E731
    assert torch.allclose(terms["loss_dyn"], (vs(out["recon"]) - vs(x)).pow(2).mean(), atol=1e-6)
    # errors on masked channels do not count
    valid = torch.ones(2, N_GROUPS, dtype=torch.bool)
    valid[:, GROUP_NAMES.index("eyelid")] = False
    w = channel_weight(valid)
    assert w.shape == (2, FLAME_DIM) and w[:, GROUPS["eyelid"]].sum() == 0 and w[:, GROUPS["expr"]].all()
    x2 = x.clone()
    x2[..., GROUPS["eyelid"]] += 100.0 * torch.randn(2, 16, 2)
    for k in ("loss_recon", "loss_vel", "loss_dyn"):
        assert torch.allclose(vae.loss(x, out, w)[k], vae.loss(x2, out, w)[k])
        assert not torch.allclose(vae.loss(x, out)[k], vae.loss(x2, out)[k])
    # a constant target channel (or group) keeps gradients finite
    x3 = x.clone()
    x3[..., GROUPS["rot"]] = 0.0
    vae.train()
    vae.loss(x3, vae(x3), w)["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)


def test_local_velocity_std_and_sub_window_loss_dyn():
    """``dyn_window`` matches the velocity std of each sub-window: a quiet stretch beside a busy one counts."""
    torch.manual_seed(0)
    x = torch.randn(2, 23, 5)
    vs = lambda a: a.diff(dim=1).std(dim=1, unbiased=False)  # noqa: E731
    assert torch.allclose(local_velocity_std(x, 0), vs(x)[:, None], atol=1e-6)
    assert torch.allclose(local_velocity_std(x, 23), vs(x)[:, None], atol=1e-6)
    sub = local_velocity_std(x, 10)  # frames 20-22 are not used
    assert sub.shape == (2, 2, 5)
    assert torch.allclose(sub, torch.stack([vs(x[:, :10]), vs(x[:, 10:20])], 1), atol=1e-6)
    # a window whose first half moves 10x more than its second: a reconstruction that stills the quiet half
    t = torch.arange(200.0)[None, :, None]
    busy = torch.sin(t * 0.9) * torch.where(t < 100, 10.0, 1.0)  # (1, 200, 1)
    still = torch.where(t < 100, busy, torch.zeros_like(busy))
    whole = (local_velocity_std(still, 0) - local_velocity_std(busy, 0)).pow(2).mean()
    local = (local_velocity_std(still, 50) - local_velocity_std(busy, 50)).pow(2).mean()
    # the quiet half is ~1 % of the whole window's velocity variance, but a full miss in half the sub-windows
    assert local > 5 * whole
    x = torch.randn(2, 40, FLAME_DIM)
    for w in (0, 8):
        vae = MotionVAE(VAEConfig.tiny(group_balance=0.0, dyn_window=w))
        out = vae(x, sample=False)
        want = (local_velocity_std(out["recon"], w) - local_velocity_std(x, w)).pow(2).mean()
        assert torch.allclose(vae.loss(x, out)["loss_dyn"], want, atol=1e-6)
    for bad in (-1, 1, 2):
        with pytest.raises(ValueError, match=f"dyn_window={bad}"):
            VAEConfig(dyn_window=bad)


def test_loss_channel_weights():
    from gdpo_listener.agents.vae import loss_channel_weights, raw_channel_std

    # group balance 1: every group has the same total weight; 0: every channel the same
    w = loss_channel_weights(VAEConfig(group_balance=1.0))
    totals = torch.stack([w[sl].sum() for sl in GROUPS.values()])
    assert torch.allclose(totals, totals[0].expand(N_GROUPS)) and w.mean().item() == pytest.approx(1.0)
    assert torch.allclose(loss_channel_weights(VAEConfig(group_balance=0.0)), torch.ones(FLAME_DIM))
    # raw weighting: inside a group, high-variance channels weigh more; constant ones keep a floor
    std = np.full(FLAME_DIM, 0.1)
    std[0], std[1] = 1.0, 0.0
    w = loss_channel_weights(VAEConfig(group_balance=0.0, raw_weight=0.8), std)
    assert w[0] > 10 * w[2] and w[1] > 0 and torch.allclose(w[GROUPS["rot"]], w[GROUPS["jaw"]])
    # raw_channel_std ignores rows where the group is invalid
    rng = np.random.default_rng(0)
    motion = torch.from_numpy(rng.normal(0, 1, (4, 50, FLAME_DIM)).astype(np.float32))
    valid = torch.ones(4, N_GROUPS, dtype=torch.bool)
    motion[0, :, GROUPS["rot"]] = 100.0
    valid[0, GROUP_NAMES.index("rot")] = False
    s = raw_channel_std(motion, valid)
    assert s.shape == (FLAME_DIM,) and np.all(np.abs(s - 1.0) < 0.15)
    vae = MotionVAE(VAEConfig.tiny())
    vae.set_loss_weights(s)
    assert torch.allclose(vae.loss_weights, loss_channel_weights(vae.cfg, s))


def test_kl_and_masked_mse_math():
    mu = torch.zeros(1, 2, 4)
    assert kl_standard_normal(mu, torch.zeros_like(mu)).item() == pytest.approx(0.0)
    # KL(N(1, 1) || N(0, 1)) = 0.5 per dim, summed over 4 dims
    assert kl_standard_normal(mu + 1, torch.zeros_like(mu)).item() == pytest.approx(2.0)
    # KL(N(0, e) || N(0, 1)) = 0.5 (e - 1 - 1) per dim
    assert kl_standard_normal(mu, torch.ones_like(mu)).item() == pytest.approx(4 * 0.5 * (np.e - 2), rel=1e-5)
    p, t = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)
    w = torch.tensor([[[1.0, 0.0]]])
    assert masked_mse(p, t, w).item() == pytest.approx(1.0)
    assert masked_mse(p, t, torch.zeros_like(w)).item() == 0.0  # no valid channel: 0, never NaN


def test_overfits_smooth_motion_and_keeps_dynamics(smooth_motion):
    """A few hundred steps on a handful of windows: reconstruction and velocity error drop a lot."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    raw = np.stack([smooth_motion(rng, 48) for _ in range(4)])  # (4, 48, 67)
    x = torch.from_numpy((raw - raw.mean((0, 1))) / raw.std((0, 1)))
    vae = MotionVAE(VAEConfig.tiny(d_model=64))
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    first = None
    for _ in range(120):
        terms = vae.loss(x, vae(x))
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = first or {k: v.item() for k, v in terms.items()}
    vae.eval()
    final = vae.loss(x, vae(x))
    assert final["loss_recon"].item() < 0.1 * first["loss_recon"]
    assert final["loss_vel"].item() < 0.2 * first["loss_vel"]


# ----------------------------------------------------------------------------------------------
# checkpoint


def _normalizer(seed=0) -> Normalizer:
    rng = np.random.default_rng(seed)
    return Normalizer(rng.normal(size=FLAME_DIM).astype(np.float32), rng.uniform(0.5, 2, FLAME_DIM).astype(np.float32))


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    vae = MotionVAE(VAEConfig.tiny(d_latent=8))
    vae.latent_std.fill_(2.5)
    nz = _normalizer()
    save_vae(tmp_path / "ck", vae, nz, extra_meta={"note": "hello"})
    meta = load_checkpoint_meta(tmp_path / "ck", kind="vae")
    assert meta["note"] == "hello" and meta["vae_config"]["d_latent"] == 8
    vae2, nz2, cfg2 = load_vae(tmp_path / "ck", "cpu")
    assert cfg2 == vae.cfg and not vae2.training
    assert np.array_equal(nz2.mean, nz.mean) and np.array_equal(nz2.std, nz.std)
    assert torch.equal(vae2.latent_std, vae.latent_std)
    x = torch.randn(2, 24, FLAME_DIM)
    vae.eval()
    assert torch.equal(vae(x)["recon"], vae2(x)["recon"])
    assert cfg2.dyn_window == 50  # the default, recorded
    # a checkpoint written before dyn_window existed was trained on whole windows, and says so when loaded
    meta_path = tmp_path / "ck" / "meta.json"
    m = json.loads(meta_path.read_text())
    del m["vae_config"]["dyn_window"]
    meta_path.write_text(json.dumps(m))
    assert load_vae(tmp_path / "ck", "cpu")[2].dyn_window == 0


def test_load_errors(tmp_path):
    vae = MotionVAE(VAEConfig.tiny())
    with pytest.raises(CheckpointError, match="missing"):
        load_vae(tmp_path / "nothing")
    d = save_vae(tmp_path / "ck", vae, _normalizer())
    meta_path = d / "meta.json"
    good = json.loads(meta_path.read_text())

    def write(**changes):
        m = json.loads(json.dumps(good))
        for k, v in changes.items():
            if k in m["vae_config"]:
                m["vae_config"][k] = v
            else:
                m[k] = v
        meta_path.write_text(json.dumps(m))

    write(vae_format_version=99)
    with pytest.raises(CheckpointError, match="VAE format version 99"):
        load_vae(d)
    # version 1 used another rotary pairing: its weights load without a shape error but mean something else
    assert good["vae_format_version"] == 2
    write(vae_format_version=1)
    with pytest.raises(CheckpointError, match="VAE format version 1, this code reads 2.*retrain"):
        load_vae(d)
    write(kind="arflow")
    with pytest.raises(CheckpointError, match="expected a 'vae'"):
        load_vae(d)
    write(d_in=60)
    with pytest.raises(CheckpointError, match="d_in=60"):
        load_vae(d)
    write(d_model=64)  # weights no longer match the config
    with pytest.raises(CheckpointError, match="does not match"):
        load_vae(d)
    m = json.loads(json.dumps(good))
    m["vae_config"]["n_layerz"] = 3
    meta_path.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="n_layerz"):
        load_vae(d)


def test_per_group_report_identity_and_smoothing(smooth_motion):
    """A perfect decoder has RMSE 0 and ratio 1; a temporally smoothed one has ratio < 1."""

    class Identity(MotionVAE):
        def forward(self, x, sample=None):
            return {"recon": x}

    class Smoother(MotionVAE):
        def forward(self, x, sample=None):
            k = torch.ones(FLAME_DIM, 1, 9) / 9
            return {"recon": torch.nn.functional.conv1d(x.transpose(1, 2), k, padding=4, groups=FLAME_DIM).transpose(1, 2)}

    rng = np.random.default_rng(1)
    items = []
    for i in range(5):
        m = smooth_motion(rng, 64) + rng.normal(0, 0.05, (64, FLAME_DIM)).astype(np.float32)
        v = np.ones(N_GROUPS, bool)
        if i == 0:
            v[GROUP_NAMES.index("rot")] = False
        items.append({"actor_motion": m, "actor_valid": v})
    items.append({"actor_motion": smooth_motion(rng, 64), "actor_valid": np.eye(N_GROUPS, dtype=bool)[0]})
    nz = _normalizer()
    rep = per_group_report(Identity(VAEConfig.tiny()), nz, items, "cpu", batch_size=4)
    assert set(rep) == set(GROUP_NAMES)
    assert rep["expr"]["windows"] == 6 and rep["rot"]["windows"] == 4
    for r in rep.values():
        assert r["rmse"] < 1e-5 and r["vel_std_ratio"] == pytest.approx(1.0, abs=1e-5)
    rep = per_group_report(Smoother(VAEConfig.tiny()), nz, items, "cpu")
    for r in rep.values():
        assert r["rmse"] > 1e-3 and r["vel_std_ratio"] < 0.7
    # a group valid nowhere is left out
    rep = per_group_report(Identity(VAEConfig.tiny()), nz, items[-1:], "cpu")
    assert list(rep) == ["expr"] and "listening_vel_std_ratio" not in rep["expr"]  # no turn masks: whole windows only

    # per turn: a decoder that freezes the listening frames keeps the speaking dynamics and loses the listening ones
    listening = np.zeros(64, bool)
    listening[32:] = True

    class FreezeListening(MotionVAE):
        def forward(self, x, sample=None):
            r = x.clone()
            r[:, 32:] = x[:, 32:33]
            return {"recon": r}

    turns = [{**it, "listening": listening, "speaking": ~listening} for it in items]
    rep = per_group_report(FreezeListening(VAEConfig.tiny()), nz, turns, "cpu", batch_size=4)
    for r in rep.values():
        assert r["speaking_vel_std_ratio"] == pytest.approx(1.0, abs=1e-5) and r["listening_vel_std_ratio"] < 1e-3
    assert "listening" in format_report(rep)


# ----------------------------------------------------------------------------------------------
# train/vae.py


@pytest.mark.slow
def test_train_script_smoke_and_resume(tiny_dataset, tmp_path, run_entry):
    def _run_train(*overrides: str, cwd: Path):
        res = run_entry("vae.py", *overrides, cwd=cwd, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res

    tiny = ["+model.d_model=32", "+model.n_layers=1", "+model.n_heads=2", "optim.batch_size=8",
            "log_every=5", "ckpt_every=5", "threads=1"]
    out = tmp_path / "run"
    res = _run_train(f"data.root={tiny_dataset}", f"out_dir={out}", "optim.steps=10", *tiny, cwd=tmp_path)
    assert "vel_std_ratio" in res.stdout and "expr" in res.stdout
    vae, nz, cfg = load_vae(out, "cpu")
    assert cfg.d_model == 32 and cfg.n_layers == 1
    assert np.array_equal(nz.mean, Normalizer.load(tiny_dataset / "normalizer.npz").mean)
    meta = load_checkpoint_meta(out, kind="vae")
    assert meta["steps"] == 10 and set(meta["report"]["groups"]) == set(GROUP_NAMES)
    assert json.loads((out / "report.json").read_text())["split"] == "test"
    w = DyadicWindows(tiny_dataset, "test", load_audio=False)
    mu, _ = vae.encode(nz.normalize(torch.from_numpy(w[0]["actor_motion"]))[None])
    assert mu.shape == (1, 25, cfg.d_latent) and torch.isfinite(mu).all()
    loss_csv = next((out / "logs").rglob("loss/loss.csv"))
    assert [int(l.split(",")[0]) for l in loss_csv.read_text().splitlines()] == [5, 10]
    # continue to 15 steps: starts at 10, does not start over
    res = _run_train(f"data.root={tiny_dataset}", f"out_dir={out}", "optim.steps=15", "resume=true", *tiny, cwd=tmp_path)
    assert "resumed from step 10" in res.stdout
    assert load_checkpoint_meta(out)["steps"] == 15
    assert [int(l.split(",")[0]) for l in loss_csv.read_text().splitlines()] == [5, 10, 15]
    # a state written before the resolved VAE config was recorded (its Hydra model section, no dyn_window: the
    # whole-window loss) resumes only with that loss asked for, not silently with today's default
    state_path = out / "last" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    del state["vae_config"]
    state["config"]["model"] = {"d_model": 32, "n_layers": 1, "n_heads": 2}
    torch.save(state, state_path)
    res = run_entry("vae.py", f"data.root={tiny_dataset}", f"out_dir={out}", "optim.steps=20", "resume=true", *tiny, cwd=tmp_path)
    assert res.returncode != 0 and "dyn_window: 0 then, 50 now" in res.stdout + res.stderr
    assert "+model.dyn_window=0" in res.stdout + res.stderr
    res = _run_train(f"data.root={tiny_dataset}", f"out_dir={out}", "optim.steps=20", "resume=true", "+model.dyn_window=0",
                     *tiny, cwd=tmp_path)
    assert "resumed from step 15" in res.stdout and load_vae(out, "cpu")[2].dyn_window == 0
