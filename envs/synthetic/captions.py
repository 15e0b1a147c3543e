"""Window texts: free descriptions that name the intent, and (version 2) vague or missing captions."""
from __future__ import annotations

import numpy as np

from .params import INTENTS, corpus_params

# text: several emotion words, feature phrases and templates per intent (emotion words are
# disjoint between intents, so each text names its intent)

_WORDS = {
    "joyful": dict(
        emo=["joyful", "happy", "cheerful", "delighted", "elated", "glad"],
        emo2=["energetic", "warm", "enthusiastic", "upbeat", "bright"],
        listen=["nodding eagerly", "nodding along enthusiastically", "giving quick happy nods",
                "bobbing the head in agreement"],
        speak=["animated, with lively head movements", "bouncy and expressive in the head",
               "with upbeat, energetic head motion"],
        face=["with a broad smile", "smiling widely", "with a big grin and crinkled eyes",
              "beaming with raised cheeks"]),
    "sad": dict(
        emo=["sad", "sorrowful", "downcast", "disappointed", "gloomy", "melancholic"],
        emo2=["subdued", "heavy-hearted", "dejected", "low"],
        listen=["slowly shaking the head", "shaking the head gently in dismay",
                "giving a slow, heavy head shake"],
        speak=["with a lowered head and little movement", "quiet, with the head hanging down",
               "with slow, sagging head motion"],
        face=["with a deep frown", "with drooping lip corners and a frown",
              "brows knitted and mouth turned down", "eyes lowered and a frown"]),
    "attentive": dict(
        emo=["attentive", "focused", "engaged", "concentrated", "alert"],
        emo2=["composed", "steady", "poised", "collected"],
        listen=["holding very still", "keeping the head steady", "motionless and watchful",
                "with a slight, rare nod"],
        speak=["calm and measured, with a steady head", "with small, controlled head movements",
               "keeping an even, steady posture"],
        face=["staring directly ahead", "with wide, steady eyes", "eyes fixed forward",
              "with a composed face and open eyes"]),
    "skeptical": dict(
        emo=["skeptical", "doubtful", "suspicious", "unconvinced", "wary"],
        emo2=["guarded", "questioning", "critical", "reserved"],
        listen=["head tilted to one side", "with the head cocked", "tilting the head"],
        speak=["with a cocked head and pointed glances", "tilting the head while making a point",
               "with a sideways tilt of the head"],
        face=["one eyebrow raised", "with raised eyebrows and pursed lips",
              "brows lifted and lips pressed together", "narrowed eyes and a raised brow"]),
    "amused": dict(
        emo=["amused", "laughing", "gleeful", "tickled", "mirthful", "giggly"],
        emo2=["playful", "merry", "jolly", "lighthearted"],
        listen=["laughing heartily", "bursting into laughter", "chuckling with the head thrown back",
                "shaking with laughter"],
        speak=["grinning through a funny story", "chuckling between phrases", "with a playful bounce of the head"],
        face=["eyes squeezed with a wide open smile", "mouth wide open in a grin",
              "crinkled eyes and a huge smile"]),
    "confused": dict(
        emo=["confused", "puzzled", "perplexed", "bewildered", "uncertain"],
        emo2=["hesitant", "unsure", "lost", "baffled"],
        listen=["head tilted slightly", "leaning in with a slight tilt", "with a small hesitant head turn"],
        speak=["searching for words with a tilted head", "with hesitant, halting head motion",
               "with a slight tilt and wandering eyes"],
        face=["with a furrowed brow", "brows drawn together", "squinting in puzzlement",
              "with knitted brows and narrowed eyes"]),
    "bored": dict(
        emo=["bored", "detached", "disinterested", "indifferent", "weary", "apathetic"],
        emo2=["listless", "flat", "sluggish", "distant"],
        listen=["looking away", "gazing off to the side", "eyes wandering away"],
        speak=["monotone, glancing away", "with a flat, barely moving head", "with half-closed eyes, looking aside"],
        face=["with a blank expression", "heavy-lidded and expressionless", "with drooping eyelids"]),
}

_TEMPLATES = (
    "{Emo} and {emo2}, {feat}, {face}.",
    "{Emo}, {feat}, {face}.",
    "{A} {emo}, {emo2} look, {feat}, {face}.",
    "{Face}, {feat}; {emo} and {emo2}.",
    "{Emo} and {emo2}: {face}, {feat}.",
)

INTENT_WORDS: dict[str, tuple[str, ...]] = {k: tuple(v["emo"]) for k, v in _WORDS.items()}


def describe(intent: str, rng: np.random.Generator, speaking: bool = False) -> str:
    """One free-text description of ``intent`` (speaking-style wording if ``speaking``)."""
    if intent not in _WORDS:
        raise KeyError(f"unknown intent {intent!r}; valid: {', '.join(INTENTS)}")
    w = _WORDS[intent]

    def pick(key):
        return w[key][rng.integers(len(w[key]))]

    emo, emo2, face = pick("emo"), pick("emo2"), pick("face")
    feat = pick("speak" if speaking else "listen")
    t = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    return t.format(A="An" if emo[0] in "aeiou" else "A", Emo=emo.capitalize(), emo=emo, emo2=emo2, feat=feat, face=face,
                    Face=face[0].upper() + face[1:])


# machine-written captions are often vague: these name no intent (and no role)
VAGUE_TEXTS: tuple[str, ...] = (
    "A person.", "Someone facing the camera.", "A person in a conversation.", "An adult, front view.",
    "A face in a video call.", "Someone in a conversation, expression unclear.", "A person with a fairly neutral face.",
    "Head and shoulders of a person.", "A man or a woman in front of a plain wall.", "Someone in a dialogue.",
)
TEXT_KINDS = ("full", "vague", "missing")


def caption(intent: str, rng: np.random.Generator, speaking: bool, version: int = 2) -> tuple[str, str]:
    """The text of one window of corpus ``version`` and its kind (one of :data:`TEXT_KINDS`):
    empty ("missing") or one of :data:`VAGUE_TEXTS` ("vague") with the version's shares, else
    :func:`describe` ("full")."""
    p = corpus_params(version)
    if p.text_missing or p.text_vague:
        u = rng.random()
        if u < p.text_missing:
            return "", "missing"
        if u < p.text_missing + p.text_vague:
            return VAGUE_TEXTS[rng.integers(len(VAGUE_TEXTS))], "vague"
    return describe(intent, rng, speaking=speaking), "full"


