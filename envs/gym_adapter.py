"""The SDE environment behind a ``gymnasium.Env``, for users of other RL libraries.

One gymnasium episode is one rollout (batch 1) of :class:`~envs.sde_env.ListenerSDEEnv`: the agent
observes the current latent state and schedule and chooses the next latent ``m_{t+dt}`` (the
action). The scalar reward is the lambda-weighted mean of the per-group rewards,
``sum_i lambda_i R_i / sum_i lambda_i``; the vector is in ``info["reward_vector"]`` with the group
names in ``info["reward_groups"]``. Registered as ``GDPOListener-SDE-v0``::

    env = gymnasium.make("GDPOListener-SDE-v0", torchrl_env=ListenerSDEEnv(bank, vae, norm, reward,
                                                                          n_prompts=1, group_size=1))
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from .sde_env import ListenerSDEEnv

ENV_ID = "GDPOListener-SDE-v0"


class ListenerGymEnv(gym.Env):
    """gymnasium adapter over a batch-1 :class:`ListenerSDEEnv`."""

    metadata = {"render_modes": []}

    def __init__(self, torchrl_env: ListenerSDEEnv):
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


def register() -> None:
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point=f"{__name__}:ListenerGymEnv")


register()
