"""Fetch primitives for index ranges held by other ranks: token rows of a span, pair sub-blocks.

Atoms are sharded over all P ranks in global rank order (boltz_cp/modules/atom_windows.py), and
the tokens of a rank's atoms form one contiguous range, its *span*, that need not match any
token block of the mesh. Two primitives bring a rank the token data of its span:

- ``span_gather(block, spans, mesh)``: the inverse of `boltz_cp.distributed.halo.span_reduce`.
  Rank q holds the rows of SINGLE_FULL block q, [q*n_f, (q+1)*n_f) of a padded length-P*n_f
  axis (dim 1); rank d gets the rows ``spans[d] = (lo, hi)``, assembled in order. The spans
  are known to every rank beforehand, so no metadata moves.
- ``gather_pair_block(tile, mesh, want_rows, want_cols, transform)``: rank (r, c) holds pair
  tile [I_r, J_c] of a padded [B, N, N, ...] tensor; every rank names one rectangle
  (want_rows x want_cols) of token pairs and gets ``transform(x[:, rows, cols])`` for it. The
  wanted rectangles meet in one all_gather of 4 integers per rank; then each tile owner
  sends ``transform`` of each intersection (only the channels it produces, e.g. atom_z)
  straight to the rank that wants it. ``transform`` must act on each pair on its own (a
  LayerNorm + Linear, say), so applying it to sub-blocks equals applying it to the tensor.

Communication per call (P = mesh.size, global ranks; every rank of the mesh calls, in the same
order):
- ``span_gather``: one message per (owner q, destination d != q) pair whose block and span
  overlap, of that overlap only; nothing to oneself. A rank receives about len(span) rows in
  at most ceil(len(span)/n_f) + 1 messages. Counted as "span_gather".
- ``gather_pair_block``: 1 all_gather on the mesh group of [4] int64 per rank (none on 1x1),
  then one message per (tile owner, destination != owner) pair whose tile and wanted
  rectangle overlap, of that overlap only. Counted as "pair_block".
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
from boltz_cp.distributed.halo import Deferred, _overlap
from boltz_cp.distributed.mesh import CPMesh


def _start(ops: list, kind: str, sends: list[torch.Tensor]) -> list:
    _COUNTERS[kind] += len(sends)
    _COUNTERS["bytes_sent"] += sum(t.numel() * t.element_size() for t in sends)
    return p2p.batch_isend_irecv(ops) if ops else []


def span_gather(block: torch.Tensor, spans: Sequence[tuple[int, int]], mesh: CPMesh, *,
                tag: int = 0) -> Deferred:
    """Start fetching my span's rows from the SINGLE_FULL owners.

    ``block`` [B, n_f, ...]: rows [rank*n_f, (rank+1)*n_f) of dim 1 (my SINGLE_FULL block);
    ``spans``: every rank's wanted (lo, hi) (the same list on every rank; an empty span is
    (x, x)) inside [0, P*n_f). ``wait()`` -> [B, hi - lo, ...] = rows [lo, hi) of my span.
    """
    size, me, n_f = mesh.size, mesh.local_rank, block.shape[1]
    if len(spans) != size:
        raise ValueError(f"span_gather: need one span per rank ({size}), got {len(spans)}")
    for lo, hi in spans:
        if not 0 <= lo <= hi <= size * n_f:
            raise ValueError(f"span_gather: span ({lo}, {hi}) outside [0, {size * n_f}]")
    mine = (me * n_f, (me + 1) * n_f)
    lo, hi = spans[me]
    ops, sends, recvs = [], [], []
    for d in range(size):
        a, b = _overlap(tuple(spans[d]), mine)
        if d != me and a < b:
            buf = block[:, a - mine[0]:b - mine[0]].contiguous()
            ops.append(dist.P2POp(dist.isend, buf, peer=mesh.base + d, group=mesh.group, tag=tag))
            sends.append(buf)
    out = block.new_empty((block.shape[0], hi - lo, *block.shape[2:]))
    for src in range(size):
        a, b = _overlap((lo, hi), (src * n_f, (src + 1) * n_f))
        if a >= b:
            continue
        if src == me:
            out[:, a - lo:b - lo] = block[:, a - mine[0]:b - mine[0]]
        else:
            buf = block.new_empty((block.shape[0], b - a, *block.shape[2:]))
            ops.append(dist.P2POp(dist.irecv, buf, peer=mesh.base + src, group=mesh.group, tag=tag))
            recvs.append((a, b, buf))
    works = _start(ops, "span_gather", sends)

    def finish() -> torch.Tensor:
        for a, b, buf in recvs:
            out[:, a - lo:b - lo] = buf
        return out

    return Deferred(works, finish, sends)


def _tile_box(mesh: CPMesh, rank: int, n_i: int, n_j: int) -> tuple[tuple[int, int], tuple[int, int]]:
    r, c = divmod(rank, mesh.cols)  # rank inside the mesh
    return (r * n_i, (r + 1) * n_i), (c * n_j, (c + 1) * n_j)


def gather_pair_block(tile: torch.Tensor, mesh: CPMesh, want_rows: tuple[int, int],
                      want_cols: tuple[int, int],
                      transform: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                      tag: int = 0) -> Deferred:
    """Start fetching ``transform(x)[:, want_rows, want_cols]`` of a PAIR-sharded x.

    ``tile`` [B, n_i, n_j, ...] is my local tile (rows I_r, cols J_c of the padded tensor);
    ``want_rows`` / ``want_cols`` are my global token ranges (lo, hi) (empty: (x, x)), inside
    [0, rows*n_i) / [0, cols*n_j). ``transform`` (default identity) maps [B, a, b, C] to
    [B, a, b, C'] pair by pair; the owner applies it once, to the sub-blocks it serves.
    ``wait()`` -> [B, len(want_rows), len(want_cols), C'].
    """
    transform = transform if transform is not None else (lambda x: x)
    size, me = mesh.size, mesh.local_rank
    n_i, n_j = tile.shape[1], tile.shape[2]
    for (lo, hi), total, what in ((want_rows, mesh.rows * n_i, "rows"), (want_cols, mesh.cols * n_j, "cols")):
        if not 0 <= lo <= hi <= total:
            raise ValueError(f"gather_pair_block: wanted {what} ({lo}, {hi}) outside [0, {total}]")
    mine = torch.tensor([*want_rows, *want_cols], dtype=torch.int64, device=tile.device)
    if size > 1:
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=mesh.group)
        wants = [tuple(int(v) for v in t.tolist()) for t in parts]
    else:
        wants = [tuple(int(v) for v in mine.tolist())]

    box_rows, box_cols = _tile_box(mesh, me, n_i, n_j)
    (r0, _), (c0, _) = box_rows, box_cols
    # Every sub-block of my tile that some rank wants (the destination, or None for me).
    pieces: list[tuple[int | None, tuple[int, int], tuple[int, int]]] = []
    for d in range(size):
        rows, cols = _overlap(wants[d][:2], box_rows), _overlap(wants[d][2:], box_cols)
        if rows[0] < rows[1] and cols[0] < cols[1]:
            pieces.append((None if d == me else d, rows, cols))
    # One transform call over all pieces, flattened to [B, pairs, 1, C] (it acts pair by
    # pair); an empty call still gives the output's channels and dtype.
    batch, chan = tile.shape[0], tile.shape[3:]
    flat = [tile[:, a - r0:b - r0, e - c0:f - c0].reshape(batch, -1, *chan) for _, (a, b), (e, f) in pieces]
    flat = torch.cat(flat, dim=1) if flat else tile.new_empty((batch, 0, *chan))
    done = transform(flat.unsqueeze(2)).squeeze(2)
    rest, dtype = done.shape[2:], done.dtype
    sizes = [(b - a) * (f - e) for _, (a, b), (e, f) in pieces]
    mine_piece = None
    ops, sends, recvs = [], [], []
    for (d, (a, b), (e, f)), part in zip(pieces, done.split(sizes, dim=1)):
        part = part.reshape(batch, b - a, f - e, *rest).contiguous()
        if d is None:
            mine_piece = ((a, b), (e, f), part)
        else:
            ops.append(dist.P2POp(dist.isend, part, peer=mesh.base + d, group=mesh.group, tag=tag))
            sends.append(part)
    (lo_i, hi_i), (lo_j, hi_j) = want_rows, want_cols
    out = torch.empty((batch, hi_i - lo_i, hi_j - lo_j, *rest), dtype=dtype, device=tile.device)
    for src in range(size):
        src_rows, src_cols = _tile_box(mesh, src, n_i, n_j)
        rows, cols = _overlap(want_rows, src_rows), _overlap(want_cols, src_cols)
        if rows[0] >= rows[1] or cols[0] >= cols[1]:
            continue
        where = (slice(None), slice(rows[0] - lo_i, rows[1] - lo_i), slice(cols[0] - lo_j, cols[1] - lo_j))
        if src == me:
            out[where] = mine_piece[2]
        else:
            buf = torch.empty((batch, rows[1] - rows[0], cols[1] - cols[0], *rest), dtype=dtype,
                              device=tile.device)
            ops.append(dist.P2POp(dist.irecv, buf, peer=mesh.base + src, group=mesh.group, tag=tag))
            recvs.append((where, buf))
    works = _start(ops, "pair_block", sends)

    def finish() -> torch.Tensor:
        for where, buf in recvs:
            out[where] = buf
        return out

    return Deferred(works, finish, sends)
