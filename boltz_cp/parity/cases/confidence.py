"""Parity case `confidence`: upstream `ConfidenceModule` (with its `ConfidenceHeads`) vs the CP
`boltz_cp.modules.confidence.ConfidenceModule`, same random weights (the `tiny` checkpoint
preset's confidence module, whatever the runner's preset), multiplicity 2.

Input: the `trunk` case's real featurized complex (two proteins, DNA, the 4-token ligand EDO
with a pocket constraint; N = 28), edited so that the last ligand token is a chain of its own
(a one-token chain; the ligand chain keeps 3 atoms, so upstream's non-polymer frame search
runs) and the ligand token before it is masked (token_pad_mask 0). Upstream's dense pair
features are rebuilt from the compact forms after the edit; upstream reads the dense features,
the CP module only `featurize_lean`'s compact keys. s_inputs, s, z, pred_distogram_logits
random; x_pred random coordinates (about 8 A spread, so contacts < 8 A and every distance bin
occur). Every output upstream returns is compared (pair_chains_iptm per chain pair).
`--tokens` does not apply.
"""

from __future__ import annotations

import torch

from boltz_cp.parity.cases.trunk import featurized_input
from boltz_cp.parity.runner import register, twin_from

MULTIPLICITY = 2
PAIR_OUTPUTS = ("pae", "pde", "pae_logits", "pde_logits")
SINGLE_OUTPUTS = ("plddt", "plddt_logits", "resolved_logits")


def edited_features() -> dict[str, torch.Tensor]:
    """The trunk case's features with a one-token chain and a masked token (see above)."""
    from boltz_cp.data.compact import pair_feature_tile

    feats = dict(featurized_input())
    asym = feats["asym_id"].clone()
    asym[0, -1] = int(asym.max()) + 1
    pad = feats["token_pad_mask"].clone()
    pad[0, -2] = 0
    feats["asym_id"], feats["token_pad_mask"] = asym, pad
    dense = pair_feature_tile(feats, slice(None), slice(None))
    feats.update({k: (v.double() if v.is_floating_point() else v) for k, v in dense.items()})
    return feats


def flatten(out: dict) -> dict[str, torch.Tensor]:
    """Outputs as a flat dict of tensors: pair_chains_iptm[a][b] -> 'pair_chains_iptm[a][b]'."""
    flat = {k: v for k, v in out.items() if k != "pair_chains_iptm"}
    for a, row in out["pair_chains_iptm"].items():
        for b, v in row.items():
            flat[f"pair_chains_iptm[{a}][{b}]"] = v
    return flat


@register("confidence")
class ConfidenceCase:
    checkpoint_preset = "tiny"  # the runner's layer widths do not apply

    def build(self, preset):
        from boltz_cp.models.checkpoint import build_model
        from boltz_cp.models.presets import PRESETS

        model = build_model(PRESETS["tiny"])
        self.hparams = dict(model.hparams)
        return model.confidence_module

    def cp_twin(self, upstream):
        from boltz_cp.modules.confidence import ConfidenceModule

        return twin_from(upstream, ConfidenceModule.from_hparams(self.hparams))

    def inputs(self, n, preset, generator):
        from boltz_cp.models.presets import PRESETS

        feats = edited_features()
        n = feats["token_pad_mask"].shape[1]
        m_atoms = feats["atom_pad_mask"].shape[1]
        token_s, token_z = PRESETS["tiny"]["token_s"], PRESETS["tiny"]["token_z"]

        def randn(*shape, scale=1.0):
            return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)

        return {**feats,
                "s_inputs": randn(1, n, token_s), "s": randn(1, n, token_s), "z": randn(1, n, n, token_z),
                "pred_distogram_logits": randn(1, n, n, 64, scale=2.0),
                "x_pred": randn(MULTIPLICITY, m_atoms, 3, scale=8.0)}

    def num_tokens(self, inputs) -> int:
        return inputs["token_pad_mask"].shape[1]

    def serial(self, module, x):
        out = module(x["s_inputs"], x["s"], x["z"], x["x_pred"], dict(x), x["pred_distogram_logits"],
                     multiplicity=MULTIPLICITY)
        return flatten(out)

    def cp(self, module, x, layout):
        from boltz_cp.data.compact import DENSE_KEYS
        from boltz_cp.modules.confidence import ConfidenceInputs

        lean = {k: v for k, v in x.items() if k not in DENSE_KEYS}  # no N x N feature reaches CP
        out = module(layout.shard_single(x["s_inputs"]), layout.shard_single(x["s"]), layout.shard_pair(x["z"]),
                     x["x_pred"], ConfidenceInputs.cut(lean, layout), layout.shard_pair(x["pred_distogram_logits"]),
                     layout, multiplicity=MULTIPLICITY)
        out = flatten(out)
        for k in PAIR_OUTPUTS:
            out[k] = layout.gather_pair(out[k])
        for k in SINGLE_OUTPUTS:
            out[k] = layout.gather_single(out[k])
        return out
