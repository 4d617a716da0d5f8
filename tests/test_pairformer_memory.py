"""No full-size N x N allocation in a CP pairformer forward; tile-local ops stay silent.

Tier: gloo CPU, 2x2 and 2x3 (and 1x1 as the control that the guard can fire).
"""

from __future__ import annotations

import pytest
import torch

from boltz_cp.distributed import TokenLayout, comm_counters, pair_from_tile, reset_comm_counters, single_from_local
from boltz_cp.parity.guards import FullSizeGuard

N = 150  # n_padded 152 on 2x2: above every tiny channel width (max 4*32 = 128)


def _local_inputs(layout: TokenLayout, token_s: int, token_z: int):
    """My tiles only: nothing full-size is built to create them."""
    g = torch.Generator().manual_seed(layout.mesh.rank)
    ni, nj = layout.rows.stop - layout.rows.start, layout.cols.stop - layout.cols.start
    real_i = (~layout.is_pad(layout.rows)).double()
    real_j = (~layout.is_pad(layout.cols)).double()
    mesh = layout.mesh
    s = single_from_local(torch.randn(1, ni, token_s, generator=g, dtype=torch.float64), mesh)
    z = pair_from_tile(torch.randn(1, ni, nj, token_z, generator=g, dtype=torch.float64), mesh)
    mask = single_from_local(real_i[None].clone(), mesh)
    pair_mask = pair_from_tile((real_i[:, None] * real_j[None, :])[None].clone(), mesh)
    return s, z, mask, pair_mask


def _guarded_pairformer(mesh, n):
    from boltz_cp.layers.pairformer import PairformerModule
    from boltz_cp.parity.reference import randomize_

    torch.manual_seed(0)
    module = randomize_(PairformerModule(32, 16, 2, 4, 0.0, 8, 2, False, False, True), torch.Generator().manual_seed(0))
    module = module.double().eval()
    layout = TokenLayout(n, mesh)
    s, z, mask, pair_mask = _local_inputs(layout, 32, 16)
    guard = FullSizeGuard(layout.n_padded)
    with torch.inference_mode(), guard:
        s, z = module(s, z, mask, pair_mask, layout)
    assert torch.isfinite(z.to_local()).all() and torch.isfinite(s.to_local()).all()
    return guard.violations


@pytest.mark.parametrize("rows,cols", [(2, 2), (2, 3)])
def test_no_full_size_tensor(run_on_mesh, rows, cols):
    """2x3 runs the SUMMA schedules and the generic transposes (150 tokens: tiles of 75 x 50)."""
    for rank, violations in enumerate(run_on_mesh(_guarded_pairformer, rows, cols, N, timeout=240)):
        assert violations == [], f"rank {rank} allocated full-size tensors: {violations[:5]}"


def test_guard_fires_on_1x1(run_on_mesh):
    """Control: on 1x1 the tile is the whole N x N, so the same guard must report it."""
    (violations,) = run_on_mesh(_guarded_pairformer, 1, 1, N, timeout=240)
    assert violations


def _tile_local_ops_are_silent(mesh):
    from torch.distributed.tensor.debug import CommDebugMode

    from boltz_cp.layers.transition import Transition

    layout = TokenLayout(10, mesh)
    s, z, _, _ = _local_inputs(layout, 32, 16)
    module = Transition(16, 64).double().eval()
    reset_comm_counters()
    with torch.inference_mode(), CommDebugMode() as comm:
        module(z)
        Transition(32, 128).double()(s)
    return comm.get_total_counts(), sum(v for k, v in comm_counters().items() if k != "bytes_sent")


def test_tile_local_ops_issue_no_communication(run_on_mesh):
    for collectives, p2p in run_on_mesh(_tile_local_ops_are_silent, 2, 2):
        assert (collectives, p2p) == (0, 0)
