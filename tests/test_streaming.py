"""Streaming generation (agents/streaming.py): equal to offline generate_long + decoding for any chunking,
incremental log-mel equal to the offline encoder, bounded state, CFG / text changes from the next token."""
import numpy as np
import pytest
import torch

from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
from gdpo_listener.agents.compress import compress
from gdpo_listener.agents.encoders import HOP, AudioEncoder
from gdpo_listener.agents.sampling import generate_long
from gdpo_listener.agents.streaming import StreamingEnergyVAD, StreamingGenerator, StreamingLogMel, decode_latents_causal
from gdpo_listener.agents.vae import MotionVAE, VAEConfig
from gdpo_listener.envs.converters.vad import energy_vad_frames
from gdpo_listener.envs.dataset import Normalizer
from gdpo_listener.envs.flame import FLAME_DIM, FPS, SAMPLE_RATE
from gdpo_listener.envs.windows import decode_latents, token_majority

R, W_FRAMES, DV, DT, N_MELS = 8, 32, 4, 8, 16  # 4-token AR window
TOKEN = R * HOP  # samples per token


@pytest.fixture(scope="module")
def parts():
    """Tiny random AR-Flow (non-zero output modulation), tiny VAE with a 3-token window (not aligned with
    the AR window), identity normaliser shifted by a constant, 16-band log-mel encoder."""
    torch.manual_seed(0)
    model = ARFlow(ARFlowConfig(d_latent=DV, d_text=DT, d_audio=N_MELS, d_model=32, n_layers=2, n_heads=2, r=R,
                                window=W_FRAMES, p_drop_text=0.0, p_drop_audio=0.0, p_drop_motion=0.0))
    with torch.no_grad():
        model.final_mod.weight.normal_(std=0.05)
    vae = MotionVAE(VAEConfig.tiny(d_latent=DV, window=24, r=R)).eval().requires_grad_(False)
    norm = Normalizer(np.full(FLAME_DIM, 0.1, np.float32), np.full(FLAME_DIM, 2.0, np.float32))
    return model.eval(), vae, norm, AudioEncoder("logmel", n_mels=N_MELS)


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Bursts of modulated tones and noise separated by near-silence (so the energy VAD switches)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    env = (np.sin(2 * np.pi * rng.uniform(0.2, 0.4) * t + rng.uniform(0, 6)) > 0).astype(np.float32)
    voice = 0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) + 0.05 * rng.standard_normal(n)
    return (env * voice + 1e-4 * rng.standard_normal(n)).astype(np.float32)


def run_stream(gen: StreamingGenerator, actor, partner, chunk: int, on_chunk=None, on_output=None):
    """Push both sides in chunks of ``chunk`` samples, then finish -> (latents (N, Dv), motion (T, 67), speaking (N,)).
    ``on_chunk(i, gen)`` / ``on_output(i, output)`` are called after push i."""
    outs = []
    for i, a in enumerate(range(0, len(actor), chunk)):
        outs.append(gen.push(actor[a:a + chunk], None if partner is None else partner[a:a + chunk]))
        if on_chunk is not None:
            on_chunk(i, gen)
        if on_output is not None:
            on_output(i, outs[-1])
    outs.append(gen.finish())
    tok, frame = 0, 0
    for o in outs:  # outputs are contiguous and in order
        assert o.token0 == tok and o.frame0 == frame
        tok, frame = tok + o.latents.shape[0], frame + o.motion.shape[0]
    return (torch.cat([o.latents for o in outs]), np.concatenate([o.motion for o in outs]),
            np.concatenate([o.speaking for o in outs]))


