"""Boltz-2 end to end on the CP mesh (`Boltz2CP`: trunk, diffusion sampling, confidence) vs
upstream `Boltz2.forward` with the same weights and seed.

Tier: no process group (state-dict keys); gloo CPU 1x1 / 2x2 / 3x3 in float64 on the real
featurized input of the trunk case (boltz_cp/parity/cases/model.py): the sampled coordinates of
2 samples after 5 steps, pLDDT, PAE, PDE, pTM, ipTM and the per-chain-pair ipTM all to round-off;
the same with every steering potential on, on the input's forced variant (`model_potentials`).
"""

from __future__ import annotations

import pytest

from parity_helpers import assert_parity


@pytest.mark.parametrize("side", [1, 2, 3])
def test_model_parity_float64(run_on_mesh, side):
    line = assert_parity(run_on_mesh, "model", side, 0, timeout=300)
    assert " tokens=28 " in line, line


@pytest.mark.parametrize("side", [1, 2, 3])
def test_model_potentials_parity_float64(run_on_mesh, side):
    line = assert_parity(run_on_mesh, "model_potentials", side, 0, timeout=300)
    assert " tokens=28 " in line, line


def test_potentials_steer_the_reference():
    """Not vacuous: on the forced input, upstream's coordinates with the potentials on differ from
    those without them."""
    import torch

    from boltz_cp.parity.cases.trunk import featurized_input
    from boltz_cp.parity.reference import fp64_reference, randomize_
    from boltz_cp.parity.runner import load_cases

    cases = load_cases()
    coords = []
    for case in (cases["model_potentials"], cases["model"]):
        model = randomize_(case.build("tiny").double(), torch.Generator().manual_seed(0)).eval()
        with fp64_reference(), torch.no_grad():
            coords.append(case.serial(model, dict(featurized_input(forced=True)))["sample_atom_coords"])
    assert (coords[0] - coords[1]).abs().max() > 1.0


def test_model_state_dict_is_upstreams():
    """Every key of upstream Boltz2 (tiny preset: no affinity) loads strictly, none is added."""
    from boltz_cp.models.boltz2 import Boltz2CP
    from boltz_cp.models.checkpoint import build_model
    from boltz_cp.models.presets import PRESETS

    model = build_model(PRESETS["tiny"])
    cp = Boltz2CP.from_upstream(model)
    assert sorted(cp.state_dict()) == sorted(model.state_dict())
