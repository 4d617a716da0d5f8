"""CP twin of upstream's template module (Boltz-2, template v2).

Placements (mesh axes cp_i, cp_j): z [B, N, N, C_z] PAIR in; pair_mask [B, N, N] PAIR; out u
[B, N, N, C_z] PAIR. The template features are per-token and replicated on every rank, O(T*N):
template_restype [B, T, N, num_tokens], template_frame_rot [B, T, N, 3, 3], template_frame_t,
template_ca, template_cb [B, T, N, 3], template_mask_frame, template_mask_cb, template_mask,
visibility_ids [B, T, N], N = layout.n real tokens (or already padded to layout.n_padded).
Each rank pads them with zeros and builds the template pair features a_tij for its own tile
(I_r, J_c) only; inside, templates run as batch B*T through the CP pairformer.
Communication per call: that of the CP PairformerNoSeqModule on [B*T, N, N, template_dim]
(its triangle multiplications' Cannon rings and triangle attentions' rings); the features,
projections, norms and the masked mean over templates need none.
Upstream twin: boltz/model/modules/trunkv2.py TemplateV2Module
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.nn.functional import one_hot

from boltz.model.modules.trunkv2 import TemplateV2Module as _UpstreamTemplateV2Module
from boltz_cp.distributed import PAIR, TokenLayout, check_placements, pad_tokens, pair_from_tile
from boltz_cp.layers.pairformer import PairformerNoSeqModule, residual_add

# Feature name -> number of trailing dims after [B, T, N].
TEMPLATE_FEATURES = {
    "template_restype": 1,
    "template_frame_rot": 2,
    "template_frame_t": 1,
    "template_mask_frame": 0,
    "template_cb": 1,
    "template_ca": 1,
    "template_mask_cb": 0,
    "template_mask": 0,
    "visibility_ids": 0,
}

# Query rows of a tile are featurised in chunks of at most this many (template, i, j) pairs:
# the a_proj input (2*num_tokens + num_bins + 5 = 109 channels) never exists for a whole tile.
CHUNK_PAIRS = 1 << 17


class TemplateV2Module(_UpstreamTemplateV2Module):
    """Template embedder on tiles: same parameters as upstream (z_norm, v_norm, z_proj, a_proj,
    u_proj, pairformer).

    Every feature of the pair (t, i, j) is a function of token i's and token j's own template
    features, so a tile needs only the row block I_r and the column block J_c of the
    per-token vectors. The template count (`template_mask.any(dim=2)`) is global over all
    tokens and is taken from the full per-token mask, never per tile.
    """

    def __init__(self, token_z: int, template_dim: int, template_blocks: int, dropout: float = 0.25,
                 pairwise_head_width: int = 32, pairwise_num_heads: int = 4, post_layer_norm: bool = False,
                 activation_checkpointing: bool = False, min_dist: float = 3.25, max_dist: float = 50.75,
                 num_bins: int = 38, **kwargs) -> None:
        super().__init__(token_z, template_dim, 0, dropout, pairwise_head_width, pairwise_num_heads,
                         post_layer_norm, activation_checkpointing, min_dist, max_dist, num_bins, **kwargs)
        self.pairformer = PairformerNoSeqModule(
            template_dim, num_blocks=template_blocks, dropout=dropout, pairwise_head_width=pairwise_head_width,
            pairwise_num_heads=pairwise_num_heads, post_layer_norm=post_layer_norm,
            activation_checkpointing=activation_checkpointing)

    def forward(self, z: DTensor, feats: dict[str, Tensor], pair_mask: DTensor,  # type: ignore[override]
                layout: TokenLayout) -> DTensor:
        name = type(self).__name__
        check_placements(f"{name}.z", z, PAIR)
        check_placements(f"{name}.pair_mask", pair_mask, PAIR)
        if z.shape[1] != layout.n_padded:
            raise ValueError(f"{name}: expected {layout.n_padded} (padded) tokens, got z {tuple(z.shape)}")
        batch, templates = _check_features(name, feats, z.shape[0], layout)
        mesh = layout.mesh
        padded = {k: pad_tokens(feats[k], 2, mesh.token_multiple) for k in TEMPLATE_FEATURES}
        rows = {k: v[:, :, layout.rows] for k, v in padded.items()}
        cols = {k: v[:, :, layout.cols] for k, v in padded.items()}

        z_tile = z.to_local()
        zp_tile = self.z_proj(self.z_norm(z_tile))
        # Upstream builds the features with autocast off; promote, never demote (fp64 stays).
        dtype = torch.promote_types(torch.promote_types(feats["template_cb"].dtype, self.a_proj.weight.dtype),
                                    torch.float32)
        with torch.autocast(z_tile.device.type, enabled=False):
            v_tile = self._v_tile(zp_tile, rows, cols, dtype)
        del zp_tile, z_tile  # z_proj(z) lives on in v; z itself stays with the caller

        n_i, n_j = v_tile.shape[2], v_tile.shape[3]
        v_tile = v_tile.reshape(batch * templates, n_i, n_j, -1)
        mask_tile = pair_mask.to_local()
        mask_tile = mask_tile[:, None].expand(-1, templates, -1, -1).reshape(batch * templates, n_i, n_j)
        # v stays for the residual; the stack makes one tile of its own and updates it in place.
        v_tile = residual_add(v_tile, self.pairformer(pair_from_tile(v_tile, mesh), pair_from_tile(mask_tile, mesh),
                                                      layout).to_local(), owned=True)
        v_tile = self.v_norm(v_tile).reshape(batch, templates, n_i, n_j, -1)

        # Global over all tokens: which templates exist at all (O(T*N), same on every rank).
        present = feats["template_mask"].any(dim=2).to(v_tile.dtype)
        count = present.sum(dim=1).clamp(min=1)
        u_tile = (v_tile * present[:, :, None, None, None]).sum(dim=1) / count[:, None, None, None]
        return pair_from_tile(self.u_proj(self.relu(u_tile)), mesh)

    def _v_tile(self, zp_tile: Tensor, rows: dict[str, Tensor], cols: dict[str, Tensor],
                dtype: torch.dtype) -> Tensor:
        """z_proj(z_norm(z)) + a_proj(a_tij) on my tile: [B, T, n_i, n_j, template_dim]."""
        batch, templates, n_i = rows["template_cb"].shape[:3]
        n_j = cols["template_cb"].shape[2]
        weight = self.a_proj.weight.to(dtype)
        boundaries = torch.linspace(self.min_dist, self.max_dist, self.num_bins - 1, dtype=dtype,
                                    device=zp_tile.device)
        out_dtype = torch.promote_types(zp_tile.dtype, dtype)
        v_tile = zp_tile.new_empty((batch, templates, n_i, n_j, weight.shape[0]), dtype=out_dtype)
        step = max(1, CHUNK_PAIRS // max(1, batch * templates * n_j))
        for i0 in range(0, n_i, step):
            i1 = min(n_i, i0 + step)
            chunk = {k: v[:, :, i0:i1] for k, v in rows.items()}
            a_chunk = F.linear(self._pair_features(chunk, cols, boundaries, dtype), weight)
            v_tile[:, :, i0:i1] = zp_tile[:, None, i0:i1] + a_chunk
        return v_tile

    def _pair_features(self, fi: dict[str, Tensor], fj: dict[str, Tensor], boundaries: Tensor,
                       dtype: torch.dtype) -> Tensor:
        """a_tij of rows fi against columns fj: [B, T, len_i, len_j, 2*num_tokens + num_bins + 5]."""
        def get(block, key):
            return block[key].to(dtype)

        dists = torch.cdist(get(fi, "template_cb"), get(fj, "template_cb"))
        # Bin = number of boundaries strictly below the distance, as upstream's (d > b).sum().
        distogram = one_hot(torch.bucketize(dists, boundaries), self.num_bins).to(dtype)
        cb_mask = get(fi, "template_mask_cb")[..., :, None] * get(fj, "template_mask_cb")[..., None, :]
        frame_mask = get(fi, "template_mask_frame")[..., :, None] * get(fj, "template_mask_frame")[..., None, :]

        # Frame j (rotation R_j, origin t_j) seen from token i's CA: R_j^T (ca_i - t_j).
        rot_t = get(fj, "template_frame_rot").transpose(-1, -2)[:, :, None]
        offset = get(fi, "template_ca")[:, :, :, None] - get(fj, "template_frame_t")[:, :, None]
        vector = torch.matmul(rot_t, offset[..., None]).squeeze(-1)
        # NOTE(parity): upstream normalises over a size-1 dim (norm of [..., 3, 1] at dim=-1),
        # so its "unit vector" is the sign of each component, 0 where it is exactly 0.
        unit = torch.sign(vector)

        same_chain = (fi["visibility_ids"][..., :, None] == fj["visibility_ids"][..., None, :]).to(dtype)
        geometric = torch.cat([distogram, cb_mask[..., None], unit, frame_mask[..., None]], dim=-1)
        geometric = geometric * same_chain[..., None]
        len_i, len_j = dists.shape[-2:]
        res_i = get(fi, "template_restype")[:, :, :, None].expand(-1, -1, -1, len_j, -1)
        res_j = get(fj, "template_restype")[:, :, None].expand(-1, -1, len_i, -1, -1)
        return torch.cat([geometric, res_i, res_j], dim=-1)


def _check_features(name: str, feats: dict[str, Tensor], batch: int, layout: TokenLayout) -> tuple[int, int]:
    """(B, T) of the template features, after checking every one is [B, T, N, ...]."""
    missing = [k for k in TEMPLATE_FEATURES if k not in feats]
    if missing:
        raise ValueError(f"{name}: missing template features {missing}")
    templates = feats["template_mask"].shape[1] if feats["template_mask"].dim() == 3 else -1
    for key, extra in TEMPLATE_FEATURES.items():
        shape = tuple(feats[key].shape)
        if (len(shape) != 3 + extra or shape[:2] != (batch, templates)
                or shape[2] not in (layout.n, layout.n_padded)):
            raise ValueError(f"{name}: {key!r} must be [B={batch}, T, N={layout.n}, ...] with "
                             f"{extra} trailing dims like template_mask, got {shape}")
    if templates < 1:
        # Upstream fails on T = 0 too; Boltz-2's featurizer always gives T >= 1 (all-zero masks).
        raise ValueError(f"{name}: needs at least one template (all-zero template_mask when there is none)")
    return batch, templates
