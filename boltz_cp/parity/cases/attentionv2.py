"""Parity case `attention_pair_bias`: the pairformer's single-track attention on row blocks."""

from __future__ import annotations

import torch

from boltz.model.layers.attentionv2 import AttentionPairBias as Upstream
from boltz_cp.layers.attentionv2 import AttentionPairBias
from boltz_cp.parity.reference import token_mask
from boltz_cp.parity.runner import register, twin_from


@register("attention_pair_bias")
class AttentionPairBiasCase:
    def build(self, preset):
        self.args = (preset.token_s, preset.token_z, preset.num_heads)
        return Upstream(*self.args)

    def cp_twin(self, upstream):
        return twin_from(upstream, AttentionPairBias(*self.args))

    def inputs(self, n, preset, generator):
        return {
            "s": torch.randn(1, n, preset.token_s, generator=generator, dtype=torch.float64),
            "z": torch.randn(1, n, n, preset.token_z, generator=generator, dtype=torch.float64),
            "mask": token_mask(n, generator),
        }

    def serial(self, module, x):
        return {"s": module(s=x["s"], z=x["z"], mask=x["mask"], k_in=x["s"])}

    def cp(self, module, x, layout):
        s = layout.shard_single(x["s"])
        out = module(s, layout.shard_pair(x["z"]), layout.shard_single(x["mask"]), s, layout)
        return {"s": layout.gather_single(out)}
