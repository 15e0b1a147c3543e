"""Converters from public dyadic corpora to the canonical dataset format (``envs/dataset.py``).

- :func:`convert_dualtalk` - DualTalk (25 fps FLAME npz + wav; VAD from silero-vad)
- :func:`convert_seamless` - Seamless Interaction + per-frame tracker FLAME (30 fps -> 25 fps,
  Savitzky-Golay smoothing, VAD from the json ``metadata:vad`` intervals)
- :func:`silero_vad_frames`, :func:`energy_vad_frames` - per-frame VAD for sources without one

Each converter returns the :class:`~gdpo_listener.envs.dataset.DatasetWriter` summary plus
``skipped`` (list of ``(file, reason)``); see each module's docstring for the on-disk layout.
"""
from .common import ConversionError, ConversionWarning
from .dualtalk import convert_dualtalk
from .seamless import convert_seamless
from .vad import energy_vad_frames, silero_vad_frames, vad_frames

CONVERTERS = {"dualtalk": convert_dualtalk, "seamless": convert_seamless}

__all__ = [
    "CONVERTERS",
    "ConversionError",
    "ConversionWarning",
    "convert_dualtalk",
    "convert_seamless",
    "energy_vad_frames",
    "silero_vad_frames",
    "vad_frames",
]
