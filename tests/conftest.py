"""The tests' shared helpers, as fixtures (test modules never import each other).

- ``one_thread`` (automatic): torch runs on one thread in every test;
- ``run_entry`` / ``tiny_pipeline``: run the real entry points; a tiny synthetic corpus whose VAE and
  supervised AR-Flow the first GDPO run trains (built once per session);
- ``rl``: tiny RL components (random window bank, tiny VAE and AR-Flow) and their sizes;
- ``smooth_motion`` / ``make_tiny_dataset``: a small canonical dataset of smooth random motion;
- ``flame_kit``: a 9-vertex model in FLAME's ``generic_model.pkl`` layout, its region masks, a pickle writer;
- ``track_audio`` / ``dualtalk_motion`` / ``write_dualtalk``: converter inputs in DualTalk's own layout.

Fixtures that hand out builders return the functions themselves (or a namespace of them), so a test
calls ``make_tiny_dataset(path, ...)`` or ``rl.tiny_bank(...)`` exactly as it would a helper.
Tests that start entry-point subprocesses are marked ``slow`` (``pytest -m "not slow"`` skips them
for a quick inner loop; the README's test command runs everything), and their files run first.
"""
from __future__ import annotations

import os
import pickle
import subprocess
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from entry_runner import run_script  # tests/ is on sys.path (the rootdir conftest)
from scipy.signal import lfilter
from tensordict import TensorDict

from gdpo_listener.agents.arflow import ARFlow, ARFlowConfig
from gdpo_listener.agents.vae import MotionVAE, VAEConfig
from gdpo_listener.envs.dataset import Conversation, DatasetWriter, Normalizer
from gdpo_listener.envs.flame import FLAME_DIM, FPS, GROUP_NAMES, GROUPS, N_GROUPS, SAMPLE_RATE
from gdpo_listener.envs.windows import token_majority

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Files with the most entry-point (``slow``) tests run first, so on xdist workers (one file per
    worker, files handed out in this order) the long files start early and the short ones fill the
    tail. The sort is stable: the order of files with equal counts and of tests within a file is kept."""
    n_slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -n_slow[item.path])


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Every test runs torch on one thread: tiny models run fastest so, and the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# entry points


def hydra_list(*items: str) -> str:
    """A Hydra list override value: ``['a=1','b=2']``."""
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


TINY_VAE = hydra_list("optim.steps=4", "optim.batch_size=8", "+model.d_model=32", "+model.n_layers=1", "+model.n_heads=2",
                      "+model.d_latent=8")
TINY_SFT = hydra_list("optim.steps=4", "optim.batch_size=8", "+model.arch.d_model=32", "+model.arch.n_layers=1",
                      "+model.arch.n_heads=2", "eval.n_windows=4")


def _run(script: str, *overrides: str, cwd: Path, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``train/<script>`` with Hydra ``overrides`` in ``cwd`` as ``python train/<script>`` would, in a new
    process forked from a server that has the libraries imported (``tests/entry_runner.py``); prints the
    output's tail if it fails."""
    if env is None:  # one thread per entry point: deterministic and fast beside the test process on 2 cores
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    res = run_script(ROOT / "train" / script, list(overrides), cwd, env, timeout)
    if res.returncode != 0:
        print(res.stdout[-4000:], res.stderr[-4000:])
    return res


