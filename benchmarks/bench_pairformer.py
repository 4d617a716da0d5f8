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

from _common import TABLE_HEADER, launch, rank_setup, report_forward, table_row


def _worker(n: int, dtype_name: str) -> None:
    import torch

    from boltz_cp.distributed import TokenLayout, pair_from_tile, shutdown_distributed, single_from_local
    from boltz_cp.layers.pairformer import PairformerLayer
    from boltz_cp.parity.reference import randomize_

    dtype = getattr(torch, dtype_name)
    mesh, _, _ = rank_setup()
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
    report_forward(lambda: layer(s, z, mask, pair_mask, layout), mesh)
    shutdown_distributed()


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
    print(TABLE_HEADER)
    for n in args.tokens:
        base = None
        for side in args.sides:
            row, base = table_row(n, side, launch(__file__, side, ["--tokens", str(n), "--dtype", args.dtype],
                                                  timeout=3600), base)
            print(row, flush=True)


if __name__ == "__main__":
    main()
