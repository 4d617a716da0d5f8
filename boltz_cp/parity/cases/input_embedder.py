"""Parity cases of the input embedder (s_inputs from atoms and token features).

- `input_embedder`: Boltz-2's flags (method, modified, cyclic and mol-type conditioning; atom
  name characters on; no backbone or per-atom residue features), B = 1.
- `input_embedder_variants`: the other flags: use_no_atom_char, use_atom_backbone_feat,
  use_residue_feats_atoms, no conditioning embeddings, affinity profiles, B = 2.

Synthetic inputs: tokens of 1-14 atoms (windows of 32 atoms straddle tokens, ranks straddle
tokens), a trailing fifth of pad tokens (token_pad_mask 0, no atoms, zero features), atoms
padded to whole windows with at least one pad atom (atom_pad_mask 0, no token), ref_space_uid
per residue (residues of one or more tokens). The dense atom_to_token goes to upstream only;
the CP side reads atom_to_token_index.
"""

from __future__ import annotations

import torch
from torch.nn.functional import one_hot

from boltz.data import const
from boltz.model.modules.trunkv2 import InputEmbedder as UpstreamInputEmbedder
from boltz_cp.modules.input_embedder import InputEmbedder, embedder_inputs
from boltz_cp.parity.runner import register, twin_from

W, H = 32, 128
ATOM_S, ATOM_Z = 16, 8
N_CHARS = 4 * 64
N_BACKBONE = 1 + len(const.protein_backbone_atom_index) + len(const.nucleic_backbone_atom_index)
N_RESIDUE = const.num_tokens + 1 + 4


def embedder_features(n: int, generator: torch.Generator, batch: int = 1) -> dict[str, torch.Tensor]:
    """Random featurized-like inputs for n tokens (float64 where upstream reads floats)."""
    g = generator
    n_pad = n // 5
    n_real = n - n_pad
    counts = [torch.randint(1, 15, (n_real,), generator=g) for _ in range(batch)]
    m = W * (-(-(max(int(c.sum()) for c in counts) + 1) // W))
    f64 = torch.float64
    out = {
        "ref_pos": torch.zeros(batch, m, 3, dtype=f64),
        "ref_charge": torch.zeros(batch, m, dtype=f64),
        "ref_element": torch.zeros(batch, m, const.num_elements, dtype=torch.long),
        "ref_atom_name_chars": torch.zeros(batch, m, 4, 64, dtype=torch.long),
        "atom_backbone_feat": torch.zeros(batch, m, N_BACKBONE, dtype=torch.long),
        "atom_pad_mask": torch.zeros(batch, m, dtype=f64),
        "ref_space_uid": torch.zeros(batch, m, dtype=torch.long),
        "atom_to_token_index": torch.full((batch, m), -1, dtype=torch.long),
    }
    real = torch.zeros(batch, n, dtype=f64)
    real[:, :n_real] = 1
    for b, cnt in enumerate(counts):
        token = torch.repeat_interleave(torch.arange(n_real), cnt)
        ma = token.numel()
        # A new residue at each token with prob. 0.7: some residues hold several tokens.
        new_res = (torch.rand(n_real, generator=g) < 0.7).long()
        new_res[0] = 0
        out["atom_to_token_index"][b, :ma] = token
        out["ref_space_uid"][b, :ma] = torch.cumsum(new_res, 0)[token]
        out["atom_pad_mask"][b, :ma] = 1
        out["ref_pos"][b, :ma] = 3 * torch.randn(ma, 3, generator=g, dtype=f64)
        out["ref_charge"][b, :ma] = torch.randint(-1, 2, (ma,), generator=g).to(f64)
        out["ref_element"][b, :ma] = one_hot(torch.randint(0, const.num_elements, (ma,), generator=g),
                                             const.num_elements)
        out["ref_atom_name_chars"][b, :ma] = one_hot(torch.randint(0, 64, (ma, 4), generator=g), 64)
        out["atom_backbone_feat"][b, :ma] = one_hot(torch.randint(0, N_BACKBONE, (ma,), generator=g),
                                                    N_BACKBONE)
    index = out["atom_to_token_index"]
    out["atom_to_token"] = (one_hot(index.clamp(min=0), n) * (index >= 0)[..., None]).to(f64)

    def per_token(x: torch.Tensor) -> torch.Tensor:
        return x * real.view(batch, n, *([1] * (x.dim() - 2))).to(x.dtype)

    def profile() -> torch.Tensor:
        return per_token(torch.softmax(torch.randn(batch, n, const.num_tokens, generator=g, dtype=f64), -1))

    out.update(
        token_pad_mask=real,
        res_type=per_token(one_hot(torch.randint(0, const.num_tokens, (batch, n), generator=g),
                                   const.num_tokens).to(f64)),
        profile=profile(),
        deletion_mean=per_token(torch.rand(batch, n, generator=g, dtype=f64)),
        profile_affinity=profile(),
        deletion_mean_affinity=per_token(torch.rand(batch, n, generator=g, dtype=f64)),
        method_feature=per_token(torch.randint(0, const.num_method_types, (batch, n), generator=g)),
        modified=per_token(torch.randint(0, 2, (batch, n), generator=g)),
        cyclic_period=per_token(torch.tensor([0.0, 0.0, 0.0, 5.0, 12.0], dtype=f64)[
            torch.randint(0, 5, (batch, n), generator=g)]),
        mol_type=per_token(torch.randint(0, len(const.chain_type_ids), (batch, n), generator=g)),
    )
    return out


@register("input_embedder")
class InputEmbedderCase:
    batch, affinity = 1, False
    flags = dict(add_method_conditioning=True, add_modified_flag=True, add_cyclic_flag=True,
                 add_mol_type_feat=True)
    atom_feature_dim = 3 + 1 + const.num_elements + N_CHARS
    depth, heads = 3, 2

    def args(self, token_s: int) -> dict:
        # token_z only shapes the structure-conditioning layers, which the embedder lacks.
        return dict(atom_s=ATOM_S, atom_z=ATOM_Z, token_s=token_s, token_z=token_s,
                    atoms_per_window_queries=W, atoms_per_window_keys=H,
                    atom_feature_dim=self.atom_feature_dim, atom_encoder_depth=self.depth,
                    atom_encoder_heads=self.heads, **self.flags)

    def build(self, preset):
        return UpstreamInputEmbedder(**self.args(preset.token_s))

    def cp_twin(self, upstream):
        return twin_from(upstream, InputEmbedder(**self.args(upstream.token_s)))

    def inputs(self, n, preset, generator):
        return embedder_features(n, generator, self.batch)

    def serial(self, module, x):
        return {"s_inputs": module(x, affinity=self.affinity)}

    def cp(self, module, x, layout):
        feats = {k: v for k, v in x.items() if k != "atom_to_token"}
        inputs = embedder_inputs(feats, layout, W, H, affinity=self.affinity)
        return {"s_inputs": layout.gather_single(module(inputs, layout))}


@register("input_embedder_variants")
class InputEmbedderVariantsCase(InputEmbedderCase):
    batch, affinity = 2, True
    flags = dict(use_no_atom_char=True, use_atom_backbone_feat=True, use_residue_feats_atoms=True)
    atom_feature_dim = 3 + 1 + const.num_elements + N_BACKBONE + N_RESIDUE
    depth, heads = 2, 4
