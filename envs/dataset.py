"""Canonical on-disk dataset format, its writer, its window loader and the motion normaliser.

Everything downstream reads data only through this module. Layout of one dataset folder::

    DATASET/
      dataset.json              format name + version, fps, sample rate, FLAME layout, source, summary
      splits/train.txt          conversation ids, one per line
      splits/test.txt
      normalizer.npz            channel-wise mean/std (67,) fitted on the train split
      conversations/<id>.npz    motion (2, T, 67) float32, group_valid (2, 6) bool,
                                has_motion (2,) bool, vad (2, T) bool
      conversations/<id>.json   {"text": [[str per 200-frame window] side 0, [...] side 1]}
      audio/<id>_s0.wav         16 kHz mono, side 0 (PCM 16 bit)
      audio/<id>_s1.wav         side 1

Both sides of a conversation are stored; each side is the *actor* once when windows are drawn
(the other side is then the *partner*). A side with ``has_motion = False`` is audio-only: it can
be a partner but never an actor. Speaking frames = actor VAD; listening frames = partner VAD and
not actor VAD (paper, supplementary section 1).

Writes are atomic: a dataset is built in a temporary sibling folder and renamed into place only
when complete, so a failed conversion never leaves a half-written dataset.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from .flame import FLAME_DIM, FPS, GROUP_NAMES, N_GROUPS, SAMPLE_RATE, channel_mask

FORMAT_NAME = "gdpo-listener-dataset"
FORMAT_VERSION = 1
WINDOW = 200  # frames per training window (8 s at 25 fps)
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
# audio and motion durations may differ by at most this many frames (rounding at the ends)
DURATION_TOLERANCE_FRAMES = 2


class DatasetFormatError(ValueError):
    """A dataset folder or a conversation does not follow the canonical format."""


@dataclass
class Conversation:
    """Both sides of one dyadic conversation, in memory.

    motion: (2, T, 67) float32;  group_valid: (2, 6) bool;  has_motion: (2,) bool;
    vad: (2, T) bool;  audio: two 1-d float32 arrays at 16 kHz;  text: per side, one string per
    200-frame window (may be shorter than the number of windows; missing entries mean "").
    """

    id: str
    motion: np.ndarray
    group_valid: np.ndarray
    has_motion: np.ndarray
    vad: np.ndarray
    audio: list[np.ndarray]
    text: list[list[str]] = field(default_factory=lambda: [[], []])

    @property
    def n_frames(self) -> int:
        return int(self.motion.shape[1])

    def validate(self) -> None:
        """Raise :class:`DatasetFormatError` naming the conversation and the bad value."""
        where = f"conversation {self.id!r}"
        if not self.id or "/" in self.id or self.id.startswith("."):
            raise DatasetFormatError(f"{where}: invalid id")
        m = np.asarray(self.motion)
        if m.ndim != 3 or m.shape[0] != 2 or m.shape[2] != FLAME_DIM:
            raise DatasetFormatError(f"{where}: motion must have shape (2, T, {FLAME_DIM}), got {m.shape}")
        T = m.shape[1]
        if T < 1:
            raise DatasetFormatError(f"{where}: motion is empty")
        if not np.isfinite(m).all():
            bad = np.argwhere(~np.isfinite(m))[0]
            raise DatasetFormatError(f"{where}: motion has NaN/inf (side {bad[0]}, frame {bad[1]}, channel {bad[2]})")
        if np.asarray(self.group_valid).shape != (2, N_GROUPS):
            raise DatasetFormatError(f"{where}: group_valid must have shape (2, {N_GROUPS})")
        if np.asarray(self.has_motion).shape != (2,):
            raise DatasetFormatError(f"{where}: has_motion must have shape (2,)")
        if not np.asarray(self.has_motion).any():
            raise DatasetFormatError(f"{where}: neither side has motion")
        if np.asarray(self.vad).shape != (2, T):
            raise DatasetFormatError(f"{where}: vad must have shape (2, {T}), got {np.asarray(self.vad).shape}")
        if len(self.audio) != 2:
            raise DatasetFormatError(f"{where}: need audio for both sides, got {len(self.audio)}")
        for s, a in enumerate(self.audio):
            a = np.asarray(a)
            if a.ndim != 1:
                raise DatasetFormatError(f"{where}: side {s} audio must be mono 1-d, got shape {a.shape}")
            if not np.isfinite(a).all():
                raise DatasetFormatError(f"{where}: side {s} audio has NaN/inf samples")
            frames = a.shape[0] / SAMPLES_PER_FRAME
            if abs(frames - T) > DURATION_TOLERANCE_FRAMES:
                raise DatasetFormatError(
                    f"{where}: side {s} audio lasts {a.shape[0] / SAMPLE_RATE:.2f} s but motion lasts "
                    f"{T / FPS:.2f} s (mismatch over {DURATION_TOLERANCE_FRAMES} frames)"
                )
        if len(self.text) != 2 or not all(isinstance(t, (list, tuple)) for t in self.text):
            raise DatasetFormatError(f"{where}: text must be two lists of strings (one per side)")


def fit_audio_length(audio: np.ndarray, n_frames: int) -> np.ndarray:
    """Pad with zeros or trim ``audio`` to exactly ``n_frames`` motion frames of samples."""
    n = n_frames * SAMPLES_PER_FRAME
    audio = np.asarray(audio, dtype=np.float32)
    if audio.shape[0] >= n:
        return audio[:n]
    return np.pad(audio, (0, n - audio.shape[0]))


# ----------------------------------------------------------------------------------------------
# normaliser


@dataclass
class Normalizer:
    """Channel-wise normalisation M -> M' = (M - mean) / std (paper section 3.1)."""

    mean: np.ndarray  # (67,)
    std: np.ndarray  # (67,)

    STD_FLOOR = 1e-4

    @classmethod
    def fit(cls, motions: Sequence[np.ndarray], group_valid: Sequence[np.ndarray]) -> "Normalizer":
        """Fit on a list of ``(T, 67)`` arrays, using only channels of valid groups."""
        s = np.zeros(FLAME_DIM)
        s2 = np.zeros(FLAME_DIM)
        n = np.zeros(FLAME_DIM)
        for m, v in zip(motions, group_valid):
            cm = channel_mask(v).astype(np.float64)  # (67,)
            m = m.astype(np.float64)
            s += m.sum(0) * cm
            s2 += (m**2).sum(0) * cm
            n += m.shape[0] * cm
        n_safe = np.maximum(n, 1)
        mean = s / n_safe
        var = np.maximum(s2 / n_safe - mean**2, 0.0)
        std = np.sqrt(var)
        std = np.where((n > 0) & (std > cls.STD_FLOOR), std, 1.0)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def normalize(self, m):
        return (m - self._like(self.mean, m)) / self._like(self.std, m)

    def denormalize(self, m):
        return m * self._like(self.std, m) + self._like(self.mean, m)

    @staticmethod
    def _like(a: np.ndarray, ref):
        if isinstance(ref, np.ndarray):
            return a
        import torch

        return torch.as_tensor(a, dtype=ref.dtype, device=ref.device)

    def save(self, path: str | os.PathLike) -> None:
        np.savez(path, mean=self.mean, std=self.std)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Normalizer":
        with np.load(path) as z:
            return cls(z["mean"].astype(np.float32), z["std"].astype(np.float32))

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "std": self.std}


