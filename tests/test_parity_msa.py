"""MSA track CP twins (outer product mean, pair weighted averaging, MSALayer, MSAModule) vs upstream.
Tier: no PG (checkpoint keys) and gloo CPU, 1x1 / 2x2 / 3x3.

Parity in float64 on uneven N with whole pad tiles and S not a multiple of the mesh side
(S = 5 at N = 37, S = 2 < 3 at N = 7; see parity/cases/msa.py); float32 at Boltz-2's widths
on 2x2 no worse than serial float32; the exact message counts of one forward, with no
full-size N x N allocation; chunked OPM projection equal to the unchunked one with the same
messages; strict checkpoint keys.
"""

from __future__ import annotations

import pytest
import torch

from parity_helpers import assert_parity

CASES = ["outer_product_mean", "pair_weighted_averaging", "msa_layer"]


@pytest.mark.parametrize("name", [*CASES, "msa_module"])
@pytest.mark.parametrize("side", [1, 2, 3])
@pytest.mark.parametrize("n", [7, 37])
def test_msa_parity_float64(run_on_mesh, name, side, n):
    assert_parity(run_on_mesh, name, side, n)


@pytest.mark.parametrize("name", CASES)
def test_msa_float32_full_width(run_on_mesh, name):
    assert_parity(run_on_mesh, name, 2, 64, dtype="float32", preset="full", timeout=300)


def _tiles(mesh, layout, s_rows, width, gen):
    """My random MSA tile [1, s, n, width] (pad rows/tokens hold real values) and its mask
    (1 on real rows and tokens, 0 on padding), as MSA DTensors."""
    from boltz_cp.distributed import pair_from_tile, padded_size, tile_bounds

    s_pad = padded_size(s_rows, mesh.token_multiple)
    rows = tile_bounds(s_pad, mesh.rows, mesh.coord[0])
    real_s = (torch.arange(rows.start, rows.stop) < s_rows).double()
    real_n = (~layout.is_pad(layout.cols)).double()
    m = torch.randn(1, rows.stop - rows.start, real_n.numel(), width, generator=gen, dtype=torch.float64)
    mask = (real_s[:, None] * real_n[None, :])[None].clone()
    return pair_from_tile(m, mesh), pair_from_tile(mask, mesh)


def _counted_opm(mesh, n, s_rows, chunk_size=None, hidden=4, mixed=False):
    """One OPM forward on my own tiles under a full-size guard: (counters, violations, finite,
    output tile). ``mixed``: a float32 module under bf16 autocast (precision=bf16-mixed)."""
    from contextlib import nullcontext

    from boltz_cp.distributed import TokenLayout, comm_counters, reset_comm_counters
    from boltz_cp.layers.outer_product_mean import OuterProductMean
    from boltz_cp.parity.guards import FullSizeGuard
    from boltz_cp.parity.reference import randomize_

    dtype = torch.float32 if mixed else torch.float64
    module = randomize_(OuterProductMean(8, hidden, 16), torch.Generator().manual_seed(0)).to(dtype).eval()
    layout = TokenLayout(n, mesh)
    m, mask = _tiles(mesh, layout, s_rows, 8, torch.Generator().manual_seed(mesh.rank))
    if mixed:
        m, mask = m.to(dtype), mask.to(dtype)
    guard = FullSizeGuard(layout.n_padded)
    reset_comm_counters()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mixed else nullcontext()
    with torch.inference_mode(), guard, autocast:
        out = module(m, mask, layout, chunk_size=chunk_size).to_local()
    return comm_counters(), guard.violations, bool(torch.isfinite(out).all()), out


