"""`python -m boltz_cp.parity` as a user runs it. Tier: subprocess, plain and torchrun (gloo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(cmd, timeout=240):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


def test_parity_all_on_2x2_under_torchrun():
    from boltz_cp.parity.runner import load_cases

    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
              "-m", "boltz_cp.parity", "all", "--tokens", "7"])
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    # Cases on a real input (trunk) report their own token count instead of 7.
    lines = [line for line in r.stdout.splitlines() if " mesh=2x2 dtype=float64 " in line]
    assert sorted(line.split()[0] for line in lines) == sorted(load_cases()), r.stdout
    assert all(line.endswith("PASS") for line in lines), r.stdout


def test_parity_plain_and_usage_errors():
    r = _run([sys.executable, "-m", "boltz_cp.parity", "transition_z", "--tokens", "1", "5"])
    assert r.returncode == 0 and r.stdout.count("mesh=1x1 dtype=") == 2, r.stdout + r.stderr
    r = _run([sys.executable, "-m", "boltz_cp.parity", "triatt_start", "--tokens", "7", "--kernels", "torch"])
    case, rss = r.stdout.rstrip().splitlines()
    assert r.returncode == 0 and case.endswith("PASS"), r.stdout + r.stderr
    assert re.fullmatch(r"rss_peak_mib mesh=1x1 max=(\d+) total=\1 ranks=\1", rss) and int(rss.split("=")[2].split()[0]) > 0, rss
    r = _run([sys.executable, "-m", "boltz_cp.parity", "nonsense"])
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _run([sys.executable, "-m", "boltz_cp.parity", "triatt_start", "--kernels", "flex"])
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
              "-m", "boltz_cp.parity", "transition_z", "--mesh", "2x2"])
    assert r.returncode != 0 and "mesh 2x2 needs 4 processes but the world size is 2" in r.stderr, r.stderr[-2000:]
    r = _run([sys.executable, "-m", "boltz_cp.parity", "trunk", "--preset", "full"])
    assert r.returncode == 2 and "--preset full (layer widths) does not apply" in r.stderr, r.stdout + r.stderr


def _all_float32_full(mesh, n):
    from boltz_cp.parity.runner import load_cases, run_case

    # Model-level cases build a checkpoint preset's model and refuse other layer widths.
    return [run_case(name, mesh, n, dtype="float32",
                     preset="tiny" if getattr(case, "checkpoint_preset", None) else "full").line()
            for name, case in sorted(load_cases().items())]


def test_parity_all_float32_full_width_on_2x2(run_on_mesh):
    """Issue bar: every module at Boltz-2 widths, N=64, 2x2, float32 no worse than serial float32."""
    results = run_on_mesh(_all_float32_full, 2, 2, 64, timeout=600)
    lines = results[0]
    assert all(r == lines for r in results), "ranks disagree"
    failed = [line for line in lines if not line.endswith("PASS")]
    assert not failed, "\n".join(failed)
