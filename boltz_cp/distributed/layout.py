"""Where the N real tokens sit on the mesh once padded.

N real tokens are padded at the end to ``n_padded`` (a multiple of ``mesh.token_multiple``).
Rank (r, c) owns rows I_r = `rows` and columns J_c = `cols` of every pair tensor.

Pad tokens (index >= n) are not masked tokens: a masked real token still takes part in
upstream's softmaxes with a large negative bias (so a fully masked query row averages over
all N keys), while a pad token must not exist at all. Attention layers therefore exclude pad
keys outright (`key_is_pad`), which keeps every position < N equal to the serial model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from boltz_cp.distributed.mesh import CPMesh
from boltz_cp.distributed.tiles import (
    gather_pair,
    gather_single,
    pad_tokens,
    padded_size,
    shard_pair,
    shard_single,
    tile_bounds,
)


@dataclass(frozen=True)
class TokenLayout:
    """N real tokens on a CPMesh."""

    n: int
    mesh: CPMesh

    @property
    def n_padded(self) -> int:
        return padded_size(self.n, self.mesh.token_multiple)

    @property
    def rows(self) -> slice:
        """I_r: the token block of my tile rows."""
        return tile_bounds(self.n_padded, self.mesh.rows, self.mesh.coord[0])

    @property
    def cols(self) -> slice:
        """J_c: the token block of my tile columns."""
        return tile_bounds(self.n_padded, self.mesh.cols, self.mesh.coord[1])

    def block(self, idx: int, parts: int) -> slice:
        return tile_bounds(self.n_padded, parts, idx)

    def is_pad(self, block: slice, device=None) -> torch.Tensor:
        """Bool [len(block)]: which tokens of a block are padding (index >= n)."""
        return torch.arange(block.start, block.stop, device=device) >= self.n

    # Full <-> tiles, for tests, the parity tool and inputs that arrive whole.
    def shard_pair(self, full: torch.Tensor) -> DTensor:
        """[B, N, N, ...] -> PAIR DTensor of the padded tensor (pad with zeros)."""
        return shard_pair(pad_tokens(full, (1, 2), self.mesh.token_multiple), self.mesh)

    def shard_single(self, full: torch.Tensor, fully: bool = False) -> DTensor:
        """[B, N, ...] -> SINGLE_BY_I (or SINGLE_FULL) DTensor of the padded tensor."""
        return shard_single(pad_tokens(full, 1, self.mesh.token_multiple), self.mesh, fully)

    def gather_pair(self, dt: DTensor, dst: int | None = None) -> torch.Tensor | None:
        """PAIR DTensor -> full [B, N, N, ...] without the padding (on dst, or everywhere)."""
        full = gather_pair(dt, self.mesh, dst)
        return None if full is None else full[:, : self.n, : self.n]

    def gather_single(self, dt: DTensor, dst: int | None = None) -> torch.Tensor | None:
        full = gather_single(dt, self.mesh, dst)
        return None if full is None else full[:, : self.n]
