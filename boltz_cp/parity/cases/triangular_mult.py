"""Parity cases `trimul_out`, `trimul_in`: triangle multiplications on PAIR tiles (Cannon)."""

from __future__ import annotations

import torch

from boltz.model.layers import triangular_mult as up
from boltz_cp.layers import triangular_mult as cp
from boltz_cp.parity.reference import pair_mask, token_mask
from boltz_cp.parity.runner import register, twin_from


class _TriMul:
    upstream_cls: type
    cp_cls: type

    def build(self, preset):
        return self.upstream_cls(preset.token_z)

    def cp_twin(self, upstream):
        return twin_from(upstream, self.cp_cls(upstream.norm_in.normalized_shape[0]))

    def inputs(self, n, preset, generator):
        return {"z": torch.randn(1, n, n, preset.token_z, generator=generator, dtype=torch.float64),
                "pair_mask": pair_mask(token_mask(n, generator))}

    def serial(self, module, inputs):
        return {"z": module(inputs["z"], inputs["pair_mask"])}

    def cp(self, module, inputs, layout):
        z = module(layout.shard_pair(inputs["z"]), layout.shard_pair(inputs["pair_mask"]), layout)
        return {"z": layout.gather_pair(z)}


@register("trimul_out")
class TriMulOutgoing(_TriMul):
    upstream_cls, cp_cls = up.TriangleMultiplicationOutgoing, cp.TriangleMultiplicationOutgoing


@register("trimul_in")
class TriMulIncoming(_TriMul):
    upstream_cls, cp_cls = up.TriangleMultiplicationIncoming, cp.TriangleMultiplicationIncoming
