"""Parity of every CP module against its upstream Boltz-2 twin, as a library and a tool.

`python -m boltz_cp.parity MODULE --tokens N [--dtype float64|float32] [--preset tiny|full]`
runs plainly (1x1) or under torchrun (square mesh of side sqrt(K)); the test suite calls the
same `run_case` through its multi-rank harness.
"""
