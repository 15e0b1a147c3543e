"""Helpers shared by the source converters: checked file readers, time-axis tools, the split rule
and the conversion driver that streams conversations into a :class:`~..dataset.DatasetWriter`.

Error policy (every converter follows it):

- a problem with one conversation's files raises :class:`ConversionError` whose message starts
  with the offending file; the driver turns it into a :class:`ConversionWarning`, skips that
  conversation and records ``(file, reason)`` in ``summary["skipped"]`` (``strict=True`` raises
  instead);
- a problem with the input as a whole (missing or empty folder, nothing valid left) raises
  :class:`ConversionError`;
- any exception propagates through the writer's ``with`` block, so the temporary output is
  removed and an existing dataset at ``out`` is left untouched.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from ..dataset import (
    DURATION_TOLERANCE_FRAMES,
    MOTION_ABS_LIMIT,
    SAMPLES_PER_FRAME,
    WINDOW,
    Conversation,
    DatasetFormatError,
    DatasetWriter,
)
from ..flame import FPS, SAMPLE_RATE


class ConversionError(DatasetFormatError):
    """Bad converter input. ``file`` names the offending file or folder, ``reason`` says why."""

    def __init__(self, file: str | os.PathLike, reason: str):
        self.file = str(file)
        self.reason = reason
        super().__init__(f"{self.file}: {reason}")


class ConversionWarning(UserWarning):
    """One conversation was skipped; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------
# checked readers