# ----------------------------------------------------------------------------------------------
# writer


class DatasetWriter:
    """Write a canonical dataset atomically.

    >>> with DatasetWriter(out, source="synthetic") as w:
    ...     w.add(conv, split="train")

    On success (leaving the ``with`` block) the folder is fitted with the normaliser and renamed
    into ``out``; on an exception the temporary folder is removed and ``out`` is untouched.
    """

    def __init__(self, out: str | os.PathLike, source: str, overwrite: bool = True, extra_meta: dict | None = None):
        self.out = Path(out)
        self.source = source
        self.overwrite = overwrite
        self.extra_meta = dict(extra_meta or {})
        if self.out.exists():
            if not overwrite:
                raise FileExistsError(f"output folder {self.out} exists (pass overwrite=True to replace it)")
            if not self.out.is_dir() or (any(self.out.iterdir()) and not (self.out / "dataset.json").is_file()):
                raise FileExistsError(f"output folder {self.out} exists and is not a canonical dataset; refusing to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        (self.tmp / "conversations").mkdir()
        (self.tmp / "audio").mkdir()
        self.splits: dict[str, list[str]] = {"train": [], "test": []}
        self._train_motion: list[np.ndarray] = []
        self._train_valid: list[np.ndarray] = []
        self.stats = {"frames": 0, "speaking": 0, "listening": 0, "actor_frames": 0}
        self.group_sq: dict[str, list[float]] = {g: [] for g in GROUP_NAMES}

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finish()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()

    def add(self, conv: Conversation, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self.splits)}")
        conv.validate()
        if any(conv.id in ids for ids in self.splits.values()):
            raise DatasetFormatError(f"duplicate conversation id {conv.id!r}")
        T = conv.n_frames
        np.savez(
            self.tmp / "conversations" / f"{conv.id}.npz",
            motion=conv.motion.astype(np.float32),
            group_valid=np.asarray(conv.group_valid, dtype=bool),
            has_motion=np.asarray(conv.has_motion, dtype=bool),
            vad=np.asarray(conv.vad, dtype=bool),
        )
        with open(self.tmp / "conversations" / f"{conv.id}.json", "w") as f:
            json.dump({"text": [list(map(str, t)) for t in conv.text], "n_frames": T}, f)
        for s in range(2):
            audio = fit_audio_length(conv.audio[s], T)
            sf.write(self.tmp / "audio" / f"{conv.id}_s{s}.wav", np.clip(audio, -1, 1), SAMPLE_RATE, subtype="PCM_16")
        self.splits[split].append(conv.id)
        vad = np.asarray(conv.vad, dtype=bool)
        for s in range(2):
            if not conv.has_motion[s]:
                continue
            self.stats["actor_frames"] += T
            self.stats["speaking"] += int(vad[s].sum())
            self.stats["listening"] += int((vad[1 - s] & ~vad[s]).sum())
            for gi, g in enumerate(GROUP_NAMES):
                if conv.group_valid[s][gi]:
                    self.group_sq[g].append(float(conv.motion[s][:, channel_mask(np.eye(N_GROUPS, dtype=bool)[gi])].std(0).mean()))
            if split == "train":
                self._train_motion.append(conv.motion[s])
                self._train_valid.append(np.asarray(conv.group_valid[s], dtype=bool))
        self.stats["frames"] += T

    def summary(self) -> dict:
        hours = self.stats["frames"] / FPS / 3600
        af = max(self.stats["actor_frames"], 1)
        return {
            "conversations": sum(len(v) for v in self.splits.values()),
            "train": len(self.splits["train"]),
            "test": len(self.splits["test"]),
            "hours": hours,
            "speaking_share": self.stats["speaking"] / af,
            "listening_share": self.stats["listening"] / af,
            "group_std": {g: (float(np.mean(v)) if v else None) for g, v in self.group_sq.items()},
        }

    def finish(self) -> Path:
        if not self.splits["train"]:
            raise DatasetFormatError("dataset has no training conversation")
        if not self._train_motion:
            raise DatasetFormatError("training split has no side with motion")
        Normalizer.fit(self._train_motion, self._train_valid).save(self.tmp / "normalizer.npz")
        (self.tmp / "splits").mkdir()
        for name, ids in self.splits.items():
            (self.tmp / "splits" / f"{name}.txt").write_text("".join(i + "\n" for i in ids))
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fps": FPS,
            "sample_rate": SAMPLE_RATE,
            "flame_dim": FLAME_DIM,
            "groups": list(GROUP_NAMES),
            "window": WINDOW,
            "source": self.source,
            "summary": self.summary(),
            **self.extra_meta,
        }
        with open(self.tmp / "dataset.json", "w") as f:
            json.dump(meta, f, indent=2)
        # atomic swap: move any old dataset aside, rename the new one in, then delete the old one
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except BaseException:
            if old is not None:
                os.replace(old, self.out)  # put the previous dataset back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# reader


