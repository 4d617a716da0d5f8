"""CUDA attention-block backends: PyTorch's memory-efficient SDPA op and cuEquivariance.

Both functions have `attend_block`'s contract (boltz_cp/kernels/attention.py): one key block of
softmax attention, q [Bq, H, Q, D], k/v [Bq, H, K, D], an additive finite bias broadcastable to
[Bq, H, Q, K], scores = scale * q @ k^T + bias; returns out [Bq, H, Q, D] in q.dtype and the
natural-log lse [Bq, H, Q] in the compute dtype (promote(q.dtype, float32)); K == 0 gives out 0
and lse -inf, so the online-softmax merge (boltz_cp/layers/_softmax.py) skips the block.

`efficient_block` adapts `torch.ops.aten._scaled_dot_product_efficient_attention` (private op;
schema checked before the first real call). What the op demands, and what this adapter does
(docs: KERNELS.md section 2.2):
  - bias 4-D with the full sizes [B, H, M, N], dtype == q.dtype, stride(-1) == 1, the other
    strides 128-bit aligned or 0 -> the bias is cast to q.dtype into a buffer of its own
    (unbroadcast) shape whose last dim is padded to a multiple of 16, then `expand`ed with
    stride 0 to [Bq, H, Q, K]: a bias shared by every row costs one [1, H, Q, K] copy, never
    one per row;
  - k/v with a stride-0 dim give wrong output at kv_len = 1 mod 32 (pytorch#191937) -> k/v
    are made dense when they are not;
  - batch (the CUDA grid's z dim) <= 65535 (pytorch#146704) -> rows are chunked;
  - lse comes back fp32 [B, H, ceil(M/32)*32] with garbage in the pad -> sliced to Q.
`cueq_block` calls cuEquivariance's `triangle_attention(..., return_aux=True)` (an optional
dependency, imported lazily; `pip install -e '.[cueq]'`), whose bias is exactly
[B, 1, H, Q, K]: one bias for all rows, which is what the triangle bias is.

Nothing here runs on CPU with the real ops: tests/test_kernels_cuda.py drives the adapters with
stand-ins that enforce the documented contracts; `python scripts/gpu_check.py` checks the
numbers on a GPU.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

from boltz_cp.errors import ConfigError

# Rows per call of the efficient op: its batch sits in the CUDA grid's z dimension.
MAX_BATCH = 65535
# The bias buffer's last dim is padded to this many elements (the public wrapper pads to 8;
# 16 keeps every row 128-bit aligned for fp32, bf16 and fp16 alike).
BIAS_PAD = 16

EFFICIENT_SCHEMA = (
    "aten::_scaled_dot_product_efficient_attention(Tensor query, Tensor key, Tensor value, "
    "Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., bool is_causal=False, *, "
    "float? scale=None) -> (Tensor output, Tensor log_sumexp, Tensor philox_seed, "
    "Tensor philox_offset)"
)

INSTALL_CUEQ = ("pip install -e '.[cueq]' (cuequivariance-torch and cuequivariance-ops-torch-cu12, "
                "CUDA only; torch >= 2.11)")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _empty_block(q: Tensor) -> tuple[Tensor, Tensor]:
    """A block with no key: out 0, lse -inf (the merge's "nothing here")."""
    out = q.new_zeros(q.shape)
    lse = torch.full(q.shape[:-1], -math.inf, dtype=_compute_dtype(q.dtype), device=q.device)
    return out, lse


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention block wants 4-D q, k, v [Bq, H, *, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"attention block shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")


# ----------------------------------------------------------------------------------------------
# PyTorch memory-efficient attention
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _efficient_op() -> Callable:
    """The real op, after checking its schema is the one this adapter was written for."""
    try:
        op = torch.ops.aten._scaled_dot_product_efficient_attention
        schema = str(op.default._schema)
    except (AttributeError, RuntimeError):
        raise ConfigError(f"torch {torch.__version__} has no _scaled_dot_product_efficient_attention; "
                          "use kernels.attention=torch") from None
    if " ".join(schema.split()) != " ".join(EFFICIENT_SCHEMA.split()):
        raise ConfigError(f"torch {torch.__version__} changed _scaled_dot_product_efficient_attention's "
                          "signature; use kernels.attention=torch")
    return op


def _aligned(t: Tensor) -> bool:
    """Can `t` go to the kernel as it is: 16-byte aligned start, last dim contiguous, other
    strides 0 or multiples of BIAS_PAD."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all(size == 1 or stride == 0 or stride % BIAS_PAD == 0
               for size, stride in zip(t.shape[:-1], t.stride()[:-1]))


def kernel_bias(bias: Tensor | None, shape: tuple[int, int, int, int], dtype: torch.dtype) -> Tensor | None:
    """The bias as the efficient op takes it: `dtype`, exactly `shape` [Bq, H, Q, K], last dim
    contiguous, broadcast dims with stride 0 (never materialised per row), the other strides
    from a buffer whose last dim is padded to a multiple of BIAS_PAD."""
    if bias is None:
        return None
    if bias.dim() > 4:
        raise ValueError(f"attention bias has {bias.dim()} dims; it must broadcast to {list(shape)}")
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    try:
        torch.broadcast_shapes(bias.shape, shape)
    except RuntimeError:
        raise ValueError(f"attention bias {list(bias.shape)} does not broadcast to {list(shape)}") from None
    if bias.dtype == dtype and bias.shape[-1] == shape[-1] and _aligned(bias):
        return bias.expand(shape)
    own = tuple(bias.shape[:3]) + (shape[-1],)  # keep broadcast dims at 1; the key dim is real
    padded = -(-shape[-1] // BIAS_PAD) * BIAS_PAD
    buf = torch.empty(own[:3] + (padded,), dtype=dtype, device=bias.device)[..., : shape[-1]]
    buf.copy_(bias.expand(own))
    return buf.expand(shape)


def _dense(t: Tensor) -> Tensor:
    """k/v without stride-0 dims or a strided last dim (pytorch#191937: wrong results otherwise)."""
    if t.stride(-1) == 1 and all(st != 0 or sz == 1 for sz, st in zip(t.shape, t.stride())):
        return t
    return t.contiguous()


def efficient_block(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, *, scale: float,
                    op: Callable | None = None) -> tuple[Tensor, Tensor]:
    """One key block through `torch.ops.aten._scaled_dot_product_efficient_attention`.

    Same contract as `attend_block` (module docstring). `op=None` uses the real op (CUDA only;
    fp32, bf16, fp16); tests pass a stand-in with its signature and contract. Rows are sent in
    chunks of at most MAX_BATCH. Returns out in q.dtype and lse in promote(q.dtype, float32).
    """
    _check_shapes(q, k, v)
    if k.shape[2] == 0:
        return _empty_block(q)
    if q.numel() == 0:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:-1], dtype=_compute_dtype(q.dtype))
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"kernels.attention=fused on CUDA runs float32, bfloat16 and float16, not "
                          f"{str(q.dtype).replace('torch.', '')}; use kernels.attention=torch")
    if q.shape[-1] % (16 // q.element_size()):
        raise ConfigError(f"kernels.attention=fused on CUDA needs a head dim divisible by "
                          f"{16 // q.element_size()} in {str(q.dtype).replace('torch.', '')}, got {q.shape[-1]}")
    if op is None:
        if q.device.type != "cuda":
            raise ConfigError(f"the efficient attention op runs on CUDA only, got {q.device.type} tensors")
        op = _efficient_op()
    bq, h, nq, _ = q.shape
    nk = k.shape[2]
    kb = kernel_bias(bias, (bq, h, nq, nk), q.dtype)
    q = q if q.stride(-1) == 1 else q.contiguous()  # a transposed [B, Q, H, D] view needs no copy
    k, v = _dense(k), _dense(v)
    outs, lses = [], []
    for start in range(0, bq, MAX_BATCH):
        rows = slice(start, min(start + MAX_BATCH, bq))
        out, lse = op(q[rows], k[rows], v[rows], None if kb is None else kb[rows], True, scale=scale)[:2]
        outs.append(out)
        lses.append(lse[..., :nq])
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, 0)
    return out.to(q.dtype), lse.to(_compute_dtype(q.dtype))


