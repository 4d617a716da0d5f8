"""Process-group start-up, shutdown and the cross-rank failure vote.

`init_distributed` is the only place that calls `init_process_group`. It reads the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it, a plain
`python -m boltz_cp ...` gets a world of one process over an in-memory store, so DTensor and
DeviceMesh code paths are the same for 1 and for P ranks.

Backend (`backend="auto"`): "nccl" when the chosen device is CUDA, else "gloo". `backend="gloo"`
on CUDA lets several ranks share a GPU (NCCL refuses two ranks per device): rank r then uses
device r % device_count, and P2P messages are staged through host memory (distributed/p2p.py).
Never the combined "cpu:gloo,cuda:nccl" string: it fails on CPU-only torch builds. Every process group gets an
explicit timeout, so a missing peer turns into an error instead of a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from boltz_cp.errors import ConfigError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class DistContext:
    """What a rank knows about the job it is part of."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes outputs and logs."""
        return self.rank == 0


def _resolve_device(device: str, local_rank: int, share_gpus: bool = False) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda was requested but torch sees no CUDA device "
                              "(CPU-only torch build or no visible GPU); use device=cpu")
        n = torch.cuda.device_count()
        if share_gpus:
            return torch.device("cuda", local_rank % n)
        if local_rank >= n:
            raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU: only {n} visible "
                              f"(launch at most {n} processes per node, or share GPUs with "
                              f"dist_backend=gloo)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(timeout_s: float, device: str = "auto", backend: str = "auto") -> DistContext:
    """Initialise the default process group (once) and return this rank's context.

    Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set) this joins the job over
    ``env://``. Without those variables it creates a world of size 1 backed by a HashStore
    (no networking). If a process group already exists it is reused and described as-is.

    Args:
        timeout_s: timeout of every collective / P2P op of the default group, in seconds.
        device: "auto" (CUDA if available, else CPU), "cpu" or "cuda".
        backend: "auto" (nccl on CUDA, gloo on CPU), "gloo" (also on CUDA: ranks may share a
            GPU) or "nccl" (CUDA only).
    Raises:
        ConfigError: bad timeout, device or backend, CUDA requested but absent, partial
            torchrun env.
    """
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s must be positive, got {timeout_s!r}")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed support")
    if backend not in BACKENDS:
        raise ConfigError(f"dist_backend={backend} is not one of {', '.join(BACKENDS)}")
    local_rank = _env_int("LOCAL_RANK", 0)

    if dist.is_initialized():
        backend = str(dist.get_backend())
        if device == "auto":
            dev = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        else:
            dev = _resolve_device(device, local_rank, share_gpus=backend == "gloo")
            if dev.type != "cuda" and backend == "nccl":
                raise ConfigError(f"device={device} does not match the already initialised "
                                  f"{backend} process group")
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)

    dev = _resolve_device(device, local_rank, share_gpus=backend == "gloo")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    elif backend == "nccl" and dev.type != "cuda":
        raise ConfigError("dist_backend=nccl needs CUDA devices; use dist_backend=gloo (or auto) on CPU")
    timeout = timedelta(seconds=timeout_s)
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if present and len(present) < len(_TORCHRUN_VARS):
        missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
        raise ConfigError(f"incomplete torchrun environment: {', '.join(present)} set but "
                          f"{', '.join(missing)} missing (launch with torchrun)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    if present:
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method="env://", rank=rank,
                                world_size=world_size, timeout=timeout, **kwargs)
    else:
        # Single process: an in-memory store, so no port is opened.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def shutdown_distributed() -> None:
    """Destroy the default process group if one exists (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank_failed(local_failed: bool, timeout_s: float | None = None) -> bool:
    """All ranks agree whether any of them failed: an all-reduce (MAX) of one flag.

    Called by every rank at the end of a run so that all exit non-zero together. If the vote
    itself cannot complete (a peer died, or it does not join within ``timeout_s``, default the
    process group's timeout), that counts as a failure and True is returned.
    Communication per call: one all-reduce of a single int32 on the default group.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(local_failed)
    device = torch.device("cuda", torch.cuda.current_device()) \
        if str(dist.get_backend()) == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if local_failed else 0], dtype=torch.int32, device=device)
    try:
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if timeout_s is None:
            work.wait()
        else:
            work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError:  # DistBackendError / timeout are RuntimeErrors
        return True
    return bool(flag.item())
