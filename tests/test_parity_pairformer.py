"""Whole pairformer blocks on tiles vs upstream. Tier: gloo CPU, 1x1 / 2x2 / 3x3."""

import pytest

from parity_helpers import assert_parity


@pytest.mark.parametrize("side", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 37, 64])
def test_pairformer_layer(run_on_mesh, side, n):
    assert_parity(run_on_mesh, "pairformer_layer", side, n)


@pytest.mark.parametrize("side", [1, 2, 3])
def test_pairformer_module(run_on_mesh, side):
    assert_parity(run_on_mesh, "pairformer", side, 37)


@pytest.mark.parametrize("side", [2, 3])
def test_pairformer_noseq_module(run_on_mesh, side):
    assert_parity(run_on_mesh, "pairformer_noseq", side, 37)


def test_pairformer_float32_full_width(run_on_mesh):
    assert_parity(run_on_mesh, "pairformer_layer", 2, 64, dtype="float32", preset="full", timeout=300)


def test_state_dict_keys_match_upstream():
    import torch
    from boltz.model.layers import pairformer as up

    from boltz_cp.layers import pairformer as cp

    torch.manual_seed(0)
    ref = up.PairformerModule(32, 16, 2, 4, 0.0, 8, 2, False, False, True)
    ours = cp.PairformerModule(32, 16, 2, 4, 0.0, 8, 2, False, False, True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
