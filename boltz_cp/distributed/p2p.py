"""`batch_isend_irecv` that also carries CUDA tensors over a gloo process group.

Several ranks sharing one GPU (`dist_backend=gloo`, e.g. a 2x2 mesh as 4 processes on one
device: NCCL refuses two ranks per device) put CUDA tensors on gloo. gloo's collectives have
CUDA paths, but its send/recv hand the tensor's data pointer to the TCP transport, which cannot
read device memory. So on a gloo group every CUDA message is staged through host memory: sends
are copied to the host when the exchange starts (their values at that moment, as NCCL would
send them), receives land in host buffers and are copied into the CUDA tensors when the work
is waited on. On NCCL, and for CPU tensors, the ops go through unchanged.

Callers must `wait()` every returned work before reading a receive buffer (they all do: see
comm.Pending and halo.Deferred).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Tests set this to stage CPU tensors too (separate host buffers), to exercise the copies on a
# CPU-only machine.
STAGE_CPU = False


class _StagedWork:
    """The works of one staged batch; `wait()` also copies the host receive buffers back."""

    def __init__(self, works: list, copies: list[tuple[torch.Tensor, torch.Tensor]]):
        self._works, self._copies = works, copies

    def wait(self, timeout=None) -> bool:
        for w in self._works:
            w.wait() if timeout is None else w.wait(timeout)
        for host, target in self._copies:
            target.copy_(host)
        self._works, self._copies = [], []
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)


def _staged(t: torch.Tensor, group) -> bool:
    if t.device.type == "cpu" and not STAGE_CPU:
        return False
    return str(dist.get_backend(group)) == "gloo"


def batch_isend_irecv(ops: list) -> list:
    """`dist.batch_isend_irecv(ops)`, staging CUDA tensors through the host on gloo groups."""
    if not ops:
        return []
    if not any(_staged(op.tensor, op.group) for op in ops):
        return dist.batch_isend_irecv(ops)
    staged, copies = [], []
    for op in ops:
        t = op.tensor
        if not _staged(t, op.group):
            staged.append(op)
            continue
        if op.op in (dist.irecv, dist.recv):
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            copies.append((host, t))
        else:
            host = t.detach().to("cpu", copy=True)
        staged.append(dist.P2POp(op.op, host, peer=op.peer, group=op.group, tag=op.tag))
    return [_StagedWork(dist.batch_isend_irecv(staged), copies)]
