"""Token padding, tile bounds, PAIR / SINGLE placements, and shard -> gather round trips.

Tier: no PG (padding, bounds, placement errors on plain tensors) and gloo CPU
(1x1, 2x2, 3x3) with N not divisible by the mesh side and whole padding tiles (N < side).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from boltz_cp.distributed import (
    PAIR,
    SINGLE_BY_I,
    SINGLE_FULL,
    CPMesh,
    check_placements,
    gather_pair,
    gather_single,
    pad_tokens,
    padded_size,
    pair_from_tile,
    shard_pair,
    shard_single,
    tile_bounds,
)


def test_padded_size():
    assert [padded_size(n, 3) for n in (1, 2, 3, 4, 9, 10)] == [3, 3, 3, 6, 9, 12]
    assert padded_size(7, 4) == 8 and padded_size(8, 4) == 8 and padded_size(5, 1) == 5
    with pytest.raises(ValueError):
        padded_size(5, 0)


def test_pad_tokens_pads_at_the_end_with_value():
    x = torch.arange(2 * 5 * 5 * 3, dtype=torch.float64).view(2, 5, 5, 3)
    y = pad_tokens(x, (1, 2), 4, value=-7.0)
    assert y.shape == (2, 8, 8, 3)
    torch.testing.assert_close(y[:, :5, :5], x, rtol=0, atol=0)
    assert (y[:, 5:] == -7).all() and (y[:, :, 5:] == -7).all()
    m = pad_tokens(torch.ones(2, 5, dtype=torch.bool), 1, 4)  # pad mask: False in the padding
    assert m.tolist() == [[True] * 5 + [False] * 3] * 2
    assert pad_tokens(x, -2, 5) is x  # nothing to do


def test_tile_bounds():
    assert [tile_bounds(12, 3, k) for k in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 12)]
    with pytest.raises(ValueError, match="pad_tokens"):
        tile_bounds(10, 3, 0)
    with pytest.raises(IndexError):
        tile_bounds(9, 3, 3)


def test_check_placements_message_on_plain_tensor():
    with pytest.raises(ValueError, match=r"TriMulOut: expected a DTensor with placements "
                                         r"\(Shard\(dim=1\), Shard\(dim=2\)\), got a plain Tensor"):
        check_placements("TriMulOut", torch.zeros(1, 2, 2, 1), PAIR)


def _pair_data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, n, 3, generator=g, dtype=torch.float64)


def _pair_roundtrip(mesh: CPMesh, n: int):
    full = _pair_data(n)
    padded = pad_tokens(full, (1, 2), mesh.token_multiple)
    dt = shard_pair(padded, mesh)
    check_placements("test", dt, PAIR)
    meta = (tuple(dt.shape), dt.stride(), tuple(dt.placements))
    on_dst = gather_pair(dt, mesh, dst=mesh.size - 1)
    everywhere = gather_pair(dt, mesh, dst=None)
    # DTensor's own view of the layout must agree with ours.
    via_dtensor = dt.full_tensor()
    # Rebuilding from the local tile gives the same global metadata.
    rebuilt = pair_from_tile(dt.to_local(), mesh)
    same_meta = (tuple(rebuilt.shape), rebuilt.stride()) == meta[:2]
    return dt.to_local(), meta, on_dst, everywhere, via_dtensor, same_meta


@pytest.mark.parametrize("p,n", [(1, 5), (2, 7), (3, 10), (3, 2)])
def test_pair_shard_gather_roundtrip(run_on_mesh, p, n):
    full = _pair_data(n)
    res = run_on_mesh(_pair_roundtrip, p, p, n)
    n_pad = padded_size(n, p * p)
    t = n_pad // p
    padded = torch.zeros(2, n_pad, n_pad, 3, dtype=torch.float64)
    padded[:, :n, :n] = full
    for rank, (tile, meta, on_dst, everywhere, via_dtensor, same_meta) in enumerate(res):
        r, c = divmod(rank, p)
        assert meta == ((2, n_pad, n_pad, 3), (n_pad * n_pad * 3, n_pad * 3, 3, 1), PAIR)
        assert same_meta
        torch.testing.assert_close(tile, padded[:, r * t:(r + 1) * t, c * t:(c + 1) * t],
                                   rtol=0, atol=0)
        if r * t >= n or c * t >= n:
            assert (tile == 0).all()  # a whole padding tile
        if rank == p * p - 1:
            torch.testing.assert_close(on_dst, padded, rtol=0, atol=0)
        else:
            assert on_dst is None
        torch.testing.assert_close(everywhere, padded, rtol=0, atol=0)
        torch.testing.assert_close(via_dtensor, padded, rtol=0, atol=0)
        torch.testing.assert_close(everywhere[:, :n, :n], full, rtol=0, atol=0)
    if n < p:
        assert any((tile == 0).all() for tile, *_ in res)


def _single_roundtrip(mesh: CPMesh, n: int, fully: bool):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, n, 4, generator=g, dtype=torch.float64)
    xp = pad_tokens(x, 1, mesh.token_multiple)
    dt = shard_single(xp, mesh, fully=fully)
    check_placements("test", dt, SINGLE_FULL if fully else SINGLE_BY_I)
    return dt.to_local(), tuple(dt.shape), gather_single(dt, mesh, dst=0), dt.full_tensor()


@pytest.mark.parametrize("fully", [False, True])
@pytest.mark.parametrize("p,n", [(2, 7), (3, 10), (3, 2)])
def test_single_shard_gather_roundtrip(run_on_mesh, p, n, fully):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, n, 4, generator=g, dtype=torch.float64)
    n_pad = padded_size(n, p * p)
    xp = torch.zeros(2, n_pad, 4, dtype=torch.float64)
    xp[:, :n] = x
    res = run_on_mesh(_single_roundtrip, p, p, n, fully)
    for rank, (local, shape, gathered, via_dtensor) in enumerate(res):
        r, c = divmod(rank, p)
        blk = tile_bounds(n_pad, p * p, rank) if fully else tile_bounds(n_pad, p, r)
        torch.testing.assert_close(local, xp[:, blk], rtol=0, atol=0)
        assert shape == (2, n_pad, 4)
        if rank == 0:
            torch.testing.assert_close(gathered, xp, rtol=0, atol=0)
        else:
            assert gathered is None
        torch.testing.assert_close(via_dtensor, xp, rtol=0, atol=0)
    if fully:
        # The fully sharded block of (r, c) is the c-th piece of the row block I_r.
        b = n_pad // (p * p)
        assert res[p + 1][0].shape[1] == b
        torch.testing.assert_close(res[p + 1][0], xp[:, tile_bounds(n_pad, p, 1)][:, b:2 * b],
                                   rtol=0, atol=0)


def _wrong_placement(mesh: CPMesh):
    dt = shard_single(torch.zeros(1, mesh.token_multiple, 2), mesh)
    try:
        gather_pair(dt, mesh)  # must fail before any collective, on every rank
    except ValueError as e:
        msg = str(e)
    else:
        msg = None
    dist.barrier()  # the group is still in step
    return msg


def test_gather_pair_rejects_wrong_placement(run_on_mesh):
    for msg in run_on_mesh(_wrong_placement, 2, 2):
        assert msg == ("gather_pair: expected placements (Shard(dim=1), Shard(dim=2)), got "
                       "(Shard(dim=1), Replicate())")
