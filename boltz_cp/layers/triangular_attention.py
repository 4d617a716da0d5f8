"""CP twins of upstream's triangle attention (AF2 Algorithms 13 / 14) on any R x C mesh.

Placements (mesh axes cp_i, cp_j): x [B, N, N, C_z] PAIR in/out; mask [B, N, N] PAIR (the
pair mask). N is padded to layout.n_padded; pad tokens (index >= layout.n) are excluded as
keys outright, so every output position < N equals upstream's; outputs at pad positions are
finite and meaningless.
Communication per call, on rank (r, c) of a p x p mesh (p > 1), with n = n_padded / p,
kv = [B, n, n, 2*H*c_hidden + 1] (k, v and the mask tile) and bias = [B, n, n, H], both in the
operand dtype (bf16 under precision=bf16-mixed, else the compute dtype >= fp32):
    1 transpose of the bias tile (0 on the diagonal r == c);
    1 all_gather of the (transposed) bias tile on the bias ring (starting node: ring_i,
        ending node: ring_j), counted as p - 1 bias tiles in bytes_sent;
    p - 1 ring shifts of kv on the kv ring (starting: ring_j, ending: ring_i). No skew.
    No message on 1 x 1. E.g. 2 x 2, starting or ending node, ranks 0..3: (transpose,
    all_gather, ring_shift) = (0,1,1), (1,1,1), (1,1,1), (0,1,1); 3 x 3, rank 4 = (1,1): (0,1,2).
Upstream twin: boltz/model/layers/triangular_attention/attention.py TriangleAttention
(= TriangleAttentionStartingNode) and TriangleAttentionEndingNode.

Algorithm (starting node; for each row i, query (i, j) attends keys (i, k) with bias
b[j, k] = linear(layer_norm(z))[j, k] and mask bias inf * (mask[i, k] - 1)). Rank (r, c)
keeps its queries z[I_r, J_c]. It needs, for every key block m, k/v/mask[I_r, J_m] (owned by
(r, m), same tile row) and b[J_c, J_m] (computed on (c, m)). On a square mesh step s uses key
block m = (c + s) mod p: kv is shifted by -1 on ring_j each step (no skew: step 0 is my own
tile), the next shift posted before the current block is computed, so it overlaps. The bias
row block b[J_c, :] is small (H channels), so it is fetched whole: after one transpose
exchange rank (r, c) holds b[J_c, J_r], and the ranks (r', c) of my ring_i together hold
b[J_c, J_r'] for every r'; one all_gather on ring_i, indexed by ring position = key block,
gives every block I need. Both are posted as soon as the bias tile exists and travel while
k|v|mask and q are computed. (Cannon's skew, which aligns kv and bias blocks step by step
instead, costs a whole exposed kv transfer before the loop.) Partial results merge with an
online softmax (`boltz_cp.layers._softmax`), in at least fp32; only the merge order depends
on the schedule.
The ending node is the starting node of z^T: the tile is transposed locally (rank (r, c) then
holds tile (c, r) of z^T) and the rings swap roles; z is never transposed globally. In z^T's
coordinates I am (c, r), so my position on the kv ring (ring_i: r) plays c above, and the
transposed bias tile, b'[J'_r, J'_c], gathered on the bias ring (ring_j, position c) gives
b'[J'_r, J'_m] at list index m. Both nodes: m = (my kv-ring position + s) mod p and bias
block m = gathered[m].

Rectangular R x C meshes: the same queries and online softmax, but key blocks cannot be aligned
by a skew, so they arrive on the broadcast schedule of distributed/summa.py: the bias tile
goes once to the transposed layout (`transpose_exchange`, one message per overlapping tile;
for the ending node on the transposed grid), then kv blocks are broadcast on the kv ring
(C of them for the starting node, R for the ending node) and bias blocks on the other ring,
segment by segment of the key axis.

Each (query-row chunk, key block) pair is one `boltz_cp.kernels.attend_block` call with the
triangle bias shared by every row (kernels.attention picks the backend): the fused backend
never materialises scores, the torch backend holds one chunk's [rows, H, n, n] score block.

Memory per rank: O(n^2) tiles (q, k, v, the output accumulator, two kv buffers, and the bias:
on a square mesh the gathered row block, p blocks of H channels, each released once used; on a
rectangular one two bias buffers) plus, with the torch backend, the score block of one
query-row chunk, [rows, H, n, n]; no tensor has a full N dim. x_ln is released before the ring
loop; the gate (its layer norm recomputed from x) and linear_o run by query-row chunks into one
output tile, so the end of the call holds the accumulator + the output + one chunk. Operands
(x_ln, k|v|mask, bias, q) are in the autocast dtype under autocast (upstream's autocast linears
give the same bf16 values); the softmax state and the kernels' accumulation stay >= fp32;
without autocast nothing changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from boltz.model.layers.triangular_attention import attention as upstream
from boltz_cp.distributed import summa
from boltz_cp.distributed import (
    PAIR,
    Pending,
    TokenLayout,
    check_placements,
    ring_all_gather,
    ring_shift,
    transpose_exchange,
)
from boltz_cp.kernels import attend_block, resolve
from boltz_cp.layers import _softmax
from boltz_cp.layers._dtensor import like
from boltz_cp.layers._precision import wire_dtype

# Default query-row chunk: rows such that one score block [B, rows, H, n, n] holds about as
# many elements as the pair tile itself (times this factor), so the transient memory falls
# as 1/P with the tile instead of being a fixed cost per rank. Results do not depend on it.
SCORE_BLOCK_PER_TILE = 1
# A fused kernel keeps no score block: a chunk's transients are its rows' output, the merge's
# and the gate's temporaries, about this many fp32 copies of its rows of the tile; chunks are
# sized to the same budget, so far fewer of them (each costs ~30 kernel launches on a GPU).
FUSED_ROW_COPIES = 3


def chunk_rows(fused: bool, rows_i: int, channels: int, heads: int, per_tile: float = SCORE_BLOCK_PER_TILE) -> int:
    """Query rows per chunk of a tile with rows_i rows (torch: by score block; fused: by rows)."""
    if fused:
        return max(1, math.ceil(per_tile * rows_i / FUSED_ROW_COPIES))
    return max(1, int(per_tile * channels) // heads)


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def _ready(x: torch.Tensor) -> Pending:
    """A finished 'transfer' holding x itself (no copy, no message)."""
    return Pending(x, [])


class _TriangleAttentionCP:
    """The CP forward shared by both nodes (mixed into the upstream classes)."""

    def forward(self, x: DTensor, mask: DTensor, layout: TokenLayout,  # type: ignore[override]
                chunk_size: int | None = None) -> DTensor:
        """Triangle attention update of x (no residual), [B, N, N, C_z] PAIR.

        chunk_size: query rows per chunk (None: `chunk_rows` for the kernel that runs).
        """
        name = type(self).__name__
        check_placements(f"{name}.x", x, PAIR)
        check_placements(f"{name}.mask", mask, PAIR)
        x_tile, mask_tile = x.to_local(), mask.to_local()
        if x_tile.shape[1:3] != mask_tile.shape[1:3]:
            raise ValueError(f"{name}: tiles x {tuple(x_tile.shape)} and mask "
                             f"{tuple(mask_tile.shape)} do not match")
        # Ending node = starting node on z^T: local transpose, rings swap roles.
        kv_ring, bias_ring = ("j", "i") if self.starting else ("i", "j")
        if not self.starting:
            x_tile, mask_tile = x_tile.transpose(1, 2), mask_tile.transpose(1, 2)
        dtype = _softmax.compute_dtype(x_tile.dtype)
        # Operands (x_ln, k|v|mask, bias, q: what is stored and sent) in the autocast dtype
        # under bf16-mixed, as upstream's autocast linears make them; the softmax state and
        # the kernels' accumulation stay >= fp32. Without autocast operands = compute dtype.
        op = wire_dtype(x_tile.device.type, dtype)
        with torch.autocast(x_tile.device.type, enabled=False):
            out = _attend(self, x_tile, mask_tile, layout, kv_ring, bias_ring, chunk_size, op)
        if not self.starting:
            out = out.transpose(1, 2)
        return like(x, out.to(x_tile.dtype).contiguous())


def _attend(mod, x: torch.Tensor, mask: torch.Tensor, layout: TokenLayout, kv_ring: str,
            bias_ring: str, chunk_size: int | None, op: torch.dtype) -> torch.Tensor:
    """Starting-node attention of my tile x [B, n_i, n_j, C] (query rows i, query cols j),
    operands in ``op``, softmax state in the compute dtype. Returns [B, n_i, n_j, C] in x.dtype
    (x is never copied whole: its layer norm is taken in the compute dtype)."""
    mesh = layout.mesh
    heads, width = mod.no_heads, mod.c_hidden
    hd = heads * width
    bsz, n, n_j = x.shape[:3]
    att = mod.mha
    fused = resolve(None, x.device, op) != "torch"
    rows = chunk_size or chunk_rows(fused, n, x.shape[-1], heads)

    x_ln = _layer_norm(mod, x).to(op)
    bias_tile = _linear(mod.linear, x_ln)  # triangle bias of my tile, b[I, J] [B, n_i, n_j, H]
    # Square mesh: the bias row block's transpose travels while k|v|mask is computed, its
    # all_gather while q is (independent products: the order changes no value).
    pending_bias = _transposed(bias_tile, mesh) if mesh.is_square else None
    # kv tile: [k | v | mask] in one buffer, so it travels as one message.
    w_kv = torch.cat([att.linear_k.weight, att.linear_v.weight]).to(op)
    w_kv = torch.cat([w_kv, w_kv.new_zeros(1, w_kv.shape[1])])
    kv_tile = F.linear(x_ln, w_kv)
    kv_tile[..., -1] = mask
    if pending_bias is not None:
        pending_bias = ring_all_gather(pending_bias.wait(), mesh, bias_ring)  # a list by key block
    # [B, n_i, H, n_j, d], scaled as upstream does.
    q = _linear(att.linear_q, x_ln).view(bsz, n, n_j, heads, width).permute(0, 1, 3, 2, 4)
    q = q / math.sqrt(width)
    del x_ln  # the gate recomputes it per row chunk from x: not alive through the ring loop
    if mesh.is_square:
        blocks = _ring_blocks(kv_tile, pending_bias, layout, kv_ring)
        del pending_bias
    else:
        grid = mesh.grid(transposed=kv_ring == "i")
        bias_t = transpose_exchange(bias_tile, mesh, grid=grid).wait()  # b[J, K of the bias ring]
        blocks = ((lo, hi, kv[:, :, ok:ok + hi - lo], b[:, :, ob:ob + hi - lo])
                  for lo, hi, kv, ok, b, ob in summa.stream(kv_tile, bias_t, grid, layout.n_padded))
        del bias_t
    del kv_tile, bias_tile

    state = _softmax.SoftmaxState.empty((bsz, n, heads), n_j, width, op, x.device)
    k = v = kv_m = bias_m = tri_bias = None
    for lo, hi, kv_m, bias_m in blocks:
        valid = min(max(layout.n - lo, 0), hi - lo)  # real keys of the block; the rest are pad
        if valid == 0:
            continue
        # NOTE(parity): pad keys are dropped outright (not given the -inf mask bias).
        kv_m, bias_m = kv_m[:, :, :valid], bias_m[:, :, :valid]
        k = kv_m[..., :hd].unflatten(-1, (heads, width)).permute(0, 1, 3, 2, 4)  # [B,i,H,k,d]
        v = kv_m[..., hd:2 * hd].unflatten(-1, (heads, width)).permute(0, 1, 3, 2, 4)
        tri_bias = bias_m.permute(0, 3, 1, 2)  # [B, H, j, k]
        for b in range(bsz):
            _attend_rows(mod, q[b], k[b], v[b], kv_m[b, ..., -1], tri_bias[b:b + 1], state[b], rows)
    del q, k, v, kv_m, bias_m, tri_bias, blocks  # the last ring block is not alive at the gate
    return _gate_project(mod, x, _softmax.finalize_(state), rows, op)


def _layer_norm(mod, x: torch.Tensor) -> torch.Tensor:
    """upstream's LayerNorm in the compute dtype (>= fp32, as autocast runs it)."""
    ln = mod.layer_norm
    x = x.to(_softmax.compute_dtype(x.dtype))
    return F.layer_norm(x, ln.c_in, ln.weight.to(x.dtype), ln.bias.to(x.dtype), ln.eps)


