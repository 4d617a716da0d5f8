"""The multi-rank harness itself: results by rank, remote exceptions, hangs, reuse, speed.

Tier: gloo CPU, 1x2 and 2x2 worker pools.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import distributed_harness
from boltz_cp.distributed import CPMesh, ring_shift
from distributed_harness import DistributedHang, RemoteError


def _whoami(mesh: CPMesh, scale, offset=0):
    return mesh.rank, mesh.coord, os.getpid(), torch.get_num_threads(), \
        os.environ.get("OMP_NUM_THREADS"), scale * mesh.rank + offset


def test_results_by_rank_and_reuse(run_on_mesh):
    first = run_on_mesh(_whoami, 2, 2, 10, offset=1)
    assert [(r, c, v) for r, c, _, _, _, v in first] == \
        [(0, (0, 0), 1), (1, (0, 1), 11), (2, (1, 0), 21), (3, (1, 1), 31)]
    assert all(threads == 1 and omp == "1" for *_, threads, omp, _ in first)
    assert len({pid for _, _, pid, *_ in first}) == 4 and os.getpid() not in {p[2] for p in first}
    again = run_on_mesh(_whoami, 2, 2, 10)
    assert [p[2] for p in again] == [p[2] for p in first]  # same worker processes


def _tiny_shift(mesh: CPMesh):
    return ring_shift(torch.full((4,), float(mesh.rank)), mesh, "j", 1).wait()


def test_warm_call_is_fast(run_on_mesh):
    run_on_mesh(_tiny_shift, 2, 2)  # warm
    t0 = time.monotonic()
    for _ in range(5):
        out = run_on_mesh(_tiny_shift, 2, 2)
    per_call = (time.monotonic() - t0) / 5
    assert [o[0].item() for o in out] == [1.0, 0.0, 3.0, 2.0]
    assert per_call < 1.0, f"a warm 4-rank call took {per_call:.2f} s"


def _raise_on(mesh: CPMesh, bad_rank: int):
    if mesh.rank == bad_rank:
        raise ValueError(f"boom on purpose at {mesh.coord}")
    return mesh.rank


def test_exception_surfaces_with_rank_and_traceback(run_on_mesh):
    with pytest.raises(RemoteError) as info:
        run_on_mesh(_raise_on, 2, 2, 2, timeout=20)
    err = info.value
    assert err.rank == 2 and err.exc_type == "ValueError"
    assert "rank 2 raised ValueError: boom on purpose at (1, 0)" in str(err)
    assert "_raise_on" in err.remote_traceback  # the remote frame
    assert run_on_mesh(_raise_on, 2, 2, -1) == [0, 1, 2, 3]


def _abort_mid_exchange(mesh: CPMesh):
    # Rank 0 starts a send nobody receives and fails; rank 1 posts a receive and fails.
    if mesh.rank == 0:
        dist.isend(torch.full((4,), 99.0), dst=1)
        raise RuntimeError("abandoned send")
    if mesh.rank == 1:
        dist.irecv(torch.empty(4), src=3)
        raise RuntimeError("abandoned recv")
    return None


def _world_swap(mesh: CPMesh):
    peer = mesh.rank ^ 1
    recv = torch.empty(4)
    send = torch.full((4,), float(mesh.rank))
    ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    return recv[0].item()


def test_aborted_exchange_does_not_leak_into_next_call(run_on_mesh):
    with pytest.raises(RemoteError, match="rank 0 raised RuntimeError: abandoned send"):
        run_on_mesh(_abort_mid_exchange, 2, 2, timeout=20)
    # A stale message would be matched by this exchange (same group, peers and tag).
    assert run_on_mesh(_world_swap, 2, 2) == [1.0, 0.0, 3.0, 2.0]


def _wait_forever(mesh: CPMesh):
    if mesh.rank == 0:
        dist.recv(torch.empty(1), src=1)  # rank 1 never sends
    return mesh.rank


def test_hang_fails_within_timeout_and_pool_recovers(run_on_mesh):
    run_on_mesh(_whoami, 1, 2, 1)  # warm the pool so the timing below is the hang's alone
    t0 = time.monotonic()
    with pytest.raises(DistributedHang, match=r"hang: _wait_forever on 2 ranks: ranks \[0\] "
                                              r"did not finish within 2 s"):
        run_on_mesh(_wait_forever, 1, 2, timeout=2)
    assert time.monotonic() - t0 < 10
    assert [r for r, *_ in run_on_mesh(_whoami, 1, 2, 1)] == [0, 1]


def _raise_while_others_wait(mesh: CPMesh):
    if mesh.rank == 1:
        raise KeyError("rank 1 gives up")
    dist.barrier()  # never completes: rank 1 is gone
    return mesh.rank


def test_exception_while_others_wait_in_a_collective(run_on_mesh):
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as info:
        run_on_mesh(_raise_while_others_wait, 1, 2, timeout=30)
    assert time.monotonic() - t0 < 15  # the grace period, not the 30 s deadline
    msg = str(info.value)
    assert info.value.rank == 1 and "rank 1 raised KeyError" in msg
    assert "ranks [0] did not finish" in msg and "was killed" in msg
    assert [r for r, *_ in run_on_mesh(_whoami, 1, 2, 1)] == [0, 1]


def _die(mesh: CPMesh):
    if mesh.rank == 1:
        os._exit(3)  # like a segfault in a kernel: no exception, no reply
    return mesh.rank


def test_dead_worker_is_reported(run_on_mesh):
    t0 = time.monotonic()
    with pytest.raises(DistributedHang, match=r"ranks \[1\] died"):
        run_on_mesh(_die, 1, 2, timeout=30)
    assert time.monotonic() - t0 < 15
    assert [r for r, *_ in run_on_mesh(_whoami, 1, 2, 1)] == [0, 1]


def test_unpicklable_fn_fails_in_parent(run_on_mesh):
    with pytest.raises(TypeError, match="module-level function"):
        run_on_mesh(lambda mesh: None, 2, 2)


def test_pools_are_separate_per_world_size(run_on_mesh):
    four = {p[2] for p in run_on_mesh(_whoami, 2, 2, 1)}
    one = run_on_mesh(_whoami, 1, 1, 1)
    assert len(one) == 1 and one[0][2] not in four
    assert set(distributed_harness._POOLS) >= {1, 4}