def _compose(name: str, overrides=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "train" / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture(scope="session")
def compose_config():
    """``compose_config(name, overrides)``: the config ``train/<name>.py`` would run with, composed in-process
    (for the checks an entry point makes first, without a subprocess' imports)."""
    return _compose


@pytest.fixture(scope="session")
def run_entry():
    """``run_entry(script, *overrides, cwd=DIR, timeout=600, env=None)``: run ``train/<script>`` in a new process,
    output captured; ``env`` is the child's whole environment (None: this process's)."""
    return _run


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A 3-conversation synthetic corpus; ``vae``/``sft`` are where the first GDPO run trains a tiny VAE and AR-Flow.

    ``gdpo_args(*extra)`` gives the overrides that point ``train/gdpo.py`` (or evaluate/bench) at them.
    """
    d = tmp_path_factory.mktemp("tiny_pipeline")
    res = _run("prepare_data.py", "source=synthetic", f"out={d / 'data'}", "synthetic.n_conversations=3",
               "synthetic.seconds=16", "test_fraction=0.34", cwd=d)
    assert res.returncode == 0, res.stderr[-2000:]

    def gdpo_args(*extra: str) -> list[str]:
        return [f"data.root={d / 'data'}", "data.auto_prepare=false", f"pretrained.vae={d / 'vae'}", f"pretrained.sft={d / 'sft'}",
                f"pretrained.vae_overrides={TINY_VAE}", f"pretrained.sft_overrides={TINY_SFT}", f"features.cache_dir={d / 'cache'}",
                "env.n_prompts=1", "env.group_size=2", "env.sde_steps=2", "eval.n_windows=4", "ckpt_every=1", *extra]

    return SimpleNamespace(root=d, data=d / "data", vae=d / "vae", sft=d / "sft", cache=d / "cache", gdpo_args=gdpo_args,
                           tiny_vae=TINY_VAE, tiny_sft=TINY_SFT)


# ----------------------------------------------------------------------------------------------
# tiny RL components: window W = 32 frames, r = 8 frames per token, N = 4 tokens per window

RL_W, RL_R, RL_DV, RL_DT, RL_DA = 32, 8, 4, 8, 6  # window, frames per token, latent, text and audio feature sizes


def tiny_bank(n_windows: int = 6, seed: int = 0, listening: bool = True, frames: int = RL_W) -> TensorDict:
    """Random bank rows of ``frames`` frames (``frames > W``: long rows for multi-window episodes)."""
    g = torch.Generator().manual_seed(seed)
    n_tokens = frames // RL_R
    t = torch.linspace(0, 6.28 * frames / RL_W, frames)  # (T,)
    motion = 0.3 * torch.sin(t[None, :, None] * (1 + torch.rand(n_windows, 1, FLAME_DIM, generator=g) * 3))  # (B, T, 67)
    vad = torch.zeros(n_windows, frames, dtype=torch.bool)  # (B, T)
    vad[:, : frames // 2] = True  # actor speaks in the first half, listens in the second
    lis = ~vad if listening else torch.zeros_like(vad)
    bank = TensorDict({
        "actor_motion": motion,
        "partner_motion": motion.flip(1),
        "actor_valid": torch.ones(n_windows, N_GROUPS, dtype=torch.bool),
        "partner_valid": torch.ones(n_windows, N_GROUPS, dtype=torch.bool),
        "speaking": vad,
        "listening": lis,
        "partner_has_motion": torch.ones(n_windows, dtype=torch.bool),
        "actor_audio": torch.randn(n_windows, frames, RL_DA, generator=g),
        "partner_audio": torch.randn(n_windows, frames, RL_DA, generator=g),
        "text_emb": torch.randn(n_windows, RL_DT, generator=g),
        "text_mask": torch.ones(n_windows, dtype=torch.bool),
        "actor_latent": torch.randn(n_windows, n_tokens, RL_DV, generator=g),
        "partner_latent": torch.randn(n_windows, n_tokens, RL_DV, generator=g),
    }, batch_size=[n_windows])
    bank["speaking_tokens"] = token_majority(bank["speaking"], RL_R)
    return bank


def tiny_arflow(seed: int = 0, causal: bool = False) -> ARFlow:
    """A 2-layer AR-Flow in eval mode, condition dropout off; ``causal``: causal-in-time prefix."""
    torch.manual_seed(seed)
    cfg = ARFlowConfig(d_latent=RL_DV, d_text=RL_DT, d_audio=RL_DA, d_model=32, n_layers=2, n_heads=2, r=RL_R, window=RL_W,
                       p_drop_text=0.0, p_drop_audio=0.0, p_drop_motion=0.0, causal_prefix=causal)
    return ARFlow(cfg).eval()


def tiny_vae(seed: int = 0) -> tuple[MotionVAE, Normalizer]:
    """A frozen tiny VAE and the identity normaliser."""
    torch.manual_seed(seed)
    vae = MotionVAE(VAEConfig.tiny(d_latent=RL_DV, window=RL_W, r=RL_R)).eval().requires_grad_(False)
    norm = Normalizer(np.zeros(FLAME_DIM, np.float32), np.ones(FLAME_DIM, np.float32))
    return vae, norm


@pytest.fixture(scope="session")
def rl() -> SimpleNamespace:
    """``rl.tiny_bank(...)``, ``rl.tiny_arflow(seed)``, ``rl.tiny_vae(seed)`` and the sizes ``W R N DV DT DA``.

    The builders are module-level functions of this file, so they can be handed to spawned processes.
    """
    return SimpleNamespace(W=RL_W, R=RL_R, N=RL_W // RL_R, DV=RL_DV, DT=RL_DT, DA=RL_DA,
                           tiny_bank=tiny_bank, tiny_arflow=tiny_arflow, tiny_vae=tiny_vae)


# ----------------------------------------------------------------------------------------------
# a small canonical dataset of smooth random motion

GROUP_SCALE = {"expr": 0.5, "jaw": 0.05, "neck": 0.05, "eyelid": 0.3, "eyepose": 0.1, "rot": 0.1}  # rough raw scales of the groups


def _smooth_motion(rng: np.random.Generator, T: int) -> np.ndarray:
    """(T, 67) smooth random motion: per channel a few sinusoids of 0.2-2 Hz plus an offset."""
    t = np.arange(T)[:, None] / FPS  # (T, 1)
    m = np.zeros((T, FLAME_DIM), np.float32)
    for g, sl in GROUPS.items():
        d = sl.stop - sl.start
        out = rng.normal(0, 0.5, d)[None, :]  # offset (1, d)
        for _ in range(3):
            f = rng.uniform(0.2, 2.0, d)
            ph = rng.uniform(0, 2 * np.pi, d)
            out = out + rng.uniform(0.2, 1.0, d) * np.sin(2 * np.pi * f * t + ph)
        m[:, sl] = GROUP_SCALE[g] * out
    return m


def _make_tiny_dataset(out: str | os.PathLike, n_conversations: int = 4, seconds: float = 24.0, seed: int = 0,
                       text: bool = True) -> Path:
    """A small canonical dataset of smooth random motion (no semantics); the last conversation is the test split.

    Conversation 0 side 1 lacks eyelid/eyepose/neck (DualTalk-like); conversation 1 side 1 is
    audio-only (when there are more than 2 conversations). Audio is quiet noise with louder "speech"
    bursts where VAD is on; text names a random word per window (some windows empty).
    """
    rng = np.random.default_rng(seed)
    T = int(seconds * FPS)
    words = ["nodding", "smiling broadly", "slow head shake", "still and attentive", "skeptical tilt", ""]
    with DatasetWriter(out, source="test-random") as w:
        for c in range(n_conversations):
            motion = np.stack([_smooth_motion(rng, T), _smooth_motion(rng, T)])  # (2, T, 67)
            valid = np.ones((2, N_GROUPS), bool)
            has_motion = np.ones(2, bool)
            if c == 0:
                for g in ("neck", "eyelid", "eyepose"):
                    valid[1, GROUP_NAMES.index(g)] = False
                    motion[1][:, GROUPS[g]] = 0.0
            if c == 1 and n_conversations > 2:
                has_motion[1] = False
                motion[1] = 0.0
                valid[1] = False
            vad = np.zeros((2, T), bool)
            for s in range(2):
                for start in range(0, T, 50):
                    vad[s, start : start + 25] = (start // 50 + s) % 2 == 0
            audio = []
            for s in range(2):
                a = rng.normal(0, 0.01, T * SAMPLE_RATE // FPS).astype(np.float32)
                a *= np.repeat(np.where(vad[s], 10.0, 1.0), SAMPLE_RATE // FPS).astype(np.float32)
                audio.append(a)
            n_win = T // 200
            texts = [[str(rng.choice(words)) for _ in range(n_win)] for _ in range(2)] if text else [[], []]
            conv = Conversation(f"conv{c:03d}", motion, valid, has_motion, vad, audio, texts)
            w.add(conv, "test" if c == n_conversations - 1 else "train")
    return Path(out)


@pytest.fixture(scope="session")
def smooth_motion():
    """``smooth_motion(rng, T)``: (T, 67) smooth random motion at the groups' rough raw scales."""
    return _smooth_motion


@pytest.fixture(scope="session")
def make_tiny_dataset():
    """``make_tiny_dataset(out, n_conversations=4, seconds=24.0, seed=0, text=True)``: writes the dataset, returns ``out``."""
    return _make_tiny_dataset


# ----------------------------------------------------------------------------------------------
# FLAME layer inputs: a tiny model in the generic_model.pkl layout

V_TEMPLATE = np.array([
    [0.0, 0.0, 0.0],    # 0 root joint, root-weighted
    [0.0, 1.0, 0.0],    # 1 neck joint, root-weighted
    [0.0, 1.5, 0.5],    # 2 jaw joint, jaw-weighted
    [0.3, 1.8, 0.5],    # 3 left eye joint, eye-weighted
    [-0.3, 1.8, 0.5],   # 4 right eye joint
    [0.0, 1.2, 1.0],    # 5 chin, jaw-weighted
    [0.0, 2.0, 0.8],    # 6 forehead, neck-weighted
    [0.3, 1.8, 0.6],    # 7 left pupil, left-eye-weighted
    [-0.3, 1.8, 0.6],   # 8 right pupil, right-eye-weighted
])
WEIGHT_JOINT = [0, 0, 2, 3, 4, 2, 1, 3, 4]
MASKS = {"lips": np.array([5]), "forehead": np.array([6]), "eye_region": np.array([3, 4]), "nose": np.array([2])}
# faces that cover part of the image when the tiny model is rendered (the model's own two are slivers)
RENDER_FACES = np.array([[0, 1, 2], [2, 5, 6], [1, 3, 6], [1, 6, 4], [3, 7, 6], [4, 6, 8], [2, 3, 5], [2, 5, 4], [0, 3, 1], [0, 1, 4]])


def tiny_model(posedirs: bool = False, eyelids: bool = False, seed: int = 0) -> dict:
    """The 9-vertex model as the dict of a ``generic_model.pkl`` (joint j = vertex j, 5 joints)."""
    rng = np.random.default_rng(seed)
    V = len(V_TEMPLATE)
    m = {
        "v_template": V_TEMPLATE.copy(),
        "shapedirs": rng.normal(0, 0.01, (V, 3, 400)),
        "posedirs": rng.normal(0, 0.01, (V, 3, 36)) if posedirs else np.zeros((V, 3, 36)),
        "J_regressor": np.eye(5, V),  # joint j = vertex j
        "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "weights": np.eye(5)[WEIGHT_JOINT],
        "f": np.array([[0, 1, 2], [2, 5, 6]]),
    }
    if eyelids:
        m["l_eyelid"] = rng.normal(0, 0.01, (V, 3))
        m["r_eyelid"] = rng.normal(0, 0.01, (V, 3))
    return m


def renderable_model() -> dict:
    """:func:`tiny_model` with :data:`RENDER_FACES`: a head that covers part of a rendered image."""
    return {**tiny_model(), "f": RENDER_FACES.copy()}


def write_pkl(path: str | os.PathLike, d) -> Path:
    """Pickle ``d`` (protocol 2, like FLAME's files) to ``path``; returns the path."""
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)
    return Path(path)


