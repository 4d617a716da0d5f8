"""P2P messages staged through host memory (boltz_cp/distributed/p2p.py): what lets several
ranks share one GPU over gloo (`dist_backend=gloo`), whose send/recv cannot read CUDA memory.

On CPU the staging is forced for CPU tensors (`p2p.STAGE_CPU`), so the host buffers and the
copies back run for real; the results must equal the unstaged exchanges bit for bit. On CUDA the
same path runs for CUDA tensors (`python scripts/gpu_check.py`, its 2x2-on-one-GPU step).

Tier: gloo CPU, 2x2 (and no PG for the dist_backend setting's errors).
"""

from __future__ import annotations

import pytest
import torch

from boltz_cp.distributed import CPMesh, init_distributed, ring_shift, transpose_exchange
from boltz_cp.distributed.halo import halo_exchange
from boltz_cp.errors import ConfigError


def _exchanges(mesh: CPMesh, stage: bool):
    from boltz_cp.distributed import p2p

    x = torch.arange(30, dtype=torch.float64).view(2, 3, 5) + 1000.0 * mesh.rank
    p2p.STAGE_CPU = stage
    try:
        h_j = ring_shift(x, mesh, "j", 1)  # two exchanges in flight at once, as in Cannon
        h_i = ring_shift(2 * x, mesh, "i", -1)
        out = [h_j.wait(), h_i.wait(), transpose_exchange(x, mesh).wait(),
               halo_exchange(x, mesh, 1, dim=1).wait()]
        recv = torch.empty_like(x)
        dst, src = mesh.ring_neighbors("j", 1)
        works = p2p.batch_isend_irecv([
            torch.distributed.P2POp(torch.distributed.isend, x, peer=dst, group=mesh.ring("j")),
            torch.distributed.P2POp(torch.distributed.irecv, recv, peer=src, group=mesh.ring("j"))])
        staged = [type(w).__name__ == "_StagedWork" for w in works]
        for w in works:
            w.wait()
        out.append(recv)
    finally:
        p2p.STAGE_CPU = False
    return out, staged


def test_staged_exchanges_equal_direct_ones(run_on_mesh):
    direct = run_on_mesh(_exchanges, 2, 2, False)
    staged = run_on_mesh(_exchanges, 2, 2, True)
    for (d_out, d_kind), (s_out, s_kind) in zip(direct, staged):
        assert not any(d_kind) and s_kind == [True]
        for a, b in zip(d_out, s_out):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dist_backend_setting_errors():
    if torch.distributed.is_initialized():
        pytest.skip("a process group already exists in this pytest process")
    with pytest.raises(ConfigError, match="dist_backend=tpu is not one of auto, gloo, nccl"):
        init_distributed(5, "cpu", "tpu")
    with pytest.raises(ConfigError, match="dist_backend=nccl needs CUDA"):
        init_distributed(5, "cpu", "nccl")
    assert not torch.distributed.is_initialized()
