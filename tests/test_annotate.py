"""VLM text annotation (envs/annotate.py, train/annotate.py) with a tiny vision-language model built here.

The model is a randomly initialised LLaVA (CLIP vision tower + Llama text model) saved with its own
processor, tokenizer and chat template: the Qwen-VL processors of transformers need torchvision
(their video processor), which has no CPU build on the package index this project installs from,
while the LLaVA processor has a PIL image backend. The annotator only uses the interface common to
both (AutoProcessor + AutoModelForImageTextToText + chat template).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from gdpo_listener.envs.annotate import (
    FRAMES_PER_WINDOW,
    TABLE7_PROMPT,
    AnnotationError,
    VideoInfo,
    VLMDescriber,
    clean_description,
    iter_video_frames,
    plan_annotation,
    probe_video,
    run_annotation,
    scaled_size,
    video_frame_index,
    window_frame_indices,
)
from gdpo_listener.envs.dataset import Conversation, DatasetWriter, load_conversation
from gdpo_listener.envs.flame import FLAME_DIM, FPS, N_GROUPS, SAMPLE_RATE

SIZE = 32  # video frame side (pixels)
# conversation id -> (frames, has_motion per side); conv000 has a short last window (420 = 2 * 200 + 20)
CONVS = {"conv000": (420, (True, True)), "conv001": (250, (True, False))}
KEPT = "kept: an existing description"  # conv000 side 0 window 1 is described before annotation


# ----------------------------------------------------------------------------------------------
# fixtures: tiny model, dataset, videos


def build_tiny_vlm(out: Path) -> Path:
    """A random LLaVA with a word-level tokenizer, a 28-pixel CLIP image processor and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    words = ["[UNK]", "system", "user", "assistant", ":", ".", ",", "calm", "happy", "attentive", "skeptical", "nodding",
             "smiling", "raised", "eyebrows", "eyes", "head", "tilted", "looking", "away", "and", "with", "a"]
    vocab = {w: i for i, w in enumerate(words + ["<pad>", "<s>", "</s>", "<image>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    template = (
        "{% for m in messages %}{{ m['role'] }} : "
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %} </s> {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=template)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"]),
        image_token_id=vocab["<image>"], vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-llava")


@pytest.fixture(scope="module")
def describer(tiny_vlm) -> VLMDescriber:
    return VLMDescriber(tiny_vlm, device="cpu", max_new_tokens=6)


def encoded_gray(i) -> np.ndarray:
    """Gray level that identifies video frame ``i`` modulo 32 (steps of 8 survive colour conversion)."""
    return (np.asarray(i) % 32) * 8


def decoded_index(frame: np.ndarray) -> int:
    return int(round(float(frame.mean()) / 8)) % 32


def write_video(path: Path, n_frames: int, fps: int, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    """A video whose frame i is uniform gray :func:`encoded_gray` (i)."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "0"}
        for i in range(n_frames):
            frame = np.full((height, width, 3), encoded_gray(i), np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def make_dataset(out: Path) -> Path:
    """Two conversations (see :data:`CONVS`); expression channel 0 holds frame index / 1000."""
    rng = np.random.default_rng(0)
    with DatasetWriter(out, source="test-annotate") as w:
        for split, (cid, (T, has_motion)) in zip(("train", "test"), CONVS.items()):
            motion = rng.normal(0, 0.1, (2, T, FLAME_DIM)).astype(np.float32)
            motion[:, :, 0] = np.arange(T) / 1000.0
            has = np.array(has_motion)
            motion[~has] = 0.0
            text = [["", KEPT], []] if cid == "conv000" else [[], []]
            conv = Conversation(cid, motion, np.ones((2, N_GROUPS), bool), has, np.zeros((2, T), bool),
                                [np.zeros(T * SAMPLE_RATE // FPS, np.float32)] * 2, text)
            w.add(conv, split)
    return out


def make_videos(out: Path) -> Path:
    """conv000 side 0 at 30 fps (resampled), side 1 at 25 fps; conv001 side 0 as .mkv at 25 fps."""
    out.mkdir(parents=True, exist_ok=True)
    write_video(out / "conv000_s0.mp4", 504, 30)  # 16.8 s = 420 dataset frames
    write_video(out / "conv000_s1.mp4", 420, 25)
    write_video(out / "conv001_s0.mkv", 250, 25)
    return out


@pytest.fixture()
def data(tmp_path) -> tuple[Path, Path]:
    return make_dataset(tmp_path / "ds"), make_videos(tmp_path / "videos")


def read_doc(root: Path, cid: str) -> dict:
    return json.loads((root / "conversations" / f"{cid}.json").read_text())


class Recorder:
    """Wraps a describer; records every clip; raises on call number ``kill_at`` (1-based)."""

    def __init__(self, inner=None, kill_at: int | None = None, label: str = ""):
        self.inner, self.kill_at, self.label = inner, kill_at, label
        self.calls: list[list[np.ndarray]] = []

    def __call__(self, clips):
        if self.kill_at is not None and len(self.calls) + 1 == self.kill_at:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append(clips)
        if self.inner is not None:
            return self.inner(clips)
        return [f"{self.label} {len(self.calls)}.{j}" for j in range(len(clips))]

    @property
    def n_clips(self) -> int:
        return sum(len(c) for c in self.calls)


# ----------------------------------------------------------------------------------------------
# frame conventions


def test_window_frames_are_segment_centres():
    np.testing.assert_array_equal(window_frame_indices(420, 0), [12, 37, 62, 87, 112, 137, 162, 187])
    np.testing.assert_array_equal(window_frame_indices(420, 2), [401, 403, 406, 408, 411, 413, 416, 418])  # 20-frame tail
    np.testing.assert_array_equal(window_frame_indices(4, 0), [0, 0, 1, 1, 2, 2, 3, 3])
    with pytest.raises(ValueError, match="window 3"):
        window_frame_indices(420, 3)


def test_video_frame_index_maps_frame_centres():
    f = np.array([0, 1, 2, 24, 49])
    np.testing.assert_array_equal(video_frame_index(f, 25), f)
    np.testing.assert_array_equal(video_frame_index(f, 30), [0, 1, 3, 29, 59])  # floor((f + 0.5) * 30 / 25)
    np.testing.assert_array_equal(video_frame_index(f, 12.5), [0, 0, 1, 12, 24])
    from fractions import Fraction

    np.testing.assert_array_equal(video_frame_index(np.array([24, 1000]), Fraction(30000, 1001)), [29, 1199])


def test_helpers():
    assert scaled_size(1920, 1080, 448) == (448, 252)
    assert scaled_size(32, 24, 448) == (32, 24)
    assert clean_description('  \n "Calm and focused,\t looking   away."\nsecond line') == "Calm and focused, looking away."
    assert clean_description(" \n ") == ""
    assert TABLE7_PROMPT.startswith("Describe the person’s facial expression in a single concise sentence.\n1. The specific Emotion:")
    assert TABLE7_PROMPT.endswith("4. Attentive and focused, staring directly ahead with a slight nod.")
    assert len(TABLE7_PROMPT.splitlines()) == 12  # Table 7: task, 2 asks, Rules + 3, Examples + 4


def test_video_frames_follow_the_fps_mapping(tmp_path):
    info = probe_video(write_video(tmp_path / "v.mp4", 60, 30, size=(64, 48)))
    assert (info.fps, info.n_frames, info.width, info.height) == (30, 60, 64, 48)
    frames = np.array([0, 1, 2, 24, 49, 49])
    got = list(iter_video_frames(info, frames, 50, "test side", max_side=32))
    assert [g.shape for g in got] == [(24, 32, 3)] * len(frames)
    assert [decoded_index(g) for g in got] == list(encoded_gray(video_frame_index(frames, 30)) // 8)


def test_video_shorter_than_motion_is_an_error_naming_it(data):
    root, videos = data
    short = write_video(videos / "conv000_s1.mp4", 300, 25)  # 12 s for 16.8 s of motion
    with pytest.raises(AnnotationError, match=r"conv000_s1\.mp4 is shorter than the motion of conversation 'conv000' side 1"):
        plan_annotation(root, videos)
    # a container that does not state its length is caught while decoding, still naming the file
    info = VideoInfo(short, probe_video(short).fps, None, SIZE, SIZE)
    with pytest.raises(AnnotationError, match="conv000_s1.mp4 is shorter"):
        list(iter_video_frames(info, window_frame_indices(420, 2), 420, "conversation 'conv000' side 1"))
    # within the tolerance (2 frames) the last frame stands in
    write_video(videos / "conv000_s1.mp4", 419, 25)
    assert plan_annotation(root, videos).n_todo == 7


def test_missing_frame_source_names_the_side(data, tmp_path):
    root, videos = data
    (videos / "conv001_s0.mkv").unlink()
    with pytest.raises(AnnotationError, match=r"conversation 'conv001' side 0: no video conv001_s0\.<mp4.*no flame_model="):
        plan_annotation(root, videos)
    write_video(videos / "conv001_s0.mp4", 250, 25)
    write_video(videos / "conv001_s0.mov", 250, 25)
    with pytest.raises(AnnotationError, match="several videos for conversation 'conv001' side 0"):
        plan_annotation(root, videos)


# ----------------------------------------------------------------------------------------------
# end to end with the tiny model


def test_annotates_every_window_once_with_the_tiny_vlm(data, describer):
    root, videos = data
    plan = plan_annotation(root, videos)
    # conv000: 3 windows x 2 sides, one kept; conv001: 2 windows, side 1 is audio-only
    assert (plan.total, plan.skipped, plan.n_todo) == (8, 1, 7)
    rec = Recorder(describer)
    stats = run_annotation(plan, rec, batch_size=3, provenance=describer.provenance(), progress=False)
    assert (stats.described, stats.conversations) == (7, 2)
    assert [len(c) for c in rec.calls] == [3, 2, 2]  # batches never span conversations
    assert all(clip.shape == (FRAMES_PER_WINDOW, SIZE, SIZE, 3) and clip.dtype == np.uint8 for c in rec.calls for clip in c)
    # conv000 side 0 window 0 (30 fps video) shows video frames floor((f + 0.5) * 30 / 25)
    expected = encoded_gray(video_frame_index(window_frame_indices(420, 0), 30)) // 8
    assert [decoded_index(f) for f in rec.calls[0][0]] == list(expected)

    for cid, (T, has_motion) in CONVS.items():
        conv = load_conversation(root, cid, audio=False)
        doc = read_doc(root, cid)
        n_win = -(-T // 200)
        for side in range(2):
            if not has_motion[side]:
                assert conv.text[side] == [""] * n_win and doc["annotation"]["done"][side] == [False] * n_win
                continue
            assert len(conv.text[side]) == n_win and all(isinstance(t, str) for t in conv.text[side])
        assert doc["annotation"]["model"] == str(describer.path) and doc["n_frames"] == T
    assert read_doc(root, "conv000")["text"][0][1] == KEPT
    assert read_doc(root, "conv000")["annotation"]["done"] == [[True, False, True], [True, True, True]]
    # a second run finds nothing to do; overwrite=True redoes every window with motion
    assert plan_annotation(root, videos).n_todo == 0
    assert plan_annotation(root, videos, overwrite=True).n_todo == 8


def test_prompt_reaches_the_chat(describer):
    clip = np.zeros((FRAMES_PER_WINDOW, SIZE, SIZE, 3), np.uint8)
    msgs = describer.messages(clip)
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": TABLE7_PROMPT}]}
    assert [c["type"] for c in msgs[1]["content"]] == ["image"] * FRAMES_PER_WINDOW
    text = describer.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert TABLE7_PROMPT in text and text.count("<image>") == FRAMES_PER_WINDOW


def test_batched_answers_equal_one_by_one(describer):
    """Left padding: a clip's description does not depend on the other clips of its batch."""
    rng = np.random.default_rng(1)
    clips = [rng.integers(0, 256, (FRAMES_PER_WINDOW, 24 + 8 * i, SIZE, 3), dtype=np.uint8) for i in range(3)]
    batched = describer(clips)
    assert len(batched) == 3 and batched == [describer([c])[0] for c in clips]


def test_killed_run_resumes_without_redoing_work(data, describer):
    root, videos = data
    # kill 1: in the second batch of conv000 -> its first batch (side 0 windows 0 and 2) is saved
    first = Recorder(kill_at=2, label="first")
    with pytest.raises(KeyboardInterrupt):
        run_annotation(plan_annotation(root, videos), first, batch_size=2, progress=False)
    doc = read_doc(root, "conv000")
    assert doc["text"][0] == ["first 1.0", KEPT, "first 1.1"] and doc["annotation"]["done"][1] == [False] * 3
    assert "annotation" not in read_doc(root, "conv001")

    # kill 2: after conv000 is complete, on the first batch of conv001
    second = Recorder(kill_at=3, label="second")
    plan = plan_annotation(root, videos)
    assert plan.n_todo == 5
    with pytest.raises(KeyboardInterrupt):
        run_annotation(plan, second, batch_size=2, progress=False)
    assert second.n_clips == 3  # conv000 side 1 only
    assert read_doc(root, "conv000")["text"] == [["first 1.0", KEPT, "first 1.1"], ["second 1.0", "second 1.1", "second 2.0"]]

    # resume with the tiny model: only conv001's two windows are left
    rec = Recorder(describer)
    stats = run_annotation(plan_annotation(root, videos), rec, batch_size=4, provenance=describer.provenance(), progress=False)
    assert rec.n_clips == 2 and stats.described == 2 and stats.skipped == 6
    assert read_doc(root, "conv000")["text"][0] == ["first 1.0", KEPT, "first 1.1"]
    assert len(load_conversation(root, "conv001", audio=False).text[0]) == 2
    assert plan_annotation(root, videos).n_todo == 0


def test_empty_answers_are_done_and_not_asked_again(data):
    root, videos = data
    stats = run_annotation(plan_annotation(root, videos), lambda clips: ["  \n "] * len(clips), batch_size=8, progress=False)
    assert stats.described == 7 and read_doc(root, "conv000")["text"] == [["", KEPT, ""], ["", "", ""]]
    assert plan_annotation(root, videos).n_todo == 0  # marked done in the same file


def test_sides_without_video_are_rendered_from_their_motion(data, tmp_path):
    root, videos = data
    (videos / "conv001_s0.mkv").unlink()
    flame = tmp_path / "generic_model.pkl"
    flame.write_bytes(b"stand-in: the renderer below does not read it")
    seen = []

    def fake_render(motion, flame_model, size=512):
        seen.append((motion.copy(), flame_model, size))
        frame_idx = np.round(motion[:, 0] * 1000).astype(int)  # channel 0 holds frame / 1000
        return np.broadcast_to(encoded_gray(frame_idx)[:, None, None, None], (len(motion), size, size, 3)).astype(np.uint8)

    rec = Recorder(label="r")
    plan = plan_annotation(root, videos, flame_model=flame)
    run_annotation(plan, rec, batch_size=4, flame_model=flame, render=fake_render, render_size=16, progress=False)
    assert len(seen) == 1 and seen[0][1] == flame and seen[0][2] == 16
    want = np.concatenate([window_frame_indices(250, k) for k in range(2)])  # conv001 side 0, windows 0 and 1
    np.testing.assert_array_equal(np.round(seen[0][0][:, 0] * 1000).astype(int), want)
    conv001 = rec.calls[-1]
    assert [decoded_index(f) for f in conv001[1]] == list(encoded_gray(window_frame_indices(250, 1)) // 8)
    assert read_doc(root, "conv001")["text"][0] == ["r 3.0", "r 3.1"]


def test_project_renderer_fills_in_for_a_missing_video(data, tmp_path, flame_kit):
    """The real gdpo_listener.evaluation.render.render_frames with the tests' tiny FLAME-layout model
    (conftest's flame_kit.renderable_model)."""
    root, videos = data
    (videos / "conv001_s0.mkv").unlink()
    flame = flame_kit.write_pkl(tmp_path / "generic_model.pkl", flame_kit.renderable_model())
    rec = Recorder(label="render")
    run_annotation(plan_annotation(root, videos, flame_model=flame), rec, batch_size=4, flame_model=flame,
                   render_size=32, progress=False)
    rendered = rec.calls[-1]  # conv001 side 0: 2 windows
    assert [c.shape for c in rendered] == [(FRAMES_PER_WINDOW, 32, 32, 3)] * 2
    assert all(c.std() > 0 for c in rendered)  # a head is drawn, not a blank image
    assert read_doc(root, "conv001")["text"][0] == ["render 3.0", "render 3.1"]


@pytest.mark.slow
def test_cli_end_to_end(data, tiny_vlm, run_entry, tmp_path):
    root, videos = data
    (root / "conversations" / "conv000.json").write_text(json.dumps({"text": [[], []], "n_frames": 420}))
    args = [f"dataset={root}", f"videos={videos}", f"vlm={tiny_vlm}", "batch_size=4", "max_new_tokens=4", "progress=false", "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = run_entry("annotate.py", *args, cwd=tmp_path, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "8 windows, 0 already described, 8 to describe" in r.stdout and "described 8 window(s)" in r.stdout
    assert all(len(load_conversation(root, c, audio=False).text[0]) == -(-CONVS[c][0] // 200) for c in CONVS)
    # a short video stops the CLI before the model is loaded, naming the file
    write_video(videos / "conv001_s0.mkv", 100, 25)
    r = run_entry("annotate.py", *args, "overwrite=true", cwd=tmp_path, timeout=300, env=env)
    assert r.returncode == 1 and "conv001_s0.mkv is shorter than the motion" in r.stderr
