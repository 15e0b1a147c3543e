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

Besides this layout a dataset folder may hold files the project's own tools add
(:data:`PROJECT_EXTRAS`: the synthetic corpus's labels, ``prepare_data``'s previews) and files a
user adds (notes, plots, ...).

Writes are atomic and never lose a user's file (:class:`DatasetWriter`):

- a dataset is built in a temporary sibling folder ``.<name>.tmp-<pid>@<host>.<hex>`` and renamed
  into place only when complete, so a failed conversion never leaves a half-written dataset;
- an existing folder is replaced only if it is provably this project's dataset (its
  ``dataset.json`` parses and names this format and a supported version) or is empty; anything
  else is refused before any work (:func:`check_output_folder`);
- files a user added to a dataset are carried over into the new one at the same relative path
  (hard link, else copy) and named in a printed note; a user file in the way of a new file is an
  error that leaves the old dataset as it was;
- final files and folders get the user's umask (folders ``0o777 & ~umask``, files ``0o666 & ~umask``);
- killed writers leave nothing behind for good: the next writer removes stale temporaries (writer
  process gone, see ``agents/checkpoint.py``), and the next read or write of a folder repairs a
  swap interrupted between its two renames (:func:`recover_dataset_folder`);
- ``dataset.json`` is strict JSON: a non-finite value is an error naming the file and the key.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from ..agents.checkpoint import (
    TEMP_RE,
    host_tag,
    remove_stale_temps,
    strict_json,
    temp_name,
    writer_is_gone,
    writer_tag,
)
from .flame import FLAME_DIM, FPS, GROUP_NAMES, N_GROUPS, SAMPLE_RATE, channel_group_ids, channel_mask

FORMAT_NAME = "gdpo-listener-dataset"
FORMAT_VERSION = 1
REPLACEABLE_VERSIONS = (1,)  # dataset.json versions a writer may replace (provably this project's output)
# files the project's own tools add to a dataset folder besides the layout above: they belong to
# the dataset and are replaced with it, never carried over as user files
PROJECT_EXTRAS = ("synthetic_labels.json", "preview_speaking.png", "preview_listening.png")
# FLAME parameters are O(1) (radians; unit-variance PCA coefficients): a larger magnitude is a unit
# or tracker error, and values near 1e19 already overflow float32 statistics (squares)
MOTION_ABS_LIMIT = 1e4
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
            s, t, c = np.argwhere(~np.isfinite(m))[0]
            raise DatasetFormatError(f"{where}: motion has NaN/inf (side {s}, frame {t}, channel {c}, "
                                     f"FLAME group {GROUP_NAMES[channel_group_ids()[c]]!r})")
        if (np.abs(m) > MOTION_ABS_LIMIT).any():
            s, t, c = np.argwhere(np.abs(m) > MOTION_ABS_LIMIT)[0]
            raise DatasetFormatError(
                f"{where}: implausible motion value {m[s, t, c]:.3g} (side {s}, frame {t}, channel {c}, FLAME group "
                f"{GROUP_NAMES[channel_group_ids()[c]]!r}) beyond +-{MOTION_ABS_LIMIT:g}: FLAME parameters are O(1); "
                "wrong units or a broken tracker?"
            )
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
# writer: output-folder safety


def dataset_json_problem(root: str | os.PathLike) -> str | None:
    """Why ``root/dataset.json`` does not prove ``root`` is this project's dataset, or None if it does
    (it parses, names :data:`FORMAT_NAME` and a version in :data:`REPLACEABLE_VERSIONS`)."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return "it has no dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"its dataset.json is not valid JSON ({e})"
    if not isinstance(meta, dict):
        return f"its dataset.json holds a {type(meta).__name__}, not an object"
    if meta.get("format") != FORMAT_NAME:
        return f"its dataset.json has format {meta.get('format')!r}, not {FORMAT_NAME!r}"
    if meta.get("version") not in REPLACEABLE_VERSIONS:
        return (f"its dataset.json has format version {meta.get('version')!r}; this code replaces only version "
                + ", ".join(map(str, REPLACEABLE_VERSIONS)))
    return None


def check_output_folder(out: str | os.PathLike, overwrite: bool = True) -> None:
    """Raise :class:`FileExistsError` naming ``out`` and why, unless a dataset may be written there:
    ``out`` is absent, an empty folder, or (with ``overwrite``) provably this project's dataset.
    Call it before any long work; :class:`DatasetWriter` calls it too."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"output folder {out} exists (pass overwrite=True to replace it)")
    if not out.is_dir():
        raise FileExistsError(f"output {out} is not a canonical dataset (it is not a folder); refusing to replace it")
    if not any(out.iterdir()):
        return
    problem = dataset_json_problem(out)
    if problem is not None:
        raise FileExistsError(f"output folder {out} is not a canonical dataset: {problem}; refusing to replace it "
                              "(choose another out= or move its contents away)")