def load_meta(root: str | os.PathLike) -> dict:
    """Read and check ``dataset.json``; clear errors for a missing file or another format."""
    root = Path(root)
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetFormatError(f"{root} is not a canonical dataset: {path} is missing (run train/prepare_data.py)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}: malformed JSON ({e})") from None
    if meta.get("format") != FORMAT_NAME:
        raise DatasetFormatError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise DatasetFormatError(f"{path}: format version {meta.get('version')} but this code reads version {FORMAT_VERSION}")
    if meta.get("flame_dim") != FLAME_DIM or tuple(meta.get("groups", ())) != GROUP_NAMES:
        raise DatasetFormatError(f"{path}: FLAME layout {meta.get('groups')} / {meta.get('flame_dim')} differs from {GROUP_NAMES} / {FLAME_DIM}")
    return meta


def read_split(root: str | os.PathLike, split: str) -> list[str]:
    path = Path(root) / "splits" / f"{split}.txt"
    if not path.is_file():
        raise DatasetFormatError(f"split file {path} is missing")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_conversation(root: str | os.PathLike, cid: str, audio: bool = True) -> Conversation:
    root = Path(root)
    npz = root / "conversations" / f"{cid}.npz"
    try:
        with np.load(npz) as z:
            arrays = {k: z[k] for k in ("motion", "group_valid", "has_motion", "vad")}
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise DatasetFormatError(f"cannot read {npz}: {e}") from e
    text = json.loads((root / "conversations" / f"{cid}.json").read_text())["text"]
    wavs = [read_wav(root / "audio" / f"{cid}_s{s}.wav") for s in range(2)] if audio else [np.zeros(0), np.zeros(0)]
    return Conversation(cid, arrays["motion"], arrays["group_valid"], arrays["has_motion"], arrays["vad"], wavs, text)