def read_audio(path: str | os.PathLike) -> np.ndarray:
    """Mono float32 samples at 16 kHz from any sound file soundfile can read.

    Stereo is averaged to mono; another sample rate is resampled to 16 kHz with
    ``scipy.signal.resample_poly`` (polyphase, anti-aliased). More than two channels, an empty or
    unreadable file and NaN/inf samples raise :class:`ConversionError` naming the file.
    """
    path = Path(path)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (S, C)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types; re-raised with the file
        raise ConversionError(path, f"cannot read audio ({e})") from e
    if data.shape[1] > 2:
        raise ConversionError(path, f"audio has {data.shape[1]} channels, expected mono or stereo")
    if data.shape[0] == 0:
        raise ConversionError(path, "audio file is empty")
    if not np.isfinite(data).all():
        raise ConversionError(path, "audio has NaN/inf samples")
    wav = data.mean(1) if data.shape[1] == 2 else data[:, 0]
    if sr != SAMPLE_RATE:
        g = math.gcd(int(sr), SAMPLE_RATE)
        wav = resample_poly(wav, SAMPLE_RATE // g, int(sr) // g)
    return np.ascontiguousarray(wav, dtype=np.float32)


def open_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file, fully read; a corrupt or truncated file raises
    :class:`ConversionError` naming it. Pickled object arrays are refused."""
    path = Path(path)
    try:
        with np.load(str(path), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zipfile / numpy raise several types
        raise ConversionError(path, f"cannot read npz ({type(e).__name__}: {e})") from e


def motion_array(path: str | os.PathLike, arrays: dict, key: str | Sequence[str], width: int | None = None,
                 min_width: int | None = None, groups: str | Mapping[str, slice] | None = None) -> np.ndarray:
    """``(T, C)`` float32 array stored under ``key`` (or the first present of several aliases).

    Checks: present, numeric, 2-d, ``C == width`` (or ``C >= min_width``), ``T >= 1``, and after the
    float32 cast every value finite and within ``+-MOTION_ABS_LIMIT`` (:func:`check_motion_values`).
    ``groups``: the FLAME group the columns hold, or ``{group: column slice}`` when the key holds
    several (DualTalk ``pose``), so an error names the group.
    """
    keys = [key] if isinstance(key, str) else list(key)
    name = next((k for k in keys if k in arrays), None)
    if name is None:
        want = keys[0] if len(keys) == 1 else " / ".join(keys)
        raise ConversionError(path, f"missing key {want!r} (keys present: {sorted(arrays)})")
    arr = arrays[name]
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ConversionError(path, f"{name!r} has non-numeric dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ConversionError(path, f"{name!r} must be 2-d (T, C), got shape {arr.shape}")
    if width is not None and arr.shape[1] != width:
        raise ConversionError(path, f"{name!r} must have {width} channels, got shape {arr.shape}")
    if min_width is not None and arr.shape[1] < min_width:
        raise ConversionError(path, f"{name!r} must have at least {min_width} channels, got shape {arr.shape}")
    if arr.shape[0] < 1:
        raise ConversionError(path, f"{name!r} has no frames")
    with np.errstate(over="ignore"):  # values beyond float32's range become inf, refused just below
        arr = arr.astype(np.float32)
    if isinstance(groups, str):
        groups = {groups: slice(0, arr.shape[1])}
    check_motion_values(path, name, arr, groups or {})
    return arr


def check_motion_values(path: str | os.PathLike, name: str, arr: np.ndarray, groups: Mapping[str, slice]) -> None:
    """Refuse NaN/inf (also float64 values that overflow float32) and magnitudes beyond
    ``MOTION_ABS_LIMIT`` in ``arr`` ``(T, C)`` float32: :class:`ConversionError` naming the file,
    the key, the first bad frame and channel and its FLAME group (from ``groups``)."""
    nonfinite = ~np.isfinite(arr)  # (T, C)
    bad = nonfinite | (np.abs(np.where(nonfinite, 0, arr)) > MOTION_ABS_LIMIT)
    if not bad.any():
        return
    t, c = np.argwhere(bad)[0]
    group = next((g for g, sl in groups.items() if sl.start <= c < sl.stop), None)
    at = f"first at frame {t}, channel {c}" + (f", FLAME group {group!r}" if group is not None else "")
    if nonfinite[t, c]:
        raise ConversionError(path, f"{name!r} has NaN/inf values after the float32 cast ({at})")
    raise ConversionError(path, f"{name!r} has an implausible value {arr[t, c]:.3g} ({at}): FLAME parameters are "
                                f"O(1) and the limit is +-{MOTION_ABS_LIMIT:g}; wrong units or a broken tracker?")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001
        raise ConversionError(path, f"cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConversionError(path, f"top level must be a JSON object, got {type(data).__name__}")
    return data


def check_duration(audio_path, n_samples: int, motion_path, n_frames: int,
                   tolerance: int = DURATION_TOLERANCE_FRAMES) -> None:
    """Audio and motion of one side must last the same time within ``tolerance`` 25 fps frames."""
    audio_frames = n_samples / SAMPLES_PER_FRAME
    if abs(audio_frames - n_frames) > tolerance:
        raise ConversionError(
            audio_path,
            f"audio lasts {n_samples / SAMPLE_RATE:.2f} s ({audio_frames:.1f} frames at {FPS} fps) but motion "
            f"{Path(motion_path).name} lasts {n_frames / FPS:.2f} s ({n_frames} frames); the mismatch exceeds "
            f"{tolerance} frames",
        )


def common_length(paths: Sequence, lengths: Sequence[int], tolerance: int = DURATION_TOLERANCE_FRAMES) -> int:
    """Shortest of the per-side motion lengths; error naming the files if they differ by more than
    ``tolerance`` frames."""
    if max(lengths) - min(lengths) > tolerance:
        desc = ", ".join(f"{Path(p).name}: {n}" for p, n in zip(paths, lengths))
        raise ConversionError(paths[0], f"the two sides' motion lengths differ by more than {tolerance} frames "
                                        f"({desc})")
    return int(min(lengths))


# ----------------------------------------------------------------------------------------------
# time axis


def fit_frames(x: np.ndarray, n_frames: int) -> np.ndarray:
    """Trim or edge-pad ``(T, ...)`` to ``n_frames`` along axis 0 (used only within the tolerance)."""
    if x.shape[0] >= n_frames:
        return x[:n_frames]
    pad = [(0, n_frames - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, pad, mode="edge")


def resample_frames(x: np.ndarray, src_fps: float, dst_fps: float = FPS) -> np.ndarray:
    """Resample ``(T, C)`` motion from ``src_fps`` to ``dst_fps`` along time.

    ``scipy.signal.resample_poly`` with the exact rational ratio (30 -> 25 fps: up 5, down 6),
    anti-aliasing FIR, and ``padtype="line"`` so the ends are extrapolated linearly instead of
    being pulled towards zero. Output length ``ceil(T * dst / src)``. Axis-angle channels are
    resampled per component (fine for the small, non-wrapping head/jaw/eye rotations).
    """
    ratio = Fraction(dst_fps / src_fps).limit_denominator(1000)
    if ratio == 1:
        return x.astype(np.float32)
    if x.shape[0] < 2:
        n = max(1, math.ceil(x.shape[0] * ratio))
        return np.repeat(x, n, axis=0)[:n].astype(np.float32)
    x = x.astype(np.float64)
    # resample around the mean so constants stay exact (the FIR's DC gain per phase is 1 +- 3e-4)
    mean = x.mean(0, keepdims=True)  # (1, C)
    y = resample_poly(x - mean, ratio.numerator, ratio.denominator, axis=0, padtype="line") + mean
    return y.astype(np.float32)


def smooth_frames(x: np.ndarray, window: int = 5, order: int = 2) -> np.ndarray:
    """Savitzky-Golay smoothing of ``(T, C)`` along time (``scipy.signal.savgol_filter``,
    ``mode="interp"``). ``window`` in frames (odd; an even value is rounded up), ``window <= 1``
    disables it; shortened automatically for clips shorter than the window."""
    from scipy.signal import savgol_filter

    if window <= 1:
        return x
    if order < 0:
        raise ValueError(f"smoothing order must be >= 0, got {order}")
    window = window + 1 - window % 2
    T = x.shape[0]
    if T < window:
        window = T - 1 + T % 2  # largest odd <= T
    if window <= order:
        return x
    return savgol_filter(x.astype(np.float64), window, order, axis=0, mode="interp").astype(np.float32)


def intervals_to_frames(intervals: Iterable[tuple[float, float]], n_frames: int, fps: float = FPS) -> np.ndarray:
    """Rasterise ``[start, end)`` second intervals to ``(n_frames,)`` bool.

    Frame ``k`` covers ``[k / fps, (k + 1) / fps)`` and is set when its centre ``(k + 0.5) / fps``
    lies inside an interval; parts outside ``[0, n_frames / fps)`` are ignored.
    """
    out = np.zeros(n_frames, dtype=bool)
    for start, end in intervals:
        a = max(0, math.ceil(round(start * fps - 0.5, 9)))
        b = min(n_frames, math.ceil(round(end * fps - 0.5, 9)))
        if b > a:
            out[a:b] = True
    return out


def n_windows(n_frames: int) -> int:
    return max(1, math.ceil(n_frames / WINDOW))


# ----------------------------------------------------------------------------------------------
# split rule and conversion driver


def hash_fraction(cid: str) -> float:
    """A stable number in [0, 1) from a conversation id (SHA-1, independent of Python's hash seed)."""
    return int(hashlib.sha1(cid.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def hash_split(cid: str, test_fraction: float) -> str:
    return "test" if hash_fraction(cid) < test_fraction else "train"


@dataclass
class Candidate:
    """One conversation found in the input: ``load()`` builds it or raises :class:`ConversionError`."""

    id: str
    files: list[Path]
    load: Callable[[], Conversation]
    split: str | None = None  # "train" / "test" from sub-folders; None = hash split


def check_input_dir(input_dir: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    inp, out = Path(input_dir), Path(out_dir)
    if not inp.exists():
        raise ConversionError(inp, "input folder does not exist")
    if not inp.is_dir():
        raise ConversionError(inp, "input is not a folder")
    ri, ro = inp.resolve(), out.resolve()
    if ro == ri or ro in ri.parents:
        raise ConversionError(out, f"output folder must not be the input folder {inp} or contain it")
    return inp, out


def split_folders(inp: Path) -> list[tuple[Path, str | None]]:
    """``[(folder, split)]`` to scan: ``train/`` and ``test/`` sub-folders if the input has them
    (split taken from the folder; ``test/`` optional), else the input folder itself (split None =
    hash split)."""
    train, test = inp / "train", inp / "test"
    if train.is_dir():
        return [(train, "train")] + ([(test, "test")] if test.is_dir() else [])
    if test.is_dir():
        raise ConversionError(inp, "has a test/ sub-folder but no train/ sub-folder")
    return [(inp, None)]


def write_conversations(
    source: str,
    input_dir: Path,
    out_dir: Path,
    candidates: Sequence[Candidate],
    *,
    test_fraction: float = 0.1,
    strict: bool = False,
    overwrite: bool = True,
    verbose: bool = True,
    options: dict | None = None,
) -> dict:
    """Build every candidate and write the valid ones atomically to ``out_dir``.

    Split: the candidate's own split if set (input sub-folders), otherwise ``hash_split`` of its
    id. Train candidates are written first; with the hash split, if none of them is valid, the
    first valid test candidate goes to train so the dataset always has a training conversation
    (with sub-folders an empty ``train/`` is an error).

    Returns the writer's summary plus ``skipped``: a list of ``(file, reason)``.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    if not candidates:
        raise ConversionError(input_dir, "no conversations found")
    planned = [(c, c.split or hash_split(c.id, test_fraction)) for c in sorted(candidates, key=lambda c: c.id)]
    planned.sort(key=lambda cs: cs[1] != "train")  # stable: train first, ids sorted within a split
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    meta = {"converter": {"source": source, "input": str(input_dir), **(options or {})}}
    with DatasetWriter(out_dir, source=source, overwrite=overwrite, extra_meta=meta) as w:
        for cand, split in planned:
            try:
                if cand.id in seen:
                    raise ConversionError(cand.files[0], f"duplicate conversation id {cand.id!r}")
                conv = cand.load()
                conv.validate()
            except DatasetFormatError as e:  # ConversionError included
                if strict:
                    raise
                file = e.file if isinstance(e, ConversionError) else str(cand.files[0])
                reason = e.reason if isinstance(e, ConversionError) else str(e)
                warnings.warn(f"{file}: {reason}; conversation {cand.id!r} skipped", ConversionWarning, stacklevel=2)
                skipped.append((file, reason))
                continue
            seen.add(cand.id)
            if split == "test" and cand.split is None and not w.splits["train"]:
                split = "train"  # hash split: keep at least one training conversation
            w.add(conv, split)
        if not w.splits["train"]:
            what = "no valid conversation left" if not w.splits["test"] else "no valid conversation in train/"
            if skipped:
                what += f" ({len(skipped)} skipped: " + "; ".join(f"{f}: {r}" for f, r in skipped[:5])
                what += " ...)" if len(skipped) > 5 else ")"
            raise ConversionError(input_dir, what)
        w.extra_meta["converter"]["skipped"] = [list(s) for s in skipped]
        summary = w.summary()
    summary["skipped"] = skipped
    summary["out"] = str(out_dir)
    if verbose:
        print(
            f"[{source}] wrote {summary['conversations']} conversations ({summary['train']} train, "
            f"{summary['test']} test, {summary['hours']:.2f} h) to {out_dir}; skipped {len(skipped)} file(s)"
            + "".join(f"\n  skipped {f}: {r}" for f, r in skipped),
            flush=True,
        )
    return summary
