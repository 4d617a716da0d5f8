"""Pair transition CP twin vs upstream Transition. Tier: gloo CPU, 1x1 / 2x2 / 3x3, float64."""

import pytest

from parity_helpers import assert_parity


@pytest.mark.parametrize("side", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 37])
def test_transition_z(run_on_mesh, side, n):
    assert_parity(run_on_mesh, "transition_z", side, n)
