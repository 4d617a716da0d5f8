"""CP twin of Boltz-2's diffusion conditioning: the conditioned pair, the structure-aware atom
encoder and the attention biases of the diffusion module.

The pair work (pairwise conditioning, token-transformer bias) is local to each rank's tile.
The atom work runs on the rank's own atom windows (split over all P ranks in global rank
order, boltz_cp/modules/atom_windows.py) and needs token data only for its span: the token
rows of its atoms (s_to_c) and the token pairs (query atom's token, key atom's token) of its
windows (z_to_p), a band near the diagonal. Both are fetched by index range (span.py); the
dense one-hot atom_to_token is never used.

Placements (mesh axes cp_i, cp_j; N = layout.n_padded, L = plan.local_atoms, kw =
plan.windows_per_rank):
    in:  s_trunk [B, N, token_s] SINGLE_BY_I; z_trunk, relative_position_encoding
         [B, N, N, token_z] PAIR; inputs: `EmbedderInputs` of this rank (`embedder_inputs`).
    out: dict with "q", "c" [B, L, atom_s] (plain, my atoms plan.atoms());
         "atom_enc_bias" [B, kw, W, H, enc_depth*enc_heads] and "atom_dec_bias"
         [B, kw, W, H, dec_depth*dec_heads] (plain, my windows; channels in upstream's layer
         order); "token_trans_bias" [B, N, N, tt_depth*tt_heads] PAIR.
    Pad tokens and atoms past M get finite values that nothing uses.
Communication per call (P ranks, n_f = N/P, h = 48-atom halo):
    2 halo_exchanges (token index [B, h] int64, then c [B, h, atom_s]) with each neighbour;
    1 span_gather of s_to_c_trans(s_trunk) rows [B, len(span), atom_s]: one message per
      overlapping (SINGLE_FULL owner, rank) pair;
    1 gather_pair_block of z_to_p_trans(z) over (my span x my extended span), atom_z
      channels: 1 all_gather of 4 int64 per rank, then one message per overlapping
      (tile owner, rank) pair, of the overlap only.
    Nothing M x N or N x N on a rank: per rank O(N^2/P) for the tiles, O(L) atoms, the
    [kw, W, H] window pairs, and the span x extended-span block of atom_z channels.
Upstream twin: boltz/model/modules/diffusion_conditioning.py DiffusionConditioning (with
encodersv2.py PairwiseConditioning and AtomEncoder, structure_prediction=True).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from boltz.model.modules.diffusion_conditioning import DiffusionConditioning as _UpstreamDiffusionConditioning
from boltz_cp.distributed import PAIR, SINGLE_BY_I, TokenLayout, check_placements, pair_from_tile
from boltz_cp.distributed.halo import halo_exchange
from boltz_cp.distributed.span import gather_pair_block, span_gather
from boltz_cp.layers.transition import CHUNK_HIDDEN
from boltz_cp.modules.atom_windows import atom_features, window_keys, window_pair_geometry
from boltz_cp.modules.input_embedder import EmbedderInputs


def _at_least_fp32(*xs: Tensor) -> torch.dtype:
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


class DiffusionConditioning(_UpstreamDiffusionConditioning):
    """Upstream's diffusion conditioning on the mesh. Built by upstream's __init__: same
    parameters and names (pairwise_conditioner, atom_encoder, atom_enc_proj_z,
    atom_dec_proj_z, token_trans_proj_z).

    forward(s_trunk, z_trunk, relative_position_encoding, inputs, layout) -> dict (see the
    module docstring); upstream's fourth output, to_keys, has no CP counterpart (window keys
    come from `atom_windows.window_keys` after a halo exchange).
    """

    def forward(self, s_trunk: DTensor, z_trunk: DTensor,  # type: ignore[override]
                relative_position_encoding: DTensor | Callable[[], DTensor], inputs: EmbedderInputs,
                layout: TokenLayout) -> dict[str, Tensor | DTensor]:
        """``relative_position_encoding`` may be a function that builds it: then it lives only
        until the pair conditioning's input projection (not through its transitions)."""
        name = type(self).__name__
        if callable(relative_position_encoding) and not isinstance(relative_position_encoding, torch.Tensor):
            relative_position_encoding = relative_position_encoding()
        check_placements(f"{name}.s_trunk", s_trunk, SINGLE_BY_I)
        check_placements(f"{name}.z_trunk", z_trunk, PAIR)
        check_placements(f"{name}.relative_position_encoding", relative_position_encoding, PAIR)
        mesh, plan, n = layout.mesh, inputs.plan, layout.n_padded
        for label, t in (("s_trunk", s_trunk), ("z_trunk", z_trunk),
                         ("relative_position_encoding", relative_position_encoding)):
            if t.shape[1] != n or (t.dim() == 4 and t.shape[2] != n):
                raise ValueError(f"{name}: {label} must have {n} (padded) tokens, got {tuple(t.shape)}")
        enc = self.atom_encoder
        w, h = enc.atoms_per_window_queries, enc.atoms_per_window_keys
        plan.check(name, mesh, w, h)

        handed = [relative_position_encoding.to_local()]  # _condition_pair drops it once projected
        del relative_position_encoding, t
        z_tile = self._condition_pair(z_trunk.to_local(), handed)
        q, c, p = self._encode_atoms(s_trunk.to_local(), z_tile, inputs, layout)
        atom_enc_bias = torch.cat([layer(p) for layer in self.atom_enc_proj_z], dim=-1)
        atom_dec_bias = torch.cat([layer(p) for layer in self.atom_dec_proj_z], dim=-1)
        token_trans_bias = torch.cat([layer(z_tile) for layer in self.token_trans_proj_z], dim=-1)
        return {"q": q, "c": c, "atom_enc_bias": atom_enc_bias, "atom_dec_bias": atom_dec_bias,
                "token_trans_bias": pair_from_tile(token_trans_bias, mesh)}

    def _condition_pair(self, z_tile: Tensor, relpos: list[Tensor]) -> Tensor:
        """PairwiseConditioning (Algorithm 21) on my tile: per pair, so local. ``relpos``: a
        one-item list, emptied here (the relpos tile is not held through the transitions)."""
        pc = self.pairwise_conditioner
        z = pc.dim_pairwise_init_proj(torch.cat((z_tile, relpos.pop()), dim=-1))
        for transition in pc.transitions:
            # NOTE(parity): hidden built CHUNK_HIDDEN channels at a time past that width, as in
            # boltz_cp.layers.transition (fc3's sum reordered: round-off only).
            chunk = CHUNK_HIDDEN if transition.hidden > CHUNK_HIDDEN else None
            z = transition(z, chunk_size=chunk) + z
        return z

    def _encode_atoms(self, s_tile: Tensor, z_tile: Tensor, inputs: EmbedderInputs,
                      layout: TokenLayout) -> tuple[Tensor, Tensor, Tensor]:
        """AtomEncoder (structure_prediction=True) on my windows: q, c [B, L, atom_s] and the
        window pair features p [B, kw, W, H, atom_z]."""
        enc, plan, at, mesh = self.atom_encoder, inputs.plan, inputs.atoms, layout.mesh
        if not enc.structure_prediction:
            raise NotImplementedError("DiffusionConditioning: the atom encoder runs with structure")
        w, h, kw, halo, n_loc = (plan.window_queries, plan.window_keys, plan.windows_per_rank,
                                 plan.halo, plan.local_atoms)
        own = slice(halo, halo + n_loc)
        lo, hi = inputs.spans[mesh.local_rank]
        # Token of every atom of my extended range (-1: none); the halo's come from neighbours.
        # The exchanges in flight together carry distinct tags.
        tok_pending = halo_exchange(inputs.atom_token + 1, mesh, halo)

        with torch.autocast("cuda", enabled=False):
            # s_to_c on my SINGLE_FULL block (the c-th sub-block of I_r), rows fetched by span.
            n_f = layout.n_padded // mesh.size
            col = mesh.coord[1]
            s_block = s_tile[:, col * n_f:(col + 1) * n_f]
            s_to_c_block = enc.s_to_c_trans(s_block.to(_at_least_fp32(s_block)))
            rows_pending = span_gather(s_to_c_block, inputs.spans, mesh, tag=1)

            tok_ext = tok_pending.wait() - 1
            has_ext = tok_ext >= 0
            if bool(has_ext.any()) and lo < hi:
                lo_e, hi_e = int(tok_ext[has_ext].min()), int(tok_ext[has_ext].max()) + 1
                want_rows, want_cols = (lo, hi), (lo_e, hi_e)
            else:  # no query atom has a token (or no key does): no z_to_p term
                want_rows = want_cols = (0, 0)
            ct_z = _at_least_fp32(z_tile)
            block_pending = gather_pair_block(z_tile, mesh, want_rows, want_cols,
                                              lambda x: enc.z_to_p_trans(x.to(ct_z)), tag=2)

            bsz = at["ref_pos"].shape[0]
            q = enc.embed_atom_features(atom_features(enc, at, own))

            # c = q + s_to_c[token of the atom]; upstream's one-hot bmm adds exactly that row
            # (or exact zeros for an atom of no token).
            rows = rows_pending.wait()
            tok = inputs.atom_token
            s_to_c = torch.zeros(*tok.shape, rows.shape[-1], dtype=rows.dtype, device=rows.device)
            if lo < hi:
                batch = torch.arange(bsz, device=tok.device)[:, None]
                picked = rows[batch, (tok - lo).clamp(0, hi - lo - 1)]
                s_to_c = torch.where((tok >= 0).unsqueeze(-1), picked, s_to_c)
            c = q + s_to_c.to(q.dtype)
            # Keys past [0, M) are zeros, as upstream's zero-padded single_to_keys.
            c_ext = halo_exchange(c, mesh, halo, tag=3).wait()
            c_ext = c_ext.masked_fill(~plan.exists(device=c.device)[None, :, None], 0)

            def queries(x: Tensor) -> Tensor:
                return x[:, own].reshape(bsz, kw, w, *x.shape[2:])

            p = window_pair_geometry(enc, at, plan)

            # z_to_p[tok(query), tok(key)] from the fetched band block; 0 where either atom
            # has no token (upstream's one-hot einsum sums exact zeros there).
            block = block_pending.wait()
            if block.shape[1] and block.shape[2]:
                tq = queries(tok_ext)  # [B, kw, W]
                tk = window_keys(tok_ext, plan)  # [B, kw, H]
                lo_e = want_cols[0]
                batch = torch.arange(bsz, device=tok.device)[:, None, None, None]
                qi = (tq - lo).clamp(0, block.shape[1] - 1).unsqueeze(-1)
                ki = (tk - lo_e).clamp(0, block.shape[2] - 1).unsqueeze(2)
                z_to_p = block[batch, qi, ki]  # [B, kw, W, H, atom_z]
                valid = ((tq >= 0).unsqueeze(-1) & (tk >= 0).unsqueeze(2)).unsqueeze(-1)
                p = p + torch.where(valid, z_to_p, torch.zeros_like(z_to_p)).to(p.dtype)

            p = p + enc.c_to_p_trans_q(c.reshape(bsz, kw, w, 1, -1))
            p = p + enc.c_to_p_trans_k(window_keys(c_ext, plan).reshape(bsz, kw, 1, h, -1))
            p = p + enc.p_mlp(p)
        return q, c, p
