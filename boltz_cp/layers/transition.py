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

# Tiles with more rows than this are transformed in hidden-dim chunks (the 4x hidden
# activation of a large pair tile would otherwise dominate peak memory).
CHUNK_ROWS = 1 << 16
CHUNK_HIDDEN = 128


class Transition(_UpstreamTransition):
    """Same parameters as upstream (norm, fc1, fc2, fc3); forward on the local tile."""

    def forward(self, x: DTensor, chunk_size: int | None = None) -> DTensor:  # type: ignore[override]
        if not isinstance(x, DTensor):
            raise ValueError(f"{type(self).__name__}: expected a DTensor tile, got {type(x).__name__}")
        local = x.to_local()
        if chunk_size is None and local[..., 0].numel() > CHUNK_ROWS:
            chunk_size = CHUNK_HIDDEN
        return like(x, super().forward(local, chunk_size))
