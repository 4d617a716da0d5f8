"""CP twins of Boltz-2's confidence module (Algorithm 31) and its heads.

Placements (mesh axes cp_i, cp_j; N = layout.n_padded, B*m = batch x multiplicity):
    in:  s_inputs, s [B, N, C_s] SINGLE_BY_I; z [B, N, N, C_z] PAIR; pred_distogram_logits
         [B, N, N, num_bins] PAIR (upstream passes the trunk's first distogram; the trunk's own
         [B, N, N, 1, num_bins] is accepted too); x_pred [B*m, M, 3] (or [B, m, M, 3]) plain,
         replicated on every rank; `ConfidenceInputs` cut per rank by `ConfidenceInputs.cut`
         (token blocks I_r / J_c, pair feature tiles, O(N + M) per-token / per-atom vectors).
    out: pae, pde [B*m, N, N] and pae_logits, pde_logits [B*m, N, N, bins] PAIR; plddt
         [B*m, N], plddt_logits [B*m, N, bins], resolved_logits [B*m, N, 2] SINGLE_BY_I;
         complex_plddt, complex_iplddt, complex_pde, complex_ipde, ptm, iptm, ligand_iptm,
         protein_iptm [B*m] and pair_chains_iptm {chain: {chain: [B*m]}} replicated.
Communication per call (square p x p mesh, n = N/p, C chains):
    z init: 1 column_block of [B, n, 2*C_z] (s_to_z_transpose and s_to_z_prod_in2 of my
      row block, packed); the pairformer stack: its layers' rings;
    heads: 1 transpose_exchange of the z tile [B*m, n, n, C_z] (pde uses z + z^T); on ring_j
      1 all-reduce MAX of [B*m, n] (iplddt interface mask) and 1 all-reduce SUM of
      [B*m, n, 12 + C] (row sums of the pTM / ipTM / PDE numerators and denominators and the
      per-chain pTM sums); on ring_i 1 all-reduce SUM of [B*m, 8] and 1 all-reduce MAX of
      [B*m, 4 + C*C]. Nothing N x N is gathered; the distance tile comes from O(n)
      representative-atom coordinates indexed out of the replicated x_pred.
Upstream twin: boltz/model/modules/confidencev2.py ConfidenceModule, ConfidenceHeads;
boltz/model/layers/confidence_utils.py compute_aggregated_metric, compute_ptms;
boltz/model/loss/confidence.py compute_frame_pred (inference=True).

Built by upstream's __init__ with the pairformer stack, heads, relative position encoder and
contact conditioning replaced by CP twins under the same attribute names (strict state-dict
load). Token-level confidence only (Boltz-2's configuration). Inference only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from boltz.data import const
from boltz.model.loss.confidence import compute_collinear_mask
from boltz.model.modules import confidencev2 as upstream
from boltz_cp.distributed import (
    PAIR,
    SINGLE_BY_I,
    TokenLayout,
    check_placements,
    pad_tokens,
    pair_from_tile,
    single_from_local,
    transpose_exchange,
)
from boltz_cp.distributed.comm import column_block
from boltz_cp.distributed.tiles import contiguous_stride
from boltz_cp.errors import ConfigError
from boltz_cp.layers.pairformer import PairformerModule
from boltz_cp.data.compact import pair_feature_tiles
from boltz_cp.modules.encodersv2 import RelativePositionEncoder, token_blocks
from boltz_cp.modules.trunkv2 import ContactConditioning

# Per-token features cut into blocks I_r / J_c.
BLOCK_FEATURES = ("asym_id", "residue_index", "entity_id", "sym_id", "token_index", "cyclic_period",
                  "token_pad_mask", "mol_type", "token_to_rep_atom_index")
# O(N) / O(M) vectors every rank keeps whole (the frame mask of pTM needs whole ligand chains).
REPLICATED_FEATURES = ("asym_id", "token_pad_mask", "mol_type", "frames_idx", "atom_to_token_index",
                       "atom_pad_mask")
LIGAND_WEIGHT, INTERFACE_WEIGHT, NON_INTERFACE_WEIGHT = 20, 10, 1  # upstream's iplddt weights


def _index_of_one_hot(one_hot: Tensor) -> Tensor:
    """[B, L, K] one-hot (rows may be all zero) -> [B, L] index, -1 for an all-zero row."""
    return torch.where(one_hot.sum(-1) > 0, one_hot.argmax(-1), torch.full_like(one_hot[..., 0], -1)).long()


@dataclass
class ConfidenceInputs:
    """What one rank needs of a featurized batch for the confidence module.

    feats_i / feats_j: `BLOCK_FEATURES` of my row block I_r / column block J_c (`token_blocks`);
    pair: my tiles of token_bonds, type_bonds, contact_conditioning, contact_threshold (PAIR);
    tokens: `REPLICATED_FEATURES` whole (N real tokens, M atoms); chains: the sorted distinct
    asym ids of the real tokens (upstream's `torch.unique(asym_id)`).
    """

    feats_i: dict[str, Tensor]
    feats_j: dict[str, Tensor]
    pair: dict[str, DTensor]
    tokens: dict[str, Tensor]
    chains: Tensor

    @classmethod
    def cut(cls, feats: Mapping[str, Tensor], layout: TokenLayout,
            pair: dict[str, DTensor] | None = None) -> "ConfidenceInputs":
        """From `featurize_lean`'s compact keys (or, failing those, upstream's dense maps,
        reduced to indices host-side). O(tile + N + M) per rank; no communication. ``pair``:
        the pair-feature tiles when the caller has them already (the trunk's: built once)."""
        feats = dict(feats)
        if "token_to_rep_atom_index" not in feats:
            feats["token_to_rep_atom_index"] = _index_of_one_hot(feats["token_to_rep_atom"])
        if "atom_to_token_index" not in feats:
            feats["atom_to_token_index"] = _index_of_one_hot(feats["atom_to_token"])
        feats_i, feats_j = token_blocks({k: feats[k] for k in BLOCK_FEATURES}, layout)
        return cls(feats_i=feats_i, feats_j=feats_j, pair=pair if pair is not None else pair_feature_tiles(feats, layout),
                   tokens={k: feats[k] for k in REPLICATED_FEATURES},
                   chains=torch.unique(feats["asym_id"]))


def confidence_module_kwargs(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The ConfidenceModule constructor arguments upstream Boltz2 derives from its hparams."""
    hp = dict(hparams)
    return dict(
        token_s=hp["token_s"], token_z=hp["token_z"],
        token_level_confidence=hp.get("token_level_confidence", True),
        bond_type_feature=hp.get("bond_type_feature", False),
        fix_sym_check=hp.get("fix_sym_check", False), cyclic_pos_enc=hp.get("cyclic_pos_enc", False),
        conditioning_cutoff_min=hp.get("conditioning_cutoff_min", 4.0),
        conditioning_cutoff_max=hp.get("conditioning_cutoff_max", 20.0),
        **{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in hp["confidence_model_args"].items()},
    )


def aggregated_metric(logits: Tensor, end: float = 1.0) -> Tensor:
    """Expected bin centre of softmax(logits) over [0, end] (upstream compute_aggregated_metric),
    with the bin centres in at least fp32 rather than the default dtype."""
    num_bins = logits.shape[-1]
    width = end / num_bins
    dtype = torch.promote_types(logits.dtype, torch.float32)
    centres = torch.arange(0.5 * width, end, width, dtype=dtype, device=logits.device)
    return (torch.softmax(logits, dim=-1) * centres).sum(-1)


def _all_reduce(x: Tensor, group, op) -> Tensor:
    if dist.get_world_size(group) > 1:
        x = x.contiguous()
        dist.all_reduce(x, op=op, group=group)
    return x


def frame_mask(x_pred: Tensor, tokens: Mapping[str, Tensor], multiplicity: int) -> Tensor:
    """Upstream's inference frame mask of pTM: [B*m, N] (N real tokens), 1 where the token's
    frame (its three frame atoms, re-chosen by distance for non-polymer chains of >= 3 atoms) is
    neither collinear nor overlapping, times token_pad_mask.

    Replicated O(N + M) work plus one distance matrix per ligand chain (its atoms squared), as
    upstream. Chains are walked in sorted asym-id order with running token / atom offsets that
    count unmasked tokens and atoms only, exactly as upstream does.
    """
    asym, pad = tokens["asym_id"], tokens["token_pad_mask"]
    atom_pad, a2t = tokens["atom_pad_mask"], tokens["atom_to_token_index"]
    batch, n = asym.shape
    bm, m_atoms, _ = x_pred.shape
    x = x_pred.reshape(batch, multiplicity, m_atoms, 3)
    asym_atom = torch.where(a2t >= 0, asym.gather(1, a2t.clamp(min=0)), torch.zeros_like(a2t))
    frames = tokens["frames_idx"].repeat_interleave(multiplicity, 0).reshape(batch, multiplicity, n, 3).clone()
    for b in range(batch):
        tok0 = atom0 = 0
        for cid in torch.unique(asym[b]).tolist():
            n_tok = int(((asym[b] == cid) * pad[b]).sum().item())
            atoms_in = ((asym_atom[b] == cid) * atom_pad[b]).bool()
            n_atm = int(atoms_in.sum().item())
            if int(tokens["mol_type"][b, tok0]) == const.chain_type_ids["NONPOLYMER"] and n_atm >= 3:
                xa = x[b][:, atoms_in]  # [m, A, 3]
                # Same arithmetic as upstream, so that the sort sees the same bits (chain atoms are
                # all unpadded, so upstream's +inf on unresolved pairs adds nothing here).
                dist_aa = ((xa[:, None, :, :] - xa[:, :, None, :]) ** 2).sum(-1) ** 0.5
                order = torch.sort(dist_aa, dim=2).indices
                frames[b, :, tok0:tok0 + n_atm] = torch.stack(
                    (order[..., 1], order[..., 0], order[..., 2]), dim=-1) + atom0
            tok0 += n_tok
            atom0 += n_atm
    bi = torch.arange(batch, device=x.device)[:, None, None, None]
    mi = torch.arange(multiplicity, device=x.device)[None, :, None, None]
    f = x[bi, mi, frames].reshape(-1, 3, 3)
    ok = compute_collinear_mask(f[:, 1] - f[:, 0], f[:, 1] - f[:, 2]).reshape(batch, multiplicity, n)
    return (ok * pad[:, None, :]).reshape(bm, n)


class ConfidenceHeads(upstream.ConfidenceHeads):
    """pae / pde / plddt / resolved logits and upstream's aggregate scores, on tiles.

    Placements and communication: see the module docstring (the heads part). Same parameters
    as upstream (to_pae_[intra_|inter_]logits, to_pde_..., to_plddt_logits, to_resolved_logits).
    """

    def __init__(self, token_s: int, token_z: int, num_plddt_bins: int = 50, num_pde_bins: int = 64,
                 num_pae_bins: int = 64, token_level_confidence: bool = True,
                 use_separate_heads: bool = False, **kwargs) -> None:
        if not token_level_confidence:
            raise ConfigError("the CP confidence heads implement token-level confidence only "
                              "(Boltz-2's token_level_confidence=True)")
        super().__init__(token_s, token_z, num_plddt_bins, num_pde_bins, num_pae_bins,
                         token_level_confidence, use_separate_heads, **kwargs)

    def _pair_logits(self, x: Tensor, same: Tensor, kind: str) -> Tensor:
        if not self.use_separate_heads:
            return getattr(self, f"to_{kind}_logits")(x)
        same = same.to(x.dtype).unsqueeze(-1)
        inter = getattr(self, f"to_{kind}_inter_logits")(x) * (1 - same)
        intra = getattr(self, f"to_{kind}_intra_logits")(x) * same
        return inter + intra

    def forward(self, s: DTensor, z: DTensor, x_pred: Tensor, d_tile: Tensor,  # type: ignore[override]
                inputs: ConfidenceInputs, pred_distogram_logits: DTensor, layout: TokenLayout,
                multiplicity: int = 1) -> dict[str, Any]:
        name = type(self).__name__
        check_placements(f"{name}.s", s, SINGLE_BY_I)
        check_placements(f"{name}.z", z, PAIR)
        check_placements(f"{name}.pred_distogram_logits", pred_distogram_logits, PAIR)
        mesh, m = layout.mesh, multiplicity
        pdl_tile = pred_distogram_logits.to_local()
        if pdl_tile.dim() == 5:  # the trunk's [B, N, N, num_distograms, bins]: the first, as upstream
            pdl_tile = pdl_tile[:, :, :, 0]
        rows, cols = layout.rows, layout.cols
        z_tile, s_tile = z.to_local(), s.to_local()
        ct = z_tile.dtype

        def rep(t: Tensor) -> Tensor:
            return t.repeat_interleave(m, 0)

        fi, fj = inputs.feats_i, inputs.feats_j
        asym_i, asym_j = rep(fi["asym_id"]), rep(fj["asym_id"])
        pad_i, pad_j = rep(fi["token_pad_mask"]).to(ct), rep(fj["token_pad_mask"]).to(ct)
        real_j = (~layout.is_pad(cols, z_tile.device)).to(ct)  # layout padding, not masking
        same = asym_i[:, :, None] == asym_j[:, None, :]  # [Bm, n, n]
        diff = (~same).to(ct)
        lig_i = (rep(fi["mol_type"]) == const.chain_type_ids["NONPOLYMER"]).to(ct)
        lig_j = (rep(fj["mol_type"]) == const.chain_type_ids["NONPOLYMER"]).to(ct)
        prot_i = (rep(fi["mol_type"]) == const.chain_type_ids["PROTEIN"]).to(ct)
        prot_j = (rep(fj["mol_type"]) == const.chain_type_ids["PROTEIN"]).to(ct)

        # z + z^T for pde: my tile receives tile (c, r) from the transpose partner.
        pending = transpose_exchange(z_tile, mesh)
        pae_logits = self._pair_logits(z_tile, same, "pae")
        resolved_logits = self.to_resolved_logits(s_tile)
        plddt_logits = self.to_plddt_logits(s_tile)
        z_sym = z_tile + pending.wait().transpose(1, 2)
        pde_logits = self._pair_logits(z_sym, same, "pde")
        del z_sym

        # pLDDT and the interface-weighted ipLDDT (rows: SINGLE_BY_I, sums over ring_i).
        plddt = aggregated_metric(plddt_logits)
        contact = ((d_tile < 8).to(ct) * diff * (1 - lig_i)[:, :, None] * real_j[None, None, :])
        interface = _all_reduce(contact.amax(dim=-1), mesh.ring_j, dist.ReduceOp.MAX)
        non_interface = (1 - interface) * (1 - lig_i)
        weight = lig_i * LIGAND_WEIGHT + interface * INTERFACE_WEIGHT + non_interface * NON_INTERFACE_WEIGHT

        # PDE over contact-probable pairs (upstream: the first 20 distogram bins), no diagonal.
        pde = aggregated_metric(pde_logits, end=32)
        pae = aggregated_metric(pae_logits, end=32)
        prob = rep(torch.softmax(pdl_tile, dim=-1))
        contacts = torch.zeros((1, 1, 1, prob.shape[-1]), dtype=prob.dtype, device=prob.device)
        contacts[..., :20] = 1.0
        prob_contact = (prob * contacts).sum(-1)
        gi = torch.arange(rows.start, rows.stop, device=z_tile.device)
        gj = torch.arange(cols.start, cols.stop, device=z_tile.device)
        off_diag = (gi[:, None] != gj[None, :]).to(ct)
        pair_w = pad_i[:, :, None] * pad_j[:, None, :] * off_diag * prob_contact
        inter_w = pair_w * diff

        # pTM family: tm-weighted expected pae per pair, row sums over j (ring_j).
        n_res = inputs.tokens["token_pad_mask"].to(ct).sum(-1, keepdim=True).repeat_interleave(m, 0)  # [Bm, 1]
        num_bins = pae_logits.shape[-1]
        width = 32.0 / num_bins
        pae_value = torch.arange(0.5 * width, 32.0, width, dtype=torch.promote_types(ct, torch.float32),
                                 device=z_tile.device)[None]
        d0 = 1.24 * (torch.clip(n_res, min=19) - 15) ** (1 / 3) - 1.8
        tm_value = 1 / (1 + (pae_value / d0) ** 2)  # [Bm, bins]
        tev = (torch.softmax(pae_logits, dim=-1) * tm_value[:, None, None, :]).sum(-1)  # [Bm, n, n]

        maski = self._frame_rows(x_pred, inputs, layout, m).to(ct)  # [Bm, n] (incl. token_pad_mask)
        row = maski * pad_i
        base = pad_j[:, None, :] * torch.ones_like(tev)
        masks = [base, base * diff]
        masks.append(masks[1] * (lig_i[:, :, None] * prot_j[:, None, :] + prot_i[:, :, None] * lig_j[:, None, :]))
        masks.append(masks[1] * (prot_i[:, :, None] * prot_j[:, None, :]))
        sums = []
        for mk in masks:
            mk = mk * row[:, :, None]
            sums += [(tev * mk).sum(-1), mk.sum(-1)]
        sums += [(pde * pair_w).sum(-1), pair_w.sum(-1), (pde * inter_w).sum(-1), inter_w.sum(-1)]
        chains = inputs.chains.to(z_tile.device)
        chain_j = (asym_j[:, :, None] == chains).to(ct) * pad_j[:, :, None]  # [Bm, n_j, C]
        per_chain = torch.bmm(tev, chain_j)  # [Bm, n_i, C]: sum_j tev[i, j] over real j of chain c1
        packed = _all_reduce(torch.cat([torch.stack(sums, -1), per_chain], -1), mesh.ring_j, dist.ReduceOp.SUM)
        ratios = torch.stack([packed[..., 2 * k] / (packed[..., 2 * k + 1] + 1e-5) for k in range(4)], -1)

        chain_cnt = ((inputs.tokens["asym_id"][:, :, None] == chains) *
                     inputs.tokens["token_pad_mask"][:, :, None]).to(ct).sum(1).repeat_interleave(m, 0)  # [Bm, C]
        chain_ratio = row[..., None] * packed[..., 12:] / (row[..., None] * chain_cnt[:, None, :] + 1e-5)
        n_chains = chains.numel()
        c2 = torch.searchsorted(chains, asym_i.contiguous()).clamp(max=n_chains - 1)  # chain of row i
        chain_max = torch.zeros((asym_i.shape[0], n_chains, n_chains), dtype=ct, device=z_tile.device)
        chain_max.scatter_reduce_(1, c2[:, :, None].expand(-1, -1, n_chains), chain_ratio, reduce="amax")
        maxes = _all_reduce(torch.cat([ratios.amax(dim=1), chain_max.flatten(1)], -1), mesh.ring_i,
                            dist.ReduceOp.MAX)

        tok = pad_i
        col_sums = torch.stack([(plddt * tok).sum(-1), tok.sum(-1), (plddt * tok * weight).sum(-1),
                                (tok * weight).sum(-1), packed[..., 8].sum(-1), packed[..., 9].sum(-1),
                                packed[..., 10].sum(-1), packed[..., 11].sum(-1)], -1)
        totals = _all_reduce(col_sums, mesh.ring_i, dist.ReduceOp.SUM)

        ids = chains.tolist()
        pair_chains = {c1: {c2_: maxes[:, 4 + b * n_chains + a] for b, c2_ in enumerate(ids)}
                       for a, c1 in enumerate(ids)}
        return {
            "pde_logits": pair_from_tile(pde_logits, mesh),
            "plddt_logits": single_from_local(plddt_logits, mesh),
            "resolved_logits": single_from_local(resolved_logits, mesh),
            "pde": pair_from_tile(pde, mesh),
            "plddt": single_from_local(plddt, mesh),
            "complex_plddt": totals[:, 0] / totals[:, 1],
            "complex_iplddt": totals[:, 2] / totals[:, 3],
            "complex_pde": totals[:, 4] / totals[:, 5],
            "complex_ipde": totals[:, 6] / (totals[:, 7] + 1e-5),
            "pae_logits": pair_from_tile(pae_logits, mesh),
            "pae": pair_from_tile(pae, mesh),
            "ptm": maxes[:, 0], "iptm": maxes[:, 1], "ligand_iptm": maxes[:, 2], "protein_iptm": maxes[:, 3],
            "pair_chains_iptm": pair_chains,
        }

    @staticmethod
    def _frame_rows(x_pred: Tensor, inputs: ConfidenceInputs, layout: TokenLayout, m: int) -> Tensor:
        """`frame_mask` of my row block I_r, zero on pad tokens: [B*m, n]."""
        full = pad_tokens(frame_mask(x_pred, inputs.tokens, m), 1, layout.mesh.token_multiple)
        return full[:, layout.rows]


class ConfidenceModule(upstream.ConfidenceModule):
    """Algorithm 31 on tiles: z init, distance embedding, CP pairformer stack, CP heads.

    Same constructor as upstream and the same parameters (see the module docstring).
    """

    def __init__(self, token_s: int, token_z: int, pairformer_args: dict, *args, confidence_args: dict = None,
                 **kwargs) -> None:
        pairformer_args = dict(pairformer_args)
        confidence_args = dict(confidence_args or {})
        # Upstream builds its own stack; build it empty and install the CP twin.
        super().__init__(token_s, token_z, {**pairformer_args, "num_blocks": 0}, *args,
                         confidence_args=confidence_args, **kwargs)
        if not self.token_level_confidence:
            raise ConfigError("the CP confidence module implements token-level confidence only")
        pairformer_args["v2"] = True
        self.pairformer_stack = PairformerModule(token_s, token_z, **pairformer_args)
        self.confidence_heads = ConfidenceHeads(token_s, token_z, token_level_confidence=True, **confidence_args)
        if self.add_z_input_to_z:
            rp = self.rel_pos
            self.rel_pos = RelativePositionEncoder(token_z, rp.r_max, rp.s_max, fix_sym_check=rp.fix_sym_check,
                                                   cyclic_pos_enc=rp.cyclic_pos_enc)
            cc = self.contact_conditioning
            self.contact_conditioning = ContactConditioning(token_z, cc.cutoff_min, cc.cutoff_max)

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> "ConfidenceModule":
        """As upstream Boltz2 builds its confidence_module from its hparams."""
        return cls(**confidence_module_kwargs(hparams))

    def forward(self, s_inputs: DTensor, s: DTensor, z: DTensor, x_pred: Tensor,  # type: ignore[override]
                feats: ConfidenceInputs, pred_distogram_logits: DTensor, layout: TokenLayout,
                multiplicity: int = 1, run_sequentially: bool = False) -> dict[str, Any]:
        name = type(self).__name__
        check_placements(f"{name}.s_inputs", s_inputs, SINGLE_BY_I)
        check_placements(f"{name}.s", s, SINGLE_BY_I)
        check_placements(f"{name}.z", z, PAIR)
        mesh = layout.mesh
        if z.shape[1] != layout.n_padded:
            raise ValueError(f"{name}: expected {layout.n_padded} (padded) tokens, got z {tuple(z.shape)}")
        if x_pred.dim() == 4:
            x_pred = x_pred.reshape(-1, *x_pred.shape[2:])
        if run_sequentially and multiplicity > 1:
            outs = [self.forward(s_inputs, s, z, x_pred[k:k + 1], feats, pred_distogram_logits, layout, 1)
                    for k in range(multiplicity)]
            return _concat(outs, mesh)

        m = multiplicity
        si_tile = self.s_inputs_norm(s_inputs.to_local())
        s_tile = s.to_local()
        if not self.no_update_s:
            s_tile = self.s_norm(s_tile)
        if self.add_s_input_to_s:
            s_tile = s_tile + self.s_input_to_s(si_tile)

        # Column-token projections of s_inputs come from the transpose partner (row block J_c).
        to_send = [self.s_to_z_transpose(si_tile)]
        if self.add_s_to_z_prod:
            to_send.append(self.s_to_z_prod_in2(si_tile))
        pending = column_block(torch.cat(to_send, -1), mesh)

        z_tile = self.z_norm(z.to_local())
        if self.add_z_input_to_z:
            pair = feats.pair
            z_tile = z_tile + self.rel_pos(feats.feats_i, feats.feats_j, layout).to_local()
            z_tile = z_tile + self.token_bonds(pair["token_bonds"].to_local().to(z_tile.dtype))
            if self.bond_type_feature:
                z_tile = z_tile + self.token_bonds_type(pair["type_bonds"].to_local().long())
            threshold = pair_from_tile(pair["contact_threshold"].to_local().to(z_tile.dtype), mesh)
            z_tile = z_tile + self.contact_conditioning(pair["contact_conditioning"], threshold).to_local()

        s_tile = s_tile.repeat_interleave(m, 0)
        cols_proj = pending.wait()
        token_z = z_tile.shape[-1]
        z_tile = z_tile + self.s_to_z(si_tile)[:, :, None, :] + cols_proj[:, None, :, :token_z]
        if self.add_s_to_z_prod:
            z_tile = z_tile + self.s_to_z_prod_out(
                self.s_to_z_prod_in1(si_tile)[:, :, None, :] * cols_proj[:, None, :, token_z:])
        z_tile = z_tile.repeat_interleave(m, 0)

        # Distance-bin embedding from representative-atom coordinates of my rows and columns.
        x_i = _rep_coords(x_pred, feats.feats_i["token_to_rep_atom_index"], m)
        x_j = _rep_coords(x_pred, feats.feats_j["token_to_rep_atom_index"], m)
        # NOTE(parity): direct differences, where upstream's torch.cdist takes its matmul path
        # (N > 25): distances agree to round-off; a bin could differ only for a distance within
        # round-off of a bin boundary.
        d_tile = ((x_i[:, :, None, :] - x_j[:, None, :, :]) ** 2).sum(-1).sqrt()
        common = torch.promote_types(d_tile.dtype, self.boundaries.dtype)
        bins = torch.bucketize(d_tile.to(common), self.boundaries.to(common))  # = (d > boundaries).sum(-1)
        z_tile = z_tile + self.dist_bin_pairwise_embed(bins)
        del bins

        dtype = z_tile.dtype
        mask_i = feats.feats_i["token_pad_mask"].to(dtype).repeat_interleave(m, 0)
        mask_j = feats.feats_j["token_pad_mask"].to(dtype).repeat_interleave(m, 0)
        # z_tile is ours: the stack updates it in place (no second tile beside the stack's input).
        s_dt, z_dt = self.pairformer_stack(
            single_from_local(s_tile, mesh), pair_from_tile(z_tile, mesh), single_from_local(mask_i, mesh),
            pair_from_tile(mask_i[:, :, None] * mask_j[:, None, :], mesh), layout, consume=True)
        del z_tile, s_tile

        out: dict[str, Any] = {}
        if self.return_latent_feats:
            out["s_conf"], out["z_conf"] = s_dt, z_dt
        out.update(self.confidence_heads(s_dt, z_dt, x_pred, d_tile, feats, pred_distogram_logits, layout, m))
        return out


def _rep_coords(x_pred: Tensor, index: Tensor, m: int) -> Tensor:
    """Coordinates [B*m, n, 3] of the tokens' representative atoms (zero for index -1)."""
    idx = index.repeat_interleave(m, 0)
    got = x_pred.gather(1, idx.clamp(min=0)[..., None].expand(-1, -1, 3))
    return got * (idx >= 0)[..., None].to(x_pred.dtype)


def _concat(outs: list[dict], mesh) -> dict[str, Any]:
    """Upstream's sample-by-sample result: every output concatenated along the batch dim."""
    res: dict[str, Any] = {}
    for key, first in outs[0].items():
        if key == "pair_chains_iptm":
            res[key] = {a: {b: torch.cat([o[key][a][b] for o in outs]) for b in first[a]} for a in first}
        elif isinstance(first, DTensor):
            local = torch.cat([o[key].to_local() for o in outs])
            shape = torch.Size((local.shape[0], *first.shape[1:]))
            res[key] = DTensor.from_local(local, mesh.device_mesh, first.placements, shape=shape,
                                          stride=contiguous_stride(shape))
        else:
            res[key] = torch.cat([o[key] for o in outs])
    return res
