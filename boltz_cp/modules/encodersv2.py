"""CP twins of the Boltz-2 trunk's pair initialisation: relative position encoding and the
outer sum of the single inputs.

Placements (mesh axes cp_i, cp_j): per-token index features [B, N] arrive as two O(N) blocks,
feats_i (my row block I_r) and feats_j (my column block J_c), cut by `token_blocks` from the
replicated per-token vectors; s_inputs [B, N, C_s] SINGLE_BY_I in; every output
[B, N, N, C_z] PAIR. N is layout.n_padded; pad tokens (index >= layout.n) get finite values
that nothing downstream uses.
Communication per call (square p x p mesh, n = N/p):
    `token_blocks`, `RelativePositionEncoder.forward`: none (each rank slices its blocks of
      the O(N) per-token features; the tile is computed locally, no N x N feature anywhere).
    `outer_sum_init`: 1 column_block of z_init_2(s_inputs[I_r]), B*n*C_z elements, to
      (c, r) (a local clone on the diagonal). Sending the projection rather than s_inputs
      itself moves C_z instead of C_s channels (128 vs 384 at Boltz-2 widths).
Upstream twin: boltz/model/modules/encodersv2.py RelativePositionEncoder;
boltz/model/models/boltz2.py Boltz2.forward (z_init_1(s)[:, :, None] + z_init_2(s)[:, None, :]).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.functional import one_hot

from boltz.model.modules.encodersv2 import RelativePositionEncoder as _UpstreamRelativePositionEncoder
from boltz_cp.distributed import (
    SINGLE_BY_I,
    TokenLayout,
    check_placements,
    pad_tokens,
    pair_from_tile,
)
from boltz_cp.distributed.comm import column_block

# Key that `token_blocks` adds to both blocks: upstream's cyclic test
# `torch.any(feats["cyclic_period"] > 0)` is global over all tokens (and the batch), so it is
# evaluated once on the full vector and shipped as a 0-dim bool tensor, never per tile.
CYCLIC_ANY = "cyclic_period_any"

# Query rows of a tile are encoded in chunks of at most this many (i, j) pairs: the one-hot
# features (4*(r_max+1) + 2*(s_max+1) + 1 = 139 channels) never exist for a whole tile.
CHUNK_PAIRS = 1 << 17


def token_blocks(feats: dict[str, Tensor], layout: TokenLayout) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-token features [B, N] (N = layout.n real tokens) -> (feats_i, feats_j).

    Every entry is padded with zeros to layout.n_padded and sliced to my row block I_r
    (feats_i) and my column block J_c (feats_j). When ``cyclic_period`` is present, both
    dicts also get ``CYCLIC_ANY``, upstream's global cyclic test on the full vector.
    O(N) work and memory per rank; no communication.
    """
    feats_i, feats_j = {}, {}
    for key, value in feats.items():
        if value.dim() != 2 or value.shape[1] != layout.n:
            raise ValueError(f"token_blocks: feature {key!r} must be [B, {layout.n}], got "
                             f"{tuple(value.shape)}")
        padded = pad_tokens(value, 1, layout.mesh.token_multiple)
        feats_i[key], feats_j[key] = padded[:, layout.rows], padded[:, layout.cols]
    if "cyclic_period" in feats:
        feats_i[CYCLIC_ANY] = feats_j[CYCLIC_ANY] = torch.any(feats["cyclic_period"] > 0)
    return feats_i, feats_j


