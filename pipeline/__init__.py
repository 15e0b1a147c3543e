"""gdpo_listener.pipeline: what the entry points in ``train/`` share.

- :mod:`.stages`: run a prerequisite stage (dataset, VAE, supervised AR-Flow) when its output is missing;
- :mod:`.run_state`: seeding, RNG state, resumable training state;
- :mod:`.factories`: ``make_*`` factories that turn config sections into components.
"""
