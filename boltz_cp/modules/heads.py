"""CP twins of the Boltz-2 trunk's output heads: the distogram.

Placements (mesh axes cp_i, cp_j): z [B, N, N, C_z] PAIR in; out
[B, N, N, num_distograms, num_bins] PAIR. N is layout.n_padded (pad rows and columns hold
finite values that nothing downstream uses).
Communication per call (square p x p mesh, n = N/p): 1 transpose_exchange of my z tile,
B*n*n*C_z elements, to (c, r) (a local clone on the diagonal: p(p-1) messages mesh-wide); on
R x C one message per overlapping tile of the transposed layout.
Upstream twin: boltz/model/modules/trunkv2.py DistogramModule
"""

from __future__ import annotations

from torch.distributed.tensor import DTensor

from boltz.model.modules.trunkv2 import DistogramModule as _UpstreamDistogramModule
from boltz_cp.distributed import PAIR, TokenLayout, check_placements, pair_from_tile, transpose_exchange


class DistogramModule(_UpstreamDistogramModule):
    """(z + z^T) then a linear, on the tile: same parameters as upstream (distogram).

    Rank (r, c) receives tile (c, r) = z[J_c, I_r] from its transpose partner; transposed
    locally it is z^T on my tile (I_r, J_c).
    """

    def forward(self, z: DTensor, layout: TokenLayout) -> DTensor:  # type: ignore[override]
        name = type(self).__name__
        check_placements(f"{name}.z", z, PAIR)
        mesh = layout.mesh
        if z.shape[1] != layout.n_padded:
            raise ValueError(f"{name}: expected {layout.n_padded} (padded) tokens, got z "
                             f"{tuple(z.shape)}")
        z_tile = z.to_local()
        z_sym = z_tile + transpose_exchange(z_tile, mesh).wait().transpose(1, 2)
        out = self.distogram(z_sym)
        return pair_from_tile(out.reshape(*z_sym.shape[:3], self.num_distograms, self.num_bins), mesh)
