"""Single-track attention with pair bias on row blocks vs upstream AttentionPairBias (v2).

Tier: gloo CPU, 1x1 / 2x2 / 3x3 (float64, tiny widths) and 2x2 float32 at Boltz-2 widths;
the state-dict test needs no process group.
"""

from __future__ import annotations

import pytest
import torch

from parity_helpers import assert_parity

C_S, C_Z, HEADS = 32, 16, 4


@pytest.mark.parametrize("side", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 37, 64])
def test_attention_pair_bias(run_on_mesh, side, n):
    assert_parity(run_on_mesh, "attention_pair_bias", side, n)


def test_attention_pair_bias_float32_full_width(run_on_mesh):
    assert_parity(run_on_mesh, "attention_pair_bias", 2, 64, dtype="float32", preset="full", timeout=300)


def test_state_dict_keys_match_upstream():
    from boltz.model.layers.attentionv2 import AttentionPairBias as Upstream

    from boltz_cp.layers.attentionv2 import AttentionPairBias

    torch.manual_seed(0)
    ref, ours = Upstream(C_S, C_Z, HEADS), AttentionPairBias(C_S, C_Z, HEADS)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)


# -- helpers run on every rank ----------------------------------------------------------------

def _setup(mesh, n, seed=0, batch=1, multiplicity=1, mask="token"):
    """Upstream module (random weights, fp64), its twin, full inputs and the layout."""
    from boltz.model.layers.attentionv2 import AttentionPairBias as Upstream

    from boltz_cp.distributed import TokenLayout
    from boltz_cp.layers.attentionv2 import AttentionPairBias
    from boltz_cp.parity.reference import randomize_, token_mask
    from boltz_cp.parity.runner import twin_from

    gen = torch.Generator().manual_seed(seed)
    up = randomize_(Upstream(C_S, C_Z, HEADS), gen).double().eval()
    bm = batch * multiplicity
    x = {
        "s": torch.randn(bm, n, C_S, generator=gen, dtype=torch.float64),
        "z": torch.randn(batch, n, n, C_Z, generator=gen, dtype=torch.float64),
        "mask": {"token": lambda: token_mask(n, gen, bm),
                 "zeros": lambda: torch.zeros(bm, n, dtype=torch.float64),
                 "ones": lambda: torch.ones(bm, n, dtype=torch.float64)}[mask](),
    }
    return up, twin_from(up, AttentionPairBias(C_S, C_Z, HEADS)), x, TokenLayout(n, mesh)


def _cp_forward(cp, x, layout, multiplicity=1):
    s = layout.shard_single(x["s"])
    return cp(s, layout.shard_pair(x["z"]), layout.shard_single(x["mask"]), s, layout,
              multiplicity=multiplicity)


def _custom_parity(mesh, n, mask, multiplicity, chunk_pairs=None):
    """fp64 parity for inputs the registered case does not cover; also checks pad rows.
    ``chunk_pairs`` forces query-row chunking (the path large tiles take)."""
    from boltz_cp.distributed import gather_single
    from boltz_cp.layers import attentionv2
    from boltz_cp.parity.reference import fp64_reference

    up, cp, x, layout = _setup(mesh, n, batch=2, multiplicity=multiplicity, mask=mask)
    default_chunk = attentionv2.CHUNK_ELEMENTS
    attentionv2.CHUNK_ELEMENTS = chunk_pairs * C_Z if chunk_pairs else default_chunk
    try:
        with torch.inference_mode():
            with fp64_reference():
                ref = up(s=x["s"], z=x["z"], mask=x["mask"], k_in=x["s"], multiplicity=multiplicity)
            out_dt = _cp_forward(cp, x, layout, multiplicity)
    finally:
        attentionv2.CHUNK_ELEMENTS = default_chunk
    padded = gather_single(out_dt, mesh, None)  # pad query rows included
    out = padded[:, :n]
    torch.testing.assert_close(out, ref)
    return float((out - ref).abs().max()), bool(torch.isfinite(padded).all()), padded.shape[1]


@pytest.mark.parametrize("side,n", [(2, 7), (3, 5)])
def test_all_keys_masked_and_pad_rows_finite(run_on_mesh, side, n):
    """Every key masked: upstream averages over all N real keys, so pad keys must be absent.
    3x3 with N=5 (padded to 9) has one key block that is all padding and one that is partly."""
    for err, finite, n_padded in run_on_mesh(_custom_parity, side, side, n, "zeros", 1):
        assert finite and n_padded > n, (err, finite, n_padded)


