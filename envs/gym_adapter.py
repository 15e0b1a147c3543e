"""The SDE environment behind a ``gymnasium.Env``, for users of other RL libraries.

One gymnasium episode is one rollout (batch 1) of :class:`~envs.sde_env.ListenerSDEEnv`: the agent
observes the current latent state and schedule and chooses the next latent ``m_{t+dt}`` (the
action). The scalar reward is the lambda-weighted mean of the per-group rewards,
``sum_i lambda_i R_i / sum_i lambda_i``; the vector is in ``info["reward_vector"]`` with the group
names in ``info["reward_groups"]``. Registered as ``GDPOListener-SDE-v0`` when ``gdpo_listener.envs``
is imported; built from paths alone (``envs.factory.make_listener_env``; every keyword of it but
``n_prompts`` and ``group_size``, which are 1 here) or around a ready batch-1 TorchRL env::

    import gymnasium, gdpo_listener.envs
    env = gymnasium.make("GDPOListener-SDE-v0", dataset="data/synthetic", vae="runs/vae", reward="expr+rot")
    env = gymnasium.make("GDPOListener-SDE-v0", torchrl_env=ListenerSDEEnv(bank, vae, norm, reward,
                                                                          n_prompts=1, group_size=1))

``reset(seed=s)`` reseeds the env's noise and window sampling, so it is reproducible (gymnasium's
``check_env`` passes through ``gymnasium.make``).
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from . import ENV_ID
from .sde_env import ListenerSDEEnv

__all__ = ["ENV_ID", "ListenerGymEnv"]


class ListenerGymEnv(gym.Env):
    """gymnasium adapter over a batch-1 :class:`ListenerSDEEnv`.

    Args:
        torchrl_env: a ready batch-1 env; or None and ``factory_kwargs`` for
            :func:`~envs.factory.make_listener_env` (at least ``dataset`` and ``vae``).
    """

    metadata = {"render_modes": []}

    def __init__(self, torchrl_env: ListenerSDEEnv | None = None, **factory_kwargs):
        if torchrl_env is None:
            torchrl_env = _env_from_paths(factory_kwargs)
        elif factory_kwargs:
            raise TypeError(f"{ENV_ID}: give either torchrl_env or the factory keywords (dataset, vae, ...), "
                            f"not both (got {sorted(factory_kwargs)})")
        if torchrl_env.batch_size != torch.Size([1]):
            raise ValueError(f"the gymnasium adapter needs a ListenerSDEEnv with n_prompts=1, group_size=1 "
                             f"(batch 1), got batch {tuple(torchrl_env.batch_size)}")
        self.env = torchrl_env
        N, D, K = torchrl_env.n_tokens, torchrl_env.d_latent, torchrl_env.sde_steps
        self.observation_space = spaces.Dict({
            "x": spaces.Box(-np.inf, np.inf, (D,), np.float32),
            "t": spaces.Box(0.0, 1.0, (1,), np.float32),
            "token": spaces.Discrete(N + 1),
            "sde_step": spaces.Discrete(K),
            "history": spaces.Box(-np.inf, np.inf, (N, D), np.float32),
            "window": spaces.Discrete(torchrl_env.n_windows),
        })
        self.action_space = spaces.Box(-np.inf, np.inf, (D,), np.float32)
        lam = torchrl_env.reward_fn.lambdas.detach().cpu().double()
        self._lambdas = (lam / lam.sum()).numpy()
        self._td = None

    def _obs(self, td) -> dict:
        def arr(k):
            return td[k][0].detach().cpu().numpy().astype(np.float32)
        return {"x": arr("x"), "t": arr("t"), "token": int(td["token"][0]), "sde_step": int(td["sde_step"][0]),
                "history": arr("history"), "window": int(td["window"][0])}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.env.set_seed(seed)
        if options and "window" in options:
            self.env.set_windows(torch.tensor([int(options["window"])]))
        self._td = self.env.reset()
        return self._obs(self._td), {}

    def step(self, action):
        if self._td is None:
            raise RuntimeError("call reset() before step()")
        a = torch.as_tensor(np.asarray(action, dtype=np.float32), device=self.env.device).reshape(1, -1)
        if a.shape[1] != self.env.d_latent or not torch.isfinite(a).all():
            raise ValueError(f"action must be {self.env.d_latent} finite floats, got {np.asarray(action)!r}")
        self._td.set("action", a)
        nxt = self.env.step(self._td)["next"]
        self._td = nxt.exclude("reward", "done", "terminated")
        rvec = nxt["reward"][0].detach().cpu().double().numpy()
        terminated = bool(nxt["done"][0])
        info = {"reward_vector": rvec.astype(np.float32), "reward_groups": list(self.env.group_names)}
        return self._obs(nxt), float((rvec * self._lambdas).sum()), terminated, False, info


def _env_from_paths(kwargs: dict) -> ListenerSDEEnv:
    from .factory import make_listener_env

    missing = [k for k in ("dataset", "vae") if k not in kwargs]
    if missing:
        raise TypeError(f"{ENV_ID}: needs torchrl_env=... or the paths dataset=... and vae=... (missing {missing})")
    for k in ("n_prompts", "group_size"):
        if kwargs.get(k, 1) != 1:
            raise ValueError(f"{ENV_ID}: one gymnasium episode is one rollout, so {k} must be 1, got {kwargs[k]}")
    return make_listener_env(**{**kwargs, "n_prompts": 1, "group_size": 1})