@pytest.fixture(scope="session")
def flame_kit() -> SimpleNamespace:
    """``tiny_model(...)``, ``renderable_model()``, ``write_pkl(path, d)``, ``V_TEMPLATE``, ``MASKS``."""
    return SimpleNamespace(tiny_model=tiny_model, renderable_model=renderable_model, write_pkl=write_pkl, V_TEMPLATE=V_TEMPLATE,
                           MASKS=MASKS)


# ----------------------------------------------------------------------------------------------
# converter inputs: speech-like audio (silero fires on it) and motion in DualTalk's layout


def _resonator(x: np.ndarray, f: float, bw: float, sr: int) -> np.ndarray:
    r = np.exp(-np.pi * bw / sr)
    a = [1.0, -2 * r * np.cos(2 * np.pi * f / sr), r * r]
    return lfilter([sum(a)], a, x)


VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (530, 1840, 2480), (300, 870, 2240), (570, 840, 2410)]  # formants (Hz)


def speechlike(seconds: float, f0: float = 130.0, seed: int = 0, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Syllables: a short fricative noise burst, then a voiced vowel (Rosenberg glottal pulses with
    pitch movement through three formant resonators). Verified: silero-vad gives speech
    probability ~1 on it, ~0 on silence, pure tones and white noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n)
    i, phase = 0, 0.0
    while i < n:
        L = min(int(rng.uniform(0.15, 0.3) * sr), n - i)
        c = int(min(L * 0.25, 0.05 * sr))
        t = np.arange(L - c) / sr
        f0c = f0 * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 6)))
        ph = phase + np.cumsum(f0c / sr)
        phase = ph[-1] % 1 if len(ph) else phase
        frac = ph % 1
        pulse = np.where(frac < 0.6, 0.5 * (1 - np.cos(np.pi * frac / 0.6)), np.cos(np.pi * (frac - 0.6) / 0.8))
        y = np.diff(pulse, prepend=pulse[:1])
        for k, f in enumerate(VOWELS[rng.integers(len(VOWELS))]):
            y = _resonator(y, f, 60 + 30 * k, sr)
        y = y / (np.abs(y).max() + 1e-9)
        ramp = np.arange(len(y))
        y *= np.minimum(1, np.minimum(ramp / (0.02 * sr), (len(y) - ramp) / (0.04 * sr)))
        noise = _resonator(rng.standard_normal(c), rng.uniform(2500, 5000), 1500, sr)
        out[i : i + c] = 0.3 * noise / (np.abs(noise).max() + 1e-9)
        out[i + c : i + L] = y
        i += L
    return (0.3 * out / np.abs(out).max()).astype(np.float32)


