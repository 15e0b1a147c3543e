"""Text descriptions for a canonical dataset, written by a vision-language model (paper supplement 6).

The paper describes every 200-frame window of every actor with one sentence from Qwen3-VL, shown
8 frames sampled uniformly from the window and the system prompt of its Table 7
(:data:`TABLE7_PROMPT`). This module does the same for any canonical dataset
(:mod:`gdpo_listener.envs.dataset`) and any model with the ``transformers`` image-text-to-text
interface (``AutoProcessor`` + ``AutoModelForImageTextToText`` + a chat template), loaded by local
path.

Frame sources, per conversation side (only sides with motion are described: an audio-only side is
never an actor):

* a video ``VIDEOS/<id>_s<side>.<ext>`` (``ext`` one of :data:`VIDEO_EXTENSIONS`; the same naming
  as the dataset's ``audio/<id>_s<side>.wav``), showing that side's face, starting at dataset
  frame 0, at a constant frame rate of its own;
* otherwise the project's own FLAME renders of the side's motion
  (``gdpo_listener.evaluation.render.render_frames``), which need a user-supplied FLAME model.

Frame conventions (written once here):

* window ``k`` covers dataset frames ``[k * 200, min((k + 1) * 200, T))``; a conversation has
  ``n_windows(T) = max(1, ceil(T / 200))`` windows (the converters' count), the last may be short;
* the 8 frames of a window are the centres of 8 equal segments of it:
  ``start + floor((i + 0.5) * n / 8)``, ``i = 0..7`` (:func:`window_frame_indices`);
* dataset frame ``f`` (25 fps) spans ``[f / 25, (f + 1) / 25)`` s; it is shown by the video frame
  whose interval holds its centre time: ``floor((f + 0.5) * video_fps / 25)``
  (:func:`video_frame_index`);
* a video may end at most :data:`~gdpo_listener.envs.dataset.DURATION_TOLERANCE_FRAMES` dataset
  frames before the motion (its last frame stands in); a shorter video is an error naming the file.

Resumability: a window is skipped when it already has a non-empty description or when an earlier
run marked it done (unless ``overwrite``). After every batch the conversation's
``conversations/<id>.json`` is rewritten atomically with the new descriptions *and* the ``done``
marks in the same file, so a killed run loses at most the batch in flight::

    {"text": [[...], [...]], "n_frames": T,
     "annotation": {"model": ..., "prompt_sha256": ..., "frames_per_window": 8,
                    "done": [[bool per window] side 0, [...] side 1]}}

Readers of the dataset only read ``"text"``; ``"annotation"`` is provenance (model and prompt of the
latest run that wrote to the file).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..agents.checkpoint import atomic_write_json
from .converters.common import n_windows
from .dataset import DURATION_TOLERANCE_FRAMES, WINDOW, DatasetFormatError, load_dataset_meta, read_split
from .flame import FPS

# The system prompt of the paper's Table 7 (supplement 6), verbatim. Override it through
# train/conf/annotate.yaml (`prompt=` / `prompt_file=`), never by editing a copy elsewhere.
TABLE7_PROMPT = """\
Describe the person’s facial expression in a single concise sentence.
1. The specific Emotion: Use precise words like ‘skeptical’, ‘amused’, ‘bored’, ‘attentive’, ‘confused’, ‘happy’, ‘angry’, ‘calm’, or ‘focused’. (Avoid generic ‘neutral’).
2. The specific Facial Geometry and Gaze like ‘narrowed eyes’, ‘raised eyebrows’, ‘head tilted’, ‘looking away’.
Rules:
1. IGNORE mouth movements related to speech.
2. DO NOT use words like ‘speaking’, ‘talking’, or ‘listening’.
3. Focus on the VIBE. Even if the face is mostly still, find the subtle emotion.
Examples:
1. Skeptical and doubting, with one eyebrow raised and lips pursed.
2. Joyful and energetic, smiling broadly with crinkled eyes.
3. Bored and detached, looking away with a blank expression.
4. Attentive and focused, staring directly ahead with a slight nod."""  # noqa: E501 (verbatim lines)

FRAMES_PER_WINDOW = 8  # paper supplement 6
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm")
SPLITS = ("train", "test")

Clip = np.ndarray  # (8, H, W, 3) uint8 RGB frames of one window
Describe = Callable[[list[Clip]], list[str]]  # clips -> one description each
Render = Callable[..., np.ndarray]  # render_frames(motion (N, 67), flame_model, size) -> (N, size, size, 3) uint8


class AnnotationError(ValueError):
    """A frame source is missing or does not cover its motion, or the model cannot be used."""


# ----------------------------------------------------------------------------------------------
# frame index conventions


def window_frame_indices(n_frames: int, k: int, n: int = FRAMES_PER_WINDOW, window: int = WINDOW) -> np.ndarray:
    """Dataset frames shown for window ``k`` of a ``n_frames``-frame side: the centres of ``n`` equal
    segments of ``[k * window, min((k + 1) * window, n_frames))``. Returns ``(n,)`` int64,
    non-decreasing (frames repeat when the window is shorter than ``n``)."""
    start, stop = k * window, min((k + 1) * window, n_frames)
    if not 0 <= start < stop:
        raise ValueError(f"window {k} is outside a side of {n_frames} frames")
    length = stop - start
    return start + np.floor((np.arange(n) + 0.5) * length / n).astype(np.int64)


def video_frame_index(frames: np.ndarray, video_fps: float | Fraction, fps: int = FPS) -> np.ndarray:
    """Video frame showing each dataset frame: the one whose interval holds the dataset frame's
    centre time ``(f + 0.5) / fps``. Exact rational arithmetic for rational rates (29.97 fps)."""
    rate = Fraction(video_fps).limit_denominator(1_000_000)
    f = np.asarray(frames, dtype=np.int64)
    # floor((2 f + 1) * num / (2 * fps * den)) in integers
    return ((2 * f + 1) * rate.numerator) // (2 * fps * rate.denominator)


def clean_description(text: str) -> str:
    """The first non-empty line of a model answer, whitespace collapsed, surrounding quotes removed."""
    for line in text.strip().splitlines():
        line = " ".join(line.split()).strip("\"'“”‘’ ")
        if line:
            return line
    return ""


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# frame sources


def find_video(videos: str | Path | None, cid: str, side: int) -> Path | None:
    """``VIDEOS/<cid>_s<side>.<ext>`` if exactly one exists; None if none; error if several."""
    if videos is None:
        return None
    found = [p for ext in VIDEO_EXTENSIONS if (p := Path(videos) / f"{cid}_s{side}{ext}").is_file()]
    if len(found) > 1:
        raise AnnotationError(f"several videos for conversation {cid!r} side {side}: {', '.join(map(str, found))}; keep one")
    return found[0] if found else None


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    fps: Fraction
    n_frames: int | None  # from the container's metadata; None when it does not say
    width: int
    height: int


def probe_video(path: Path) -> VideoInfo:
    """Frame rate, frame count (if the container states it) and size of the first video stream."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise AnnotationError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate or rate <= 0:
                raise AnnotationError(f"{path}: the video stream states no frame rate")
            rate = Fraction(rate)
            n = int(stream.frames or 0)
            if n <= 0 and stream.duration and stream.time_base:
                n = int(round(stream.duration * stream.time_base * rate))
            if n <= 0 and container.duration:
                n = int(round(Fraction(container.duration, 1_000_000) * rate))
            return VideoInfo(path, rate, n if n > 0 else None, int(stream.width), int(stream.height))
    except AnnotationError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise AnnotationError(f"cannot open video {path}: {e}") from e


