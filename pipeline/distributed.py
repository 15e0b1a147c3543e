"""Training on several processes with ``torch.distributed``, launched by ``torchrun``.

``torchrun`` starts one process per rank and tells each its place through environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init_distributed` reads them and joins the process group; without them (``python train/x.py``)
it returns a single-process :class:`Dist` whose collectives are no-ops, so a recipe runs one code path
and a single-process run does exactly what it did before distributed training existed.

Conventions, written once:

- backend from the device: ``gloo`` on CPU, ``nccl`` on CUDA; ``device=cuda`` means the rank's local
  GPU ``cuda:LOCAL_RANK`` (an explicit index is refused when several processes share a node);
- ``rank 0`` is the main rank: it claims the run folder, logs, prints and writes checkpoints;
- a global batch of ``B`` rows is split into contiguous blocks of ``B / world_size`` rows, rank ``r``
  taking block ``r`` (:func:`shard`); ``B`` must be a multiple of the world size;
- rank streams: rank ``r`` of a run seeded ``s`` uses :func:`rank_seed` ``(s, r)``; rank 0 keeps ``s``
  itself, so a single-process run keeps its streams;
- no collective blocks forever: the process group has a timeout (``dist.timeout_min``), and a rank
  that raises exits non-zero, which makes ``torchrun`` stop the other ranks and report that rank's error.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as tdist
from omegaconf import DictConfig, open_dict

# torchrun's variables; removed for child processes that must run single-process (single_process_env)
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
               "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
               "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE")


def launch_info(env: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables, or None when not launched by torchrun."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    except ValueError:
        raise ValueError(f"torchrun variables RANK={env['RANK']!r} WORLD_SIZE={env['WORLD_SIZE']!r} "
                         f"LOCAL_RANK={env.get('LOCAL_RANK')!r} must be integers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"torchrun variables RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local} are inconsistent")
    return rank, world, local


def backend_for(device: torch.device) -> str:
    """The process-group backend of a device type: ``nccl`` for CUDA, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(name: str, local_rank: int, world_size: int) -> torch.device:
    """The device of one rank: ``cuda`` -> ``cuda:LOCAL_RANK``; CPU as given."""
    dev = torch.device(name)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but CUDA is not available on this machine")
    if world_size == 1:
        return dev  # one process: the device as given
    if dev.index is not None:
        raise ValueError(f"device={name!r}: under torchrun give device=cuda, every rank then uses its local GPU cuda:LOCAL_RANK")
    index = local_rank if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank} needs GPU {index} but this node has {torch.cuda.device_count()}; "
                         f"run at most that many processes per node (--nproc_per_node)")
    return torch.device("cuda", index)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s streams (prompts, noise, dropout) in a run seeded ``seed``; rank 0 keeps ``seed``."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**63, int(rank)]).generate_state(1, np.uint32)[0])


def shard(n: int, rank: int, world_size: int, what: str = "batch") -> slice:
    """Rank ``rank``'s contiguous block of a global batch of ``n`` rows (``n`` a multiple of ``world_size``)."""
    if n % world_size:
        raise ValueError(f"{what}={n} must be a multiple of the number of processes ({world_size}): every rank takes {what}/{world_size}")
    per = n // world_size
    return slice(rank * per, (rank + 1) * per)


