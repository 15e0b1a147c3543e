"""The RL environment: one step is one SDE denoising transition of one latent token.

Paper section 3.3, DESIGN section 5. A batch holds ``n_prompts * G`` rollouts; the ``G`` rollouts
of a prompt share its conditioning window (``window``: row of the window bank) and a
``group_id``. For every token ``l = 0 .. N-1`` the state starts from fresh noise at flow time
``t = 0`` and takes ``K`` transitions (eq. 7, sampled by the policy)::

    m_{t+dt} = m_t + dt * v(m_t) + sigma * sqrt(dt) * eps,      dt = 1 / K

The action is ``m_{t+dt}``. After the ``K``-th transition the token joins ``history`` and the next
token starts from noise. An episode is ``N * K`` transitions (25 x 4 = 100 by default).

Reward: a vector ``(n_groups,)`` per rollout, zero on every step but the last; on the last step
the generated latents are decoded by the frozen VAE to FLAME and scored against the ground
truth on the actor's *listening* frames by the reward module (``rewards/``).

The environment owns data sampling (the window bank), the frozen VAE decoder and the reward
module; the policy (``agents/policy.py``) owns the AR-Flow parameters and reads the
conditioning of ``window`` from the same bank.
"""
from __future__ import annotations

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Composite, Unbounded
from torchrl.envs import EnvBase


