"""Input embedder (atom encoder, atom attention encoder, token features) vs upstream; the halo
exchange and span reduction it communicates with.

Tier: no process group (state-dict keys, window plan, the guard's control on upstream); gloo
CPU 1x1 / 2x2 / 3x3 in float64 (parity, halo_exchange / span_reduce values and message
counts, messages per forward, no full-size allocation), 2x2 float32.
"""

from __future__ import annotations

import pytest
import torch

from boltz_cp.distributed import padded_size
from parity_helpers import assert_parity

C_S = 32  # the runner's `tiny` preset


@pytest.mark.parametrize("case", ["input_embedder", "input_embedder_variants"])
@pytest.mark.parametrize("side", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 37])
def test_parity(run_on_mesh, case, side, n):
    print(assert_parity(run_on_mesh, case, side, n))


def test_float32_2x2(run_on_mesh):
    print(assert_parity(run_on_mesh, "input_embedder", 2, 37, dtype="float32"))


def test_state_dict_keys_match_upstream():
    from boltz.model.modules.trunkv2 import InputEmbedder as Upstream

    from boltz_cp.modules.input_embedder import InputEmbedder
    from boltz_cp.parity.cases.input_embedder import InputEmbedderCase, InputEmbedderVariantsCase

    for case in (InputEmbedderCase(), InputEmbedderVariantsCase()):
        ref, ours = Upstream(**case.args(C_S)), InputEmbedder(**case.args(C_S))
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict(), strict=True)


def test_window_plan():
    """K windows split in rank order; at least 2 windows (64 atoms >= the 48-atom halo) per rank."""
    from boltz_cp.modules.atom_windows import AtomWindowPlan

    plan = AtomWindowPlan(7 * 32, 9, 5)
    assert (plan.windows, plan.windows_per_rank, plan.halo) == (7, 2, 48)
    assert plan.atoms() == (320, 384) and plan.ext() == (272, 432)
    assert plan.exists().sum() == 0  # rank 5 and its halo lie past M = 224 entirely
    plan = AtomWindowPlan(10 * 32, 2, 1)
    assert plan.windows_per_rank == 5 and plan.atoms() == (160, 320)
    assert plan.exists().tolist() == [True] * 208 + [False] * 48
    with pytest.raises(ValueError, match="multiple of W"):
        AtomWindowPlan(33, 1, 0)


# -- halo exchange and span reduction -----------------------------------------------------------

def _seq(rank: int, length: int = 5) -> torch.Tensor:
    """[2, length, 3] whose values name the rank and the position."""
    return torch.arange(2 * length * 3, dtype=torch.float64).view(2, length, 3) + 1000.0 * (rank + 1)


def _halo(mesh, halo):
    from boltz_cp.distributed import comm_counters, reset_comm_counters
    from boltz_cp.distributed.halo import halo_exchange

    reset_comm_counters()
    out = halo_exchange(_seq(mesh.rank), mesh, halo).wait()
    return out, comm_counters()


@pytest.mark.parametrize("side", [1, 2, 3])
def test_halo_exchange_values_and_counts(run_on_mesh, side):
    halo, p = 2, side * side
    for rank, (out, counts) in enumerate(run_on_mesh(_halo, side, side, halo)):
        zeros = torch.zeros(2, halo, 3, dtype=torch.float64)
        left = _seq(rank - 1)[:, -halo:] if rank > 0 else zeros
        right = _seq(rank + 1)[:, :halo] if rank < p - 1 else zeros
        torch.testing.assert_close(out, torch.cat([left, _seq(rank), right], 1), rtol=0, atol=0)
        sends = (rank > 0) + (rank < p - 1)
        assert counts.get("halo", 0) == sends, (rank, counts)
        assert counts["bytes_sent"] == sends * 2 * halo * 3 * 8
        assert counts["ring_shift"] == counts["transpose"] == counts["local_copy"] == 0


def _halo_errors(mesh):
    from boltz_cp.distributed.halo import halo_exchange

    with pytest.raises(ValueError, match="halo"):
        halo_exchange(_seq(mesh.rank, 3), mesh, 4)
    return halo_exchange(_seq(mesh.rank, 3), mesh, 0).wait().shape


def test_halo_wider_than_the_sequence_raises(run_on_mesh):
    assert run_on_mesh(_halo_errors, 2, 2) == [torch.Size([2, 3, 3])] * 4


SPANS = [(0, 5), (4, 4), (4, 11), (11, 12)]  # rank 1 empty; straddles blocks 0|1 and 1|2


def _partial(rank: int) -> torch.Tensor:
    lo, hi = SPANS[rank]
    return torch.arange(lo, hi, dtype=torch.float64).view(1, -1, 1).repeat(2, 1, 2) * 10.0 ** rank


def _span_reduce(mesh):
    from boltz_cp.distributed import comm_counters, reset_comm_counters
    from boltz_cp.distributed.halo import span_reduce

    reset_comm_counters()
    out = span_reduce(_partial(mesh.rank), SPANS, mesh, 3).wait()
    return out, comm_counters()