def _gate_project(mod, x: torch.Tensor, o: torch.Tensor, rows: int, op: torch.dtype) -> torch.Tensor:
    """linear_o(o * sigmoid(linear_g(layer_norm(x)))) by query-row chunks into one output tile:
    o [B, n_i, H, n_j, d] (the finalized accumulator), x [B, n_i, n_j, C]; the peak is o + the
    output + one chunk, never a full o * g."""
    att = mod.mha
    bsz, n, heads, n_j, width = o.shape
    out = torch.empty_like(x)  # x's strides: the ending node's transposed view comes back contiguous
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        o_c = o[:, i0:i1].permute(0, 1, 3, 2, 4).reshape(bsz, i1 - i0, n_j, heads * width).to(op)
        if att.linear_g is not None:
            o_c = o_c * torch.sigmoid(_linear(att.linear_g, _layer_norm(mod, x[:, i0:i1]).to(op)))
        out[:, i0:i1] = _linear(att.linear_o, o_c)
    return out


def _attend_rows(mod, q, k, v, key_ok, tri_bias, state, rows: int) -> None:
    """Merge one key block into the state of my query rows (one batch element).

    q [n_i, H, n_j, d] (already scaled), k, v [n_i, H, k, d], key_ok [n_i, k] the pair mask,
    tri_bias [1, H, n_j, k]. Rows whose mask is the block's common key mask (every row of a
    real token: the pair mask is t[i] t[k]) go through `attend_block` with that mask folded
    into the shared bias as a finite -inf column; any other row (a masked token's, whose keys
    are all masked) is scored as upstream does, so it keeps upstream's round-off exactly.
    One host sync per block (the mask pattern), none per row chunk.
    """
    ct = _softmax.compute_dtype(q.dtype)
    col = key_ok.amax(dim=0)  # [k] keys valid for some row
    regular = (key_ok == col).all(dim=-1) & col.any()
    all_keys, all_regular = torch.stack([col.all(), regular.all()]).tolist()
    # Irregular rows (masked tokens') as a host list, fetched only when there are any.
    odd = [] if all_regular else (~regular).nonzero().flatten().tolist()
    # One contiguous [1, H, n_j, k] bias per block in the compute dtype: every row chunk
    # reads it again, and the kernels add it in that dtype.
    bias = tri_bias.to(ct) if all_keys else tri_bias.to(ct) + mod.inf * (col.to(ct) - 1)
    bias = bias.contiguous()
    for i0 in range(0, q.shape[0], rows):
        i1 = min(i0 + rows, q.shape[0])
        idx = [i - i0 for i in odd if i0 <= i < i1]
        part = None
        if len(idx) < i1 - i0:  # some regular rows: never a chunk whose keys are all masked
            out, lse = attend_block(q[i0:i1], k[i0:i1], v[i0:i1], bias, scale=1.0, shared_bias=True)
            part = _softmax.from_output(out, lse)
        if idx:
            t = torch.tensor(idx, device=q.device)
            exact = _masked_rows(mod, q[i0:i1][t].to(ct), k[i0:i1][t].to(ct), v[i0:i1][t].to(ct),
                                 key_ok[i0:i1][t].to(ct), tri_bias.to(ct))
            if part is None:
                part = exact
            else:
                part.max[t], part.sum[t], part.acc[t] = exact.max, exact.sum, exact.acc
        _softmax.merge_(state[i0:i1], part)


