"""gdpo_listener.pipeline: what the entry points in ``train/`` share.

- :mod:`.stages`: run a prerequisite stage (dataset, VAE, supervised AR-Flow) when its output is missing;
- :mod:`.run_state`: seeding, RNG state, resumable training state (one helper for every stage);
- :mod:`.factories`: ``make_*`` factories that turn config sections into components;
- :mod:`.checks`: range checks of numeric settings, before any long work;
- :mod:`.run_dir`: the run's output folder (never another run's), its lock, resumed logs;
- :mod:`.threads`: ``threads: auto`` and passive OpenMP waiting;
- :mod:`.distributed`: torchrun (gloo / nccl), rank seeds and shards, rank-0 writing.
"""
