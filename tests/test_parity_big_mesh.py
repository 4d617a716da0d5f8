"""Every parity case on meshes beyond 3x3, as a user runs it:
`torchrun --nproc-per-node 16 -m boltz_cp.parity all --mesh 4x4 --tokens 37` (and `--mesh 2x8`).

N = 37 pads to 48 (a multiple of 16): on 4x4 the tiles are 12 x 12 with single-track blocks of
3 tokens, and the last tile row holds one real token; on 2x8 the tiles are 24 x 6 and the last
column block is all padding. Cases on a real input report their own N (28, padded to 32: 2-token
blocks, and on 2x8 again an all-pad column block). Rank 0 prints every rank's peak RSS; the
16-rank run must fit this 24 GB machine beside the other users (measured: ~720 MiB a rank,
~11.3 GiB for the 16 ranks, see README *Tests*).

Tier: torchrun subprocess (gloo CPU, float64, tiny widths); 16 ranks, slow only (-m slow):
about 2 minutes each on 2 cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RSS_MAX_RANK_MIB = 1536  # 24 GB / 16 ranks
RSS_TOTAL_MIB = 16384  # leaves a third of the machine to everything else


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["4x4", "2x8"])
def test_parity_all_on_16_ranks(mesh):
    from boltz_cp.parity.runner import load_cases

    rows, cols = (int(v) for v in mesh.split("x"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={rows * cols}",
           "-m", "boltz_cp.parity", "all", "--tokens", "37", "--mesh", mesh, "--timeout", "300"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if f" mesh={mesh} dtype=float64 " in line]
    assert sorted(line.split()[0] for line in lines) == sorted(load_cases()), r.stdout
    assert all(line.endswith("PASS") for line in lines), r.stdout
    m = re.search(rf"^rss_peak_mib mesh={mesh} max=(\d+) total=(\d+) ranks=([\d,]+)$", r.stdout, re.M)
    assert m, r.stdout
    peaks = [int(v) for v in m.group(3).split(",")]
    print(m.group(0))
    assert len(peaks) == rows * cols and max(peaks) == int(m.group(1))
    assert max(peaks) <= RSS_MAX_RANK_MIB and sum(peaks) <= RSS_TOTAL_MIB, m.group(0)