def _masked_rows(mod, q, k, v, key_ok, tri_bias) -> _softmax.SoftmaxState:
    """The materialised partial of a few rows with their own key mask, in upstream's order:
    (q k^T + mask bias) + triangle bias."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores += (mod.inf * (key_ok - 1))[:, None, None, :]
    scores += tri_bias
    return _softmax.partial_(scores, v)


def _transposed(bias_tile: torch.Tensor, mesh) -> Pending:
    """Square mesh: b of tile (c, r) from my transpose partner (my own tile on the diagonal)."""
    r, c = mesh.coord
    return _ready(bias_tile) if r == c else transpose_exchange(bias_tile, mesh)


def _ring_blocks(kv_tile: torch.Tensor, pending_bias: Pending, layout: TokenLayout, kv_ring: str):
    """Square mesh: yields (lo, hi, kv block, bias block) per step, key block m = (pos + step)
    mod p with pos my position on the kv ring; kv is shifted by -1 on it each step, the next
    shift posted before a block is used. Bias blocks come from the gathered list."""
    mesh = layout.mesh
    p, pos = mesh.rows, mesh.ring_position(kv_ring)
    n = kv_tile.shape[2]

    def steps(pending_kv):
        for step in range(p):
            kv_m = pending_kv.wait()
            if step < p - 1:  # post the next block's shift before computing this one
                pending_kv = ring_shift(kv_m, mesh, kv_ring, -1)
            m = (pos + step) % p
            row = pending_bias.wait()  # waits for the all_gather at step 0 only
            bias_m, row[m] = row[m], None  # each block is used once: not kept after
            yield m * n, (m + 1) * n, kv_m, bias_m

    return steps(_ready(kv_tile))


class TriangleAttention(_TriangleAttentionCP, upstream.TriangleAttention):
    """Starting node (Algorithm 13) on PAIR tiles; parameters as upstream."""


TriangleAttentionStartingNode = TriangleAttention


class TriangleAttentionEndingNode(_TriangleAttentionCP, upstream.TriangleAttentionEndingNode):
    """Ending node (Algorithm 14) on PAIR tiles; parameters as upstream."""
