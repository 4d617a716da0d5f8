"""Ring shifts, transpose exchange and Cannon skew against values computed from full matrices;
message counters pinned per rank.

Tier: gloo CPU, 1x1 / 2x2 / 3x3 (and 1x4 for the non-square error).
"""

from __future__ import annotations

import pytest
import torch

from boltz_cp.distributed import (
    CPMesh,
    comm_counters,
    reset_comm_counters,
    ring_shift,
    skew,
    transpose_exchange,
)
from boltz_cp.errors import ConfigError

TILE = (2, 3, 5)  # a small [B, n, C]-like tile, fp64
NBYTES = 2 * 3 * 5 * 8


def _tile_of(rank: int) -> torch.Tensor:
    """A tile whose values identify the rank that made it."""
    return torch.arange(30, dtype=torch.float64).view(TILE) + 1000.0 * rank


def _shift(mesh: CPMesh, ring: str, shift: int):
    reset_comm_counters()
    out = ring_shift(_tile_of(mesh.rank), mesh, ring, shift).wait()
    return out, comm_counters()


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("ring", ["i", "j"])
@pytest.mark.parametrize("shift", [1, -1, 2, -4, 0])
def test_ring_shift_values_and_counts(run_on_mesh, p, ring, shift):
    res = run_on_mesh(_shift, p, p, ring, shift)
    for rank, (out, counts) in enumerate(res):
        r, c = divmod(rank, p)
        # Ring position q receives the tile of position q - shift.
        src = r * p + (c - shift) % p if ring == "j" else ((r - shift) % p) * p + c
        torch.testing.assert_close(out, _tile_of(src), rtol=0, atol=0)
        moves = shift % p != 0
        assert counts["ring_shift"] == int(moves)
        assert counts["bytes_sent"] == NBYTES * int(moves)
        assert counts["local_copy"] == int(not moves)
        assert counts["transpose"] == counts["skew"] == 0


def _both_rings_in_flight(mesh: CPMesh):
    # Cannon's double buffering: a shift on ring_j and one on ring_i outstanding together,
    # started before a local op, on a non-contiguous input.
    x = _tile_of(mesh.rank).transpose(0, 2)
    h_j = ring_shift(x, mesh, "j", -1)
    h_i = ring_shift(2 * x, mesh, "i", -1)
    local = x.sum()
    return h_i.wait(), h_j.wait(), local, comm_counters()


def test_concurrent_shifts_on_both_rings(run_on_mesh):
    res = run_on_mesh(_both_rings_in_flight, 3, 3)
    for rank, (got_i, got_j, _, counts) in enumerate(res):
        r, c = divmod(rank, 3)
        torch.testing.assert_close(got_j, _tile_of(r * 3 + (c + 1) % 3).transpose(0, 2),
                                   rtol=0, atol=0)
        torch.testing.assert_close(got_i, 2 * _tile_of(((r + 1) % 3) * 3 + c).transpose(0, 2),
                                   rtol=0, atol=0)
        assert got_j.is_contiguous()
        assert counts["ring_shift"] == 2 and counts["bytes_sent"] == 2 * NBYTES


def _transpose(mesh: CPMesh):
    reset_comm_counters()
    x = _tile_of(mesh.rank)
    out = transpose_exchange(x, mesh).wait()
    out[0, 0, 0] = -1.0  # the diagonal's result is a copy: writing it leaves x alone
    return out, x[0, 0, 0].item(), comm_counters()


@pytest.mark.parametrize("p", [1, 2, 3])
def test_transpose_exchange(run_on_mesh, p):
    res = run_on_mesh(_transpose, p, p)
    for rank, (out, x000, counts) in enumerate(res):
        r, c = divmod(rank, p)
        expected = _tile_of(c * p + r)
        expected[0, 0, 0] = -1.0
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert x000 == 1000.0 * rank
        assert counts["transpose"] == int(r != c)
        assert counts["bytes_sent"] == NBYTES * int(r != c)
        assert counts["local_copy"] == int(r == c)
    assert sum(cnt["transpose"] for _, _, cnt in res) == p * p - p


