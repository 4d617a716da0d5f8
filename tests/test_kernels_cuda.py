"""The CUDA attention-block adapters (boltz_cp/kernels/cuda.py), driven on CPU by stand-ins.

`efficient_block` is run against a stand-in for `torch.ops.aten._scaled_dot_product_efficient_attention`
that enforces the op's documented contract (KERNELS.md 2.2: 4-D bias with the full sizes, bias
dtype == q dtype, bias stride(-1) == 1 and other strides aligned or 0, dense k/v, batch <= a
limit, LSE returned padded to a multiple of 32 with garbage in the pad) and computes in float64;
`cueq_block` against a stand-in for cuEquivariance's `triangle_attention` (bias exactly
[B, 1, H, Q, K] fp32, returns (out, lse, max)). Outputs must equal a materialised float64
reference of the same (dtype-rounded) inputs. The real kernels' numbers need a GPU: those tests
skip on CPU and `python scripts/gpu_check.py` runs them (and more) on one CUDA GPU.

Tier: no PG (CPU; the CUDA cases skip without a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

from boltz_cp.errors import ConfigError
from boltz_cp.kernels import cuda as kc

GPU_SKIP = "needs a CUDA GPU; run `python scripts/gpu_check.py` on a machine with one"
H, D = 4, 32


class FakeEfficient:
    """Stand-in for the efficient op: refuses what the CUDA op refuses, computes in float64."""

    def __init__(self, max_batch: int = 65535):
        self.max_batch = max_batch
        self.calls: list[dict] = []

    def __call__(self, query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0,
                 is_causal=False, *, scale=None):
        assert compute_log_sumexp is True and dropout_p == 0.0 and not is_causal
        for t in (query, key, value):
            assert t.dim() == 4 and t.dtype == query.dtype and t.stride(-1) == 1
        assert query.dtype in (torch.float32, torch.bfloat16, torch.float16), query.dtype
        assert query.shape[-1] % (16 // query.element_size()) == 0, "head dim alignment"
        b, h, m, _ = query.shape
        n = key.shape[2]
        assert b <= self.max_batch, f"batch {b} > {self.max_batch}"
        for t in (key, value):  # pytorch#191937: stride-0 k/v are wrong at kv_len = 1 mod 32
            assert all(st != 0 or sz == 1 for sz, st in zip(t.shape, t.stride())), t.stride()
        strides = None
        if attn_bias is not None:
            assert attn_bias.dim() == 4 and tuple(attn_bias.shape) == (b, h, m, n), attn_bias.shape
            assert attn_bias.dtype == query.dtype, "invalid dtype for bias - should match query's dtype"
            assert attn_bias.stride(3) == 1 and attn_bias.data_ptr() % 16 == 0
            align = 16 // query.element_size()
            for size, stride in zip(attn_bias.shape[:3], attn_bias.stride()[:3]):
                assert size <= 1 or stride % align == 0, attn_bias.stride()
            strides = attn_bias.stride()
        self.calls.append({"batch": b, "bias_strides": strides})
        s = (query.double() @ key.double().transpose(-1, -2)) * scale
        if attn_bias is not None:
            s = s + attn_bias.double()
        lse = torch.logsumexp(s, -1)
        out = (torch.softmax(s, -1) @ value.double()).to(query.dtype)
        padded = torch.full((b, h, -(-m // 32) * 32), float("nan"), dtype=torch.float32)
        padded[..., :m] = lse.float()
        return out, padded, torch.empty(()), torch.empty(())


def fake_triangle_attention(q, k, v, bias, mask=None, scale=None, return_aux=False):
    """Stand-in for cuequivariance_torch.triangle_attention (0.13, KERNELS.md 1.2)."""
    assert q.dim() == 5 and k.shape == v.shape and k.shape[:3] == q.shape[:3]
    b, n, h, m, _ = q.shape
    assert tuple(bias.shape) == (b, 1, h, m, k.shape[3]), bias.shape
    assert bias.dtype == torch.float32 and mask is None and return_aux
    s = (q.double() @ k.double().transpose(-1, -2)) * scale + bias.double()
    lse = torch.logsumexp(s, -1)
    out = (torch.softmax(s, -1) @ v.double()).to(q.dtype)
    return out, lse.float(), s.amax(-1).float()


def reference(q, k, v, bias, scale):
    """Materialised float64 block of the same inputs, the bias rounded as the kernel gets it."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def make(bq, nq, nk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(bq, H, n, D, generator=g).to(dtype) for n in (nq, nk, nk))
    return q, k, v, g


