"""A whole corpus: the split, the worker processes and the dataset writer."""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..dataset import WINDOW, Conversation, DatasetWriter, check_output_folder
from ..flame import FPS
from .captions import TEXT_KINDS
from .conversation import synthesize_conversation
from .params import CORPUS_VERSION, INTENTS, corpus_params
from .voice import speaker_pool


def split_ids(n: int, test_fraction: float, seed: int) -> list[str]:
    """Split name per conversation index: a seeded random ``test_fraction`` goes to test
    (at least one when ``n >= 2`` and the fraction is > 0; at least one stays in train)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if test_fraction > 0 and n >= 2:
        n_test = max(n_test, 1)
    n_test = min(n_test, n - 1)
    order = np.random.default_rng([seed, 9_000_001]).permutation(n)
    test = set(order[:n_test].tolist())
    return ["test" if i in test else "train" for i in range(n)]


def make_conversation(args) -> tuple[Conversation, dict]:
    i, seconds, seed, pool, version, idle_expr_rank = args
    conv, info = synthesize_conversation(f"syn{i:04d}", seconds, seed=seed, index=i, speakers=pool, version=version,
                                         idle_expr_rank=idle_expr_rank)
    info.pop("role")
    return conv, info


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the kernel kills this worker when the parent dies (Linux ``PR_SET_PDEATHSIG``),
    so a killed ``prepare_data`` leaves no synthesising processes behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def generate_corpus(out_dir, n_conversations: int = 60, seconds: float = 64.0, seed: int = 0,
                    test_fraction: float = 0.1, progress: bool = True, workers: int = 1,
                    version: int = CORPUS_VERSION, idle_expr_rank: int | None = None) -> dict:
    """Write the synthetic corpus ``version`` to ``out_dir`` in the canonical format (atomic);
    ``idle_expr_rank``: see the module docstring (None: the version's own idle expression).

    Conversations are synthesised in ``workers`` processes (the result does not depend on it)
    and written in order by this process. ``dataset.json`` records the generator settings under
    ``"synthetic"``, including ``corpus_version``. Returns the :class:`DatasetWriter` summary
    plus ``generation_seconds``, ``intent_counts``, ``text_kind_counts``, ``seed``,
    ``corpus_version`` and ``seconds_per_conversation``. Also writes ``synthetic_labels.json``
    (per conversation: intents and text kinds per side per window, speaker ids, split) into
    the dataset folder.
    """
    if n_conversations < 1:
        raise ValueError(f"n_conversations must be >= 1, got {n_conversations}")
    if seconds * FPS < WINDOW:
        raise ValueError(f"seconds={seconds} gives fewer than {WINDOW} frames (one window); use >= {WINDOW / FPS:g}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    corpus_params(version, idle_expr_rank)  # a clear error for an unknown version or a bad rank, before any work
    check_output_folder(out_dir)  # refuse a folder that is not this project's dataset before synthesising anything
    t0 = time.perf_counter()
    splits = split_ids(n_conversations, test_fraction, seed)
    pool = speaker_pool(seed)
    labels, counts, kind_counts = {}, {k: 0 for k in INTENTS}, {k: 0 for k in TEXT_KINDS}
    jobs = [(i, seconds, seed, pool, version, idle_expr_rank) for i in range(n_conversations)]
    meta = {"synthetic": {"corpus_version": version, "seed": seed, "n_conversations": n_conversations,
                          "seconds": seconds, "test_fraction": test_fraction, "intents": list(INTENTS)}}
    if idle_expr_rank is not None:  # recorded only when set: the default corpus' dataset.json is unchanged
        meta["synthetic"]["idle_expr_rank"] = idle_expr_rank
    executor = (ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),))
                if workers > 1 and n_conversations > 1 else None)
    try:
        results = executor.map(make_conversation, jobs) if executor else map(make_conversation, jobs)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=n_conversations, desc="synthetic conversations", unit="conv")
        with DatasetWriter(out_dir, source="synthetic", extra_meta=meta) as w:
            for i, (conv, info) in enumerate(results):
                w.add(conv, splits[i])
                labels[conv.id] = {"intents": info["intents"], "text_kinds": info["text_kinds"],
                                   "speakers": info["speakers"], "split": splits[i]}
                for side, side_kinds in zip(info["intents"], info["text_kinds"]):
                    for k, kind in zip(side, side_kinds):
                        counts[k] += 1
                        kind_counts[kind] += 1
            with open(w.tmp / "synthetic_labels.json", "w") as f:
                json.dump(labels, f)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    summary = w.summary()
    summary.update(generation_seconds=time.perf_counter() - t0, intent_counts=counts, text_kind_counts=kind_counts,
                   seed=seed, corpus_version=version, seconds_per_conversation=seconds, workers=workers,
                   path=str(Path(out_dir)))
    return summary
