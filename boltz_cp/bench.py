"""`python -m boltz_cp.bench INPUT [key=value ...]` (and under torchrun): per-stage time and
per-rank peak memory of one CP prediction; see boltz_cp/cli/bench.py."""

import sys

if __name__ == "__main__":
    from boltz_cp.cli.bench import main

    sys.exit(main())
