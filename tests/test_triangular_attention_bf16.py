"""Triangle attention under bf16-mixed: operands and ring messages in bf16, fp32 runs untouched.

Tier: gloo CPU (2x2, tiny widths: bytes on the wire and the bf16-mixed verdict against
upstream's serial bf16 run) and no process group beyond a 1x1 mesh (kernel operand dtypes).
"""

import pytest
import torch

from boltz_cp.layers import triangular_attention as cp

NAMES = ["triatt_start", "triatt_end"]


def _setup(mesh, name, n):
    from boltz_cp.distributed import TokenLayout
    from boltz_cp.parity.reference import randomize_
    from boltz_cp.parity.runner import LAYER_WIDTHS, load_cases

    case, pre = load_cases()[name], LAYER_WIDTHS["tiny"]
    gen = torch.Generator().manual_seed(0)
    upstream = randomize_(case.build(pre), gen).float().eval()
    inputs = {k: v.float() for k, v in case.inputs(n, pre, gen).items()}
    return case.cp_twin(upstream), inputs, TokenLayout(n, mesh)


def _bf16_bytes_and_verdict(mesh, name, n):
    from boltz_cp.distributed import comm_counters, reset_comm_counters
    from boltz_cp.parity.runner import run_case

    module, x, layout = _setup(mesh, name, n)
    z, mask = layout.shard_pair(x["z"]), layout.shard_pair(x["mask"])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        reset_comm_counters()
        module(z, mask, layout)
        sent = comm_counters()["bytes_sent"]
    verdict = run_case(name, mesh, n, dtype="bf16-mixed")
    return mesh.coord, sent, verdict.passed and not verdict.skipped, verdict.detail


@pytest.mark.parametrize("name", NAMES)
def test_bf16_mixed_wire_is_bf16_and_verdict_holds(run_on_mesh, name):
    n, p, heads, width = 37, 2, 2, 8  # tiny widths: 2 heads x 8
    tile_elems = (-(-n // (p * p)) * p) ** 2  # elements of one channel of a padded tile
    for (r, c), sent, ok, detail in run_on_mesh(_bf16_bytes_and_verdict, p, p, name, n):
        # kv: p - 1 ring shifts; bias: transpose (off the diagonal) + all_gather (p - 1 tiles)
        kv_msgs, bias_msgs = p - 1, (p - 1) + (r != c)
        # 2 bytes per element: k|v|mask and the bias travel in bf16
        assert sent == 2 * tile_elems * (kv_msgs * (2 * heads * width + 1) + bias_msgs * heads), (r, c)
        assert ok, detail


def _kernel_dtypes(mesh, name, autocast):
    module, x, layout = _setup(mesh, name, 16)
    seen = []
    real = cp.attend_block

    def spy(q, k, v, bias, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, bias.dtype))
        return real(q, k, v, bias, **kw)

    cp.attend_block = spy
    try:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(layout.shard_pair(x["z"]), layout.shard_pair(x["mask"]), layout).to_local()
    finally:
        cp.attend_block = real
    return set(seen), out.dtype


@pytest.mark.parametrize("name", NAMES)
def test_operand_dtypes(run_on_mesh, name):
    """fp32 without autocast: every kernel operand fp32 (behaviour as before); bf16-mixed:
    q, k, v bf16, the bias (and the state) fp32; the output keeps x's dtype."""
    f32, bf = torch.float32, torch.bfloat16
    seen, out_dtype = run_on_mesh(_kernel_dtypes, 1, 1, name, False)[0]
    assert seen == {(f32, f32, f32, f32)} and out_dtype == f32
    seen, out_dtype = run_on_mesh(_kernel_dtypes, 1, 1, name, True)[0]
    assert seen == {(bf, bf, bf, f32)} and out_dtype == f32
