"""CP twin of upstream's AtomDiffusion (the EDM sampler around the score model).

Placements: the sampler's state (noise, coordinates, random rotations, the denoised estimate)
is [B*mult, M, 3] and replicated, identical on every rank; only the score model is sharded
(boltz_cp/modules/diffusion.py: s_inputs / s_trunk SINGLE_BY_I, token_trans_bias PAIR, atoms
by window). Every rank runs upstream's own `sample` loop, so noise, augmentation rotations and
step sizes are drawn from torch's global RNG in upstream's order: with the same seed every rank
draws what the serial model draws, and the CP run reproduces the serial one.
Communication per denoising step: the score model's (see its module docstring).
Upstream twin: boltz/model/modules/diffusionv2.py AtomDiffusion
"""

from __future__ import annotations

from boltz.model.modules.diffusionv2 import AtomDiffusion as _UpstreamAtomDiffusion
from boltz_cp.modules.diffusion import DiffusionModule


class AtomDiffusion(_UpstreamAtomDiffusion):
    """Upstream's sampler with the CP score model under the same name (score_model)."""

    def __init__(self, score_model_args: dict, compile_score: bool = False, **kwargs) -> None:
        super().__init__(score_model_args, compile_score=False, **kwargs)
        self.score_model = DiffusionModule(**score_model_args)

    def preconditioned_network_forward(self, noised_atom_coords, sigma, network_condition_kwargs: dict):
        # `feats` rides along for the steering potentials of `sample`; the CP score model reads
        # its own per-rank inputs instead.
        kwargs = {k: v for k, v in network_condition_kwargs.items() if k != "feats"}
        return super().preconditioned_network_forward(noised_atom_coords, sigma, kwargs)
