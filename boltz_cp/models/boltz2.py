"""Boltz-2 inference on the CP mesh: the trunk, the diffusion conditioning, upstream's sampler
with the CP score model, and the confidence module, under upstream's attribute names (so an
upstream checkpoint's state dict loads strictly).

Placements (mesh axes cp_i, cp_j): see boltz_cp/models/trunk.py for the trunk's inputs and
outputs. Diffusion: s_inputs / s_trunk SINGLE_BY_I, z PAIR; the atom windows per rank
(modules/atom_windows.py); the sampled coordinates [B*mult, M, 3] are replicated on every rank
(the sampler runs identically everywhere from the same seed), and so are the steering
potentials, which are upstream's own, on the replicated coordinates and O(M) index features.
Confidence: per-pair outputs (pae,
pde) PAIR, per-token outputs replicated, scalars replicated. `gather_outputs` assembles upstream's
output dict on the writer rank only.
Communication per forward: the trunk's; the diffusion conditioning's band gathers; per denoising
step the score model's halos, token reductions and row merges (no bias tile moves) and one
all_gather of the coordinates; the confidence pairformer's rings and small all-reduces.
Affinity (an affinity checkpoint, `forward(..., affinity=AffinityInputs)`): a second input
embedding with the affinity MSA profile on the mesh (SINGLE_BY_I), then upstream's affinity heads
on the writer rank on the gathered crop (z, s_inputs) and the best-ipTM sample; outputs
replicated (one broadcast). Placements and communication: boltz_cp/modules/affinity.py.
Upstream twin: boltz/model/models/boltz2.py Boltz2.forward (inference path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from boltz.model.modules.trunkv2 import BFactorModule
from boltz_cp.distributed import TokenLayout, pair_from_tile, single_from_local
from boltz_cp.data.compact import sparse_index_map
from boltz_cp.models.trunk import TRUNK_MODULES, Boltz2Trunk, TrunkInputs
from boltz_cp.modules.atom_diffusion import AtomDiffusion
from boltz_cp.modules.confidence import ConfidenceInputs, ConfidenceModule
from boltz_cp.modules.diffusion_conditioning import DiffusionConditioning

MODEL_MODULES = (*TRUNK_MODULES, "diffusion_conditioning", "structure_module", "confidence_module",
                 "bfactor_module", "affinity_module", "affinity_module1", "affinity_module2")


@dataclass
class ModelInputs:
    """One rank's inputs: the trunk's, the confidence module's, the O(M) atom mask, and the
    features upstream's steering potentials read (replicated; the lean features with
    atom_to_token and token_to_rep_atom as O(M) sparse maps, see `sparse_index_map`)."""

    trunk: TrunkInputs
    confidence: ConfidenceInputs
    atom_pad_mask: Tensor
    potential_feats: Mapping[str, Tensor]

    @classmethod
    def cut(cls, feats: Mapping[str, Tensor], layout: TokenLayout) -> "ModelInputs":
        potential_feats = {**feats, **{name: sparse_index_map(feats, name)
                                       for name in ("atom_to_token", "token_to_rep_atom")}}
        trunk = TrunkInputs.cut(feats, layout)  # its pair-feature tiles serve the confidence module too
        return cls(trunk, ConfidenceInputs.cut(feats, layout, pair=trunk.pair), feats["atom_pad_mask"], potential_feats)


class Boltz2CP(Boltz2Trunk):
    """Upstream `Boltz2`'s inference modules as CP modules (see the module docstring)."""

    def __init__(self, hparams: Mapping[str, Any]) -> None:
        super().__init__(hparams)
        hp = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(hparams).items()}
        sm = hp["score_model_args"]
        self.diffusion_conditioning = DiffusionConditioning(
            token_s=hp["token_s"], token_z=hp["token_z"], atom_s=hp["atom_s"], atom_z=hp["atom_z"],
            atoms_per_window_queries=hp["atoms_per_window_queries"],
            atoms_per_window_keys=hp["atoms_per_window_keys"],
            atom_encoder_depth=sm["atom_encoder_depth"], atom_encoder_heads=sm["atom_encoder_heads"],
            token_transformer_depth=sm["token_transformer_depth"],
            token_transformer_heads=sm["token_transformer_heads"],
            atom_decoder_depth=sm["atom_decoder_depth"], atom_decoder_heads=sm["atom_decoder_heads"],
            atom_feature_dim=hp["atom_feature_dim"],
            conditioning_transition_layers=sm["conditioning_transition_layers"],
            use_no_atom_char=hp.get("use_no_atom_char", False),
            use_atom_backbone_feat=hp.get("use_atom_backbone_feat", False),
            use_residue_feats_atoms=hp.get("use_residue_feats_atoms", False),
        )
        self.structure_module = AtomDiffusion(
            score_model_args={"token_s": hp["token_s"], "atom_s": hp["atom_s"],
                              "atoms_per_window_queries": hp["atoms_per_window_queries"],
                              "atoms_per_window_keys": hp["atoms_per_window_keys"], **sm},
            **hp.get("diffusion_process_args", {}),
        )
        self.confidence_prediction = hp.get("confidence_prediction", False)
        if self.confidence_prediction:
            self.confidence_module = ConfidenceModule.from_hparams(hp)
        self.predict_bfactor = hp.get("predict_bfactor", False)
        if self.predict_bfactor:
            self.bfactor_module = BFactorModule(hp["token_s"], hp.get("num_bins", 64))
        self._init_affinity(hp)
        self.steering_args = hp.get("steering_args")
        self.predict_args = hp.get("predict_args")
        self.alpha_pae = hp.get("alpha_pae", 0.0)

    @classmethod
    def from_upstream(cls, model) -> "Boltz2CP":
        """The CP model of an upstream `Boltz2` (its own hparams), holding the same weights (strict)."""
        cp = cls(model.hparams)
        prefixes = tuple(f"{name}." for name in MODEL_MODULES)
        cp.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}, strict=True)
        cp.steering_args, cp.predict_args = model.steering_args, model.predict_args
        return cp.to(next(model.parameters()).dtype).eval()

    def _init_affinity(self, hp: dict) -> None:
        """Upstream's affinity heads (`AffinityModule`, run as is on the head rank, see
        modules/affinity.py) under upstream's names: affinity_module, or affinity_module1 / 2."""
        from boltz.model.modules.affinity import AffinityModule

        self.affinity_prediction = hp.get("affinity_prediction", False)
        self.affinity_ensemble = hp.get("affinity_ensemble", False)
        self.affinity_mw_correction = hp.get("affinity_mw_correction", True)  # upstream's default
        if not self.affinity_prediction:
            return
        if not self.confidence_prediction:
            raise ValueError("affinity_prediction needs confidence_prediction (ipTM picks the sample)")
        token_s, token_z = hp["token_s"], hp["token_z"]
        if self.affinity_ensemble:
            self.affinity_module1 = AffinityModule(token_s, token_z, **hp["affinity_model_args1"])
            self.affinity_module2 = AffinityModule(token_s, token_z, **hp["affinity_model_args2"])
        else:
            self.affinity_module = AffinityModule(token_s, token_z, **hp["affinity_model_args"])

    def _affinity(self, out: dict[str, Any], affinity, layout: TokenLayout) -> dict[str, Tensor]:
        """Upstream's affinity block: the input embedding with the affinity MSA profile on the
        mesh, then the heads on the crop's gathered z / s_inputs and the best-ipTM sample, on the
        head rank; results replicated (modules/affinity.py, placements there)."""
        from boltz_cp.modules.affinity import AffinityInputs, affinity_heads

        if not isinstance(affinity, AffinityInputs):
            raise TypeError("Boltz2CP.forward: an affinity checkpoint needs affinity=AffinityInputs.cut(...)")
        s_inputs = self.input_embedder(affinity.embedder, layout)
        heads = [self.affinity_module1, self.affinity_module2] if self.affinity_ensemble else [self.affinity_module]
        return affinity_heads(heads, out["z"], s_inputs, out["sample_atom_coords"], out["iptm"], affinity,
                              layout, self.affinity_mw_correction)

    def forward(self, inputs: ModelInputs, layout: TokenLayout, recycling_steps: int = 0,  # type: ignore[override]
                num_sampling_steps: int | None = None, diffusion_samples: int = 1,
                max_parallel_samples: int | None = None, affinity=None) -> dict[str, Any]:
        # relpos feeds the conditioning only: rebuilt for it (one small projection) rather than
        # held through the trunk's pair stages, and dropped before sampling and confidence
        out = super().forward(inputs.trunk, layout, recycling_steps, keep_relpos=False)
        s, z, s_inputs = out["s"], out["z"], out["s_inputs"]
        embedder = inputs.trunk.embedder
        conditioning = self.diffusion_conditioning(s, z, lambda: self.relative_position(inputs.trunk, layout),
                                                   embedder, layout)
        mesh = layout.mesh
        token_mask = single_from_local(inputs.trunk.feats_i["token_pad_mask"], mesh)
        with torch.autocast(z.device.type, enabled=False):
            struct = self.structure_module.sample(
                s_trunk=s, s_inputs=s_inputs, feats=inputs.potential_feats,
                num_sampling_steps=num_sampling_steps, atom_mask=inputs.atom_pad_mask.to(z.dtype),
                multiplicity=diffusion_samples, max_parallel_samples=max_parallel_samples,
                steering_args=self.steering_args, diffusion_conditioning=conditioning, inputs=embedder,
                layout=layout, token_mask=token_mask)
        del conditioning  # token_trans_bias and the atom biases: not needed by the confidence module
        out.update(struct)
        if self.predict_bfactor:
            out["pbfactor"] = single_from_local(self.bfactor_module(s.to_local()), mesh)
        if self.confidence_prediction:
            logits = pair_from_tile(out["pdistogram"].to_local()[:, :, :, 0], mesh)
            out.update(self.confidence_module(s_inputs, s, z, out["sample_atom_coords"], inputs.confidence,
                                              logits, layout, multiplicity=diffusion_samples,
                                              run_sequentially=True))
        if self.affinity_prediction:
            out.update(self._affinity(out, affinity, layout))
        return out




def gather_outputs(out: dict[str, Any], layout: TokenLayout, dst: int | None = 0) -> dict[str, Any] | None:
    """Upstream's output dict (full tensors, pad tokens dropped) on rank ``dst`` (every rank
    when dst is None: tests only); None elsewhere.

    PAIR outputs (z, pdistogram, pae, pde) are gathered to ``dst`` only; SINGLE_BY_I ones likewise;
    replicated tensors and dicts are taken as they are.
    """
    from boltz_cp.distributed import PAIR

    full: dict[str, Any] = {}
    for key, value in out.items():
        if isinstance(value, DTensor):
            if tuple(value.placements) == PAIR:
                value = layout.gather_pair(value, dst)
            else:
                value = layout.gather_single(value, dst)
        full[key] = value
    return full if dst is None or layout.mesh.rank == dst else None
