"""Broadcast (SUMMA) schedule for contractions on a rectangular R x C grid.

Cannon's skew (distributed/cannon.py) needs a square mesh. On R x C, two operands contract
over an index k that ring_j splits into C blocks (operand x: member q of my grid row holds
k-block q) and ring_i into R blocks (operand y: member q of my grid column holds k-block q).
`segments` cuts [0, K) at the edges of both partitions; every segment lies in one x-block and
one y-block. Walking the segments in order, the owner of each needed block broadcasts it over
its ring, so every member of a ring uses the same block at the same time and no skew is
needed. The next block of each operand is broadcast while the current one is used (two
buffers per operand).

Communication per call, per rank: C broadcasts of an x-block on ring_j and R broadcasts of a
y-block on ring_i (I am the root of one of each); none on a ring of size 1.
Counters (`comm.comm_counters`): "broadcast" counts the broadcasts I root.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from boltz_cp.distributed import comm
from boltz_cp.distributed.mesh import Grid, as_ring


def segments(k: int, parts_x: int, parts_y: int) -> list[tuple[int, int, int, int]]:
    """(lo, hi, ix, iy) for each piece of [0, k) cut at the block edges of both partitions."""
    kx, ky = k // parts_x, k // parts_y
    edges = sorted({i * kx for i in range(parts_x)} | {i * ky for i in range(parts_y)} | {k})
    return [(lo, hi, lo // kx, lo // ky) for lo, hi in zip(edges, edges[1:])]


class _Blocks:
    """Block q of one operand, broadcast from member q of a ring; one block prefetched."""

    def __init__(self, x: torch.Tensor, grid: Grid, ring: str, tag: int):
        self.x = x.contiguous()
        ring = as_ring(ring)
        self.ring, self.group, self.size = ring, grid.ring(ring), grid.ring_size(ring)
        a, b = grid.coord
        self.me = b if ring == "j" else a
        self.root = (lambda q: grid.rank_of(a, q)) if ring == "j" else (lambda q: grid.rank_of(q, b))
        self.tag = tag
        self.pending: dict[int, tuple[torch.Tensor, object]] = {}

    def _post(self, q: int) -> None:
        if q >= self.size or q in self.pending:
            return
        if self.size == 1:
            self.pending[q] = (self.x, None)
            return
        buf = self.x if q == self.me else torch.empty_like(self.x)
        work = dist.broadcast(buf, src=self.root(q), group=self.group, async_op=True)
        if q == self.me:
            comm._COUNTERS["broadcast"] += 1
            comm._COUNTERS["bytes_sent"] += buf.numel() * buf.element_size()
        self.pending[q] = (buf, work)

    def get(self, q: int) -> torch.Tensor:
        """Block q (waits for it) after posting block q + 1; earlier blocks are released."""
        self._post(q)
        self._post(q + 1)
        for old in [k for k in self.pending if k < q]:
            del self.pending[old]
        buf, work = self.pending[q]
        if work is not None:
            work.wait()
            self.pending[q] = (buf, None)
        return buf


def stream(x: torch.Tensor, y: torch.Tensor, grid: Grid, k: int, *, tag: int = 0
           ) -> Iterator[tuple[int, int, torch.Tensor, int, torch.Tensor, int]]:
    """Walk [0, k): yields (lo, hi, x_block, x_offset, y_block, y_offset) per segment, where
    x_block is the x-block (from ring_j) holding k in [lo, hi) from x_offset on, and likewise
    y_block (from ring_i). Every rank of the grid must walk the whole stream."""
    xs, ys = _Blocks(x, grid, "j", tag), _Blocks(y, grid, "i", tag + 1)
    kx, ky = k // grid.cols, k // grid.rows
    for lo, hi, ix, iy in segments(k, grid.cols, grid.rows):
        yield lo, hi, xs.get(ix), lo - ix * kx, ys.get(iy), lo - iy * ky


def summa_matmul(a: torch.Tensor, b: torch.Tensor, grid: Grid, dtype: torch.dtype) -> torch.Tensor:
    """C[r, c] = sum_k A[r, k] @ B[k, c] with my blocks a = A[I_r, K_c] [*batch, m, k/C] and
    b = B[K_r, J_c] [*batch, k/R, n]; returns [*batch, m, n] in ``dtype``."""
    k = a.shape[-1] * grid.cols
    acc = None
    for lo, hi, xa, oa, yb, ob in stream(a, b, grid, k, tag=1):
        part = torch.matmul(xa[..., oa:oa + hi - lo].to(dtype), yb[..., ob:ob + hi - lo, :].to(dtype))
        acc = part if acc is None else acc.add_(part)
    return acc
