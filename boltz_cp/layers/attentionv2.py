"""CP twin of upstream's attention with pair bias (Boltz-2, v2) on the single track.

Placements (mesh axes cp_i, cp_j): s, k_in [B, N, C_s] SINGLE_BY_I in; z [B, N, N, C_z] PAIR
(the bias itself, [B, N, N, H], when compute_pair_bias=False); mask [B, N] SINGLE_BY_I (the
key token mask, float); out [B, N, C_s] SINGLE_BY_I, bit-identical on the ranks of a tile row.
N is layout.n_padded; pad tokens (index >= layout.n) are excluded as keys.

Communication per call (p x p mesh, n = N/p, H heads of width D = C_s/H):
    1 column_block: k_in[I_r] packed with mask[I_r], one message of B*n*(C_s+1)
      elements to (c, r) (a local clone on the diagonal, so p messages fewer mesh-wide; on
      R x C one message per row block overlapping J_c);
    1 all_gather on ring_j of the partial softmax state [B*mult, n, H, D+2] (unnormalised
      output, running max, sum of exponentials) in at least fp32: each rank sends
      B*mult*n*(C_s+2H) elements and receives p-1 such blocks (none on 1x1).
    The bias tile never moves; no (query, key) pair is scored on more than one rank.
Scores: `boltz_cp.kernels.attend_block` per query-row chunk (kernels.attention picks the
backend; fused keeps no score block, only the chunk of bias proj_z produces).
Upstream twin: boltz/model/layers/attentionv2.py AttentionPairBias
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from boltz.model.layers.attentionv2 import AttentionPairBias as _UpstreamAttentionPairBias
from boltz_cp.distributed import PAIR, SINGLE_BY_I, TokenLayout, check_placements
from boltz_cp.distributed.comm import column_block
from boltz_cp.kernels import attend_block
from boltz_cp.layers._dtensor import like

# Query rows are processed in chunks whose transient (the LayerNorm'd z inside proj_z, or the
# given bias repeated per sample) holds at most this many elements (2^18 pairs of Boltz-2's
# 128 z channels), so it never exists for the whole tile; a given bias of 16 heads thus runs in
# 8x fewer chunks (fewer kernel launches) for the same memory.
CHUNK_ELEMENTS = 1 << 25


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
        pending = column_block(packed, mesh)

        q = self.proj_q(s_tile).view(bsz, n, heads, d)
        g = self.proj_g(s_tile).sigmoid()
        received = pending.wait()
        n_keys = _real_keys(layout, received.shape[1])
        k_in_j = received[:, :n_keys, :-1].to(k_tile.dtype)
        mask_j = received[:, :n_keys, -1]
        k = self.proj_k(k_in_j).view(k_in_j.shape[0], n_keys, heads, d)
        v = self.proj_v(k_in_j).view(k_in_j.shape[0], n_keys, heads, d)
        out_dtype = v.dtype
        state = self._partial(q, k, v, mask_j, z_tile, multiplicity, ct)

        if mesh.cols > 1:
            states = [torch.empty_like(state) for _ in range(mesh.cols)]
            dist.all_gather(states, state, group=mesh.ring_j)
        else:
            states = [state]
        o = merge_partials(states, d).to(out_dtype).reshape(q.shape[0], n, self.c_s)
        return like(s, self.proj_o(g * o))

    def forward_full(self, s_f: torch.Tensor, bias_tile: torch.Tensor, mask_f: torch.Tensor,
                     k_in_f: torch.Tensor, layout: TokenLayout, multiplicity: int = 1) -> torch.Tensor:
        """The same attention with every per-token projection done once: on SINGLE_FULL blocks.

        s_f, k_in_f [B', n_f, C_s] and mask_f [B', n_f] are my SINGLE_FULL block (sub-block c of
        I_r, n_f = N/P); bias_tile [B, n, n, H] is my tile of the bias (compute_pair_bias=False
        only). Returns my block of the output [B', n_f, C_s].
        Communication: 1 all_gather on ring_j of (q, k, v, mask) [B', n_f, 3*C_s + 1] -> I_r;
        1 column_block of (k, v, mask)[I_r] -> J_c; 1 all_to_all on ring_j of the partial
        softmax states, each rank receiving the [B', n_f, H, D+2] rows of its block from every
        column. The bias tile never moves; no projection or (query, key) pair is computed twice.
        """
        if self.compute_pair_bias:
            raise ValueError(f"{type(self).__name__}.forward_full takes the bias itself (compute_pair_bias=False)")
        mesh = layout.mesh
        bsz, n_f = s_f.shape[:2]
        heads, d, p = self.num_heads, self.head_dim, mesh.cols
        n = n_f * p
        ct = torch.promote_types(torch.promote_types(s_f.dtype, k_in_f.dtype),
                                 torch.promote_types(bias_tile.dtype, torch.float32))
        wire = torch.promote_types(s_f.dtype, mask_f.dtype) if mask_f.is_floating_point() else s_f.dtype
        parts = [self.proj_q(s_f), self.proj_k(k_in_f), self.proj_v(k_in_f)]
        packed = torch.cat([x.to(wire) for x in parts] + [mask_f.to(wire)[..., None]], dim=-1).contiguous()
        if p > 1:
            blocks = [torch.empty_like(packed) for _ in range(p)]
            dist.all_gather(blocks, packed, group=mesh.ring_j)
            packed = torch.cat(blocks, dim=1)  # rows I_r, in sub-block order
        c_s = self.c_s
        g_f = self.proj_g(s_f).sigmoid()
        received = column_block(packed[..., c_s:].contiguous(), mesh).wait()  # (k, v, mask)[J_c]
        n_keys = _real_keys(layout, received.shape[1])
        q = packed[..., :c_s].to(parts[0].dtype).view(bsz, n, heads, d)
        k = received[:, :n_keys, :c_s].to(parts[1].dtype).view(bsz, n_keys, heads, d)
        v = received[:, :n_keys, c_s:2 * c_s].to(parts[2].dtype).view(bsz, n_keys, heads, d)
        state = self._partial(q, k, v, received[:, :n_keys, -1], bias_tile, multiplicity, ct)
        if p > 1:  # rows of sub-block k go to column k; I get my rows' partial from every column
            send = state.view(bsz, p, n_f, heads, d + 2).transpose(0, 1).contiguous()
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, group=mesh.ring_j)
            states = list(recv.unbind(0))
        else:
            states = [state]
        o = merge_partials(states, d).to(v.dtype).reshape(bsz, n_f, c_s)
        return self.proj_o(g_f * o)

    def _partial(self, q, k, v, mask_j, z_tile, multiplicity: int, ct):
        """The softmax state [B', n, H, D+2] = (o, max, sum) of queries q [B', n, H, D] against
        my real keys k, v [B', n_keys, H, D] with the bias of my tile through proj_z (from z, or
        only moving the heads first when compute_pair_bias=False). One `attend_block` call per
        query-row chunk gives (out, lse, 1), a normalised state the merge takes as it is."""
        d = self.head_dim
        n, n_keys = q.shape[1], k.shape[1]
        state = torch.empty(q.shape[0], n, self.num_heads, d + 2, dtype=ct, device=q.device)
        if n_keys == 0:  # all my keys are padding: an empty partial
            state[..., :d] = 0
            state[..., d] = float("-inf")
            state[..., d + 1] = 0
            return state
        k_ct, v_ct = k.to(ct), v.to(ct)
        has_key = (mask_j != 0).any(dim=-1)  # [B'] some key of my block is unmasked
        # Real tokens have mask 1 (pad keys are dropped): then the pair bias goes to the kernel
        # as it is, else the key mask is folded into it (finite -inf, as upstream's).
        key_bias = None if bool((mask_j != 0).all()) else (1 - mask_j[:, None, None].to(ct)) * -self.inf
        exact = (~has_key).nonzero().flatten()
        z_keys = z_tile[:, :, :n_keys]
        rows = chunk_rows(n_keys, z_tile.shape[-1] if self.compute_pair_bias else q.shape[0] * self.num_heads)
        with torch.autocast(q.device.type, enabled=False):
            for i0 in range(0, n, rows):
                i1 = min(n, i0 + rows)
                bias = self.proj_z(z_keys[:, i0:i1]).repeat_interleave(multiplicity, 0).to(ct)
                q_c = q[:, i0:i1].to(ct)
                full = bias if key_bias is None else bias + key_bias
                out, lse = attend_block(q_c.transpose(1, 2), k_ct.transpose(1, 2), v_ct.transpose(1, 2),
                                        full, scale=d**-0.5)
                del full
                state[:, i0:i1, :, :d] = out.transpose(1, 2)
                state[:, i0:i1, :, d] = lse.transpose(1, 2)
                state[:, i0:i1, :, d + 1] = 1
                if len(exact):  # every key of my block masked: upstream's round-off, see _exact
                    state[exact, i0:i1] = _exact(q_c[exact], k_ct[exact], v_ct[exact], bias[exact],
                                                 key_bias[exact], d)
        return state


def chunk_rows(n_keys: int, per_pair: int) -> int:
    """Query rows per chunk when each (query, key) pair holds `per_pair` transient elements."""
    return max(1, CHUNK_ELEMENTS // (n_keys * per_pair))


def _exact(q, k, v, bias, key_bias, d: int) -> torch.Tensor:
    """Unnormalised state [B', rows, H, D+2] scored in upstream's order, qk / sqrt(D) + bias +
    key mask bias: for queries whose keys here are all masked, whose result (when no other
    block has a key) is upstream's average at its round-off, not a kernel's."""
    attn = torch.einsum("bihd,bjhd->bhij", q, k)
    attn.div_(d**0.5).add_(bias).add_(key_bias)
    m_blk = attn.amax(dim=-1, keepdim=True)
    p_blk = attn.sub_(m_blk).exp_()
    return torch.cat([torch.einsum("bhij,bjhd->bihd", p_blk, v), m_blk.transpose(1, 2),
                      p_blk.sum(dim=-1, keepdim=True).transpose(1, 2)], dim=-1)


def _real_keys(layout: TokenLayout, n: int) -> int:
    """How many of my key block J_c's n tokens are real.

    NOTE(parity): pad keys are dropped, not masked: upstream has no pad tokens, and a -inf bias
    on them would still change rows whose real keys are all masked. Pad tokens sit at the end
    of the padded sequence, so the real keys of J_c are a prefix."""
    return max(0, min(n, layout.n - layout.cols.start))
