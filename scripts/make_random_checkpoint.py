#!/usr/bin/env python
"""Write a RANDOM-weight Boltz-2 checkpoint in upstream (Lightning) format, for tests.

    python scripts/make_random_checkpoint.py OUT [--preset tiny|full|tiny-affinity] [--seed S]

`tiny` (default) is a few-block, narrow model that runs a whole predict in seconds on a CPU;
`full` has the released model's architecture (~507 M parameters, a ~2 GB file, ~30 s and a few GB
of RAM to build); `tiny-affinity` is `tiny` with two small affinity heads, an affinity checkpoint
(`affinity_checkpoint=OUT`) for tests. The weights are random: what is predicted with them means
nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from boltz_cp.errors import BoltzCPError
    from boltz_cp.models.checkpoint import PRESETS, describe_preset, make_random_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="checkpoint file to write (e.g. random-tiny.ckpt)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="architecture (default: tiny)")
    ap.add_argument("--seed", type=int, default=0, help="weights are a deterministic function of the seed")
    args = ap.parse_args(argv)

    try:
        path = make_random_checkpoint(args.out, preset=args.preset, seed=args.seed)
    except (BoltzCPError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = describe_preset(args.preset)
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({size_mb:.1f} MB): preset {args.preset}, seed {args.seed}")
    print("  " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    print(
        f"WARNING: {path} holds RANDOM weights; predictions made with it are not meaningful "
        "(use it to test the pipeline, not to fold anything)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
