"""The operand dtype of CP contractions under mixed precision."""

from __future__ import annotations

import torch


def wire_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype in which contraction operands are stored and sent: the autocast dtype (bf16
    under precision=bf16-mixed) when autocast is on for this device, else ``dtype``.

    Under autocast upstream contracts these operands in bf16 (its einsums are autocast), and
    ours are bf16 values already (outputs of autocast linears times a 0/1 mask), so storing
    them in bf16 halves their memory and their ring messages without changing a value.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype
