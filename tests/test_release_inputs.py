"""Callers release a block's input z: at every pair sublayer of a pairformer stack or an MSA
module, only the z tiles the algorithm needs are alive (counted as live storages of the tile's
shape), and a caller's input is never changed unless it gave it up (`consume=True`).

Tier: gloo CPU, 1x1 (tiny widths, N = 24).
"""

from __future__ import annotations

import gc

import torch

from boltz_cp.distributed import TokenLayout

N = 24
PAIR_SUBLAYERS = ("tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end", "transition_z")


def _live_tiles(shape: torch.Size) -> int:
    """Distinct storages of live tensors shaped like the z tile (the mask tiles differ in shape)."""
    ptrs = set()
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor and obj.shape == shape:  # plain tensors: the DTensors' locals
            ptrs.add(obj.untyped_storage().data_ptr())
    return len(ptrs)


def _count_at_sublayers(layers, shape) -> tuple[list[int], list]:
    counts, handles = [], []
    for layer in layers:
        for name in PAIR_SUBLAYERS:
            sub = getattr(layer, name)
            handles.append(sub.register_forward_pre_hook(lambda _m, _a: counts.append(_live_tiles(shape))))
    return counts, handles


def _pairformer_counts(mesh):
    from boltz_cp.layers.pairformer import PairformerModule
    from boltz_cp.parity.reference import randomize_

    layout = TokenLayout(N, mesh)
    module = randomize_(PairformerModule(32, 16, 2, 4, 0.0, 8, 2, False, False, True),
                        torch.Generator().manual_seed(0)).double().eval()
    g = torch.Generator().manual_seed(1)
    s = layout.shard_single(torch.randn(1, N, 32, generator=g, dtype=torch.float64))
    z_flat = torch.randn(N * N * 16, generator=g, dtype=torch.float64)  # not tile-shaped: not counted
    mask = layout.shard_single(torch.ones(1, N, dtype=torch.float64))
    pair_mask = layout.shard_pair(torch.ones(1, N, N, dtype=torch.float64))
    out = {}
    for consume in (False, True):
        z = layout.shard_pair(z_flat.view(1, N, N, 16))
        before = z.to_local().flatten().clone()
        counts, handles = _count_at_sublayers(module.layers, z.to_local().shape)
        with torch.inference_mode():
            _, z_out = module(s, z, mask, pair_mask, layout, consume=consume)
        for h in handles:
            h.remove()
        same_storage = z_out.to_local().untyped_storage().data_ptr() == z.to_local().untyped_storage().data_ptr()
        out[consume] = (counts, torch.equal(z.to_local().flatten(), before), same_storage)
        del z, z_out
    return out


def _msa_counts(mesh):
    from boltz_cp.modules.trunkv2 import msa_column_blocks
    from boltz_cp.parity.cases.msa import MSAModuleCase
    from boltz_cp.parity.reference import pair_mask, randomize_
    from boltz_cp.parity.runner import LAYER_WIDTHS as PRESETS

    case = MSAModuleCase()
    case.build(PRESETS["tiny"])
    module = randomize_(case.make_cp(), torch.Generator().manual_seed(0)).double().eval()
    x = case.inputs(N, PRESETS["tiny"], torch.Generator().manual_seed(2))
    layout = TokenLayout(N, mesh)
    z = layout.shard_pair(x.pop("z"))
    before = z.to_local().flatten().clone()
    counts, handles = _count_at_sublayers([layer.pairformer_layer for layer in module.layers], z.to_local().shape)
    with torch.inference_mode():
        module(z, layout.shard_single(x["s_inputs"]), msa_column_blocks(x, layout),
               layout.shard_pair(pair_mask(x["token_pad_mask"])), layout)
    for h in handles:
        h.remove()
    return counts, torch.equal(z.to_local().flatten(), before)


def test_pairformer_stack_holds_one_z_beside_the_callers(run_on_mesh):
    ((kept, consumed),) = [(r[False], r[True]) for r in run_on_mesh(_pairformer_counts, 1, 1, timeout=120)]
    counts, unchanged, same = kept
    # the caller keeps its input: its tile + the stack's own one, never a third (block input held)
    assert len(counts) == 10 and counts[0] == 1 and max(counts[1:]) == 2, counts
    assert unchanged and not same
    counts, _, same = consumed
    # given up: one tile all along, updated in place and returned
    assert len(counts) == 10 and max(counts) == 1, counts
    assert same


def test_msa_module_holds_only_the_callers_z_and_its_own(run_on_mesh):
    ((counts, unchanged),) = run_on_mesh(_msa_counts, 1, 1, timeout=120)
    # trunk's z (kept for its residual) + the layer's z after the outer product mean, updated in
    # place: no 'z after OPM' held by MSALayer and no previous layer's output held by the module
    assert len(counts) == 10 and max(counts) == 2, counts
    assert unchanged