def check(out, lse, q, k, v, bias_as_kernel, scale):
    o_ref, l_ref = reference(q, k, v, bias_as_kernel, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.promote_types(q.dtype, torch.float32) and lse.shape == q.shape[:-1]
    tol = 1e-6 if q.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), o_ref.to(q.dtype).double(), atol=tol, rtol=0)
    torch.testing.assert_close(lse.double(), l_ref, atol=1e-5, rtol=0)


BIASES = {
    "shared [1,H,Q,K]": lambda bq, nq, nk, g: torch.randn(1, H, nq, nk, generator=g),
    "pair [Bq,H,Q,K]": lambda bq, nq, nk, g: torch.randn(bq, H, nq, nk, generator=g),
    "key mask [Bq,1,1,K]": lambda bq, nq, nk, g: torch.where(torch.rand(bq, 1, 1, nk, generator=g) < 0.3,
                                                              -1e9, 0.0),
    "3-D [H,Q,K]": lambda bq, nq, nk, g: torch.randn(H, nq, nk, generator=g),
    "none": lambda bq, nq, nk, g: None,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(BIASES))
def test_efficient_block_matches_fp64_reference(kind, dtype):
    q, k, v, g = make(5, 19, 37, dtype)  # K = 37: not a multiple of 16 (the bias gets padded)
    bias = BIASES[kind](5, 19, 37, g)
    op = FakeEfficient()
    out, lse = kc.efficient_block(q, k, v, bias, scale=D ** -0.5, op=op)
    check(out, lse, q, k, v, None if bias is None else bias.to(dtype), D ** -0.5)
    assert len(op.calls) == 1
    # broadcast dims reach the kernel with stride 0: nothing is materialised per row or head
    strides = op.calls[0]["bias_strides"]
    if kind.startswith(("shared", "3-D")):
        assert strides[0] == 0 and strides[1] != 0
    elif kind.startswith("key mask"):
        assert strides[0] != 0 and strides[1] == strides[2] == 0


def test_efficient_block_uses_an_aligned_bias_as_is():
    q, k, v, g = make(3, 8, 32, torch.float32)
    bias = torch.randn(1, H, 8, 32, generator=g)
    kb = kc.kernel_bias(bias, (3, H, 8, 32), torch.float32)
    assert kb.data_ptr() == bias.data_ptr() and kb.stride(0) == 0
    odd = torch.randn(1, H, 8, 33, generator=g)
    kb = kc.kernel_bias(odd, (3, H, 8, 33), torch.float32)
    assert kb.data_ptr() != odd.data_ptr() and kb.stride(2) == 48 and kb.stride(0) == 0
    torch.testing.assert_close(kb[2], odd[0], rtol=0, atol=0)
    wide = torch.randn(1, H, 8, 48, generator=g)
    view = wide[..., 1:17]  # aligned strides, start 4 bytes in: copied
    kb = kc.kernel_bias(view, (3, H, 8, 16), torch.float32)
    assert kb.data_ptr() != view.data_ptr() and kb.data_ptr() % 16 == 0
    torch.testing.assert_close(kb[0], view[0], rtol=0, atol=0)


