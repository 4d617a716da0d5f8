"""The whole CP trunk (`Boltz2Trunk`) vs upstream `Boltz2` up to the distogram.

Tier: no process group (state-dict keys); gloo CPU 1x1 / 2x2 / 3x3 in float64 on a real
featurized input (two proteins with MSAs, DNA, a CCD ligand, a template, a pocket constraint;
see boltz_cp/parity/cases/trunk.py; the CP side reads `featurize_lean`'s compact features), and
the data path plus trunk on 2x2 at a few hundred tokens, which must allocate nothing with two
full-size token dims: neither the featurizing process nor any rank cutting its inputs and running
the trunk.
"""

from __future__ import annotations

import pytest
import torch

from data_fixtures import GUARD_TOKENS
from parity_helpers import assert_parity


@pytest.mark.parametrize("side", [1, 2, 3])
def test_trunk_parity_float64(run_on_mesh, side):
    line = assert_parity(run_on_mesh, "trunk", side, 0, timeout=300)
    assert " tokens=28 " in line, line  # the case's own input, padded unevenly on 3x3


def test_trunk_state_dict_is_upstreams():
    """Every trunk key of upstream Boltz2, and no other, loads strictly."""
    from boltz_cp.models.checkpoint import build_model
    from boltz_cp.models.presets import PRESETS
    from boltz_cp.models.trunk import TRUNK_MODULES, Boltz2Trunk

    model = build_model(PRESETS["tiny"])
    trunk = Boltz2Trunk.from_upstream(model)
    upstream_keys = [k for k in model.state_dict() if k.split(".")[0] in TRUNK_MODULES]
    assert list(trunk.state_dict()) == upstream_keys




def _guarded_trunk(mesh, feats):
    from boltz_cp.distributed import TokenLayout
    from boltz_cp.models.checkpoint import build_model
    from boltz_cp.models.presets import PRESETS
    from boltz_cp.models.trunk import Boltz2Trunk, TrunkInputs
    from boltz_cp.parity.guards import FullSizeGuard

    torch.manual_seed(0)
    trunk = Boltz2Trunk.from_upstream(build_model(PRESETS["tiny"])).float()
    layout = TokenLayout(feats["token_pad_mask"].shape[1], mesh)
    guard = FullSizeGuard(layout.n_padded)
    with torch.inference_mode(), guard:
        inputs = TrunkInputs.cut(feats, layout)
        out = trunk(inputs, layout, recycling_steps=1)
    finite = all(torch.isfinite(v.to_local()).all() for v in out.values())
    return guard.violations, finite


def test_trunk_allocates_no_full_size_tensor_on_2x2(run_on_mesh, guard_features):
    assert guard_features["token_pad_mask"].shape[1] == GUARD_TOKENS
    for rank, (violations, finite) in enumerate(run_on_mesh(_guarded_trunk, 2, 2, guard_features, timeout=300)):
        assert violations == [], f"rank {rank} allocated full-size tensors: {violations[:5]}"
        assert finite, f"rank {rank}: non-finite trunk output"


def test_trunk_guard_fires_on_1x1(run_on_mesh, guard_features):
    """Control: on 1x1 the tile is the whole N x N, so the same guard must report it."""
    ((violations, _),) = run_on_mesh(_guarded_trunk, 1, 1, guard_features, timeout=300)
    assert violations
