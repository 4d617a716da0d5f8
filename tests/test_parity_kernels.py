"""The attention layer cases under the non-default attention kernel.

Every other parity test runs the default `kernels.attention=auto`, i.e. the fused CPU flash op
(1x1, 2x2, 3x3 in the layer tests, 2x3 in tests/test_parity_rectangular.py). Here the torch
backend (materialised scores, the reference) runs the cases that score attention: triangle
attention (both nodes), attention with pair bias, and the diffusion step (token transformer and
atom windows), on 1x1, 2x2, 3x3 and 2x3.

Tier: gloo CPU (float64 parity at default tolerance, tiny widths, N=37).
"""

from __future__ import annotations

import pytest

CASES = ["triatt_start", "triatt_end", "attention_pair_bias", "diffusion_step"]


def _cases_with_backend(mesh, backend, names, n):
    import torch

    from boltz_cp.kernels import attention, use_backend
    from boltz_cp.parity.runner import run_case

    with use_backend(backend):
        assert attention.resolve(None, "cpu", torch.float64) == backend
        return [(r.line(), r.passed) for r in (run_case(name, mesh, n) for name in names)]


@pytest.mark.parametrize("mesh", [(1, 1), (2, 2), (3, 3), (2, 3)], ids=lambda m: f"{m[0]}x{m[1]}")
def test_attention_cases_with_torch_backend(run_on_mesh, mesh):
    results = run_on_mesh(_cases_with_backend, *mesh, "torch", CASES, 37, timeout=300)
    assert all(r == results[0] for r in results), "ranks disagree"
    assert len(results[0]) == len(CASES)
    for line, passed in results[0]:
        assert passed, line
