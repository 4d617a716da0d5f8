"""Shared by the CPU mesh benchmarks: heap sampling, one measured forward per rank, the torchrun
launch and the ratio table.

Memory: peak of heap bytes in use (glibc mallinfo2, sampled after every aten op) minus the bytes
in use before the forward (weights and inputs excluded). CPU and wall: process_time and wall time
of a separate, uninstrumented forward (the sampling costs about the same per op on every rank, so
timing under it would charge a P-rank run P times its overhead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from boltz_cp.measure import HeapMeter, heap_in_use

REPO = Path(__file__).resolve().parent.parent
TABLE_HEADER = ("| N | mesh | max act. MiB/rank | 1x1 MiB / P | mem ratio | sum CPU s | 1x1 CPU s | CPU ratio | wall s |\n"
                "|---|---|---|---|---|---|---|---|---|")


def rank_setup(feats_path: str | None = None):
    """One OpenMP thread, a gloo process group and the square mesh of torchrun's world; with a
    saved feature file also its tensors and their TokenLayout. -> (mesh, feats, layout)."""
    import torch

    from boltz_cp.distributed import CPMesh, TokenLayout, init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed(1800, "cpu")
    side = int(round(ctx.world_size**0.5))
    mesh = CPMesh.build(side, side)
    if feats_path is None:
        return mesh, None, None
    feats = torch.load(feats_path)
    return mesh, feats, TokenLayout(feats["token_pad_mask"].shape[1], mesh)


def report_forward(forward: Callable[[], object], mesh) -> None:
    """Run ``forward`` once to warm up, once timed and once under the heap sampler on every rank;
    rank 0 prints one ``RESULT`` line with every rank's activation bytes, CPU and wall seconds."""
    import torch

    with torch.inference_mode():
        forward()  # warm-up
        torch.distributed.barrier()
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        out = forward()
        t_cpu, t_wall = time.process_time() - t_cpu, time.perf_counter() - t_wall
        del out
        torch.distributed.barrier()
        base = heap_in_use()
        mode = HeapMeter()
        with mode:
            out = forward()
        del out
    mine = {"rank": mesh.rank, "act_bytes": mode.peak() - base, "cpu_s": t_cpu, "wall_s": t_wall}
    every = [None] * mesh.size
    torch.distributed.all_gather_object(every, mine)  # one writer: ranks' lines would interleave
    if mesh.rank == 0:
        print("RESULT " + json.dumps(every), flush=True)


def launch(script: str, side: int, args: list[str], timeout: float = 7200) -> list[dict]:
    """``torchrun --nproc-per-node side^2 script --worker ARGS`` on CPU (one OpenMP thread per
    rank); returns the ranks' results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={side * side}",
           str(Path(script).resolve()), "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"side={side} {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.split("RESULT ", 1)[1])


def table_row(n: int, side: int, rows: list[dict], base: tuple[float, float] | None):
    """(markdown row, 1x1 baseline): max memory per rank and summed CPU against 1x1's."""
    mem = max(r["act_bytes"] for r in rows) / 2**20
    cpu = sum(r["cpu_s"] for r in rows)
    wall = max(r["wall_s"] for r in rows)
    if side == 1:
        base = (mem, cpu)
    if base is None:
        return f"| {n} | {side}x{side} | {mem:.1f} | n/a | n/a | {cpu:.2f} | n/a | n/a | {wall:.2f} |", base
    p = side * side
    return (f"| {n} | {side}x{side} | {mem:.1f} | {base[0] / p:.1f} | {mem / (base[0] / p):.2f} | {cpu:.2f} | "
            f"{base[1]:.2f} | {cpu / base[1]:.2f} | {wall:.2f} |"), base
