"""Attention kernels behind one block primitive (`attend_block`), chosen by `kernels.attention`.

Imports torch and `boltz_cp.errors` only; imported by layers/ and modules/.
"""

from boltz_cp.kernels.attention import (
    BACKENDS,
    attend_block,
    current_backend,
    resolve,
    set_backend,
    use_backend,
)

__all__ = ["BACKENDS", "attend_block", "current_backend", "resolve", "set_backend", "use_backend"]