class ListenerSDEEnv(EnvBase):
    """TorchRL environment over a window bank (see ``envs/windows.py``).

    Args:
        bank: window bank (TensorDict, one row per window) on ``device``.
        decoder: frozen VAE (``decode(z) -> normalised FLAME``); ``normalizer`` maps back to raw.
        reward: ``FlameReward``-like module, ``(pred, target, mask, valid) -> (B, n_groups)``.
        n_prompts, group_size: batch = ``n_prompts * group_size`` rollouts.
        sde_steps: transitions per token (``K``); ``sigma``: SDE noise scale (eq. 7).
        generator: torch generator for the initial noise of every token (reproducible rollouts).
        seed: numpy seed for window sampling.
    """

    batch_locked = True

    def __init__(self, bank: TensorDictBase, decoder, normalizer, reward, n_prompts: int = 4, group_size: int = 4,
                 sde_steps: int = 4, sigma: float = 0.5, device: str | torch.device = "cpu",
                 generator: torch.Generator | None = None, seed: int = 0):
        if group_size < 1:
            raise ValueError(f"group_size (G) must be >= 1, got {group_size} (group-relative training needs G >= 2)")
        if n_prompts < 1:
            raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
        if sde_steps < 1:
            raise ValueError(f"sde_steps must be >= 1, got {sde_steps}")
        if not (np.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
        B = n_prompts * group_size
        super().__init__(device=device, batch_size=torch.Size([B]))
        self.bank = bank
        self.decoder = decoder
        self.normalizer = normalizer
        self.reward_fn = reward
        self.n_prompts, self.group_size = n_prompts, group_size
        self.sde_steps, self.sigma = sde_steps, float(sigma)
        self.n_tokens, self.d_latent = bank["actor_latent"].shape[1:]
        self.n_windows = bank.batch_size[0]
        self.generator = generator
        self._np_rng = np.random.default_rng(seed)
        self._pending_windows: torch.Tensor | None = None
        self._elapsed = 0  # transitions since reset; rows step in lock-step, so no device read is needed
        self._make_specs(B, len(reward.group_names))

    # -- specs ---------------------------------------------------------------------------------
    def _make_specs(self, B: int, n_groups: int) -> None:
        N, D, dev = self.n_tokens, self.d_latent, self.device
        self.observation_spec = Composite(
            x=Unbounded((B, D), device=dev),  # current state m_{l,t}
            t=Bounded(0.0, 1.0, (B, 1), device=dev),  # its flow time
            token=Bounded(0, N, (B,), dtype=torch.int64, device=dev),  # l (N once the episode is over)
            sde_step=Bounded(0, self.sde_steps - 1, (B,), dtype=torch.int64, device=dev),
            history=Unbounded((B, N, D), device=dev),  # finished tokens (zeros beyond l)
            window=Bounded(0, self.n_windows - 1, (B,), dtype=torch.int64, device=dev),
            group_id=Bounded(0, self.n_prompts - 1, (B,), dtype=torch.int64, device=dev),
            shape=(B,), device=dev,
        )
        self.action_spec = Unbounded((B, D), device=dev)
        self.reward_spec = Unbounded((B, n_groups), device=dev)

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(self.reward_fn.group_names)

    def set_windows(self, windows: torch.Tensor) -> None:
        """Use these ``n_prompts`` bank rows for the next reset (evaluation); else sampled."""
        windows = torch.as_tensor(windows, dtype=torch.int64)
        if windows.shape != (self.n_prompts,):
            raise ValueError(f"set_windows expects {self.n_prompts} window indices, got shape {tuple(windows.shape)}")
        if (windows < 0).any() or (windows >= self.n_windows).any():
            raise ValueError(f"window indices must lie in [0, {self.n_windows}), got {windows.tolist()}")
        self._pending_windows = windows

    def _noise(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device if self.generator is None else self.generator.device).to(self.device)

    # -- dynamics ------------------------------------------------------------------------------
    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        if self._pending_windows is not None:
            prompts, self._pending_windows = self._pending_windows, None
        else:
            prompts = torch.as_tensor(self._np_rng.choice(self.n_windows, self.n_prompts, replace=self.n_windows < self.n_prompts))
        B, N, D = self.batch_size[0], self.n_tokens, self.d_latent
        self._elapsed = 0
        window = prompts.to(self.device).repeat_interleave(self.group_size)  # (B,)
        group_id = torch.arange(self.n_prompts, device=self.device).repeat_interleave(self.group_size)  # (B,)
        return TensorDict({
            "x": self._noise((B, D)),
            "t": torch.zeros(B, 1, device=self.device),
            "token": torch.zeros(B, dtype=torch.int64, device=self.device),
            "sde_step": torch.zeros(B, dtype=torch.int64, device=self.device),
            "history": torch.zeros(B, N, D, device=self.device),
            "window": window,
            "group_id": group_id,
            "done": torch.zeros(B, 1, dtype=torch.bool, device=self.device),
            "terminated": torch.zeros(B, 1, dtype=torch.bool, device=self.device),
        }, batch_size=self.batch_size, device=self.device)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict["action"]  # (B, D): m_{t+dt}
        token, step = tensordict["token"], tensordict["sde_step"]
        history = tensordict["history"]
        B, N, D, K = self.batch_size[0], self.n_tokens, self.d_latent, self.sde_steps
        finished = step == K - 1  # (B,) the token is complete after this transition
        new_step = torch.where(finished, torch.zeros_like(step), step + 1)
        new_token = token + finished.long()
        # write the finished token into the history (rows are in lock-step; masked write keeps it general)
        onehot = torch.nn.functional.one_hot(token.clamp(max=N - 1), N).bool() & finished[:, None]  # (B, N)
        history = torch.where(onehot[..., None], action[:, None, :], history)  # (B, N, D)
        self._elapsed += 1
        # a token starts from fresh noise; drawn only then, so the noise stream matches ARFlow.sample
        x = torch.where(finished[:, None], self._noise((B, D)), action) if self._elapsed % K == 0 else action
        t = (new_step.float() / K)[:, None]
        done = (new_token >= N)[:, None]  # (B, 1)
        reward = torch.zeros(B, len(self.group_names), device=self.device)
        if self._elapsed >= N * K:  # last transition of the episode: decode and score
            reward = torch.where(done, self.episode_reward(history, tensordict["window"]), reward)
        return TensorDict({
            "x": x, "t": t, "token": new_token, "sde_step": new_step, "history": history,
            "window": tensordict["window"], "group_id": tensordict["group_id"],
            "reward": reward, "done": done, "terminated": done.clone(),
        }, batch_size=self.batch_size, device=self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, N, Dv)`` latents -> raw FLAME ``(B, W, 67)`` through the frozen VAE."""
        return self.normalizer.denormalize(self.decoder.decode(latents))

    @torch.no_grad()
    def episode_reward(self, history: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Per-group reward ``(B, n_groups)`` of finished rollouts on the actor's listening frames."""
        rows = self.bank[window]
        pred = self.decode(history)
        return self.reward_fn(pred, rows["actor_motion"], rows["listening"], rows["actor_valid"])

    def _set_seed(self, seed: int | None) -> None:
        self._np_rng = np.random.default_rng(seed)
        if self.generator is not None and seed is not None:
            self.generator.manual_seed(seed)
