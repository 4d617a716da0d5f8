"""CP twin of the Boltz-2 input embedder: atom encoder, atom attention encoder, token features.

Atom work is sharded over all P ranks (windows split in global rank order, see
boltz_cp/modules/atom_windows.py); each rank encodes its own windows, runs the atom
transformer on them, and averages its atoms into partial token sums by the atoms' token
index (never the dense one-hot atom_to_token). The partial sums meet on the SINGLE_FULL
owners, which add the per-token features, and each tile row gathers its block.

Placements (mesh axes cp_i, cp_j): inputs are an `EmbedderInputs` bundle of plain local
tensors cut by `embedder_inputs` (per-atom: my windows plus a 48-atom halo each side;
per-token: my SINGLE_FULL block); out s_inputs [B, N, C_s] SINGLE_BY_I (N = layout.n_padded;
pad tokens get finite values nothing uses), bit-identical on the ranks of a tile row.
Communication per call (P ranks, depth D atom transformer layers, n_f = N/P):
    D halo_exchanges of [B, 48, atom_s] with each neighbour (2 messages per inner rank);
    1 span_reduce of the partial token sums [B, span, C_s]: one message per overlapping
      (source, SINGLE_FULL owner) pair, about span*C_s elements sent per rank;
    1 all_gather on ring_j of [B, n_f, C_s] (none when cols = 1).
    No rank holds anything M x N or N x N; per-rank memory is O(M/P + N/P), plus the
    [B, W, H] window pairs of its own windows.
Upstream twin: boltz/model/modules/trunkv2.py InputEmbedder (with encodersv2.py AtomEncoder,
structure_prediction=False, and AtomAttentionEncoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from boltz.model.modules.trunkv2 import InputEmbedder as _UpstreamInputEmbedder
from boltz_cp.distributed import TokenLayout, pad_tokens, single_from_local
from boltz_cp.modules.atom_tokens import token_means
from boltz_cp.modules.atom_windows import (
    AtomWindowPlan,
    atom_features,
    atom_transformer,
    slice_atoms,
    window_keys,
    window_pair_geometry,
)

ATOM_FEATURES = ("ref_pos", "ref_charge", "ref_element", "ref_atom_name_chars", "atom_pad_mask",
                 "ref_space_uid")
OPTIONAL_ATOM_FEATURES = ("atom_backbone_feat",)
# Token features the embedder reads, and the module flag that needs each optional one.
TOKEN_FEATURES = ("res_type", "profile", "deletion_mean")
OPTIONAL_TOKEN_FEATURES = {"method_feature": "add_method_conditioning", "modified": "add_modified_flag",
                           "cyclic_period": "add_cyclic_flag", "mol_type": "add_mol_type_feat"}
# Per-atom residue features (use_residue_feats_atoms), gathered by the atom's token index.
RESIDUE_ATOM_FEATURES = ("res_type", "modified", "mol_type")


def atom_to_token_index(atom_to_token: Tensor) -> Tensor:
    """Dense one-hot [B, M, N] -> long [B, M]: the token of each atom, -1 for none (pad atoms).

    Host side, once per input. Raises ValueError unless every row has at most one entry,
    equal to 1 (then index aggregation equals upstream's bmm exactly).
    """
    nonzero = atom_to_token != 0
    per_atom = nonzero.sum(-1)
    if bool((per_atom > 1).any()) or bool((atom_to_token[nonzero] != 1).any()):
        raise ValueError("atom_to_token_index: atom_to_token must be one-hot per atom (at most one 1)")
    idx = atom_to_token.argmax(-1) if atom_to_token.shape[-1] else per_atom.long()
    return torch.where(per_atom > 0, idx, torch.full_like(idx, -1))


@dataclass
class EmbedderInputs:
    """What one rank's `InputEmbedder.forward` reads (built by `embedder_inputs`).

    atoms: per-atom features of my extended range [B, L + 2h, ...] (zeros outside [0, M)),
        plus "atom_has_token" / "atom_res_type" / "atom_modified" / "atom_mol_type" when the
        token features allow them (for use_residue_feats_atoms).
    atom_token: [B, L] long, the token of each of my atoms (-1: none).
    spans: every rank's token range (lo, hi) of its atoms' indices (union over the batch).
    tokens: my SINGLE_FULL token block [B, N/P, ...] of the token features, plus
        "atom_count" (atoms per token, as upstream's atom_to_token.sum(1)).
    """

    plan: AtomWindowPlan
    atoms: dict[str, Tensor]
    atom_token: Tensor
    spans: tuple[tuple[int, int], ...]
    tokens: dict[str, Tensor]


def embedder_inputs(feats: dict[str, Tensor], layout: TokenLayout, window_queries: int = 32,
                    window_keys: int = 128, affinity: bool = False) -> EmbedderInputs:
    """Cut a full featurized batch (replicated on every rank) into my `EmbedderInputs`.

    Host side, O(M + N) (plus one pass over atom_to_token when ``atom_to_token_index`` is
    absent). Reads ``atom_to_token_index`` [B, M] (or derives it from ``atom_to_token``), the
    per-atom features [B, M, ...] and the per-token features [B, N] (N = layout.n real tokens).
    ``affinity`` picks profile_affinity / deletion_mean_affinity, as upstream's forward does.
    """
    mesh = layout.mesh
    m = feats["ref_pos"].shape[1]
    plan = AtomWindowPlan(m, mesh.size, mesh.local_rank, window_queries, window_keys)
    index = feats.get("atom_to_token_index")
    if index is None:
        index = atom_to_token_index(feats["atom_to_token"])
    index = index.long()
    if index.shape[1] != m or bool((index >= layout.n).any()) or bool((index < -1).any()):
        raise ValueError(f"embedder_inputs: atom_to_token_index must be [B, {m}] with values in "
                         f"[-1, {layout.n}), got shape {tuple(index.shape)}")

    atoms = {k: slice_atoms(feats[k], plan) for k in (*ATOM_FEATURES, *OPTIONAL_ATOM_FEATURES) if k in feats}
    index_ext = slice_atoms(index + 1, plan) - 1  # zeros past [0, M) -> -1
    if all(k in feats for k in RESIDUE_ATOM_FEATURES):
        has = index_ext >= 0
        batch = torch.arange(index.shape[0], device=index.device)[:, None]
        atoms["atom_has_token"] = has
        for k in RESIDUE_ATOM_FEATURES:
            gathered = feats[k][batch, index_ext.clamp(min=0)]  # [B, L + 2h, ...]
            keep = has.view(*has.shape, *([1] * (gathered.dim() - 2)))
            atoms[f"atom_{k}"] = torch.where(keep, gathered, torch.zeros_like(gathered))
    h = plan.halo
    atom_token = index_ext[:, h:h + plan.local_atoms]

    spans = []
    for q in range(mesh.size):
        a0, a1 = plan.atoms(q)
        own = index[:, max(a0, 0):min(a1, m)]
        own = own[own >= 0]
        spans.append((int(own.min()), int(own.max()) + 1) if own.numel() else (0, 0))

    names = {"profile": "profile_affinity", "deletion_mean": "deletion_mean_affinity"} if affinity else {}
    block = layout.block(mesh.local_rank, mesh.size)
    tokens = {}
    for k in (*TOKEN_FEATURES, *OPTIONAL_TOKEN_FEATURES):
        src = names.get(k, k)
        if src not in feats:
            if k in TOKEN_FEATURES:
                raise KeyError(f"embedder_inputs: missing token feature {src!r}")
            continue
        t = feats[src]
        if t.shape[1] != layout.n:
            raise ValueError(f"embedder_inputs: {src!r} must have {layout.n} tokens, got {tuple(t.shape)}")
        tokens[k] = pad_tokens(t, 1, mesh.token_multiple)[:, block].clone()
    counts = torch.zeros(index.shape[0], layout.n_padded + 1, dtype=torch.long, device=index.device)
    counts.scatter_add_(1, torch.where(index >= 0, index, layout.n_padded), torch.ones_like(index))
    tokens["atom_count"] = counts[:, block].clone()
    return EmbedderInputs(plan, atoms, atom_token, tuple(spans), tokens)


def _exact(x: Tensor, like: Tensor) -> Tensor:
    """0/1 or small-integer features in the dtype of a weight (exact; fp64 stays fp64)."""
    return x.to(like.dtype)


class InputEmbedder(_UpstreamInputEmbedder):
    """s_inputs on the mesh. Built by upstream's __init__: same parameters and names.

    forward(inputs, layout): the atom encoder (structure_prediction=False) and the atom
    attention encoder on my windows, atoms -> tokens by index, per-token features on my
    SINGLE_FULL block, then one all_gather on ring_j -> SINGLE_BY_I.
    """

    def forward(self, inputs: EmbedderInputs, layout: TokenLayout) -> DTensor:  # type: ignore[override]
        name = type(self).__name__
        mesh, plan = layout.mesh, inputs.plan
        enc = self.atom_encoder
        w, h = enc.atoms_per_window_queries, enc.atoms_per_window_keys
        plan.check(name, mesh, w, h)
        n_block = layout.n_padded // mesh.size
        if inputs.tokens["res_type"].shape[1] != n_block:
            raise ValueError(f"{name}: token block of {inputs.tokens['res_type'].shape[1]} tokens, "
                             f"expected {n_block} (cut with embedder_inputs for this layout)")
        for key, flag in OPTIONAL_TOKEN_FEATURES.items():
            if getattr(self, flag) and key not in inputs.tokens:
                raise KeyError(f"{name}: {flag} needs token feature {key!r}")

        q, c, p = self._encode_atoms(inputs)
        bias = self.atom_enc_proj_z(p)
        a = self._attend_atoms(inputs, q, c, bias, mesh)
        tok = inputs.tokens
        res_type = _exact(tok["res_type"], self.res_type_encoding.weight)
        profile = torch.cat([tok["profile"], tok["deletion_mean"].unsqueeze(-1)], dim=-1)
        s = a + self.res_type_encoding(res_type) + self.msa_profile_encoding(profile)
        if self.add_method_conditioning:
            s = s + self.method_conditioning_init(tok["method_feature"])
        if self.add_modified_flag:
            s = s + self.modified_conditioning_init(tok["modified"])
        if self.add_cyclic_flag:
            s = s + self.cyclic_conditioning_init(tok["cyclic_period"].clamp(max=1.0).unsqueeze(-1))
        if self.add_mol_type_feat:
            s = s + self.mol_type_conditioning_init(tok["mol_type"])

        # SINGLE_FULL block r*cols + c is the c-th sub-block of I_r: ring_j assembles I_r.
        s = s.contiguous()
        if mesh.cols > 1:
            parts = [torch.empty_like(s) for _ in range(mesh.cols)]
            dist.all_gather(parts, s, group=mesh.ring_j)
            s = torch.cat(parts, dim=1)
        return single_from_local(s, mesh)

    def _encode_atoms(self, inputs: EmbedderInputs) -> tuple[Tensor, Tensor, Tensor]:
        """AtomEncoder (structure_prediction=False) on my windows: q, c [B, L, atom_s] and the
        window pair features p [B, windows_per_rank, W, H, atom_z]."""
        enc, plan, at = self.atom_encoder, inputs.plan, inputs.atoms
        if enc.structure_prediction:
            raise NotImplementedError("InputEmbedder: the atom encoder runs without structure")
        w, h, kw, halo = plan.window_queries, plan.window_keys, plan.windows_per_rank, plan.halo
        with torch.autocast("cuda", enabled=False):
            bsz = at["ref_pos"].shape[0]
            c_ext = enc.embed_atom_features(atom_features(enc, at))
            missing = ~plan.exists(device=c_ext.device)
            c_ext = c_ext.masked_fill(missing[None, :, None], 0)
            p = window_pair_geometry(enc, at, plan)

            c = c_ext[:, halo:halo + plan.local_atoms]
            p = p + enc.c_to_p_trans_q(c.reshape(bsz, kw, w, 1, -1))
            p = p + enc.c_to_p_trans_k(window_keys(c_ext, plan).reshape(bsz, kw, 1, h, -1))
            p = p + enc.p_mlp(p)
        return c, c, p

    def _attend_atoms(self, inputs: EmbedderInputs, q: Tensor, c: Tensor, bias: Tensor, mesh) -> Tensor:
        """AtomAttentionEncoder (structure_prediction=False): the atom transformer, then the
        mean of atom_to_token_trans(q) over each token's atoms -> my SINGLE_FULL block."""
        aae, plan = self.atom_attention_encoder, inputs.plan
        if aae.structure_prediction:
            raise NotImplementedError("InputEmbedder: the atom attention encoder runs without structure")
        # Upstream: atom_pad_mask.bool().float() through to_keys (0 past [0, M)).
        key_mask = window_keys(inputs.atoms["atom_pad_mask"].bool(), plan).float()
        q = atom_transformer(aae.atom_encoder, q, c, bias, key_mask, plan, mesh)

        with torch.autocast("cuda", enabled=False):
            q_to_a = aae.atom_to_token_trans(q)
            ct = torch.promote_types(q_to_a.dtype, torch.float32)
            a = token_means(q_to_a.to(ct), inputs.atom_token, inputs.spans,
                            inputs.tokens["atom_count"], mesh)
        return a.to(q.dtype)
