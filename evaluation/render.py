"""Mesh videos of FLAME motion: shaded heads rendered on the CPU without a display, MP4 with audio.

Rasterising is OpenGL 3.3 through ``moderngl`` on a headless EGL context; on a machine without a
GPU, Mesa's ``llvmpipe`` driver runs it on the CPU (Debian: ``libegl1 libegl-mesa0
libgl1-mesa-dri``). Encoding and muxing is ``av`` (PyAV, FFmpeg libraries in the wheel): H.264
video (``libx264``, ``yuv420p``) and AAC audio in one MP4.

The FLAME head model is licence-gated and never shipped with this project (see
:data:`FLAME_MODEL_HINT`); vertices come from :class:`~gdpo_listener.evaluation.flame_layer.FlameLayer`.

Conventions, written once:

- FLAME space: metres, +y up, the face looks along +z. The camera is fixed for a whole video: it
  sits on the +z axis of the bounding sphere of the *rest* head (zero motion) and looks at its
  centre, so head rotations and translations of the mesh show as motion on screen.
- Images are ``(H, W, 3)`` uint8 RGB, row 0 at the top (OpenGL's bottom-up rows are flipped once,
  in :meth:`MeshRenderer.render`).
- Matrices are row-major numpy ``(4, 4)`` acting on column vectors; they are transposed once when
  written to the shader (GLSL is column-major).
- Video runs at :data:`~gdpo_listener.envs.flame.FPS` (25) frames/s; frame ``k`` owns audio
  samples ``[k sr / fps, (k + 1) sr / fps)``.
- Activity marking per panel and frame (the dataset's convention): *speaking* = this side's
  VAD; *listening* = the partner's VAD and not this side's; otherwise *silent* (or *not speaking*
  when the partner's VAD is unknown).

Public names: :func:`render_frames` (one head, no labels; ``(T, size, size, 3)``),
:class:`MeshRenderer`, :class:`HeadRenderer`, :class:`Panel`, :func:`render_video` (panels side
by side with labels, audio muxed in), :func:`write_mp4`, :func:`benchmark`.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..envs.flame import FLAME_DIM, FPS, SAMPLE_RATE

__all__ = [
    "FLAME_MODEL_HINT",
    "RenderError",
    "check_motion",
    "require_flame_model",
    "perspective",
    "look_at",
    "face_incidence",
    "vertex_normals",
    "MeshRenderer",
    "HeadRenderer",
    "render_frames",
    "Panel",
    "activity_states",
    "default_label_height",
    "label_bar",
    "write_mp4",
    "render_video",
    "synthetic_flame_model",
    "benchmark",
]

FLAME_MODEL_HINT = (
    "The FLAME head model is licence-gated and never shipped with this project: register at "
    "https://flame.is.tue.mpg.de, download FLAME 2020 and pass its generic_model.pkl "
    "(e.g. flame_model=FLAME2020/generic_model.pkl)."
)
CHUNK = 64  # frames per FLAME / rasterising batch (bounds memory on long clips)

# activity codes per frame (see module docstring)
SILENT, SPEAKING, LISTENING, NOT_SPEAKING = 0, 1, 2, 3
ACTIVITY_TEXT = {SILENT: "silent", SPEAKING: "speaking", LISTENING: "listening", NOT_SPEAKING: "not speaking"}
DIVIDER = (150, 152, 158)  # RGB of the line between panels
ACTIVITY_COLOR = {SILENT: (120, 120, 120), SPEAKING: (214, 69, 65), LISTENING: (46, 160, 67), NOT_SPEAKING: (120, 120, 120)}


class RenderError(ValueError):
    """Inputs to the renderer (motion, activity, audio, sizes) are unusable; names the bad value."""


# ----------------------------------------------------------------------------------------------
# input checks (all run before any frame is rendered or written)


def check_motion(motion, name: str = "motion") -> np.ndarray:
    """``(T, 67)`` finite raw FLAME frames as float32; :class:`RenderError` naming ``name`` otherwise."""
    m = np.asarray(motion)
    if m.ndim != 2 or m.shape[1] != FLAME_DIM:
        raise RenderError(f"{name} must have shape (T, {FLAME_DIM}) (raw FLAME frames), got {m.shape}")
    if m.shape[0] < 1:
        raise RenderError(f"{name} has no frames")
    if not np.issubdtype(m.dtype, np.number):
        raise RenderError(f"{name} has dtype {m.dtype}, expected numbers")
    bad = ~np.isfinite(m)
    if bad.any():
        frames = np.flatnonzero(bad.any(1))
        raise RenderError(f"{name} has NaN/inf in {len(frames)} frame(s), first frame {frames[0]} "
                          f"(channel {int(np.flatnonzero(bad[frames[0]])[0])})")
    return m.astype(np.float32)


def require_flame_model(path) -> Path:
    """The FLAME model path if the file exists, else :class:`FileNotFoundError` saying where it comes from."""
    if path is None or str(path).strip() in ("", "None", "null", "???"):
        raise FileNotFoundError(f"no FLAME model file given. {FLAME_MODEL_HINT}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"FLAME model file {p} does not exist. {FLAME_MODEL_HINT}")
    return p


def _check_size(size: int) -> int:
    size = int(size)
    if size < 16 or size % 2:
        raise RenderError(f"size={size}: need an even number of pixels >= 16 (H.264 4:2:0 needs even sizes)")
    return size


# ----------------------------------------------------------------------------------------------
# camera and shading maths


def perspective(fov_y_deg: float, aspect: float, near: float, far: float) -> np.ndarray:
    """OpenGL projection matrix ``(4, 4)``: view space (camera looks along -z) -> clip space."""
    f = 1.0 / math.tan(math.radians(fov_y_deg) / 2)
    return np.array([
        [f / aspect, 0, 0, 0],
        [0, f, 0, 0],
        [0, 0, (far + near) / (near - far), 2 * far * near / (near - far)],
        [0, 0, -1, 0],
    ])


def look_at(eye, target, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """View matrix ``(4, 4)``: world -> view space (camera at ``eye`` looking at ``target``, +y up)."""
    eye, target, up = (np.asarray(a, dtype=np.float64) for a in (eye, target, up))
    back = eye - target
    back /= np.linalg.norm(back)
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    true_up = np.cross(back, right)
    R = np.stack([right, true_up, back])  # rows: view axes in world coordinates
    M = np.eye(4)
    M[:3, :3] = R
    M[:3, 3] = -R @ eye
    return M


def head_camera(rest_vertices: np.ndarray, aspect: float = 1.0, fov_y_deg: float = 20.0, margin: float = 1.08):
    """``(view, projection)`` framing the bounding sphere of ``rest_vertices (V, 3)`` from the front (+z)."""
    lo, hi = rest_vertices.min(0), rest_vertices.max(0)
    center = (lo + hi) / 2
    radius = float(np.linalg.norm(rest_vertices - center, axis=1).max())
    radius = max(radius, 1e-6)
    half = math.radians(fov_y_deg) / 2
    half = min(half, math.atan(math.tan(half) * aspect))  # the narrower of the two fields of view
    dist = margin * radius / math.sin(half)
    view = look_at(center + np.array([0.0, 0.0, dist]), center)
    return view, perspective(fov_y_deg, aspect, max(dist - 3 * radius, dist * 1e-3), dist + 3 * radius)


def face_incidence(faces: np.ndarray, n_vertices: int):
    """Sparse ``(V, F)`` matrix with a 1 where vertex v is a corner of face f."""
    from scipy.sparse import csr_matrix

    F = len(faces)
    return csr_matrix((np.ones(3 * F, np.float32), (np.asarray(faces).reshape(-1), np.repeat(np.arange(F), 3))),
                      shape=(n_vertices, F))


def vertex_normals(vertices: np.ndarray, faces: np.ndarray, incidence=None) -> np.ndarray:
    """Area-weighted unit vertex normals ``(N, V, 3)`` of meshes ``vertices (N, V, 3)``, ``faces (F, 3)``.

    A vertex normal is the sum of the cross products ``(b - a) x (c - a)`` (2 x area x unit normal)
    of the faces around it, normalised; ``incidence`` (:func:`face_incidence`) may be passed to reuse it.
    """
    v = np.asarray(vertices, dtype=np.float32)
    N, V = v.shape[:2]
    A = face_incidence(faces, V) if incidence is None else incidence
    a, b, c = v[:, faces[:, 0]], v[:, faces[:, 1]], v[:, faces[:, 2]]  # (N, F, 3)
    fn = np.cross(b - a, c - a)  # (N, F, 3)
    F = fn.shape[1]
    n = (A @ fn.transpose(1, 0, 2).reshape(F, N * 3)).reshape(V, N, 3).transpose(1, 0, 2)  # (N, V, 3)
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------------------
# rasterising

_VERTEX_SHADER = """
#version 330
uniform mat4 model_view;
uniform mat4 projection;
in vec3 in_position;
in vec3 in_normal;
out vec3 v_position;   // view space
out vec3 v_normal;     // view space
void main() {
    vec4 p = model_view * vec4(in_position, 1.0);
    v_position = p.xyz;
    v_normal = mat3(model_view) * in_normal;   // rigid view matrix: its rotation part maps normals
    gl_Position = projection * p;
}
"""

# Blinn-Phong: ambient + key light (upper left, front) + fill light (right) + a little specular;
# two-sided (a back face is lit with its flipped normal), light directions in view space.
_FRAGMENT_SHADER = """
#version 330
uniform vec3 albedo;
in vec3 v_position;
in vec3 v_normal;
out vec4 out_color;
const vec3 KEY = normalize(vec3(-0.45, 0.55, 1.0));
const vec3 FILL = normalize(vec3(0.8, 0.0, 0.5));
void main() {
    vec3 n = normalize(v_normal);
    if (!gl_FrontFacing) n = -n;
    vec3 to_eye = normalize(-v_position);
    float diffuse = 0.78 * max(dot(n, KEY), 0.0) + 0.30 * max(dot(n, FILL), 0.0);
    float specular = 0.18 * pow(max(dot(n, normalize(KEY + to_eye)), 0.0), 40.0);
    vec3 c = albedo * (0.20 + diffuse) + vec3(specular);
    out_color = vec4(clamp(c, 0.0, 1.0), 1.0);
}
"""


class MeshRenderer:
    """Shaded triangle meshes of a fixed topology -> RGB images, headless on the CPU (or a GPU).

    >>> r = MeshRenderer(faces, n_vertices, size=512, view=view, projection=proj)
    >>> images = r.render(vertices)            # (N, V, 3) -> (N, size, size, 3) uint8

    ``viewport_height`` < ``size`` draws the mesh in the bottom rows only (room for a label bar
    on top; pass a projection of aspect ``size / viewport_height``). ``samples`` > 0 turns on
    multisample anti-aliasing (smoother edges, about 2.5x slower on llvmpipe).
    """

    def __init__(self, faces: np.ndarray, n_vertices: int, size: int, view: np.ndarray, projection: np.ndarray,
                 viewport_height: int | None = None, samples: int = 0,
                 background: Sequence[float] = (0.95, 0.95, 0.96)):
        import moderngl

        self.size = _check_size(size)
        self.viewport_height = self.size if viewport_height is None else int(viewport_height)
        if not 0 < self.viewport_height <= self.size:
            raise RenderError(f"viewport_height={viewport_height} must be in (0, {self.size}]")
        faces = np.ascontiguousarray(faces, dtype=np.int32)
        if faces.ndim != 2 or faces.shape[1] != 3 or faces.size == 0 or faces.min() < 0 or faces.max() >= n_vertices:
            raise RenderError(f"faces must be (F, 3) indices into {n_vertices} vertices, got shape {faces.shape}")
        self.n_vertices = int(n_vertices)
        self.background = tuple(float(c) for c in background)
        self.faces = faces
        self._incidence = face_incidence(faces, self.n_vertices)
        try:
            self.ctx = moderngl.create_standalone_context(backend="egl")
        except Exception as e:  # noqa: BLE001 - re-raised with what to install
            raise RuntimeError(f"cannot create a headless OpenGL 3.3 context through EGL ({type(e).__name__}: {e}); "
                               f"on Debian/Ubuntu install libegl1 libegl-mesa0 libgl1-mesa-dri (Mesa llvmpipe renders on the CPU)") from e
        ctx = self.ctx
        ctx.gc_mode = None  # GL objects are freed by release() (or when this renderer is collected), see there
        self._released = False
        self.program = ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        self.program["model_view"].write(np.ascontiguousarray(view.T, dtype=np.float32).tobytes())
        self.program["projection"].write(np.ascontiguousarray(projection.T, dtype=np.float32).tobytes())
        self.vbo = ctx.buffer(reserve=self.n_vertices * 6 * 4)  # interleaved position, normal (float32)
        self.ibo = ctx.buffer(faces.tobytes())
        self.vao = ctx.vertex_array(self.program, [(self.vbo, "3f 3f", "in_position", "in_normal")], index_buffer=self.ibo)
        wh = (self.size, self.size)
        self.samples = int(samples)
        self.fbo = ctx.framebuffer([ctx.renderbuffer(wh, 4, samples=self.samples)], ctx.depth_renderbuffer(wh, samples=self.samples))
        self.resolved = ctx.framebuffer([ctx.renderbuffer(wh, 4)]) if self.samples else self.fbo

    def render(self, vertices: np.ndarray, color: Sequence[float] = (0.78, 0.76, 0.74)) -> np.ndarray:
        """``vertices (N, V, 3)`` (float) -> ``(N, size, size, 3)`` uint8, row 0 at the top."""
        if self._released:
            raise RenderError("this renderer was released")
        v = np.asarray(vertices, dtype=np.float32)
        if v.ndim != 3 or v.shape[1:] != (self.n_vertices, 3):
            raise RenderError(f"vertices must be (N, {self.n_vertices}, 3), got {v.shape}")
        normals = vertex_normals(v, self.faces, self._incidence)  # (N, V, 3)
        interleaved = np.ascontiguousarray(np.concatenate([v, normals], -1), dtype=np.float32)  # (N, V, 6)
        out = np.empty((len(v), self.size, self.size, 3), np.uint8)
        with self.ctx:  # this renderer's context is current while it draws (others may live in the process)
            self.program["albedo"].value = tuple(float(c) for c in color)
            self._draw(interleaved, out)
        return out

    def _draw(self, interleaved: np.ndarray, out: np.ndarray) -> None:
        import moderngl

        ctx = self.ctx
        for i in range(len(interleaved)):
            self.fbo.use()
            ctx.viewport = (0, 0, self.size, self.size)
            self.fbo.clear(*self.background, 1.0, depth=1.0)
            ctx.viewport = (0, 0, self.size, self.viewport_height)  # GL rows go bottom-up: the bottom part
            ctx.enable(moderngl.DEPTH_TEST)
            self.vbo.write(interleaved[i].tobytes())
            self.vao.render(moderngl.TRIANGLES)
            if self.samples:
                ctx.copy_framebuffer(self.resolved, self.fbo)
            img = np.frombuffer(self.resolved.read(components=3, alignment=1), np.uint8).reshape(self.size, self.size, 3)  # (S, S, 3)
            out[i] = img[::-1]

    def release(self) -> None:
        """Free the GL objects, then the context (idempotent).

        Each object is deleted while its own context is current: an object left to the garbage
        collector after its context is gone would be deleted in whichever context is current
        then, and GL object names repeat across contexts, so it would delete another renderer's
        framebuffer or buffer (that renderer then draws black frames).
        """
        if self._released:
            return
        self._released = True
        with self.ctx:
            for obj in self._gl_objects():
                obj.release()
        self.ctx.release()

    def _gl_objects(self) -> list:
        """Every GL object this renderer created (those that exist: ``__init__`` may have failed half-way)."""
        objs = [getattr(self, name, None) for name in ("vao", "ibo", "vbo", "program")]
        fbos = [f for f in {id(f): f for f in (getattr(self, "fbo", None), getattr(self, "resolved", None)) if f is not None}.values()]
        attachments = [a for f in fbos for a in (*f.color_attachments, f.depth_attachment)]
        return [o for o in objs + fbos + attachments if o is not None]

    def __del__(self) -> None:
        if getattr(self, "_released", True) is False:
            self.release()


class HeadRenderer:
    """FLAME motion ``(T, 67)`` -> shaded head images, one fixed camera framing the rest head.

    ``label_height`` pixels at the top are left to a label bar (the head is framed below it).
    """

    def __init__(self, flame_model, size: int = 512, label_height: int = 0, samples: int = 0):
        from .flame_layer import FlameLayer

        path = require_flame_model(flame_model)
        self.size = _check_size(size)
        self.flame = FlameLayer(path)
        rest = self.flame.v_template.numpy()  # (V, 3): zero motion = the template
        vp = self.size - int(label_height)
        view, proj = head_camera(rest, aspect=self.size / vp)
        self.renderer = MeshRenderer(self.flame.faces.numpy(), self.flame.n_vertices, self.size, view, proj,
                                     viewport_height=vp, samples=samples)

    def vertices(self, motion: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.flame(torch.as_tensor(motion, dtype=torch.float64)).numpy().astype(np.float32)  # (N, V, 3)

    def chunks(self, motion: np.ndarray, color=(0.78, 0.76, 0.74), chunk: int = CHUNK) -> Iterator[np.ndarray]:
        """Images of ``motion`` (checked first) in chunks of ``chunk`` frames, each ``(n, S, S, 3)``."""
        m = check_motion(motion)
        for s in range(0, len(m), chunk):
            yield self.renderer.render(self.vertices(m[s:s + chunk]), color)

    def release(self) -> None:
        self.renderer.release()


def render_frames(motion: np.ndarray, flame_model: str | Path, size: int = 512) -> np.ndarray:
    """One head, no labels: raw FLAME ``motion (T, 67)`` -> ``(T, size, size, 3)`` uint8 images.

    Fixed camera in front of the rest head (see the module docstring). Raises
    :class:`RenderError` for motion of the wrong shape or with NaN, :class:`FileNotFoundError`
    (saying where FLAME comes from) for a missing model file, both before rendering anything.
    """
    m = check_motion(motion)
    path = require_flame_model(flame_model).resolve()
    head = _cached_head(str(path), path.stat().st_mtime_ns, _check_size(size))
    return np.concatenate(list(head.chunks(m)), 0)


@lru_cache(maxsize=2)
def _cached_head(path: str, mtime_ns: int, size: int) -> "HeadRenderer":
    """One renderer (GL context + FLAME layer) per model file version and size, reused across
    :func:`render_frames` calls (annotation renders window after window)."""
    return HeadRenderer(path, size)


# ----------------------------------------------------------------------------------------------
# panels, activity labels


@dataclass
class Panel:
    """One head of a layout: its motion, a title, and the VAD of its side and of its partner.

    ``vad`` / ``partner_vad``: ``(T,)`` bool or None (unknown). ``color``: RGB albedo in [0, 1].
    """

    motion: np.ndarray
    title: str
    vad: np.ndarray | None = None
    partner_vad: np.ndarray | None = None
    color: tuple[float, float, float] = (0.78, 0.76, 0.74)


def activity_states(vad: np.ndarray | None, partner_vad: np.ndarray | None, n_frames: int) -> np.ndarray | None:
    """Per-frame codes ``(T,)``: SPEAKING, LISTENING, SILENT, or NOT_SPEAKING (partner unknown).

    None when this side's VAD is unknown (no activity is marked).
    """
    if vad is None:
        return None
    v = np.asarray(vad, dtype=bool)
    if v.shape != (n_frames,):
        raise RenderError(f"VAD must have shape ({n_frames},) like the motion, got {v.shape}")
    if partner_vad is None:
        return np.where(v, SPEAKING, NOT_SPEAKING).astype(np.int8)
    p = np.asarray(partner_vad, dtype=bool)
    if p.shape != (n_frames,):
        raise RenderError(f"partner VAD must have shape ({n_frames},) like the motion, got {p.shape}")
    return np.select([v, p], [SPEAKING, LISTENING], SILENT).astype(np.int8)


def default_label_height(size: int) -> int:
    """Pixels of the label bar on top of a ``size``-pixel panel: 6 % of it, at least 12 (legible text)."""
    return max(12, round(size * 0.06))


def label_bar(width: int, height: int, title: str, state: int | None) -> np.ndarray:
    """A ``(height, width, 3)`` uint8 bar: the panel title on the left, the activity (coloured dot
    and word) on the right."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), (34, 36, 40))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, int(height * 0.6)))
    pad = max(2, height // 4)
    draw.text((pad, height / 2), title, fill=(235, 235, 235), font=font, anchor="lm")
    if state is not None:
        word = ACTIVITY_TEXT[int(state)]
        x = width - pad - draw.textlength(word, font=font)
        draw.text((x, height / 2), word, fill=(235, 235, 235), font=font, anchor="lm")
        r = height * 0.22
        cx = x - pad - r
        draw.ellipse((cx - r, height / 2 - r, cx + r, height / 2 + r), fill=ACTIVITY_COLOR[int(state)])
    return np.asarray(img, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# MP4 writing


def _fit_audio(audio: np.ndarray, n_samples: int) -> np.ndarray:
    a = np.asarray(audio, dtype=np.float32).reshape(-1)[:n_samples]
    return np.pad(a, (0, n_samples - len(a)))


def _partial_path(out: Path) -> Path:
    return out.with_name(f".{out.stem}.partial-{os.getpid()}{out.suffix}")


def write_mp4(out: str | os.PathLike, frames: Iterable[np.ndarray], n_frames: int, audio: np.ndarray | None = None,
              sample_rate: int = SAMPLE_RATE, fps: int = FPS, crf: int = 18, preset: str = "veryfast",
              threads: int = 0) -> Path:
    """Encode ``frames`` (an iterable of ``(n, H, W, 3)`` uint8 chunks, ``n_frames`` in all) as H.264
    with ``audio`` (mono float32 in [-1, 1], trimmed or zero-padded to ``n_frames / fps`` s) as AAC.

    Atomic: written to a hidden partial file beside ``out`` and renamed when complete; on any
    error the partial file is removed and ``out`` is untouched.
    """
    import av

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if audio is not None and not np.isfinite(np.asarray(audio)).all():
        raise RenderError("audio has NaN/inf samples")
    spf = sample_rate / fps  # audio samples per video frame
    wav = None if audio is None else _fit_audio(audio, int(round(n_frames * spf)))
    tmp = _partial_path(out)
    written = 0
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            video = None
            sound = None
            if wav is not None:
                sound = container.add_stream("aac", rate=int(sample_rate), layout="mono")
            for chunk in frames:
                chunk = np.asarray(chunk)
                if video is None:
                    if chunk.ndim != 4 or chunk.shape[-1] != 3 or chunk.dtype != np.uint8 or chunk.shape[1] % 2 or chunk.shape[2] % 2:
                        raise RenderError(f"frames must be (n, H, W, 3) uint8 with even H and W, got {chunk.shape} {chunk.dtype}")
                    video = container.add_stream("libx264", rate=int(fps))
                    video.height, video.width = chunk.shape[1], chunk.shape[2]
                    video.pix_fmt = "yuv420p"
                    video.options = {"crf": str(int(crf)), "preset": str(preset)}
                    video.codec_context.thread_count = int(threads)
                for img in chunk:
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                    frame.pts = written
                    container.mux(video.encode(frame))
                    written += 1
                if sound is not None:  # the audio of the frames written so far
                    lo, hi = int(round((written - len(chunk)) * spf)), int(round(written * spf))
                    af = av.AudioFrame.from_ndarray(wav[None, lo:hi], format="flt", layout="mono")
                    af.sample_rate = int(sample_rate)
                    af.pts = lo
                    container.mux(sound.encode(af))
            if written != n_frames:
                raise RenderError(f"{written} frames were rendered but {n_frames} were announced")
            container.mux(video.encode(None))
            if sound is not None:
                container.mux(sound.encode(None))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------
# layouts -> MP4


def render_video(panels: Sequence[Panel], flame_model, out: str | os.PathLike, audio: np.ndarray | None = None,
                 sample_rate: int = SAMPLE_RATE, size: int = 512, samples: int = 0, crf: int = 18,
                 preset: str = "veryfast", threads: int = 0, label_height: int | None = None,
                 progress: bool = False) -> Path:
    """Panels side by side (one head each, in order), a label bar on each, audio muxed in -> MP4.

    Every input is checked before the first frame is rendered: motions ``(T, 67)`` finite and of
    one length T, VADs ``(T,)``, the FLAME model file present, audio finite. Output: ``T`` frames
    of ``size x (size * len(panels))`` at 25 fps.
    """
    if not panels:
        raise RenderError("no panel to render")
    size = _check_size(size)
    motions = [check_motion(p.motion, f"motion of panel {p.title!r}") for p in panels]
    T = len(motions[0])
    for p, m in zip(panels, motions):
        if len(m) != T:
            raise RenderError(f"panel {p.title!r} has {len(m)} frames but panel {panels[0].title!r} has {T}")
    states = [activity_states(p.vad, p.partner_vad, T) for p in panels]
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or not np.isfinite(audio).all():
            raise RenderError(f"audio must be a finite mono 1-d array, got shape {audio.shape}")
    bar = default_label_height(size) if label_height is None else int(label_height)
    head = HeadRenderer(flame_model, size, label_height=bar, samples=samples)
    bars: dict[tuple[int, int | None], np.ndarray] = {}

    def bar_image(i: int, state) -> np.ndarray:
        key = (i, None if state is None else int(state))
        if key not in bars:
            bars[key] = label_bar(size, bar, panels[i].title, key[1])
        return bars[key]

    def frames() -> Iterator[np.ndarray]:
        bar_started = time.perf_counter()
        for s in range(0, T, CHUNK):
            e = min(s + CHUNK, T)
            tiles = []
            for i, (p, m) in enumerate(zip(panels, motions)):
                imgs = head.renderer.render(head.vertices(m[s:e]), p.color)  # (n, S, S, 3)
                for k in range(e - s):
                    imgs[k, :bar] = bar_image(i, None if states[i] is None else states[i][s + k])
                if i:
                    imgs[:, :, 0] = DIVIDER  # a line between neighbouring panels
                tiles.append(imgs)
            yield np.concatenate(tiles, axis=2)  # (n, S, S * panels, 3)
            if progress:
                rate = e / max(time.perf_counter() - bar_started, 1e-9)
                print(f"\r[render] {e}/{T} frames ({rate:.1f} frames/s)", end="" if e < T else "\n", flush=True)

    try:
        return write_mp4(out, frames(), T, audio, sample_rate, crf=crf, preset=preset, threads=threads)
    finally:
        head.release()


# ----------------------------------------------------------------------------------------------
# benchmark on a FLAME-sized synthetic model


def _uv_sphere(n_lon: int, n_rings: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit directions ``(n_rings * n_lon + 2, 3)`` (+y = north pole, +z = front) and outward faces ``(2 n_lon n_rings, 3)``."""
    theta = np.linspace(0, np.pi, n_rings + 2)[1:-1]  # polar angle of each ring
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    ring = np.stack([np.sin(theta)[:, None] * np.sin(phi), np.cos(theta)[:, None] * np.ones_like(phi),
                     np.sin(theta)[:, None] * np.cos(phi)], -1).reshape(-1, 3)
    d = np.concatenate([[[0.0, 1.0, 0.0]], ring, [[0.0, -1.0, 0.0]]])
    j = np.arange(n_lon)
    jn = (j + 1) % n_lon
    faces = [np.stack([np.zeros(n_lon, int), 1 + j, 1 + jn], 1)]  # north cap
    for r in range(n_rings - 1):
        a, b = 1 + r * n_lon + j, 1 + r * n_lon + jn
        faces += [np.stack([a, a + n_lon, b], 1), np.stack([b, a + n_lon, b + n_lon], 1)]
    last = 1 + (n_rings - 1) * n_lon
    faces.append(np.stack([np.full(n_lon, len(d) - 1), last + jn, last + j], 1))  # south cap
    return d, np.concatenate(faces).astype(np.int64)


def synthetic_flame_model(n_lon: int = 86, n_rings: int = 58, seed: int = 0) -> dict[str, np.ndarray]:
    """A stand-in head in the ``generic_model.pkl`` layout with FLAME's mesh size, for timing and
    for pictures of the layouts (the real FLAME model is never shipped).

    A UV sphere (``n_rings * n_lon + 2`` vertices, ``2 * n_lon * n_rings`` faces; defaults 4990 /
    9976, FLAME 2020: 5023 / 9976) shaped into a head (ellipsoid skull, nose, brow, chin, eye
    sockets; metres, +y up, face along +z); expression blendshapes are smooth bumps along the
    normal around random points of the face; the lower front face is skinned to the jaw joint.
    """
    rng = np.random.default_rng(seed)
    d, faces = _uv_sphere(n_lon, n_rings)
    V = len(d)

    def bump(center, width):  # smooth bump on the unit sphere, 1 at ``center``
        c = np.asarray(center, float) / np.linalg.norm(center)
        return np.exp(-((d - c) ** 2).sum(1) / (2 * width**2))

    v = d * np.array([0.078, 0.105, 0.092])  # skull ellipsoid
    v += d * (0.020 * bump([0, -0.1, 1], 0.12) + 0.008 * bump([0, 0.35, 1], 0.25)  # nose, brow
              + 0.010 * bump([0, -0.75, 0.65], 0.22)  # chin
              - 0.010 * bump([0.33, 0.12, 0.94], 0.09) - 0.010 * bump([-0.33, 0.12, 0.94], 0.09))[:, None]  # eye sockets
    normals = vertex_normals(v[None], faces)[0]  # (V, 3)
    centers = rng.normal(0, 1, (50, 3)) * [0.5, 0.5, 0.25] + [0, 0, 1]
    expr = np.stack([normals * 0.003 * bump(c, 0.2)[:, None] for c in centers], -1)  # (V, 3, 50)
    shapedirs = np.concatenate([np.zeros((V, 3, 300)), expr], -1)

    jaw = 1 / (1 + np.exp((v[:, 1] + 0.035) / 0.006)) * (d[:, 2] > 0.15)  # lower front face, soft edge

    def centroid(mask):  # a joint inside the head: the mean of a set of vertices
        return mask / mask.sum()

    J_regressor = np.stack([
        centroid(np.ones(V)),  # root: the head's centre
        centroid((d[:, 1] < -0.9).astype(float)),  # neck: the bottom cap
        centroid(((np.abs(d[:, 0]) > 0.9) & (np.abs(d[:, 1] + 0.2) < 0.15)).astype(float)),  # jaw hinge, between the ears
        centroid((bump([0.33, 0.12, 0.94], 0.09) > 0.5).astype(float)),  # left eye
        centroid((bump([-0.33, 0.12, 0.94], 0.09) > 0.5).astype(float)),  # right eye
    ])
    weights = np.zeros((V, 5))
    weights[:, 1] = 1 - jaw
    weights[:, 2] = jaw
    return {
        "v_template": v,
        "shapedirs": shapedirs,
        "posedirs": np.zeros((V, 3, 36)),
        "J_regressor": J_regressor,
        "kintree_table": np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
        "weights": weights,
        "f": faces,
    }


def benchmark(size: int = 512, n_frames: int = 250, samples: int = 0, preset: str = "veryfast", threads: int = 0) -> dict:
    """Frames per second of the renderer on a FLAME-sized synthetic head (:func:`synthetic_flame_model`).

    ``render_fps``: FLAME layer + rasterising only; ``video_fps``: the whole :func:`render_video`
    path (one-head layout with its label bar, H.264 + AAC encoding and muxing), wall clock;
    ``video_cpu_ms``: CPU time of that path per frame, summed over all threads (on a busy machine
    ``2 cores * 1000 / video_cpu_ms`` bounds what 2 idle cores would reach).
    """
    rng = np.random.default_rng(0)
    t = np.arange(n_frames) / FPS
    motion = np.zeros((n_frames, FLAME_DIM), np.float32)
    motion[:, :50] = rng.normal(0, 1, 50) * np.sin(2 * np.pi * 0.7 * t)[:, None]
    motion[:, 50] = 0.15 * (1 + np.sin(2 * np.pi * 3 * t))  # jaw
    motion[:, 65] = 0.3 * np.sin(2 * np.pi * 0.4 * t)  # head yaw
    audio = (0.1 * np.sin(2 * np.pi * 220 * np.arange(n_frames * SAMPLE_RATE // FPS) / SAMPLE_RATE)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "synthetic_flame.npz"
        m = synthetic_flame_model()
        np.savez(model, **m)
        head = HeadRenderer(model, size, samples=samples)
        try:
            list(head.chunks(motion[:8]))  # warm-up (shader compilation)
            t0 = time.perf_counter()
            for _ in head.chunks(motion):
                pass
            render_fps = n_frames / (time.perf_counter() - t0)
        finally:
            head.release()
        vad = (np.sin(2 * np.pi * 0.2 * t) > 0)
        t0, c0 = time.perf_counter(), time.process_time()
        render_video([Panel(motion, "synthetic", vad, ~vad)], model, Path(d) / "bench.mp4", audio, size=size,
                     samples=samples, preset=preset, threads=threads)
        video_fps = n_frames / (time.perf_counter() - t0)
        video_cpu_ms = (time.process_time() - c0) / n_frames * 1000  # all threads: Python, llvmpipe, x264
    return {"size": size, "frames": n_frames, "vertices": len(m["v_template"]), "faces": len(m["f"]),
            "samples": samples, "render_fps": render_fps, "video_fps": video_fps, "video_cpu_ms": video_cpu_ms}
