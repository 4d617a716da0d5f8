"""Boltz-2's affinity heads, fed from the CP mesh and run on one rank.

The affinity pass works on the predicted structure cropped to at most 256 tokens around the
binder (boltz_cp/data/affinity.py), so its z is at most 256 x 256 x C_z: the crop's z,
s_inputs and the chosen sample's coordinates are gathered to the head rank (the mesh's writer,
its tile (0, 0)), which runs upstream's own `AffinityModule` (same class, same parameter names: the checkpoint
loads strictly) exactly as upstream's forward calls it. The results are broadcast, so every
rank returns the same values and takes part in every collective in the same order, whatever
happens on the head rank.

Placements (mesh axes cp_i, cp_j):
    in:  z [B, N, N, C_z] PAIR (the trunk's); s_inputs [B, N, C_s] SINGLE_BY_I (the input
         embedder's with the affinity MSA profile); sample_atom_coords [B*m, M, 3] and iptm
         [B*m] replicated; `AffinityInputs` cut per rank (the head features on the head rank
         only: token_pad_mask, mol_type, affinity_token_mask [B, N], token_to_rep_atom
         [B, N, M] dense (O(256 * M) on the crop), affinity_mw).
    out: affinity_pred_value, affinity_probability_binary [B, 1] (an ensemble adds the *1 / *2
         values of each head) replicated. B = 1.
Communication per call: 1 gather of the z tiles to the head rank ([B, N, N, C_z] in all);
1 gather of s_inputs ([B, N, C_s]); 1 broadcast of the results and a status flag (at most 7
values). The input embedder run for s_inputs has its own (see input_embedder.py).
Upstream twin: boltz/model/models/boltz2.py Boltz2.forward, the `if self.affinity_prediction:`
block; boltz/model/modules/affinity.py AffinityModule (run unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from boltz_cp.distributed import TokenLayout
from boltz_cp.errors import BoltzCPError
from boltz_cp.modules.input_embedder import EmbedderInputs, embedder_inputs

HEAD_FEATURES = ("token_pad_mask", "mol_type", "affinity_token_mask")
OUTPUTS = ("affinity_pred_value", "affinity_probability_binary")
ENSEMBLE_OUTPUTS = (*OUTPUTS, "affinity_pred_value1", "affinity_probability_binary1",
                    "affinity_pred_value2", "affinity_probability_binary2")
# Upstream's molecular-weight correction of the ensemble's value (Boltz2.forward).
MW_MODEL_COEF, MW_COEF, MW_BIAS, MW_POWER = 1.03525938, -0.59992683, 2.83288489, 0.3


@dataclass
class AffinityInputs:
    """What one rank needs for the affinity heads (built by `AffinityInputs.cut`).

    embedder: the input embedder's inputs with profile_affinity / deletion_mean_affinity in place
        of the MSA profile (upstream: `input_embedder(feats, affinity=True)`).
    head: the head rank's features (None elsewhere), see the module docstring.
    """

    embedder: EmbedderInputs
    head: dict | None

    @classmethod
    def cut(cls, feats: Mapping[str, Tensor], layout: TokenLayout) -> "AffinityInputs":
        """From a featurized affinity batch (`featurize_affinity`, lean or dense)."""
        from boltz_cp.data.compact import dense_rows

        missing = [k for k in (*HEAD_FEATURES, "affinity_mw") if k not in feats]
        if missing:  # checked on every rank, so that no rank alone stops before the collectives
            raise KeyError(f"AffinityInputs.cut: missing affinity features {missing} (featurize_affinity makes them)")
        head = None
        if layout.mesh.is_writer:  # the head rank: the writer, which writes the affinity json
            head = {k: feats[k] for k in HEAD_FEATURES}
            rep = feats.get("token_to_rep_atom")
            head["token_to_rep_atom"] = dense_rows(feats, "token_to_rep_atom") if rep is None else rep
            head["affinity_mw"] = feats["affinity_mw"]
        return cls(embedder_inputs(feats, layout, affinity=True), head)


def cross_pair_mask(head: Mapping, dtype: torch.dtype) -> Tensor:
    """[N, N]: binder-receptor, receptor-binder and binder-binder pairs of real tokens (receptor =
    protein tokens), as upstream masks z before the heads (its sum of the three products)."""
    pad = head["token_pad_mask"][0].to(dtype)
    receptor = (head["mol_type"][0] == 0).to(dtype) * pad
    binder = head["affinity_token_mask"][0].bool().to(dtype) * pad
    return (binder[:, None] * receptor[None, :] + receptor[:, None] * binder[None, :]
            + binder[:, None] * binder[None, :])


def run_heads(heads: Sequence[nn.Module], z: Tensor, s_inputs: Tensor, coords: Tensor, iptm: Tensor,
              head: Mapping, mw_correction: bool) -> dict[str, Tensor]:
    """Upstream's affinity block on full tensors (one rank): z masked to the binder's pairs, the
    sample with the highest ipTM, one `AffinityModule` (or the mean of an ensemble of two, with
    the optional molecular-weight correction of the value). Outputs [B, 1]."""
    z = z * cross_pair_mask(head, z.dtype)[None, :, :, None]
    best = int(torch.argsort(iptm, descending=True)[0])
    x_pred = coords[best][None, None]
    results = []
    with torch.autocast("cuda", enabled=False):
        for module in heads:
            out = module(s_inputs=s_inputs, z=z, x_pred=x_pred, feats=head, multiplicity=1, use_kernels=False)
            results.append((out["affinity_pred_value"], torch.sigmoid(out["affinity_logits_binary"])))
    if len(results) == 1:
        value, probability = results[0]
        return {"affinity_pred_value": value, "affinity_probability_binary": probability}
    (value1, probability1), (value2, probability2) = results
    value = (value1 + value2) / 2
    if mw_correction:
        value = MW_MODEL_COEF * value + MW_COEF * head["affinity_mw"][0] ** MW_POWER + MW_BIAS
    return {"affinity_pred_value": value, "affinity_probability_binary": (probability1 + probability2) / 2,
            "affinity_pred_value1": value1, "affinity_probability_binary1": probability1,
            "affinity_pred_value2": value2, "affinity_probability_binary2": probability2}


def affinity_heads(heads: Sequence[nn.Module], z, s_inputs, coords: Tensor, iptm: Tensor,
                   inputs: AffinityInputs, layout: TokenLayout, mw_correction: bool) -> dict[str, Tensor]:
    """Gather the crop to the head rank, run the heads there, broadcast the results (every rank).

    z is the trunk's PAIR DTensor, s_inputs the affinity embedding (SINGLE_BY_I DTensor). Every
    rank makes the same three collectives in the same order; if the heads fail on the head rank,
    it says so in the broadcast and every rank raises (none waits for a message that never comes).
    """
    mesh = layout.mesh
    like = z.to_local()
    z_full = layout.gather_pair(z, mesh.writer)
    s_full = layout.gather_single(s_inputs, mesh.writer)
    keys = ENSEMBLE_OUTPUTS if len(heads) == 2 else OUTPUTS
    shared = torch.zeros(1 + len(keys), dtype=like.dtype, device=like.device)  # [ok, values...]
    failure: Exception | None = None
    if mesh.is_writer:
        try:
            out = run_heads(heads, z_full, s_full, coords, iptm, inputs.head, mw_correction)
            shared[0] = 1
            shared[1:] = torch.cat([out[k].reshape(-1) for k in keys]).to(shared.dtype)
        except Exception as e:  # noqa: BLE001 -- reported to every rank, then raised here
            if mesh.size == 1:
                raise
            failure = e
    if mesh.size > 1:
        dist.broadcast(shared, src=mesh.writer, group=mesh.group)
    if failure is not None:
        raise failure
    if shared[0] != 1:
        raise BoltzCPError(f"the affinity heads failed on rank {mesh.writer} (its own error says why)")
    return {k: shared[1 + i].reshape(1, 1) for i, k in enumerate(keys)}