# ----------------------------------------------------------------------------------------------
# cuEquivariance triangle attention
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cueq_module():
    """cuequivariance_torch, or None when it does not import (not installed, no CUDA build)."""
    try:
        import cuequivariance_torch
    except Exception:  # noqa: BLE001 -- any import failure means "not available"
        return None
    return cuequivariance_torch


def cueq_available() -> bool:
    """CUDA is available and cuequivariance_torch imports."""
    return torch.cuda.is_available() and _cueq_module() is not None


def cueq_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """cuEquivariance's forward limits with return_aux=True (KERNELS.md 1.2): fp32 needs
    D <= 32 and D % 4 == 0; bf16/fp16 D <= 128 and D % 8 == 0; nothing else runs."""
    if dtype == torch.float32:
        return head_dim <= 32 and head_dim % 4 == 0
    if dtype in (torch.bfloat16, torch.float16):
        return head_dim <= 128 and head_dim % 8 == 0
    return False


def cueq_block(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, *, scale: float,
               fn: Callable | None = None) -> tuple[Tensor, Tensor]:
    """One key block through cuEquivariance's `triangle_attention`, the bias shared by all rows.

    Same contract as `attend_block`, with bias [1, H, Q, K] (or anything broadcastable to it, or
    None) the same for every row. Reshapes to the triangle layout q [1, Bq, H, Q, D],
    bias [1, 1, H, Q, K] fp32, calls `triangle_attention(q, k, v, bias, mask=None, scale=scale,
    return_aux=True)` and drops its `max`. `fn=None` uses cuequivariance_torch's function
    (ConfigError if it is not installed); tests pass a stand-in.
    """
    _check_shapes(q, k, v)
    if k.shape[2] == 0:
        return _empty_block(q)  # cuEq's own fallback would say lse 0 here
    if fn is None:
        mod = _cueq_module()
        if mod is None or not torch.cuda.is_available():
            raise ConfigError(f"kernels.attention=cueq needs cuEquivariance on CUDA: {INSTALL_CUEQ}")
        fn = mod.triangle_attention
    if not cueq_supports(q.dtype, q.shape[-1]):
        raise ConfigError(f"kernels.attention=cueq cannot run {q.dtype} with head dim {q.shape[-1]} "
                          "(fp32: D <= 32, D % 4 == 0; bf16/fp16: D <= 128, D % 8 == 0)")
    _, h, nq, _ = q.shape
    nk = k.shape[2]
    if bias is None:
        tri = torch.zeros(1, 1, h, nq, nk, dtype=torch.float32, device=q.device)
    else:
        b = bias.reshape((1,) * max(0, 4 - bias.dim()) + tuple(bias.shape))
        if b.dim() != 4 or b.shape[0] != 1:
            raise ValueError(f"cueq_block takes one bias shared by all rows, [1, H, Q, K]; got {list(bias.shape)}")
        tri = b.expand(1, h, nq, nk).to(torch.float32).contiguous()[:, None]
    out, lse, _ = fn(q[None], k[None], v[None], tri, mask=None, scale=scale, return_aux=True)
    return out[0].to(q.dtype), lse[0].to(_compute_dtype(q.dtype))
