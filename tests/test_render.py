"""Mesh videos: headless rendering of the tiny FLAME-layout model, MP4 with audio, clear early errors."""
from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from entry_runner import load_script  # tests/ is on sys.path (the rootdir conftest)
from omegaconf import DictConfig, OmegaConf

from gdpo_listener.envs.dataset import Conversation, DatasetWriter
from gdpo_listener.envs.flame import FLAME_DIM, FPS, GROUPS, SAMPLE_RATE
from gdpo_listener.evaluation import render as R

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # pixels per panel: small and fast
T = 2 * FPS  # a 2-second clip: 50 frames


@pytest.fixture
def flame_model(tmp_path, flame_kit) -> Path:
    """The tests' 9-vertex FLAME-layout model, with enough faces to cover part of the image."""
    return flame_kit.write_pkl(tmp_path / "generic_model.pkl", flame_kit.renderable_model())


def nodding(n: int = T) -> np.ndarray:
    """Head pitch and jaw moving over the clip."""
    t = np.arange(n) / FPS
    m = np.zeros((n, FLAME_DIM), np.float32)
    m[:, GROUPS["rot"].start] = 0.4 * np.sin(2 * np.pi * 1.0 * t)
    m[:, GROUPS["jaw"].start] = 0.3 * (1 + np.sin(2 * np.pi * 2.0 * t))
    return m


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    return (0.2 * np.sin(2 * np.pi * hz * np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE)).astype(np.float32)


