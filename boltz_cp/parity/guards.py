"""Allocation guard: catch any tensor with two token dims of full size during CP work."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class FullSizeGuard(TorchDispatchMode):
    """Records every plain tensor produced by an op that has two or more dims >= `n_full`.

    DTensor wrappers (whose *global* shape is full size) are skipped: only what a rank really
    allocates is checked. Pick N above every channel width so that only token dims can trip it.
    """

    def __init__(self, n_full: int) -> None:
        super().__init__()
        self.n_full = n_full
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if type(t) is torch.Tensor and sum(d >= self.n_full for d in t.shape) >= 2:
                self.violations.append(f"{func}: {tuple(t.shape)}")
        return out
