"""Broadcast (SUMMA) schedule for contractions on a rectangular R x C grid.

Cannon's skew (distributed/cannon.py) needs a square mesh. On R x C, two operands contract
over an index k that ring_j splits into C blocks (operand x: member q of my grid row holds
k-block q) and ring_i into R blocks (operand y: member q of my grid column holds k-block q).
`segments` cuts [0, K) at the edges of both partitions; every segment lies in one x-block and
one y-block. Walking the segments in order, the owner of each needed block broadcasts it over
its ring, so every member of a ring uses the same block at the same time and no skew is
needed.

Memory per operand: my own block (kept for its broadcast turn) and RECV_BUFFERS receive
buffers, allocated once and reused. The next block is broadcast while the current one is used
whenever a buffer is free for it: always when the current or the next block is my own; with
one buffer not otherwise (that block then travels after the current one is used). A block
yielded by `stream` is valid until the next one of its operand is requested (its buffer is
then refilled). Measured on 2x3 (full widths): with a fresh buffer per block, the consumer's
previous block, the current one, the prefetched one and my own were alive together, one
k|v|mask block (2 tiles) more than Cannon keeps in triangle attention; with one reused buffer
per operand the count is Cannon's two blocks.

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


# Receive buffers per operand: 1 keeps own + 1 block (Cannon's count) and overlaps a transfer
# with compute only next to my own block; 2 always overlaps, at one block more.
RECV_BUFFERS = 1


class _Blocks:
    """Block q of one operand, broadcast from member q of a ring, into reused buffers."""

    def __init__(self, x: torch.Tensor, grid: Grid, ring: str, tag: int, buffers: int = RECV_BUFFERS):
        self.x = x.contiguous()
        ring = as_ring(ring)
        self.ring, self.group, self.size = ring, grid.ring(ring), grid.ring_size(ring)
        a, b = grid.coord
        self.me = b if ring == "j" else a
        self.root = (lambda q: grid.rank_of(a, q)) if ring == "j" else (lambda q: grid.rank_of(q, b))
        self.tag = tag
        self.pending: dict[int, tuple[torch.Tensor, object]] = {}
        self.limit = max(1, buffers)
        self.buffers: list[list] = []  # [buffer, block it holds]
        self.current = -1

    def _buffer(self, q: int) -> torch.Tensor | None:
        """A receive buffer for block q: one holding an already used block (< current), or a
        new one below the limit; None when every buffer holds the block in use."""
        for slot in self.buffers:
            if slot[1] < self.current:
                slot[1] = q
                return slot[0]
        if len(self.buffers) < self.limit:
            self.buffers.append([torch.empty_like(self.x), q])
            return self.buffers[-1][0]
        return None

    def _post(self, q: int) -> None:
        if q >= self.size or q in self.pending:
            return
        if self.size == 1:
            self.pending[q] = (self.x, None)
            return
        buf = self.x if q == self.me else self._buffer(q)
        if buf is None:
            return  # no free buffer: posted when it is requested
        work = dist.broadcast(buf, src=self.root(q), group=self.group, async_op=True)
        if q == self.me:
            comm._COUNTERS["broadcast"] += 1
            comm._COUNTERS["bytes_sent"] += buf.numel() * buf.element_size()
        self.pending[q] = (buf, work)

    def get(self, q: int) -> torch.Tensor:
        """Block q (waits for it), posting block q + 1 when a buffer is free for it; blocks
        before q count as used (their buffers are refilled)."""
        self.current = q
        for old in [k for k in self.pending if k < q]:
            del self.pending[old]
        self._post(q)  # always succeeds: every buffer holds a block before q, or q itself
        self._post(q + 1)
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
    b = B[K_r, J_c] [*batch, k/R, n]; returns [*batch, m, n] in ``dtype``.

    Each segment's product is added into the accumulator in place (no product tile)."""
    k = a.shape[-1] * grid.cols
    batch, m, n = a.shape[:-2], a.shape[-2], b.shape[-1]
    acc = torch.zeros((*batch, m, n), dtype=dtype, device=a.device)
    acc3 = acc.view(-1, m, n)
    for lo, hi, xa, oa, yb, ob in stream(a, b, grid, k, tag=1):
        xs = xa[..., oa:oa + hi - lo].to(dtype)
        ys = yb[..., ob:ob + hi - lo, :].to(dtype)
        acc3.baddbmm_(xs.reshape(-1, m, hi - lo), ys.reshape(-1, hi - lo, n))
        del xa, yb, xs, ys
    return acc