def video_shortfall(n_video_frames: int, video_fps: Fraction, n_frames: int, fps: int = FPS) -> float:
    """How many dataset frames of motion the video does not cover (<= 0: it covers all)."""
    return float(n_frames - Fraction(n_video_frames) * fps / video_fps)


def _too_short(info: VideoInfo, n_video_frames: int, n_frames: int, where: str) -> AnnotationError:
    return AnnotationError(
        f"video {info.path} is shorter than the motion of {where}: {n_video_frames} frames at {float(info.fps):g} fps "
        f"= {float(n_video_frames / info.fps):.2f} s, motion {n_frames} frames at {FPS} fps = {n_frames / FPS:.2f} s"
    )


def scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) shrunk so the longer side is at most ``max_side`` (even sizes, aspect kept)."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(2, int(round(width * s / 2)) * 2), max(2, int(round(height * s / 2)) * 2)


def iter_video_frames(info: VideoInfo, frames: np.ndarray, n_frames: int, where: str,
                      max_side: int | None = None) -> Iterator[np.ndarray]:
    """Yield the RGB frame ``(H, W, 3)`` uint8 showing each dataset frame of ``frames`` (non-decreasing),
    decoding the video once, front to back. ``n_frames``: the motion's length (for the length check).
    Each yielded array owns its memory (``to_ndarray`` may return a view into the decoder's frame)."""
    import av

    wanted = video_frame_index(frames, info.fps)  # (N,) non-decreasing
    width, height = scaled_size(info.width, info.height, max_side)
    pos, decoded, last = 0, 0, None
    with av.open(str(info.path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if pos == len(wanted):
                break
            i, decoded, last = decoded, decoded + 1, frame
            if wanted[pos] != i:
                continue
            image = frame.to_ndarray(width=width, height=height, format="rgb24").copy()  # (H, W, 3), owned: PyAV may return a view
            while pos < len(wanted) and wanted[pos] == i:
                yield image
                pos += 1
        if pos < len(wanted):  # the stream ended early: a tail within tolerance repeats the last frame
            if last is None or video_shortfall(decoded, info.fps, n_frames) > DURATION_TOLERANCE_FRAMES:
                raise _too_short(info, decoded, n_frames, where)
            image = last.to_ndarray(width=width, height=height, format="rgb24").copy()
            for _ in range(len(wanted) - pos):
                yield image


def _default_render() -> Render:
    try:
        from ..evaluation.render import render_frames
    except ImportError as e:
        raise AnnotationError(f"the FLAME renderer (gdpo_listener.evaluation.render.render_frames) cannot be imported: {e}") from e
    return render_frames


# ----------------------------------------------------------------------------------------------
# plan: what to describe, from which frames (checked before any model is loaded)


@dataclass
class SideJob:
    side: int
    windows: list[int]  # window indices still to describe
    video: VideoInfo | None  # None: frames come from the FLAME renderer


@dataclass
class ConversationJob:
    cid: str
    n_frames: int
    sides: list[SideJob]

    @property
    def n_todo(self) -> int:
        return sum(len(s.windows) for s in self.sides)


@dataclass
class AnnotationPlan:
    root: Path
    jobs: list[ConversationJob]
    skipped: int  # windows that already had a description or were done
    total: int  # windows of all sides with motion

    @property
    def n_todo(self) -> int:
        return sum(j.n_todo for j in self.jobs)


def conversation_file(root: Path, cid: str) -> Path:
    return root / "conversations" / f"{cid}.json"


def read_conversation_doc(root: Path, cid: str) -> dict:
    path = conversation_file(root, cid)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetFormatError(f"cannot read {path}: {e}") from e
    text = doc.get("text")
    if not isinstance(text, list) or len(text) != 2 or not all(isinstance(t, list) for t in text):
        raise DatasetFormatError(f"{path}: 'text' must be two lists of strings (one per side)")
    return doc


def _padded_text(doc: dict, n_win: int) -> list[list[str]]:
    return [list(map(str, t)) + [""] * (n_win - len(t)) for t in doc["text"]]


def _done_marks(doc: dict, n_win: int) -> list[list[bool]]:
    done = (doc.get("annotation") or {}).get("done") or [[], []]
    return [[bool(x) for x in d[:n_win]] + [False] * (n_win - len(d[:n_win])) for d in done]


def plan_annotation(root: str | Path, videos: str | Path | None = None, *, flame_model: str | Path | None = None,
                    split: str = "all", overwrite: bool = False) -> AnnotationPlan:
    """List every window still to describe and check its frame source (video exists and covers the
    motion, or a FLAME model is given), so a bad input fails before the model is loaded."""
    root = Path(root)
    load_dataset_meta(root)
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, all; got {split!r}")
    if videos is not None and not Path(videos).is_dir():
        raise AnnotationError(f"videos folder {videos} does not exist or is not a folder")
    if flame_model is not None and not Path(flame_model).is_file():
        raise AnnotationError(f"FLAME model {flame_model} does not exist")
    ids = [cid for s in (SPLITS if split == "all" else (split,)) for cid in read_split(root, s)]
    jobs, skipped, total = [], 0, 0
    for cid in ids:
        npz = root / "conversations" / f"{cid}.npz"
        try:
            with np.load(npz) as z:
                n_frames, has_motion = int(z["motion"].shape[1]), z["has_motion"].astype(bool)
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise DatasetFormatError(f"cannot read {npz}: {e}") from e
        doc = read_conversation_doc(root, cid)
        n_win = n_windows(n_frames)
        text, done = _padded_text(doc, n_win), _done_marks(doc, n_win)
        sides = []
        for side in range(2):
            if not has_motion[side]:
                continue
            total += n_win
            todo = [k for k in range(n_win) if overwrite or not (text[side][k].strip() or done[side][k])]
            skipped += n_win - len(todo)
            if not todo:
                continue
            where = f"conversation {cid!r} side {side}"
            path = find_video(videos, cid, side)
            info = probe_video(path) if path is not None else None
            if info is None and flame_model is None:
                raise AnnotationError(
                    f"{where}: no video {cid}_s{side}.<{'|'.join(e[1:] for e in VIDEO_EXTENSIONS)}> in "
                    f"{videos if videos is not None else '(no videos=DIR given)'} and no flame_model= to render it from"
                )
            if info is not None and info.n_frames is not None and \
                    video_shortfall(info.n_frames, info.fps, n_frames) > DURATION_TOLERANCE_FRAMES:
                raise _too_short(info, info.n_frames, n_frames, where)
            sides.append(SideJob(side, todo, info))
        if sides:
            jobs.append(ConversationJob(cid, n_frames, sides))
    return AnnotationPlan(root, jobs, skipped, total)


# ----------------------------------------------------------------------------------------------
# running the plan


def iter_clips(root: Path, job: ConversationJob, *, flame_model: str | Path | None = None,
               render: Render | None = None, render_size: int = 448, max_side: int | None = 448,
               chunk: int = 8) -> Iterator[tuple[int, int, Clip]]:
    """Yield ``(side, window, clip (8, H, W, 3) uint8)`` for every window of ``job``, side by side,
    window by window. Videos are decoded once, front to back; renders are made ``chunk`` windows at a time."""
    motion = None
    for sj in job.sides:
        where = f"conversation {job.cid!r} side {sj.side}"
        idx = [window_frame_indices(job.n_frames, k) for k in sj.windows]  # per window (8,)
        if sj.video is not None:
            frames = iter_video_frames(sj.video, np.concatenate(idx), job.n_frames, where, max_side)
            for k in sj.windows:
                yield sj.side, k, np.stack([next(frames) for _ in range(FRAMES_PER_WINDOW)])
            frames.close()
            continue
        if flame_model is None:
            raise AnnotationError(f"{where}: no video and no flame_model to render it from")
        if motion is None:
            with np.load(root / "conversations" / f"{job.cid}.npz") as z:
                motion = z["motion"]  # (2, T, 67)
        render = render or _default_render()
        for c in range(0, len(sj.windows), chunk):
            sel = np.concatenate(idx[c : c + chunk])  # (n * 8,)
            images = np.asarray(render(motion[sj.side][sel], flame_model, size=render_size))
            if images.shape[:1] != sel.shape or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise AnnotationError(f"{where}: the renderer returned {images.shape} {images.dtype}, "
                                      f"expected ({len(sel)}, H, W, 3) uint8")
            for j, k in enumerate(sj.windows[c : c + chunk]):
                yield sj.side, k, images[j * FRAMES_PER_WINDOW : (j + 1) * FRAMES_PER_WINDOW]


@dataclass
class AnnotationStats:
    described: int = 0
    skipped: int = 0
    total: int = 0
    conversations: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)


def write_descriptions(root: Path, cid: str, n_frames: int, results: Sequence[tuple[int, int, str]],
                       provenance: dict) -> None:
    """Put ``(side, window, text)`` results into ``conversations/<cid>.json`` and mark them done,
    in one atomic write (re-reading the file so other keys are kept)."""
    doc = read_conversation_doc(root, cid)
    n_win = n_windows(n_frames)
    text, done = _padded_text(doc, n_win), _done_marks(doc, n_win)
    for side, k, desc in results:
        text[side][k] = desc
        done[side][k] = True
    doc["text"] = text
    doc["annotation"] = {**provenance, "done": done}
    atomic_write_json(conversation_file(root, cid), doc)


def run_annotation(plan: AnnotationPlan, describe: Describe, *, batch_size: int = 8, provenance: dict | None = None,
                   flame_model: str | Path | None = None, render: Render | None = None, render_size: int = 448,
                   max_side: int | None = 448, progress: bool = True) -> AnnotationStats:
    """Describe every planned window, ``batch_size`` windows per ``describe`` call, saving each
    conversation's file after every batch (a killed run resumes from the last saved batch)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = AnnotationStats(skipped=plan.skipped, total=plan.total)
    t0 = time.perf_counter()
    bar = tqdm(total=plan.n_todo, unit="window", desc="annotate", disable=not progress)
    try:
        for job in plan.jobs:
            clips = iter_clips(plan.root, job, flame_model=flame_model, render=render, render_size=render_size,
                               max_side=max_side, chunk=batch_size)
            while batch := list(islice(clips, batch_size)):
                texts = describe([clip for _, _, clip in batch])
                if len(texts) != len(batch):
                    raise AnnotationError(f"describe returned {len(texts)} descriptions for {len(batch)} clips")
                results = [(side, k, clean_description(t)) for (side, k, _), t in zip(batch, texts)]
                write_descriptions(plan.root, job.cid, job.n_frames, results, provenance or {})
                stats.described += len(results)
                stats.examples.extend(t for _, _, t in results[: max(0, 3 - len(stats.examples))])
                bar.update(len(results))
            stats.conversations += 1
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - t0
    return stats


# ----------------------------------------------------------------------------------------------
# the vision-language model


class VLMDescriber:
    """A local image-text-to-text model that describes clips: ``describer(clips) -> list[str]``.

    Each clip becomes one chat: the prompt (as the system message, or before the frames in the user
    message with ``prompt_role="user"`` for chat templates without a system role), then a user
    message holding the 8 frames as images (and ``user_text`` if given). Greedy decoding.
    """

    def __init__(self, path: str | Path, *, device: str = "cpu", dtype: str | None = None, prompt: str = TABLE7_PROMPT,
                 prompt_role: str = "system", user_text: str = "", max_new_tokens: int = 64):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.path = Path(path)
        if not self.path.is_dir():
            raise AnnotationError(f"vision-language model folder {self.path} does not exist (give a local path; nothing is downloaded)")
        if prompt_role not in ("system", "user"):
            raise ValueError(f"prompt_role must be 'system' or 'user', got {prompt_role!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise AnnotationError(f"device={device} but CUDA is not available on this machine")
        torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, float16), got {dtype!r}")
        try:
            self.processor = AutoProcessor.from_pretrained(self.path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with a hint
            raise AnnotationError(f"cannot load the processor of {self.path}: {e}{_torchvision_hint()}") from e
        if getattr(self.processor, "chat_template", None) is None:
            raise AnnotationError(f"{self.path}: the processor has no chat template (chat_template.jinja)")
        self.model = AutoModelForImageTextToText.from_pretrained(self.path, local_files_only=True, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.prompt, self.prompt_role, self.user_text = prompt, prompt_role, user_text
        self.max_new_tokens = int(max_new_tokens)
        tok = getattr(self.processor, "tokenizer", None)
        self.pad_token_id = None if tok is None else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def messages(self, clip: Clip) -> list[dict]:
        from PIL import Image

        images = [{"type": "image", "image": Image.fromarray(np.ascontiguousarray(f))} for f in clip]
        user = images + ([{"type": "text", "text": self.user_text}] if self.user_text else [])
        if self.prompt_role == "user":
            return [{"role": "user", "content": [{"type": "text", "text": self.prompt}, *user]}]
        return [{"role": "system", "content": [{"type": "text", "text": self.prompt}]}, {"role": "user", "content": user}]

    def __call__(self, clips: list[Clip]) -> list[str]:
        import torch

        inputs = self.processor.apply_chat_template(
            [self.messages(c) for c in clips], add_generation_prompt=True, tokenize=True, return_dict=True,
            processor_kwargs={"padding": True, "padding_side": "left", "return_tensors": "pt"},
        ).to(self.device, dtype=self.model.dtype)  # casts only floating tensors (pixel values)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.pad_token_id)  # (B, L_in + L_new)
        new = out[:, inputs["input_ids"].shape[1] :]  # (B, L_new): left padding aligns every prompt's end
        return self.processor.batch_decode(new, skip_special_tokens=True)

    def provenance(self) -> dict:
        return {"model": str(self.path), "prompt_sha256": prompt_digest(self.prompt), "frames_per_window": FRAMES_PER_WINDOW}


def _torchvision_hint() -> str:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return (" (transformers builds the Qwen-VL processors with a video processor, which needs torchvision: "
                "install the torchvision release matching your torch build)")
    return ""


__all__ = [
    "TABLE7_PROMPT", "FRAMES_PER_WINDOW", "VIDEO_EXTENSIONS", "AnnotationError", "AnnotationPlan", "AnnotationStats",
    "ConversationJob", "SideJob", "VideoInfo", "VLMDescriber", "clean_description", "find_video", "iter_clips",
    "iter_video_frames", "plan_annotation", "probe_video", "run_annotation", "scaled_size", "video_frame_index",
    "video_shortfall", "window_frame_indices", "write_descriptions",
]
