#!/usr/bin/env python
"""Write a RANDOM-weight Boltz-2 checkpoint in upstream (Lightning) format, for tests.

    python scripts/make_random_checkpoint.py OUT [--preset tiny|full|tiny-affinity] [--seed S]
                                             [--blocks pairformer=2,msa=1,...]

`tiny` (default) is a few-block, narrow model that runs a whole predict in seconds on a CPU;
`full` has the released model's architecture (~507 M parameters, a ~2 GB file, ~30 s and a few GB
of RAM to build); `tiny-affinity` is `tiny` with two small affinity heads, an affinity checkpoint
(`affinity_checkpoint=OUT`) for tests. The weights are random: what is predicted with them means
nothing. `--blocks name=K,...` keeps K blocks of those stacks (the bench's `blocks.<name>`:
pairformer, msa, template, confidence, token_transformer, atom_encoder, atom_decoder), e.g. a
full-width model with few blocks for timing runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from boltz_cp.errors import BoltzCPError
    from boltz_cp.models.checkpoint import describe_preset, make_random_checkpoint
    from boltz_cp.models.presets import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="checkpoint file to write (e.g. random-tiny.ckpt)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="architecture (default: tiny)")
    ap.add_argument("--seed", type=int, default=0, help="weights are a deterministic function of the seed")
    ap.add_argument("--blocks", default=None, help="name=K,... blocks to keep per stack (default: the preset's)")
    args = ap.parse_args(argv)

    preset = args.preset
    try:
        if args.blocks:
            preset = _register_blocks_preset(preset, args.blocks)
        path = make_random_checkpoint(args.out, preset=preset, seed=args.seed)
    except (BoltzCPError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = describe_preset(preset)
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({size_mb:.1f} MB): preset {preset}, seed {args.seed}")
    print("  " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    print(
        f"WARNING: {path} holds RANDOM weights; predictions made with it are not meaningful "
        "(use it to test the pipeline, not to fold anything)",
        file=sys.stderr,
    )
    return 0


def _register_blocks_preset(preset: str, spec: str) -> str:
    """Add (in this process) a preset `<preset>-<name><K>...` with those block counts; its name
    is what the checkpoint records as its random preset."""
    import copy

    from boltz_cp.errors import ConfigError
    from boltz_cp.models.presets import PRESETS, apply_blocks

    blocks = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise ConfigError(f"--blocks wants name=K,... with K a positive integer, got {item!r}")
        blocks[name.strip()] = int(value)
    if preset not in PRESETS:
        raise ConfigError(f"unknown checkpoint preset {preset!r}; choose one of {sorted(PRESETS)}")
    hp = copy.deepcopy(PRESETS[preset])
    apply_blocks(hp, blocks, limit_to_existing=False)
    name = preset + "-" + "-".join(f"{k}{v}" for k, v in blocks.items())
    PRESETS[name] = hp
    return name


if __name__ == "__main__":
    sys.exit(main())
