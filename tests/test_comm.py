"""Ring shifts, ring all-gathers, transpose exchange and Cannon skew against values computed from full matrices;
message counters pinned per rank.

Tier: gloo CPU, 1x1 / 2x2 / 3x3, and the rectangular 1x2, 2x1, 2x3, 3x2, 2x4 (generic
transpose, column blocks, SUMMA products).
"""

from __future__ import annotations

import pytest
import torch

from boltz_cp.distributed import (
    CPMesh,
    comm_counters,
    reset_comm_counters,
    ring_all_gather,
    ring_shift,
    skew,
    transpose_exchange,
)
from boltz_cp.distributed.comm import column_block

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


def _gather(mesh: CPMesh, ring: str):
    reset_comm_counters()
    out = ring_all_gather(_tile_of(mesh.rank), mesh, ring).wait()
    return out, comm_counters()


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 2), (3, 3), (2, 3)])
@pytest.mark.parametrize("ring", ["i", "j"])
def test_ring_all_gather_values_and_counts(run_on_mesh, rows, cols, ring):
    for rank, (out, counts) in enumerate(run_on_mesh(_gather, rows, cols, ring)):
        r, c = divmod(rank, cols)
        # Indexed by ring position: c' on ring_j (my tile row), r' on ring_i (my tile column).
        want = [r * cols + k for k in range(cols)] if ring == "j" else [k * cols + c for k in range(rows)]
        assert len(out) == len(want)
        for got, src in zip(out, want):
            torch.testing.assert_close(got, _tile_of(src), rtol=0, atol=0)
        size = len(want)
        assert counts.get("all_gather", 0) == int(size > 1)
        assert counts["bytes_sent"] == NBYTES * (size - 1)
        assert counts["local_copy"] == 0  # a ring of one returns my tile itself: no copy


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


RECT = [(1, 2), (2, 1), (2, 3), (3, 2), (2, 4)]


def _rect_transpose(mesh: CPMesh, full: torch.Tensor, transposed_grid: bool):
    """My tile of ``full`` [B, D0, D1, C] on the (possibly transposed) grid -> the tile of the
    transposed layout."""
    grid = mesh.grid(transposed=transposed_grid)
    a, b = grid.coord
    d0, d1 = full.shape[1] // grid.rows, full.shape[2] // grid.cols
    tile = full[:, a * d0:(a + 1) * d0, b * d1:(b + 1) * d1].clone()
    reset_comm_counters()
    return transpose_exchange(tile, mesh, grid=grid).wait(), comm_counters()


@pytest.mark.parametrize("rows,cols", RECT)
@pytest.mark.parametrize("transposed_grid", [False, True])
def test_transpose_exchange_rectangular(run_on_mesh, rows, cols, transposed_grid):
    # D0 = 12, D1 = 24: multiples of rows*cols on every mesh here; not square, so a mix-up of
    # the two dims cannot pass.
    full = torch.arange(2 * 12 * 24 * 3, dtype=torch.float64).view(2, 12, 24, 3)
    res = run_on_mesh(_rect_transpose, rows, cols, full, transposed_grid)
    g_rows, g_cols = (cols, rows) if transposed_grid else (rows, cols)
    for rank, (out, counts) in enumerate(res):
        r, c = divmod(rank, cols)
        a, b = (c, r) if transposed_grid else (r, c)
        # rows: block b of D0 in g_cols parts; cols: block a of D1 in g_rows parts.
        n0, n1 = 12 // g_cols, 24 // g_rows
        torch.testing.assert_close(out, full[:, b * n0:(b + 1) * n0, a * n1:(a + 1) * n1], rtol=0, atol=0)
        assert counts["transpose"] <= (-(-g_rows // g_cols) + 1) * (-(-g_cols // g_rows) + 1)
    if rows * cols > 1:
        assert sum(cnt["transpose"] for _, cnt in res) > 0


def _column_block(mesh: CPMesh, full: torch.Tensor):
    r = mesh.coord[0]
    n = full.shape[1] // mesh.rows
    reset_comm_counters()
    return column_block(full[:, r * n:(r + 1) * n].clone(), mesh).wait(), comm_counters()


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 2), (3, 3)] + RECT)
def test_column_block(run_on_mesh, rows, cols):
    full = torch.arange(2 * 24 * 5, dtype=torch.float64).view(2, 24, 5)
    res = run_on_mesh(_column_block, rows, cols, full)
    for rank, (out, counts) in enumerate(res):
        r, c = divmod(rank, cols)
        n = 24 // cols
        torch.testing.assert_close(out, full[:, c * n:(c + 1) * n], rtol=0, atol=0)
        if rows == cols:  # one swap with the transpose partner, as before
            assert counts["transpose"] == int(r != c)


def _summa(mesh: CPMesh, a_full: torch.Tensor, b_full: torch.Tensor):
    from boltz_cp.distributed.cannon import cannon_matmul

    r, c = mesh.coord
    m, k = a_full.shape[-2] // mesh.rows, a_full.shape[-1] // mesh.cols
    kb, n = b_full.shape[-2] // mesh.rows, b_full.shape[-1] // mesh.cols
    a = a_full[..., r * m:(r + 1) * m, c * k:(c + 1) * k]
    b = b_full[..., r * kb:(r + 1) * kb, c * n:(c + 1) * n]
    # The transposed forms: my tile of A^T / B^T, oriented back as [m, k] / [k, n] blocks.
    at = a_full.transpose(-1, -2)[..., r * (a_full.shape[-1] // mesh.rows):(r + 1) * (a_full.shape[-1] // mesh.rows),
                                  c * (a_full.shape[-2] // mesh.cols):(c + 1) * (a_full.shape[-2] // mesh.cols)]
    bt = b_full.transpose(-1, -2)[..., r * (b_full.shape[-1] // mesh.rows):(r + 1) * (b_full.shape[-1] // mesh.rows),
                                  c * (b_full.shape[-2] // mesh.cols):(c + 1) * (b_full.shape[-2] // mesh.cols)]
    reset_comm_counters()
    plain = cannon_matmul(a, b, mesh)
    counts = comm_counters()
    both = cannon_matmul(at.transpose(-1, -2), bt.transpose(-1, -2), mesh, a_transposed=True, b_transposed=True)
    return plain, both, counts


@pytest.mark.parametrize("rows,cols", RECT)
def test_summa_matmul_against_full_product(run_on_mesh, rows, cols):
    g = torch.Generator().manual_seed(3)
    a_full = torch.randn(2, 12, 24, generator=g, dtype=torch.float64)
    b_full = torch.randn(2, 24, 36, generator=g, dtype=torch.float64)
    want = a_full @ b_full
    res = run_on_mesh(_summa, rows, cols, a_full, b_full)
    for rank, (plain, both, counts) in enumerate(res):
        r, c = divmod(rank, cols)
        m, n = 12 // rows, 36 // cols
        block = want[:, r * m:(r + 1) * m, c * n:(c + 1) * n]
        torch.testing.assert_close(plain, block, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(both, block, rtol=1e-12, atol=1e-12)
        # I root one broadcast per ring of size > 1 (my own block).
        assert counts["broadcast"] == int(cols > 1) + int(rows > 1)
        assert counts["ring_shift"] == counts["skew"] == 0


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
