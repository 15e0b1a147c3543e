"""Seamless Interaction (+ per-frame FLAME from a face tracker) -> canonical dataset.

Input layout (one folder, or ``train/`` and optional ``test/`` sub-folders)::

    INPUT/
      <interaction>_<participant>.wav    that participant's audio (any rate -> 16 kHz, stereo -> mono)
      <interaction>_<participant>.json   {"metadata:vad": [{"start": s, "end": e}, ...], ...}
      <interaction>_<participant>.npz    tracker FLAME at ``fps`` (default 30) frames per second

- The participant is the part after the *last* underscore, so Seamless names such as
  ``V00_S0809_I00000582_P0947`` give interaction ``V00_S0809_I00000582``, participant ``P0947``.
  The two participants of an interaction form one conversation (id = interaction); sides are
  the participants in sorted order. An interaction with other than two participants is skipped
  with a warning. Other file types (``.mp4`` ...) are ignored.
- ``.npz`` keys (all ``(T, C)`` float, same T; first alias found wins):

  ==========  ================================  ====  ==============================
  group       key (aliases)                     C     note
  ==========  ================================  ====  ==============================
  expr        ``expr`` (``exp``)                >=50  first 50 coefficients kept
  jaw         ``jaw_pose`` (``jaw``)            3     axis-angle
  neck        ``neck_pose``                     3     axis-angle
  eyelid      ``eyelids`` (``eyelid``)          2     left, right
  eyepose     ``eye_l_pose`` + ``eye_r_pose``   3+3   -> channels 58:61 left, 61:64 right
  rot         ``global_rot`` (``global_pose``,  3     global head rotation, axis-angle
              ``rotation``, ``head_rot``)
  ==========  ================================  ====  ==============================

  An optional scalar ``fps`` key overrides the ``fps`` option for that file. All six groups are
  required by default; pass ``required_groups`` (e.g. ``("expr", "jaw", "rot")``) to accept
  trackers without some of them: absent groups are then stored as zeros and marked invalid.
  A participant with a ``.wav`` but no ``.npz`` is an audio-only partner (``has_motion`` False).
- Motion is resampled ``fps`` -> 25 fps with ``scipy.signal.resample_poly`` (30 -> 25: up 5,
  down 6, anti-aliased, linear end padding), then smoothed with ``scipy.signal.savgol_filter``
  along time (``smooth_window=5`` frames at 25 fps = 0.2 s, ``smooth_order=2``; window <= 1
  disables smoothing).
- VAD (``vad="json"``, default): the ``metadata:vad`` intervals (seconds from the start of the
  recording), rasterised to 25 fps frames by frame centre. ``vad="silero"``/``"energy"``
  computes it from the audio instead (the json is then optional).
- Text (optional): the json key ``text_key`` (default ``"text"``) holds either a list of strings,
  one per 200-frame (8 s) window, or a list of segments ``{"start", "end", "text"}`` in seconds
  (``start_ts``/``end_ts`` and ``annotation`` are accepted too, so
  ``text_key="annotations:3P-IS"``-style annotations work); a window's text joins, in time order,
  the segments overlapping it. No key -> ``""``. Strings past the last window are dropped.
- Audio and motion of a participant, and the two participants' motion, must last the same time
  within ``tolerance_frames`` 25 fps frames; the conversation is cut to the shorter motion.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..dataset import WINDOW, Conversation, fit_audio_length
from ..flame import FLAME_DIM, FPS, GROUP_NAMES, N_GROUPS, assemble, group_index
from .common import (
    Candidate,
    ConversionError,
    check_duration,
    check_input_dir,
    common_length,
    intervals_to_frames,
    motion_array,
    n_windows,
    open_npz,
    read_audio,
    read_json,
    resample_frames,
    smooth_frames,
    split_folders,
    write_conversations,
)
from .vad import VAD_METHODS, vad_frames

SOURCE_FPS = 30.0
# group -> [(aliases, channels)] in channel order within the group
KEYS: dict[str, list[tuple[tuple[str, ...], int]]] = {
    "expr": [(("expr", "exp"), 50)],
    "jaw": [(("jaw_pose", "jaw"), 3)],
    "neck": [(("neck_pose",), 3)],
    "eyelid": [(("eyelids", "eyelid"), 2)],
    "eyepose": [(("eye_l_pose",), 3), (("eye_r_pose",), 3)],
    "rot": [(("global_rot", "global_pose", "rotation", "head_rot"), 3)],
}
VAD_KEY = "metadata:vad"
SEAMLESS_VAD = ("json",) + VAD_METHODS


def scan_seamless(folder: Path) -> dict[str, dict[str, dict[str, Path]]]:
    """``{interaction: {participant: {"wav"|"json"|"npz": path}}}`` for files directly in ``folder``."""
    found: dict[str, dict[str, dict[str, Path]]] = {}
    for p in sorted(folder.iterdir()):
        ext = p.suffix.lower().lstrip(".")
        if ext not in ("wav", "json", "npz") or not p.is_file() or "_" not in p.stem:
            continue
        interaction, participant = p.stem.rsplit("_", 1)
        if interaction and participant:
            found.setdefault(interaction, {}).setdefault(participant, {})[ext] = p
    return found


def load_tracker(npz: Path, required_groups: Sequence[str], fps: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``(motion (T, 67) at the source rate, group_valid (6,), source fps)`` of one tracker file."""
    arrays = open_npz(npz)
    parts: dict[str, np.ndarray] = {}
    for group, pieces in KEYS.items():
        if not all(any(k in arrays for k in aliases) for aliases, _ in pieces):
            if group in required_groups:
                missing = " + ".join("/".join(a) for a, _ in pieces)
                raise ConversionError(npz, f"missing key {missing!r} for required FLAME group {group!r} "
                                           f"(keys present: {sorted(arrays)})")
            continue
        cols = []
        for aliases, width in pieces:
            if group == "expr":
                cols.append(motion_array(npz, arrays, aliases, min_width=width, groups=group)[:, :width])
            else:
                cols.append(motion_array(npz, arrays, aliases, width=width, groups=group))
        parts[group] = np.concatenate(cols, axis=1)
    if not parts:
        raise ConversionError(npz, f"no FLAME keys found (keys present: {sorted(arrays)})")
    lengths = {g: a.shape[0] for g, a in parts.items()}
    if len(set(lengths.values())) > 1:
        raise ConversionError(npz, f"keys have different numbers of frames: {lengths}")
    if "fps" in arrays:
        try:
            fps = float(np.asarray(arrays["fps"]).reshape(()))
        except (TypeError, ValueError) as e:
            raise ConversionError(npz, f"'fps' must be a scalar number, got {arrays['fps']!r}") from e
    if not (math.isfinite(fps) and fps > 0):
        raise ConversionError(npz, f"invalid frame rate {fps}")
    T = next(iter(lengths.values()))
    motion, valid = assemble(parts, T)
    return motion, valid, fps