def test_efficient_block_chunks_rows(monkeypatch):
    q, k, v, g = make(8, 16, 40, torch.float32, seed=1)
    bias = torch.randn(8, H, 16, 40, generator=g)
    with pytest.raises(AssertionError, match="batch 8 > 3"):  # the stand-in enforces its limit
        kc.efficient_block(q, k, v, bias, scale=0.3, op=FakeEfficient(max_batch=3))
    monkeypatch.setattr(kc, "MAX_BATCH", 3)
    op = FakeEfficient(max_batch=3)
    out, lse = kc.efficient_block(q, k, v, bias, scale=0.3, op=op)
    assert [c["batch"] for c in op.calls] == [3, 3, 2]
    check(out, lse, q, k, v, bias, 0.3)


def test_efficient_block_densifies_stride0_kv_at_kv_len_1_mod_32():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, H, 12, D, generator=g)
    k1, v1 = torch.randn(1, H, 33, D, generator=g), torch.randn(1, H, 33, D, generator=g)
    k, v = k1.expand(4, H, 33, D), v1.expand(4, H, 33, D)
    with pytest.raises(AssertionError):  # the stand-in refuses stride-0 k/v
        FakeEfficient()(q, k, v, None, True, scale=0.2)
    out, lse = kc.efficient_block(q, k, v, None, scale=0.2, op=FakeEfficient())
    check(out, lse, q, k, v, None, 0.2)


def test_efficient_block_transposed_q_view():
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(6, 20, H, D, generator=g)  # the [B*I, J, H, D] linear output
    q = flat.transpose(1, 2)  # [6, H, 20, D], strides (H*D*20, D, H*D, 1): no copy needed
    k, v = torch.randn(6, H, 20, D, generator=g), torch.randn(6, H, 20, D, generator=g)
    bias = torch.randn(1, H, 20, 20, generator=g)
    out, lse = kc.efficient_block(q, k, v, bias, scale=0.25, op=FakeEfficient())
    check(out, lse, q, k, v, bias, 0.25)
    q_t = torch.randn(6, H, D, 20, generator=g).transpose(-1, -2)  # last dim strided: copied
    out, lse = kc.efficient_block(q_t, k, v, bias, scale=0.25, op=FakeEfficient())
    check(out, lse, q_t, k, v, bias, 0.25)


def test_efficient_block_empty_key_block_is_minus_inf():
    q = torch.randn(2, H, 5, D)
    k = v = torch.randn(2, H, 0, D)
    op = FakeEfficient()
    out, lse = kc.efficient_block(q, k, v, torch.zeros(1, H, 5, 0), scale=1.0, op=op)
    assert not op.calls and torch.equal(out, torch.zeros_like(q))
    assert lse.dtype == torch.float32 and bool((lse == -math.inf).all())


@pytest.mark.parametrize("bad", ["dtype", "unexpanded", "last stride", "misaligned"])
def test_stand_in_enforces_the_bias_contract(bad):
    """The stand-in is only worth something if it refuses what the CUDA op refuses."""
    q, k, v, g = make(2, 8, 24, torch.float32)
    bias = torch.randn(2, H, 8, 24, generator=g)
    if bad == "dtype":
        bias = bias.double()
    elif bad == "unexpanded":
        bias = bias[:1]
    elif bad == "last stride":
        bias = torch.randn(2, H, 24, 8, generator=g).transpose(-1, -2)
    else:
        bias = torch.randn(2, H, 8, 26, generator=g)[..., :24]  # row stride 26: not 16-byte aligned
    with pytest.raises(AssertionError):
        FakeEfficient()(q, k, v, bias, True, scale=1.0)
    out, lse = kc.efficient_block(q, k, v, bias, scale=1.0, op=FakeEfficient())  # the adapter fixes it
    check(out, lse, q, k, v, bias.float(), 1.0)


