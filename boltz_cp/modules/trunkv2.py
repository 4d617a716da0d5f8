"""CP twins of upstream's trunk modules (Boltz-2). So far: MSALayer.

Placements (mesh axes cp_i, cp_j): z [B, N, N, C_z] PAIR in/out; m [B, S, N, C_m] MSA in/out
(S on cp_i, N on cp_j: rank (r, c) holds m[S_r, N_c]); token_mask [B, N, N] PAIR (the pair
token mask, as upstream's MSAModule builds it); msa_mask [B, S, N] MSA. S and N are padded to
multiples of ``mesh.token_multiple`` (pad rows and tokens have mask 0). Square meshes only.
Communication per MSALayer call: pair weighted averaging (2 all-reduces of [B, H, N/p] on
ring_j and one Cannon ring: 2p messages per rank), MSA transition (none), outer product mean
(one Cannon ring: 2p messages per rank), PairformerNoSeqLayer (its sublayers' rings).
Upstream twin: boltz/model/modules/trunkv2.py MSALayer

The CP layer is built by upstream's __init__ and then has its sublayers replaced by their CP
twins under the same attribute names, so upstream state dicts load unchanged (strict).
Inference only: dropout is never applied.
"""

from __future__ import annotations

from torch.distributed.tensor import DTensor

from boltz.model.modules import trunkv2 as upstream
from boltz_cp.distributed import MSA, PAIR, TokenLayout, check_placements
from boltz_cp.layers._dtensor import like
from boltz_cp.layers.outer_product_mean import OuterProductMean
from boltz_cp.layers.pair_averaging import PairWeightedAveraging
from boltz_cp.layers.pairformer import PairformerNoSeqLayer
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
                layout: TokenLayout) -> tuple[DTensor, DTensor]:
        check_placements("MSALayer.z", z, PAIR)
        check_placements("MSALayer.m", m, MSA)
        check_placements("MSALayer.token_mask", token_mask, PAIR)
        check_placements("MSALayer.msa_mask", msa_mask, MSA)
        m_tile = m.to_local() + self.pair_weighted_averaging(m, z, token_mask, layout).to_local()
        m_tile = m_tile + self.msa_transition(like(m, m_tile)).to_local()
        m = like(m, m_tile)
        z = like(z, z.to_local() + self.outer_product_mean(m, msa_mask, layout).to_local())
        z = self.pairformer_layer(z, token_mask, layout)
        return z, m