def decode(path: Path) -> tuple[np.ndarray, float | None]:
    """All video frames ``(N, H, W, 3)`` and the audio stream's duration in seconds (None: no audio).

    The duration is the container's (AAC priming and padding trimmed by the edit list); the
    decoded samples must agree with it up to the last AAC frame's padding (1024 samples).
    """
    with av.open(str(path)) as c:
        # copies: PyAV's to_ndarray may return a view into the decoded frame's memory, not an array of its own
        frames = [f.to_ndarray(format="rgb24").copy() for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return np.stack(frames), None
        stream = c.streams.audio[0]
        seconds = float(stream.duration * stream.time_base)
        decoded = sum(f.samples for f in c.decode(audio=0)) / stream.rate
    assert 0 <= decoded - seconds <= 1024 / stream.rate
    return np.stack(frames), seconds


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------
# maths


def test_camera_maps_the_target_to_the_image_centre_and_depth_into_range():
    view = R.look_at([0.0, 0.0, 2.0], [0.0, 0.0, 0.0])
    proj = R.perspective(30.0, 1.0, 0.5, 4.0)
    p = proj @ view @ np.array([0.0, 0.0, 0.0, 1.0])
    assert np.allclose(p[:2] / p[3], 0.0) and -1 < p[2] / p[3] < 1
    near = proj @ view @ np.array([0.0, 0.0, 1.5, 1.0])  # on the near plane
    assert p[2] / p[3] > near[2] / near[3] == pytest.approx(-1.0)
    up = proj @ view @ np.array([0.0, 0.5, 0.0, 1.0])
    assert up[1] / up[3] > 0  # +y is up on screen


def test_vertex_normals_of_a_flat_square_and_a_tetrahedron():
    square = np.array([[[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]])
    n = R.vertex_normals(square, np.array([[0, 1, 2], [0, 2, 3]]))
    assert np.allclose(n, [0, 0, 1])
    tet = np.array([[[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]])  # centred regular tetrahedron
    faces = np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])
    n = R.vertex_normals(tet, faces)[0]
    assert np.allclose(n, tet[0] / np.sqrt(3), atol=1e-6)  # by symmetry: pointing away from the centre


def test_activity_states_follow_the_dataset_convention():
    vad = np.array([1, 1, 0, 0, 0], bool)
    partner = np.array([0, 1, 1, 0, 1], bool)
    assert R.activity_states(vad, partner, 5).tolist() == [R.SPEAKING, R.SPEAKING, R.LISTENING, R.SILENT, R.LISTENING]
    assert R.activity_states(vad, None, 5).tolist() == [R.SPEAKING] * 2 + [R.NOT_SPEAKING] * 3
    assert R.activity_states(None, partner, 5) is None
    with pytest.raises(R.RenderError, match=r"\(6,\)"):
        R.activity_states(vad, partner, 6)
    speaking, listening = R.label_bar(120, 16, "actor", R.SPEAKING), R.label_bar(120, 16, "actor", R.LISTENING)
    assert speaking.shape == (16, 120, 3) and not np.array_equal(speaking, listening)


# ----------------------------------------------------------------------------------------------
# rendering


def test_render_frames_shows_the_head_and_follows_the_motion(flame_model):
    motion = nodding(6)
    imgs = R.render_frames(motion, flame_model, size=SIZE)
    assert imgs.shape == (6, SIZE, SIZE, 3) and imgs.dtype == np.uint8
    background = imgs[0, 0, 0]
    covered = (np.abs(imgs.astype(int) - background).sum(-1) > 30).mean(axis=(1, 2))  # share of head pixels
    assert (covered > 0.05).all() and (covered < 0.95).all()
    assert not np.array_equal(imgs[1], imgs[3])  # the head moved
    still = R.render_frames(np.repeat(motion[:1], 3, 0), flame_model, size=SIZE)
    assert np.array_equal(still[0], still[2]) and np.array_equal(still[0], imgs[0])  # deterministic


def test_two_second_clip_with_audio(flame_model, tmp_path):
    out = tmp_path / "out" / "clip.mp4"
    vad = np.arange(T) < T // 2
    R.render_video([R.Panel(nodding(), "generated", vad, ~vad)], flame_model, out, tone(2.0), size=SIZE)
    frames, audio_seconds = decode(out)
    assert frames.shape == (T, SIZE, SIZE, 3)
    assert audio_seconds == pytest.approx(2.0, abs=0.03)
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == FPS
    assert files_in(out.parent) == ["clip.mp4"]  # no partial file left
    # the frames differ where the motion does (pitch 0 at frame 0, +0.4 rad at frame 6)
    bar = R.default_label_height(SIZE)
    assert np.abs(frames[0, bar:].astype(int) - frames[6, bar:]).mean() > 2.0  # below the label bar
    # the label bar says speaking in the first half, listening in the second
    assert np.abs(frames[2, :bar].astype(int) - frames[T - 3, :bar]).mean() > 2.0
    assert np.abs(frames[2, :bar].astype(int) - frames[T // 2 - 3, :bar]).mean() < 1.0


def test_side_by_side_layout_and_short_audio_is_padded(flame_model, tmp_path):
    out = tmp_path / "pair.mp4"
    still = np.zeros((T, FLAME_DIM), np.float32)
    R.render_video([R.Panel(nodding(), "actor"), R.Panel(still, "partner")], flame_model, out, tone(1.5), size=SIZE)
    frames, audio_seconds = decode(out)
    assert frames.shape == (T, SIZE, 2 * SIZE, 3)
    assert audio_seconds == pytest.approx(2.0, abs=0.03)
    bar = R.default_label_height(SIZE)
    right = frames[:, bar:, SIZE:].astype(int)
    left = frames[:, bar:, :SIZE].astype(int)
    assert np.abs(right[0] - right[6]).mean() < 1.0 < np.abs(left[0] - left[6]).mean()  # only the actor moves


def test_renderers_do_not_delete_each_others_gl_objects():
    """GL object names repeat across contexts: an old renderer's objects freed while another
    renderer's context is current must not take that renderer's framebuffer (black frames, as
    once seen in CI when a collected video's renderer hit the next video's)."""
    import gc

    m = R.synthetic_flame_model(n_lon=24, n_rings=16)
    rest = m["v_template"].astype(np.float32)
    view, proj = R.head_camera(rest, aspect=1.0)
    faces, n = m["f"], len(rest)
    for samples in (0, 4):
        old = R.MeshRenderer(faces, n, SIZE, view, proj, samples=samples)
        old.render(rest[None])
        old.release()
        live = R.MeshRenderer(faces, n, SIZE, view, proj, samples=samples)
        first = live.render(rest[None])
        dropped = R.MeshRenderer(faces, n, SIZE, view, proj, samples=samples)  # never released by hand
        dropped.render(rest[None])
        del old, dropped
        gc.collect()
        assert np.array_equal(live.render(rest[None]), first)
        live.release()
        live.release()  # idempotent
        with pytest.raises(R.RenderError, match="released"):
            live.render(rest[None])


# ----------------------------------------------------------------------------------------------
# errors: clear, before anything is written, nothing left behind


def test_missing_flame_model_says_where_it_comes_from(tmp_path):
    out = tmp_path / "clip.mp4"
    with pytest.raises(FileNotFoundError, match=r"licence-gated.*flame\.is\.tue\.mpg\.de"):
        R.render_video([R.Panel(nodding(), "x")], tmp_path / "FLAME2020" / "generic_model.pkl", out, tone(2.0), size=SIZE)
    with pytest.raises(FileNotFoundError, match="no FLAME model file given"):
        R.render_frames(nodding(4), None, size=SIZE)
    assert files_in(tmp_path) == []


def test_bad_motion_is_refused_before_any_frame(flame_model, tmp_path):
    out = tmp_path / "clip.mp4"
    with pytest.raises(R.RenderError, match=r"\(T, 67\).*\(50, 60\)"):
        R.render_video([R.Panel(np.zeros((T, 60)), "x")], flame_model, out, size=SIZE)
    nan = nodding()
    nan[17, 3] = np.nan
    with pytest.raises(R.RenderError, match="NaN/inf in 1 frame.*first frame 17"):
        R.render_video([R.Panel(nan, "x")], flame_model, out, size=SIZE)
    with pytest.raises(R.RenderError, match="NaN"):
        R.render_frames(nan, flame_model, size=SIZE)
    with pytest.raises(R.RenderError, match="panel 'b' has 40 frames but panel 'a' has 50"):
        R.render_video([R.Panel(nodding(), "a"), R.Panel(nodding(40), "b")], flame_model, out, size=SIZE)
    assert files_in(tmp_path) == ["generic_model.pkl"]


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_video(tmp_path):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"previous video")

    def frames():
        yield np.zeros((10, SIZE, SIZE, 3), np.uint8)
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        R.write_mp4(out, frames(), T, tone(2.0))
    assert files_in(tmp_path) == ["clip.mp4"] and out.read_bytes() == b"previous video"
    with pytest.raises(R.RenderError, match="10 frames were rendered but 50"):
        R.write_mp4(out, iter([np.zeros((10, SIZE, SIZE, 3), np.uint8)]), T)
    assert files_in(tmp_path) == ["clip.mp4"]


# ----------------------------------------------------------------------------------------------
# command line


def request(**overrides) -> DictConfig:
    """``train/conf/render.yaml``'s defaults with ``overrides``."""
    return OmegaConf.merge(OmegaConf.load(ROOT / "train" / "conf" / "render.yaml"), overrides)


def test_a_render_request_is_checked_before_any_file_is_read(tmp_path):
    script = load_script("render")
    missing = str(tmp_path / "absent.npz")  # never opened: every error below comes first
    for overrides, message in [
        (dict(motion=missing, layout="grid"), "layout='grid'; valid: one, sides, gt_vs_gen"),
        (dict(dataset=str(tmp_path)), "dataset= and conversation= go together"),
        ({}, "nothing to render"),
        (dict(motion=missing, layout="gt_vs_gen"), "layout=gt_vs_gen needs motion=NPZ .* and dataset="),
        (dict(motion=missing, dataset=str(tmp_path), conversation="c0"), "layout=one shows one head"),
        (dict(motion=missing, side=2), "side=2: must be 0 or 1"),
        (dict(motion=missing, start=1.0), r"start=1.0: .* \(needs dataset=\)"),
        (dict(dataset=str(tmp_path), conversation="c0", start=-0.5), "start=-0.5"),
    ]:
        with pytest.raises(ValueError, match=message):
            script.check_request(request(**overrides))
    assert script.check_request(request(dataset="d", conversation="c0", layout="sides", side=1, start=0.4)) == ("sides", 1, 10)


def test_layouts_place_the_generated_and_dataset_heads(tmp_path):
    script = load_script("render")
    np.savez(tmp_path / "clip.npz", motion=nodding(20))  # no vad: a dataset layout takes the dataset's
    motion = np.stack([nodding(60), np.zeros((60, FLAME_DIM), np.float32)])
    vad = np.stack([np.arange(60) < 30, np.arange(60) >= 30])
    with DatasetWriter(tmp_path / "data", source="test") as w:
        w.add(Conversation("c0", motion, np.ones((2, 6), bool), np.ones(2, bool), vad, [tone(2.4), tone(2.4, 330.0)]),
              split="train")
    data = dict(dataset=str(tmp_path / "data"), conversation="c0")
    gen = dict(motion=str(tmp_path / "clip.npz"))

    panels, audio = script.build_panels(request(**data, side=1, start=0.4, seconds=1.0))
    assert [p.title for p in panels] == ["c0 side 1"] and len(panels[0].motion) == 25 and len(audio) == 25 * (SAMPLE_RATE // FPS)
    np.testing.assert_array_equal(panels[0].vad, vad[1, 10:35])
    panels, _ = script.build_panels(request(**data, layout="sides"))
    assert [p.title for p in panels] == ["side 0", "side 1"] and len(panels[1].motion) == 60
    panels, _ = script.build_panels(request(**data, **gen, layout="sides", start=0.8))
    assert [p.title for p in panels] == ["generated actor", "partner (side 1)"]
    np.testing.assert_array_equal(panels[0].vad, vad[0, 20:40])  # the generated actor's labels: side 0's, from the start
    np.testing.assert_array_equal(panels[1].motion, motion[1, 20:40])
    panels, _ = script.build_panels(request(**data, **gen, layout="gt_vs_gen", side=1))
    assert [p.title for p in panels] == ["ground truth (side 1)", "generated"]
    np.testing.assert_array_equal(panels[1].partner_vad, vad[0, :20])
    panels, audio = script.build_panels(request(**gen))
    assert [p.title for p in panels] == ["generated"] and panels[0].vad is None and audio is None  # silent, unlabelled
    with pytest.raises(ValueError, match=r"seconds=1.0: .* 0.80 s available"):
        script.build_panels(request(**gen, seconds=1.0))


@pytest.mark.slow
def test_cli_generated_clip_and_dataset_comparison(flame_model, tmp_path, run_entry):
    def run_cli(*overrides: str, cwd: Path):
        return run_entry("render.py", *overrides, cwd=cwd, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))

    np.savez(tmp_path / "clip.npz", motion=nodding(), vad=np.arange(T) < 10)
    sf.write(tmp_path / "a.wav", tone(2.0), SAMPLE_RATE)
    motion = np.stack([nodding(60), np.zeros((60, FLAME_DIM), np.float32)])
    vad = np.stack([np.arange(60) < 30, np.arange(60) >= 30])
    conv = Conversation("c0", motion, np.ones((2, 6), bool), np.ones(2, bool), vad, [tone(2.4), tone(2.4, 330.0)])
    with DatasetWriter(tmp_path / "data", source="test") as w:
        w.add(conv, split="train")

    r = run_cli("motion=clip.npz", f"flame_model={flame_model}", "audio=a.wav", "out=gen/clip.mp4", f"size={SIZE}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    frames, seconds = decode(tmp_path / "gen" / "clip.mp4")
    assert frames.shape == (T, SIZE, SIZE, 3) and seconds == pytest.approx(2.0, abs=0.03)

    r = run_cli("motion=clip.npz", "dataset=data", "conversation=c0", "layout=gt_vs_gen", f"flame_model={flame_model}",
                "out=gen/cmp.mp4", f"size={SIZE}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    frames, seconds = decode(tmp_path / "gen" / "cmp.mp4")
    assert frames.shape == (T, SIZE, 2 * SIZE, 3) and seconds == pytest.approx(2.0, abs=0.03)  # the clip's length

    r = run_cli("motion=clip.npz", "flame_model=FLAME2020/generic_model.pkl", "audio=a.wav", "out=gen/x.mp4", cwd=tmp_path)
    assert r.returncode != 0 and "flame.is.tue.mpg.de" in r.stderr and not (tmp_path / "gen" / "x.mp4").exists()


def test_benchmark_head_has_flames_mesh_size_and_loads_as_a_flame_model(tmp_path):
    from gdpo_listener.evaluation.flame_layer import FlameLayer

    np.savez(tmp_path / "synthetic.npz", **R.synthetic_flame_model())
    layer = FlameLayer(tmp_path / "synthetic.npz")
    assert (layer.n_vertices, len(layer.faces)) == (4990, 9976)  # FLAME 2020: 5023 / 9976
    m = np.zeros((2, FLAME_DIM), np.float32)
    m[1, GROUPS["jaw"].start] = 0.3
    v = layer(torch.as_tensor(m)).numpy()
    moved = np.abs(v[1] - v[0]).sum(1) > 1e-4
    assert 0.02 < moved.mean() < 0.5 and v[1][moved, 1].mean() < v[0][:, 1].mean()  # the jaw opens the lower face