def _track_audio(seconds: float, speech: list[tuple[float, float]], seed: int = 0, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Quiet background noise with speech-like bursts on the given [start, end) seconds."""
    rng = np.random.default_rng(seed + 1000)
    wav = (0.002 * rng.standard_normal(int(seconds * sr))).astype(np.float32)
    for j, (a, b) in enumerate(speech):
        s = speechlike(b - a, f0=110 + 40 * (seed % 3), seed=seed * 10 + j, sr=sr)
        wav[int(a * sr) : int(a * sr) + len(s)] += s
    return wav


def _dualtalk_motion(T: int, seed: int) -> dict[str, np.ndarray]:
    """One side's ``.npz`` arrays; expression channel c is about c, so a misplaced channel is visible."""
    t = np.arange(T)[:, None]
    exp = (np.arange(50)[None, :] + 0.01 * t + seed).astype(np.float32)  # (T, 50)
    pose = (100 + 10 * np.arange(6)[None, :] + 0.1 * np.sin(t / 7 + seed)).astype(np.float32)  # (T, 6): global rot, jaw
    return {"exp": exp, "pose": pose, "shape": np.zeros((T, 100), np.float32), "tex": np.zeros((T, 50), np.float32),
            "cam": np.zeros((T, 3), np.float32), "light": np.zeros((T, 27), np.float32)}


def _write_dualtalk(folder: Path, cid: str, seconds: float = 12.0, seed: int = 0, motion_sides=(1, 2),
                    speech=((1.0, 5.0), (6.5, 10.5))) -> None:
    """``<cid>_speaker{1,2}.npz`` (for ``motion_sides``) and ``.wav`` in ``folder``; speaker s talks during ``speech[s-1]``."""
    folder.mkdir(parents=True, exist_ok=True)
    T = int(round(seconds * FPS))
    for side in (1, 2):
        if side in motion_sides:
            np.savez(folder / f"{cid}_speaker{side}.npz", **_dualtalk_motion(T, seed + side))
        wav = _track_audio(seconds, [speech[side - 1]], seed=seed * 2 + side)
        sf.write(folder / f"{cid}_speaker{side}.wav", wav, SAMPLE_RATE, subtype="FLOAT")


@pytest.fixture(scope="session")
def track_audio():
    """``track_audio(seconds, speech=[(start, end), ...], seed=0, sr=16000)``: noise with speech-like bursts."""
    return _track_audio


@pytest.fixture(scope="session")
def dualtalk_motion():
    """``dualtalk_motion(T, seed)``: one side's DualTalk ``.npz`` arrays (``exp``, ``pose``, ...)."""
    return _dualtalk_motion


@pytest.fixture(scope="session")
def write_dualtalk():
    """``write_dualtalk(folder, cid, seconds=12.0, seed=0, motion_sides=(1, 2), speech=...)``: one DualTalk conversation."""
    return _write_dualtalk
