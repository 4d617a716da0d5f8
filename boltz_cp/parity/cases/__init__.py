"""Parity cases, one module per upstream layer file; each registers with `runner.register`."""
