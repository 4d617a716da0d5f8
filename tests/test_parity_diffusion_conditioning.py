"""Diffusion conditioning (pairwise conditioning, structure-aware atom encoder, biases) vs
upstream; the span_gather and gather_pair_block fetches it communicates with.

Tier: no process group (state-dict keys); gloo CPU 1x1 / 2x2 / 3x3 in float64 (parity,
span_gather / gather_pair_block values and message counts, messages per forward, no
full-size allocation), 2x2 float32.
"""

from __future__ import annotations

import pytest
import torch

from boltz_cp.distributed import padded_size
from parity_helpers import assert_parity


@pytest.mark.parametrize("side", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 37])
def test_parity(run_on_mesh, side, n):
    print(assert_parity(run_on_mesh, "diffusion_conditioning", side, n))


@pytest.mark.parametrize("side", [1, 2, 3])
def test_parity_variants(run_on_mesh, side):
    print(assert_parity(run_on_mesh, "diffusion_conditioning_variants", side, 37))


def test_float32_2x2(run_on_mesh):
    print(assert_parity(run_on_mesh, "diffusion_conditioning", 2, 37, dtype="float32"))


def test_state_dict_keys_match_upstream():
    from boltz.model.modules.diffusion_conditioning import DiffusionConditioning as Upstream

    from boltz_cp.modules.diffusion_conditioning import DiffusionConditioning
    from boltz_cp.parity.cases.diffusion_conditioning import (
        DiffusionConditioningCase,
        DiffusionConditioningVariantsCase,
    )

    for case in (DiffusionConditioningCase(), DiffusionConditioningVariantsCase()):
        ref, ours = Upstream(**case.args(32, 16)), DiffusionConditioning(**case.args(32, 16))
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)


# -- span_gather and gather_pair_block -----------------------------------------------------------

BLOCK = 3  # SINGLE_FULL rows per rank on 2x2: 12 padded tokens
SPANS = [(0, 5), (4, 4), (2, 11), (11, 12)]  # rank 1 empty; rank 2 spans blocks 0..3


def _rows(rank: int) -> torch.Tensor:
    """SINGLE_FULL block of rank: rows named by their global index."""
    rows = torch.arange(rank * BLOCK, (rank + 1) * BLOCK, dtype=torch.float64)
    return rows.view(1, -1, 1).repeat(2, 1, 2) + torch.tensor([0.0, 0.5])


def _span_gather(mesh):
    from boltz_cp.distributed import comm_counters, reset_comm_counters
    from boltz_cp.distributed.span import span_gather

    reset_comm_counters()
    out = span_gather(_rows(mesh.rank), SPANS, mesh).wait()
    return out, comm_counters()


def test_span_gather_values_and_counts(run_on_mesh):
    full = torch.cat([_rows(r) for r in range(4)], dim=1)
    # Messages (owner -> rank, rows): 0 -> 2 (2); 1 -> 0 (3, 4), 1 -> 2 (3, 4, 5);
    # 2 -> 0: none (rank 0 wants rows < 5); 3 -> 2 (9, 10); 2 -> 3: none (row 11 is rank 3's).
    sent = {0: [1], 1: [2, 3], 2: [], 3: [2]}
    for rank, (out, counts) in enumerate(run_on_mesh(_span_gather, 2, 2)):
        lo, hi = SPANS[rank]
        torch.testing.assert_close(out, full[:, lo:hi], rtol=0, atol=0)
        assert counts.get("span_gather", 0) == len(sent[rank]), (rank, counts)
        assert counts["bytes_sent"] == sum(sent[rank]) * 2 * 2 * 8


N_PAIR = 8  # 2x2 tiles of 4 x 4 tokens
WANT = [((1, 3), (0, 7)), ((0, 0), (0, 0)), ((3, 6), (5, 6)), ((4, 8), (4, 8))]


def _pair_full() -> torch.Tensor:
    i = torch.arange(N_PAIR, dtype=torch.float64)
    full = (100 * i[:, None] + i[None, :]).view(1, N_PAIR, N_PAIR, 1)
    return torch.cat([full, -full], dim=-1).repeat(2, 1, 1, 1)


def _pair_transform(x: torch.Tensor) -> torch.Tensor:
    return x[..., :1] * 2 + x[..., 1:]  # 2 -> 1 channels: = full[..., 0]


def _gather_pair_block(mesh):
    from torch.distributed.tensor.debug import CommDebugMode

    from boltz_cp.distributed import comm_counters, reset_comm_counters
    from boltz_cp.distributed.span import gather_pair_block

    r, c = mesh.coord
    tile = _pair_full()[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4].clone()
    reset_comm_counters()
    rows, cols = WANT[mesh.rank]
    with CommDebugMode() as comm:
        out = gather_pair_block(tile, mesh, rows, cols, _pair_transform).wait()
    return out, comm_counters(), comm.get_total_counts()


def test_gather_pair_block_values_and_counts(run_on_mesh):
    full = _pair_full()[..., :1]
    # Tiles: rank 0 rows/cols [0,4)x[0,4), 1 [0,4)x[4,8), 2 [4,8)x[0,4), 3 [4,8)x[4,8).
    # Rank 0 wants [1,3)x[0,7): from 1 (2x3). Rank 2 wants [3,6)x[5,6): from 1 (1x1), 3 (2x1).
    # Rank 3 wants [4,8)x[4,8): its own tile.
    sent = {0: [], 1: [6, 1], 2: [], 3: [2]}
    for rank, (out, counts, collectives) in enumerate(run_on_mesh(_gather_pair_block, 2, 2)):
        (a, b), (c, d) = WANT[rank]
        torch.testing.assert_close(out, full[:, a:b, c:d], rtol=0, atol=0)
        assert counts.get("pair_block", 0) == len(sent[rank]), (rank, counts)
        assert counts["bytes_sent"] == sum(sent[rank]) * 2 * 8
        assert collectives == 1  # the all_gather of the wanted rectangles


