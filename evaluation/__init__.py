"""gdpo_listener.evaluation: everything that judges or shows generated motion.

- :mod:`.metrics`: the paper's metrics (LVE, MHD, FDD/PDD/JDD, FD, P-FD, MSE, SID, rPCC), paired bootstrap;
- :mod:`.flame_layer`: FLAME linear blend skinning for vertex metrics (user-supplied FLAME model);
- :mod:`.generation`: held-out motion generation, the supervised quality report and the before/after table.
"""
