"""Token padding, placement constants, and shard/gather helpers between full tensors and tiles.

Placements (mesh axes cp_i, cp_j):
- ``PAIR = (Shard(1), Shard(2))``: a pair tensor [B, N, N, ...]; rank (r, c) holds
  [:, I_r, J_c] with I_r, J_c contiguous blocks of N/rows and N/cols tokens.
- ``SINGLE_BY_I = (Shard(1), Replicate())``: a single tensor [B, N, ...] split by token
  block over the rows; the ranks of one tile row (ring_j) hold the same block I_r.
- ``SINGLE_FULL = (Shard(1), Shard(1))``: split over all P ranks; rank (r, c) holds block
  r*cols + c of N/P tokens (the c-th sub-block of I_r).
Pad N to a multiple of ``mesh.token_multiple`` (rows*cols) so all three tile evenly.

Communication per call: `shard_pair` / `shard_single` / `pair_from_tile` none (each rank
slices or wraps its own tile); `gather_pair` / `gather_single` one gather of every rank's
tile to ``dst`` (or an all-gather when dst is None). Gathers are for tests and outputs only:
a full N x N tensor never belongs on a rank in the model path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from boltz_cp.distributed.mesh import CPMesh

PAIR: tuple[Placement, ...] = (Shard(1), Shard(2))
SINGLE_BY_I: tuple[Placement, ...] = (Shard(1), Replicate())
SINGLE_FULL: tuple[Placement, ...] = (Shard(1), Shard(1))
# The MSA [B, S, N, C] and msa_mask [B, S, N]: S on cp_i, N on cp_j (rank (r, c) holds
# m[S_r, N_c]); the same tuple as PAIR, named for what it places.
MSA: tuple[Placement, ...] = PAIR


def check_placements(name: str, dt, expected: Sequence[Placement]) -> None:
    """Raise ValueError naming ``name`` unless ``dt`` is a DTensor placed as ``expected``."""
    if not isinstance(dt, DTensor):
        raise ValueError(f"{name}: expected a DTensor with placements {tuple(expected)}, got "
                         f"a plain {type(dt).__name__}")
    if tuple(dt.placements) != tuple(expected):
        raise ValueError(f"{name}: expected placements {tuple(expected)}, got "
                         f"{tuple(dt.placements)}")


def padded_size(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= n (at least ``multiple`` when n = 0)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    return max(1, -(-n // multiple)) * multiple


def pad_tokens(x: torch.Tensor, dims: int | Sequence[int], multiple: int,
               value: float = 0) -> torch.Tensor:
    """Pad each dim in ``dims`` at its end up to `padded_size(size, multiple)` with ``value``."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    pad = [0] * (2 * x.dim())
    for d in dims:
        d = d % x.dim()
        # F.pad lists (left, right) pairs starting from the last dim.
        pad[2 * (x.dim() - 1 - d) + 1] = padded_size(x.shape[d], multiple) - x.shape[d]
    if not any(pad):
        return x
    return F.pad(x, pad, value=value)


def tile_bounds(n_padded: int, parts: int, idx: int) -> slice:
    """Token slice of block ``idx`` when ``n_padded`` tokens split into ``parts`` equal blocks."""
    if n_padded % parts:
        raise ValueError(f"{n_padded} tokens do not split into {parts} equal blocks; "
                         f"pad with pad_tokens first")
    if not 0 <= idx < parts:
        raise IndexError(f"block {idx} out of range for {parts} blocks")
    n = n_padded // parts
    return slice(idx * n, (idx + 1) * n)


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def pair_from_tile(tile: torch.Tensor, mesh: CPMesh) -> DTensor:
    """Wrap my local pair tile [B, n_i, n_j, ...] as a PAIR DTensor (no communication)."""
    shape = (tile.shape[0], tile.shape[1] * mesh.rows, tile.shape[2] * mesh.cols,
             *tile.shape[3:])
    return DTensor.from_local(tile, mesh.device_mesh, PAIR, shape=torch.Size(shape),
                              stride=contiguous_stride(shape))


def single_from_local(local: torch.Tensor, mesh: CPMesh, fully: bool = False) -> DTensor:
    """Wrap my local single block [B, n, ...] as SINGLE_BY_I (or SINGLE_FULL) DTensor."""
    parts = mesh.size if fully else mesh.rows
    shape = (local.shape[0], local.shape[1] * parts, *local.shape[2:])
    return DTensor.from_local(local, mesh.device_mesh, SINGLE_FULL if fully else SINGLE_BY_I,
                              shape=torch.Size(shape), stride=contiguous_stride(shape))


def shard_pair(full: torch.Tensor, mesh: CPMesh) -> DTensor:
    """Every rank passes the same full [B, N, N, ...] (N padded); keeps its tile as PAIR."""
    n = full.shape[1]
    if full.shape[2] != n:
        raise ValueError(f"pair tensor must be [B, N, N, ...], got {tuple(full.shape)}")
    r, c = mesh.coord
    tile = full[:, tile_bounds(n, mesh.rows, r), tile_bounds(n, mesh.cols, c)].clone()
    return pair_from_tile(tile, mesh)


def shard_single(x: torch.Tensor, mesh: CPMesh, fully: bool = False) -> DTensor:
    """Every rank passes the same full [B, N, ...] (N padded); keeps its token block.

    fully=False: SINGLE_BY_I, block I_r. fully=True: SINGLE_FULL, block r*cols + c of P.
    """
    r, c = mesh.coord
    if fully:
        local = x[:, tile_bounds(x.shape[1], mesh.size, r * mesh.cols + c)]
    else:
        local = x[:, tile_bounds(x.shape[1], mesh.rows, r)]
    return single_from_local(local.clone(), mesh, fully)


def _gather_tiles(local: torch.Tensor, mesh: CPMesh, dst: int | None) -> list | None:
    local = local.contiguous()
    if mesh.size == 1:
        return [local]
    if dst is None:
        tiles = [torch.empty_like(local) for _ in range(mesh.size)]
        dist.all_gather(tiles, local, group=mesh.group)
        return tiles
    if mesh.rank == dst:
        tiles = [torch.empty_like(local) for _ in range(mesh.size)]
        dist.gather(local, tiles, dst=dst, group=mesh.group)
        return tiles
    dist.gather(local, None, dst=dst, group=mesh.group)
    return None


def gather_pair(dt: DTensor, mesh: CPMesh, dst: int | None = 0) -> torch.Tensor | None:
    """Assemble the full padded [B, N, N, ...] from PAIR tiles: on ``dst`` only (None
    elsewhere), or on every rank when dst is None. Tests and outputs only."""
    check_placements("gather_pair", dt, PAIR)
    tiles = _gather_tiles(dt.to_local(), mesh, dst)
    if tiles is None:
        return None
    rows = [torch.cat(tiles[r * mesh.cols:(r + 1) * mesh.cols], dim=2) for r in range(mesh.rows)]
    return torch.cat(rows, dim=1)


def gather_single(dt: DTensor, mesh: CPMesh, dst: int | None = 0) -> torch.Tensor | None:
    """Assemble the full padded [B, N, ...] from a SINGLE_BY_I or SINGLE_FULL DTensor."""
    fully = isinstance(dt, DTensor) and tuple(dt.placements) == SINGLE_FULL
    if not fully:
        check_placements("gather_single", dt, SINGLE_BY_I)
    tiles = _gather_tiles(dt.to_local(), mesh, dst)
    if tiles is None:
        return None
    blocks = tiles if fully else tiles[::mesh.cols]  # one replica per tile row
    return torch.cat(blocks, dim=1)