@pytest.mark.parametrize("side", [2, 3])
def test_opm_message_counts_and_tile_memory(run_on_mesh, side):
    n, s_rows, hidden = 37, 5, 4  # n_padded 40 / 45 exceeds every channel width
    results = run_on_mesh(_counted_opm, side, side, n, s_rows, None, hidden)
    s_loc = -(-s_rows // side**2) * side**2 // side
    n_loc = -(-n // side**2) * side**2 // side
    block_bytes = s_loc * n_loc * (hidden + 1) * 8  # a and b blocks: [1, s, n, c_hidden + mask]
    total = 0
    for rank, (counts, violations, finite, _) in enumerate(results):
        r, c = divmod(rank, side)
        expected = {"ring_shift": 2 * (side - 1), "transpose": int((r, c) != (0, 0)), "skew": int(c != 0),
                    "broadcast": 0, "local_copy": 0}
        sent = sum(expected.values())
        assert counts == {**expected, "bytes_sent": sent * block_bytes}, f"rank {rank}: {counts}"
        assert violations == [], f"rank {rank} allocated full-size tensors: {violations[:3]}"
        assert finite, f"rank {rank}: non-finite output"
        total += sent
    assert total == {2: 13, 3: 50}[side]


def test_opm_bf16_mixed_sends_bf16_operands(run_on_mesh):
    """precision=bf16-mixed: a and b travel in bf16, half the bytes of fp32 (their values are
    autocast outputs times a 0/1 mask, bf16 already)."""
    n, s_rows, hidden = 37, 5, 4
    block_elems = 4 * 20 * (hidden + 1)  # 2x2: S padded to 8, N to 40
    for rank, (counts, _, finite, _) in enumerate(run_on_mesh(_counted_opm, 2, 2, n, s_rows, None, hidden, True)):
        sent = counts["ring_shift"] + counts["transpose"] + counts["skew"]
        assert sent > 0 and counts["bytes_sent"] == sent * block_elems * 2, f"rank {rank}: {counts}"
        assert finite


def test_opm_chunked_projection_same_result_and_messages(run_on_mesh):
    whole = run_on_mesh(_counted_opm, 2, 2, 37, 5, None)
    chunked = run_on_mesh(_counted_opm, 2, 2, 37, 5, 3)  # 3 does not divide c_hidden 4
    for (c_whole, _, _, o_whole), (c_chunk, _, _, o_chunk) in zip(whole, chunked):
        assert c_whole == c_chunk
        torch.testing.assert_close(o_chunk, o_whole)


def _counted_pwa(mesh, n, s_rows):
    from boltz_cp.distributed import TokenLayout, comm_counters, pair_from_tile, reset_comm_counters
    from boltz_cp.layers.pair_averaging import PairWeightedAveraging
    from boltz_cp.parity.guards import FullSizeGuard
    from boltz_cp.parity.reference import randomize_

    module = randomize_(PairWeightedAveraging(8, 16, 4, 2), torch.Generator().manual_seed(0)).double().eval()
    layout = TokenLayout(n, mesh)
    gen = torch.Generator().manual_seed(mesh.rank)
    m, _ = _tiles(mesh, layout, s_rows, 8, gen)
    ni = layout.rows.stop - layout.rows.start
    real_i, real_j = (~layout.is_pad(layout.rows)).double(), (~layout.is_pad(layout.cols)).double()
    z = pair_from_tile(torch.randn(1, ni, ni, 16, generator=gen, dtype=torch.float64), mesh)
    mask = pair_from_tile((real_i[:, None] * real_j[None, :])[None].clone(), mesh)
    guard = FullSizeGuard(layout.n_padded)
    reset_comm_counters()
    with torch.inference_mode(), guard:
        out = module(m, z, mask, layout).to_local()
    return comm_counters(), guard.violations, bool(torch.isfinite(out).all())


def test_pwa_message_counts_and_tile_memory(run_on_mesh):
    side, n, s_rows, heads, width = 2, 37, 5, 2, 4
    results = run_on_mesh(_counted_pwa, side, side, n, s_rows)
    v_bytes = 4 * width * heads * 20 * 8  # v block [1, H, s*D, n], s = 4, n = 20
    w_bytes = heads * 20 * 20 * 8  # w block [1, H, n, n]
    for rank, (counts, violations, finite) in enumerate(results):
        r, c = divmod(rank, side)
        transpose, skew = int((r, c) != (0, 0)), int(r != 0)
        expected = {"ring_shift": 2 * (side - 1), "transpose": transpose, "skew": skew, "broadcast": 0, "local_copy": 0,
                    "bytes_sent": (side - 1) * (v_bytes + w_bytes) + transpose * w_bytes + skew * v_bytes}
        assert counts == expected, f"rank {rank}: {counts}"
        assert violations == [], f"rank {rank} allocated full-size tensors: {violations[:3]}"
        assert finite, f"rank {rank}: non-finite output"


def test_state_dicts_load_strictly():
    from boltz.model.layers.outer_product_mean import OuterProductMean as UpOPM
    from boltz.model.layers.pair_averaging import PairWeightedAveraging as UpPWA
    from boltz.model.modules.trunkv2 import MSALayer as UpMSALayer
    from boltz.model.modules.trunkv2 import MSAModule as UpMSAModule

    from boltz_cp.layers.outer_product_mean import OuterProductMean
    from boltz_cp.layers.pair_averaging import PairWeightedAveraging
    from boltz_cp.modules.trunkv2 import MSALayer, MSAModule

    for up_cls, cp_cls, args in [(UpOPM, OuterProductMean, (8, 4, 16)),
                                 (UpPWA, PairWeightedAveraging, (8, 16, 4, 2)),
                                 (UpMSALayer, MSALayer, (8, 16, 0.0, 0.0, 8, 2)),
                                 (UpMSAModule, MSAModule, (8, 16, 32, 2, 0.0, 0.0, 8, 2))]:
        ref, ours = up_cls(*args), cp_cls(*args)
        assert list(ours.state_dict()) == list(ref.state_dict()), cp_cls.__name__
        ours.load_state_dict(ref.state_dict(), strict=True)