def read_vad_intervals(path: Path, data: dict) -> list[tuple[float, float]]:
    if VAD_KEY not in data:
        raise ConversionError(path, f"missing {VAD_KEY!r} (list of {{start, end}} in seconds)")
    items = data[VAD_KEY]
    if not isinstance(items, list):
        raise ConversionError(path, f"{VAD_KEY!r} must be a list, got {type(items).__name__}")
    out = []
    for i, it in enumerate(items):
        try:
            a, b = float(it["start"]), float(it["end"])
        except (TypeError, KeyError, ValueError):
            raise ConversionError(path, f"{VAD_KEY}[{i}] must be {{'start': seconds, 'end': seconds}}, "
                                        f"got {it!r}") from None
        if not (math.isfinite(a) and math.isfinite(b)) or b < a:
            raise ConversionError(path, f"{VAD_KEY}[{i}] is not a valid interval: start {a}, end {b}")
        out.append((a, b))
    return out


def read_window_text(path: Path, data: dict, key: str, n_frames: int) -> list[str]:
    """One string per 200-frame window from ``data[key]`` (see the module docstring)."""
    n_win = n_windows(n_frames)
    items = data.get(key)
    if items is None:
        return [""] * n_win
    if not isinstance(items, list):
        raise ConversionError(path, f"{key!r} must be a list of strings or of {{start, end, text}} segments")
    if all(isinstance(t, str) for t in items):
        return (list(items) + [""] * n_win)[:n_win]
    win_s = WINDOW / FPS
    texts: list[list[tuple[float, str]]] = [[] for _ in range(n_win)]
    for i, seg in enumerate(items):
        try:
            a = float(seg["start"] if "start" in seg else seg["start_ts"])
            b = float(seg["end"] if "end" in seg else seg["end_ts"])
            txt = seg["text"] if "text" in seg else seg["annotation"]
        except (TypeError, KeyError, ValueError):
            raise ConversionError(path, f"{key}[{i}] must be a string or {{start, end, text}}, got {seg!r}") from None
        if not isinstance(txt, str) or not (math.isfinite(a) and math.isfinite(b)) or b < a:
            raise ConversionError(path, f"{key}[{i}] is not a valid text segment: {seg!r}")
        for k in range(max(0, int(a // win_s)), min(n_win, math.ceil(b / win_s))):
            if a < (k + 1) * win_s and b > k * win_s and txt.strip():
                texts[k].append((a, txt.strip()))
    return [" ".join(t for _, t in sorted(w, key=lambda x: x[0])) for w in texts]


def build_seamless_conversation(
    interaction: str,
    participants: dict[str, dict[str, Path]],
    folder: Path,
    *,
    fps: float = SOURCE_FPS,
    smooth_window: int = 5,
    smooth_order: int = 2,
    vad: str = "json",
    vad_threshold: float = 0.5,
    text_key: str = "text",
    required_groups: Sequence[str] = GROUP_NAMES,
    tolerance_frames: int = 2,
) -> Conversation:
    if len(participants) != 2:
        raise ConversionError(folder / f"{interaction}_*", f"interaction has {len(participants)} participant(s) "
                                                           f"({', '.join(sorted(participants))}); exactly 2 required")
    sides = [participants[p] for p in sorted(participants)]
    for pid, files in zip(sorted(participants), sides):
        if "wav" not in files:
            raise ConversionError(next(iter(files.values())), f"missing audio file {interaction}_{pid}.wav")
        if vad == "json" and "json" not in files:
            raise ConversionError(files["wav"], f"missing {interaction}_{pid}.json with {VAD_KEY!r} "
                                                "(or use vad=silero)")
    npz_paths = {s: f["npz"] for s, f in enumerate(sides) if "npz" in f}
    if not npz_paths:
        raise ConversionError(sides[0]["wav"], f"neither participant of {interaction!r} has a tracker file (.npz)")

    tracks = {}
    for s, p in npz_paths.items():
        m, v, src_fps = load_tracker(p, required_groups, fps)
        m = smooth_frames(resample_frames(m, src_fps, FPS), smooth_window, smooth_order)  # (T25, 67)
        tracks[s] = (m, v)
    T = common_length(list(npz_paths.values()), [m.shape[0] for m, _ in tracks.values()], tolerance_frames)
    ref_npz = next(iter(npz_paths.values()))

    motion = np.zeros((2, T, FLAME_DIM), dtype=np.float32)
    group_valid = np.zeros((2, N_GROUPS), dtype=bool)
    has_motion = np.zeros(2, dtype=bool)
    audio, vads, text = [], [], []
    for s, files in enumerate(sides):
        if s in tracks:
            m, v = tracks[s]
            motion[s], group_valid[s], has_motion[s] = m[:T], v, True
        wav = read_audio(files["wav"])
        check_duration(files["wav"], wav.shape[0], npz_paths.get(s, ref_npz), T, tolerance_frames)
        wav = fit_audio_length(wav, T)
        audio.append(wav)
        meta = read_json(files["json"]) if "json" in files else {}
        if vad == "json":
            vads.append(intervals_to_frames(read_vad_intervals(files["json"], meta), T))
        else:
            vads.append(vad_frames(wav, T, method=vad, threshold=vad_threshold))
        text.append(read_window_text(files.get("json", files["wav"]), meta, text_key, T))
    return Conversation(interaction, motion, group_valid, has_motion, np.stack(vads), audio, text)


def convert_seamless(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    test_fraction: float = 0.1,
    fps: float = SOURCE_FPS,
    smooth_window: int = 5,
    smooth_order: int = 2,
    vad: str = "json",
    vad_threshold: float = 0.5,
    text_key: str = "text",
    required_groups: Sequence[str] = GROUP_NAMES,
    tolerance_frames: int = 2,
    strict: bool = False,
    overwrite: bool = True,
    verbose: bool = True,
) -> dict:
    """Convert a Seamless Interaction folder (layout in the module docstring) into a canonical
    dataset at ``out_dir``. Options as documented there; ``strict`` raises on the first bad
    interaction instead of warning and skipping it. Returns the writer summary plus ``skipped``
    = ``[(file, reason)]`` and ``out``; :class:`ConversionError` for a missing/empty input or when
    nothing valid remains (the output folder is then left as it was)."""
    if vad not in SEAMLESS_VAD:
        raise ValueError(f"unknown vad {vad!r} for Seamless; valid: {', '.join(SEAMLESS_VAD)}")
    required_groups = tuple(required_groups)
    for g in required_groups:
        group_index(g)  # KeyError listing the valid names
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    inp, out = check_input_dir(input_dir, out_dir)
    opts = dict(fps=fps, smooth_window=smooth_window, smooth_order=smooth_order, vad=vad, vad_threshold=vad_threshold,
                text_key=text_key, required_groups=required_groups, tolerance_frames=tolerance_frames)
    candidates: list[Candidate] = []
    for folder, split in split_folders(inp):
        for interaction, parts in scan_seamless(folder).items():
            def load(interaction=interaction, parts=parts, folder=folder):
                return build_seamless_conversation(interaction, parts, folder, **opts)

            files = sorted(p for f in parts.values() for p in f.values())
            candidates.append(Candidate(interaction, files, load, split))
    if not candidates:
        raise ConversionError(inp, "no Seamless files found (expected <interaction>_<participant>.wav/.json/.npz, "
                                   "optionally in train/ and test/)")
    options = {**opts, "required_groups": list(required_groups), "test_fraction": test_fraction}
    return write_conversations("seamless", inp, out, candidates, test_fraction=test_fraction, strict=strict,
                               overwrite=overwrite, verbose=verbose, options=options)