def test_span_reduce_values_and_counts(run_on_mesh):
    full = torch.zeros(2, 12, 2, dtype=torch.float64)
    for rank, (lo, hi) in enumerate(SPANS):
        full[:, lo:hi] += _partial(rank)
    # Messages: rank 0 -> 1 (tokens 3, 4); rank 2 -> 1 (tokens 4, 5), -> 3 (tokens 9, 10).
    sent = {0: [2], 1: [], 2: [2, 2], 3: []}
    for rank, (out, counts) in enumerate(run_on_mesh(_span_reduce, 2, 2)):
        torch.testing.assert_close(out, full[:, 3 * rank:3 * rank + 3], rtol=0, atol=0)
        assert counts.get("span_reduce", 0) == len(sent[rank]), (rank, counts)
        assert counts["bytes_sent"] == sum(sent[rank]) * 2 * 2 * 8


# -- the forward on the mesh --------------------------------------------------------------------

def _setup(mesh, n, case="input_embedder"):
    from boltz_cp.distributed import TokenLayout
    from boltz_cp.modules.input_embedder import embedder_inputs
    from boltz_cp.parity.reference import randomize_
    from boltz_cp.parity.runner import LAYER_WIDTHS, load_cases

    c = load_cases()[case]
    gen = torch.Generator().manual_seed(0)
    module = c.cp_twin(randomize_(c.build(LAYER_WIDTHS["tiny"]), gen).double())
    x = c.inputs(n, LAYER_WIDTHS["tiny"], gen)
    layout = TokenLayout(n, mesh)
    feats = {k: v for k, v in x.items() if k != "atom_to_token"}
    return module, embedder_inputs(feats, layout), layout, x


def _communication(mesh, n):
    from torch.distributed.tensor.debug import CommDebugMode

    from boltz_cp.distributed import comm_counters, reset_comm_counters

    module, inputs, layout, _ = _setup(mesh, n)
    reset_comm_counters()
    with torch.inference_mode(), CommDebugMode() as comm:
        module(inputs, layout)
    return comm_counters(), comm.get_total_counts(), inputs.spans, inputs.plan.windows_per_rank


@pytest.mark.parametrize("side", [2, 3])
def test_messages_per_forward(run_on_mesh, side):
    """3 atom transformer layers: 3 halo exchanges (1 message at the sequence ends, 2 inside);
    one span_reduce message per overlapping (rank, SINGLE_FULL block); 1 ring_j all_gather."""
    n, p = 37, side * side
    results = run_on_mesh(_communication, side, side, n)
    spans, block = results[0][2], padded_size(n, p) // p
    if side == 3:
        assert any(lo == hi for lo, hi in spans)  # some rank holds no real atom
    for rank, (counts, collectives, _, _) in enumerate(results):
        assert counts.get("halo", 0) == 3 * ((rank > 0) + (rank < p - 1)), (rank, counts)
        lo, hi = spans[rank]
        targets = {t // block for t in range(lo, hi)} - {rank}
        assert counts.get("span_reduce", 0) == len(targets), (rank, counts)
        assert counts["ring_shift"] == counts["transpose"] == counts["skew"] == 0
        assert collectives == 1, (rank, collectives)


N_GUARD = 400  # above every other dim: atom features 388, window dims W=32 / H=128


def _guarded_forward(mesh, n):
    from boltz_cp.parity.guards import FullSizeGuard

    module, inputs, layout, x = _setup(mesh, n)
    m = x["ref_pos"].shape[1]
    guard = FullSizeGuard(min(n, m))
    with torch.inference_mode(), guard:
        s = module(inputs, layout)
    assert torch.isfinite(s.to_local()).all()
    return guard.violations, m


def test_no_full_size_tensor_on_2x2(run_on_mesh):
    for rank, (violations, m) in enumerate(run_on_mesh(_guarded_forward, 2, 2, N_GUARD, timeout=240)):
        assert m > N_GUARD
        assert violations == [], f"rank {rank} allocated full-size tensors: {violations[:5]}"


def test_guard_fires_on_upstream():
    """Control: upstream's dense atom_to_token path trips the same guard."""
    from boltz_cp.parity.cases.input_embedder import InputEmbedderCase
    from boltz_cp.parity.guards import FullSizeGuard
    from boltz_cp.parity.reference import fp64_reference
    from boltz_cp.parity.runner import LAYER_WIDTHS

    case = InputEmbedderCase()
    gen = torch.Generator().manual_seed(0)
    module = case.build(LAYER_WIDTHS["tiny"]).double().eval()
    x = case.inputs(N_GUARD, LAYER_WIDTHS["tiny"], gen)
    guard = FullSizeGuard(N_GUARD)
    with torch.inference_mode(), fp64_reference(), guard:
        case.serial(module, x)
    assert any(f", {N_GUARD})" in v for v in guard.violations), guard.violations[:5]
