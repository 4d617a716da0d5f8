"""Upstream's eval-mode dropout draws, reproduced so the global RNG stays in step with serial.

Upstream's `get_dropout_mask` (boltz/model/layers/dropout.py) draws `torch.rand` of shape
[B, N, 1, 1] ([B, 1, N, 1] columnwise; [B, S, 1, 1] for the MSA) before every pair sublayer and
MSA layer even at inference, where the mask is all ones. The values are never used, but they
advance torch's global RNG, and the diffusion sampler's noise comes from the same RNG: a CP run
that skipped them would sample different noise than the serial model. So every CP layer draws
what upstream draws, with upstream's global (unpadded) shapes, and discards it.
"""

from __future__ import annotations

import torch


def draw_like_upstream_dropout(shape: tuple[int, ...], device: torch.device) -> None:
    """Advance the global RNG of `device` exactly as upstream's get_dropout_mask does."""
    # NOTE(parity): an all-ones mask at inference; only the RNG advance matters.
    torch.rand(shape, dtype=torch.float32, device=device)
