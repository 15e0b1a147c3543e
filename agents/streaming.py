"""Streaming generation: audio in chunks, FLAME frames out token by token, bounded state.

:class:`StreamingGenerator` runs the sliding-window long generation of ``agents/sampling.py``
(``generate_long``) on audio that arrives in chunks of any size (both sides, 16 kHz mono). Its
latents are bit-identical to ``generate_long`` on the whole recording with the same settings and
seed, because both call the same per-window step (``sampling.window_step``) with the same inputs,
in the same order, on one generator:

* features: log-mel frames are computed per token (r = 8 frames) as soon as the token's samples
  are in (:class:`StreamingLogMel`), equal bit for bit to ``AudioEncoder.encode`` on the whole
  recording (frame i is centred on sample 640 i, so the 1024-sample window of a token's last frame
  ends 128 samples before the token's last sample; frame 0 uses the same reflect padding);
* windows: the schedule of ``envs.windows.sliding_windows``: window ``[s0, s0 + W)`` with
  s0 = end - k runs as soon as the audio of its W tokens is in; at :meth:`finish`, when the length
  is known, the remaining windows (the last one shifted back to end at the last token) run exactly
  as ``generate_long`` runs them;
* speaking / listening per token (CFG weight ``w_speak`` or ``w_listen``): the energy VAD of
  ``envs/converters/vad.py`` on the actor's trailing ``vad_seconds`` of audio ending at the window's
  end (:class:`StreamingEnergyVAD`). The offline ``generate.py`` runs the same VAD once on the
  whole clip, whose loudness gate (99th percentile of the clip) and run smoothing then see the
  whole clip: decisions can differ near the gate (``test_streaming`` measures the agreement).
  ``StreamOutput.speaking`` reports the decisions; ``generate_long`` given them reproduces the stream.
  ``speaking=`` replaces the VAD by given decisions (e.g. ``generate.py``'s whole-clip VAD).

Latency, bidirectional prefix (``ARFlowConfig.causal_prefix`` False). The AR-Flow prefix attends
to the whole window's audio (both sides), so a window can only run when its last token's audio is
in: a token waits for the rest of its window. With ``k`` prefix tokens the new tokens of a window
are ``[s0 + k, s0 + W)``; the first of them waits ``W - k - 1`` tokens after its own audio (23
tokens = 7.36 s for the paper's W = 25, k = 1). With ``k = W - 1`` every window adds one token and
that token runs as soon as its own 8 frames of audio are in: one token (0.32 s) of algorithmic
latency, after the first window (W tokens). This is ``generate_long(..., k=W - 1)`` exactly, at
about ``W - 1`` prefix appends and one prefix pass per token instead of per ``W - k`` tokens.

Latency, causal prefix (``causal_prefix`` True). Token j needs only the audio up to its own last
frame, so it runs as soon as its 8 frames of both sides are in, in every window and with any k:
one token (0.32 s) of algorithmic latency from the token's first sample, none from its last (the
log-mel adds no look-ahead: the 1024-sample window of a token's last frame ends 128 samples, 8 ms,
before the token's last sample; the stream still waits for that sample). The window
``[s0, s0 + W)`` (s0 = end - k) is run by one ``sampling.WindowSampler``, which adds each token's
prefix group to the cache as its audio arrives (``ARFlow.extend``) and then generates it; the
windows follow ``sampling.window_schedule`` (the last one cut short, which needs no knowledge of
the length), so the latents equal ``generate_long`` bit for bit for any chunking and any stopping
point. The speaking decision of token j is the VAD on the trailing audio ending at token j.

Decoding (``decode``): ``"chunked"`` decodes the VAE windows ``[0, nv), [nv, 2 nv), ...`` (nv = VAE
window / r) exactly as ``envs.windows.decode_latents`` does (equal to decoding the offline latents;
a chunk waits for its last token, up to nv - 1 tokens more); ``"causal"`` decodes, for every new
token j, the trailing tokens ``[j - nv + 1, j]`` and emits token j's r frames (no wait; equal to
:func:`decode_latents_causal` on the offline latents, not to ``decode_latents``).

State is bounded for any length: features of at most 2 W tokens and latents of at most
max(W, nv) tokens are kept, plus about one token of samples per side and ``vad_seconds`` of actor audio
(:meth:`StreamingGenerator.state_sizes`).

Partner motion is absent (zeros, ``partner_has_motion`` False), as ``train/generate.py`` does
without ``partner_motion``. Text and CFG weights may change between chunks (:meth:`set_text`,
:meth:`set_cfg`). A CFG weight change applies to every token generated after it, i.e. from the next
token not yet output; a text change applies to every window that generates its first new token after
it (bidirectional: every window run after it, i.e. from the next token too). With a causal prefix,
switching guidance on or off (both weights 1 = no unconditional branch) takes effect from the next
window.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..envs.converters.vad import energy_vad_frames
from ..envs.flame import FLAME_DIM, SAMPLE_RATE
from ..envs.windows import sliding_windows, token_majority
from .arflow import DROP_KEYS
from .encoders import HOP, AudioEncoder
from .sampling import WindowSampler, check_cfg_drop, check_cfg_weight, eval_mode, window_step

__all__ = ["StreamingLogMel", "StreamingEnergyVAD", "StreamingGenerator", "StreamOutput", "decode_latents_causal",
           "DECODE_MODES"]

DECODE_MODES = ("chunked", "causal")


def _check_chunk(samples, what: str) -> np.ndarray:
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"streaming: {what} chunk must be mono 1-d samples at 16 kHz, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"streaming: {what} chunk has NaN/inf samples")
    return x


# ----------------------------------------------------------------------------------------------
# features


def logmel_frames(encoder: AudioEncoder, segment: np.ndarray, n_frames: int) -> np.ndarray:
    """Log-mel frames of a segment of the centre-padded waveform -> (n_frames, n_mels) float32.

    Padded sample p is waveform sample p - N_FFT / 2 (reflect padding before sample 0, as
    ``AudioEncoder._logmel``); frame i of the segment covers its samples [i HOP, i HOP + N_FFT).
    Same call and scaling as ``AudioEncoder._logmel`` with ``center=False``.
    """
    from transformers.audio_utils import spectrogram

    if segment.shape[0] != (n_frames - 1) * HOP + encoder.N_FFT:
        raise ValueError(f"logmel_frames: segment of {segment.shape[0]} samples does not hold {n_frames} frames")
    spec = spectrogram(segment, encoder.window, frame_length=encoder.N_FFT, hop_length=HOP, power=2.0, center=False,
                       mel_filters=encoder.mel, mel_floor=1e-8, log_mel="log10")  # (n_mels, n_frames)
    return ((spec.T + 4.0) / 4.0).astype(np.float32)  # (n_frames, n_mels)


class StreamingLogMel:
    """Incremental log-mel features of one 16 kHz stream, whole tokens (r frames) at a time.

    ``push(samples)`` returns the frames (n r, n_mels) of the tokens whose samples are all in
    (token j: samples [j r HOP, (j + 1) r HOP)); equal to ``encoder.encode(wav, n_frames)`` on the
    same samples. Keeps the samples from the next token's first window on (< r HOP + N_FFT).
    """

    def __init__(self, encoder: AudioEncoder, r: int):
        if encoder.kind != "logmel":
            raise ValueError(f"StreamingLogMel: streaming features exist for the log-mel encoder only, got {encoder.kind!r}")
        self.encoder, self.r = encoder, int(r)
        self.half = encoder.N_FFT // 2
        self._head = np.zeros(0, np.float32)  # samples before the reflect padding can be built (< half + 1)
        self._buf = np.zeros(0, np.float32)  # padded samples from padded index self._buf0 on
        self._buf0 = 0
        self.samples = 0  # samples received
        self.tokens = 0  # tokens whose frames were returned

    def push(self, samples: np.ndarray) -> np.ndarray:
        x = _check_chunk(samples, "audio")
        self.samples += x.shape[0]
        if self._head is not None:  # reflect padding needs samples 1 .. half
            self._head = np.concatenate([self._head, x])
            if self._head.shape[0] <= self.half:
                return np.zeros((0, self.encoder.dim), np.float32)
            x, self._head = np.pad(self._head, (self.half, 0), mode="reflect"), None
        self._buf = np.concatenate([self._buf, x])
        r, out = self.r, []
        while self.samples >= (self.tokens + 1) * r * HOP:
            f0 = self.tokens * r  # first frame of the token; padded samples [f0 HOP, (f0 + r - 1) HOP + N_FFT)
            a = f0 * HOP - self._buf0
            out.append(logmel_frames(self.encoder, self._buf[a:a + (r - 1) * HOP + self.encoder.N_FFT], r))
            self.tokens += 1
        drop = self.tokens * r * HOP - self._buf0
        self._buf, self._buf0 = self._buf[drop:], self._buf0 + drop
        return np.concatenate(out) if out else np.zeros((0, self.encoder.dim), np.float32)

    def buffered(self) -> int:
        """Samples held."""
        return self._buf.shape[0] + (0 if self._head is None else self._head.shape[0])


class StreamingEnergyVAD:
    """The actor's speaking tokens from ``energy_vad_frames`` on the trailing ``context_frames`` of audio.

    ``tokens(j0, j1)`` -> (j1 - j0,) bool: token majority of the VAD frames of tokens [j0, j1), from
    the audio of frames [max(0, j1 r - context_frames), j1 r). Depends only on the samples, not on
    how they were chunked. Needs j1 >= any earlier j1 (windows end in order) and
    j0 r >= j1 r - context_frames.
    """

    def __init__(self, r: int, context_frames: int):
        if context_frames < r:
            raise ValueError(f"StreamingEnergyVAD: context_frames={context_frames} must hold at least one token (r={r})")
        self.r, self.context = int(r), int(context_frames)
        self._buf = np.zeros(0, np.float32)  # samples from sample index self._buf0 on
        self._buf0 = 0

    def push(self, samples: np.ndarray) -> None:
        self._buf = np.concatenate([self._buf, _check_chunk(samples, "actor")])

    def tokens(self, j0: int, j1: int) -> np.ndarray:
        r = self.r
        end = j1 * r  # frames
        start = max(0, end - self.context)
        if j0 * r < start or start * HOP < self._buf0 or end * HOP > self._buf0 + self._buf.shape[0]:
            raise ValueError(f"StreamingEnergyVAD: tokens [{j0}, {j1}) are outside the held audio or context")
        wav = self._buf[start * HOP - self._buf0:end * HOP - self._buf0]
        frames = energy_vad_frames(wav, end - start)  # (end - start,) bool
        drop = start * HOP - self._buf0  # later calls start at or after this frame
        self._buf, self._buf0 = self._buf[drop:], self._buf0 + drop
        return token_majority(torch.from_numpy(frames[j0 * r - start:]), r).numpy()

    def buffered(self) -> int:
        return self._buf.shape[0]


# ----------------------------------------------------------------------------------------------
# decoding


@torch.no_grad()
def decode_latents_causal(vae, normalizer, z: Tensor) -> Tensor:
    """Latents (B, N, Dv) -> raw FLAME (B, N r, 67), token j's frames from decoding tokens
    [max(0, j - nv + 1), j] (nv = VAE window / r): each token sees only the past."""
    nv, r = vae.cfg.window // vae.cfg.r, vae.cfg.r
    out = [vae.decode(z[:, max(0, j - nv + 1):j + 1])[:, -r:] for j in range(z.shape[1])]  # (B, r, 67) each
    return normalizer.denormalize(torch.cat(out, dim=1))


class _TokenBuffer:
    """Rows ``[base, base + len)`` of a per-token sequence of rows of shape ``row_shape``."""

    def __init__(self, row_shape: tuple[int, ...], device):
        self.data = torch.zeros((0, *row_shape), device=device)  # (n, *row_shape)
        self.base = 0

    @property
    def end(self) -> int:
        return self.base + self.data.shape[0]

    def append(self, rows: Tensor) -> None:
        self.data = torch.cat([self.data, rows.to(self.data.dtype)])

    def take(self, a: int, b: int) -> Tensor:
        if a < self.base or b > self.end:
            raise IndexError(f"streaming: tokens [{a}, {b}) requested, buffer holds [{self.base}, {self.end})")
        return self.data[a - self.base:b - self.base]

    def drop_before(self, i: int) -> None:
        i = min(max(i, self.base), self.end)
        self.data = self.data[i - self.base:].clone()
        self.base = i

    def __len__(self) -> int:
        return self.data.shape[0]


@dataclass
class StreamOutput:
    """What one :meth:`StreamingGenerator.push` (or ``finish``) produced.

    ``motion`` (n_frames, 67) raw FLAME frames ``frame0 ..``; ``latents`` (n_new, Dv) tokens
    ``token0 ..`` generated now, ``speaking`` (n_new,) their VAD decision (CFG weight ``w_speak``).
    """

    motion: np.ndarray
    frame0: int
    latents: Tensor
    token0: int
    speaking: np.ndarray


# ----------------------------------------------------------------------------------------------
# generator


class StreamingGenerator:
    """Sliding-window AR-Flow generation over chunked audio (module docstring).

    ``model`` (ARFlow), ``vae`` / ``normalizer`` (frozen stage 0), ``audio_encoder`` (log-mel, its
    ``n_mels`` = the model's ``d_audio``). Settings as ``generate_long``: ``k`` prefix tokens, ``steps``,
    ``w_speak`` / ``w_listen``, ``cfg_drop``, ``sigma`` / ``sde``, ``generator``, ``use_cache``; ``window`` (frames)
    defaults to the model's. ``text_emb`` (Dt,) or None (no text). ``decode``: "chunked" or "causal".
    ``vad_seconds``: actor audio the speaking decision looks back on. ``speaking(j0, j1) -> (j1 - j0,)
    bool`` replaces that VAD by given decisions for tokens [j0, j1) (e.g. an offline VAD of the file).
    """

    def __init__(self, model, vae, normalizer, audio_encoder: AudioEncoder, *, k: int = 1, steps: int = 10,
                 w_speak: float = 1.0, w_listen: float = 1.0, sigma: float = 0.0, sde: str = "paper",
                 generator: torch.Generator | None = None, text_emb=None, window: int | None = None,
                 decode: str = "chunked", vad_seconds: float = 30.0, use_cache: bool = True,
                 speaking: Callable[[int, int], np.ndarray] | None = None, cfg_drop=DROP_KEYS):
        c = model.cfg
        self.model, self.vae, self.normalizer = model, vae, normalizer
        self.r = c.r
        window = c.window if window is None else int(window)
        if window % c.r or window < 2 * c.r:
            raise ValueError(f"StreamingGenerator: window={window} must be a multiple of r={c.r} holding >= 2 tokens")
        self.W = window // c.r
        if not 1 <= k < self.W:
            raise ValueError(f"StreamingGenerator: k={k} prefix tokens must be in [1, {self.W - 1}] for a {self.W}-token window")
        if vae.cfg.r != c.r or vae.cfg.d_latent != c.d_latent:
            raise ValueError(f"StreamingGenerator: VAE (r={vae.cfg.r}, d_latent={vae.cfg.d_latent}) does not match the "
                             f"AR-Flow (r={c.r}, d_latent={c.d_latent})")
        if audio_encoder.dim != c.d_audio:
            raise ValueError(f"StreamingGenerator: audio encoder gives {audio_encoder.dim} features, "
                             f"the AR-Flow expects d_audio={c.d_audio}")
        if decode not in DECODE_MODES:
            raise ValueError(f"StreamingGenerator: decode={decode!r}, expected one of {DECODE_MODES}")
        if int(steps) != steps or steps < 1:
            raise ValueError(f"StreamingGenerator: steps must be a positive integer, got {steps!r}")
        vad_frames = int(round(float(vad_seconds) * SAMPLE_RATE / HOP))
        if vad_frames < window:
            raise ValueError(f"StreamingGenerator: vad_seconds={vad_seconds} must cover the window ({window} frames)")
        self.k, self.steps, self.sigma, self.sde = int(k), int(steps), float(sigma), sde
        self.cfg_drop = check_cfg_drop(cfg_drop)
        self.generator, self.use_cache, self.decode = generator, bool(use_cache), decode
        self._speaking_fn = speaking
        self.nv = vae.cfg.window // vae.cfg.r  # tokens per VAE decoding window
        self.device = next(model.parameters()).device
        self.set_cfg(w_speak, w_listen)
        self.set_text(text_emb)
        self._feats = {side: StreamingLogMel(audio_encoder, c.r) for side in ("actor", "partner")}
        self._audio = {side: _TokenBuffer((c.r, c.d_audio), self.device) for side in ("actor", "partner")}  # (n, r, Da)
        self._vad = StreamingEnergyVAD(c.r, vad_frames)
        self._latents = _TokenBuffer((c.d_latent,), self.device)  # (n, Dv)
        self._decisions = _TokenBuffer((), self.device)  # (n,) 1 = speaking: the window's context reads them
        self._end = 0  # tokens generated
        self._decoded = 0  # tokens decoded to frames
        self._speaking_new: list[np.ndarray] = []  # VAD decisions of the tokens generated since the last output
        self._finished = False
        self.causal = bool(getattr(c, "causal_prefix", False))
        self._win: WindowSampler | None = None  # causal prefix: the window being generated, from token _win_s0
        self._win_s0 = 0
        self._win_text = (self._text, self._text_mask)

    # ---- controls ---------------------------------------------------------------------------

    def set_cfg(self, w_speak: float | None = None, w_listen: float | None = None) -> None:
        """New CFG weights for every token generated from now on (None keeps a weight)."""
        if w_speak is not None:
            self.w_speak = check_cfg_weight("w_speak", w_speak)
        if w_listen is not None:
            self.w_listen = check_cfg_weight("w_listen", w_listen)

    def set_text(self, text_emb) -> None:
        """New text embedding (Dt,) or (1, Dt), or None for no text, for every window generated from now on."""
        d = self.model.cfg.d_text
        if text_emb is None:
            self._text, self._text_mask = torch.zeros(1, d, device=self.device), torch.tensor([False], device=self.device)
            return
        t = torch.as_tensor(text_emb, dtype=torch.float32, device=self.device).reshape(1, -1)  # (1, Dt)
        if t.shape[1] != d or not torch.isfinite(t).all():
            raise ValueError(f"StreamingGenerator.set_text: need a finite text embedding of size {d}, got shape {tuple(t.shape)}")
        self._text, self._text_mask = t, torch.tensor([True], device=self.device)

    # ---- streaming --------------------------------------------------------------------------

    @property
    def tokens_ready(self) -> int:
        """Tokens whose audio (both sides) is in."""
        return min(self._audio["actor"].end, self._audio["partner"].end)

    @property
    def tokens_generated(self) -> int:
        return self._end

    @torch.no_grad()
    def push(self, actor: np.ndarray, partner: np.ndarray | None = None) -> StreamOutput:
        """Feed the next samples of each side (partner None = silence as long as ``actor``) -> new output."""
        if self._finished:
            raise RuntimeError("StreamingGenerator.push after finish(); start a new generator")
        actor = _check_chunk(actor, "actor")
        partner = np.zeros_like(actor) if partner is None else _check_chunk(partner, "partner")
        for side, x in (("actor", actor), ("partner", partner)):
            f = self._feats[side].push(x)  # (n r, Da)
            if f.shape[0]:
                self._audio[side].append(torch.from_numpy(f).to(self.device).reshape(-1, self.r, f.shape[1]))
        if self._speaking_fn is None:  # given per-token decisions: the own VAD is never asked, so never fed
            self._vad.push(actor)
        token0 = self._end
        if self.causal:
            with eval_mode(self.model):
                while self.tokens_ready > self._end:
                    self._causal_token(self._end)
            return self._output(token0, final=False)
        while True:
            s0 = 0 if self._end == 0 else self._end - self.k
            if self.tokens_ready < s0 + self.W:
                break
            self._run_window(s0, self.W, self._end)
        return self._output(token0, final=False)

    @torch.no_grad()
    def finish(self) -> StreamOutput:
        """End of both streams: the remaining windows as ``generate_long`` runs them on the whole length
        (whole tokens only, as ``train/generate.py``), then the last frames."""
        if self._finished:
            raise RuntimeError("StreamingGenerator.finish called twice")
        self._finished = True
        token0, n_total = self._end, self.tokens_ready
        # causal prefix: every token was generated as its audio arrived (the last window is cut short)
        if n_total > self._end and not self.causal:
            for s0, n, new0 in sliding_windows(n_total, self.W, self.k):
                if new0 >= self._end:
                    self._run_window(s0, n, new0)
        return self._output(token0, final=True)

    def _window_cond(self, s0: int, n: int, text: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Conditioning of the tokens [s0, s0 + n): both sides' audio features, no partner motion."""
        r, dev, da = self.r, self.device, self.model.cfg.d_audio
        return {"text_emb": text[0], "text_mask": text[1],
                "actor_audio": self._audio["actor"].take(s0, s0 + n).reshape(1, n * r, da),  # (1, n r, Da)
                "partner_audio": self._audio["partner"].take(s0, s0 + n).reshape(1, n * r, da),
                "partner_latent": torch.zeros(1, n, self.model.cfg.d_latent, device=dev),
                "partner_has_motion": torch.tensor([False], device=dev),
                "speaking_tokens": self._decisions.take(s0, s0 + n).bool().reshape(1, n)}  # (1, n)

    def _decide(self, j0: int, j1: int) -> np.ndarray:
        """Speaking decisions of the new tokens [j0, j1) (:meth:`_speaking`), kept for the windows' conditioning."""
        if j0 != self._decisions.end:
            raise RuntimeError(f"streaming: deciding tokens [{j0}, {j1}) after {self._decisions.end} decisions")
        given = self._speaking(j0, j1)
        self._decisions.append(torch.from_numpy(given).to(self.device))
        return given

    def _speaking(self, j0: int, j1: int) -> np.ndarray:
        """Speaking decisions (j1 - j0,) of tokens [j0, j1): the VAD or the given function."""
        given = self._vad.tokens(j0, j1) if self._speaking_fn is None else self._speaking_fn(j0, j1)
        given = np.asarray(given, dtype=bool)
        if given.shape != (j1 - j0,):
            raise ValueError(f"StreamingGenerator: speaking({j0}, {j1}) gave shape {given.shape}, expected ({j1 - j0},)")
        return given

    def _causal_token(self, j: int) -> None:
        """Causal prefix: generate token j (its audio is in) in the current window, starting a new window
        (s0 = j - k, its first k tokens given) when the current one is full."""
        if self._win is None or j == self._win_s0 + self.W:
            s0 = 0 if j == 0 else j - self.k
            self._win_s0, self._win_text = s0, (self._text, self._text_mask)
            self._win = WindowSampler(self.model, self._window_cond(s0, j - s0, self._win_text), self.W, steps=self.steps,
                                      guided=(self.w_speak, self.w_listen) != (1.0, 1.0), sigma=self.sigma, sde=self.sde,
                                      generator=self.generator, use_cache=self.use_cache, cfg_drop=self.cfg_drop)
            for p in range(s0, j):
                self._win.advance(self._window_cond(s0, p + 1 - s0, self._win_text), given=self._latents.take(p, p + 1))
        speaking = self._decide(j, j + 1)  # (1,)
        w = torch.tensor([self.w_speak if speaking[0] else self.w_listen], device=self.device)  # (1,)
        spk = torch.from_numpy(speaking).to(self.device)  # (1,) bool: the listening parts' mask
        x = self._win.advance(self._window_cond(self._win_s0, j + 1 - self._win_s0, self._win_text), w=w, speaking=spk)  # (1, Dv)
        self._latents.append(x)
        self._speaking_new.append(speaking)
        self._end = j + 1
        for buf in (*self._audio.values(), self._decisions):  # the next window starts at end - k; this one at >= end - W
            buf.drop_before(max(0, self._end - self.W))

    def _run_window(self, s0: int, n: int, new0: int) -> None:
        """Generate tokens [new0, s0 + n) of window [s0, s0 + n) (tokens [s0, new0) are its prefix)."""
        if new0 != self._end:
            raise RuntimeError(f"streaming: window [{s0}, {s0 + n}) starts new tokens at {new0}, generated {self._end}")
        new = self._decide(new0, s0 + n)  # (n - k_w,) the new tokens' decisions
        cond = self._window_cond(s0, n, (self._text, self._text_mask))
        prefix = self._latents.take(s0, new0)[None] if new0 > s0 else None  # (1, k_w, Dv)
        x = window_step(self.model, cond, n, prefix, cond["speaking_tokens"], steps=self.steps,  # (1, n): the prefix's too
                        w_speak=self.w_speak, w_listen=self.w_listen, sigma=self.sigma, generator=self.generator,
                        use_cache=self.use_cache, sde=self.sde, cfg_drop=self.cfg_drop)  # (1, n - k_w, Dv)
        self._latents.append(x[0])
        self._speaking_new.append(new)
        self._end = s0 + n
        keep = max(0, self._end - self.W)  # the next window starts at end - k; the last (shifted) one at >= end - W
        for buf in (*self._audio.values(), self._decisions):
            buf.drop_before(keep)

    def _output(self, token0: int, final: bool) -> StreamOutput:
        new = self._latents.take(token0, self._end)  # (n_new, Dv)
        speaking = np.concatenate(self._speaking_new) if self._speaking_new else np.zeros(0, bool)
        self._speaking_new = []
        frame0, frames = self._decoded * self.r, []
        if self.decode == "chunked":
            while self._end - self._decoded >= self.nv or (final and self._end > self._decoded):
                b = min(self._decoded + self.nv, self._end)
                frames.append(self.normalizer.denormalize(self.vae.decode(self._latents.take(self._decoded, b)[None]))[0])
                self._decoded = b
        else:
            for j in range(self._decoded, self._end):
                z = self._latents.take(max(0, j - self.nv + 1), j + 1)[None]  # (1, <= nv, Dv)
                frames.append(self.normalizer.denormalize(self.vae.decode(z)[:, -self.r:])[0])  # (r, 67)
            self._decoded = self._end
        # kept: the next window's prefix (>= end - W, module docstring) and what decoding still reads
        undecoded = self._decoded if self.decode == "chunked" else self._end - self.nv + 1
        self._latents.drop_before(min(self._end - self.W, undecoded))
        motion = torch.cat(frames).float().cpu().numpy() if frames else np.zeros((0, FLAME_DIM), np.float32)
        return StreamOutput(motion, frame0, new.cpu(), token0, speaking)

    def state_sizes(self) -> dict[str, int]:
        """Sizes of everything the stream keeps (tokens or samples): bounded for any length."""
        return {"actor_feature_tokens": len(self._audio["actor"]), "partner_feature_tokens": len(self._audio["partner"]),
                "speaking_tokens": len(self._decisions),
                "latent_tokens": len(self._latents), "actor_feature_samples": self._feats["actor"].buffered(),
                "partner_feature_samples": self._feats["partner"].buffered(), "vad_samples": self._vad.buffered()}
