"""CP twins of upstream's trunk modules (Boltz-2): MSALayer, MSAModule, ContactConditioning.

Placements (mesh axes cp_i, cp_j): z [B, N, N, C_z] PAIR in/out; m [B, S, N, C_m] MSA in/out
(S on cp_i, N on cp_j: rank (r, c) holds m[S_r, N_c]); token_mask [B, N, N] PAIR (the pair
token mask, as upstream's MSAModule builds it); msa_mask [B, S, N] MSA. S and N are padded to
multiples of ``mesh.token_multiple`` (pad rows and tokens have mask 0). Any R x C mesh.
MSAModule takes the MSA features as *column blocks*: every MSA row, my columns J_c only
([B, S_all, N/p], cut by `msa_column_blocks`), so that it can subsample rows exactly as
upstream does and keep the rows S_r of the subsample without communication; s_inputs
[B, N, C_s] SINGLE_BY_I.
Communication per MSALayer call: pair weighted averaging (2 all-reduces of [B, H, N/p] on
ring_j and one Cannon ring: 2p messages per rank), MSA transition (none), outer product mean
(one Cannon ring: 2p messages per rank), PairformerNoSeqLayer (its sublayers' rings).
MSAModule: 1 column_block of s_proj(s_inputs[I_r]) [B, N/p, C_m], then its layers.
ContactConditioning: contact_conditioning [B, N, N, 5] and contact_threshold [B, N, N] PAIR
in (my tiles), out [B, N, N, C_z] PAIR; per pair, so no communication.
Upstream twin: boltz/model/modules/trunkv2.py MSALayer, MSAModule, ContactConditioning

The CP layer is built by upstream's __init__ and then has its sublayers replaced by their CP
twins under the same attribute names, so upstream state dicts load unchanged (strict).
Inference only: dropout is never applied.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.functional import one_hot

from boltz.data import const
from boltz.model.modules import trunkv2 as upstream
from boltz_cp.data.msa_compact import msa_column_features
from boltz_cp.distributed import (
    MSA,
    PAIR,
    SINGLE_BY_I,
    TokenLayout,
    check_placements,
    pad_tokens,
    padded_size,
    pair_from_tile,
    tile_bounds,
)
from boltz_cp.distributed.comm import column_block
from boltz_cp.layers._dropout import draw_like_upstream_dropout
from boltz_cp.layers._dtensor import like
from boltz_cp.layers.outer_product_mean import OuterProductMean
from boltz_cp.layers.pair_averaging import PairWeightedAveraging
from boltz_cp.layers.pairformer import PairformerNoSeqLayer, residual_add
from boltz_cp.layers.transition import Transition


class MSALayer(upstream.MSALayer):
    """One MSA block on tiles, in upstream's order: m += PWA(m, z); m += transition(m);
    z += OPM(m); z = PairformerNoSeqLayer(z)."""

    def __init__(self, msa_s: int, token_z: int, msa_dropout: float, z_dropout: float,
                 pairwise_head_width: int = 32, pairwise_num_heads: int = 4) -> None:
        super().__init__(msa_s, token_z, msa_dropout, z_dropout, pairwise_head_width, pairwise_num_heads)
        # Same constructor arguments as upstream's MSALayer.__init__ (c_h 32, 8 heads, c_hidden 32).
        self.msa_transition = Transition(dim=msa_s, hidden=msa_s * 4)
        self.pair_weighted_averaging = PairWeightedAveraging(c_m=msa_s, c_z=token_z, c_h=32, num_heads=8)
        self.pairformer_layer = PairformerNoSeqLayer(token_z=token_z, dropout=z_dropout,
                                                     pairwise_head_width=pairwise_head_width,
                                                     pairwise_num_heads=pairwise_num_heads)
        self.outer_product_mean = OuterProductMean(c_in=msa_s, c_hidden=32, c_out=token_z)

    def forward(self, z: DTensor, m: DTensor, token_mask: DTensor, msa_mask: DTensor,  # type: ignore[override]
                layout: TokenLayout, msa_rows: int | None = None, consume: bool = False) -> tuple[DTensor, DTensor]:
        """``msa_rows``: the real (unpadded) MSA rows, for upstream's RNG draw (default: m's rows).
        ``consume``: z's tile may be updated in place (the caller no longer needs the input)."""
        check_placements("MSALayer.z", z, PAIR)
        check_placements("MSALayer.m", m, MSA)
        check_placements("MSALayer.token_mask", token_mask, PAIR)
        check_placements("MSALayer.msa_mask", msa_mask, MSA)
        draw_like_upstream_dropout((m.shape[0], m.shape[1] if msa_rows is None else msa_rows, 1, 1),
                                   m.to_local().device)
        m_tile = m.to_local() + self.pair_weighted_averaging(m, z, token_mask, layout).to_local()
        m_tile = m_tile + self.msa_transition(like(m, m_tile)).to_local()
        m = like(m, m_tile)
        del m_tile
        z_tile = residual_add(z.to_local(), self.outer_product_mean(m, msa_mask, layout).to_local(), consume)
        del z  # the caller's input: the pair layer below owns (and updates in place) the new tile
        z = self.pairformer_layer(pair_from_tile(z_tile, layout.mesh), token_mask, layout, consume=True)
        return z, m


# The per-row MSA features MSAModule reads (upstream's feats keys), each [B, S, N].
MSA_FEATURES = ("msa", "has_deletion", "deletion_value", "msa_paired", "msa_mask")


