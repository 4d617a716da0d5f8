"""Boltz-2's trunk on the CP mesh: input embedding, pair init, recycling, templates, MSA module,
pairformer and distogram, with upstream's attribute names (so upstream weights load strictly).

Placements (mesh axes cp_i, cp_j), per rank, of `TrunkInputs` (cut by `TrunkInputs.cut` from a
featurized batch; the data path may build the same pieces directly):
    token features [B, N] -> feats_i (my row block I_r) and feats_j (my column block J_c);
    MSA features [B, S, N] -> my column block [B, S, N/p] of every row (`msa_column_blocks`);
    pair features token_bonds [B, N, N, 1], type_bonds [B, N, N], contact_conditioning
      [B, N, N, 5], contact_threshold [B, N, N] -> my tile (PAIR), built from the compact
      bond and constraint lists of `featurize_lean` (or cut from upstream's dense features);
    atom features and template features: O(M) / O(T*N), as the embedder and template module take
      them.
Outputs of `Boltz2Trunk.forward`: s [B, N, C_s] SINGLE_BY_I, z [B, N, N, C_z] PAIR, pdistogram
[B, N, N, 1, num_bins] PAIR, s_inputs [B, N, C_s] SINGLE_BY_I, relative_position_encoding
[B, N, N, C_z] PAIR (for the diffusion conditioning) (N padded to layout.n_padded).
Communication per forward: the input embedder's halo exchanges and token reduction; 1 transpose
(outer sum); per recycle: the template module's, MSA module's and pairformer's rings; 1 transpose
(distogram). Any R x C mesh (square ones run Cannon's schedules, others SUMMA's).
Upstream twin: boltz/model/models/boltz2.py Boltz2.forward, up to `pdistogram` (the trunk).

Control flow is identical on every rank (the recycle count is an argument, never data-dependent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from boltz.data import const
from boltz_cp.data.compact import pair_feature_tiles
from boltz_cp.distributed import TokenLayout, pair_from_tile, single_from_local
from boltz_cp.layers._dtensor import like
from boltz_cp.layers.pairformer import PairformerModule, residual_add
from boltz_cp.modules.encodersv2 import RelativePositionEncoder, outer_sum_init, token_blocks
from boltz_cp.modules.heads import DistogramModule
from boltz_cp.modules.input_embedder import InputEmbedder, embedder_inputs
from boltz_cp.modules.template import TemplateV2Module
from boltz_cp.modules.trunkv2 import ContactConditioning, MSAModule, msa_column_blocks

# Submodules of upstream Boltz2 that make up the trunk: their state-dict prefixes.
TRUNK_MODULES = (
    "input_embedder", "s_init", "z_init_1", "z_init_2", "rel_pos", "token_bonds", "token_bonds_type",
    "contact_conditioning", "s_norm", "z_norm", "s_recycle", "z_recycle", "template_module", "msa_module",
    "pairformer_module", "distogram_module",
)
# Per-token features the relative position encoding and the masks read.
TOKEN_FEATURES = ("asym_id", "residue_index", "entity_id", "sym_id", "token_index", "cyclic_period",
                  "token_pad_mask")


@dataclass
class TrunkInputs:
    """What one rank needs of a featurized input to run the trunk (see the module docstring)."""

    feats_i: dict[str, Tensor]
    feats_j: dict[str, Tensor]
    msa_cols: dict[str, Tensor]
    pair: dict[str, DTensor]
    embedder: Any
    template: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def cut(cls, feats: Mapping[str, Tensor], layout: TokenLayout) -> "TrunkInputs":
        """Cut a featurized batch (N = layout.n tokens) into my pieces: from `featurize_lean`
        (compact pair and atom maps, nothing N x N) or from upstream's dense features."""
        feats_i, feats_j = token_blocks({k: feats[k] for k in TOKEN_FEATURES}, layout)
        template = {k: v for k, v in feats.items() if k.startswith("template_") or k == "visibility_ids"}
        return cls(
            feats_i=feats_i,
            feats_j=feats_j,
            msa_cols=msa_column_blocks(feats, layout),
            pair=pair_feature_tiles(feats, layout),
            embedder=embedder_inputs(feats, layout),
            template=template,
        )