def test_multiplicity_and_query_chunks(run_on_mesh):
    """Diffusion-style call (the bias of B structures repeated over B*mult samples), with
    the 6 query rows of each tile processed in chunks of 2 (13 pairs // 6 keys)."""
    for err, finite, _ in run_on_mesh(_custom_parity, 2, 2, 10, "token", 2, 13):
        assert finite


def _local_output(mesh, n):
    # All keys real: with masked key blocks a 3-term merge degenerates to a + b + 0, which
    # any summation order gets bit-identical, and the test would not see an order bug.
    _, cp, x, layout = _setup(mesh, n, mask="ones")
    with torch.inference_mode():
        return _cp_forward(cp, x, layout).to_local()


@pytest.mark.parametrize("side", [2, 3])
def test_row_replicas_bit_identical(run_on_mesh, side):
    tiles = run_on_mesh(_local_output, side, side, 45)
    for rank, tile in enumerate(tiles):
        row_first = tiles[(rank // side) * side]
        assert torch.equal(tile, row_first), f"rank {rank} differs from its row's first rank"
    assert not torch.equal(tiles[0], tiles[side])  # distinct rows hold distinct blocks


def _communication(mesh, n):
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    from boltz_cp.distributed import comm_counters, reset_comm_counters

    _, cp, x, layout = _setup(mesh, n)
    s, z, m = layout.shard_single(x["s"]), layout.shard_pair(x["z"]), layout.shard_single(x["mask"])
    gathered = []
    original = dist.all_gather

    def recording_all_gather(tensor_list, tensor, group=None, async_op=False):
        gathered.append((len(tensor_list), tensor.numel() * tensor.element_size(), dist.get_world_size(group)))
        return original(tensor_list, tensor, group=group, async_op=async_op)

    reset_comm_counters()
    dist.all_gather = recording_all_gather
    try:
        with torch.inference_mode(), CommDebugMode() as comm:
            cp(s, z, m, s, layout)
    finally:
        dist.all_gather = original
    counts = {str(k): v for k, v in comm.get_comm_counts().items()}
    return comm_counters(), counts, gathered


def test_communication_per_forward_2x2(run_on_mesh):
    """N=10 -> padded 12, n=6 per block; fp64, C_s=32, H=4, D=8."""
    n_block = 6
    transpose_bytes = n_block * (C_S + 1) * 8  # k_in block + mask column
    state_bytes = n_block * HEADS * (C_S // HEADS + 2) * 8  # (o, max, sum-exp) per query, head
    for rank, (p2p, collectives, gathered) in enumerate(run_on_mesh(_communication, 2, 2, 10)):
        diagonal = rank in (0, 3)
        assert p2p["transpose"] == (0 if diagonal else 1), (rank, p2p)
        assert p2p["local_copy"] == (1 if diagonal else 0), (rank, p2p)
        assert p2p["ring_shift"] == p2p["skew"] == 0, (rank, p2p)
        assert p2p["bytes_sent"] == (0 if diagonal else transpose_bytes), (rank, p2p)
        assert sum(collectives.values()) == 1 and "allgather" in next(iter(collectives)), collectives
        assert gathered == [(2, state_bytes, 2)], (rank, gathered)


def _full_size_dims(mesh, n):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class AnyFullDim(TorchDispatchMode):
        def __init__(self, n_full):
            super().__init__()
            self.n_full, self.violations = n_full, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if type(t) is torch.Tensor and any(d >= self.n_full for d in t.shape):
                    self.violations.append(f"{func}: {tuple(t.shape)}")
            return out

    _, cp, x, layout = _setup(mesh, n)
    s, z, m = layout.shard_single(x["s"]), layout.shard_pair(x["z"]), layout.shard_single(x["mask"])
    guard = AnyFullDim(layout.n_padded)
    with torch.inference_mode(), guard:
        cp(s, z, m, s, layout)
    return guard.violations


def test_no_full_token_dim_on_2x2(run_on_mesh):
    """N=50 (padded 52) is above every channel width here (max C_s+1 = 33)."""
    for rank, violations in enumerate(run_on_mesh(_full_size_dims, 2, 2, 50)):
        assert violations == [], f"rank {rank}: {violations[:5]}"
