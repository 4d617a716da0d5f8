"""Run a parity case on every rank of a mesh through the reused-worker harness."""

from __future__ import annotations


def parity_on_mesh(mesh, name, n, dtype="float64", preset="tiny", seed=0):
    """Harness target: the line and verdict of `run_case` on this rank."""
    from boltz_cp.parity.runner import run_case

    res = run_case(name, mesh, n, dtype=dtype, preset=preset, seed=seed)
    return res.line(), res.passed


def assert_parity(run_on_mesh, name, side, n, dtype="float64", preset="tiny", timeout=120):
    """``side``: p for a p x p mesh, or (rows, cols)."""
    rows, cols = (side, side) if isinstance(side, int) else side
    results = run_on_mesh(parity_on_mesh, rows, cols, name, n, dtype, preset, timeout=timeout)
    lines = {line for line, _ in results}
    assert len(lines) == 1, f"ranks disagree: {lines}"
    line, passed = results[0]
    assert passed, line
    return line
