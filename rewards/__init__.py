"""gdpo_listener.rewards: masked kinematic statistics, reward terms, FLAME-group reward vectors.

- :mod:`.stats`: masked statistics over time (shared with the evaluation metrics);
- :mod:`.terms`: penalty terms ``(pred, target, mask) -> (B,)``;
- :mod:`.groups`: ``GroupReward``, ``FlameReward`` (``(B, n_groups)`` reward vector), ``build_reward``;
- :mod:`.examples`: a user term and a user group reward plugged in by dotted path.
"""
from .groups import BUILTIN_TERMS, DEFAULT_WEIGHTS, FlameReward, GroupReward, build_reward, parse_reward_spec
from .stats import dynamic_deviation, frame_velocity, masked_mean, masked_std, position_deviation, velocity_std
from .terms import MeanDriftTerm, MSETerm, RewardTerm, VarianceTerm, VelocityVarianceTerm

__all__ = [
    "masked_mean", "masked_std", "frame_velocity", "velocity_std", "dynamic_deviation", "position_deviation",
    "RewardTerm", "VarianceTerm", "VelocityVarianceTerm", "MeanDriftTerm", "MSETerm",
    "GroupReward", "FlameReward", "parse_reward_spec", "build_reward", "DEFAULT_WEIGHTS", "BUILTIN_TERMS",
]