def offline_cond(enc, actor, partner, n_frames, text=None):
    feats = {k: torch.as_tensor(enc.encode(w[:n_frames * HOP], n_frames))[None]
             for k, w in (("actor_audio", actor), ("partner_audio", partner))}
    return {"text_emb": torch.zeros(1, DT) if text is None else torch.as_tensor(text)[None],
            "text_mask": torch.tensor([text is not None]), **feats,
            "partner_latent": torch.zeros(1, n_frames // R, DV), "partner_has_motion": torch.tensor([False])}


SETTINGS = dict(steps=3, w_speak=1.5, w_listen=2.0)


@pytest.mark.parametrize("chunk,cfg_drop", [(320, None), (777, ["text"]), (SAMPLE_RATE, None)])
def test_stream_equals_generate_long_and_decode(parts, chunk, cfg_drop):
    model, vae, norm, enc = parts
    actor, partner = speech_like(6.3, 1), speech_like(6.3, 2)  # 19 whole tokens and a partial one
    text = torch.randn(DT, generator=torch.Generator().manual_seed(5))
    gen = StreamingGenerator(model, vae, norm, enc, k=1, text_emb=text, generator=torch.Generator().manual_seed(3),
                             cfg_drop=cfg_drop, **SETTINGS)
    z, motion, speaking = run_stream(gen, actor, partner, chunk)
    n_frames = (len(actor) // TOKEN) * R
    assert z.shape == (n_frames // R, DV) and speaking.any() and not speaking.all()
    ref = generate_long(model, offline_cond(enc, actor, partner, n_frames, text), n_frames, k=1,
                        speaking_tokens=torch.from_numpy(speaking)[None], generator=torch.Generator().manual_seed(3),
                        cfg_drop=cfg_drop, **SETTINGS)[0]  # (N, Dv)
    assert torch.equal(z, ref)
    assert np.array_equal(motion, decode_latents(vae, norm, ref[None])[0].numpy())
    offline_vad = token_majority(torch.from_numpy(energy_vad_frames(actor, n_frames)), R).numpy()  # as generate.py
    assert (speaking == offline_vad).mean() >= 0.9


def test_low_latency_stream_equals_generate_long_k_w_minus_1(parts):
    """k = W - 1 with causal decoding: every token runs once its own audio is in (after the first window)."""
    model, vae, norm, enc = parts
    actor = speech_like(4.0, 3)
    W = W_FRAMES // R
    gen = StreamingGenerator(model, vae, norm, enc, k=W - 1, decode="causal", sigma=0.3,
                             generator=torch.Generator().manual_seed(4), **SETTINGS)
    ready_after = []

    def check(i, g):  # after the first window, everything whose audio is in has been generated and decoded
        ready_after.append((g.tokens_ready, g.tokens_generated))

    z, motion, speaking = run_stream(gen, actor, None, 1000, check)
    assert all(gen_ == ready for ready, gen_ in ready_after if ready >= W)
    n_frames = (len(actor) // TOKEN) * R
    ref = generate_long(model, offline_cond(enc, actor, np.zeros_like(actor), n_frames), n_frames, k=W - 1, sigma=0.3,
                        speaking_tokens=torch.from_numpy(speaking)[None], generator=torch.Generator().manual_seed(4),
                        **SETTINGS)[0]
    assert torch.equal(z, ref)
    assert np.array_equal(motion, decode_latents_causal(vae, norm, ref[None])[0].numpy())


def test_cfg_and_text_changes_apply_from_the_next_token(parts):
    model, vae, norm, enc = parts
    actor, partner = speech_like(6.0, 4), speech_like(6.0, 5)
    text_a, text_b = torch.randn(2, DT, generator=torch.Generator().manual_seed(6))
    k, change = 1, {}

    def switch(i, g):
        if i == 9 and not change:  # mid-stream (chunks of 4000 samples)
            change["token"] = g.tokens_generated
            g.set_cfg(w_listen=3.0)
            g.set_text(text_b)

    def stream(on_chunk):
        g = StreamingGenerator(model, vae, norm, enc, k=k, steps=3, w_speak=1.5, w_listen=1.5, text_emb=text_a,
                               generator=torch.Generator().manual_seed(7))
        return run_stream(g, actor, partner, 4000, on_chunk)

    z_same, _, _ = stream(None)
    z, _, speaking = stream(switch)
    T, n_tok = change["token"], z.shape[0]
    assert 0 < T < n_tok - 3
    assert torch.equal(z[:T], z_same[:T]) and not torch.equal(z[T:], z_same[T:])
    # offline: weight 1.5 on every token before the change (marked "speaking"), 1.5 / 3.0 after it;
    # text b in every window that generates tokens from T on
    n_frames = n_tok * R
    full = offline_cond(enc, actor, partner, n_frames)

    def cond_fn(f0, nf):
        s0 = f0 // R
        text = text_b if s0 + k >= T or s0 + nf // R >= n_tok else text_a  # windows run after the change
        return {"text_emb": text[None], "text_mask": torch.tensor([True]),
                "actor_audio": full["actor_audio"][:, f0:f0 + nf], "partner_audio": full["partner_audio"][:, f0:f0 + nf],
                "partner_latent": full["partner_latent"][:, s0:s0 + nf // R], "partner_has_motion": torch.tensor([False])}

    weights_speak = torch.from_numpy(speaking).clone()
    weights_speak[:T] = True
    ref = generate_long(model, cond_fn, n_frames, k=k, steps=3, w_speak=1.5, w_listen=3.0,
                        speaking_tokens=weights_speak[None], generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(z, ref)


def test_given_speaking_decisions_replace_the_vad(parts):
    model, vae, norm, enc = parts
    actor = speech_like(3.0, 12)
    n_tok = len(actor) // TOKEN
    given = np.arange(n_tok) % 3 == 0  # not what the VAD says
    calls = []

    def speaking(j0, j1):
        calls.append((j0, j1))
        return given[j0:j1]

    gen = StreamingGenerator(model, vae, norm, enc, speaking=speaking, generator=torch.Generator().manual_seed(2), **SETTINGS)
    z, _, sp = run_stream(gen, actor, None, 2000)
    assert np.array_equal(sp, given) and calls[0] == (0, W_FRAMES // R)
    ref = generate_long(model, offline_cond(enc, actor, np.zeros_like(actor), n_tok * R), n_tok * R,
                        speaking_tokens=torch.from_numpy(given)[None], generator=torch.Generator().manual_seed(2), **SETTINGS)[0]
    assert torch.equal(z, ref)
    bad = StreamingGenerator(model, vae, norm, enc, speaking=lambda j0, j1: given[:1], **SETTINGS)
    with pytest.raises(ValueError, match="speaking"):
        run_stream(bad, actor, None, 2000)


@pytest.mark.parametrize("which", ["parts", "causal_parts"])
def test_state_is_bounded(request, which):
    model, vae, norm, enc = request.getfixturevalue(which)
    actor = speech_like(40.0, 6)  # 125 tokens, 41 windows
    chunk, W = 3000, W_FRAMES // R
    gen = StreamingGenerator(model, vae, norm, enc, k=1, steps=1, vad_seconds=2.0, generator=torch.Generator().manual_seed(0))
    sizes = []
    run_stream(gen, actor, None, chunk, lambda i, g: sizes.append(g.state_sizes()))
    assert gen.tokens_generated == len(actor) // TOKEN
    bounds = {"actor_feature_tokens": 2 * W, "partner_feature_tokens": 2 * W, "latent_tokens": max(W, gen.nv),
              "actor_feature_samples": TOKEN + 1024 + chunk, "partner_feature_samples": TOKEN + 1024 + chunk,
              "vad_samples": 2 * SAMPLE_RATE + W * TOKEN + chunk}
    for key, bound in bounds.items():
        seen = [s[key] for s in sizes]
        assert max(seen) <= bound, (key, max(seen), bound)
        half = len(seen) // 2
        assert max(seen[half:]) <= max(seen[:half]), key  # no growth with length


@pytest.mark.parametrize("chunk", [320, 1001, SAMPLE_RATE])
def test_streaming_logmel_equals_offline_encoder(chunk):
    enc = AudioEncoder("logmel")  # the real 80-band features
    wav = speech_like(3.0, 7)
    feat = StreamingLogMel(enc, R)
    frames = np.concatenate([feat.push(wav[a:a + chunk]) for a in range(0, len(wav), chunk)])
    n = (len(wav) // TOKEN) * R
    assert frames.shape == (n, 80)
    assert np.array_equal(frames, enc.encode(wav[:n * HOP], n))
    with pytest.raises(ValueError, match="log-mel"):
        StreamingLogMel(type("Enc", (), {"kind": "wav2vec"})(), R)


def test_streaming_vad_is_chunk_independent_and_close_to_offline():
    wav = speech_like(20.0, 8)
    n_tok = len(wav) // TOKEN
    offline = token_majority(torch.from_numpy(energy_vad_frames(wav, n_tok * R)), R).numpy()

    def run(chunk):  # decisions per 4-token window, each as soon as its audio is in
        vad, out, ends, got = StreamingEnergyVAD(R, context_frames=250), [], list(range(4, n_tok, 4)) + [n_tok], 0
        for a in range(0, len(wav), chunk):
            vad.push(wav[a:a + chunk])
            while ends and min(a + chunk, len(wav)) // TOKEN >= ends[0]:
                out.append(vad.tokens(got, ends[0]))
                got = ends.pop(0)
        return np.concatenate(out)

    a, b = run(700), run(SAMPLE_RATE)
    assert a.shape == (n_tok,) and np.array_equal(a, b)
    agree = (a == offline).mean()
    assert agree >= 0.9, agree


@pytest.mark.parametrize("precision, tol", [("int8", 0.05), ("bf16", 0.02)])
def test_compressed_copy_streams_close_to_fp32(parts, precision, tol):
    model, vae, norm, enc = parts
    q = compress(model, precision)
    assert q is not model and all(p.dtype == torch.float32 for p in model.parameters())  # the original is untouched
    out = {}
    for name, m in (("fp32", model), (precision, q)):
        gen = StreamingGenerator(m, vae, norm, enc, generator=torch.Generator().manual_seed(0), **SETTINGS)
        out[name] = run_stream(gen, speech_like(3.0, 9), None, SAMPLE_RATE)[0]
    rel = (out[precision] - out["fp32"]).norm() / out["fp32"].norm()
    assert 0 < rel < tol, rel


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    from gdpo_listener.agents import compress as C

    monkeypatch.setattr(C, "bf16_native", lambda: True)
    assert C.resolve_precision("auto", "cpu") == "bf16" and C.resolve_precision("int8", "cpu") == "int8"
    small, paper = (C.linear_weight_bytes(ARFlow(c)) for c in (ARFlowConfig.small(), ARFlowConfig.paper()))
    assert C.resolve_precision("auto", "cpu", small) == "fp32" and C.resolve_precision("auto", "cpu", paper) == "bf16"
    monkeypatch.setattr(C, "bf16_native", lambda: False)
    assert C.resolve_precision("auto", "cpu") == "fp32"
    model = ARFlow(ARFlowConfig(d_model=32, n_layers=1, n_heads=2))
    assert C.compress(model, "auto") is model  # fp32: the model itself, no copy
    with pytest.raises(ValueError, match="precision='fp16'"):
        C.compress(model, "fp16")


@pytest.mark.slow
def test_stream_cli_writes_the_offline_motion_and_a_latency_report(tmp_path, run_entry):
    """train/stream.py on a tiny checkpoint (not paced): its motion is generate_long + decode_latents of the same audio."""
    import json

    import soundfile as sf

    from gdpo_listener.agents.arflow import load_arflow, save_arflow
    from gdpo_listener.agents.vae import load_vae, save_vae

    torch.manual_seed(0)
    save_vae(tmp_path / "vae", MotionVAE(VAEConfig.tiny(d_latent=DV, window=24, r=R)),
             Normalizer(np.zeros(FLAME_DIM, np.float32), np.ones(FLAME_DIM, np.float32)))
    save_arflow(tmp_path / "sft", ARFlow(ARFlowConfig(d_latent=DV, d_text=384, d_audio=80, d_model=32, n_layers=1, n_heads=2,
                                                      r=R, window=W_FRAMES)),
                "small", config={"features": {"text_encoder": "bundled-minilm", "audio_encoder": "logmel"}},
                extra={"vae_dir": str(tmp_path / "vae")})
    actor, partner = speech_like(3.5, 10), speech_like(3.5, 11)
    sf.write(tmp_path / "a.wav", actor, SAMPLE_RATE, subtype="FLOAT")  # read back bit for bit
    sf.write(tmp_path / "b.wav", partner, SAMPLE_RATE, subtype="FLOAT")
    res = run_entry("stream.py", f"checkpoint={tmp_path / 'sft'}", f"actor_wav={tmp_path / 'a.wav'}",
                    f"partner_wav={tmp_path / 'b.wav'}", "realtime=false", "chunk_ms=30", "steps=2", "w_listen=2.0",
                    "threads=1", "precision=fp32", f"out={tmp_path / 'gen'}", cwd=tmp_path)  # fp32: compared bit for bit
    assert res.returncode == 0, res.stderr[-2000:]
    with np.load(tmp_path / "gen.npz") as z:
        motion, latents, speaking, latency = z["motion"], z["latents"], z["speaking_tokens"], z["latency_s"]
    report = json.loads((tmp_path / "gen.json").read_text())
    n_tok = len(actor) // TOKEN
    assert motion.shape == (n_tok * R, FLAME_DIM) and latency.shape == (n_tok,) and report["tokens"] == n_tok
    # the report summarises the saved per-token latencies; kept up = no chunk finished more than a token late
    assert report["latency_p50_s"] == pytest.approx(float(np.percentile(latency, 50)))
    assert report["latency_p99_s"] == pytest.approx(float(np.percentile(latency, 99)))
    assert report["kept_up"] is (report["max_lag_s"] <= R / FPS)
    model, _ = load_arflow(tmp_path / "sft")
    vae, norm, _ = load_vae(tmp_path / "vae")
    n_frames = n_tok * R
    cond = offline_cond(AudioEncoder("logmel"), actor, partner, n_frames)
    cond["text_emb"] = torch.zeros(1, 384)
    z = generate_long(model, cond, n_frames, steps=2, w_listen=2.0, speaking_tokens=torch.from_numpy(speaking)[None],
                      generator=torch.Generator().manual_seed(0))
    assert np.array_equal(latents, z[0].numpy()) and np.array_equal(motion, decode_latents(vae, norm, z)[0].numpy())
    bad = run_entry("stream.py", f"checkpoint={tmp_path / 'sft'}", f"actor_wav={tmp_path / 'a.wav'}", "chunk_ms=10", cwd=tmp_path)
    assert bad.returncode != 0 and "20 ms" in bad.stderr


# ----------------------------------------------------------------------------------------------
# causal-in-time prefix: one token of latency, equal to generate_long for any chunking


@pytest.fixture(scope="module")
def causal_parts(parts):
    """The tiny AR-Flow of ``parts`` with a causal prefix (same weights)."""
    model, vae, norm, enc = parts
    causal = ARFlow(ARFlowConfig(**{**model.cfg.to_dict(), "causal_prefix": True}))
    causal.load_state_dict(model.state_dict())
    return causal.eval(), vae, norm, enc


@pytest.mark.parametrize("chunk,k,sigma,cfg_drop", [(320, 1, 0.0, None), (777, 2, 0.3, ["text"]), (SAMPLE_RATE, 1, 0.0, None)])
def test_causal_stream_emits_each_token_with_its_audio_and_equals_generate_long(causal_parts, chunk, k, sigma, cfg_drop):
    model, vae, norm, enc = causal_parts
    actor, partner = speech_like(6.3, 1), speech_like(6.3, 2)  # 19 whole tokens: the last window is cut short
    text = torch.randn(DT, generator=torch.Generator().manual_seed(5))
    gen = StreamingGenerator(model, vae, norm, enc, k=k, sigma=sigma, text_emb=text, decode="causal",
                             generator=torch.Generator().manual_seed(3), cfg_drop=cfg_drop, **SETTINGS)
    emitted, late = {"tokens": 0, "frames": 0}, []

    def count(i, out):  # after every push: every token whose audio is in is out, latents and frames
        emitted["tokens"] += out.latents.shape[0]
        emitted["frames"] += out.motion.shape[0]
        whole = min((i + 1) * chunk, len(actor)) // TOKEN
        late.append((whole - emitted["tokens"], whole * R - emitted["frames"]))

    z, motion, speaking = run_stream(gen, actor, partner, chunk, on_output=count)
    assert late and all(lag == (0, 0) for lag in late), late  # no token waits for later audio
    n_frames = (len(actor) // TOKEN) * R
    assert z.shape == (n_frames // R, DV) and speaking.any() and not speaking.all()
    ref = generate_long(model, offline_cond(enc, actor, partner, n_frames, text), n_frames, k=k, sigma=sigma,
                        speaking_tokens=torch.from_numpy(speaking)[None], generator=torch.Generator().manual_seed(3),
                        cfg_drop=cfg_drop, **SETTINGS)[0]  # (N, Dv)
    assert torch.equal(z, ref)
    assert np.array_equal(motion, decode_latents_causal(vae, norm, ref[None])[0].numpy())
    if cfg_drop is not None:  # guidance on the text alone is not the paper's guidance
        paper = generate_long(model, offline_cond(enc, actor, partner, n_frames, text), n_frames, k=k, sigma=sigma,
                              speaking_tokens=torch.from_numpy(speaking)[None], generator=torch.Generator().manual_seed(3),
                              **SETTINGS)[0]
        assert not torch.allclose(paper, ref, atol=1e-4)
    # the causal model differs from the bidirectional one (same weights): the mask matters
    model_b = parts_model_bidirectional(model)
    ref_b = generate_long(model_b, offline_cond(enc, actor, partner, n_frames, text), n_frames, k=k, sigma=sigma,
                          speaking_tokens=torch.from_numpy(speaking)[None], generator=torch.Generator().manual_seed(3),
                          **SETTINGS)[0]
    assert not torch.allclose(ref_b, ref, atol=1e-4)


def parts_model_bidirectional(model):
    m = ARFlow(ARFlowConfig(**{**model.cfg.to_dict(), "causal_prefix": False}))
    m.load_state_dict(model.state_dict())
    return m.eval()


def test_causal_stream_uncached_and_a_stream_cut_short_agree(causal_parts):
    """use_cache=False follows the same schedule; stopping earlier gives the first tokens of the longer stream."""
    model, vae, norm, enc = causal_parts
    actor = speech_like(3.0, 13)
    runs = {}
    for name, n, cache in (("long", len(actor), True), ("short", 5 * TOKEN + 100, True), ("uncached", len(actor), False)):
        gen = StreamingGenerator(model, vae, norm, enc, k=1, use_cache=cache, generator=torch.Generator().manual_seed(8),
                                 speaking=lambda j0, j1: np.arange(j0, j1) % 2 == 0, **SETTINGS)
        runs[name] = run_stream(gen, actor[:n], None, 900)[0]
    assert runs["short"].shape[0] == 5 and torch.equal(runs["short"], runs["long"][:5])
    torch.testing.assert_close(runs["uncached"], runs["long"], atol=1e-4, rtol=1e-4)


def test_causal_cfg_changes_from_the_next_token_and_text_from_the_next_window(causal_parts):
    model, vae, norm, enc = causal_parts
    actor, partner = speech_like(6.0, 4), speech_like(6.0, 5)
    text_a, text_b = torch.randn(2, DT, generator=torch.Generator().manual_seed(6))
    k, W, change = 1, W_FRAMES // R, {}

    def switch(i, g):
        if i == 10 and not change:  # mid-stream (chunks of 4000 samples), mid-window (token 8 of [6, 10))
            change["token"] = g.tokens_generated
            g.set_cfg(w_listen=3.0)
            g.set_text(text_b)

    def stream(on_chunk):
        g = StreamingGenerator(model, vae, norm, enc, k=k, steps=3, w_speak=1.5, w_listen=1.5, text_emb=text_a,
                               generator=torch.Generator().manual_seed(7))
        return run_stream(g, actor, partner, 4000, on_chunk)

    z_same, _, _ = stream(None)
    z, _, speaking = stream(switch)
    T, n_tok = change["token"], z.shape[0]
    assert 0 < T < n_tok - W and T % (W - k) != 1  # the change falls inside a window
    assert torch.equal(z[:T], z_same[:T]) and not torch.equal(z[T:], z_same[T:])
    n_frames = n_tok * R
    full = offline_cond(enc, actor, partner, n_frames)

    def cond_fn(f0, nf):  # text b in the windows whose first new token comes after the change
        s0 = f0 // R
        text = text_b if (s0 + k if s0 else 0) >= T else text_a
        return {"text_emb": text[None], "text_mask": torch.tensor([True]),
                "actor_audio": full["actor_audio"][:, f0:f0 + nf], "partner_audio": full["partner_audio"][:, f0:f0 + nf],
                "partner_latent": full["partner_latent"][:, s0:s0 + nf // R], "partner_has_motion": torch.tensor([False])}

    weights_speak = torch.from_numpy(speaking).clone()
    weights_speak[:T] = True  # weight 1.5 on every token before the change, 1.5 / 3.0 after it
    ref = generate_long(model, cond_fn, n_frames, k=k, steps=3, w_speak=1.5, w_listen=3.0,
                        speaking_tokens=weights_speak[None], generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(z, ref)


@pytest.mark.parametrize("causal", [False, True])
def test_a_model_whose_listening_updates_read_the_context_streams_like_generate_long(parts, causal_parts, causal):
    """lora_scope=listening_context: the windows' context reads the past tokens' speaking decisions (the stream keeps
    them); the stream equals generate_long given the same decisions, and differs from the model without them."""
    import copy

    base = (causal_parts if causal else parts)[0]
    _, vae, norm, enc = parts
    model = copy.deepcopy(base)
    model.add_listen_lora(4, scope="listening_context")
    with torch.no_grad():
        for name, p in model.listen_lora.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(7))
    actor, partner = speech_like(6.3, 1), speech_like(6.3, 2)
    gen = StreamingGenerator(model.eval(), vae, norm, enc, k=2, generator=torch.Generator().manual_seed(3), **SETTINGS)
    z, _, speaking = run_stream(gen, actor, partner, 777)
    assert speaking.any() and not speaking.all()
    n_frames = (len(actor) // TOKEN) * R
    kw = dict(k=2, speaking_tokens=torch.from_numpy(speaking)[None], **SETTINGS)
    ref = generate_long(model, offline_cond(enc, actor, partner, n_frames), n_frames,
                        generator=torch.Generator().manual_seed(3), **kw)[0]  # (N, Dv)
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-5)
    plain = generate_long(base, offline_cond(enc, actor, partner, n_frames), n_frames,
                          generator=torch.Generator().manual_seed(3), **kw)[0]
    assert not torch.allclose(plain, ref, atol=1e-3)
