"""Trunk pair init (relative position encoding, outer sum) and distogram head vs upstream.

Tier: no process group (state-dict keys); gloo CPU 1x1 / 2x2 / 3x3 in float64 (parity, pad
finiteness, message counts), 2x2 float32 at Boltz-2 widths, and 1x2. Other rectangular meshes:
tests/test_parity_rectangular.py.
"""

from __future__ import annotations

import pytest
import torch

from parity_helpers import assert_parity, parity_on_mesh

C_S, C_Z = 32, 16  # the runner's `tiny` preset


@pytest.mark.parametrize("case", ["relpos", "relpos_cyclic", "pair_init", "distogram"])
@pytest.mark.parametrize("side", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 37])
def test_parity(run_on_mesh, case, side, n):
    print(assert_parity(run_on_mesh, case, side, n))


def test_float32_full_width_2x2(run_on_mesh):
    """Boltz-2 widths (C_s 384, C_z 128) in float32, judged against the float64 oracle."""
    for case in ("pair_init", "distogram"):
        print(assert_parity(run_on_mesh, case, 2, 45, dtype="float32", preset="full"))


def _chunked_parity(mesh, name, n, chunk_pairs):
    from boltz_cp.modules import encodersv2

    default, encodersv2.CHUNK_PAIRS = encodersv2.CHUNK_PAIRS, chunk_pairs
    try:
        return parity_on_mesh(mesh, name, n)
    finally:
        encodersv2.CHUNK_PAIRS = default


def test_relpos_row_chunks(run_on_mesh):
    """The chunked path large tiles take: 10 pairs per chunk, 20 columns -> 1 row per chunk."""
    for line, passed in run_on_mesh(_chunked_parity, 2, 2, "relpos_cyclic", 37, 10):
        assert passed, line


def test_relpos_parity_on_rectangular_mesh(run_on_mesh):
    """No communication, so any mesh works: 1x2, N=9 (padded to 10, one pad column)."""
    for line, passed in run_on_mesh(parity_on_mesh, 1, 2, "relpos_cyclic", 9):
        assert passed, line


def test_state_dict_keys_match_upstream():
    from boltz.model.modules.encodersv2 import RelativePositionEncoder as UpRelPos
    from boltz.model.modules.trunkv2 import DistogramModule as UpDistogram

    from boltz_cp.modules.encodersv2 import RelativePositionEncoder
    from boltz_cp.modules.heads import DistogramModule

    for ref, ours in ((UpRelPos(C_Z, fix_sym_check=True, cyclic_pos_enc=True),
                       RelativePositionEncoder(C_Z, fix_sym_check=True, cyclic_pos_enc=True)),
                      (UpDistogram(C_Z, 64), DistogramModule(C_Z, 64))):
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)


# -- helpers run on every rank ----------------------------------------------------------------

def _setup(mesh, n, seed=0):
    """Upstream-weighted CP modules (fp64), full inputs and the layout."""
    from boltz_cp.distributed import TokenLayout
    from boltz_cp.parity.reference import randomize_
    from boltz_cp.parity.runner import LAYER_WIDTHS, load_cases

    cases, pre = load_cases(), LAYER_WIDTHS["tiny"]
    gen = torch.Generator().manual_seed(seed)
    mods, x = {}, {}
    for name in ("pair_init", "distogram"):
        case = cases[name]
        mods[name] = case.cp_twin(randomize_(case.build(pre), gen).double())
        x.update(case.inputs(n, pre, gen))
    return mods["pair_init"], mods["distogram"], x, TokenLayout(n, mesh)


def _run(pair_init, distogram, x, layout):
    """Outer sum, relpos and distogram on the tiles: (outer, relpos, distogram) DTensors."""
    from boltz_cp.modules.encodersv2 import outer_sum_init, token_blocks
    from boltz_cp.parity.cases.trunk_pair import FEATURES

    feats = {k: x[k] for k in FEATURES}
    outer = outer_sum_init(pair_init.z_init_1, pair_init.z_init_2, layout.shard_single(x["s_inputs"]), layout)
    relpos = pair_init.rel_pos(*token_blocks(feats, layout), layout)
    return outer, relpos, distogram(layout.shard_pair(x["z"]), layout)


def _padded_outputs(mesh, n):
    from boltz_cp.distributed import gather_pair

    with torch.inference_mode():
        return [gather_pair(dt, mesh, None) for dt in _run(*_setup(mesh, n))]


def test_pad_tiles_finite_3x3(run_on_mesh):
    """N=5 on 3x3 pads to 9: block 2 is all padding, block 1 partly."""
    outer, relpos, disto = run_on_mesh(_padded_outputs, 3, 3, 5)[0]
    for t in (outer, relpos, disto):
        assert t.shape[1] == t.shape[2] == 9 and torch.isfinite(t).all()


def _communication(mesh, n):
    from torch.distributed.tensor.debug import CommDebugMode

    from boltz_cp.distributed import comm_counters, reset_comm_counters
    from boltz_cp.modules.encodersv2 import outer_sum_init, token_blocks
    from boltz_cp.parity.cases.trunk_pair import FEATURES

    pair_init, distogram, x, layout = _setup(mesh, n)
    s, z = layout.shard_single(x["s_inputs"]), layout.shard_pair(x["z"])
    blocks = token_blocks({k: x[k] for k in FEATURES}, layout)
    counts = []
    with torch.inference_mode():
        for call in (lambda: pair_init.rel_pos(*blocks, layout),
                     lambda: outer_sum_init(pair_init.z_init_1, pair_init.z_init_2, s, layout),
                     lambda: distogram(z, layout)):
            reset_comm_counters()
            with CommDebugMode() as comm:
                call()
            counts.append((comm_counters(), comm.get_total_counts()))
    return counts


def test_communication_per_forward_2x2(run_on_mesh):
    """N=10 -> padded 12, n=6 per block, fp64: relpos none; outer sum and distogram one
    transpose message per off-diagonal rank (a local copy on the diagonal), no collective."""
    n_block = 6
    outer_bytes, disto_bytes = n_block * C_Z * 8, n_block * n_block * C_Z * 8
    for rank, (relpos, outer, disto) in enumerate(run_on_mesh(_communication, 2, 2, 10)):
        diagonal = rank in (0, 3)
        assert relpos == ({"ring_shift": 0, "transpose": 0, "skew": 0, "broadcast": 0, "local_copy": 0, "bytes_sent": 0}, 0)
        for (p2p, collectives), nbytes in ((outer, outer_bytes), (disto, disto_bytes)):
            assert collectives == 0, (rank, collectives)
            assert p2p["transpose"] == (0 if diagonal else 1), (rank, p2p)
            assert p2p["local_copy"] == (1 if diagonal else 0), (rank, p2p)
            assert p2p["ring_shift"] == p2p["skew"] == 0, (rank, p2p)
            assert p2p["bytes_sent"] == (0 if diagonal else nbytes), (rank, p2p)
