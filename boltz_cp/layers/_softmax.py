"""Online (blockwise) softmax: attention over keys that arrive in blocks, merged exactly.

softmax(s) @ v over keys K = K_1 ∪ K_2 ∪ ... is computed block by block: each block gives a
partial (running max m, sum of exp l, exp-weighted values acc) and partials merge by
rescaling to a common max. After the last block, ``acc / l`` is the attention output and
``m + log(l)`` its log-sum-exp. The result equals the one-shot softmax up to round-off in any
block order (flash attention's recurrence, and the merge of ring / split-key partials).

All state is kept in at least float32 (`torch.promote_types(dtype, float32)`): float64 stays
float64, so a float64 run is exact against a float64 reference.

Shapes: scores [..., Q, K], values [..., K, D]; state max/sum [..., Q], acc [..., Q, D].
Queries that have seen no key (or only -inf scores) finalize to zeros, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: bf16/fp16 -> fp32, fp32 -> fp32, fp64 -> fp64."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class SoftmaxState:
    """Running (max, sum of exp, exp-weighted values) of a set of queries."""

    max: torch.Tensor  # [..., Q]
    sum: torch.Tensor  # [..., Q]
    acc: torch.Tensor  # [..., Q, D]

    @classmethod
    def empty(cls, batch_shape, q: int, d: int, dtype: torch.dtype,
              device: torch.device | None = None) -> "SoftmaxState":
        """The state of queries that have seen no key yet (max = -inf, sum = acc = 0)."""
        dtype = compute_dtype(dtype)
        shape = (*batch_shape, q)
        return cls(torch.full(shape, float("-inf"), dtype=dtype, device=device),
                   torch.zeros(shape, dtype=dtype, device=device),
                   torch.zeros((*shape, d), dtype=dtype, device=device))

    def __getitem__(self, idx) -> "SoftmaxState":
        """A view of some queries (index the batch dims): in-place merges write through."""
        return SoftmaxState(self.max[idx], self.sum[idx], self.acc[idx])

    def lse(self) -> torch.Tensor:
        """Log-sum-exp of the scores seen so far, [..., Q] (-inf where none)."""
        return self.max + torch.log(self.sum)


def partial_(scores: torch.Tensor, values: torch.Tensor) -> SoftmaxState:
    """The partial state of one key block: scores [..., Q, K], values [..., K, D].

    Overwrites `scores` with the unnormalised probabilities (when it is already in the compute
    dtype): the score block is the largest transient of an attention step, and a copy would
    double it.
    """
    dtype = compute_dtype(torch.promote_types(scores.dtype, values.dtype))
    p = scores.to(dtype)
    m = p.amax(dim=-1)
    p.sub_(_finite(m).unsqueeze(-1)).exp_()
    return SoftmaxState(m, p.sum(dim=-1), torch.matmul(p, values.to(dtype)))


def from_output(out: torch.Tensor, lse: torch.Tensor) -> SoftmaxState:
    """A state from a normalized output [..., Q, D] and its log-sum-exp [..., Q] (e.g. a
    partial computed elsewhere and gathered): max = lse, sum = 1, acc = out."""
    dtype = compute_dtype(out.dtype)
    lse = lse.to(dtype)
    one = torch.where(torch.isneginf(lse), 0.0, 1.0).to(dtype)
    return SoftmaxState(lse, one, out.to(dtype) * one.unsqueeze(-1))


def merge_(into: SoftmaxState, part: SoftmaxState) -> SoftmaxState:
    """Fold ``part`` into ``into`` in place (``into`` may be a view of a larger state)."""
    new_max = torch.maximum(into.max, part.max)
    ref = _finite(new_max)
    a = torch.exp(into.max - ref)
    b = torch.exp(part.max - ref)
    into.acc.mul_(a.unsqueeze(-1)).add_(part.acc * b.unsqueeze(-1))
    into.sum.mul_(a).add_(part.sum * b)
    into.max.copy_(new_max)
    return into


def merge(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """Out-of-place merge of two states."""
    out = SoftmaxState(a.max.clone(), a.sum.clone(), a.acc.clone())
    return merge_(out, b)


def finalize_(state: SoftmaxState) -> torch.Tensor:
    """softmax(scores) @ values, [..., Q, D]; zeros for queries that saw no key.

    Normalises `state.acc` in place and returns it (max and sum, hence `lse`, stay valid).
    """
    seen = state.sum > 0
    denom = torch.where(seen, state.sum, torch.ones_like(state.sum))
    return state.acc.div_(denom.unsqueeze(-1)).masked_fill_(~seen.unsqueeze(-1), 0.0)


def _finite(m: torch.Tensor) -> torch.Tensor:
    """-inf -> 0, so that exp(x - m) of an all -inf row is 0 rather than NaN."""
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)
