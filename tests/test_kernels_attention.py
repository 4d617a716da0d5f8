"""attend_block (boltz_cp/kernels/attention.py): every CPU backend against an fp64 reference.

Tier: no process group (CPU; one small subprocess per backend for the peak-memory test).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from boltz_cp.errors import ConfigError
from boltz_cp.kernels import attention as ka
from boltz_cp.layers import _softmax

CPU_BACKENDS = ["torch", "fused"]
# Max abs error against fp64 of out and lse, per dtype (observed: fp32 ~3e-7, bf16 ~1e-2).
TOL = {torch.float64: 1e-12, torch.float32: 5e-6, torch.bfloat16: 6e-2}


def _inputs(bq=3, h=2, q=5, k=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q as a strided view, the way the layers hand it over ([B, Q, H, D] linear output, permuted).
    qv = torch.randn(bq, q, h, d, generator=g, dtype=torch.float64).permute(0, 2, 1, 3)
    kv = torch.randn(2, bq, h, k, d, generator=g, dtype=torch.float64)
    return qv, kv[0], kv[1], g


def _reference(q, k, v, bias, scale):
    s = scale * q.double() @ k.double().transpose(-1, -2)
    if bias is not None:
        s = s + bias.double()
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def _bias(kind, g, bq, h, q, k):
    if kind == "none":
        return None
    if kind == "shared":
        return torch.randn(1, h, q, k, generator=g, dtype=torch.float64)
    if kind == "per_row":
        return torch.randn(bq, h, q, k, generator=g, dtype=torch.float64)
    if kind == "key_mask":  # a per-row key mask, finite
        return torch.where(torch.rand(bq, 1, 1, k, generator=g) < 0.3, -1e9, 0.0).double()
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["none", "shared", "per_row", "key_mask"])
def test_block_matches_fp64_reference(backend, dtype, kind):
    q, k, v, g = _inputs()
    bias = _bias(kind, g, *q.shape[:3], k.shape[2])
    scale = 1 / math.sqrt(q.shape[-1])
    ref_out, ref_lse = _reference(q, k, v, bias, scale)
    bias_in = None if bias is None else bias.to(torch.float32 if dtype == torch.bfloat16 else dtype)
    out, lse = ka.attend_block(q.to(dtype), k.to(dtype), v.to(dtype), bias_in, scale=scale,
                               shared_bias=kind == "shared", backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == ka.compute_dtype(dtype)
    assert float((out.double() - ref_out).abs().max()) < TOL[dtype]
    assert float(((lse.double() - ref_lse).abs() / ref_lse.abs().clamp_min(1.0)).max()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_equals_torch_backend(dtype):
    q, k, v, g = _inputs(bq=4, h=3, q=9, k=13, d=16, seed=1)
    bias = torch.randn(1, 3, 9, 13, generator=g, dtype=dtype)
    args = (q.to(dtype), k.to(dtype), v.to(dtype), bias)
    out_f, lse_f = ka.attend_block(*args, scale=0.25, backend="fused")
    out_t, lse_t = ka.attend_block(*args, scale=0.25, backend="torch")
    torch.testing.assert_close(out_f, out_t)
    torch.testing.assert_close(lse_f, lse_t)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lse_merge_of_split_blocks_equals_one_shot(backend, dtype):
    """Keys split into uneven blocks, one of them empty and one with all its keys masked, merged
    with the online softmax by (out, lse) alone, in a shuffled order."""
    q, k, v, g = _inputs(bq=2, h=2, q=6, k=20, d=8, seed=2)
    bias = torch.randn(1, 2, 6, 20, generator=g, dtype=torch.float64)
    bias[..., 12:15] = -1e9  # keys 12..14 masked for every query: that block is fully masked
    scale = 0.3
    ref_out, ref_lse = _reference(q, k, v, bias, scale)
    state = _softmax.SoftmaxState.empty((2, 2), 6, 8, dtype)
    for lo, hi in [(15, 20), (0, 5), (12, 15), (7, 7), (5, 12)]:
        out, lse = ka.attend_block(q.to(dtype), k[:, :, lo:hi].to(dtype), v[:, :, lo:hi].to(dtype),
                                   bias[..., lo:hi].to(dtype), scale=scale, shared_bias=True, backend=backend)
        if hi == lo:
            assert (out == 0).all() and torch.isneginf(lse).all()
        if (lo, hi) == (12, 15):  # never the flash op's all -inf trap (lse = 0)
            assert (lse < -1e8).all()
        _softmax.merge_(state, _softmax.from_output(out, lse))
    lse = state.lse()
    out = _softmax.finalize_(state)
    tol = 1e-12 if dtype == torch.float64 else 5e-6
    assert float((out.double() - ref_out).abs().max()) < tol
    assert float((lse.double() - ref_lse).abs().max()) < tol


def test_broadcast_bias_equals_expanded():
    q, k, v, g = _inputs(bq=3, h=2, q=4, k=6, d=8, seed=3)
    bias = torch.randn(1, 2, 4, 6, generator=g, dtype=torch.float64)
    a = ka.attend_block(q, k, v, bias, scale=0.5, backend="fused")
    b = ka.attend_block(q, k, v, bias.expand(3, 2, 4, 6), scale=0.5, backend="fused")
    c = ka.attend_block(q, k, v, bias.expand(3, 2, 4, 6).contiguous(), scale=0.5, backend="torch")
    for x, y in [(a, b), (a, c)]:
        torch.testing.assert_close(x[0], y[0])
        torch.testing.assert_close(x[1], y[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_and_minus_inf(backend):
    q, k, v, _ = _inputs()
    out, lse = ka.attend_block(q, k[:, :, :0], v[:, :, :0], None, scale=1.0, backend=backend)
    assert out.shape == q.shape and (out == 0).all() and torch.isneginf(lse).all()
    bias = torch.zeros(1, 1, 1, k.shape[2], dtype=torch.float64)
    bias[..., 0] = float("-inf")
    with pytest.raises(ValueError, match="-inf"):
        ka.attend_block(q, k, v, bias, scale=1.0, backend=backend)


def test_backend_setting():
    assert ka.current_backend() == "auto"
    with pytest.raises(ConfigError, match="kernels.attention"):
        ka.set_backend("flash")
    with ka.use_backend("torch"):
        assert ka.current_backend() == "torch"
        assert ka.resolve(None, "cpu", torch.float32) == "torch"
    assert ka.current_backend() == "auto"
    assert ka.resolve(None, "cpu", torch.float32) == "fused"  # auto picks the CPU flash op
    assert ka.resolve("fused", "cuda", torch.float64) == "torch"  # no fp64 efficient kernel
    assert ka.resolve("cueq", "cuda", torch.float32) == "cueq"
    with pytest.warns(RuntimeWarning, match="CUDA only"):
        assert ka.resolve("cueq", "cpu", torch.float32) == "fused"


def test_unknown_schema_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(ka, "_FLASH_CPU_ARGS", ka._FLASH_CPU_ARGS[:-1])
    monkeypatch.setattr(ka, "_flash_cpu_ok", None)
    monkeypatch.setattr(ka, "_warned", set())
    with pytest.warns(RuntimeWarning, match="schema"):
        assert ka.resolve("fused", "cpu", torch.float32) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ka.resolve("auto", "cpu", torch.float32) == "torch"  # auto: silently


_PEAK = textwrap.dedent("""
    import sys, torch
    from boltz_cp.kernels import attend_block
    torch.set_num_threads(1)
    R, H, Q, K, D = 16, 4, 256, 256, 32
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    def make(r):
        g = torch.Generator().manual_seed(0)
        return [torch.randn(r, H, n, D, generator=g) for n in (Q, K, K)] + [torch.randn(1, H, Q, K, generator=g)]
    attend_block(*make(1), scale=0.2, backend=sys.argv[1])  # warm up the libraries
    args = make(R)
    before = hwm()
    out, lse = attend_block(*args, scale=0.2, backend=sys.argv[1])
    print(hwm() - before)
""")


def test_fused_allocates_no_score_block():
    """VmHWM growth of one call on a [16, 4, 256, 256] block (fp32 scores: 16 MiB, output: 2 MiB)
    in a fresh process per backend: the torch backend holds the score block, fused never does."""
    score = 16 * 4 * 256 * 256 * 4
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    peak = {}
    for backend in CPU_BACKENDS:
        r = subprocess.run([sys.executable, "-c", _PEAK, backend], capture_output=True, text=True,
                           timeout=120, env=env, check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        peak[backend] = int(r.stdout.split()[-1])
    assert peak["torch"] >= score, peak
    assert peak["fused"] < score // 2, peak
