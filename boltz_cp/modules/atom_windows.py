"""Atom windows sharded over the whole mesh: the plan, window keys, and the atom transformer.

Upstream (boltz/model/modules/encodersv2.py get_indexing_matrix, single_to_keys) cuts the M
atoms (a multiple of W) into K = M/W query windows of W atoms; window k attends to the H keys
[k*W - h, k*W + W + h) with h = (H - W)/2 (48 at W=32, H=128), zeros outside [0, M). Here the
K windows are split contiguously over the P ranks in global rank order (rank q = r*cols + c):
every rank takes `AtomWindowPlan.windows_per_rank` windows, at least ceil(h/W) so that a halo
comes from the adjacent rank only. The windows past K (and the atoms past M) are padding that
does not exist: they are zero wherever a key reads them, exactly like upstream's zero padding,
and map to no token, so every output of a real atom equals upstream's.

Placements: per-atom tensors are local blocks [B, L, ...] of the rank's own atoms
[a0, a1) = `AtomWindowPlan.atoms` (L = windows_per_rank*W), or of the extended range
[a0 - h, a1 + h) (`ext`, L + 2h) where a key needs them; window tensors are
[B*windows_per_rank, W, ...] (queries) or [B*windows_per_rank, H, ...] (keys).
Communication per call: `atom_transformer` 1 halo_exchange per layer of the adaln output
[B, L, C] (h*C elements to each neighbour, 2 messages per inner rank); everything else is local.
Upstream twin: boltz/model/modules/transformersv2.py AtomTransformer, DiffusionTransformerLayer;
boltz/model/layers/attentionv2.py AttentionPairBias (on windows, compute_pair_bias=False).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import one_hot

from boltz_cp.distributed.halo import halo_exchange
from boltz_cp.distributed.mesh import CPMesh
from boltz_cp.kernels import attend_block


@dataclass(frozen=True)
class AtomWindowPlan:
    """Which atom windows rank ``rank`` of ``ranks`` owns, for ``m`` atoms (upstream's M)."""

    m: int
    ranks: int
    rank: int
    window_queries: int = 32
    window_keys: int = 128

    def __post_init__(self) -> None:
        w, h = self.window_queries, self.window_keys
        # Upstream's get_indexing_matrix asserts these; under them its keys are the span above.
        if w < 2 or w % 2 or h % (w // 2) or (h // (w // 2)) % 2 or h < w:
            raise ValueError(f"AtomWindowPlan: unsupported windows W={w}, H={h} (upstream needs "
                             f"W even, H a multiple of W/2 with an even quotient, H >= W)")
        if self.m < 0 or self.m % w:
            raise ValueError(f"AtomWindowPlan: {self.m} atoms is not a multiple of W={w} "
                             f"(the featurizer pads atoms to whole windows)")
        if not 0 <= self.rank < self.ranks:
            raise ValueError(f"AtomWindowPlan: rank {self.rank} out of range for {self.ranks}")

    @classmethod
    def for_mesh(cls, m: int, mesh: CPMesh, window_queries: int = 32,
                 window_keys: int = 128) -> "AtomWindowPlan":
        return cls(m, mesh.size, mesh.local_rank, window_queries, window_keys)

    @property
    def halo(self) -> int:
        return (self.window_keys - self.window_queries) // 2

    @property
    def windows(self) -> int:
        """Upstream's K = M / W."""
        return self.m // self.window_queries

    @property
    def windows_per_rank(self) -> int:
        w = self.window_queries
        return max(1, -(-self.windows // self.ranks), -(-self.halo // w))

    @property
    def local_atoms(self) -> int:
        """L: atoms per rank (own windows only)."""
        return self.windows_per_rank * self.window_queries

    def atoms(self, rank: int | None = None) -> tuple[int, int]:
        """Global atom range [a0, a1) of a rank's windows (a1 may pass M: padding)."""
        q = self.rank if rank is None else rank
        return q * self.local_atoms, (q + 1) * self.local_atoms

    def ext(self, rank: int | None = None) -> tuple[int, int]:
        """The rank's atoms plus the halo on both sides: [a0 - h, a1 + h)."""
        a0, a1 = self.atoms(rank)
        return a0 - self.halo, a1 + self.halo

    def check(self, who: str, mesh: CPMesh, window_queries: int, window_keys: int) -> None:
        """ValueError naming ``who`` unless this plan was cut for my rank of ``mesh`` and these windows."""
        if (self.ranks, self.rank, self.window_queries, self.window_keys) != (
                mesh.size, mesh.local_rank, window_queries, window_keys):
            raise ValueError(f"{who}: inputs were cut for rank {self.rank} of {self.ranks} with "
                             f"W={self.window_queries}, H={self.window_keys}; this is rank "
                             f"{mesh.local_rank} of {mesh.size} with W={window_queries}, H={window_keys}")

    def exists(self, extended: bool = True, device=None) -> Tensor:
        """Bool [L + 2h] (or [L]): which positions of my (extended) range are atoms < M."""
        a0, a1 = self.ext() if extended else self.atoms()
        g = torch.arange(a0, a1, device=device)
        return (g >= 0) & (g < self.m)


def slice_atoms(x: Tensor, plan: AtomWindowPlan, extended: bool = True, dim: int = 1) -> Tensor:
    """My (extended) atom range of a full per-atom tensor (dim ``dim`` = M), zeros past [0, M).

    O(L) work; the full tensor is read, never copied.
    """
    dim = dim % x.dim()
    if x.shape[dim] != plan.m:
        raise ValueError(f"slice_atoms: expected {plan.m} atoms along dim {dim}, got "
                         f"{tuple(x.shape)}")
    a0, a1 = plan.ext() if extended else plan.atoms()
    out = x.new_zeros((*x.shape[:dim], a1 - a0, *x.shape[dim + 1:]))
    lo, hi = max(a0, 0), min(a1, plan.m)
    if lo < hi:
        out.narrow(dim, lo - a0, hi - lo).copy_(x.narrow(dim, lo, hi - lo))
    return out


def window_keys(x_ext: Tensor, plan: AtomWindowPlan) -> Tensor:
    """[B, L + 2h, ...] (my extended range) -> [B, windows_per_rank, H, ...]: each window's keys.

    Local window j reads positions [j*W, j*W + H) of the extended range, which are the
    global atoms [k*W - h, k*W + W + h) of its global index k, as upstream's single_to_keys.
    """
    w, h, k = plan.window_queries, plan.window_keys, plan.windows_per_rank
    if x_ext.shape[1] != plan.local_atoms + 2 * plan.halo:
        raise ValueError(f"window_keys: expected {plan.local_atoms + 2 * plan.halo} atoms "
                         f"(extended range), got {tuple(x_ext.shape)}")
    keys = x_ext.unfold(1, h, w)  # [B, k, ..., H]
    keys = keys.movedim(-1, 2)
    assert keys.shape[1] == k
    return keys


def window_attention(attn: nn.Module, b: Tensor, k_in: Tensor, bias: Tensor, key_mask: Tensor) -> Tensor:
    """Upstream AttentionPairBias (compute_pair_bias=False) on windows, promoted to >= fp32.

    b [Bw, W, C] queries; k_in [Bw, H, C] keys; bias [Bw, W, H, heads]; key_mask [Bw, H]
    (1 = attend). Same parameters as upstream; the scores are one `attend_block` call
    (kernels.attention picks the backend; the key mask joins the bias as a finite -1e9 column).
    Upstream casts to fp32 with autocast off, here the compute dtype is promote(input, fp32),
    so fp64 stays fp64.
    """
    bw = b.shape[0]
    heads, d = attn.num_heads, attn.head_dim
    q = attn.proj_q(b).view(bw, -1, heads, d)
    k = attn.proj_k(k_in).view(bw, -1, heads, d)
    v = attn.proj_v(k_in).view(bw, -1, heads, d)
    bias = bias.permute(0, 3, 1, 2)
    g = attn.proj_g(b).sigmoid()
    ct = torch.promote_types(torch.promote_types(q.dtype, bias.dtype), torch.float32)
    with torch.autocast(b.device.type, enabled=False):
        q, k, v_ct, bias = q.to(ct), k.to(ct), v.to(ct), bias.to(ct)
        key_bias = (1 - key_mask[:, None, None].to(ct)) * -attn.inf  # finite, as upstream's
        out, _ = attend_block(q.transpose(1, 2), k.transpose(1, 2), v_ct.transpose(1, 2),
                              bias + key_bias, scale=d**-0.5)
        o = out.transpose(1, 2)
        empty = (key_mask == 0).all(dim=-1).nonzero().flatten()
        if len(empty):  # windows with no key (padding): upstream's average at its round-off
            logits = torch.einsum("bihd,bjhd->bhij", q[empty], k[empty])
            logits = logits / (d**0.5) + bias[empty]
            logits = logits + key_bias[empty]
            o = o.clone()
            o[empty] = torch.einsum("bhij,bjhd->bihd", logits.softmax(dim=-1), v_ct[empty])
    return attn.proj_o(g * o.to(v.dtype).reshape(bw, -1, attn.c_s))


def atom_transformer(transformer: nn.Module, q: Tensor, c: Tensor, bias: Tensor,
                     key_mask: Tensor, plan: AtomWindowPlan, mesh: CPMesh) -> Tensor:
    """Upstream AtomTransformer on my windows, keys through one halo exchange per layer.

    q, c [B, L, C] my atoms; bias [B, windows_per_rank, W, H, depth*heads] (layer i reads
    channels [i*heads, (i+1)*heads), as upstream's view); key_mask [B, windows_per_rank, H]
    (the atom mask of each window's keys, 0 where no atom exists). Returns q [B, L, C].
    Every layer's keys come from that layer's adaln output, so each layer exchanges its halo.
    """
    dt = transformer.diffusion_transformer
    if not dt.pair_bias_attn:
        raise NotImplementedError("atom_transformer: only the pair-biased AtomTransformer")
    w, h, kw = plan.window_queries, plan.window_keys, plan.windows_per_rank
    bsz, n_loc, dim = q.shape
    if n_loc != plan.local_atoms:
        raise ValueError(f"atom_transformer: expected {plan.local_atoms} local atoms, got {tuple(q.shape)}")
    layers = dt.layers
    bias = bias.reshape(bsz * kw, w, h, len(layers), -1)
    key_mask = key_mask.reshape(bsz * kw, h)
    missing = ~plan.exists(device=q.device)[None, :, None]
    a = q.reshape(bsz * kw, w, dim)
    s = c.reshape(bsz * kw, w, -1)
    for i, layer in enumerate(layers):
        b = layer.adaln(a, s)
        pending = halo_exchange(b.reshape(bsz, n_loc, dim), mesh, plan.halo)
        gate = layer.output_projection(s)
        # Keys past [0, M) are zeros, as upstream's zero-padded single_to_keys.
        b_ext = pending.wait().masked_fill(missing, 0)
        k_in = window_keys(b_ext, plan).reshape(bsz * kw, h, dim)
        b = gate * window_attention(layer.pair_bias_attn, b, k_in, bias[:, :, :, i], key_mask)
        a = a + b
        a = a + layer.transition(a, s)
        a = layer.post_lnorm(a)
    return a.reshape(bsz, n_loc, dim)


def atom_features(enc: nn.Module, atoms: dict[str, Tensor], rows: slice = slice(None)) -> Tensor:
    """The input of upstream AtomEncoder's embed_atom_features for atoms[:, rows]: reference
    position, charge, element, atom-name characters, backbone and residue features as the
    encoder's flags ask (residue features gathered by token index, zero for atoms of no token)."""
    at = {k: v[:, rows] for k, v in atoms.items()}
    bsz, n = at["ref_pos"].shape[:2]
    feats = [at["ref_pos"], at["ref_charge"].unsqueeze(-1), at["ref_element"]]
    if not enc.use_no_atom_char:
        feats.append(at["ref_atom_name_chars"].reshape(bsz, n, -1))
    if enc.use_atom_backbone_feat:
        feats.append(at["atom_backbone_feat"])
    if enc.use_residue_feats_atoms:
        if "atom_has_token" not in at:
            raise KeyError("use_residue_feats_atoms needs res_type, modified and mol_type in the "
                           "features given to embedder_inputs")
        mol = one_hot(at["atom_mol_type"], num_classes=4) * at["atom_has_token"].unsqueeze(-1)
        feats.append(torch.cat([at["atom_res_type"], at["atom_modified"].unsqueeze(-1), mol], dim=-1))
    return torch.cat(feats, dim=-1)


def window_pair_geometry(enc: nn.Module, atoms: dict[str, Tensor], plan: AtomWindowPlan) -> Tensor:
    """Upstream AtomEncoder's p before its c and z terms, on my windows: embedded offsets,
    inverse squared distances and the pair-valid mask (same residue space, both atoms real),
    [B, windows_per_rank, W, H, atom_z]. ``atoms`` cover my extended range."""
    bsz, kw, w, h = atoms["ref_pos"].shape[0], plan.windows_per_rank, plan.window_queries, plan.window_keys
    own = slice(plan.halo, plan.halo + plan.local_atoms)

    def queries(x: Tensor) -> Tensor:
        return x[:, own].reshape(bsz, kw, w, *x.shape[2:])

    pos = atoms["ref_pos"]
    d = window_keys(pos, plan).reshape(bsz, kw, 1, h, 3) - queries(pos).reshape(bsz, kw, w, 1, 3)
    d_norm = 1 / (1 + torch.sum(d * d, dim=-1, keepdim=True))
    mask = atoms["atom_pad_mask"].bool()
    uid = atoms["ref_space_uid"]
    pair_ok = (queries(mask).unsqueeze(-1) & window_keys(mask, plan).unsqueeze(2)
               & (queries(uid).unsqueeze(-1) == window_keys(uid, plan).unsqueeze(2)))
    v = pair_ok.to(torch.promote_types(d.dtype, torch.float32)).unsqueeze(-1)
    p = enc.embed_atompair_ref_pos(d) * v
    p = p + enc.embed_atompair_ref_dist(d_norm) * v
    return p + enc.embed_atompair_mask(v.to(enc.embed_atompair_mask.weight.dtype)) * v
