"""TemplateV2Module (Boltz-2 template v2) on tiles vs upstream.

Tier: no process group (state-dict keys); gloo CPU 1x1 / 2x2 / 3x3 in float64 (parity with
T = 2 and T = 1, the row-chunked feature path, no communication outside the pairformer, no
full-size allocation, T = 0 refused), 2x2 float32 at Boltz-2 widths.
"""

from __future__ import annotations

import pytest
import torch

from parity_helpers import assert_parity, parity_on_mesh

C_Z, DIM = 16, 16


@pytest.mark.parametrize("case", ["template_module", "template_module_t1", "template_module_none"])
@pytest.mark.parametrize("side", [1, 2, 3])
@pytest.mark.parametrize("n", [7, 37])
def test_parity(run_on_mesh, case, side, n):
    print(assert_parity(run_on_mesh, case, side, n))


def test_float32_full_width_2x2(run_on_mesh):
    """C_z 128, template_dim 64, 4 x 32 triangle heads in float32 against the float64 oracle."""
    print(assert_parity(run_on_mesh, "template_module", 2, 24, dtype="float32", preset="full", timeout=240))


def _chunked_parity(mesh, n, chunk_pairs):
    from boltz_cp.modules import template

    default, template.CHUNK_PAIRS = template.CHUNK_PAIRS, chunk_pairs
    try:
        return parity_on_mesh(mesh, "template_module", n)
    finally:
        template.CHUNK_PAIRS = default


def test_feature_row_chunks(run_on_mesh):
    """The chunked path large tiles take: 80 pairs per chunk, T=2 x 19 columns -> 2 rows."""
    for line, passed in run_on_mesh(_chunked_parity, 2, 2, 37, 80):
        assert passed, line


def test_state_dict_keys_match_upstream():
    from boltz.model.modules.trunkv2 import TemplateV2Module as UpTemplate

    from boltz_cp.modules.template import TemplateV2Module

    args = (C_Z, DIM, 2, 0.0, 8, 2)
    ref, ours = UpTemplate(*args), TemplateV2Module(*args)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)


# -- helpers run on every rank ----------------------------------------------------------------

def _local_inputs(layout, templates=2):
    """My z and pair-mask tiles (nothing N x N is built) and the full per-token features."""
    from boltz_cp.distributed import pair_from_tile
    from boltz_cp.parity.cases.template import template_features

    mesh = layout.mesh
    g = torch.Generator().manual_seed(mesh.rank)
    ni, nj = layout.rows.stop - layout.rows.start, layout.cols.stop - layout.cols.start
    real_i, real_j = (~layout.is_pad(layout.rows)).double(), (~layout.is_pad(layout.cols)).double()
    z = pair_from_tile(torch.randn(1, ni, nj, C_Z, generator=g, dtype=torch.float64), mesh)
    pair_mask = pair_from_tile((real_i[:, None] * real_j[None, :])[None].clone(), mesh)
    feats = template_features(layout.n, templates, torch.Generator().manual_seed(0))  # same on every rank
    return z, feats, pair_mask


def _module(blocks):
    from boltz_cp.modules.template import TemplateV2Module
    from boltz_cp.parity.reference import randomize_

    module = TemplateV2Module(C_Z, DIM, blocks, 0.0, 8, 2)
    return randomize_(module, torch.Generator().manual_seed(0)).double().eval()


def _guarded_forward(mesh, n):
    from boltz_cp.distributed import TokenLayout
    from boltz_cp.parity.guards import FullSizeGuard

    layout = TokenLayout(n, mesh)
    module = _module(2)
    z, feats, pair_mask = _local_inputs(layout)
    guard = FullSizeGuard(layout.n_padded)
    with torch.inference_mode(), guard:
        u = module(z, feats, pair_mask, layout)
    assert torch.isfinite(u.to_local()).all()
    return guard.violations


# N=50 pads to 52 on 2x2: above every channel width but the 109 a_proj input channels and
# the transition's 64, which sit in a tensor's last dim next to tile-sized token dims.
GUARD_N = 50


def test_no_full_size_tensor_on_2x2(run_on_mesh):
    for rank, violations in enumerate(run_on_mesh(_guarded_forward, 2, 2, GUARD_N, timeout=240)):
        assert violations == [], f"rank {rank} allocated full-size tensors: {violations[:5]}"


def test_guard_fires_on_1x1(run_on_mesh):
    """Control: on 1x1 the tile is the whole N x N, so the same guard must report it."""
    (violations,) = run_on_mesh(_guarded_forward, 1, 1, GUARD_N, timeout=240)
    assert violations


def _communication_without_pairformer(mesh, n):
    from torch.distributed.tensor.debug import CommDebugMode

    from boltz_cp.distributed import TokenLayout, comm_counters, reset_comm_counters

    layout = TokenLayout(n, mesh)
    module = _module(0)  # everything but the pairformer's rings
    z, feats, pair_mask = _local_inputs(layout)
    reset_comm_counters()
    with torch.inference_mode(), CommDebugMode() as comm:
        module(z, feats, pair_mask, layout)
    return comm.get_total_counts(), sum(v for k, v in comm_counters().items() if k != "bytes_sent")


def test_features_and_aggregation_issue_no_communication(run_on_mesh):
    for collectives, p2p in run_on_mesh(_communication_without_pairformer, 2, 2, 10):
        assert (collectives, p2p) == (0, 0)


def _zero_templates(mesh):
    from boltz_cp.distributed import TokenLayout

    layout = TokenLayout(5, mesh)
    z, feats, pair_mask = _local_inputs(layout, templates=0)
    try:
        _module(1)(z, feats, pair_mask, layout)
    except ValueError as e:
        return str(e)
    return None


def test_zero_templates_refused(run_on_mesh):
    """Upstream fails on T = 0 as well; the featurizer always gives T >= 1."""
    (message,) = run_on_mesh(_zero_templates, 1, 1)
    assert message is not None and "at least one template" in message
