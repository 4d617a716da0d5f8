"""CP twin of upstream's outer product mean (MSA -> pair update), a Cannon ring over S.

Placements (mesh axes cp_i, cp_j): m [B, S, N, C_m] MSA in, S on cp_i and N on cp_j (rank
(r, c) holds m[S_r, N_c]); mask [B, S, N] MSA (msa_mask; padding 0); out [B, N, N, C_z] PAIR
(the z update). S and N are padded to multiples of ``mesh.token_multiple``; padded rows and
tokens have mask 0, so they add nothing to the sums, and pad outputs are finite (the bias).
Communication per call on a square p x p mesh (s = S/p, n = N/p): one Cannon ring (distributed/cannon.py `align`
plus p steps) over two operands, a = [proj_a(m) * mask, mask] [B, s, n, c_hidden + 1] and
b = [proj_b(m) * mask, mask] [B, s, n, c_hidden + 1], in at least fp32 (bf16 under
precision=bf16-mixed, where their values are bf16 already): per rank 2(p-1)
"ring_shift" messages (p-1 on ring_j, p-1 on ring_i), 1 "transpose" message (0 on rank
(0, 0)), 1 "skew" message (0 on mesh column 0). Per forward on 2x2: 13 messages, on 3x3: 50;
on 1x1: none. Only O(S * N * c_hidden / P) data moves; the c_hidden^2 outer product never does.
On R x C: a goes once to the transposed layout (a[S in C blocks, N in R blocks], one
"transpose" message per overlapping tile), then the broadcast schedule of
distributed/summa.py walks S (C broadcasts of a on ring_j, R of b on ring_i).
Upstream twin: boltz/model/layers/outer_product_mean.py OuterProductMean

Algorithm. z[i, j] = proj_o(sum_s a[s, i] (x) b[s, j] / max(1, sum_s mask[s, i] mask[s, j])).
The sums over s contract S: the tile (r, c) is sum_q A[r, q] B[q, c] with A[r, q] =
a[S_q, N_r]^T (held by rank (q, r): the transposed operand) and B[q, c] = b[S_q, N_c] (held by
rank (q, c)). The mask travels as one extra channel of each operand, so the normaliser
sum_s mask[s, i] mask[s, j] is accumulated by the same ring. proj_o is linear, so each Cannon
step projects its partial outer product at once, in chunks of ``chunk_size`` a-channels: the
[n, n, c_hidden^2] tensor is never built whole, and chunking costs no extra messages.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from boltz.model.layers.outer_product_mean import OuterProductMean as _UpstreamOuterProductMean
from boltz_cp.distributed import (
    MSA,
    TokenLayout,
    check_placements,
    pair_from_tile,
    ring_shift,
    summa,
    transpose_exchange,
)
from boltz_cp.distributed.cannon import align
from boltz_cp.layers._precision import wire_dtype

# The per-step outer product is projected CHUNK_CHANNELS a-channels at a time on every tile size
# ([B, n, n, 4 * c_hidden]: one z tile's worth at Boltz-2 widths), so the transient is a fixed
# fraction of the tile; a size threshold left mid-size tiles (2x2 at N=256) unchunked at 8x that.
CHUNK_CHANNELS = 4


class OuterProductMean(_UpstreamOuterProductMean):
    """Outer product mean on MSA tiles; same parameters as upstream (norm, proj_a, proj_b, proj_o)."""

    def forward(self, m: DTensor, mask: DTensor, layout: TokenLayout,  # type: ignore[override]
                chunk_size: int | None = None) -> DTensor:
        """m [B, S, N, C_m] MSA, mask [B, S, N] MSA -> z update [B, N, N, C_z] PAIR.

        ``chunk_size``: a-channels projected at a time (default CHUNK_CHANNELS). Does not change
        the messages.
        """
        name = type(self).__name__
        check_placements(f"{name}.m", m, MSA)
        check_placements(f"{name}.mask", mask, MSA)
        mesh = layout.mesh
        p = mesh.rows
        m_tile, mask_tile = m.to_local(), mask.to_local().unsqueeze(-1).to(m.dtype)
        m_tile = self.norm(m_tile)
        # NOTE(parity): upstream casts with .float(); promote to at least fp32 so fp64 stays fp64.
        dtype = torch.promote_types(m_tile.dtype, torch.float32)
        mask_tile = mask_tile.to(dtype)
        device_type = m_tile.device.type
        wire = wire_dtype(device_type, dtype)  # bf16 under bf16-mixed: the ring blocks halve
        a_tile = torch.cat([self.proj_a(m_tile).to(dtype) * mask_tile, mask_tile], dim=-1).to(wire).contiguous()
        b_tile = torch.cat([self.proj_b(m_tile).to(dtype) * mask_tile, mask_tile], dim=-1).to(wire).contiguous()

        c = self.c_hidden
        n_j = b_tile.shape[2]
        n_i = n_j * mesh.cols // mesh.rows  # the output tile's rows: N / R
        if chunk_size is None:
            chunk_size = min(c, CHUNK_CHANNELS)
        # NOTE(parity): upstream projects z.to(m) in m's dtype; here in the promoted dtype.
        weight = self.proj_o.weight.to(dtype)
        out = a_tile.new_zeros((a_tile.shape[0], n_i, n_j, weight.shape[0]), dtype=dtype)
        num = a_tile.new_zeros((a_tile.shape[0], n_i, n_j), dtype=dtype)

        def accumulate(a_blk: torch.Tensor, b_blk: torch.Tensor) -> None:
            """out += proj_o.weight @ sum_s a (x) b; num += sum_s mask (x) mask (one block pair)."""
            with torch.autocast(device_type, enabled=False):  # counts stay exact (bf16: only to 256)
                num.add_(torch.einsum("bsi,bsj->bij", a_blk[..., c].to(dtype), b_blk[..., c].to(dtype)))
            a_val, b_val = a_blk[..., :c], b_blk[..., :c]
            for i in range(0, c, chunk_size):
                z = torch.einsum("bsic,bsjd->bijcd", a_val[..., i:i + chunk_size], b_val)
                out.add_(z.reshape(*z.shape[:3], -1) @ weight[:, i * c:(i + chunk_size) * c].T)

        if mesh.size == 1:
            accumulate(a_tile, b_tile)
        elif not mesh.is_square:
            # a[S_c, N_r] (S in C blocks) on ring_j, b[S_r, N_c] (S in R blocks) on ring_i.
            a_t = transpose_exchange(a_tile, mesh, tag=1).wait()
            for lo, hi, a_blk, oa, b_blk, ob in summa.stream(a_t, b_tile, mesh.grid(), b_tile.shape[1] * mesh.rows):
                accumulate(a_blk[:, oa:oa + hi - lo], b_blk[:, ob:ob + hi - lo])
            del a_t
        else:
            # Cannon over S (see distributed/cannon.py): after the alignment rank (r, c) holds
            # a[S_k, N_r] and b[S_k, N_c] with k = (r + c) mod p; a then shifts left on ring_j
            # and b up on ring_i, while the current pair is multiplied (double buffering).
            pa, pb = align(a_tile, b_tile, mesh, a_transposed=True)
            a_blk, b_blk = pa.wait(), pb.wait()
            for step in range(p):
                if step < p - 1:
                    na = ring_shift(a_blk, mesh, "j", -1, tag=1)
                    nb = ring_shift(b_blk, mesh, "i", -1, tag=2)
                accumulate(a_blk, b_blk)
                if step < p - 1:
                    a_blk, b_blk = na.wait(), nb.wait()

        out = out / num.clamp(min=1).unsqueeze(-1) + self.proj_o.bias.to(dtype)
        return pair_from_tile(out.to(m_tile.dtype), mesh)  # upstream returns m's dtype
