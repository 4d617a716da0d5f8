"""Parity cases `triatt_start`, `triatt_end`: triangle attention around the starting / ending
node on PAIR tiles (upstream called with chunk_size=None)."""

from __future__ import annotations

import torch

from boltz.model.layers.triangular_attention import attention as up
from boltz_cp.layers import triangular_attention as cp
from boltz_cp.parity.reference import pair_mask, token_mask
from boltz_cp.parity.runner import register, twin_from


class _TriangleAttentionCase:
    upstream_cls: type
    cp_cls: type

    def build(self, preset):
        return self.upstream_cls(preset.token_z, preset.pairwise_head_width, preset.pairwise_num_heads, inf=1e9)

    def cp_twin(self, upstream):
        return twin_from(upstream, self.cp_cls(upstream.c_in, upstream.c_hidden, upstream.no_heads, inf=upstream.inf))

    def inputs(self, n, preset, generator):
        z = torch.randn(1, n, n, preset.token_z, generator=generator, dtype=torch.float64)
        return {"z": z, "mask": pair_mask(token_mask(n, generator))}

    def serial(self, module, inputs):
        return {"z": module(inputs["z"], inputs["mask"], chunk_size=None)}

    def cp(self, module, inputs, layout):
        out = module(layout.shard_pair(inputs["z"]), layout.shard_pair(inputs["mask"]), layout)
        return {"z": layout.gather_pair(out)}


@register("triatt_start")
class TriangleAttentionStartCase(_TriangleAttentionCase):
    upstream_cls = up.TriangleAttentionStartingNode
    cp_cls = cp.TriangleAttentionStartingNode


@register("triatt_end")
class TriangleAttentionEndCase(_TriangleAttentionCase):
    upstream_cls = up.TriangleAttentionEndingNode
    cp_cls = cp.TriangleAttentionEndingNode