class RelativePositionEncoder(_UpstreamRelativePositionEncoder):
    """Algorithm 3 on the tile (I_r, J_c): same parameters as upstream (linear_layer).

    Every pairwise feature of upstream (same chain / residue / entity, clipped residue, token
    and sym-id offsets, one-hot encoded) is a function of token i's and token j's own
    features only, so the tile needs just the O(N) blocks feats_i and feats_j.
    """

    def forward(self, feats_i: dict[str, Tensor], feats_j: dict[str, Tensor],  # type: ignore[override]
                layout: TokenLayout) -> DTensor:
        name = type(self).__name__
        n_i, n_j = layout.rows.stop - layout.rows.start, layout.cols.stop - layout.cols.start
        for label, block, n in (("feats_i", feats_i, n_i), ("feats_j", feats_j, n_j)):
            for key in ("asym_id", "residue_index", "entity_id", "sym_id", "token_index"):
                if key not in block or block[key].shape[1:] != (n,):
                    got = tuple(block[key].shape) if key in block else "missing"
                    raise ValueError(f"{name}: {label}[{key!r}] must be [B, {n}] (cut by "
                                     f"token_blocks), got {got}")
        cyclic = False
        if self.cyclic_pos_enc:
            if CYCLIC_ANY not in feats_j or "cyclic_period" not in feats_j:
                raise ValueError(f"{name}: cyclic_pos_enc needs cyclic_period and {CYCLIC_ANY!r} "
                                 f"in the blocks (cut them with token_blocks)")
            cyclic = bool(feats_j[CYCLIC_ANY])

        rows = max(1, CHUNK_PAIRS // n_j)
        tile = None
        for i0 in range(0, n_i, rows):
            i1 = min(n_i, i0 + rows)
            rows_i = {k: v[:, i0:i1] for k, v in feats_i.items() if k != CYCLIC_ANY}
            part = self._encode(rows_i, feats_j, cyclic)
            if tile is None:
                tile = part.new_empty(part.shape[0], n_i, n_j, part.shape[-1])
            tile[:, i0:i1] = part
        return pair_from_tile(tile, layout.mesh)

    def _encode(self, fi: dict[str, Tensor], fj: dict[str, Tensor], cyclic: bool) -> Tensor:
        """The encoding of rows fi against columns fj: [B, len_i, len_j, C_z]."""

        def outer(key, op):
            return op(fi[key][:, :, None], fj[key][:, None, :])

        same_chain = outer("asym_id", torch.eq)
        same_residue = outer("residue_index", torch.eq)
        same_entity = outer("entity_id", torch.eq)
        r_max, s_max = self.r_max, self.s_max

        d_residue = outer("residue_index", torch.sub)
        if cyclic:
            period = fj["cyclic_period"]
            period = torch.where(period > 0, period, torch.full_like(period, 10000))
            # NOTE(parity): upstream broadcasts the [B, N] period against [B, N, N], which
            # (for B = 1, as at inference) applies the period of the column token j.
            period = period[:, None, :]
            d_residue = (d_residue - period * torch.round(d_residue / period)).long()
        d_residue = torch.clip(d_residue + r_max, 0, 2 * r_max)
        d_residue = torch.where(same_chain, d_residue, torch.full_like(d_residue, 2 * r_max + 1))

        d_token = torch.clip(outer("token_index", torch.sub) + r_max, 0, 2 * r_max)
        d_token = torch.where(same_chain & same_residue, d_token, torch.full_like(d_token, 2 * r_max + 1))

        d_chain = torch.clip(outer("sym_id", torch.sub) + s_max, 0, 2 * s_max)
        other_chain = (~same_entity) if self.fix_sym_check else same_chain
        d_chain = torch.where(other_chain, torch.full_like(d_chain, 2 * s_max + 1), d_chain)

        # Exact 0/1 features, cast to the weight dtype: fp64 stays fp64, fp32 as upstream.
        dtype = self.linear_layer.weight.dtype
        features = torch.cat([
            one_hot(d_residue, 2 * r_max + 2).to(dtype),
            one_hot(d_token, 2 * r_max + 2).to(dtype),
            same_entity.unsqueeze(-1).to(dtype),
            one_hot(d_chain, 2 * s_max + 2).to(dtype),
        ], dim=-1)
        return self.linear_layer(features)


def outer_sum_init(z_init_1: nn.Linear, z_init_2: nn.Linear, s_inputs: DTensor,
                   layout: TokenLayout) -> DTensor:
    """z_init_1(s_inputs)[i] + z_init_2(s_inputs)[j] on my tile (I_r, J_c): [B, N, N, C_z] PAIR.

    The transpose partner (c, r) owns row block I_c = J_c, projects it with z_init_2 and sends
    it: one swap of [B, n, C_z] (square mesh; `column_block` on R x C), overlapped with z_init_1.
    """
    check_placements("outer_sum_init.s_inputs", s_inputs, SINGLE_BY_I)
    mesh = layout.mesh
    if s_inputs.shape[1] != layout.n_padded:
        raise ValueError(f"outer_sum_init: expected {layout.n_padded} (padded) tokens, got "
                         f"s_inputs {tuple(s_inputs.shape)}")
    s_tile = s_inputs.to_local()
    pending = column_block(z_init_2(s_tile), mesh)
    z_i = z_init_1(s_tile)
    z_j = pending.wait()
    return pair_from_tile(z_i[:, :, None] + z_j[:, None, :], mesh)
