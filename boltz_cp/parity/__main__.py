"""`python -m boltz_cp.parity MODULE --tokens N [...]`: CP module vs upstream, one line each.

Run plainly for a 1x1 mesh, or under `torchrun --nproc-per-node K` for the mesh given by
``--mesh RxC`` (default: the most square R x C with R*C = K, e.g. 2x2 for 4, 2x3 for 6). Prints `MODULE tokens=N mesh=RxC dtype=... max_abs_err=... max_rel_err=... PASS|FAIL`
on rank 0 and exits 1 if any case fails (2 on a usage error). ``--kernels torch|fused|...``
picks the CP side's attention block kernel, as the setting kernels.attention does.
Last, rank 0 prints every rank's peak resident memory (`rss_peak_mib mesh=RxC max=.. total=..
ranks=a,b,...`), so a run on many ranks shows whether it fits the machine.
"""

from __future__ import annotations

import argparse
import os
import sys

from boltz_cp.errors import BoltzCPError, ConfigError
from boltz_cp.kernels import BACKENDS, set_backend


def _parser(names: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m boltz_cp.parity", description=__doc__.splitlines()[0])
    p.add_argument("module", choices=[*names, "all"], help="module to check, or all")
    p.add_argument("--tokens", type=int, nargs="+", default=[37], help="token counts N (default 37)")
    p.add_argument("--dtype", choices=["float64", "float32", "bf16-mixed"], default="float64",
                   help="bf16-mixed: fp32 weights under bf16 autocast, judged like float32")
    p.add_argument("--preset", choices=["tiny", "full"], default="tiny", help="layer widths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300, help="process-group timeout (s)")
    p.add_argument("--mesh", default="auto", help="RxC (rows*cols = number of processes) or auto")
    p.add_argument("--kernels", choices=list(BACKENDS), default="auto",
                   help="attention block kernel of the CP side (kernels.attention; default auto)")
    return p


def _print_rss(mesh) -> None:
    import torch.distributed as dist

    from boltz_cp.measure import MIB, rss_peak

    mine = rss_peak() / MIB
    peaks = [mine]
    if dist.is_available() and dist.is_initialized():
        peaks = [0.0] * dist.get_world_size()
        dist.all_gather_object(peaks, mine)
    if mesh.rank == 0:
        print(f"rss_peak_mib mesh={mesh.rows}x{mesh.cols} max={max(peaks):.0f} total={sum(peaks):.0f} "
              f"ranks={','.join(f'{v:.0f}' for v in peaks)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from boltz_cp.parity.runner import load_cases, run_case

    names = sorted(load_cases())
    args = _parser(names).parse_args(argv)
    from boltz_cp.distributed import CPMesh, check_mesh_size, init_distributed, parse_mesh, shutdown_distributed
    from boltz_cp.distributed.mesh import auto_mesh

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rows, cols = auto_mesh(world) if args.mesh == "auto" else parse_mesh(args.mesh)
        check_mesh_size(rows, cols, world)
        if any(n < 1 for n in args.tokens):
            raise ConfigError("--tokens must be positive")
        set_backend(args.kernels)
        init_distributed(args.timeout, "cpu")
        mesh = CPMesh.build(rows, cols)
        failed = 0
        cases = load_cases()
        for name in names if args.module == "all" else [args.module]:
            fixed = getattr(cases[name], "checkpoint_preset", None)
            if args.module == "all" and fixed is not None and args.preset != "tiny":
                if mesh.rank == 0:
                    print(f"{name} SKIP (builds the `{fixed}` checkpoint preset; --preset {args.preset} "
                          "does not apply)", flush=True)
                continue
            for n in args.tokens:
                res = run_case(name, mesh, n, dtype=args.dtype, preset=args.preset, seed=args.seed)
                failed += not res.passed and not res.skipped
                if mesh.rank == 0:
                    print(res.line(), flush=True)
        _print_rss(mesh)
        return 1 if failed else 0
    except BoltzCPError as e:
        print(f"boltz_cp.parity: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
