"""Distributed runtime for boltz_cp: process groups, the 2D CP mesh, P2P primitives, tiling.

Imports torch only (never boltz). Layers receive a `CPMesh` explicitly; nothing here keeps
process groups in module globals.
"""

from boltz_cp.distributed.comm import (
    Pending,
    column_block,
    comm_counters,
    reset_comm_counters,
    ring_all_gather,
    ring_shift,
    skew,
    transpose_exchange,
)
from boltz_cp.distributed.layout import TokenLayout
from boltz_cp.distributed.mesh import MESH_DIM_NAMES, CPMesh, Ring, as_ring, check_mesh_size, convert_rank, parse_mesh
from boltz_cp.distributed.runtime import (
    DistContext,
    any_rank_failed,
    init_distributed,
    shutdown_distributed,
)
from boltz_cp.distributed.tiles import (
    MSA,
    PAIR,
    SINGLE_BY_I,
    SINGLE_FULL,
    check_placements,
    gather_pair,
    gather_single,
    pad_tokens,
    padded_size,
    pair_from_tile,
    shard_pair,
    shard_single,
    single_from_local,
    tile_bounds,
)

__all__ = [
    "CPMesh", "DistContext", "MESH_DIM_NAMES", "MSA", "PAIR", "Pending", "SINGLE_BY_I", "SINGLE_FULL",
    "any_rank_failed", "check_mesh_size", "column_block", "check_placements", "comm_counters", "convert_rank", "gather_pair",
    "gather_single", "init_distributed", "pad_tokens", "padded_size", "pair_from_tile",
    "parse_mesh", "reset_comm_counters", "Ring", "as_ring", "ring_all_gather", "ring_shift", "shard_pair", "shard_single",
    "shutdown_distributed", "single_from_local", "skew", "tile_bounds", "transpose_exchange", "TokenLayout",
]
