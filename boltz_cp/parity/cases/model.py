"""Parity case `model`: upstream `Boltz2.forward` end to end (trunk, diffusion sampling,
confidence) vs `Boltz2CP`, same random weights (the `tiny` checkpoint preset), same seed, on the
real featurized input of the `trunk` case (upstream reads its own featurizer's output, the CP
model `featurize_lean`'s). Both draw their noise, augmentation rotations and steps from torch's
global RNG seeded alike, so the sampled coordinates must agree to round-off, not statistically.
Settings: 1 recycle, 5 sampling steps, 2 diffusion samples (the confidence module runs them one
after the other, as upstream's predict does), steering off (contact guidance included).

Case `model_potentials`: the same with every steering potential on (`use_potentials`: fk steering
with 3 particles per sample and resampling, physical guidance; contact guidance) on the `forced`
variant of the input (forced template, forced pocket, a forced inter-chain contact), so every
potential term acts, the template and contact ones included.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from boltz_cp.parity.cases.confidence import flatten
from boltz_cp.parity.cases.trunk import featurized_input
from boltz_cp.parity.reference import fp64_reference
from boltz_cp.parity.runner import register

RECYCLING_STEPS, SAMPLING_STEPS, SAMPLES, SEED = 1, 5, 2, 7
# Upstream's per-pair outputs compared as full matrices; per-sample scalars and per-token values.
PAIR_OUTPUTS = ("pae", "pde")
OTHER_OUTPUTS = ("sample_atom_coords", "plddt", "complex_plddt", "complex_iplddt", "complex_pde",
                 "complex_ipde", "ptm", "iptm", "ligand_iptm", "protein_iptm")


def _select(out: dict) -> dict:
    return flatten({k: out[k] for k in (*OTHER_OUTPUTS, *PAIR_OUTPUTS, "pair_chains_iptm")})


@register("model")
class ModelCase:
    checkpoint_preset = "tiny"  # the runner's layer widths do not apply
    steering = {"fk_steering": False, "physical_guidance_update": False, "contact_guidance_update": False}
    forced = False

    def build(self, preset):
        from boltz_cp.models.checkpoint import _upstream_steering_defaults, build_model
        from boltz_cp.models.presets import PRESETS

        model = build_model(PRESETS["tiny"])
        model.predict_args = {"recycling_steps": RECYCLING_STEPS, "sampling_steps": SAMPLING_STEPS,
                              "diffusion_samples": SAMPLES, "max_parallel_samples": None}
        model.steering_args = {**_upstream_steering_defaults(), **self.steering}
        return model

    def cp_twin(self, upstream):
        from boltz_cp.models.boltz2 import Boltz2CP

        return Boltz2CP.from_upstream(upstream)

    def inputs(self, n, preset, generator):
        return dict(featurized_input(self.forced))

    def num_tokens(self, inputs) -> int:
        return inputs["token_pad_mask"].shape[1]

    def serial(self, module, x):
        torch.manual_seed(SEED)
        out = module(dict(x), recycling_steps=RECYCLING_STEPS, num_sampling_steps=SAMPLING_STEPS,
                     diffusion_samples=SAMPLES, run_confidence_sequentially=True)
        return _select(out)

    def cp(self, module, x, layout):
        from boltz_cp.data.compact import DENSE_KEYS
        from boltz_cp.models.boltz2 import ModelInputs, gather_outputs

        lean = {k: v for k, v in x.items() if k not in DENSE_KEYS}
        inputs = ModelInputs.cut(lean, layout)
        # The CP model runs upstream's own sampler, which draws its noise in the default dtype and
        # aligns with `.float()`: in the float64 run it gets the oracle's float64 semantics too.
        float64 = next(module.parameters()).dtype == torch.float64
        with fp64_reference() if float64 else nullcontext():
            torch.manual_seed(SEED)
            out = module(inputs, layout, recycling_steps=RECYCLING_STEPS, num_sampling_steps=SAMPLING_STEPS,
                         diffusion_samples=SAMPLES)
        full = gather_outputs(out, layout, dst=None)
        return _select(full)


@register("model_potentials")
class ModelPotentialsCase(ModelCase):
    steering = {"fk_steering": True, "physical_guidance_update": True, "contact_guidance_update": True}
    forced = True
    # Upstream's own serial model raises here under CPU bf16 autocast (potentials.py index_put of a
    # bf16 value into a float32 tensor), so there is no serial bf16 run to compare with. Plain
    # use_potentials and forced pockets do run in bf16 through `boltz_cp predict`.
    bf16_mixed_unsupported = ("upstream's serial model raises in its steering potentials under CPU bf16 autocast "
                              "on this input (FlatBottomPotential index_put dtype mismatch)")
