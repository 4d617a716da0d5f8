"""Triangle multiplication CP twins (Cannon) vs upstream. Tier: gloo CPU, 1x1 / 2x2 / 3x3.

Parity in float64 on uneven N with whole pad tiles; one float32 full-width check; the exact
message counts of one forward; no full-size N x N allocation; strict checkpoint keys. Rectangular meshes:
tests/test_parity_rectangular.py.
"""

from __future__ import annotations

import pytest
import torch

from parity_helpers import assert_parity

CASES = ["trimul_out", "trimul_in"]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("side", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 37, 64])
def test_trimul_parity_float64(run_on_mesh, name, side, n):
    assert_parity(run_on_mesh, name, side, n)


@pytest.mark.parametrize("name", CASES)
def test_trimul_float32_full_width(run_on_mesh, name):
    assert_parity(run_on_mesh, name, 2, 64, dtype="float32", preset="full", timeout=300)


def _counted_forward(mesh, outgoing: bool, n: int, width: int = 16, mixed: bool = False):
    """One forward on my own random tiles (pad rows/cols real values, mask 0) under a
    full-size allocation guard; returns (counters, guard violations, all outputs finite).
    ``mixed``: a float32 module under bf16 autocast (precision=bf16-mixed)."""
    from contextlib import nullcontext

    from boltz_cp.distributed import TokenLayout, comm_counters, pair_from_tile, reset_comm_counters
    from boltz_cp.layers import triangular_mult as cp
    from boltz_cp.parity.guards import FullSizeGuard
    from boltz_cp.parity.reference import randomize_

    cls = cp.TriangleMultiplicationOutgoing if outgoing else cp.TriangleMultiplicationIncoming
    dtype = torch.float32 if mixed else torch.float64
    module = randomize_(cls(width), torch.Generator().manual_seed(0)).to(dtype).eval()
    layout = TokenLayout(n, mesh)
    g = torch.Generator().manual_seed(mesh.rank)
    ni = layout.rows.stop - layout.rows.start
    real_i, real_j = (~layout.is_pad(layout.rows)).double(), (~layout.is_pad(layout.cols)).double()
    x = pair_from_tile(torch.randn(1, ni, ni, width, generator=g, dtype=dtype), mesh)
    mask = pair_from_tile((real_i[:, None] * real_j[None, :])[None].to(dtype), mesh)
    guard = FullSizeGuard(layout.n_padded)
    reset_comm_counters()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mixed else nullcontext()
    with torch.inference_mode(), guard, autocast:
        out = module(x, mask, layout)
    return comm_counters(), guard.violations, bool(torch.isfinite(out.to_local()).all())


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
@pytest.mark.parametrize("side", [2, 3])
def test_message_counts_and_tile_memory(run_on_mesh, side, outgoing):
    n, width = 37, 16  # n_padded 40 / 45 > 2 * width: only token dims can trip the guard
    results = run_on_mesh(_counted_forward, side, side, outgoing, n, width)
    tile_bytes = (-(-n // side**2) * side**2 // side) ** 2 * width * 8
    total = 0
    for rank, (counts, violations, finite) in enumerate(results):
        r, c = divmod(rank, side)
        expected = {"ring_shift": 2 * (side - 1), "transpose": int((r, c) != (0, 0)),
                    "skew": int((r if outgoing else c) != 0), "broadcast": 0, "local_copy": 0}
        sent = sum(expected.values())
        assert counts == {**expected, "bytes_sent": sent * tile_bytes}, f"rank {rank}: {counts}"
        assert violations == [], f"rank {rank} allocated full-size tensors: {violations[:3]}"
        assert finite, f"rank {rank}: non-finite output"
        total += sent
    assert total == {2: 13, 3: 50}[side]


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_bf16_mixed_sends_bf16_operands(run_on_mesh, outgoing):
    """precision=bf16-mixed: the Cannon operands travel in bf16, half the bytes of fp32 (their
    values are bf16 already; the products accumulate in fp32)."""
    n, width = 37, 16
    tile_elems = 20 * 20 * width  # n_padded 40 on 2x2
    for rank, (counts, _, finite) in enumerate(run_on_mesh(_counted_forward, 2, 2, outgoing, n, width, True)):
        sent = counts["ring_shift"] + counts["transpose"] + counts["skew"]
        assert sent > 0 and counts["bytes_sent"] == sent * tile_elems * 2, f"rank {rank}: {counts}"
        assert finite


def test_one_by_one_sends_nothing(run_on_mesh):
    (counts, _, finite), = run_on_mesh(_counted_forward, 1, 1, True, 7)
    assert finite and counts == {"ring_shift": 0, "transpose": 0, "skew": 0, "broadcast": 0, "local_copy": 0, "bytes_sent": 0}


def test_state_dict_loads_strictly():
    from boltz.model.layers import triangular_mult as up

    from boltz_cp.layers import triangular_mult as cp

    for name in ("TriangleMultiplicationOutgoing", "TriangleMultiplicationIncoming"):
        ref, ours = getattr(up, name)(16), getattr(cp, name)(16)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)
