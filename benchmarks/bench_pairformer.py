"""Per-rank memory and CPU time of one full-width CP pairformer block, 1x1 vs 2x2 (vs 3x3).

    python benchmarks/bench_pairformer.py [--tokens 128 256 384] [--sides 1 2 3] [--dtype float32]

For each (mesh side, N) it launches `torchrun --nproc-per-node side^2` on CPU (gloo, one
OpenMP thread per rank) running one Boltz-2-width PairformerLayer (token_s 384, token_z 128,
16 single-track heads, triangle attention 4 x 32) on each rank's own tiles, after one warm-up
forward. Per rank it measures:
  - activation memory: peak of heap bytes in use (glibc mallinfo2, sampled after every
    aten op) minus the bytes in use before the forward (weights and input tiles excluded);
  - CPU seconds of the forward (process_time).
It prints a table and the ratios asked for: per-rank activation memory / (1x1 memory / P)
and sum over ranks of CPU seconds / 1x1 CPU seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _heap_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _worker(n: int, dtype_name: str) -> None:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from boltz_cp.distributed import (
        CPMesh,
        TokenLayout,
        init_distributed,
        pair_from_tile,
        shutdown_distributed,
        single_from_local,
    )
    from boltz_cp.layers.pairformer import PairformerLayer
    from boltz_cp.parity.reference import randomize_

    class PeakHeap(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.peak = _heap_in_use()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, _heap_in_use())
            return out

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    ctx = init_distributed(600, "cpu")
    side = int(round(ctx.world_size**0.5))
    mesh = CPMesh.build(side, side)
    layout = TokenLayout(n, mesh)
    layer = randomize_(PairformerLayer(384, 128, 16, 0.0, 32, 4, False, True), torch.Generator().manual_seed(0))
    layer = layer.to(dtype).eval()
    g = torch.Generator().manual_seed(mesh.rank)
    ni = layout.rows.stop - layout.rows.start
    nj = layout.cols.stop - layout.cols.start
    real_i = (~layout.is_pad(layout.rows)).to(dtype)
    real_j = (~layout.is_pad(layout.cols)).to(dtype)
    s = single_from_local(torch.randn(1, ni, 384, generator=g, dtype=dtype), mesh)
    z = pair_from_tile(torch.randn(1, ni, nj, 128, generator=g, dtype=dtype), mesh)
    mask = single_from_local(real_i[None].clone(), mesh)
    pair_mask = pair_from_tile((real_i[:, None] * real_j[None, :])[None].clone(), mesh)
    with torch.inference_mode():
        layer(s, z, mask, pair_mask, layout)  # warm-up
        torch.distributed.barrier()
        base = _heap_in_use()
        mode = PeakHeap()
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        with mode:
            out = layer(s, z, mask, pair_mask, layout)
        t_cpu, t_wall = time.process_time() - t_cpu, time.perf_counter() - t_wall
        del out
    mine = {"rank": mesh.rank, "act_bytes": mode.peak - base, "cpu_s": t_cpu, "wall_s": t_wall}
    every = [None] * mesh.size
    torch.distributed.all_gather_object(every, mine)  # one writer: ranks' lines would interleave
    if mesh.rank == 0:
        print("RESULT " + json.dumps(every), flush=True)
    shutdown_distributed()


def _run(side: int, n: int, dtype: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={side * side}",
           str(Path(__file__).resolve()), "--worker", "--tokens", str(n), "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"side={side} N={n} failed:\n{proc.stderr[-3000:]}")
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.split("RESULT ", 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 256, 384])
    ap.add_argument("--sides", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.tokens[0], args.dtype)
        return
    print(f"| N | mesh | max act. MiB/rank | 1x1 MiB / P | mem ratio | sum CPU s | 1x1 CPU s | CPU ratio | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.tokens:
        base = None
        for side in args.sides:
            rows = _run(side, n, args.dtype)
            mem = max(r["act_bytes"] for r in rows) / 2**20
            cpu = sum(r["cpu_s"] for r in rows)
            wall = max(r["wall_s"] for r in rows)
            if side == 1:
                base = (mem, cpu)
            p = side * side
            ratio_mem = mem / (base[0] / p) if base else float("nan")
            ratio_cpu = cpu / base[1] if base else float("nan")
            print(f"| {n} | {side}x{side} | {mem:.1f} | {base[0] / p:.1f} | {ratio_mem:.2f} | {cpu:.2f} | "
                  f"{base[1]:.2f} | {ratio_cpu:.2f} | {wall:.2f} |", flush=True)


if __name__ == "__main__":
    main()
