"""Parity cases of the diffusion conditioning (conditioned pair, structure-aware atom encoder,
attention biases of the diffusion module).

- `diffusion_conditioning`: Boltz-2's atom flags (atom name characters on, no backbone or
  per-atom residue features), B = 1.
- `diffusion_conditioning_variants`: use_no_atom_char, use_atom_backbone_feat,
  use_residue_feats_atoms, other depths and heads, B = 2.

Synthetic inputs: the input embedder's (`embedder_features`: tokens of 1-14 atoms, a trailing
fifth of pad tokens without atoms, atoms padded to whole windows, ref_space_uid per residue;
the dense atom_to_token for upstream only) plus random s_trunk [B, N, token_s], z_trunk and
relative_position_encoding [B, N, N, token_z]. The CP pieces are gathered back by rank order
(atoms, windows) and with layout.gather_pair (token_trans_bias), padding dropped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from boltz.data import const
from boltz.model.modules.diffusion_conditioning import DiffusionConditioning as UpstreamDiffusionConditioning
from boltz_cp.modules.diffusion_conditioning import DiffusionConditioning
from boltz_cp.modules.input_embedder import embedder_inputs
from boltz_cp.parity.cases.input_embedder import (
    ATOM_S,
    ATOM_Z,
    N_BACKBONE,
    N_CHARS,
    N_RESIDUE,
    H,
    W,
    embedder_features,
)
from boltz_cp.parity.runner import register, twin_from

TRUNK_KEYS = ("s_trunk", "z_trunk", "relative_position_encoding")


def gather_by_rank(x: torch.Tensor, mesh, total: int) -> torch.Tensor:
    """Every rank's [B, L, ...] piece concatenated in global rank order, cut to ``total``."""
    x = x.contiguous()
    if mesh.size == 1:
        parts = [x]
    else:
        parts = [torch.empty_like(x) for _ in range(mesh.size)]
        dist.all_gather(parts, x, group=mesh.group)
    return torch.cat(parts, dim=1)[:, :total]


@register("diffusion_conditioning")
class DiffusionConditioningCase:
    batch = 1
    flags: dict = {}
    atom_feature_dim = 3 + 1 + const.num_elements + N_CHARS
    depths = dict(atom_encoder_depth=3, atom_encoder_heads=2, token_transformer_depth=2,
                  token_transformer_heads=4, atom_decoder_depth=2, atom_decoder_heads=3)

    def args(self, token_s: int, token_z: int) -> dict:
        return dict(token_s=token_s, token_z=token_z, atom_s=ATOM_S, atom_z=ATOM_Z,
                    atoms_per_window_queries=W, atoms_per_window_keys=H,
                    atom_feature_dim=self.atom_feature_dim, conditioning_transition_layers=2,
                    **self.depths, **self.flags)

    def build(self, preset):
        return UpstreamDiffusionConditioning(**self.args(preset.token_s, preset.token_z))

    def cp_twin(self, upstream):
        token_s = upstream.atom_encoder.s_to_c_trans[0].normalized_shape[0]
        token_z = upstream.atom_encoder.z_to_p_trans[0].normalized_shape[0]
        return twin_from(upstream, DiffusionConditioning(**self.args(token_s, token_z)))

    def inputs(self, n, preset, generator):
        x = embedder_features(n, generator, self.batch)
        f64 = torch.float64
        x["s_trunk"] = torch.randn(self.batch, n, preset.token_s, generator=generator, dtype=f64)
        x["z_trunk"] = torch.randn(self.batch, n, n, preset.token_z, generator=generator, dtype=f64)
        x["relative_position_encoding"] = torch.randn(self.batch, n, n, preset.token_z,
                                                      generator=generator, dtype=f64)
        return x

    def serial(self, module, x):
        feats = {k: v for k, v in x.items() if k not in TRUNK_KEYS}
        q, c, _, enc, dec, tt = module(x["s_trunk"], x["z_trunk"], x["relative_position_encoding"], feats)
        return {"q": q, "c": c, "atom_enc_bias": enc, "atom_dec_bias": dec, "token_trans_bias": tt}

    def cp(self, module, x, layout):
        feats = {k: v for k, v in x.items() if k not in (*TRUNK_KEYS, "atom_to_token")}
        inputs = embedder_inputs(feats, layout, W, H)
        out = module(layout.shard_single(x["s_trunk"]), layout.shard_pair(x["z_trunk"]),
                     layout.shard_pair(x["relative_position_encoding"]), inputs, layout)
        m, mesh = x["ref_pos"].shape[1], layout.mesh
        res = {k: gather_by_rank(out[k], mesh, m) for k in ("q", "c")}
        for k in ("atom_enc_bias", "atom_dec_bias"):
            res[k] = gather_by_rank(out[k], mesh, m // W)
        res["token_trans_bias"] = layout.gather_pair(out["token_trans_bias"])
        return res


@register("diffusion_conditioning_variants")
class DiffusionConditioningVariantsCase(DiffusionConditioningCase):
    batch = 2
    flags = dict(use_no_atom_char=True, use_atom_backbone_feat=True, use_residue_feats_atoms=True)
    atom_feature_dim = 3 + 1 + const.num_elements + N_BACKBONE + N_RESIDUE
    depths = dict(atom_encoder_depth=2, atom_encoder_heads=4, token_transformer_depth=3,
                  token_transformer_heads=2, atom_decoder_depth=3, atom_decoder_heads=2)
