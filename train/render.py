"""Render FLAME motion to an MP4 with the conversation's sound (headless, on the CPU).

    python train/render.py motion=gen/clip.npz flame_model=FLAME2020/generic_model.pkl audio=a.wav out=gen/clip.mp4
    python train/render.py dataset=data/synthetic conversation=conv_0000 layout=sides \
        flame_model=FLAME2020/generic_model.pkl out=gen/conv_0000.mp4
    python train/render.py motion=gen/clip.npz dataset=data/synthetic conversation=conv_0000 side=0 \
        layout=gt_vs_gen flame_model=FLAME2020/generic_model.pkl out=gen/compare.mp4
    python train/render.py bench=true          # frames/s at 512 x 512 on a FLAME-sized synthetic head

Heads come from a generated ``.npz`` (``train/generate.py``: ``motion (T, 67)``, ``vad (T,)``,
optionally ``partner_vad (T,)``) and/or a canonical dataset's conversation sides; the layouts
(``one``, ``sides``, ``gt_vs_gen``) are described in ``train/conf/render.yaml``. Each panel has a
label bar with its title and the frame's activity (speaking / listening / silent). The FLAME
model is licence-gated and never shipped (https://flame.is.tue.mpg.de, FLAME 2020): without it
the script stops before rendering. Every input is checked before the first frame; the MP4 is
written under a partial name and renamed when complete.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from gdpo_listener.envs.converters.common import read_audio
from gdpo_listener.envs.converters.vad import vad_frames
from gdpo_listener.envs.dataset import DURATION_TOLERANCE_FRAMES, SAMPLES_PER_FRAME, load_conversation, load_dataset_meta
from gdpo_listener.envs.flame import FPS, SAMPLE_RATE
from gdpo_listener.evaluation.render import Panel, RenderError, benchmark, check_motion, render_video, require_flame_model

LAYOUTS = ("one", "sides", "gt_vs_gen")
def abspath(p) -> Path:
    """``p`` relative to the folder the user launched from."""
    return Path(to_absolute_path(str(p)))


GREY, BLUE, SAND = (0.78, 0.76, 0.74), (0.68, 0.75, 0.84), (0.86, 0.74, 0.60)  # ground truth / partner / generated


def load_generated(path: Path) -> dict:
    """``motion (T, 67)`` and the optional ``vad`` / ``partner_vad (T,)`` of a generated npz."""
    if not path.is_file():
        raise FileNotFoundError(f"motion file {path} does not exist (write one with train/generate.py)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise RenderError(f"cannot read motion file {path}: {e}") from e
    if "motion" not in arrays:
        raise RenderError(f"motion file {path} has no 'motion' array (has: {sorted(arrays)})")
    motion = check_motion(arrays["motion"], f"motion in {path}")
    out = {"motion": motion, "vad": None, "partner_vad": None}
    for k in ("vad", "partner_vad"):
        if k in arrays:
            if arrays[k].shape != (len(motion),):
                raise RenderError(f"{k} in {path} has shape {arrays[k].shape}, expected ({len(motion)},) like the motion")
            out[k] = arrays[k].astype(bool)
    return out


def fit_clip_audio(wav: np.ndarray, n_frames: int, name: str) -> np.ndarray:
    """``wav`` trimmed (or padded by at most the duration tolerance) to ``n_frames`` of samples."""
    n = n_frames * SAMPLES_PER_FRAME
    if len(wav) < n - DURATION_TOLERANCE_FRAMES * SAMPLES_PER_FRAME:
        raise RenderError(f"{name} lasts {len(wav) / SAMPLE_RATE:.2f} s, shorter than the {n_frames / FPS:.2f} s of motion")
    return np.pad(wav[:n], (0, max(0, n - len(wav)))).astype(np.float32)


def mix(*wavs: np.ndarray) -> np.ndarray:
    """Sum of equally long waveforms, scaled down only if it would clip."""
    s = np.sum(wavs, axis=0)
    peak = float(np.abs(s).max(initial=0.0))
    return s / peak if peak > 1.0 else s


def check_request(cfg: DictConfig) -> tuple[str, int, int]:
    """The layout, side and first frame (at 25 fps) a render request asks for: every combination of
    ``motion=`` / ``dataset=`` / ``conversation=`` / ``layout=`` / ``side=`` / ``start=`` checked before
    any file is read."""
    layout = str(cfg.layout)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; valid: {', '.join(LAYOUTS)}")
    has_motion, has_dataset = bool(cfg.motion), bool(cfg.dataset)
    if has_dataset != bool(cfg.conversation):
        raise ValueError("dataset= and conversation= go together (a conversation id of that dataset)")
    if not has_motion and not has_dataset:
        raise ValueError("nothing to render: give motion=NPZ and/or dataset=DIR conversation=ID")
    if layout == "gt_vs_gen" and not (has_motion and has_dataset):
        raise ValueError("layout=gt_vs_gen needs motion=NPZ (generated) and dataset= conversation= side= (ground truth)")
    if layout == "one" and has_motion and has_dataset:
        raise ValueError("layout=one shows one head: give motion=NPZ or a dataset side, not both "
                         "(layout=gt_vs_gen compares them, layout=sides puts the generated actor beside the partner)")
    side = int(cfg.side)
    if side not in (0, 1):
        raise ValueError(f"side={side}: must be 0 or 1")
    start = int(round(float(cfg.start) * FPS))
    if start < 0 or (start and not has_dataset):
        raise ValueError(f"start={cfg.start}: a non-negative offset into a dataset conversation (needs dataset=)")
    return layout, side, start


def clip_audio(cfg: DictConfig, T: int, conv, clip: slice, generated: Panel | None) -> np.ndarray | None:
    """The clip's mono audio (its first sample at the clip's first frame), or None for a silent video:
    ``audio=`` (mixed with ``partner_audio=``), else the dataset conversation's two sides mixed. A generated
    clip without a dataset takes the activity labels its npz lacks from the VAD of those wavs (``vad=``)."""
    audio = partner = None
    if cfg.audio:
        audio = fit_clip_audio(read_audio(abspath(cfg.audio)), T, f"audio {cfg.audio}")
    if cfg.partner_audio:
        partner = fit_clip_audio(read_audio(abspath(cfg.partner_audio)), T, f"partner_audio {cfg.partner_audio}")
    if generated is not None and conv is None and cfg.vad != "none":
        if generated.vad is None and audio is not None:
            generated.vad = vad_frames(audio, T, method=str(cfg.vad))
        if generated.partner_vad is None and partner is not None:
            generated.partner_vad = vad_frames(partner, T, method=str(cfg.vad))
    if audio is None and conv is not None:
        return mix(*(fit_clip_audio(conv.audio[s][clip.start * SAMPLES_PER_FRAME:], T, f"conversation {conv.id!r} side {s} audio")
                     for s in range(2)))
    return mix(audio, partner) if audio is not None and partner is not None else audio


def arrange(layout: str, side: int, generated: Panel | None, dataset_panel, conv_id: str | None) -> list[Panel]:
    """The panels of ``layout``, left to right; ``dataset_panel(s, title, color)`` makes side ``s`` of
    conversation ``conv_id``'s."""
    if layout == "one":
        return [generated] if generated is not None else [dataset_panel(side, f"{conv_id} side {side}", GREY)]
    if layout == "sides":
        if generated is None:
            return [dataset_panel(side, f"side {side}", GREY), dataset_panel(1 - side, f"side {1 - side}", BLUE)]
        generated.title = "generated actor"
        return [generated, dataset_panel(1 - side, f"partner (side {1 - side})", BLUE)]
    return [dataset_panel(side, f"ground truth (side {side})", GREY), generated]  # gt_vs_gen


