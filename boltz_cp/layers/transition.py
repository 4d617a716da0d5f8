"""CP twin of upstream's SwiGLU transition.

Placements (mesh axes cp_i, cp_j): x in/out with any placement (PAIR for transition_z,
SINGLE_BY_I / SINGLE_FULL for transition_s): the op is per token (pair), so tile-local.
Communication per call: none.
Upstream twin: boltz/model/layers/transition.py Transition
"""

from __future__ import annotations

from torch.distributed.tensor import DTensor

from boltz.model.layers.transition import Transition as _UpstreamTransition
from boltz_cp.layers._dtensor import like

# The 4x hidden activation is built CHUNK_HIDDEN channels at a time, on every tile size, so
# the transient memory is a fixed fraction of the tile (a size threshold would make small
# tiles, i.e. large meshes, pay the full 4x). NOTE(parity): the chunked sum reorders fc3's
# contraction (round-off only), as upstream's own chunked inference path does.
CHUNK_HIDDEN = 128


class Transition(_UpstreamTransition):
    """Same parameters as upstream (norm, fc1, fc2, fc3); forward on the local tile."""

    def forward(self, x: DTensor, chunk_size: int | None = None) -> DTensor:  # type: ignore[override]
        if not isinstance(x, DTensor):
            raise ValueError(f"{type(self).__name__}: expected a DTensor tile, got {type(x).__name__}")
        if chunk_size is None and self.hidden > CHUNK_HIDDEN:
            chunk_size = CHUNK_HIDDEN
        return like(x, super().forward(x.to_local(), chunk_size))