def _transpose_rect(mesh: CPMesh):
    try:
        transpose_exchange(_tile_of(mesh.rank), mesh)
    except ConfigError as e:
        return str(e)
    return None


def test_transpose_needs_square_mesh(run_on_mesh):
    assert all(m is not None and "square mesh" in m for m in run_on_mesh(_transpose_rect, 1, 4))


def _full(seed: int, p: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p * n, p * n, generator=g, dtype=torch.float64)


def _block(m: torch.Tensor, p: int, r: int, c: int) -> torch.Tensor:
    n = m.shape[0] // p
    return m[r * n:(r + 1) * n, c * n:(c + 1) * n]


def _skew(mesh: CPMesh, n: int):
    p = mesh.rows
    r, c = mesh.coord
    a, b = _full(0, p, n), _full(1, p, n)
    reset_comm_counters()
    a_sk = skew(_block(a, p, r, c), mesh, "j").wait()
    counts_a = comm_counters()
    b_sk = skew(_block(b, p, r, c), mesh, "i").wait()
    a_back = skew(a_sk, mesh, "j", inverse=True).wait()
    b_back = skew(b_sk, mesh, "i", inverse=True).wait()
    return a_sk, b_sk, a_back, b_back, counts_a, comm_counters()


@pytest.mark.parametrize("p", [1, 2, 3])
def test_skew_against_full_matrices(run_on_mesh, p):
    n = 4
    a, b = _full(0, p, n), _full(1, p, n)
    res = run_on_mesh(_skew, p, p, n)
    for rank, (a_sk, b_sk, a_back, b_back, counts_a, counts) in enumerate(res):
        r, c = divmod(rank, p)
        # Row r shifted left by r; column c shifted up by c.
        torch.testing.assert_close(a_sk, _block(a, p, r, (c + r) % p), rtol=0, atol=0)
        torch.testing.assert_close(b_sk, _block(b, p, (r + c) % p, c), rtol=0, atol=0)
        torch.testing.assert_close(a_back, _block(a, p, r, c), rtol=0, atol=0)
        torch.testing.assert_close(b_back, _block(b, p, r, c), rtol=0, atol=0)
        assert counts_a["skew"] == int(r % p != 0)
        # Two skews and two inverse skews: row r moves iff r != 0, column c iff c != 0.
        assert counts["skew"] == 2 * int(r != 0) + 2 * int(c != 0)
        assert counts["bytes_sent"] == n * n * 8 * counts["skew"]
        assert counts["ring_shift"] == 0


def _cannon(mesh: CPMesh, n: int):
    """C = A @ B by Cannon's algorithm with double-buffered shifts."""
    p = mesh.rows
    r, c = mesh.coord
    a, b = _full(0, p, n), _full(1, p, n)
    reset_comm_counters()
    a_blk = skew(_block(a, p, r, c), mesh, "j").wait()
    b_blk = skew(_block(b, p, r, c), mesh, "i").wait()
    out = torch.zeros(n, n, dtype=torch.float64)
    for step in range(p):
        last = step == p - 1
        if not last:
            h_a = ring_shift(a_blk, mesh, "j", -1)
            h_b = ring_shift(b_blk, mesh, "i", -1)
        out += a_blk @ b_blk
        if not last:
            a_blk, b_blk = h_a.wait(), h_b.wait()
    return out, comm_counters()


@pytest.mark.parametrize("p", [1, 2, 3])
def test_cannon_matmul_with_skew_and_shifts(run_on_mesh, p):
    n = 3
    ref = _full(0, p, n) @ _full(1, p, n)
    res = run_on_mesh(_cannon, p, p, n)
    for rank, (out, counts) in enumerate(res):
        r, c = divmod(rank, p)
        torch.testing.assert_close(out, _block(ref, p, r, c))
        assert counts["ring_shift"] == (2 * (p - 1) if p > 1 else 0)