# -- the forward on the mesh --------------------------------------------------------------------

def _setup(mesh, n, case="diffusion_conditioning"):
    from boltz_cp.distributed import TokenLayout
    from boltz_cp.modules.input_embedder import embedder_inputs
    from boltz_cp.parity.cases.diffusion_conditioning import TRUNK_KEYS
    from boltz_cp.parity.reference import randomize_
    from boltz_cp.parity.runner import LAYER_WIDTHS, load_cases

    c = load_cases()[case]
    gen = torch.Generator().manual_seed(0)
    module = c.cp_twin(randomize_(c.build(LAYER_WIDTHS["tiny"]), gen).double())
    x = c.inputs(n, LAYER_WIDTHS["tiny"], gen)
    layout = TokenLayout(n, mesh)
    feats = {k: v for k, v in x.items() if k not in (*TRUNK_KEYS, "atom_to_token")}
    trunk = (layout.shard_single(x["s_trunk"]), layout.shard_pair(x["z_trunk"]),
             layout.shard_pair(x["relative_position_encoding"]))
    return module, trunk, embedder_inputs(feats, layout), layout, x


def _communication(mesh, n):
    from torch.distributed.tensor.debug import CommDebugMode

    from boltz_cp.distributed import comm_counters, reset_comm_counters

    module, trunk, inputs, layout, x = _setup(mesh, n)
    reset_comm_counters()
    with torch.inference_mode(), CommDebugMode() as comm:
        module(*trunk, inputs, layout)
    return comm_counters(), comm.get_total_counts(), inputs.spans, x["atom_to_token_index"]


def _ext_span(index: torch.Tensor, a0: int, a1: int) -> tuple[int, int]:
    tok = index[:, max(a0, 0):a1]
    tok = tok[tok >= 0]
    return (int(tok.min()), int(tok.max()) + 1) if tok.numel() else (0, 0)


def test_messages_per_forward_2x2(run_on_mesh):
    """2 halo exchanges (token index, c); one span_gather message per (SINGLE_FULL owner,
    rank) overlap; one pair_block message per (tile owner, rank) overlap of the band; one
    all_gather (the wanted rectangles)."""
    from boltz_cp.modules.atom_windows import AtomWindowPlan

    n, p = 37, 4
    results = run_on_mesh(_communication, 2, 2, n)
    spans, index = results[0][2], results[0][3]
    n_pad = padded_size(n, p)
    block, tile = n_pad // p, n_pad // 2
    plan = AtomWindowPlan(index.shape[1], p, 0)
    wants = []
    for d in range(p):
        lo, hi = spans[d]
        ext = _ext_span(index, *plan.ext(d))
        wants.append(((lo, hi), ext) if lo < hi and ext[0] < ext[1] else ((0, 0), (0, 0)))
    assert any(w[1][1] - w[1][0] > w[0][1] - w[0][0] for w in wants)  # halos reach other tokens

    def meets(a, b):
        return max(a[0], b[0]) < min(a[1], b[1])

    for kind in ("span_gather", "pair_block"):  # the fetches really cross ranks here
        assert sum(res[0].get(kind, 0) for res in results) > 0, kind
    for rank, (counts, collectives, _, _) in enumerate(results):
        assert counts.get("halo", 0) == 2 * ((rank > 0) + (rank < p - 1)), (rank, counts)
        mine = (rank * block, (rank + 1) * block)
        targets = [d for d in range(p) if d != rank and meets(spans[d], mine)]
        assert counts.get("span_gather", 0) == len(targets), (rank, counts)
        r, c = divmod(rank, 2)
        rows, cols = (r * tile, (r + 1) * tile), (c * tile, (c + 1) * tile)
        targets = [d for d in range(p) if d != rank and meets(wants[d][0], rows) and meets(wants[d][1], cols)]
        assert counts.get("pair_block", 0) == len(targets), (rank, counts)
        assert counts["ring_shift"] == counts["transpose"] == counts["skew"] == 0
        assert counts.get("span_reduce", 0) == 0
        assert collectives == 1, (rank, collectives)


N_GUARD = 400  # above every other dim: atom features 388, window dims W=32 / H=128


def _guarded_forward(mesh, n):
    from boltz_cp.parity.guards import FullSizeGuard

    module, trunk, inputs, layout, x = _setup(mesh, n)
    m = x["ref_pos"].shape[1]
    guard = FullSizeGuard(min(n, m))
    with torch.inference_mode(), guard:
        out = module(*trunk, inputs, layout)
    assert all(torch.isfinite(v.to_local() if k == "token_trans_bias" else v).all() for k, v in out.items())
    return guard.violations, m


def test_no_full_size_tensor_on_2x2(run_on_mesh):
    for rank, (violations, m) in enumerate(run_on_mesh(_guarded_forward, 2, 2, N_GUARD, timeout=240)):
        assert m > N_GUARD
        assert violations == [], f"rank {rank} allocated full-size tensors: {violations[:5]}"
