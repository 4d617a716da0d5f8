"""Parity cases `pairformer_layer`, `pairformer`, `pairformer_noseq`: whole blocks on tiles."""

from __future__ import annotations

import torch

from boltz.model.layers import pairformer as up
from boltz_cp.layers import pairformer as cp
from boltz_cp.parity.reference import pair_mask, token_mask
from boltz_cp.parity.runner import register, twin_from


def _pair_inputs(n, preset, generator):
    mask = token_mask(n, generator)
    return {
        "s": torch.randn(1, n, preset.token_s, generator=generator, dtype=torch.float64),
        "z": torch.randn(1, n, n, preset.token_z, generator=generator, dtype=torch.float64),
        "mask": mask,
        "pair_mask": pair_mask(mask),
    }


def _layer_args(p):
    return (p.token_s, p.token_z, p.num_heads, 0.0, p.pairwise_head_width, p.pairwise_num_heads, False, True)


@register("pairformer_layer")
class PairformerLayerCase:
    def build(self, p):
        self.args = _layer_args(p)
        return up.PairformerLayer(*self.args)

    def cp_twin(self, upstream):
        return twin_from(upstream, cp.PairformerLayer(*self.args))

    inputs = staticmethod(_pair_inputs)

    def serial(self, module, x):
        s, z = module(x["s"], x["z"], x["mask"], x["pair_mask"], chunk_size_tri_attn=None)
        return {"s": s, "z": z}

    def cp(self, module, x, layout):
        s, z = module(layout.shard_single(x["s"]), layout.shard_pair(x["z"]), layout.shard_single(x["mask"]),
                      layout.shard_pair(x["pair_mask"]), layout)
        return {"s": layout.gather_single(s), "z": layout.gather_pair(z)}


@register("pairformer")
class PairformerCase(PairformerLayerCase):
    def build(self, p):
        self.args = (p.token_s, p.token_z, p.num_blocks, p.num_heads, 0.0, p.pairwise_head_width,
                     p.pairwise_num_heads, False, False, True)
        return up.PairformerModule(*self.args)

    def cp_twin(self, upstream):
        return twin_from(upstream, cp.PairformerModule(*self.args))

    def serial(self, module, x):
        # Upstream's module picks a triangle-attention chunk size in eval; chunking does not
        # change the result, so this is its inference path.
        s, z = module(x["s"], x["z"], x["mask"], x["pair_mask"])
        return {"s": s, "z": z}


@register("pairformer_noseq")
class PairformerNoSeqCase:
    def build(self, p):
        self.args = (p.token_z, p.num_blocks, 0.0, p.pairwise_head_width, p.pairwise_num_heads)
        return up.PairformerNoSeqModule(*self.args)

    def cp_twin(self, upstream):
        return twin_from(upstream, cp.PairformerNoSeqModule(*self.args))

    inputs = staticmethod(_pair_inputs)

    def serial(self, module, x):
        return {"z": module(x["z"], x["pair_mask"])}

    def cp(self, module, x, layout):
        return {"z": layout.gather_pair(module(layout.shard_pair(x["z"]), layout.shard_pair(x["pair_mask"]), layout))}
