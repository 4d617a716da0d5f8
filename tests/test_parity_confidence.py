"""The CP confidence module (`boltz_cp.modules.confidence`) vs upstream ConfidenceModule.

Tier: no process group (state-dict keys); gloo CPU 1x1 / 2x2 / 3x3 in float64 on the real
featurized input of the `confidence` parity case (a one-token chain, a masked token, whole pad
tiles on 3x3, multiplicity 2; every upstream output compared, pair_chains_iptm per chain
pair); and a 2x2 forward at a few hundred tokens that must allocate nothing with two
full-size token dims on any rank (inputs made as tiles, features cut from `featurize_lean`).
"""

from __future__ import annotations

import pytest
import torch

from data_fixtures import GUARD_TOKENS
from parity_helpers import assert_parity


@pytest.mark.parametrize("side", [1, 2, 3])
def test_confidence_parity_float64(run_on_mesh, side):
    line = assert_parity(run_on_mesh, "confidence", side, 0, timeout=300)
    assert " tokens=28 " in line, line
    print(line)


def test_confidence_state_dict_is_upstreams():
    """Same keys, same order, as upstream's confidence_module; loads strictly."""
    from boltz_cp.models.checkpoint import build_model
    from boltz_cp.models.presets import PRESETS
    from boltz_cp.modules.confidence import ConfidenceModule

    model = build_model(PRESETS["tiny"])
    cp = ConfidenceModule.from_hparams(model.hparams)
    assert list(cp.state_dict()) == list(model.confidence_module.state_dict())
    cp.load_state_dict(model.confidence_module.state_dict(), strict=True)




def _guarded_confidence(mesh, feats, hparams):
    from boltz_cp.distributed import TokenLayout, pair_from_tile, single_from_local
    from boltz_cp.modules.confidence import ConfidenceInputs, ConfidenceModule
    from boltz_cp.parity.guards import FullSizeGuard
    from boltz_cp.parity.reference import randomize_

    module = randomize_(ConfidenceModule.from_hparams(hparams), torch.Generator().manual_seed(0)).float().eval()
    layout = TokenLayout(feats["token_pad_mask"].shape[1], mesh)
    n = layout.n_padded // mesh.rows
    r, _ = mesh.coord
    token_s = hparams["token_s"]
    token_z = hparams["token_z"]
    row_gen = torch.Generator().manual_seed(100 + r)  # SINGLE_BY_I replicas agree along a tile row
    tile_gen = torch.Generator().manual_seed(mesh.rank)
    s_inputs = single_from_local(torch.randn(1, n, token_s, generator=row_gen), mesh)
    s = single_from_local(torch.randn(1, n, token_s, generator=row_gen), mesh)
    z = pair_from_tile(torch.randn(1, n, n, token_z, generator=tile_gen), mesh)
    pdl = pair_from_tile(torch.randn(1, n, n, 64, generator=tile_gen), mesh)
    x_pred = 8 * torch.randn(2, feats["atom_pad_mask"].shape[1], 3, generator=torch.Generator().manual_seed(7))
    guard = FullSizeGuard(layout.n_padded)
    with torch.inference_mode(), guard:
        out = module(s_inputs, s, z, x_pred, ConfidenceInputs.cut(feats, layout), pdl, layout, multiplicity=2)
    finite = all(bool(torch.isfinite(v.to_local() if hasattr(v, "to_local") else v).all())
                 for k, v in out.items() if k != "pair_chains_iptm")
    return guard.violations, finite


def test_confidence_allocates_no_full_size_tensor_on_2x2(run_on_mesh, guard_features):
    from boltz_cp.models.checkpoint import build_model
    from boltz_cp.models.presets import PRESETS

    hparams = dict(build_model(PRESETS["tiny"]).hparams)
    assert guard_features["token_pad_mask"].shape[1] == GUARD_TOKENS
    results = run_on_mesh(_guarded_confidence, 2, 2, guard_features, hparams, timeout=300)
    for rank, (violations, finite) in enumerate(results):
        assert violations == [], f"rank {rank} allocated full-size tensors: {violations[:5]}"
        assert finite, f"rank {rank}: non-finite confidence output"


def test_confidence_guard_fires_on_1x1(run_on_mesh, guard_features):
    """Control: on 1x1 the tile is the whole N x N, so the same guard must report it."""
    from boltz_cp.models.checkpoint import build_model
    from boltz_cp.models.presets import PRESETS

    hparams = dict(build_model(PRESETS["tiny"]).hparams)
    ((violations, finite),) = run_on_mesh(_guarded_confidence, 1, 1, guard_features, hparams, timeout=300)
    assert violations and finite
