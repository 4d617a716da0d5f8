"""Every parity case on rectangular meshes, as a user runs it:
`torchrun --nproc-per-node R*C -m boltz_cp.parity all --mesh RxC --tokens 37`.

N = 37 is prime, so every mesh pads (to a multiple of R*C) and no tile is whole; cases on a
real input report their own N (28: padded on 2x3 and 2x4). 2x3 and 2x4 have rings of unequal
size, so the SUMMA schedule, the generic transpose and the column-block fetch all carry
pieces of several tiles; 1x2 and 2x1 have a ring of size 1.

Tier: torchrun subprocess (gloo CPU, float64, tiny widths); 2-8 ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


# 2x3 in CI; the others on demand (-m slow): 1x2 and 2x1 also run end to end in CI (tests/test_dp.py
# folds on 1x2 meshes), 2x4 takes 8 ranks.
@pytest.mark.parametrize("mesh", ["2x3", pytest.param("1x2", marks=pytest.mark.slow),
                                  pytest.param("2x1", marks=pytest.mark.slow),
                                  pytest.param("2x4", marks=pytest.mark.slow)])
def test_parity_all_on_rectangular_mesh(mesh):
    from boltz_cp.parity.runner import load_cases

    rows, cols = (int(v) for v in mesh.split("x"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={rows * cols}",
           "-m", "boltz_cp.parity", "all", "--tokens", "37", "--mesh", mesh, "--timeout", "120"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if f" mesh={mesh} dtype=float64 " in line]
    assert sorted(line.split()[0] for line in lines) == sorted(load_cases()), r.stdout
    assert all(line.endswith("PASS") for line in lines), r.stdout