def read_wav(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Mono float32 samples of a 16 kHz wav; clear errors for other rates or broken files."""
    try:
        with sf.SoundFile(str(path)) as f:
            if f.samplerate != SAMPLE_RATE:
                raise DatasetFormatError(f"{path}: sample rate {f.samplerate} Hz, expected {SAMPLE_RATE}")
            f.seek(start)
            data = f.read(frames=-1 if stop is None else stop - start, dtype="float32", always_2d=True)
    except DatasetFormatError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DatasetFormatError(f"cannot read audio {path}: {e}") from e
    return data.mean(1) if data.shape[1] > 1 else data[:, 0]


@dataclass(frozen=True)
class WindowIndex:
    conversation: str
    actor: int  # side 0 or 1
    window: int  # k: frames [k * W, (k + 1) * W)


class DyadicWindows:
    """Map-style dataset of fixed-length windows from a canonical dataset, in both roles.

    Each item is a dict of numpy arrays (``W`` = window frames, ``S = W * 640`` samples)::

        actor_motion (W, 67) float32      partner_motion (W, 67) float32
        actor_valid (6,) bool             partner_valid (6,) bool     partner_has_motion () bool
        actor_audio (S,) float32          partner_audio (S,) float32
        actor_vad (W,) bool               partner_vad (W,) bool
        speaking (W,) bool                listening (W,) bool
        text str                          conversation str, actor int, window int

    Motion is raw (not normalised); use :attr:`normalizer` for M -> M'.
    Windows lie on a grid of stride ``window`` so each has exactly one text description.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", window: int = WINDOW, load_audio: bool = True):
        self.root = Path(root)
        self.meta = load_meta(self.root)
        self.window = int(window)
        if self.window <= 0 or self.window % 8:
            raise ValueError(f"window must be a positive multiple of 8 frames, got {window}")
        self.load_audio = load_audio
        self.split = split
        self.ids = read_split(self.root, split)
        self.normalizer = Normalizer.load(self.root / "normalizer.npz")
        self._convs: dict[str, Conversation] = {}
        self.index: list[WindowIndex] = []
        for cid in self.ids:
            conv = load_conversation(self.root, cid, audio=False)
            self._convs[cid] = conv
            n_win = conv.n_frames // self.window
            for actor in range(2):
                if conv.has_motion[actor]:
                    self.index.extend(WindowIndex(cid, actor, k) for k in range(n_win))

    def __len__(self) -> int:
        return len(self.index)

    def conversation(self, cid: str) -> Conversation:
        return self._convs[cid]

    def __getitem__(self, i: int) -> dict:
        ix = self.index[i]
        conv = self._convs[ix.conversation]
        a, p = ix.actor, 1 - ix.actor
        s, e = ix.window * self.window, (ix.window + 1) * self.window
        avad, pvad = conv.vad[a, s:e], conv.vad[p, s:e]
        item = {
            "actor_motion": conv.motion[a, s:e],
            "partner_motion": conv.motion[p, s:e],
            "actor_valid": conv.group_valid[a],
            "partner_valid": conv.group_valid[p] & bool(conv.has_motion[p]),
            "partner_has_motion": np.bool_(conv.has_motion[p]),
            "actor_vad": avad,
            "partner_vad": pvad,
            "speaking": avad.copy(),
            "listening": pvad & ~avad,
            "text": conv.text[a][s // WINDOW] if s // WINDOW < len(conv.text[a]) else "",
            "conversation": ix.conversation,
            "actor": a,
            "window": ix.window,
        }
        if self.load_audio:
            ss, se = s * SAMPLES_PER_FRAME, e * SAMPLES_PER_FRAME
            for role, side in (("actor", a), ("partner", p)):
                wav = read_wav(self.root / "audio" / f"{ix.conversation}_s{side}.wav", ss, se)
                item[f"{role}_audio"] = fit_audio_length(wav, self.window)
        return item
