"""CP twin of Boltz-2's score model (the denoiser of one diffusion step).

Placements (mesh axes cp_i, cp_j; B' = B*multiplicity, N = layout.n_padded, M atoms):
    s_inputs, s_trunk [B, N, token_s] SINGLE_BY_I; token_mask [B, N] SINGLE_BY_I (optional);
    r_noisy [B', M, 3] and times [B'] (or [B', 1, 1]) plain, replicated, identical everywhere;
    inputs: my `EmbedderInputs` (boltz_cp/modules/input_embedder.py embedder_inputs);
    diffusion_conditioning: "q", "c" [B, L, atom_s] plain, my atoms plan.atoms(rank);
      "atom_enc_bias" / "atom_dec_bias" [B, windows_per_rank, W, H, depth*heads] plain, my
      windows (channels as upstream's cat over layers); "token_trans_bias"
      [B, N, N, token_depth*token_heads] PAIR;
    out r_update [B', M, 3] plain, replicated (the same bits on every rank).
Inside: every per-token computation (single conditioning, s_to_a_linear, the token
transformer's adaLN, projections, gates and transitions, a_norm, a_to_q_trans) runs once, on my
SINGLE_FULL block [B', N/P, ...]; each attention layer scores my tile's (query, key) pairs with
its bias tile; atoms on my windows [B', L, atom_s].
Communication per call (P ranks, square p x p mesh, n = N/p, n_f = N/P, D_a = encoder +
decoder depth, D_t = token transformer depth, C = 2*token_s):
    D_a halo_exchanges of [B', 48, atom_s] with each neighbour (2 messages per inner rank);
    1 span_reduce of the partial token sums [B', span, C] onto the SINGLE_FULL owners;
    D_t x (1 all_gather on ring_j of (q, k, v, mask) [B', n_f, 3C + 1]; 1 transpose_exchange
      of (k, v, mask) [B', n, 2C + 1]; 1 all_to_all on ring_j of the partial softmax states,
      [B', n_f, heads, head_dim + 2] per peer);
    1 span_gather of a_to_q rows [B', span, atom_s] from the SINGLE_FULL owners;
    1 all_gather on the mesh of r_update [B', L, 3].
    No bias tile or window bias moves; nothing N x N or M x N exists on a rank.
Upstream twin: boltz/model/modules/diffusionv2.py DiffusionModule (encodersv2.py
SingleConditioning, AtomAttentionEncoder(structure_prediction=True), AtomAttentionDecoder;
transformersv2.py DiffusionTransformer; layers/attentionv2.py AttentionPairBias with
compute_pair_bias=False).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from boltz.model.modules.diffusionv2 import DiffusionModule as _UpstreamDiffusionModule
from boltz_cp.distributed import PAIR, SINGLE_BY_I, TokenLayout, check_placements
from boltz_cp.layers.attentionv2 import AttentionPairBias
from boltz_cp.modules.atom_tokens import token_means, token_rows_to_atoms
from boltz_cp.modules.atom_windows import atom_transformer, slice_atoms, window_keys
from boltz_cp.modules.input_embedder import EmbedderInputs

CONDITIONING_KEYS = ("q", "c", "atom_enc_bias", "atom_dec_bias", "token_trans_bias")


def _at_least_fp32(x: Tensor) -> Tensor:
    """Upstream's `.float()`, promoted rather than forced: fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class DiffusionModule(_UpstreamDiffusionModule):
    """The score model on the mesh. Built by upstream's __init__ (same parameters and names);
    each token transformer layer's attention is replaced by the CP AttentionPairBias
    (compute_pair_bias=False: its bias is a channel slice of my token_trans_bias tile).

    forward(s_inputs, s_trunk, r_noisy, times, inputs, diffusion_conditioning, layout,
    multiplicity=1, token_mask=None) -> r_update; see the module docstring for placements.
    ``token_mask`` is upstream's token_pad_mask; when None it is taken as "the token has
    atoms" (atom_count > 0), which is the same for featurized Boltz inputs (every token has an
    atom, pad tokens none).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for layer in self.token_transformer.layers:
            up = layer.pair_bias_attn
            layer.pair_bias_attn = AttentionPairBias(c_s=up.c_s, num_heads=up.num_heads, inf=up.inf,
                                                     compute_pair_bias=False)

    def forward(self, s_inputs: DTensor, s_trunk: DTensor, r_noisy: Tensor, times: Tensor,  # type: ignore[override]
                inputs: EmbedderInputs, diffusion_conditioning: dict, layout: TokenLayout,
                multiplicity: int = 1, token_mask: DTensor | None = None) -> Tensor:
        name = type(self).__name__
        check_placements(f"{name}.s_inputs", s_inputs, SINGLE_BY_I)
        check_placements(f"{name}.s_trunk", s_trunk, SINGLE_BY_I)
        dc = diffusion_conditioning
        missing = [k for k in CONDITIONING_KEYS if k not in dc]
        if missing:
            raise KeyError(f"{name}: diffusion_conditioning lacks {missing}")
        check_placements(f"{name}.token_trans_bias", dc["token_trans_bias"], PAIR)
        if token_mask is not None:
            check_placements(f"{name}.token_mask", token_mask, SINGLE_BY_I)
        mesh, plan, mult = layout.mesh, inputs.plan, multiplicity
        w, h = self.atoms_per_window_queries, self.atoms_per_window_keys
        plan.check(name, mesh, w, h)
        bsz = s_trunk.shape[0]
        bm = bsz * mult
        if s_trunk.shape[1] != layout.n_padded or s_inputs.shape[:2] != s_trunk.shape[:2]:
            raise ValueError(f"{name}: expected s_inputs / s_trunk [B, {layout.n_padded}, C] "
                             f"(padded), got {tuple(s_inputs.shape)} / {tuple(s_trunk.shape)}")
        if tuple(r_noisy.shape) != (bm, plan.m, 3):
            raise ValueError(f"{name}: r_noisy must be the full [{bm}, {plan.m}, 3] (B*multiplicity, "
                             f"M, 3) on every rank, got {tuple(r_noisy.shape)}")
        if times.numel() != bm:
            raise ValueError(f"{name}: times must hold {bm} (B*multiplicity) values, got "
                             f"{tuple(times.shape)}")
        if tuple(dc["q"].shape[:2]) != (bsz, plan.local_atoms):
            raise ValueError(f"{name}: conditioning q must be [{bsz}, {plan.local_atoms}, atom_s] "
                             f"(my atoms), got {tuple(dc['q'].shape)}")

        n_f = layout.n_padded // mesh.size
        sub = slice(mesh.coord[1] * n_f, (mesh.coord[1] + 1) * n_f)  # my SINGLE_FULL block in I_r

        # Single conditioning, once per token: on my SINGLE_FULL block (fourier of times replicated).
        s_f, _ = self.single_conditioner(times.reshape(bm),
                                         s_trunk.to_local()[:, sub].repeat_interleave(mult, 0),
                                         s_inputs.to_local()[:, sub].repeat_interleave(mult, 0))

        q_skip, c_skip, a_f = self._encode(inputs, r_noisy, dc, mult, mesh)
        a_f = a_f + self.s_to_a_linear(s_f)

        if token_mask is None:
            mask_f = (inputs.tokens["atom_count"] > 0).repeat_interleave(mult, 0)
        else:
            mask_f = token_mask.to_local()[:, sub].repeat_interleave(mult, 0)
        a_f = self.a_norm(self._token_transformer(a_f, s_f, mask_f, dc["token_trans_bias"], layout, mult))

        r_local = self._decode(inputs, a_f, q_skip, c_skip, dc, mult, mesh)
        return self._gather_atoms(r_local, mesh)[:, :plan.m]

    # -- stages -----------------------------------------------------------------------------
    def _encode(self, inputs: EmbedderInputs, r_noisy: Tensor, dc: dict, mult: int,
                mesh) -> tuple[Tensor, Tensor, Tensor]:
        """AtomAttentionEncoder(structure_prediction=True) on my windows -> q, c [B', L, atom_s]
        and the token means a [B', n_f, 2*token_s] of my SINGLE_FULL block."""
        aae, plan = self.atom_attention_encoder, inputs.plan
        q = _at_least_fp32(dc["q"]).repeat_interleave(mult, 0)
        c = _at_least_fp32(dc["c"]).repeat_interleave(mult, 0)
        q = q + aae.r_to_q_trans(slice_atoms(r_noisy, plan, extended=False))
        bias = _at_least_fp32(dc["atom_enc_bias"]).repeat_interleave(mult, 0)
        q = atom_transformer(aae.atom_encoder, q, c, bias, self._key_mask(inputs, mult, q.dtype), plan, mesh)
        with torch.autocast(q.device.type, enabled=False):
            q_to_a = _at_least_fp32(aae.atom_to_token_trans(q))
            a = token_means(q_to_a, inputs.atom_token.repeat_interleave(mult, 0), inputs.spans,
                            inputs.tokens["atom_count"].repeat_interleave(mult, 0), mesh)
        return q, c, a.to(q.dtype)

    def _token_transformer(self, a: Tensor, s: Tensor, mask: Tensor, token_trans_bias: DTensor,
                           layout: TokenLayout, mult: int) -> Tensor:
        """DiffusionTransformer on my SINGLE_FULL block: a, s [B', n_f, 2*token_s], mask [B', n_f]
        (each layer's attention scores my tile's (query, key) pairs, see forward_full)."""
        layers = self.token_transformer.layers
        bias_tile = _at_least_fp32(token_trans_bias.to_local())
        b0, ni, nj, ch = bias_tile.shape
        if ch % len(layers):
            raise ValueError(f"{type(self).__name__}: token_trans_bias has {ch} channels, not a "
                             f"multiple of the {len(layers)} token transformer layers")
        bias_tile = bias_tile.view(b0, ni, nj, len(layers), ch // len(layers))
        for i, layer in enumerate(layers):
            b = layer.adaln(a, s)
            # The bias is shared by all samples; the attention repeats it per sample.
            b = layer.pair_bias_attn.forward_full(b, bias_tile[:, :, :, i], mask, b, layout, multiplicity=mult)
            a = a + layer.output_projection(s) * b
            a = a + layer.transition(a, s)
            a = layer.post_lnorm(a)
        return a

    def _decode(self, inputs: EmbedderInputs, a_f: Tensor, q: Tensor, c: Tensor, dc: dict, mult: int,
                mesh) -> Tensor:
        """AtomAttentionDecoder on my windows -> r_update of my atoms [B', L, 3]."""
        dec, plan = self.atom_attention_decoder, inputs.plan
        with torch.autocast(q.device.type, enabled=False):
            a_to_q = dec.a_to_q_trans(_at_least_fp32(a_f))  # my SINGLE_FULL block [B', n_f, atom_s]
            a_to_q = token_rows_to_atoms(a_to_q, inputs.atom_token.repeat_interleave(mult, 0),
                                         inputs.spans, mesh)
        q = q + a_to_q.to(q)
        bias = _at_least_fp32(dc["atom_dec_bias"]).repeat_interleave(mult, 0)
        q = atom_transformer(dec.atom_decoder, q, c, bias, self._key_mask(inputs, mult, q.dtype), plan, mesh)
        return dec.atom_feat_to_atom_pos_update(q)

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _key_mask(inputs: EmbedderInputs, mult: int, dtype: torch.dtype) -> Tensor:
        """[B', windows_per_rank, H]: the atom mask of each window's keys (0 past [0, M))."""
        keys = window_keys(inputs.atoms["atom_pad_mask"].bool(), inputs.plan)
        return keys.to(dtype).repeat_interleave(mult, 0)

    @staticmethod
    def _gather_atoms(r_local: Tensor, mesh) -> Tensor:
        """My atoms' [B', L, 3] -> every rank's, in rank order [B', P*L, 3] (one all_gather)."""
        r_local = r_local.contiguous()
        if mesh.size == 1:
            return r_local
        parts = [torch.empty_like(r_local) for _ in range(mesh.size)]
        dist.all_gather(parts, r_local, group=mesh.group)
        return torch.cat(parts, dim=1)
