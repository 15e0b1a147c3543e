"""gdpo_listener.evaluation: everything that judges or shows generated motion.

- :mod:`.metrics`: the paper's metrics (LVE, MHD, FDD/PDD/JDD, FD, P-FD, MSE, SID, rPCC), paired bootstrap;
- :mod:`.flame_layer`: FLAME linear blend skinning for vertex metrics (user-supplied FLAME model);
- :mod:`.generation`: held-out motion generation (one routine), the supervised quality report and the before/after table;
- :mod:`.checkpoints`: checkpoint meta, its VAE and r, fresh-clone default, checkpoint/dataset compatibility, the run's recorded reward;
- :mod:`.data`: shared evaluation data of one split (``EvalData``, ``prepare_eval_data``, ``load_eval_model``);
- :mod:`.scoring`: generate and score one checkpoint (Table 1, Table 6, per-group dynamics and rewards; all windows and
  the expressive subset);
- :mod:`.report`: ``metrics.json`` / ``metrics.md`` and the table layouts;
- :mod:`.seed_stats`: mean +- std over seeds, relative change, Welch t, findings;
- :mod:`.intent_control`: intent classifier, text-control accuracy, CFG sweep;
- :mod:`.benchmark`: bench training budget, run records, curves, figures, report;
- :mod:`.bench_runs`: the benchmark's training runs (train/gdpo.py subprocesses, reuse, records);
- :mod:`.bench_stats`: paired per-window comparisons and mechanism figures of the benchmark;
- :mod:`.sde_choice`: final-sample dynamics of the ODE and both SDEs;
- :mod:`.targets`: the issue-10 targets computed from the measured figures (pass / fail);
- :mod:`.long_sequences`: decay table of long generation;
- :mod:`.clip`: one clip from audio files, checked inputs and outputs;
- :mod:`.hardware`: measured memory bandwidth and GEMM peak, FLOP/byte counts of the AR-Flow passes, roofline bounds;
- :mod:`.render`: FLAME motion to shaded frames and MP4 videos with sound.
"""