def test_efficient_block_config_errors():
    q, k, v, _ = make(1, 4, 4, torch.float32)
    with pytest.raises(ConfigError, match="CUDA only"):
        kc.efficient_block(q, k, v, None, scale=1.0)
    with pytest.raises(ConfigError, match="not float64; use kernels.attention=torch"):
        kc.efficient_block(q.double(), k.double(), v.double(), None, scale=1.0, op=FakeEfficient())
    odd = torch.randn(1, H, 4, 12)  # fine in fp32 (12 % 4), not in bf16 (12 % 8)
    out, _ = kc.efficient_block(odd, odd, odd, None, scale=1.0, op=FakeEfficient())
    assert out.shape == odd.shape
    with pytest.raises(ConfigError, match="divisible by 8 in bfloat16, got 12"):
        kc.efficient_block(*(odd.bfloat16(),) * 3, None, scale=1.0, op=FakeEfficient())


def test_efficient_schema_is_the_one_documented():
    """The private op's schema is checked before use; it must match this torch's."""
    schema = str(torch.ops.aten._scaled_dot_product_efficient_attention.default._schema)
    assert " ".join(schema.split()) == " ".join(kc.EFFICIENT_SCHEMA.split())


# ----------------------------------------------------------------------------------------------
# cuEquivariance
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ["[1,H,Q,K]", "[H,Q,K]", "none"])
def test_cueq_block_reshapes_to_the_triangle_layout(shape, dtype):
    q, k, v, g = make(6, 24, 40, dtype, seed=4)
    bias = {"[1,H,Q,K]": torch.randn(1, H, 24, 40, generator=g), "[H,Q,K]": torch.randn(H, 24, 40, generator=g),
            "none": None}[shape]
    out, lse = kc.cueq_block(q, k, v, bias, scale=D ** -0.5, fn=fake_triangle_attention)
    check(out, lse, q, k, v, bias, D ** -0.5)  # cuEq keeps the bias in fp32


def test_cueq_block_refuses_a_per_row_bias_and_unsupported_dtypes():
    q, k, v, g = make(3, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="shared by all rows"):
        kc.cueq_block(q, k, v, torch.randn(3, H, 8, 8, generator=g), scale=1.0, fn=fake_triangle_attention)
    with pytest.raises(ConfigError, match="head dim"):
        kc.cueq_block(q.double(), k.double(), v.double(), None, scale=1.0, fn=fake_triangle_attention)
    wide = torch.randn(3, H, 8, 48, generator=g)
    with pytest.raises(ConfigError, match="D <= 32"):
        kc.cueq_block(wide, wide, wide, None, scale=1.0, fn=fake_triangle_attention)


def test_cueq_block_empty_key_block_is_minus_inf():
    q = torch.randn(2, H, 5, D)
    k = v = torch.randn(2, H, 0, D)
    out, lse = kc.cueq_block(q, k, v, None, scale=1.0, fn=None)  # never reaches the import
    assert torch.equal(out, torch.zeros_like(q)) and bool((lse == -math.inf).all())


@pytest.mark.skipif(kc._cueq_module() is not None, reason="cuequivariance_torch is installed here")
def test_cueq_missing_is_one_config_line():
    assert not kc.cueq_available()
    q, k, v, _ = make(1, 4, 4, torch.float32)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[cueq\]'") as e:
        kc.cueq_block(q, k, v, None, scale=1.0)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# The real kernels (GPU)
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_SKIP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["fused", "cueq"])
def test_real_kernels_on_cuda(backend, dtype):
    if backend == "cueq" and not kc.cueq_available():
        pytest.skip("cuequivariance_torch is not installed (pip install -e '.[cueq]')")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(16, H, 64, D, generator=g).to(dtype).cuda() for _ in range(3))
    k = k[:, :, :33].contiguous()
    v = v[:, :, :33].contiguous()  # kv_len = 1 mod 32
    bias = torch.randn(1, H, 64, 33, generator=g).cuda()
    fn = kc.efficient_block if backend == "fused" else kc.cueq_block
    out, lse = fn(q, k, v, bias, scale=D ** -0.5)
    as_kernel = bias.to(dtype) if backend == "fused" else bias
    o_ref, l_ref = reference(q, k, v, as_kernel, D ** -0.5)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), o_ref, atol=tol, rtol=0)
    torch.testing.assert_close(lse.double(), l_ref, atol=tol, rtol=0)