class Boltz2Trunk(nn.Module):
    """The trunk of upstream `Boltz2` as CP modules under the same attribute names."""

    def __init__(self, hparams: Mapping[str, Any]) -> None:
        super().__init__()
        hp = dict(hparams)
        token_s, token_z = hp["token_s"], hp["token_z"]
        self.input_embedder = InputEmbedder(
            atom_s=hp["atom_s"], atom_z=hp["atom_z"], token_s=token_s, token_z=token_z,
            atoms_per_window_queries=hp["atoms_per_window_queries"],
            atoms_per_window_keys=hp["atoms_per_window_keys"], atom_feature_dim=hp["atom_feature_dim"],
            use_no_atom_char=hp.get("use_no_atom_char", False),
            use_atom_backbone_feat=hp.get("use_atom_backbone_feat", False),
            use_residue_feats_atoms=hp.get("use_residue_feats_atoms", False),
            **hp.get("embedder_args", {}),
        )
        self.s_init = nn.Linear(token_s, token_s, bias=False)
        self.z_init_1 = nn.Linear(token_s, token_z, bias=False)
        self.z_init_2 = nn.Linear(token_s, token_z, bias=False)
        self.rel_pos = RelativePositionEncoder(token_z, fix_sym_check=hp.get("fix_sym_check", False),
                                               cyclic_pos_enc=hp.get("cyclic_pos_enc", False))
        self.token_bonds = nn.Linear(1, token_z, bias=False)
        self.bond_type_feature = hp.get("bond_type_feature", False)
        if self.bond_type_feature:
            self.token_bonds_type = nn.Embedding(len(const.bond_types) + 1, token_z)
        self.contact_conditioning = ContactConditioning(token_z, hp.get("conditioning_cutoff_min", 4.0),
                                                        hp.get("conditioning_cutoff_max", 20.0))
        self.s_norm = nn.LayerNorm(token_s)
        self.z_norm = nn.LayerNorm(token_z)
        self.s_recycle = nn.Linear(token_s, token_s, bias=False)
        self.z_recycle = nn.Linear(token_z, token_z, bias=False)
        self.use_templates = hp.get("use_templates", False)
        if self.use_templates:
            if not hp.get("use_templates_v2", False):
                raise ValueError("the CP trunk implements Boltz-2's template module (use_templates_v2) only")
            self.template_module = TemplateV2Module(token_z, **hp.get("template_args", {}))
        self.msa_module = MSAModule(token_z=token_z, token_s=token_s, **hp["msa_args"])
        self.pairformer_module = PairformerModule(token_s, token_z, **hp["pairformer_args"])
        self.distogram_module = DistogramModule(token_z, hp.get("num_bins", 64))

    @classmethod
    def from_upstream(cls, model: nn.Module) -> "Boltz2Trunk":
        """The trunk of an upstream `Boltz2` (its own hparams), holding the same weights (strict)."""
        trunk = cls(model.hparams)
        prefixes = tuple(f"{name}." for name in TRUNK_MODULES)
        state = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
        trunk.load_state_dict(state, strict=True)
        dtype = next(model.parameters()).dtype
        return trunk.to(dtype).eval()

    def relative_position(self, inputs: TrunkInputs, layout: TokenLayout) -> DTensor:
        """The trunk's relative position encoding [B, N, N, C_z] PAIR (cheap to rebuild: the
        diffusion conditioning gets a fresh one rather than a tile held through the trunk)."""
        return self.rel_pos(inputs.feats_i, inputs.feats_j, layout)

    def forward(self, inputs: TrunkInputs, layout: TokenLayout,  # type: ignore[override]
                recycling_steps: int = 0, keep_relpos: bool = True) -> dict[str, DTensor]:
        """``keep_relpos=False``: no relative_position_encoding in the result (the caller rebuilds
        it with `relative_position` when it needs it), so no tile of it lives through the trunk."""
        mesh = layout.mesh
        s_inputs = self.input_embedder(inputs.embedder, layout)
        s_init = like(s_inputs, self.s_init(s_inputs.to_local()))

        pair = inputs.pair
        z_tile = outer_sum_init(self.z_init_1, self.z_init_2, s_inputs, layout).to_local()
        relpos = self.relative_position(inputs, layout)
        z_tile = z_tile + relpos.to_local()
        if not keep_relpos:
            del relpos
        dtype = z_tile.dtype
        z_tile = z_tile + self.token_bonds(pair["token_bonds"].to_local().to(dtype))
        if self.bond_type_feature:
            z_tile = z_tile + self.token_bonds_type(pair["type_bonds"].to_local().long())
        threshold = pair_from_tile(pair["contact_threshold"].to_local().to(dtype), mesh)  # float32 as featurized
        z_tile = z_tile + self.contact_conditioning(pair["contact_conditioning"], threshold).to_local()

        mask_i = inputs.feats_i["token_pad_mask"].to(dtype)
        mask_j = inputs.feats_j["token_pad_mask"].to(dtype)
        mask = single_from_local(mask_i, mesh)
        pair_mask = pair_from_tile(mask_i[:, :, None] * mask_j[:, None, :], mesh)

        s = like(s_init, torch.zeros_like(s_init.to_local()))
        z = pair_from_tile(torch.zeros_like(z_tile), mesh)
        for step in range(recycling_steps + 1):
            s = like(s, s_init.to_local() + self.s_recycle(self.s_norm(s.to_local())))
            z = like(z, z_tile + self.z_recycle(self.z_norm(z.to_local())))
            if step == recycling_steps:
                del z_tile  # z_init: needed by the next recycle only
            # z is the trunk's own from here: the residuals below update it in place.
            if self.use_templates:
                z = like(z, residual_add(z.to_local(), self.template_module(z, inputs.template, pair_mask,
                                                                            layout).to_local(), owned=True))
            z = like(z, residual_add(z.to_local(), self.msa_module(z, s_inputs, inputs.msa_cols, pair_mask,
                                                                   layout).to_local(), owned=True))
            s, z = self.pairformer_module(s, z, mask, pair_mask, layout, consume=True)
        out = {"s": s, "z": z, "pdistogram": self.distogram_module(z, layout), "s_inputs": s_inputs}
        if keep_relpos:
            out["relative_position_encoding"] = relpos
        return out
