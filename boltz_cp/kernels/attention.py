"""One key block of softmax attention, returning (output, log-sum-exp), on a chosen backend.

Every CP attention (triangle attention, attention with pair bias, atom windows) scores its
queries against keys that arrive in blocks and merges the blocks with the online softmax of
`boltz_cp.layers._softmax` (`from_output(out, lse)` + `merge_`). `attend_block` computes one
block; the backend decides whether the [Bq, H, Q, K] score block ever exists in memory:

- ``torch``: the materialised reference (scores, max, exp, sum, @ v) in at least fp32.
- ``fused``: CPU `aten._scaled_dot_product_flash_attention_for_cpu` (fp64/fp32/bf16/fp16, a
  broadcast bias read with stride 0, no score block); CUDA `aten._scaled_dot_product_efficient_
  attention` through `boltz_cp/kernels/cuda.py`. Where neither applies (an op whose schema
  differs from the one this code was written against, fp64 on CUDA) it falls back to ``torch``.
- ``cueq``: cuEquivariance's triangle attention on CUDA when the bias is shared by every row
  (``shared_bias``) and it is installed; otherwise ``fused`` (one warning).
- ``auto`` (default): ``fused`` where available, else ``torch``. Measured on this project's
  2-core CPU (KERNELS.md §6.1 and tests/test_kernels_attention.py): the CPU flash op is ~2x
  faster than the in-place materialised block in fp32, ~20x in bf16, and allocates no score block.

Trap of the CPU flash op: a query row whose keys are all -inf comes back with lse = 0 and
output 0 (a real-looking partial). Hence the contract: biases are finite (masked keys get a
large finite negative, e.g. -1e9), and a block with no key (K == 0) is never sent to a kernel.

Imports torch and `boltz_cp.errors` only; `cuda.py` is imported lazily, for CUDA tensors.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import Tensor

from boltz_cp.errors import ConfigError

BACKENDS = ("auto", "torch", "fused", "cueq")

_backend = "auto"
_warned: set[str] = set()
_flash_cpu_ok: bool | None = None

# The CPU flash op's arguments as this module calls them: (name, type, keyword-only).
_FLASH_CPU_ARGS = [("query", "Tensor", False), ("key", "Tensor", False), ("value", "Tensor", False),
                   ("dropout_p", "float", False), ("is_causal", "bool", False),
                   ("attn_mask", "Optional[Tensor]", True), ("scale", "Optional[float]", True)]


def set_backend(name: str) -> None:
    """Select the attention backend for every later `attend_block` call (process-wide)."""
    global _backend
    _backend = _check(name)


def current_backend() -> str:
    """The backend set with `set_backend` (default ``auto``)."""
    return _backend


@contextmanager
def use_backend(name: str):
    """Temporarily select a backend; restores the previous one on exit."""
    global _backend
    previous, _backend = _backend, _check(name)
    try:
        yield
    finally:
        _backend = previous


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"kernels.attention must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (the dtype of the LSE and of the torch backend's arithmetic)."""
    return torch.promote_types(dtype, torch.float32)


def flash_cpu_available() -> bool:
    """Whether the CPU flash op exists with the schema this module calls (checked once)."""
    global _flash_cpu_ok
    if _flash_cpu_ok is None:
        packet = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        try:
            schema = packet.default._schema
            args = [(a.name, str(a.type), a.kwarg_only) for a in schema.arguments]
            _flash_cpu_ok = args == _FLASH_CPU_ARGS and len(schema.returns) == 2
        except (AttributeError, RuntimeError):
            _flash_cpu_ok = False
    return _flash_cpu_ok


