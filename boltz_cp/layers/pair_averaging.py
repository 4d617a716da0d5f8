"""CP twin of upstream's pair weighted averaging (pair -> MSA update), a Cannon ring over N.

Placements (mesh axes cp_i, cp_j): m [B, S, N, C_m] MSA in/out, S on cp_i and N on cp_j (rank
(r, c) holds m[S_r, N_c]); z [B, N, N, C_z] PAIR; mask [B, N, N] PAIR (the pair token mask).
S and N are padded to multiples of ``mesh.token_multiple``.
Communication per call on a square p x p mesh (s = S/p, n = N/p, H heads of width D, in at least fp32): 2 all-reduces
of [B, H, n] on ring_j (row max, then row sum of the softmax over j); one Cannon product
(distributed/cannon.py) of v [B, H, s*D, n] with w^T [B, H, n, n]: per rank 2(p-1)
"ring_shift" messages, 1 "transpose" message (0 on rank (0, 0)), 1 "skew" message (0 on mesh
row 0). Per forward on 2x2: 13 messages, on 3x3: 50; on 1x1: none. On R x C the product
runs on the SUMMA schedule (distributed/cannon.py).
Upstream twin: boltz/model/layers/pair_averaging.py PairWeightedAveraging

Algorithm. o[s, i] = sum_j w[i, j] v[s, j] per head, w = softmax_j(proj_z(z)[i, j]
- inf * (1 - mask[i, j])). Rank (r, c) normalises its weight tile w[I_r, J_c] with the row max
and row sum over all j (two small all-reduces on ring_j), then the output tile o[S_r, N_c] =
sum_q V[r, q] W[q, c] with V[r, q] = v[S_r, N_q] (held by (r, q)) and W[q, c] = w[N_c, N_q]^T
(held by (c, q): the transposed operand). Pad tokens j >= layout.n are excluded from the
softmax outright (not given the mask bias), so every real position equals upstream's, masked
rows included (they average uniformly over the N real tokens); pad outputs are finite.
No attention kernel (`boltz_cp.kernels`): the weights softmax_j(b) do not depend on the MSA
row, so they are normalised once per tile and the rest is one GEMM per ring step; there is no
per-row score block to fuse away.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from boltz.model.layers.pair_averaging import PairWeightedAveraging as _UpstreamPairWeightedAveraging
from boltz_cp.distributed import MSA, PAIR, TokenLayout, check_placements
from boltz_cp.distributed.cannon import cannon_matmul
from boltz_cp.layers._dtensor import like


class PairWeightedAveraging(_UpstreamPairWeightedAveraging):
    """Pair weighted averaging on tiles; same parameters as upstream (norm_m, norm_z, proj_*)."""

    def forward(self, m: DTensor, z: DTensor, mask: DTensor,  # type: ignore[override]
                layout: TokenLayout) -> DTensor:
        """m [B, S, N, C_m] MSA, z [B, N, N, C_z] PAIR, mask [B, N, N] PAIR -> m update (MSA)."""
        name = type(self).__name__
        check_placements(f"{name}.m", m, MSA)
        check_placements(f"{name}.z", z, PAIR)
        check_placements(f"{name}.mask", mask, PAIR)
        mesh = layout.mesh
        p = mesh.cols
        m_tile, z_tile, mask_tile = self.norm_m(m.to_local()), self.norm_z(z.to_local()), mask.to_local()
        dtype = torch.promote_types(m_tile.dtype, torch.float32)
        batch, s, n = m_tile.shape[:3]
        heads, width = self.num_heads, self.c_h

        # Row-normalised weights of my tile w[h, I_r, J_c], [B, H, n_i, n_j].
        bias = self.proj_z(z_tile).permute(0, 3, 1, 2)
        bias = (bias + (1 - mask_tile[:, None]) * -self.inf).to(dtype)
        bias = bias.masked_fill(layout.is_pad(layout.cols, bias.device), float("-inf"))
        row_max = bias.amax(dim=-1, keepdim=True)  # finite: every row has a real key somewhere
        if p > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=mesh.ring_j)
        w = torch.exp(bias - row_max)
        row_sum = w.sum(dim=-1, keepdim=True)
        if p > 1:
            dist.all_reduce(row_sum, op=dist.ReduceOp.SUM, group=mesh.ring_j)
        w = w / row_sum

        # o[S_r, N_c] = sum_q v[S_r, N_q] @ w[N_c, N_q]^T per head: A = v as [B, H, s*D, n_j],
        # the sent B block = my w tile as [B, H, n_j, n_i].
        v = self.proj_m(m_tile).to(dtype).view(batch, s, n, heads, width)
        v_blk = v.permute(0, 3, 1, 4, 2).reshape(batch, heads, s * width, n)
        o = cannon_matmul(v_blk, w.transpose(-1, -2), mesh, b_transposed=True, out_dtype=dtype)
        o = o.view(batch, heads, s, width, n).permute(0, 2, 4, 1, 3).reshape(batch, s, n, heads * width)

        g = self.proj_g(m_tile).sigmoid()
        return like(m, self.proj_o(g * o.to(g.dtype)))
