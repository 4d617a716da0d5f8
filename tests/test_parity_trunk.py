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

from parity_helpers import assert_parity


@pytest.mark.parametrize("side", [1, 2, 3])
def test_trunk_parity_float64(run_on_mesh, side):
    line = assert_parity(run_on_mesh, "trunk", side, 0, timeout=300)
    assert " tokens=28 " in line, line  # the case's own input, padded unevenly on 3x3


def test_trunk_state_dict_is_upstreams():
    """Every trunk key of upstream Boltz2, and no other, loads strictly."""
    from boltz_cp.models.checkpoint import PRESETS, build_model
    from boltz_cp.models.trunk import TRUNK_MODULES, Boltz2Trunk

    model = build_model(PRESETS["tiny"])
    trunk = Boltz2Trunk.from_upstream(model)
    upstream_keys = [k for k in model.state_dict() if k.split(".")[0] in TRUNK_MODULES]
    assert list(trunk.state_dict()) == upstream_keys


# A synthetic two-chain protein input: N = 404 tokens (n_padded 404 on 2x2), above every channel
# width of the tiny preset (the largest is atom_feature_dim 388), so only token dims can trip.
GUARD_TOKENS = 404


def _guarded_trunk(mesh, feats):
    from boltz_cp.distributed import TokenLayout
    from boltz_cp.models.checkpoint import PRESETS, build_model
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


@pytest.fixture(scope="module")
def guard_features(tmp_path_factory):
    """`featurize_lean` of the two-chain protein, itself run under the size guard (the
    featurizing process must not hold an N x N feature either); tensors only."""
    from boltz_cp.data.ccd import ensure_molecules
    from boltz_cp.data.features import featurize_lean
    from boltz_cp.data.inputs import ProcessedDirs, parse_target, write_processed
    from boltz_cp.data.synthetic import synthetic_proteins_yaml
    from boltz_cp.parity.guards import FullSizeGuard

    folder = tmp_path_factory.mktemp("trunk_guard")
    mol_dir = folder / "mols"
    ensure_molecules(mol_dir, [])
    path = folder / "two_chains.yaml"
    path.write_text(synthetic_proteins_yaml(GUARD_TOKENS, chains=2))
    dirs = ProcessedDirs(folder / "processed").make()
    record = write_processed(parse_target(path, mol_dir, 0), path, dirs)
    guard = FullSizeGuard(GUARD_TOKENS)
    with guard:
        batch = featurize_lean(record, dirs, mol_dir, seed=0)
    assert guard.violations == [], f"featurization allocated full-size tensors: {guard.violations[:5]}"
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def test_trunk_allocates_no_full_size_tensor_on_2x2(run_on_mesh, guard_features):
    assert guard_features["token_pad_mask"].shape[1] == GUARD_TOKENS
    for rank, (violations, finite) in enumerate(run_on_mesh(_guarded_trunk, 2, 2, guard_features, timeout=300)):
        assert violations == [], f"rank {rank} allocated full-size tensors: {violations[:5]}"
        assert finite, f"rank {rank}: non-finite trunk output"


def test_trunk_guard_fires_on_1x1(run_on_mesh, guard_features):
    """Control: on 1x1 the tile is the whole N x N, so the same guard must report it."""
    ((violations, _),) = run_on_mesh(_guarded_trunk, 1, 1, guard_features, timeout=300)
    assert violations
