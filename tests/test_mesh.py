"""CPMesh memberships, rank conversion, mesh/world mismatch, and the runtime helpers.

Tier: no PG (parse_mesh, init_distributed in-process as a world of 1) and gloo CPU
(1x1, 2x2, 3x3, 1x4 through the worker pools).
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist

from boltz_cp.distributed import (
    CPMesh,
    any_rank_failed,
    convert_rank,
    init_distributed,
    parse_mesh,
    shutdown_distributed,
)
from boltz_cp.errors import ConfigError

# rank: (coord, ring_j, ring_i, transpose_partner) -- the table of the CPMesh docstring.
TABLE_2x2 = {
    0: ((0, 0), [0, 1], [0, 2], 0),
    1: ((0, 1), [0, 1], [1, 3], 2),
    2: ((1, 0), [2, 3], [0, 2], 1),
    3: ((1, 1), [2, 3], [1, 3], 3),
}
TABLE_3x3 = {
    0: ((0, 0), [0, 1, 2], [0, 3, 6], 0),
    1: ((0, 1), [0, 1, 2], [1, 4, 7], 3),
    2: ((0, 2), [0, 1, 2], [2, 5, 8], 6),
    3: ((1, 0), [3, 4, 5], [0, 3, 6], 1),
    4: ((1, 1), [3, 4, 5], [1, 4, 7], 4),
    5: ((1, 2), [3, 4, 5], [2, 5, 8], 7),
    6: ((2, 0), [6, 7, 8], [0, 3, 6], 2),
    7: ((2, 1), [6, 7, 8], [1, 4, 7], 5),
    8: ((2, 2), [6, 7, 8], [2, 5, 8], 8),
}
TABLE_1x1 = {0: ((0, 0), [0], [0], 0)}


def _membership(mesh: CPMesh) -> dict:
    dm = mesh.device_mesh
    out = {
        "rank": mesh.rank,
        "coord": mesh.coord,
        # Actual process-group memberships, in group-rank order.
        "ring_j": dist.get_process_group_ranks(mesh.ring_j),
        "ring_i": dist.get_process_group_ranks(mesh.ring_i),
        "members_j": mesh.ring_members("j"),
        "members_i": mesh.ring_members("i"),
        "dm_group_cp_i": dist.get_process_group_ranks(dm.get_group("cp_i")),
        "dm_group_cp_j": dist.get_process_group_ranks(dm.get_group("cp_j")),
        # The sub-mesh along mesh dim "cp_i" (the naming trap: its members share a column).
        "submesh_cp_i": dm["cp_i"].mesh.tolist(),
        "partner": mesh.transpose_partner,
        "dims": dm.mesh_dim_names,
    }
    for ring in ("i", "j"):
        g = mesh.ring(ring)
        members = out[f"ring_{ring}"]
        out[f"group_ranks_{ring}"] = [convert_rank(g, global_rank=m) for m in members]
        out[f"global_ranks_{ring}"] = [convert_rank(g, group_rank=k) for k in range(len(members))]
        out[f"my_pos_{ring}"] = (dist.get_rank(g), mesh.ring_position(ring))
    return out


@pytest.mark.parametrize("rows,table", [(1, TABLE_1x1), (2, TABLE_2x2), (3, TABLE_3x3)])
def test_membership_table(run_on_mesh, rows, table):
    results = run_on_mesh(_membership, rows, rows)
    for rank, m in enumerate(results):
        coord, ring_j, ring_i, partner = table[rank]
        assert m["rank"] == rank
        assert m["coord"] == coord
        assert m["ring_j"] == ring_j and m["members_j"] == ring_j
        assert m["ring_i"] == ring_i and m["members_i"] == ring_i
        assert m["partner"] == partner
        assert m["dims"] == ("cp_i", "cp_j")
        # ring_i is the group of mesh dim cp_i; ring_j of cp_j (see DESIGN 3, naming trap).
        assert m["dm_group_cp_i"] == ring_i and m["dm_group_cp_j"] == ring_j
        assert m["submesh_cp_i"] == ring_i
        for ring, members in (("i", ring_i), ("j", ring_j)):
            assert m[f"group_ranks_{ring}"] == list(range(len(members)))
            assert m[f"global_ranks_{ring}"] == members
            pos = members.index(rank)
            assert m[f"my_pos_{ring}"] == (pos, pos)


def _neighbors(mesh: CPMesh) -> dict:
    return {(ring, s): mesh.ring_neighbors(ring, s) for ring in "ij" for s in (-4, -2, -1, 0, 1, 2)}


def test_ring_neighbors_3x3(run_on_mesh):
    res = run_on_mesh(_neighbors, 3, 3)
    r4 = res[4]  # (1, 1)
    assert r4[("j", 1)] == (5, 3)
    assert r4[("j", -1)] == (3, 5)
    assert r4[("j", 0)] == (4, 4)
    assert r4[("i", 1)] == (7, 1)
    assert r4[("i", 2)] == (1, 7)
    assert r4[("i", -4)] == (1, 7)  # -4 = -1 mod 3
    r5 = res[5]  # (1, 2): ring_j wraps around
    assert r5[("j", 1)] == (3, 4)
    assert r5[("j", 2)] == (4, 3)
    # dst of a shift s is the src of the shift -s, on every rank.
    for m in res:
        for ring in "ij":
            for s in (-1, 1, 2):
                assert m[(ring, s)] == m[(ring, -s)][::-1]


def _rect(mesh: CPMesh):
    try:
        mesh.transpose_partner
    except ConfigError as e:
        partner = str(e)
    else:
        partner = None
    return (dist.get_process_group_ranks(mesh.ring_j), dist.get_process_group_ranks(mesh.ring_i),
            mesh.ring_neighbors("j", 1), mesh.ring_neighbors("i", 1), partner)


def test_rectangular_1x4(run_on_mesh):
    res = run_on_mesh(_rect, 1, 4)
    for rank, (rj, ri, nj, ni, partner) in enumerate(res):
        assert rj == [0, 1, 2, 3] and ri == [rank]
        assert nj == ((rank + 1) % 4, (rank - 1) % 4) and ni == (rank, rank)
        assert partner is not None and "square mesh" in partner and "1x4" in partner


def _build_mismatch(rows, cols):
    t0 = time.monotonic()
    try:
        CPMesh.build(rows, cols)
    except ConfigError as e:
        return str(e), time.monotonic() - t0
    return None, time.monotonic() - t0


def test_mesh_world_mismatch_raises_on_every_rank(run_on_world):
    res = run_on_world(_build_mismatch, 4, 3, 3, timeout=20)
    assert len(res) == 4
    for msg, elapsed in res:
        assert msg == ("mesh 3x3 needs 9 processes but the world size is 4 (launch with "
                       "torchrun --nproc-per-node 9, or pass mesh=... / mesh=auto)")
        assert elapsed < 1.0
    res = run_on_world(_build_mismatch, 4, 1, 2, timeout=20)
    assert all(msg is not None and "needs 2 processes" in msg for msg, _ in res)


def _dp_mesh():
    from boltz_cp.distributed import ring_shift
    from boltz_cp.distributed.tiles import gather_pair, pair_from_tile

    mesh = CPMesh.build(1, 2, dp=2)
    tile = torch.full((1, 2, 1, 1), float(mesh.rank))
    full = gather_pair(pair_from_tile(tile, mesh), mesh, dst=mesh.writer)
    shifted = ring_shift(tile, mesh, "j", 1).wait()
    return (mesh.coord, mesh.dp_index, mesh.writer, mesh.is_writer,
            dist.get_process_group_ranks(mesh.ring_j), dist.get_process_group_ranks(mesh.group),
            dist.get_process_group_ranks(mesh.dp_group), None if full is None else full.flatten().tolist(),
            float(shifted.flatten()[0]))


def test_data_parallel_meshes(run_on_world):
    """dp=2 of 1x2 on 4 ranks: two independent meshes {0, 1} and {2, 3}, each with its writer."""
    res = run_on_world(_dp_mesh, 4, timeout=60)
    for rank, (coord, d, writer, is_writer, ring_j, group, dp_group, full, shifted) in enumerate(res):
        base = 2 * (rank // 2)
        assert coord == (0, rank % 2) and d == rank // 2 and writer == base and is_writer == (rank == base)
        assert ring_j == group == [base, base + 1] and dp_group == [rank % 2, rank % 2 + 2]
        # The writer gathers its own mesh's tiles only; shifts stay inside the mesh.
        assert full == ([float(base), float(base + 1)] * 2 if is_writer else None)
        assert shifted == float(base + (rank + 1) % 2)


def test_parse_mesh():
    assert parse_mesh("2x3") == (2, 3)
    assert parse_mesh(" 4X4 ") == (4, 4)
    assert parse_mesh((3, 1)) == (3, 1)
    for bad in ("2x", "2*2", "0x2", (2, -1), "axb", 5):
        with pytest.raises(ConfigError):
            parse_mesh(bad)


def test_ring_names_are_checked():
    """A ring name other than "i" / "j" is an error wherever a ring is chosen, not ring_i."""
    from boltz_cp.distributed import Ring, as_ring
    from boltz_cp.distributed.mesh import Grid

    assert as_ring("j") is Ring.RING_J and as_ring(Ring.RING_I) is Ring.RING_I and Ring.RING_J == "j"
    grid = Grid(rows=2, cols=3, coord=(1, 2), base=0, mesh_cols=3, transposed=False, ring_j="row", ring_i="col",
                group=None)
    assert (grid.ring("j"), grid.ring("i"), grid.ring_size("j"), grid.ring_size("i")) == ("row", "col", 3, 2)
    for call in (lambda: as_ring("k"), lambda: grid.ring("J"), lambda: grid.ring_size("row")):
        with pytest.raises(ValueError, match="ring must be 'i' or 'j'"):
            call()


# -- runtime ---------------------------------------------------------------------------------

@pytest.fixture
def no_pg(monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    yield monkeypatch
    shutdown_distributed()


def test_init_single_process_world(no_pg):
    ctx = init_distributed(timeout_s=5, device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend) == (0, 1, 0, "gloo")
    assert ctx.device == torch.device("cpu")
    assert init_distributed(timeout_s=5, device="auto") == ctx  # idempotent
    mesh = CPMesh.build(1, 1)
    assert dist.get_process_group_ranks(mesh.ring_j) == [0]
    assert dist.get_process_group_ranks(mesh.ring_i) == [0]
    assert any_rank_failed(False) is False and any_rank_failed(True) is True
    with pytest.raises(ConfigError, match="needs 4 processes but the world size is 1"):
        CPMesh.build(2, 2)
    shutdown_distributed()
    assert not dist.is_initialized()
    shutdown_distributed()  # twice is fine


def test_init_torchrun_env_world_of_one(no_pg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    no_pg.setenv("RANK", "0")
    no_pg.setenv("WORLD_SIZE", "1")
    no_pg.setenv("LOCAL_RANK", "0")
    no_pg.setenv("MASTER_ADDR", "127.0.0.1")
    no_pg.setenv("MASTER_PORT", str(port))
    ctx = init_distributed(timeout_s=5, device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, "gloo")


def test_init_config_errors(no_pg):
    with pytest.raises(ConfigError, match="timeout_s must be positive"):
        init_distributed(timeout_s=0)
    with pytest.raises(ConfigError, match="device must be"):
        init_distributed(timeout_s=5, device="tpu")
    no_pg.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="incomplete torchrun environment"):
        init_distributed(timeout_s=5, device="cpu")
    if not torch.cuda.is_available():
        no_pg.delenv("RANK")
        with pytest.raises(ConfigError, match="device=cuda"):
            init_distributed(timeout_s=5, device="cuda")
    assert not dist.is_initialized()


def _vote(flags, late_rank=None, timeout_s=None):
    rank = dist.get_rank()
    if rank == late_rank:
        time.sleep(1.5)
        return any_rank_failed(flags[rank]), 0.0
    t0 = time.monotonic()
    out = any_rank_failed(flags[rank], timeout_s=timeout_s)
    return out, time.monotonic() - t0


def test_any_rank_failed(run_on_world):
    assert [v for v, _ in run_on_world(_vote, 4, [False] * 4)] == [False] * 4
    assert [v for v, _ in run_on_world(_vote, 4, [False, False, True, False])] == [True] * 4


def test_any_rank_failed_times_out(run_on_world):
    # Rank 3 joins the vote 1.5 s late; the others give up after 0.3 s and count it a failure.
    res = run_on_world(_vote, 4, [False] * 4, late_rank=3, timeout_s=0.3, timeout=30)
    for rank in range(3):
        failed, elapsed = res[rank]
        assert failed is True
        assert elapsed < 1.2
    # The late all-reduce still completed on every rank, so the group is usable afterwards.
    assert [v for v, _ in run_on_world(_vote, 4, [False] * 4)] == [False] * 4
