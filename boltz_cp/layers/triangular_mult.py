"""CP twins of upstream's triangle multiplications (outgoing and incoming edges).

Placements (mesh axes cp_i, cp_j): x [B, N, N, C] PAIR in/out; mask [B, N, N] PAIR (pair
mask, padding 0). N is padded to layout.n_padded; pad tokens have mask 0, so they add nothing
to the sums, and their outputs are finite. Any R x C mesh: on a non-square one the product
runs on the SUMMA schedule (distributed/summa.py), after one transpose of the mis-placed operand;
both operands are then tiles of their own and the a|b projection is freed before the loop.
Communication per call on a square mesh (n = N/p, tile [B, n, n, C] in at least fp32, bf16
under precision=bf16-mixed (accumulated in fp32); see distributed/cannon.py):
per rank 2(p-1) "ring_shift" messages (p-1 on ring_j, p-1 on ring_i), 1 "transpose" message
(the transpose fused with the skew of the mis-placed operand; 0 on rank (0, 0)), 1 "skew"
message (0 on mesh row 0 for outgoing, column 0 for incoming). Per forward on 2x2: 13
messages, on 3x3: 50; on 1x1: none.
Upstream twin: boltz/model/layers/triangular_mult.py TriangleMultiplicationOutgoing,
TriangleMultiplicationIncoming.

Outgoing o[i, j] = sum_k a[i, k] b[j, k]: rank (r, c) holds a[I_r, K_c], the A operand as is,
and b[I_r, K_c] = B[c, r] of B[q, c] = b[J_c, K_q]^T (transposed operand).
Incoming o[i, j] = sum_k a[k, i] b[k, j]: a[K_r, I_c] = A[c, r] of A[r, q] = a[K_q, I_r]^T
(transposed operand), b[K_r, J_c] = B[r, c] as is. Blocks travel channel-first [B, C, n, n].
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from boltz.model.layers import triangular_mult as upstream
from boltz_cp.distributed import PAIR, TokenLayout, check_placements
from boltz_cp.distributed.cannon import cannon_matmul, cannon_matmul_owned
from boltz_cp.distributed.comm import transpose_exchange
from boltz_cp.distributed.summa import summa_matmul
from boltz_cp.layers._dtensor import like
from boltz_cp.layers._precision import wire_dtype


def _forward(module, x: DTensor, mask: DTensor, layout: TokenLayout, outgoing: bool) -> DTensor:
    name = type(module).__name__
    check_placements(f"{name}.x", x, PAIR)
    check_placements(f"{name}.mask", mask, PAIR)
    x_tile = module.norm_in(x.to_local())
    x_in_tile = x_tile
    x_tile = module.p_in(x_tile) * module.g_in(x_tile).sigmoid()
    x_tile = x_tile * mask.to_local().unsqueeze(-1)
    # NOTE(parity): upstream casts with .float(); promote to at least fp32 so fp64 stays fp64.
    dtype = torch.promote_types(x_tile.dtype, torch.float32)
    device_type = x_tile.device.type
    # Under bf16-mixed the operands (and the ring blocks) are bf16, accumulated in fp32.
    x_tile = x_tile.to(wire_dtype(device_type, dtype))
    mesh = layout.mesh
    with torch.autocast(device_type, enabled=False):
        if mesh.size == 1:
            o_tile = cannon_matmul(*_blocks(x_tile, outgoing), mesh, out_dtype=dtype)
        elif mesh.is_square:
            # The operands as tiles of their own, handed over so that the a|b projection and
            # then the unaligned blocks are freed before the ring loop (2 tiles fewer at its peak).
            operands = [t.contiguous() for t in _blocks(x_tile, outgoing)]
            del x_tile
            o_tile = cannon_matmul_owned(operands, mesh, a_transposed=not outgoing,
                                         b_transposed=outgoing, out_dtype=dtype)
        else:
            # R x C: both SUMMA operands become tiles of their own, then the a|b projection
            # is freed before the broadcast loop (measured: it was 2 of the loop's 11 tiles).
            a_blk, b_blk = _summa_operands(x_tile, outgoing, mesh)
            del x_tile
            o_tile = summa_matmul(a_blk, b_blk, mesh.grid(), dtype)
            del a_blk, b_blk
        o_tile = o_tile.permute(0, 2, 3, 1)
    out_tile = module.p_out(module.norm_out(o_tile)) * module.g_out(x_in_tile).sigmoid()
    return like(x, out_tile)


def _blocks(x_tile: torch.Tensor, outgoing: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two operands of my tile as [B, C, ., .] views of x_tile (see the module docstring)."""
    a_tile, b_tile = torch.chunk(x_tile, 2, dim=-1)
    if outgoing:  # A[r,c] = a[I_r, K_c] as [B, C, i, k]; sent B block b[., K_c] as [B, C, k, j]
        return a_tile.permute(0, 3, 1, 2), b_tile.permute(0, 3, 2, 1)
    # sent A block a[K_r, .] as [B, C, i, k]; B[r,c] = b[K_r, J_c] as [B, C, k, j]
    return a_tile.permute(0, 3, 2, 1), b_tile.permute(0, 3, 1, 2)


def _summa_operands(x_tile: torch.Tensor, outgoing: bool, mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """R x C: the operands as SUMMA takes them, new contiguous tiles that share nothing with
    x_tile: the plain one copied, the mis-placed one moved to the transposed layout."""
    a_blk, b_blk = _blocks(x_tile, outgoing)
    if outgoing:
        b_blk = transpose_exchange(b_blk, mesh, dims=(-1, -2), tag=4).wait()
        return a_blk.contiguous(), b_blk
    a_blk = transpose_exchange(a_blk, mesh, dims=(-1, -2), tag=3).wait()
    return a_blk, b_blk.contiguous()


class TriangleMultiplicationOutgoing(upstream.TriangleMultiplicationOutgoing):
    """o[i, j] = sum_k a[i, k] b[j, k] on tiles; same parameters as upstream."""

    def forward(self, x: DTensor, mask: DTensor, layout: TokenLayout) -> DTensor:  # type: ignore[override]
        return _forward(self, x, mask, layout, outgoing=True)


class TriangleMultiplicationIncoming(upstream.TriangleMultiplicationIncoming):
    """o[i, j] = sum_k a[k, i] b[k, j] on tiles; same parameters as upstream."""

    def forward(self, x: DTensor, mask: DTensor, layout: TokenLayout) -> DTensor:  # type: ignore[override]
        return _forward(self, x, mask, layout, outgoing=False)
