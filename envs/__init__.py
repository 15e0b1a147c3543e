"""gdpo_listener.envs: data, window banks and the RL environment.

Importing this package registers the gymnasium id :data:`ENV_ID` (``"GDPOListener-SDE-v0"``); the
environment module itself (``envs.gym_adapter``) is imported only by ``gymnasium.make``.
"""
import gymnasium as _gym

ENV_ID = "GDPOListener-SDE-v0"

if ENV_ID not in _gym.registry:
    _gym.register(id=ENV_ID, entry_point="gdpo_listener.envs.gym_adapter:ListenerGymEnv")
