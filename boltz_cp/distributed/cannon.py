"""Cannon's algorithm for block matrix products on a square p x p CP mesh (SUMMA on R x C).

`cannon_matmul(a, b, mesh)` computes the tile C[r, c] = sum_q A[r, q] @ B[q, c] on rank (r, c),
with batched local blocks ([..., m, k] @ [..., k, n]). Rank (r, c) holds block A[r, c] and
B[r, c], or, with ``a_transposed`` / ``b_transposed``, the block A[c, r] / B[c, r] (the operand
whose contracted index sits on the wrong mesh axis; the caller orients the block locally).

Schedule (after the alignment rank (r, c) holds A[r, k] and B[k, c] with k = (r + c) mod p):
1. Alignment, both operands in flight together. A: row r shifts left by r on ring_j (the
   `skew` convention of `comm`); with ``a_transposed`` the (r, c) <-> (c, r) swap and the skew
   are one message on the whole mesh: (r, c) receives from ((r+c) mod p, r), sends to
   (c, (r-c) mod p). B: column c shifts up by c on ring_i; with ``b_transposed`` (r, c)
   receives from (c, (r+c) mod p) and sends to ((c-r) mod p, r).
2. p steps: post the shift of A by -1 on ring_j and of B by -1 on ring_i, multiply the
   current blocks into C, then wait (double buffering: the next blocks travel during the
   matmul). The last step posts nothing.

Communication per call, per rank: 2(p-1) "ring_shift" messages of one block; 1 "transpose"
message for a transposed operand (0 on rank (0, 0), whose source is itself); 1 "skew" message
for a plain operand (0 on row 0 for A, on column 0 for B). Fixed points make no copy.
On p = 1: a single local matmul, no message.
Per forward over the mesh with one transposed operand: 2p^2(p-1) + p(p-1) + p^2-1 messages
(2x2: 13, 3x3: 50), i.e. 2p per rank instead of 2p+1 with a separate transpose.

Rectangular R x C meshes: a transposed operand first moves to the transposed layout
(`comm.transpose_exchange`, one message per overlapping tile), then the product runs on the
broadcast schedule of distributed/summa.py (C broadcasts on ring_j, R on ring_i).
"""

from __future__ import annotations

import torch

from boltz_cp.distributed.comm import Pending, _exchange, ring_shift, transpose_exchange
from boltz_cp.distributed.mesh import CPMesh
from boltz_cp.distributed.summa import summa_matmul


def _permute(x: torch.Tensor, mesh: CPMesh, dst: tuple[int, int], src: tuple[int, int],
             kind: str, tag: int) -> Pending:
    """Send x to tile dst and receive from tile src on the whole mesh (no copy on a fixed point)."""
    if dst == mesh.coord:
        return Pending(x, [])
    return _exchange(x, mesh.rank_of(*dst), mesh.rank_of(*src), mesh.group, kind, tag)


def align(a: torch.Tensor, b: torch.Tensor, mesh: CPMesh, *, a_transposed: bool = False,
          b_transposed: bool = False) -> tuple[Pending, Pending]:
    """Start Cannon's initial alignment of both operands (see the module docstring)."""
    p = mesh.rows  # square meshes: cannon_matmul sends R x C meshes to SUMMA
    r, c = mesh.coord
    if a_transposed:
        pa = _permute(a, mesh, (c, (r - c) % p), ((r + c) % p, r), "transpose", tag=1)
    elif r % p:
        pa = ring_shift(a, mesh, "j", -r, tag=1, _kind="skew")
    else:
        pa = Pending(a, [])
    if b_transposed:
        pb = _permute(b, mesh, ((c - r) % p, r), (c, (r + c) % p), "transpose", tag=2)
    elif c % p:
        pb = ring_shift(b, mesh, "i", -c, tag=2, _kind="skew")
    else:
        pb = Pending(b, [])
    return pa, pb


def cannon_matmul(a: torch.Tensor, b: torch.Tensor, mesh: CPMesh, *, a_transposed: bool = False,
                  b_transposed: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """C[r, c] = sum_q A[r, q] @ B[q, c] on every rank (Cannon on a square mesh, else SUMMA).

    Args:
        a: my block of A, [*batch, m, k] (A[c, r] when ``a_transposed``), equal shape on all ranks.
        b: my block of B, [*batch, k, n] (B[c, r] when ``b_transposed``).
        out_dtype: dtype of the blocks in the matmul and of C (default: a's); the blocks are
            sent as given and converted after they arrive.
    Returns:
        [*batch, m, n] block C[r, c].
    """
    return cannon_matmul_owned([a, b], mesh, a_transposed=a_transposed, b_transposed=b_transposed,
                               out_dtype=out_dtype)


def cannon_matmul_owned(operands: list[torch.Tensor], mesh: CPMesh, *, a_transposed: bool = False,
                        b_transposed: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`cannon_matmul` of operands = [a, b], which it empties: when the caller holds no other
    reference, the unaligned blocks are freed once aligned, so the loop holds one operand pair
    fewer (the aligned blocks, the next ones in flight and the accumulator)."""
    b = operands.pop()
    a = operands.pop()
    dtype = out_dtype or a.dtype
    if not mesh.is_square:
        # Orient a transposed operand as the broadcast schedule needs it: its k on the grid's
        # ring_j partition (A) or ring_i partition (B); see the module docstring.
        pa = transpose_exchange(a, mesh, dims=(-1, -2), tag=3) if a_transposed else None
        pb = transpose_exchange(b, mesh, dims=(-1, -2), tag=4) if b_transposed else None
        a = pa.wait() if pa is not None else a
        b = pb.wait() if pb is not None else b
        return summa_matmul(a, b, mesh.grid(), dtype)
    p = mesh.rows
    if p == 1:
        return torch.matmul(a.to(dtype), b.to(dtype))
    pa, pb = align(a.contiguous(), b.contiguous(), mesh, a_transposed=a_transposed,
                   b_transposed=b_transposed)
    del a, b  # the send buffers live in pa / pb until their transfers complete
    a_blk, b_blk = pa.wait(), pb.wait()
    del pa, pb
    batch = a_blk.shape[:-2]
    acc = a_blk.new_zeros((*batch, a_blk.shape[-2], b_blk.shape[-1]), dtype=dtype)
    acc3 = acc.view(-1, *acc.shape[-2:])
    for step in range(p):
        if step < p - 1:  # double buffering: the next blocks travel during this matmul
            na = ring_shift(a_blk, mesh, "j", -1, tag=1)
            nb = ring_shift(b_blk, mesh, "i", -1, tag=2)
        acc3.baddbmm_(a_blk.to(dtype).reshape(-1, *a_blk.shape[-2:]),
                      b_blk.to(dtype).reshape(-1, *b_blk.shape[-2:]))
        if step < p - 1:
            a_blk, b_blk = na.wait(), nb.wait()
    return acc
