"""A deterministic synthetic dyadic corpus that reproduces the problem the paper attacks.

Two speakers take turns. Every side of every conversation has FLAME motion (all six groups), a
real 16 kHz waveform, per-frame VAD and one text description per 200-frame window. The corpus is
built so that the three regimes of the paper are present and measurable:

* **speaking is near-deterministic**: the actor's jaw opening (channel 50) and mouth expression
  channels follow the syllable envelope and vowel of the actor's *own* waveform, so audio -> jaw
  is learnable;
* **listening is one-to-many**: for one partner context the listener's reaction is drawn from
  several intents (eager nods with a smile, slow sad head shake with a frown, still and
  attentive, skeptical tilt with raised brows, laughing, confused furrow, bored look-away) with
  random amplitude and timing, so the per-frame mean over reactions is near-static -- a model
  trained with MSE collapses to it;
* **text names the intent** in varied free words ("Joyful and upbeat, nodding eagerly with a
  broad smile."), so text control is measurable (in version 2, except for a share of vague or
  missing texts).

Blinks (eyelid) and gaze saccades (eyepose) happen in all roles. The waveform is a small
source-filter synthesiser: a glottal pulse train at a per-speaker f0 (declination, accents,
jitter) filtered by per-vowel formant resonators scaled to the speaker's vocal tract, shaped by
a syllable envelope, with fricative-like noise at syllable onsets and a low noise floor between
utterances.

Expression channels have a fixed (invented) meaning here, like the leading components of a
FLAME expression basis: see ``EX_*`` below.

Two corpus versions (:data:`CORPUS_PARAMS`; the version is recorded in ``dataset.json``):

* **version 2** (default) is calibrated to real tracker FLAME (``envs/reference_stats.py``:
  per-group scales, velocity std and listening/speaking ratios of real DualTalk within a factor
  1.5): all 50 expression channels active (a flat per-intent pattern and idle motion on 10-49,
  speech drives mixed into every channel), a tracker-like high-frequency component on every
  group but the eyelids, brisk sparse head beats while speaking, small head offsets while
  listening, reactions only weakly anchored at the partner's pauses (a fifth of the events), and
  10 % missing / 15 % vague window texts;
* **version 1** is the original corpus, reproduced bit for bit: expression energy decays over
  the channel index, no jitter, all texts name their intent.

The audio and the turn-taking timeline are the same in both versions.

``idle_expr_rank=k`` (opt-in, any version; recorded in ``dataset.json``) draws the idle expression
from ``k`` shared smooth factors mixed into the 50 channels by a fixed random unit-norm mixing
instead of independently per channel: every channel keeps its std, the motion becomes
``k``-dimensional. It exists to test whether the listening collapse comes from the VAE (a
high-dimensional idle expression no r = 8 VAE can carry) or from the AR-Flow (docs/benchmarks.md, "The
VAE's ceiling").

Public API::

    INTENTS, CORPUS_VERSION, CORPUS_PARAMS, corpus_params(version, idle_expr_rank=None)
    listener_reaction(intent, n_frames, rng, partner_vad=None, identity=None, version=2) -> {group: (T, d)}
    describe(intent, rng, speaking=False) -> str
    caption(intent, rng, speaking, version=2) -> (text, kind)      kind in TEXT_KINDS
    synthesize_conversation(cid, seconds=64.0, seed=0, index=0, speakers=None, version=2) -> (Conversation, info)
    generate_corpus(out_dir, n_conversations=60, seconds=64.0, seed=0, test_fraction=0.1, progress=True,
                    workers=1, version=2) -> summary dict (DatasetWriter summary + generation time + counts)

Modules, in build-up order: ``params`` (the faces' layout, the intents' styles, the versions'
parameters), ``captions`` (window texts), ``voice`` (speakers and the waveform synthesiser),
``signals`` (smooth noise, bumps, onsets), ``motion`` (listening / speaking components, blinks,
saccades, jitter), ``conversation`` (the turn-taking plan and one conversation), ``corpus`` (the
split, worker processes and the dataset writer).

Everything is deterministic given ``seed``: conversation ``i`` of a corpus depends only on
``(seed, i)`` (and the speaker pool of ``seed``), not on how many conversations are generated.
"""

from .captions import INTENT_WORDS, TEXT_KINDS, VAGUE_TEXTS, caption, describe
from .conversation import synthesize_conversation
from .corpus import generate_corpus, split_ids
from .motion import listener_reaction
from .params import (
    CORPUS_PARAMS,
    CORPUS_VERSION,
    EX_BROW_ONE,
    EX_BROW_UP,
    EX_FROWN,
    EX_LIP_DOWN,
    EX_MOUTH_OPEN,
    EX_PRESS,
    EX_ROUND,
    EX_SMILE,
    EX_SQUINT,
    EX_STRETCH,
    INTENTS,
    JAW_OPEN,
    STYLES,
    CorpusParams,
    IntentStyle,
    corpus_params,
)
from .voice import Speaker, default_speaker, speaker_pool

__all__ = [
    "INTENT_WORDS", "TEXT_KINDS", "VAGUE_TEXTS", "caption", "describe", "synthesize_conversation", "generate_corpus", "split_ids",
    "listener_reaction", "CORPUS_PARAMS", "CORPUS_VERSION", "EX_BROW_ONE", "EX_BROW_UP", "EX_FROWN", "EX_LIP_DOWN",
    "EX_MOUTH_OPEN", "EX_PRESS", "EX_ROUND", "EX_SMILE", "EX_SQUINT", "EX_STRETCH", "INTENTS", "JAW_OPEN", "STYLES",
    "CorpusParams", "IntentStyle", "corpus_params", "Speaker", "default_speaker", "speaker_pool",
]