def resolve(backend: str | None, device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend that runs for tensors of this device and dtype: 'torch', 'fused' or 'cueq'
    (cueq still needs shared_bias and the package at call time)."""
    name = _check(backend or _backend)
    if name == "torch":
        return "torch"
    device_type = torch.device(device).type
    if device_type == "cpu":
        if name == "cueq":
            _warn_once("cueq_cpu", "kernels.attention=cueq runs on CUDA only; using the fused CPU kernel")
        if flash_cpu_available():
            return "fused"
        if name != "auto":
            _warn_once("flash_cpu", "kernels.attention: the CPU flash attention op has a schema this "
                                    "code does not know; using the torch backend")
        return "torch"
    if device_type == "cuda":
        if dtype == torch.float64:  # the efficient op has no fp64 kernel
            return "torch"
        return "cueq" if name == "cueq" else "fused"
    return "torch"


def attend_block(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None, *, scale: float,
                 shared_bias: bool = False, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """One key block of softmax attention.

    q [Bq, H, Q, D]; k, v [Bq, H, K, D] (any strides); bias additive and finite (masked keys
    take a large finite negative such as -1e9, never -inf), broadcastable to [Bq, H, Q, K]
    (e.g. [1, H, Q, K] for the triangle bias shared by every row, [Bq, H, Q, K] for a
    pair-bias tile, [Bq, 1, 1, K] for a key mask); ``shared_bias`` says it is [1, H, Q, K].
    Scores = scale * q @ k^T + bias. Returns out [Bq, H, Q, D] in q.dtype (possibly a strided
    view) and lse [Bq, H, Q] in `compute_dtype(q.dtype)`; K == 0 gives out 0 and lse -inf.
    backend None -> `current_backend()`.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attend_block: q, k, v must be [B, H, S, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    bq, heads, nq, _ = q.shape
    nk = k.shape[2]
    ct = compute_dtype(q.dtype)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if nk == 0 or bq == 0 or nq == 0 or heads == 0:  # the CPU flash op crashes on empty blocks
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        return out, torch.full(q.shape[:3], float("-inf"), dtype=ct, device=q.device)
    if bias is not None:
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        # The CPU flash op's trap (lse = 0 for all -inf rows); not checked on CUDA, where the
        # test would cost a device sync per block.
        if bias.device.type == "cpu" and bias.numel() and torch.isneginf(bias.amin()):
            raise ValueError("attend_block: bias holds -inf; mask keys with a finite negative (e.g. -1e9)")
    name = resolve(backend, q.device, q.dtype)
    if name == "torch":
        return _torch_block(q, k, v, bias, scale)
    if q.device.type == "cpu":
        return _flash_cpu_block(q, k, v, bias, scale)
    cuda = _cuda_module(name)
    if name == "cueq":
        if shared_bias and cuda.cueq_available():
            return cuda.cueq_block(q, k, v, bias, scale=scale)
        _warn_once("cueq", "kernels.attention=cueq: cuEquivariance is not installed or the bias is "
                           "not shared by all rows; using the fused (SDPA efficient) kernel")
    return cuda.efficient_block(q, k, v, bias, scale=scale)


def _cuda_module(name: str):
    try:
        from boltz_cp.kernels import cuda
    except ImportError as e:
        raise ConfigError(f"kernels.attention={name} on CUDA needs boltz_cp/kernels/cuda.py, which "
                          f"cannot be imported ({e}); use kernels.attention=torch") from None
    return cuda


def _torch_block(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float):
    """Materialised reference: one [Bq, H, Q, K] score block in the compute dtype."""
    ct = compute_dtype(q.dtype)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2))
    if scale != 1.0:
        s.mul_(scale)
    if bias is not None:
        s.add_(bias.to(ct))
    m = s.amax(dim=-1, keepdim=True)
    p = s.sub_(m).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v.to(ct)).div_(denom)
    return out.to(q.dtype), (m + denom.log()).squeeze(-1)


def _flash_cpu_block(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float):
    """CPU flash op: the bias is read with stride 0 along broadcast dims, never expanded."""
    if bias is not None:
        # The op takes a mask in q's dtype, or fp32 for half-precision queries.
        want = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
        bias = bias.to(want)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    return out, lse.to(compute_dtype(q.dtype))
