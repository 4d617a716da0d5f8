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
- ``transpose_exchange(x, mesh)``: 1 message to and from (c, r) on the whole mesh; the
  diagonal makes a local clone. Square meshes only.
- ``skew(x, mesh, "j")``: Cannon's skew of the left operand. Row r shifts its blocks left by
  r along ring_j: rank (r, c) sends to (r, c-r) and receives the block of (r, c+r). So if
  rank (r, c) held block A[r, c], it now holds A[r, (c+r) mod C]. Row 0 does a local clone.
- ``skew(x, mesh, "i")``: Cannon's skew of the right operand. Column c shifts its blocks up
  by c along ring_i: rank (r, c) sends to (r-c, c) and receives the block of (r+c, c); it
  now holds B[(r+c) mod R, c]. Column 0 does a local clone.
- ``inverse=True`` undoes a skew (shifts right by r / down by c).
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

from boltz_cp.distributed.mesh import CPMesh

_COUNTERS: Counter = Counter()


def comm_counters() -> dict[str, int]:
    """Messages sent by this rank since the last reset, per primitive, plus bytes sent.

    Keys: "ring_shift", "transpose", "skew" (messages sent; a local clone counts 0),
    "local_copy" (calls served without communication), "bytes_sent".
    """
    out = {"ring_shift": 0, "transpose": 0, "skew": 0, "local_copy": 0, "bytes_sent": 0}
    out.update(_COUNTERS)
    return out


def reset_comm_counters() -> None:
    _COUNTERS.clear()


class Pending:
    """An in-flight exchange; ``wait()`` blocks until it is done and returns the tile.

    Keeps the send buffer alive until the transfer completes.
    """

    def __init__(self, recv: torch.Tensor, works: list, send: torch.Tensor | None = None):
        self._recv, self._works, self._send = recv, works, send
        self._done = not works

    def wait(self) -> torch.Tensor:
        if not self._done:
            for w in self._works:
                w.wait()
            self._works, self._send, self._done = [], None, True
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
    works = dist.batch_isend_irecv(ops)
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
    group = mesh.ring(ring)
    n = mesh.cols if ring == "j" else mesh.rows
    if shift % n == 0:
        return _local(x)
    dst, src = mesh.ring_neighbors(ring, shift)
    return _exchange(x, dst, src, group, _kind, tag)


def transpose_exchange(x: torch.Tensor, mesh: CPMesh, *, tag: int = 0) -> Pending:
    """Swap tiles with the transpose partner: (r, c) receives the tile of (c, r).

    The tile itself is not transposed (callers do ``.transpose(1, 2)`` locally if they need
    z^T). Diagonal ranks get a local clone. Square meshes only (ConfigError otherwise).
    """
    partner = mesh.transpose_partner
    if partner == mesh.rank:
        return _local(x)
    return _exchange(x, partner, partner, mesh.group, "transpose", tag)


def skew(x: torch.Tensor, mesh: CPMesh, ring: str = "j", *, inverse: bool = False,
         tag: int = 0) -> Pending:
    """Cannon's initial alignment (see the module docstring for the exact convention).

    ring "j": row r shifts left by r on ring_j -> (r, c) holds block (r, c+r).
    ring "i": column c shifts up by c on ring_i -> (r, c) holds block (r+c, c).
    ``inverse=True`` applies the opposite shift (undoing the skew).
    """
    if ring not in ("i", "j"):
        raise ValueError(f"ring must be 'i' or 'j', got {ring!r}")
    r, c = mesh.coord
    amount = r if ring == "j" else c
    shift = amount if inverse else -amount
    return ring_shift(x, mesh, ring, shift, tag=tag, _kind="skew")