def build_panels(cfg: DictConfig) -> tuple[list[Panel], np.ndarray | None]:
    """The layout's panels (all of one length) and the clip's mono audio (or None: silent video)."""
    layout, side, start = check_request(cfg)
    gen = load_generated(abspath(cfg.motion)) if cfg.motion else None
    conv = None
    if cfg.dataset:
        root = abspath(cfg.dataset)
        load_dataset_meta(root)
        conv = load_conversation(root, str(cfg.conversation))
    available = len(gen["motion"]) if gen is not None else conv.n_frames - start
    T = available if cfg.seconds is None else int(round(float(cfg.seconds) * FPS))
    if T < 1 or T > available:
        raise ValueError(f"seconds={cfg.seconds}: the clip must be between 1 frame and the {available / FPS:.2f} s available")
    if conv is not None and start + T > conv.n_frames:
        raise ValueError(f"conversation {conv.id!r} has {conv.n_frames} frames; the clip needs frames {start}..{start + T}")
    clip = slice(start, start + T)

    def dataset_panel(s: int, title: str, color) -> Panel:
        if not conv.has_motion[s]:
            raise ValueError(f"conversation {conv.id!r} side {s} has no motion (audio-only); it cannot be shown")
        return Panel(conv.motion[s, clip], title, conv.vad[s, clip], conv.vad[1 - s, clip], color)

    generated = None
    if gen is not None:  # in a dataset layout, a generated side of that conversation: the dataset's VAD where the npz has none
        vads = [None if gen[k] is None else gen[k][:T] for k in ("vad", "partner_vad")]
        if conv is not None:
            vads = [conv.vad[s, clip] if v is None else v for v, s in zip(vads, (side, 1 - side))]
        generated = Panel(gen["motion"][:T], "generated", vads[0], vads[1], SAND)
    audio = clip_audio(cfg, T, conv, clip, generated)
    return arrange(layout, side, generated, dataset_panel, None if conv is None else conv.id), audio


@hydra.main(version_base="1.3", config_path="conf", config_name="render")
def main(cfg: DictConfig) -> None:
    if cfg.bench:
        r = benchmark(size=int(cfg.size), n_frames=int(cfg.bench_frames), samples=int(cfg.samples), preset=str(cfg.preset),
                      threads=int(cfg.threads))
        print(f"[render bench] {r['vertices']} vertices / {r['faces']} faces, {r['size']} x {r['size']}, samples={r['samples']}, "
              f"{r['frames']} frames: FLAME + rasterising {r['render_fps']:.1f} frames/s; whole video "
              f"(labels, H.264 + AAC, mux) {r['video_fps']:.1f} frames/s wall, {r['video_cpu_ms']:.1f} CPU-ms/frame")
        return
    flame_model = require_flame_model(abspath(cfg.flame_model) if cfg.flame_model else None)
    if not cfg.out:
        raise ValueError("out= is required: the .mp4 to write")
    out = abspath(cfg.out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"out={cfg.out}: the output is an MP4 video, name it *.mp4")
    panels, audio = build_panels(cfg)
    if audio is None:
        print("[render] no audio given (audio=, or a dataset conversation): writing a silent video")
    render_video(panels, flame_model, out, audio, SAMPLE_RATE, size=int(cfg.size), samples=int(cfg.samples),
                 crf=int(cfg.crf), preset=str(cfg.preset), threads=int(cfg.threads), progress=bool(cfg.progress))
    T = len(panels[0].motion)
    print(f"[render] {T} frames ({T / FPS:.2f} s), {len(panels)} panel(s) [{', '.join(p.title for p in panels)}] -> {out}")


if __name__ == "__main__":
    main()