@contextmanager
def single_process_env() -> Iterator[None]:
    """Hide torchrun's variables from child processes started inside (a prerequisite stage runs single-process)."""
    saved = {k: os.environ.pop(k) for k in LAUNCH_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@dataclass
class Dist:
    """This process's place in the job and the collectives the recipes use (no-ops for one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int, what: str = "batch") -> slice:
        return shard(n, self.rank, self.world_size, what)

    def barrier(self) -> None:
        if self.is_distributed:
            tdist.barrier()

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (e.g. the run folder rank 0 claimed)."""
        if not self.is_distributed:
            return obj
        box = [obj if self.rank == src else None]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order (small picklable objects: RNG states, stats)."""
        if not self.is_distributed:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x (b, ...)`` in rank order -> ``(world_size * b, ...)`` (same shape on every rank)."""
        if not self.is_distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        tdist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``x`` reduced over ranks (``sum`` | ``max`` | ``mean``), returned as a new tensor."""
        ops = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "mean": tdist.ReduceOp.SUM}
        if op not in ops:
            raise ValueError(f"all_reduce op {op!r}; valid: {sorted(ops)}")
        if not self.is_distributed:
            return x.clone()
        y = x.detach().clone()
        tdist.all_reduce(y, op=ops[op])
        return y / self.world_size if op == "mean" else y

    def all_reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over ranks in one all-reduce, in place.

        A parameter with a gradient on some rank but not on this one joins with zeros; one without a
        gradient on every rank keeps ``grad=None`` (the optimiser skips it, as in one process).
        """
        if not self.is_distributed:
            return
        params = [p for p in params if p.requires_grad]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=self.device)
        tdist.all_reduce(has, op=tdist.ReduceOp.MAX)
        live = [p for p, h in zip(params, has.tolist()) if h]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not live:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in live])  # (n_params,)
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        offset = 0
        for p in live:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def broadcast_module_(self, module: torch.nn.Module, src: int = 0) -> None:
        """Overwrite ``module``'s parameters and buffers with rank ``src``'s (bitwise-identical copies)."""
        if not self.is_distributed:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                tdist.broadcast(t.data, src=src)

    def destroy(self) -> None:
        if self.is_distributed and tdist.is_initialized():
            tdist.destroy_process_group()


def init_distributed(device: str = "cpu", timeout_min: float = 30.0, env: dict[str, str] | None = None) -> Dist:
    """Join torchrun's process group if launched by torchrun, else a single-process :class:`Dist`.

    ``device``: the run's device setting (``cpu``, ``cuda``, ``cuda:1`` ...); under torchrun ``cuda``
    becomes ``cuda:LOCAL_RANK``. ``timeout_min``: the longest any collective may wait (a rank that
    died or hangs makes the others fail after it instead of waiting forever).
    """
    info = launch_info(env)
    if info is None or info[1] == 1:
        rank, world, local = info or (0, 1, 0)
        return Dist(rank, 1, local, rank_device(device, local, 1))
    if not float(timeout_min) > 0:
        raise ValueError(f"dist.timeout_min={timeout_min} must be > 0 minutes")
    rank, world, local = info
    dev = rank_device(device, local, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend_for(dev), rank=rank, world_size=world,
                                 timeout=timedelta(minutes=float(timeout_min)),
                                 device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local, dev)


@contextmanager
def distributed(device: str = "cpu", timeout_min: float = 30.0) -> Iterator[Dist]:
    """:func:`init_distributed` for a ``with`` block; the process group is destroyed when the block ends normally.

    On an exception the group is left alone and the exception propagates: the process exits non-zero
    and torchrun stops the other ranks (destroying a group other ranks still wait on could block).
    """
    d = init_distributed(device, timeout_min)
    yield d
    d.destroy()


def run_config(cfg: DictConfig, d: Dist) -> DictConfig:
    """The config whose settings identify the run (``run.json``): ``cfg`` itself for one process, else a
    copy with ``world_size`` added (every rank has its own streams, so the process count changes results)."""
    if not d.is_distributed:
        return cfg
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.world_size = d.world_size
    return out


def main_first(d: Dist, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn`` on rank 0 first (stages it starts run single-process), then, after a barrier, on the other ranks.

    For idempotent steps that produce missing files (dataset, prerequisite checkpoints): the other
    ranks then find rank 0's outputs. Waiting is bounded by the process group's timeout.
    """
    out = None
    if d.is_main:
        with single_process_env():
            out = fn(*args, **kwargs)
    d.barrier()
    if not d.is_main:
        out = fn(*args, **kwargs)
    return out


def on_cpu(tree: Any) -> Any:
    """``tree`` (dicts, lists, tuples) with every tensor moved to the CPU (RNG states of a state loaded onto a GPU)."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_cpu(v) for v in tree)
    return tree


def check_world_size(saved: int | None, d: Dist, path) -> None:
    """A resumed run needs the process count of the run that wrote the state (every rank has its own streams)."""
    saved = 1 if saved is None else int(saved)
    if saved != d.world_size:
        raise ValueError(f"the training state {path} was written by a run of {saved} process(es); this run has "
                         f"{d.world_size}: resume with the same number (torchrun --nproc_per_node x --nnodes = {saved})")
