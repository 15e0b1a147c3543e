"""DualTalk -> canonical dataset.

Input layout (25 fps FLAME, one folder)::

    INPUT/                        or   INPUT/train/...  INPUT/test/...  (split from the folder)
      <id>_speaker1.npz           exp (T, 50), pose (T, 6); shape, tex, cam, light ignored
      <id>_speaker1.wav           speaker 1 audio (16 kHz mono float32; other rates resampled,
      <id>_speaker2.npz           stereo averaged)
      <id>_speaker2.wav

- ``speaker1`` -> side 0, ``speaker2`` -> side 1; files not matching the names above are ignored.
- FLAME groups: ``exp`` -> ``expr`` (channels 0:50), ``pose[:, :3]`` head rotation -> ``rot``
  (64:67), ``pose[:, 3:]`` jaw -> ``jaw`` (50:53). DualTalk has no neck, eyelid or eye pose: those
  channels are zero and the groups are marked invalid (never scored).
- A side with a ``.wav`` and no ``.npz`` is an audio-only partner (``has_motion`` False). A side
  with a ``.npz`` and no ``.wav``, or a conversation where neither side has motion, is skipped.
- Both sides' motion and audio must last the same time within ``tolerance_frames`` (default 2)
  frames; the conversation is cut to the shorter motion.
- VAD: none in the source -> silero-vad on each side's audio (``vad="energy"`` for the loudness
  gate). Text: none in the source -> ``""`` for every 200-frame window.
- Split: ``train/`` (and optional ``test/``) sub-folders if present, else a deterministic hash of
  the id (``test_fraction``, default 0.1; at least one train conversation).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..dataset import Conversation, fit_audio_length
from ..flame import FLAME_DIM, N_GROUPS, assemble
from .common import (
    Candidate,
    ConversionError,
    check_duration,
    check_input_dir,
    common_length,
    motion_array,
    n_windows,
    open_npz,
    read_audio,
    split_folders,
    write_conversations,
)
from .vad import VAD_METHODS, vad_frames

FILE_RE = re.compile(r"^(?P<id>.+)_speaker(?P<side>[12])\.(?P<ext>npz|wav)$")


def scan_dualtalk(folder: Path) -> dict[str, dict[tuple[int, str], Path]]:
    """``{id: {(side 0|1, "npz"|"wav"): path}}`` for the DualTalk files directly in ``folder``."""
    found: dict[str, dict[tuple[int, str], Path]] = {}
    for p in sorted(folder.iterdir()):
        m = FILE_RE.match(p.name)
        if m and p.is_file():
            found.setdefault(m["id"], {})[(int(m["side"]) - 1, m["ext"])] = p
    return found


def load_dualtalk_side(npz: Path) -> dict[str, np.ndarray]:
    """FLAME groups of one DualTalk ``.npz``: ``{"expr": (T,50), "jaw": (T,3), "rot": (T,3)}``."""
    arrays = open_npz(npz)
    exp = motion_array(npz, arrays, "exp", width=50, groups="expr")
    pose = motion_array(npz, arrays, "pose", width=6, groups={"rot": slice(0, 3), "jaw": slice(3, 6)})
    if exp.shape[0] != pose.shape[0]:
        raise ConversionError(npz, f"'exp' has {exp.shape[0]} frames but 'pose' has {pose.shape[0]}")
    return {"expr": exp, "jaw": pose[:, 3:6], "rot": pose[:, 0:3]}


def build_dualtalk_conversation(cid: str, files: dict[tuple[int, str], Path], folder: Path, vad: str = "silero",
                                vad_threshold: float = 0.5, tolerance_frames: int = 2) -> Conversation:
    """One :class:`Conversation` from the files of one id; :class:`ConversionError` names the bad file."""
    for s in range(2):
        if (s, "wav") not in files:
            wav_name = f"{cid}_speaker{s + 1}.wav"
            raise ConversionError(files.get((s, "npz"), folder / wav_name), f"missing audio file {wav_name}")
    npz_paths = {s: files[(s, "npz")] for s in range(2) if (s, "npz") in files}
    if not npz_paths:
        raise ConversionError(files[(0, "wav")], f"neither speaker of {cid!r} has a motion file (.npz)")
    parts = {s: load_dualtalk_side(p) for s, p in npz_paths.items()}
    T = common_length(list(npz_paths.values()), [parts[s]["expr"].shape[0] for s in parts], tolerance_frames)
    ref_npz = next(iter(npz_paths.values()))

    motion = np.zeros((2, T, FLAME_DIM), dtype=np.float32)
    group_valid = np.zeros((2, N_GROUPS), dtype=bool)
    has_motion = np.zeros(2, dtype=bool)
    audio, vads = [], []
    for s in range(2):
        if s in parts:
            motion[s], group_valid[s] = assemble({g: a[:T] for g, a in parts[s].items()}, T)
            has_motion[s] = True
        wav_path = files[(s, "wav")]
        wav = read_audio(wav_path)
        check_duration(wav_path, wav.shape[0], npz_paths.get(s, ref_npz), T, tolerance_frames)
        wav = fit_audio_length(wav, T)
        audio.append(wav)
        vads.append(vad_frames(wav, T, method=vad, threshold=vad_threshold))
    text = [[""] * n_windows(T) for _ in range(2)]
    return Conversation(cid, motion, group_valid, has_motion, np.stack(vads), audio, text)


def convert_dualtalk(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    test_fraction: float = 0.1,
    vad: str = "silero",
    vad_threshold: float = 0.5,
    tolerance_frames: int = 2,
    strict: bool = False,
    overwrite: bool = True,
    verbose: bool = True,
) -> dict:
    """Convert a DualTalk folder (layout in the module docstring) into a canonical dataset at ``out_dir``.

    ``vad``: ``"silero"`` (default) or ``"energy"``; ``vad_threshold``: silero speech probability.
    ``strict``: raise on the first bad conversation instead of warning and skipping it.
    Returns the :class:`~..dataset.DatasetWriter` summary plus ``skipped`` = ``[(file, reason)]``
    and ``out``. Raises :class:`ConversionError` for a missing/empty input or when nothing valid
    remains; the output folder is then left as it was.
    """
    if vad not in VAD_METHODS:
        raise ValueError(f"unknown vad {vad!r} for DualTalk; valid: {', '.join(VAD_METHODS)}")
    inp, out = check_input_dir(input_dir, out_dir)
    candidates: list[Candidate] = []
    for folder, split in split_folders(inp):
        for cid, files in scan_dualtalk(folder).items():
            def load(cid=cid, files=files, folder=folder):
                return build_dualtalk_conversation(cid, files, folder, vad, vad_threshold, tolerance_frames)

            candidates.append(Candidate(cid, sorted(files.values()), load, split))
    if not candidates:
        raise ConversionError(inp, "no DualTalk files found (expected <id>_speaker1.npz, <id>_speaker1.wav, "
                                   "<id>_speaker2.npz, <id>_speaker2.wav, optionally in train/ and test/)")
    options = {"vad": vad, "vad_threshold": vad_threshold, "test_fraction": test_fraction,
               "tolerance_frames": tolerance_frames}
    return write_conversations("dualtalk", inp, out, candidates, test_fraction=test_fraction, strict=strict,
                               overwrite=overwrite, verbose=verbose, options=options)
