"""Score model (one denoiser call, multiplicity 2) vs upstream DiffusionModule.

Tier: no process group (state-dict keys, the guard's control on upstream); gloo CPU 1x1 / 2x2 /
3x3 in float64 (parity, messages and bytes per forward, replicas bit-identical, no full-size
allocation at N=400 on 2x2).
"""

from __future__ import annotations

import pytest
import torch

from parity_helpers import assert_parity

C_S = 32  # the runner's `tiny` preset


@pytest.mark.parametrize("side", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 37])
def test_parity(run_on_mesh, side, n):
    print(assert_parity(run_on_mesh, "diffusion_step", side, n))


@pytest.mark.parametrize("side", [2, 3])
def test_parity_batch2(run_on_mesh, side):
    """B = 2 x 2 samples, token mask derived from the atoms."""
    print(assert_parity(run_on_mesh, "diffusion_step_batch2", side, 37))


def test_state_dict_keys_match_upstream():
    from boltz.model.modules.diffusionv2 import DiffusionModule as Upstream

    from boltz_cp.modules.diffusion import DiffusionModule
    from boltz_cp.parity.cases.diffusion import score_model_args

    ref, ours = Upstream(**score_model_args(C_S)), DiffusionModule(**score_model_args(C_S))
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)


# -- the forward on the mesh ------------------------------------------------------------------

def _setup(mesh, n, case="diffusion_step"):
    from boltz_cp.distributed import TokenLayout
    from boltz_cp.modules.input_embedder import embedder_inputs
    from boltz_cp.parity.cases.diffusion import H, W, cut_conditioning
    from boltz_cp.parity.reference import randomize_
    from boltz_cp.parity.runner import LAYER_WIDTHS, load_cases

    c = load_cases()[case]
    gen = torch.Generator().manual_seed(0)
    module = c.cp_twin(randomize_(c.build(LAYER_WIDTHS["tiny"]), gen).double())
    x = c.inputs(n, LAYER_WIDTHS["tiny"], gen)
    layout = TokenLayout(n, mesh)
    inputs = embedder_inputs({k: v for k, v in x.items() if k != "atom_to_token"}, layout, W, H)
    args = (layout.shard_single(x["s_inputs"]), layout.shard_single(x["s_trunk"]), x["r_noisy"],
            x["times"], inputs, cut_conditioning(x, inputs, layout), layout)
    kwargs = dict(multiplicity=c.mult, token_mask=layout.shard_single(x["token_pad_mask"]))
    return module, args, kwargs, x


def _communication(mesh, n):
    from torch.distributed.tensor.debug import CommDebugMode

    from boltz_cp.distributed import comm_counters, reset_comm_counters

    module, args, kwargs, _ = _setup(mesh, n)
    reset_comm_counters()
    with torch.inference_mode(), CommDebugMode() as comm:
        r = module(*args, **kwargs)
    inputs, layout = args[4], args[6]
    return comm_counters(), comm.get_total_counts(), inputs.spans, layout.n_padded, r


@pytest.mark.parametrize("side", [2, 3])
def test_messages_per_forward(run_on_mesh, side):
    """Only the small messages of the module docstring, to the byte: 4 atom layers' halos;
    span_reduce of token sums and span_gather of token rows (overlaps only); one transpose of
    (k, v, mask) per token layer off the diagonal. Collectives: per token layer 1 ring_j gather of
    (q, k, v, mask) and 1 all_to_all of the softmax partials; 1 gather of r_update. No bias tile
    (B*n*n*12 elements) is ever sent."""
    from boltz_cp.parity.cases.diffusion import ATOM_S, DEC_DEPTH, ENC_DEPTH, TOKEN_DEPTH

    n, p = 37, side * side
    results = run_on_mesh(_communication, side, side, n)
    spans, n_pad = results[0][2], results[0][3]
    n_f, n_row, bm, f64 = n_pad // p, n_pad // side, 2, 8
    for rank, (counts, collectives, _, _, r) in enumerate(results):
        torch.testing.assert_close(r, results[0][4], rtol=0, atol=0)  # replicas bit-identical
        halos = (ENC_DEPTH + DEC_DEPTH) * ((rank > 0) + (rank < p - 1))
        lo, hi = spans[rank]
        reduce_to = [sum(1 for t in range(lo, hi) if t // n_f == d) for d in range(p) if d != rank]
        reduce_to = [k for k in reduce_to if k]
        block = range(rank * n_f, (rank + 1) * n_f)
        gather_to = [sum(1 for t in range(a, b) if t in block) for d, (a, b) in enumerate(spans) if d != rank]
        gather_to = [k for k in gather_to if k]
        r_, c_ = divmod(rank, side)
        transposes = TOKEN_DEPTH * (r_ != c_)
        assert counts.get("halo", 0) == halos, (rank, counts)
        assert counts.get("span_reduce", 0) == len(reduce_to), (rank, counts)
        assert counts.get("span_gather", 0) == len(gather_to), (rank, counts)
        assert counts["transpose"] == transposes and counts["ring_shift"] == counts["skew"] == 0
        expected = (halos * bm * 48 * ATOM_S + sum(reduce_to) * bm * 2 * C_S
                    + sum(gather_to) * bm * ATOM_S + transposes * bm * n_row * (4 * C_S + 1)) * f64
        assert counts["bytes_sent"] == expected, (rank, counts, expected)
        assert collectives == 2 * TOKEN_DEPTH + 1, (rank, collectives)
    assert float(results[0][4].abs().max()) > 0.1  # not vacuous


N_GUARD = 400  # above every other dim: channels <= 64, window dims W=32 / H=128


def _guarded_forward(mesh, n):
    from boltz_cp.parity.guards import FullSizeGuard

    module, args, kwargs, x = _setup(mesh, n)
    m = x["ref_pos"].shape[1]
    guard = FullSizeGuard(min(n, m))
    with torch.inference_mode(), guard:
        r = module(*args, **kwargs)
    assert torch.isfinite(r).all() and r.shape == (2, m, 3)
    return guard.violations, m


def test_no_full_size_tensor_on_2x2(run_on_mesh):
    for rank, (violations, m) in enumerate(run_on_mesh(_guarded_forward, 2, 2, N_GUARD, timeout=240)):
        assert m > N_GUARD
        assert violations == [], f"rank {rank} allocated full-size tensors: {violations[:5]}"


def test_guard_fires_on_upstream():
    """Control: upstream's dense atom_to_token and full token_trans_bias trip the same guard."""
    from boltz_cp.parity.cases.diffusion import DiffusionStepCase
    from boltz_cp.parity.guards import FullSizeGuard
    from boltz_cp.parity.reference import fp64_reference
    from boltz_cp.parity.runner import LAYER_WIDTHS

    case = DiffusionStepCase()
    gen = torch.Generator().manual_seed(0)
    module = case.build(LAYER_WIDTHS["tiny"]).double().eval()
    x = case.inputs(N_GUARD, LAYER_WIDTHS["tiny"], gen)
    guard = FullSizeGuard(N_GUARD)
    with torch.inference_mode(), fp64_reference(), guard:
        case.serial(module, x)
    assert any(f", {N_GUARD}" in v for v in guard.violations), guard.violations[:5]
