"""Time and peak memory of the PAE + pLDDT pictures of one model at N tokens (plots=true).

    python benchmarks/bench_plots.py --tokens 5000 --chains 8

Prints the wall time of `write_plots` (both PNGs) and the process's peak RSS before and after
(the PAE matrix itself, N x N float32, is counted in the "before": the writer holds it anyway).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from boltz_cp.plots import write_plots


class _Log:
    def __call__(self, msg):
        print(msg)

    warn = __call__


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=5000)
    ap.add_argument("--chains", type=int, default=8)
    args = ap.parse_args()
    n = args.tokens
    rng = np.random.default_rng(0)
    pred = {
        "pae": torch.from_numpy(rng.uniform(0, 32, (1, n, n)).astype(np.float32)),
        "plddt": torch.from_numpy(rng.uniform(0, 1, (1, n)).astype(np.float32)),
        "confidence_score": torch.tensor([0.5]),
    }
    asym = torch.from_numpy(np.repeat(np.arange(args.chains), -(-n // args.chains))[:n])
    names = {c: chr(65 + c) for c in range(args.chains)}
    import matplotlib.figure  # noqa: F401  (import time is not the plot's)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        written = write_plots(pred, asym, names, "bench", Path(d), _Log())
        wall = time.perf_counter() - t0
        sizes = {p.name: p.stat().st_size for p in written}
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"tokens={n} chains={args.chains} write_plots wall={wall:.2f}s peak_rss_before={before:.0f}MiB "
          f"peak_rss_after={after:.0f}MiB added={after - before:.0f}MiB files={sizes}")


if __name__ == "__main__":
    main()
