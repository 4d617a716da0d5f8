"""CP twin of upstream's attention with pair bias (Boltz-2, v2) on the single track.

Placements (mesh axes cp_i, cp_j): s, k_in [B, N, C_s] SINGLE_BY_I in; z [B, N, N, C_z] PAIR
(the bias itself, [B, N, N, H], when compute_pair_bias=False); mask [B, N] SINGLE_BY_I (the
key token mask, float); out [B, N, C_s] SINGLE_BY_I, bit-identical on the ranks of a tile row.
N is layout.n_padded; pad tokens (index >= layout.n) are excluded as keys.

Communication per call (square p x p mesh, n = N/p, H heads of width D = C_s/H):
    1 transpose_exchange: k_in[I_r] packed with mask[I_r], one message of B*n*(C_s+1)
      elements to (c, r) (a local clone on the diagonal, so p messages fewer mesh-wide);
    1 all_gather on ring_j of the partial softmax state [B*mult, n, H, D+2] (unnormalised
      output, running max, sum of exponentials) in at least fp32: each rank sends
      B*mult*n*(C_s+2H) elements and receives p-1 such blocks (none on 1x1).
    The bias tile never moves; no (query, key) pair is scored on more than one rank.
Upstream twin: boltz/model/layers/attentionv2.py AttentionPairBias
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from boltz.model.layers.attentionv2 import AttentionPairBias as _UpstreamAttentionPairBias
from boltz_cp.distributed import PAIR, SINGLE_BY_I, TokenLayout, check_placements, transpose_exchange
from boltz_cp.layers._dtensor import like

# Query rows are processed in chunks of at most this many (query, key) pairs, so the
# LayerNorm'd copy of the z tile inside proj_z never exists for the whole tile at once.
CHUNK_PAIRS = 1 << 18


def merge_partials(states: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    """Merge partial softmax states [..., D+2] = (o, max, sum-exp) in list order -> o / sum.

    Deterministic: the same list gives the same bits on every rank. A state with max = -inf
    (no keys) contributes nothing; at least one state must have a finite max.
    """
    d = head_dim
    m_all = states[0][..., d]
    for st in states[1:]:
        m_all = torch.maximum(m_all, st[..., d])
    o_sum, l_sum = None, None
    for st in states:
        scale = torch.exp(st[..., d] - m_all)  # -inf - finite -> 0: an empty block adds 0
        o_c, l_c = st[..., :d] * scale[..., None], st[..., d + 1] * scale
        o_sum = o_c if o_sum is None else o_sum + o_c
        l_sum = l_c if l_sum is None else l_sum + l_c
    return o_sum / l_sum[..., None]


class AttentionPairBias(_UpstreamAttentionPairBias):
    """Attention with pair bias on row blocks: queries I_r, keys J_c, own bias tile, row merge.

    Rank (r, c) scores its queries I_r against the keys J_c with the bias of its own tile
    z[I_r, J_c]. k_in[J_c] and mask[J_c] come from the transpose partner (c, r), whose row
    block is I_c = J_c. Each rank keeps an unnormalised partial (o, max, sum-exp) per query
    and head; the tile row all-gathers these and merges them in column order, so every rank
    of the row ends with the same bits. Same parameters as upstream (proj_q/k/v/g/z/o).
    """

    def forward(self, s: DTensor, z: DTensor, mask: DTensor, k_in: DTensor,  # type: ignore[override]
                layout: TokenLayout, multiplicity: int = 1) -> DTensor:
        name = type(self).__name__
        check_placements(f"{name}.s", s, SINGLE_BY_I)
        check_placements(f"{name}.z", z, PAIR)
        check_placements(f"{name}.mask", mask, SINGLE_BY_I)
        check_placements(f"{name}.k_in", k_in, SINGLE_BY_I)
        mesh = layout.mesh
        mesh.require_square(name)  # k_in[J_c] comes from the transpose partner
        if s.shape[1] != layout.n_padded or z.shape[1] != layout.n_padded:
            raise ValueError(f"{name}: expected {layout.n_padded} (padded) tokens, got s "
                             f"{tuple(s.shape)}, z {tuple(z.shape)}")

        s_tile, z_tile, k_tile, mask_tile = s.to_local(), z.to_local(), k_in.to_local(), mask.to_local()
        bsz, n = s_tile.shape[:2]
        heads, d = self.num_heads, self.head_dim
        # Upstream scores in fp32 with autocast off; promote, never demote (fp64 stays fp64).
        ct = torch.promote_types(torch.promote_types(s_tile.dtype, k_tile.dtype),
                                 torch.promote_types(z_tile.dtype, torch.float32))

        # My key block J_c is the row block of the transpose partner: fetch k_in and mask.
        wire = torch.promote_types(k_tile.dtype, mask_tile.dtype) if mask_tile.is_floating_point() \
            else k_tile.dtype
        packed = torch.cat([k_tile.to(wire), mask_tile.to(wire)[..., None]], dim=-1)
        pending = transpose_exchange(packed, mesh)

        q = self.proj_q(s_tile).view(bsz, n, heads, d)
        g = self.proj_g(s_tile).sigmoid()

        # NOTE(parity): pad keys are dropped, not masked: upstream has no pad tokens, and a
        # -inf bias on them would still change rows whose real keys are all masked. Pad
        # tokens sit at the end of the padded sequence, so the real keys of J_c are a prefix.
        j0 = layout.cols.start
        n_keys = max(0, min(n, layout.n - j0))

        received = pending.wait()
        k_in_j = received[:, :n_keys, :-1].to(k_tile.dtype)
        mask_j = received[:, :n_keys, -1]
        k = self.proj_k(k_in_j).view(k_in_j.shape[0], n_keys, heads, d)
        v = self.proj_v(k_in_j).view(k_in_j.shape[0], n_keys, heads, d)
        out_dtype = v.dtype

        state = torch.empty(q.shape[0], n, heads, d + 2, dtype=ct, device=q.device)
        if n_keys == 0:  # all my keys are padding: an empty partial
            state[..., :d] = 0
            state[..., d] = float("-inf")
            state[..., d + 1] = 0
        else:
            k_ct, v_ct = k.to(ct), v.to(ct)
            key_bias = (1 - mask_j[:, None, None].to(ct)) * -self.inf
            z_keys = z_tile[:, :, :n_keys]
            rows = max(1, CHUNK_PAIRS // n_keys)
            with torch.autocast(q.device.type, enabled=False):
                for i0 in range(0, n, rows):
                    i1 = min(n, i0 + rows)
                    bias = self.proj_z(z_keys[:, i0:i1]).repeat_interleave(multiplicity, 0)
                    # In place, in upstream's order: qk / sqrt(D) + bias + key mask bias.
                    attn = torch.einsum("bihd,bjhd->bhij", q[:, i0:i1].to(ct), k_ct)
                    attn.div_(d**0.5).add_(bias.to(ct)).add_(key_bias)
                    m_blk = attn.amax(dim=-1, keepdim=True)
                    p_blk = attn.sub_(m_blk).exp_()
                    state[:, i0:i1, :, :d] = torch.einsum("bhij,bjhd->bihd", p_blk, v_ct)
                    state[:, i0:i1, :, d] = m_blk[..., 0].transpose(1, 2)
                    state[:, i0:i1, :, d + 1] = p_blk.sum(dim=-1).transpose(1, 2)

        if mesh.cols > 1:
            states = [torch.empty_like(state) for _ in range(mesh.cols)]
            dist.all_gather(states, state, group=mesh.ring_j)
        else:
            states = [state]
        o = merge_partials(states, d).to(out_dtype).reshape(q.shape[0], n, self.c_s)
        return like(s, self.proj_o(g * o))
