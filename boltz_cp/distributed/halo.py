"""Neighbour exchanges for sequences sharded contiguously over all P ranks in global rank order.

Atom windows are split over the mesh as one sequence: rank q = r*cols + c holds the q-th
contiguous piece (see boltz_cp/modules/atom_windows.py). Two primitives serve it:

- ``halo_exchange(x, mesh, halo)``: rank q receives the last ``halo`` elements (along ``dim``)
  of rank q-1 and the first ``halo`` of rank q+1; ``wait()`` returns
  ``cat([left, x, right], dim)``. Ranks 0 and P-1 get zeros for the missing side, like the
  zero padding of a serial sequence. No wraparound.
- ``span_reduce(partial, spans, mesh, block)``: each rank holds partial sums for the index
  range ``spans[rank] = (lo, hi)`` of a padded length-``P*block`` axis; rank d gets the total
  over all ranks of block d = [d*block, (d+1)*block) (the SINGLE_FULL block of d), summed in
  ascending source-rank order, so the result is deterministic.

Communication per call (P = mesh.size, global ranks; every rank of the mesh must call, in the
same order, with like-shaped x / consistent spans):
- ``halo_exchange``: up to 2 messages of ``halo`` slices of x (to q-1 and q+1), 1 from each
  neighbour; ranks 0 and P-1 send 1, none on a 1x1 mesh. Counted as "halo".
- ``span_reduce``: one message per (source, destination) pair whose span and block overlap,
  of that overlap only; nothing to oneself. A rank sends about len(span) slices in total.
  Counted as "span_reduce".
Both count their messages and bytes in `boltz_cp.distributed.comm.comm_counters`.

gloo facts respected here: one `batch_isend_irecv` per call, on the mesh group; ``peer`` is a
global rank; nothing is sent to oneself; send buffers are contiguous.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from boltz_cp.distributed import p2p
from boltz_cp.distributed.comm import _COUNTERS
from boltz_cp.distributed.mesh import CPMesh


class Deferred:
    """An in-flight exchange whose result is assembled by ``wait()`` (like comm.Pending).

    Keeps the send buffers alive until the transfer completes.
    """

    def __init__(self, works: list, finish: Callable[[], torch.Tensor], keep: list | None = None):
        self._works, self._finish, self._keep = works, finish, keep
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            for w in self._works:
                w.wait()
            self._result = self._finish()
            self._works, self._finish, self._keep = [], None, None
        return self._result

    def is_completed(self) -> bool:
        return self._result is not None or all(w.is_completed() for w in self._works)


def _start(ops: list, kind: str, sends: list[torch.Tensor]) -> list:
    if not ops:
        return []
    _COUNTERS[kind] += len(sends)
    _COUNTERS["bytes_sent"] += sum(t.numel() * t.element_size() for t in sends)
    return p2p.batch_isend_irecv(ops)


def halo_exchange(x: torch.Tensor, mesh: CPMesh, halo: int, dim: int = 1, *,
                  tag: int = 0) -> Deferred:
    """Start the exchange of ``halo``-wide edges along ``dim`` with ranks q-1 and q+1.

    ``wait()`` -> ``cat([left, x, right], dim)`` with left = the last ``halo`` of rank q-1's x
    (zeros on rank 0) and right = the first ``halo`` of rank q+1's x (zeros on rank P-1).
    Needs ``0 <= halo <= x.shape[dim]`` on every rank (a halo never spans two ranks).
    """
    dim = dim % x.dim()
    n = x.shape[dim]
    if not 0 <= halo <= n:
        raise ValueError(f"halo_exchange: halo {halo} must be in [0, {n}] (the local length "
                         f"along dim {dim}); a halo may not reach past the neighbour")
    q, last = mesh.local_rank, mesh.size - 1
    edge_shape = (*x.shape[:dim], halo, *x.shape[dim + 1:])
    left = x.new_zeros(edge_shape)
    right = x.new_zeros(edge_shape)
    ops, sends = [], []
    if halo > 0:
        if q > 0:
            head = x.narrow(dim, 0, halo).contiguous()
            ops += [dist.P2POp(dist.isend, head, peer=mesh.base + q - 1, group=mesh.group, tag=tag),
                    dist.P2POp(dist.irecv, left, peer=mesh.base + q - 1, group=mesh.group, tag=tag)]
            sends.append(head)
        if q < last:
            tail = x.narrow(dim, n - halo, halo).contiguous()
            ops += [dist.P2POp(dist.isend, tail, peer=mesh.base + q + 1, group=mesh.group, tag=tag),
                    dist.P2POp(dist.irecv, right, peer=mesh.base + q + 1, group=mesh.group, tag=tag)]
            sends.append(tail)
    works = _start(ops, "halo", sends)
    return Deferred(works, lambda: torch.cat([left, x, right], dim), sends)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else (lo, lo)


def span_reduce(partial: torch.Tensor, spans: Sequence[tuple[int, int]], mesh: CPMesh,
                block: int, *, tag: int = 0) -> Deferred:
    """Sum partial results over ranks into my block [rank*block, (rank+1)*block) of dim 1.

    ``partial`` [B, hi - lo, ...] holds my contribution to indices [lo, hi) = spans[my rank in the mesh];
    ``spans`` lists every rank's (lo, hi) (the same list on every rank; an empty span is
    (x, x)); all spans lie in [0, P*block). ``wait()`` -> [B, block, ...]: the sum of every
    rank's contribution to my block, added in ascending source-rank order onto zeros.
    """
    size, me = mesh.size, mesh.local_rank
    if len(spans) != size:
        raise ValueError(f"span_reduce: need one span per rank ({size}), got {len(spans)}")
    for lo, hi in spans:
        if not 0 <= lo <= hi <= size * block:
            raise ValueError(f"span_reduce: span ({lo}, {hi}) outside [0, {size * block}]")
    lo, hi = spans[me]
    if partial.shape[1] != hi - lo:
        raise ValueError(f"span_reduce: partial has {partial.shape[1]} rows along dim 1 but my "
                         f"span ({lo}, {hi}) has {hi - lo}")
    ops, sends, recvs = [], [], {}
    for d in range(size):
        if d == me:
            continue
        a, b = _overlap((lo, hi), (d * block, (d + 1) * block))
        if a < b:
            buf = partial[:, a - lo:b - lo].contiguous()
            ops.append(dist.P2POp(dist.isend, buf, peer=mesh.base + d, group=mesh.group, tag=tag))
            sends.append(buf)
    mine = (me * block, (me + 1) * block)
    for src in range(size):
        if src == me:
            continue
        a, b = _overlap(tuple(spans[src]), mine)
        if a < b:
            buf = partial.new_empty((partial.shape[0], b - a, *partial.shape[2:]))
            ops.append(dist.P2POp(dist.irecv, buf, peer=mesh.base + src, group=mesh.group, tag=tag))
            recvs[src] = (a, b, buf)
    works = _start(ops, "span_reduce", sends)

    def finish() -> torch.Tensor:
        out = partial.new_zeros((partial.shape[0], block, *partial.shape[2:]))
        for src in range(size):
            if src == me:
                a, b = _overlap((lo, hi), mine)
                part = partial[:, a - lo:b - lo]
            elif src in recvs:
                a, b, part = recvs[src]
            else:
                continue
            if a < b:
                out[:, a - mine[0]:b - mine[0]] += part
        return out

    return Deferred(works, finish, sends)
