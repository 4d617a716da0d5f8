"""Parity cases of the score model: one denoiser call r_update(r_noisy, times), multiplicity 2.

- `diffusion_step`: B = 1, two samples; the token mask is passed explicitly.
- `diffusion_step_batch2`: B = 2, two samples each (checks the sample order of upstream's
  repeat_interleave against the per-batch atoms); the token mask is derived from the atoms.

Synthetic atom/token inputs as the input embedder's cases (tokens of 1-14 atoms, a trailing
fifth of pad tokens with no atoms, atoms padded to whole windows); random s_inputs, s_trunk,
r_noisy, times and random upstream-format diffusion conditioning (q, c [B, M, atom_s];
atom_enc_bias / atom_dec_bias [B, K, W, H, depth*heads]; token_trans_bias [B, N, N,
depth*heads]). Upstream reads the dense atom_to_token and its own to_keys; the CP side gets
`embedder_inputs` and the conditioning cut to its atoms, windows and tile.
"""

from __future__ import annotations

from functools import partial

import torch

from boltz.model.modules import encodersv2
from boltz.model.modules.diffusionv2 import DiffusionModule as UpstreamDiffusionModule
from boltz_cp.modules.diffusion import DiffusionModule
from boltz_cp.modules.input_embedder import embedder_inputs
from boltz_cp.modules.atom_windows import slice_atoms
from boltz_cp.parity.cases.input_embedder import embedder_features
from boltz_cp.parity.runner import register, twin_from

W, H = 32, 128
ATOM_S = 16
ENC_DEPTH, ENC_HEADS = 2, 2
DEC_DEPTH, DEC_HEADS = 2, 4
TOKEN_DEPTH, TOKEN_HEADS = 3, 4
DIM_FOURIER = 16
UPSTREAM_FEATS = ("ref_pos", "atom_pad_mask", "atom_to_token", "token_pad_mask")


def score_model_args(token_s: int) -> dict:
    return dict(token_s=token_s, atom_s=ATOM_S, atoms_per_window_queries=W, atoms_per_window_keys=H,
                sigma_data=16, dim_fourier=DIM_FOURIER, atom_encoder_depth=ENC_DEPTH,
                atom_encoder_heads=ENC_HEADS, token_transformer_depth=TOKEN_DEPTH,
                token_transformer_heads=TOKEN_HEADS, atom_decoder_depth=DEC_DEPTH,
                atom_decoder_heads=DEC_HEADS, conditioning_transition_layers=2)


def diffusion_inputs(n: int, token_s: int, generator: torch.Generator, batch: int, mult: int) -> dict:
    """Full float64 inputs of one score-model call (upstream formats)."""
    g, f64 = generator, torch.float64
    x = embedder_features(n, g, batch)
    m = x["ref_pos"].shape[1]
    k = m // W
    out = dict(x)
    out.update(
        s_inputs=torch.randn(batch, n, token_s, generator=g, dtype=f64),
        s_trunk=torch.randn(batch, n, token_s, generator=g, dtype=f64),
        r_noisy=torch.randn(batch * mult, m, 3, generator=g, dtype=f64),
        times=0.5 * torch.randn(batch * mult, generator=g, dtype=f64),
        q=torch.randn(batch, m, ATOM_S, generator=g, dtype=f64),
        c=torch.randn(batch, m, ATOM_S, generator=g, dtype=f64),
        atom_enc_bias=torch.randn(batch, k, W, H, ENC_DEPTH * ENC_HEADS, generator=g, dtype=f64),
        atom_dec_bias=torch.randn(batch, k, W, H, DEC_DEPTH * DEC_HEADS, generator=g, dtype=f64),
        token_trans_bias=torch.randn(batch, n, n, TOKEN_DEPTH * TOKEN_HEADS, generator=g, dtype=f64),
    )
    return out


def cut_conditioning(x: dict, inputs, layout) -> dict:
    """Upstream-format conditioning -> this rank's: q, c on my atoms, biases on my windows
    (zeros past K), token_trans_bias as my PAIR tile."""
    plan = inputs.plan
    kw, k = plan.windows_per_rank, plan.windows
    w0 = plan.rank * kw

    def windows(b: torch.Tensor) -> torch.Tensor:
        out = b.new_zeros(b.shape[0], kw, *b.shape[2:])
        lo, hi = min(w0, k), min(w0 + kw, k)
        out[:, lo - w0:hi - w0] = b[:, lo:hi]
        return out

    return {
        "q": slice_atoms(x["q"], plan, extended=False),
        "c": slice_atoms(x["c"], plan, extended=False),
        "atom_enc_bias": windows(x["atom_enc_bias"]),
        "atom_dec_bias": windows(x["atom_dec_bias"]),
        "token_trans_bias": layout.shard_pair(x["token_trans_bias"]),
    }


@register("diffusion_step")
class DiffusionStepCase:
    batch, mult, explicit_mask = 1, 2, True

    def build(self, preset):
        return UpstreamDiffusionModule(**score_model_args(preset.token_s))

    def cp_twin(self, upstream):
        token_s = upstream.s_to_a_linear[1].weight.shape[0] // 2
        return twin_from(upstream, DiffusionModule(**score_model_args(token_s)))

    def inputs(self, n, preset, generator):
        return diffusion_inputs(n, preset.token_s, generator, self.batch, self.mult)

    def serial(self, module, x):
        feats = {k: x[k] for k in UPSTREAM_FEATS}
        k = x["ref_pos"].shape[1] // W
        # Looked up at call time, so that fp64_reference's float64 window gather applies.
        to_keys = partial(encodersv2.single_to_keys,
                          indexing_matrix=encodersv2.get_indexing_matrix(k, W, H, x["q"].device), W=W, H=H)
        dc = {key: x[key] for key in ("q", "c", "atom_enc_bias", "atom_dec_bias", "token_trans_bias")}
        dc["to_keys"] = to_keys
        r = module(s_inputs=x["s_inputs"], s_trunk=x["s_trunk"], r_noisy=x["r_noisy"], times=x["times"],
                   feats=feats, diffusion_conditioning=dc, multiplicity=self.mult)
        return {"r_update": r}

    def cp(self, module, x, layout):
        feats = {k: v for k, v in x.items() if k != "atom_to_token"}
        inputs = embedder_inputs(feats, layout, W, H)
        dc = cut_conditioning(x, inputs, layout)
        mask = layout.shard_single(x["token_pad_mask"]) if self.explicit_mask else None
        r = module(layout.shard_single(x["s_inputs"]), layout.shard_single(x["s_trunk"]), x["r_noisy"],
                   x["times"], inputs, dc, layout, multiplicity=self.mult, token_mask=mask)
        return {"r_update": r}


@register("diffusion_step_batch2")
class DiffusionStepBatch2Case(DiffusionStepCase):
    batch, mult, explicit_mask = 2, 2, False
