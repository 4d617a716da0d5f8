"""The float64 oracle: upstream modules run in true float64, random weights, test masks.

Upstream layers call `.float()` inside `forward` (triangle multiplication, attention with pair
bias, outer product mean): on float64 inputs that silently drops to float32 (~5e-7 off) or
fails with a mixed-dtype error; masks cast with `.float()` become float32 and meet float64
weights; `linspace` and friends build float32 tensors. `fp64_reference()` makes `.float()` a
no-op on float64 tensors and a float64 cast on bool / integer ones, and float64 the default
dtype, for the duration of a block, so the reference is a real float64 computation. The sampler
and the steering potentials name `torch.float32` outright (guidance buffers, van der Waals radii):
inside the block those two modules see a `torch` whose float32 is float64.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

_original_float = torch.Tensor.float


def _float_keep_fp64(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if self.dtype == torch.float64:
        return self
    if not self.is_floating_point() and not self.is_complex():
        return self.to(torch.float64)  # masks, one-hots, indices: exact in either dtype
    return _original_float(self, *args, **kwargs)


class _Float32IsFloat64:
    """`torch` for a module that names float32 explicitly: every attribute is torch's, except that
    float32 (and its alias `float`) is float64."""

    def __getattr__(self, name: str):
        return torch.float64 if name in ("float32", "float") else getattr(torch, name)


# Upstream modules whose float32 buffers would meet float64 tensors in the oracle.
_FLOAT32_MODULES = ("boltz.model.modules.diffusionv2", "boltz.model.potentials.potentials")


def _keys_in_input_dtype(single, indexing_matrix, W, H):
    # Upstream's window indexing matrix is a float32 0/1 matrix: exact in float64 too.
    return _original_single_to_keys(single, indexing_matrix.to(single.dtype), W, H)


@contextmanager
def fp64_reference():
    """Within the block upstream computes in float64 (test/oracle only): `Tensor.float()` leaves
    float64 tensors unchanged and turns bool / integer tensors into float64; tensors built in the
    default dtype (e.g. the template distogram's `linspace` boundaries) are float64; the
    atom-window indexing matrix takes the dtype of the atoms it gathers; the sampler and the
    steering potentials build their float32 buffers in float64."""
    global _original_single_to_keys
    import importlib

    from boltz.model.modules import encodersv2

    modules = [importlib.import_module(name) for name in _FLOAT32_MODULES]

    _original_single_to_keys = encodersv2.single_to_keys
    default_dtype = torch.get_default_dtype()
    torch.Tensor.float = _float_keep_fp64
    torch.set_default_dtype(torch.float64)
    encodersv2.single_to_keys = _keys_in_input_dtype
    for module in modules:
        module.torch = _Float32IsFloat64()
    try:
        yield
    finally:
        torch.Tensor.float = _original_float
        torch.set_default_dtype(default_dtype)
        encodersv2.single_to_keys = _original_single_to_keys
        for module in modules:
            module.torch = torch


def randomize_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every parameter random values, including the ones upstream initialises to zero
    (final output layers), so that a parity test cannot pass on all-zero outputs.

    Matrices: N(0, 1/fan_in); LayerNorm weights: 1 + 0.1 N(0, 1); other vectors: 0.1 N(0, 1).
    Parameters are visited in name order, so the values depend only on the generator state.
    """
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if p.dim() >= 2:
                value = noise / math.sqrt(p.shape[-1])
            elif name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            p.copy_(value.to(p.dtype))
    return module


def token_mask(n: int, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    """[B, n] float mask with real zeros: ~10 % scattered, plus the last third of the tokens
    masked as one run (whole masked tiles on 2x2 / 3x3 meshes); token 0 is always real."""
    m = (torch.rand(batch, n, generator=generator) > 0.1).double()
    m[:, n - n // 3 :] = 0
    m[:, 0] = 1
    return m


def pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, n, n] = mask_i * mask_j, as upstream builds it."""
    return mask[:, :, None] * mask[:, None, :]