def msa_column_blocks(feats: dict[str, Tensor], layout: TokenLayout) -> dict[str, Tensor]:
    """[B, S, N] MSA features -> my column block [B, S, N/p] of each (N padded with zeros).

    O(S * N / p) per rank; no communication. The data path may build these blocks directly.
    From `featurize_lean`'s compact MSA: lazy blocks, materialised for the rows asked.
    """
    if "msa_residues" in feats:
        return msa_column_features(feats, layout)
    out = {}
    for key in MSA_FEATURES:
        value = feats[key]
        if value.dim() != 3 or value.shape[2] != layout.n:
            raise ValueError(f"msa_column_blocks: {key!r} must be [B, S, {layout.n}], got {tuple(value.shape)}")
        out[key] = pad_tokens(value, 2, layout.mesh.token_multiple)[:, :, layout.cols]
    return out


class MSAModule(upstream.MSAModule):
    """Algorithm 8 on tiles: same parameters as upstream (s_proj, msa_proj, layers).

    Subsampling draws `torch.randperm(S)` from torch's global RNG at the same point as
    upstream, on every rank: with equal seeds every rank keeps the same rows, and so does the
    serial model.
    """

    def __init__(self, msa_s: int, token_z: int, token_s: int, msa_blocks: int, msa_dropout: float,
                 z_dropout: float, pairwise_head_width: int = 32, pairwise_num_heads: int = 4,
                 activation_checkpointing: bool = False, use_paired_feature: bool = True,
                 subsample_msa: bool = False, num_subsampled_msa: int = 1024, **kwargs) -> None:
        super().__init__(msa_s, token_z, token_s, 0, msa_dropout, z_dropout, pairwise_head_width,
                         pairwise_num_heads, activation_checkpointing, use_paired_feature, subsample_msa,
                         num_subsampled_msa, **kwargs)
        self.msa_blocks = msa_blocks
        self.layers = nn.ModuleList(
            MSALayer(msa_s, token_z, msa_dropout, z_dropout, pairwise_head_width, pairwise_num_heads)
            for _ in range(msa_blocks)
        )

    def forward(self, z: DTensor, s_inputs: DTensor, msa_cols: dict[str, Tensor],  # type: ignore[override]
                pair_mask: DTensor, layout: TokenLayout) -> DTensor:
        """z PAIR, s_inputs SINGLE_BY_I, msa_cols from `msa_column_blocks`, pair_mask PAIR
        -> the z update [B, N, N, C_z] PAIR (upstream returns z after the layers; so do we)."""
        name = type(self).__name__
        check_placements(f"{name}.z", z, PAIR)
        check_placements(f"{name}.s_inputs", s_inputs, SINGLE_BY_I)
        check_placements(f"{name}.pair_mask", pair_mask, PAIR)
        mesh = layout.mesh
        pending = column_block(self.s_proj(s_inputs.to_local()), mesh)  # s_inputs[J_c]

        rows = msa_cols["msa"].shape[1]
        keep = torch.arange(rows)
        if self.subsample_msa:
            keep = torch.randperm(rows)[: self.num_subsampled_msa]  # upstream's draw, same RNG
        s_pad = padded_size(len(keep), mesh.token_multiple)
        mine = tile_bounds(s_pad, mesh.rows, mesh.coord[0])
        # My rows S_r of the subsample; rows past its end are padding (all-zero features, mask 0).
        idx = keep[mine.start:min(mine.stop, len(keep))].to(msa_cols["msa"].device)

        def take(key: str) -> Tensor:
            return _pad_rows(msa_cols[key].index_select(1, idx), mine.stop - mine.start)

        dtype = self.msa_proj.weight.dtype
        parts = [one_hot(take("msa").long(), num_classes=const.num_tokens).to(dtype),
                 take("has_deletion").to(dtype).unsqueeze(-1), take("deletion_value").to(dtype).unsqueeze(-1)]
        if self.use_paired_feature:
            parts.append(take("msa_paired").to(dtype).unsqueeze(-1))
        m_tile = self.msa_proj(torch.cat(parts, dim=-1))
        m_tile = m_tile + pending.wait().unsqueeze(1)
        m = pair_from_tile(m_tile, mesh)
        msa_mask = pair_from_tile(take("msa_mask").to(dtype), mesh)
        # The first layer leaves the input z alone (the trunk adds it to the result); later
        # layers update the module's own tile in place.
        for k, layer in enumerate(self.layers):
            z, m = layer(z, m, pair_mask, msa_mask, layout, msa_rows=len(keep), consume=k > 0)
        return z


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """Zero rows appended along dim 1 up to ``rows`` (the padding of the last MSA row blocks)."""
    if x.shape[1] == rows:
        return x
    pad = x.new_zeros((x.shape[0], rows - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


class ContactConditioning(upstream.ContactConditioning):
    """Pocket / contact conditioning on my tile: same parameters as upstream (fourier_embedding,
    encoder, encoding_unspecified, encoding_unselected). Every term is a function of the pair's
    own features, so upstream's forward applies to the tile unchanged."""

    def forward(self, contact_conditioning: DTensor, contact_threshold: DTensor) -> DTensor:  # type: ignore[override]
        name = type(self).__name__
        check_placements(f"{name}.contact_conditioning", contact_conditioning, PAIR)
        check_placements(f"{name}.contact_threshold", contact_threshold, PAIR)
        tiles = {"contact_conditioning": contact_conditioning.to_local(),
                 "contact_threshold": contact_threshold.to_local()}
        return like(contact_conditioning, super().forward(tiles))