def project_files(root: Path) -> set[str]:
    """Relative paths (files and folders) in dataset ``root`` that this project wrote: the layout's
    files for the conversations listed in its splits, ``dataset.json``'s ``extra_files`` and
    :data:`PROJECT_EXTRAS`."""
    owned = {"dataset.json", "normalizer.npz", "splits", "conversations", "audio", *PROJECT_EXTRAS}
    try:
        owned.update(json.loads((root / "dataset.json").read_text()).get("extra_files", []))
    except (OSError, ValueError, AttributeError):
        pass
    for split in ("train", "test"):
        path = root / "splits" / f"{split}.txt"
        if not path.is_file():
            continue
        owned.add(f"splits/{split}.txt")
        for cid in (line.strip() for line in path.read_text().splitlines()):
            if cid:
                owned.update({f"conversations/{cid}.npz", f"conversations/{cid}.json",
                              f"audio/{cid}_s0.wav", f"audio/{cid}_s1.wav"})
    return owned


def user_files(root: str | os.PathLike) -> list[str]:
    """Sorted relative paths in dataset ``root`` this project did not write (see
    :func:`project_files`): files, symbolic links, and empty folders."""
    root = Path(root)
    owned = project_files(root)
    found = []
    for d, dirs, files in os.walk(root):
        rel_d = Path(d).relative_to(root)
        for name in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            rel = (rel_d / name).as_posix()
            if rel not in owned:
                found.append(rel)
        if not dirs and not files and rel_d != Path(".") and rel_d.as_posix() not in owned:
            found.append(rel_d.as_posix())
    return sorted(found)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` (file, symbolic link or empty folder) at ``dst``: hard link, else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
    else:
        try:
            os.link(src, dst)
        except OSError:  # no hard links on this filesystem
            shutil.copy2(src, dst)


OLD_RE = re.compile(r"^\.(?P<target>.+)\.old-(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9_-]+))?$")


def _old_name(out: Path) -> Path:
    """Where this process moves the previous dataset during the swap: ``.<name>.old-<pid>@<host>``."""
    return out.parent / f".{out.name}.old-{writer_tag()}"


def abandoned_old_datasets(out: Path) -> list[Path]:
    """Previous datasets of ``out`` moved aside by writers that are gone (killed during the swap).
    The name ``.<name>.old-<pid>`` of earlier versions counts as this host's."""
    found = []
    if not out.parent.is_dir():
        return found
    for e in os.scandir(out.parent):
        m = OLD_RE.match(e.name)
        if m and m["target"] == out.name and writer_is_gone(int(m["pid"]), m["host"] or host_tag()):
            found.append(Path(e.path))
    return sorted(found)


def recover_dataset_folder(out: str | os.PathLike) -> None:
    """Repair what a writer killed during its swap left at ``out`` (called on every read or write).

    Killed between its two renames, the writer left ``out`` missing and the previous dataset under
    ``.<name>.old-<pid>@<host>``: it is renamed back to ``out``. Killed after them, it left the
    previous dataset beside a complete ``out``: it is removed. Entries of live writers are never
    touched; with ``out`` present but not a complete dataset nothing is removed.
    """
    out = Path(out)
    olds = abandoned_old_datasets(out)
    if not olds:
        return
    if not out.exists() and not out.is_symlink():
        if len(olds) > 1:
            raise DatasetFormatError(f"{out} is missing and killed writers left several previous datasets: "
                                     f"{', '.join(map(str, olds))}; rename the one to keep to {out}")
        try:
            os.replace(olds[0], out)
        except OSError as e:
            raise DatasetFormatError(f"{out} is missing; its previous dataset is at {olds[0]} but cannot be "
                                     f"restored ({e}); rename it to {out}") from e
        print(f"[dataset] restored {out} from {olds[0].name} (a writer was killed while replacing it)", flush=True)
    elif dataset_json_problem(out) is None:
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)


class DatasetWriter:
    """Write a canonical dataset atomically, never losing a user's file.

    >>> with DatasetWriter(out, source="synthetic") as w:
    ...     w.add(conv, split="train")

    On success (leaving the ``with`` block) the folder is fitted with the normaliser, the files a
    user added to the previous dataset at ``out`` are carried over (:attr:`kept_user_files`, named
    in a printed note), and the folder is renamed into ``out``; on an exception the temporary
    folder is removed and ``out`` is untouched. ``out`` must be absent, empty or this project's
    dataset (:func:`check_output_folder`); a symbolic link is followed (the link keeps working).
    Files a client puts into :attr:`tmp` besides the layout (e.g. ``synthetic_labels.json``) are
    listed in ``dataset.json`` as ``extra_files`` and belong to the dataset.
    """

    def __init__(self, out: str | os.PathLike, source: str, overwrite: bool = True, extra_meta: dict | None = None):
        out = Path(out)
        self.out = Path(os.path.realpath(out)) if out.is_symlink() else out
        self.source = source
        self.overwrite = overwrite
        self.extra_meta = dict(extra_meta or {})
        recover_dataset_folder(self.out)
        check_output_folder(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.out.parent, self.out.name)
        self._note_legacy_temps()
        self.tmp = self.out.parent / temp_name(self.out.name)
        self.tmp.mkdir()  # mode 0o777 & ~umask, like every folder inside
        (self.tmp / "conversations").mkdir()
        (self.tmp / "audio").mkdir()
        self.splits: dict[str, list[str]] = {"train": [], "test": []}
        self.kept_user_files: list[str] = []
        self._train_motion: list[np.ndarray] = []
        self._train_valid: list[np.ndarray] = []
        self.stats = {"frames": 0, "speaking": 0, "listening": 0, "actor_frames": 0}
        self.group_sq: dict[str, list[float]] = {g: [] for g in GROUP_NAMES}

    def _note_legacy_temps(self) -> None:
        """Temporaries of earlier versions (``.<name>.tmp-XXXXXXXX``) carry no writer id: they may
        belong to a running conversion, so they are named, not removed."""
        legacy = re.compile(rf"^\.{re.escape(self.out.name)}\.tmp-[a-z0-9_]{{8}}$")
        for p in sorted(self.out.parent.iterdir()):
            if legacy.match(p.name) and not TEMP_RE.match(p.name):
                print(f"[dataset] note: {p} is a temporary folder of an earlier version of this writer; "
                      "delete it if no conversion to it is running", flush=True)

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
        doc_path = self.tmp / "conversations" / f"{conv.id}.json"
        doc_path.write_text(strict_json({"text": [list(map(str, t)) for t in conv.text], "n_frames": T}, doc_path))
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
            m64 = conv.motion[s].astype(np.float64)  # (T, 67): float32 squares overflow for |x| > 1.8e19
            for gi, g in enumerate(GROUP_NAMES):
                if conv.group_valid[s][gi]:
                    self.group_sq[g].append(float(m64[:, channel_mask(np.eye(N_GROUPS, dtype=bool)[gi])].std(0).mean()))
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
            "extra_files": user_files(self.tmp),  # what the client added to tmp (before the user files come in)
            **self.extra_meta,
        }
        try:
            text = strict_json(meta, self.out / "dataset.json", indent=2)
        except ValueError as e:
            raise DatasetFormatError(str(e)) from None
        (self.tmp / "dataset.json").write_text(text)
        check_output_folder(self.out, self.overwrite)  # still ours to replace (nobody put something else there)
        self.kept_user_files = self._carry_over_user_files()
        self._swap()
        if self.kept_user_files:
            print(f"[dataset] kept {len(self.kept_user_files)} file(s) you added to {self.out} (carried over from "
                  "the previous dataset): " + ", ".join(self.kept_user_files), flush=True)
        return self.out

    def _carry_over_user_files(self) -> list[str]:
        """Put the previous dataset's user files (:func:`user_files`) into the new one, same paths."""
        if not self.out.is_dir():
            return []
        kept = user_files(self.out)
        clash = [r for r in kept if (self.tmp / r).exists() or (self.tmp / r).is_symlink()]
        if clash:
            raise DatasetFormatError(
                f"{self.out / clash[0]}: this file was added to the dataset by hand and the new dataset has a file "
                f"of that name; move it out of {self.out} and run again (the dataset was left as it was)"
            )
        for rel in kept:
            _link_or_copy(self.out / rel, self.tmp / rel)
        return kept

    def _swap(self) -> None:
        """Move the previous dataset aside, rename the new one in, delete the previous one.
        A kill between the renames is repaired by :func:`recover_dataset_folder`."""
        old = None
        if self.out.exists():
            old = _old_name(self.out)
            if old.exists():  # this process's own leftover, if a cleanup ever failed
                shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except BaseException:
            if old is not None:
                os.replace(old, self.out)  # put the previous dataset back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# reader


def load_dataset_meta(root: str | os.PathLike) -> dict:
    """Read and check a dataset's ``dataset.json``; clear errors for a missing file or another format.
    First repairs a swap a killed writer left unfinished (:func:`recover_dataset_folder`).
    Not a checkpoint's ``meta.json``: that is :func:`gdpo_listener.agents.checkpoint.load_checkpoint_meta`."""
    root = Path(root)
    recover_dataset_folder(root)
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
        raise DatasetFormatError(f"{path}: FLAME layout {meta.get('groups')} / {meta.get('flame_dim')} differs from "
                                 f"{GROUP_NAMES} / {FLAME_DIM}")
    return meta


def _recover_if_missing(root: Path) -> None:
    """Readers that skip :func:`load_dataset_meta` repair a missing dataset folder (cheap when present)."""
    if not root.exists():
        recover_dataset_folder(root)


def read_split(root: str | os.PathLike, split: str) -> list[str]:
    _recover_if_missing(Path(root))
    path = Path(root) / "splits" / f"{split}.txt"
    if not path.is_file():
        raise DatasetFormatError(f"split file {path} is missing")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_conversation(root: str | os.PathLike, cid: str, audio: bool = True) -> Conversation:
    root = Path(root)
    _recover_if_missing(root)
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
        self.meta = load_dataset_meta(self.root)
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
