"""Parity case `transition_z`: the pair transition on PAIR tiles."""

from __future__ import annotations

import torch

from boltz.model.layers.transition import Transition as Upstream
from boltz_cp.layers.transition import Transition
from boltz_cp.parity.runner import register, twin_from


@register("transition_z")
class TransitionZ:
    def build(self, preset):
        return Upstream(preset.token_z, 4 * preset.token_z)

    def cp_twin(self, upstream):
        return twin_from(upstream, Transition(upstream.norm.normalized_shape[0], upstream.hidden))

    def inputs(self, n, preset, generator):
        return {"z": torch.randn(1, n, n, preset.token_z, generator=generator, dtype=torch.float64)}

    def serial(self, module, inputs):
        return {"z": module(inputs["z"])}

    def cp(self, module, inputs, layout):
        return {"z": layout.gather_pair(module(layout.shard_pair(inputs["z"])))}
