"""Rewrap a local result as a DTensor like its input: same mesh and placements, global shape
derived from the input's, last dim taken from the result. No communication."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from boltz_cp.distributed.tiles import contiguous_stride


def like(dt: DTensor, local: torch.Tensor) -> DTensor:
    """`local` (my tile of the result) as a DTensor placed like `dt` (only the last dim may differ)."""
    shape = torch.Size((*dt.shape[:-1], local.shape[-1]))
    return DTensor.from_local(local, dt.device_mesh, dt.placements, shape=shape, stride=contiguous_stride(shape))
