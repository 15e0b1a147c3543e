"""Imported once by the entry-point fork server (:mod:`entry_runner`) before it forks any run.

The OpenMP wait variables every entry point sets before torch loads, then the libraries every entry
point imports. Nothing here runs a torch op (no OpenMP thread pool may exist when the server forks).
"""
import os

from gdpo_listener.pipeline.threads import omp_wait_defaults

os.environ.update(omp_wait_defaults())

import hydra  # noqa: E402,F401
import scipy.signal  # noqa: E402,F401
import tensordict  # noqa: E402,F401
import torch  # noqa: E402,F401
import torchrl.envs  # noqa: E402,F401
import transformers  # noqa: E402,F401
from transformers import AutoConfig, AutoTokenizer  # noqa: E402,F401
from transformers.audio_utils import spectrogram  # noqa: E402,F401
