"""Asynchronous point-to-point primitives on the CP mesh: ring shifts, transpose, skew.

Every primitive starts its transfer and returns a `Pending` handle at once, so compute can
overlap the transfer; ``handle.wait()`` returns the received tile. All ranks of the ring (or
the mesh, for the transpose) must call the primitive, in the same order, with tiles of the
same shape and dtype (padding guarantees equal tile shapes; the receive buffer is allocated
like the local tile).

Communication per call, for a tile x on rank (r, c) of an R x C mesh:
- ``ring_shift(x, mesh, "j", s)``: 1 message of x on ring_j (my tile row) to (r, c+s),
  1 receive from (r, c-s), indices mod C. No message when s = 0 mod C (local clone).
- ``ring_shift(x, mesh, "i", s)``: the same on ring_i (my tile column): to (r+s, c), from
  (r-s, c), mod R.
- ``transpose_exchange(x, mesh)``: rank (r, c) receives its tile of the transposed layout
  (rows: block c of C, cols: block r of R; see the function). Square meshes: 1 message to and from (c, r), the
  diagonal makes a local clone. R x C meshes: one message per overlapping tile (at most
  ceil(R/C)+1 times ceil(C/R)+1 of them).
- ``column_block(x, mesh)``: a SINGLE_BY_I block x[I_r] -> x[J_c]. Square: the same single
  swap with (c, r); R x C: one message per row block overlapping J_c.
- ``skew(x, mesh, "j")``: Cannon's skew of the left operand. Row r shifts its blocks left by
  r along ring_j: rank (r, c) sends to (r, c-r) and receives the block of (r, c+r). So if
  rank (r, c) held block A[r, c], it now holds A[r, (c+r) mod C]. Row 0 does a local clone.
- ``skew(x, mesh, "i")``: Cannon's skew of the right operand. Column c shifts its blocks up
  by c along ring_i: rank (r, c) sends to (r-c, c) and receives the block of (r+c, c); it
  now holds B[(r+c) mod R, c]. Column 0 does a local clone.
- ``inverse=True`` undoes a skew (shifts right by r / down by c).
- ``ring_all_gather(x, mesh, ring)``: every member's x, in ring-position order (one
  collective on the ring's group; counted as 1 "all_gather" and (size - 1) copies of x in
  bytes_sent, what my block costs the ring; the key appears only once used).
After both skews rank (r, c) holds A[r, k] and B[k, c] with k = (r+c) mod p; each Cannon step
then shifts A by -1 on ring_j and B by -1 on ring_i.

gloo facts respected here: one `batch_isend_irecv` call uses a single group; ``peer`` is a
global rank even when ``group`` is given; sending to oneself fails, so zero shifts and rings
of size 1 are local clones; send buffers must be contiguous.

`CommDebugMode` does not see P2P ops on gloo, so messages are counted here: see
`comm_counters`.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from boltz_cp.distributed import p2p
from boltz_cp.distributed.mesh import CPMesh, Ring, as_ring

_COUNTERS: Counter = Counter()


def comm_counters() -> dict[str, int]:
    """Messages sent by this rank since the last reset, per primitive, plus bytes sent.

    Keys: "ring_shift", "transpose", "skew" (messages sent; a local clone counts 0),
    "broadcast" (SUMMA broadcasts rooted here, distributed/summa.py), and once used
    "all_gather" (ring all-gathers joined, `ring_all_gather`),
    "local_copy" (calls served without communication), "bytes_sent".
    """
    out = {"ring_shift": 0, "transpose": 0, "skew": 0, "broadcast": 0, "local_copy": 0, "bytes_sent": 0}
    out.update(_COUNTERS)
    return out


def reset_comm_counters() -> None:
    _COUNTERS.clear()


class Pending:
    """An in-flight exchange; ``wait()`` blocks until it is done and returns the tile.

    Keeps the send buffer alive until the transfer completes.
    """

    def __init__(self, recv: torch.Tensor, works: list, send=None, finish=None):
        self._recv, self._works, self._send, self._finish = recv, works, send, finish
        self._done = not works and finish is None

    def wait(self) -> torch.Tensor:
        if not self._done:
            for w in self._works:
                w.wait()
            if self._finish is not None:
                self._recv = self._finish()
            self._works, self._send, self._finish, self._done = [], None, None, True
        return self._recv

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works)


def _local(x: torch.Tensor) -> Pending:
    _COUNTERS["local_copy"] += 1
    return Pending(x.clone(), [])


def _exchange(x: torch.Tensor, dst: int, src: int, group, kind: str, tag: int) -> Pending:
    """Send x to global rank dst and receive a like-shaped tile from global rank src."""
    send = x.contiguous()
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, peer=dst, group=group, tag=tag),
           dist.P2POp(dist.irecv, recv, peer=src, group=group, tag=tag)]
    works = p2p.batch_isend_irecv(ops)
    _COUNTERS[kind] += 1
    _COUNTERS["bytes_sent"] += send.numel() * send.element_size()
    return Pending(recv, works, send)


def ring_shift(x: torch.Tensor, mesh: CPMesh, ring: str = "j", shift: int = 1,
               *, tag: int = 0, _kind: str = "ring_shift") -> Pending:
    """Send my tile ``shift`` positions ahead along ``ring`` and receive from ``shift`` behind.

    ring "j" runs over my tile row (ranks sharing my i-block, positions = column c);
    ring "i" over my tile column (positions = row r). After ``wait()`` rank at position q
    holds the tile of position q - shift (mod ring size). All ranks on the ring must call it
    with the same shift; ``shift`` may be any integer, and may differ between rings.
    """
    ring = as_ring(ring)
    group = mesh.ring(ring)
    n = mesh.cols if ring == Ring.RING_J else mesh.rows
    if shift % n == 0:
        return _local(x)
    dst, src = mesh.ring_neighbors(ring, shift)
    return _exchange(x, dst, src, group, _kind, tag)


def _overlap(n: int, parts_a: int, a: int, parts_b: int, b: int) -> tuple[int, int]:
    """[lo, hi) of block a of n split into parts_a blocks intersected with block b of n split
    into parts_b blocks (lo >= hi when they do not meet)."""
    la, lb = n // parts_a, n // parts_b
    return max(a * la, b * lb), min((a + 1) * la, (b + 1) * lb)


def _redistribute(pieces_out: list, pieces_in: list, out: torch.Tensor, group, kind: str, tag: int,
                  me: int) -> Pending:
    """Send and receive rectangular pieces: pieces_out [(dst, tensor)], pieces_in [(src, dst view
    of ``out``)]; pieces to/from myself are copied locally."""
    ops, recvs, sends = [], [], []
    for dst, piece in pieces_out:
        if dst == me:
            continue
        piece = piece.contiguous()
        sends.append(piece)
        ops.append(dist.P2POp(dist.isend, piece, peer=dst, group=group, tag=tag))
        _COUNTERS[kind] += 1
        _COUNTERS["bytes_sent"] += piece.numel() * piece.element_size()
    for src, view in pieces_in:
        if src == me:
            continue
        buf = torch.empty(view.shape, dtype=out.dtype, device=out.device)
        recvs.append((buf, view))
        ops.append(dist.P2POp(dist.irecv, buf, peer=src, group=group, tag=tag))
    works = p2p.batch_isend_irecv(ops) if ops else []
    if not ops:
        _COUNTERS["local_copy"] += 1

    def finish() -> torch.Tensor:
        for buf, view in recvs:
            view.copy_(buf)
        return out

    return Pending(out, works, sends, finish)


def transpose_exchange(x: torch.Tensor, mesh: CPMesh, *, dims: tuple[int, int] = (1, 2), grid=None,
                       tag: int = 0) -> Pending:
    """The tile of the transposed layout: on a grid of R x C tiles where I hold X[A_a, B_b]
    (dims ``dims`` of x: block a of D0 in R parts, block b of D1 in C parts), receive
    X[block b of D0 in C parts, block a of D1 in R parts], in X's own orientation (callers do
    ``.transpose(1, 2)`` locally when they need z^T). On a square grid this is the tile of
    (b, a): one swap with the transpose partner, a local clone on the diagonal.

    ``grid`` defaults to ``mesh.grid()``; the transposed view serves algorithms that run on
    z^T's tiles.
    """
    grid = grid or mesh.grid()
    (a, b), rows, cols = grid.coord, grid.rows, grid.cols
    d0, d1 = (d % x.dim() for d in dims)
    if rows == cols:  # (either view) the tile of (c, r)
        partner = mesh.transpose_partner
        if partner == mesh.rank:
            return _local(x)
        return _exchange(x, partner, partner, grid.group, "transpose", tag)
    n0, n1 = x.shape[d0] * rows, x.shape[d1] * cols
    shape = list(x.shape)
    shape[d0], shape[d1] = n0 // cols, n1 // rows
    out = x.new_empty(shape)
    lo0, lo1 = a * (n0 // rows), b * (n1 // cols)  # my tile's origin
    want0, want1 = b * (n0 // cols), a * (n1 // rows)  # the origin of the block I receive
    pieces_out, pieces_in = [], []
    for pa in range(rows):
        for pb in range(cols):
            peer = grid.rank_of(pa, pb)
            # What peer (pa, pb) wants from me: rows block pb of D0 in C parts, cols block pa of D1 in R parts.
            r0, r1 = _overlap(n0, rows, a, cols, pb)
            c0, c1 = _overlap(n1, cols, b, rows, pa)
            if r0 < r1 and c0 < c1:
                piece = x.narrow(d0, r0 - lo0, r1 - r0).narrow(d1, c0 - lo1, c1 - c0)
                pieces_out.append((peer, piece))
                if peer == mesh.rank:
                    out.narrow(d0, r0 - want0, r1 - r0).narrow(d1, c0 - want1, c1 - c0).copy_(piece)
            # What I want from peer: rows block b in C parts within its block pa in R parts, and so on.
            r0, r1 = _overlap(n0, cols, b, rows, pa)
            c0, c1 = _overlap(n1, rows, a, cols, pb)
            if r0 < r1 and c0 < c1:
                pieces_in.append((peer, out.narrow(d0, r0 - want0, r1 - r0).narrow(d1, c0 - want1, c1 - c0)))
    return _redistribute(pieces_out, pieces_in, out, grid.group, "transpose", tag, mesh.rank)


def column_block(x: torch.Tensor, mesh: CPMesh, *, dim: int = 1, tag: int = 0) -> Pending:
    """x[I_r] (a SINGLE_BY_I block along ``dim``) -> x[J_c], my column block.

    The piece I_r' ∩ J_c comes from rank (r', r mod C): on a square mesh that is the transpose
    partner (c, r) alone (one swap, a local clone on the diagonal), on R x C one message per
    row block overlapping J_c.
    """
    rows, cols = mesh.rows, mesh.cols
    r, c = mesh.coord
    d = dim % x.dim()
    n = x.shape[d] * rows
    if rows == cols:
        partner = mesh.transpose_partner
        if partner == mesh.rank:
            return _local(x)
        return _exchange(x, partner, partner, mesh.group, "transpose", tag)
    shape = list(x.shape)
    shape[d] = n // cols
    out = x.new_empty(shape)
    mine, want = r * (n // rows), c * (n // cols)
    pieces_out, pieces_in = [], []
    for qr in range(rows):  # receivers (qr, qc) whose source column is my column c
        if qr % cols != c:
            continue
        for qc in range(cols):
            lo, hi = _overlap(n, rows, r, cols, qc)
            if lo < hi:
                peer = mesh.rank_of(qr, qc)
                piece = x.narrow(d, lo - mine, hi - lo)
                pieces_out.append((peer, piece))
                if peer == mesh.rank:
                    out.narrow(d, lo - want, hi - lo).copy_(piece)
    for sr in range(rows):
        lo, hi = _overlap(n, cols, c, rows, sr)
        if lo < hi:
            pieces_in.append((mesh.rank_of(sr, r % cols), out.narrow(d, lo - want, hi - lo)))
    return _redistribute(pieces_out, pieces_in, out, mesh.group, "transpose", tag, mesh.rank)


def skew(x: torch.Tensor, mesh: CPMesh, ring: str = "j", *, inverse: bool = False,
         tag: int = 0) -> Pending:
    """Cannon's initial alignment (see the module docstring for the exact convention).

    ring "j": row r shifts left by r on ring_j -> (r, c) holds block (r, c+r).
    ring "i": column c shifts up by c on ring_i -> (r, c) holds block (r+c, c).
    ``inverse=True`` applies the opposite shift (undoing the skew).
    """
    ring = as_ring(ring)
    r, c = mesh.coord
    amount = r if ring == Ring.RING_J else c
    shift = amount if inverse else -amount
    return ring_shift(x, mesh, ring, shift, tag=tag, _kind="skew")


def ring_all_gather(x: torch.Tensor, mesh: CPMesh, ring: str = "j") -> Pending:
    """Every member's x along ``ring``: ``wait()`` returns a list indexed by ring position
    (c on ring_j, r on ring_i; my own entry is a copy of x). Asynchronous; all members must
    call it with tiles of the same shape and dtype. A ring of size 1 returns [x]: no message,
    no copy."""
    ring = as_ring(ring)
    size = mesh.cols if ring == Ring.RING_J else mesh.rows
    if size == 1:
        return Pending([x], [])
    send = x.contiguous()
    parts = [torch.empty_like(send) for _ in range(size)]
    work = dist.all_gather(parts, send, group=mesh.ring(ring), async_op=True)
    _COUNTERS["all_gather"] += 1
    _COUNTERS["bytes_sent"] += (size - 1) * send.numel() * send.element_size()
    return Pending(parts, [work], send)
