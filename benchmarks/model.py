"""Analytic per-rank memory, time and communication model of the CP Boltz-2 forward.

    python benchmarks/model.py predict [--plot benchmarks/memory_model.png]
    python benchmarks/model.py check REPORT.json [REPORT.json ...]
    python benchmarks/model.py comm --tokens 3605 --side 2
    python benchmarks/model.py fit-cpu REPORT.json ...        # refit CPU_HERE from 1x1 reports
    python benchmarks/model.py params                         # recount the parameter table

`check` compares the model with reports of `python -m boltz_cp.bench ... json=REPORT.json`
(per stage and per rank: measured vs model); `predict` prints the predictions for the headline
cases (3,605 tokens on 2x2 H100, 30,000 on 8x8, Boltz-2 as released) and draws memory per rank
vs N for several meshes; `comm` prints the bytes of every ring step of one pairformer block.

MEMORY (`stage_memory`) is an inventory, per stage, of the tensors alive at that stage's peak on
one rank, read off the CP implementation (boltz_cp/layers, modules, models), in units of a pair
tile [n, n, C] (n = N_padded / p; N_padded = N rounded up to a multiple of P = p^2). Each term
carries its dtype class: A (activations: 4 B in fp32, 2 B in bf16), F (promoted to at least fp32
by the code: triangle attention, Cannon operands, softmax states: 4 B), L (LayerNorm outputs:
fp32 under autocast, 4 B). The bf16 figures assume autocast bf16-mixed with today's promotions;
the CP model itself runs fp32 only so far, so bf16 figures are predictions of that future mode.
A few terms the inventory does not explain are calibrated on measured CPU runs (RESIDUAL_TILES,
ATOM_BYTES_*): they are labelled "calibrated" in every breakdown.

TIME (`stage_time`) = per stage and rank: FLOPs of the contractions (at the rate of their dtype
class) + bytes moved by the per-pair elementwise work and by materialised attention scores (at
HBM bandwidth), + ring communication not hidden behind compute (each ring step overlaps its
transfer with its block's compute: max(compute, transfer) + latency). The rates are a `Machine`:
`CPU_HERE` is calibrated on measured CPU runs; `H100` is stated assumptions (see its docstring).
Everything printed says "predicted" or "measured".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

MIB = 2**20
GB = 1e9

# ----------------------------------------------------------------------------------------------
# Hyperparameters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyper:
    """What the model needs of a Boltz-2 architecture and run (Boltz-2 as released by default)."""

    token_s: int = 384
    token_z: int = 128
    atom_s: int = 128
    atom_z: int = 16
    pairformer_blocks: int = 64
    s_heads: int = 16  # pairformer single-track attention heads
    tri_heads: int = 4  # triangle attention heads x width
    tri_width: int = 32
    msa_blocks: int = 4
    msa_s: int = 64
    msa_rows: int = 1  # MSA rows after subsampling (1: single-sequence input, msa: empty)
    template_blocks: int = 2
    template_dim: int = 64
    templates: int = 1  # templates T (the featurizer gives one all-masked template when none)
    token_transformer_depth: int = 24
    token_transformer_heads: int = 16
    atom_encoder_depth: int = 3  # diffusion atom encoder (and the input embedder's)
    atom_decoder_depth: int = 3
    atom_heads: int = 4
    confidence_blocks: int = 8
    num_bins: int = 64
    recycling_steps: int = 3
    sampling_steps: int = 200
    samples: int = 1  # diffusion samples denoised at once (multiplicity)
    atoms_per_token: float = 8.4  # featurize_lean on synthetic proteins: 8,384 atoms / 1,000 tokens
    window_queries: int = 32
    window_keys: int = 128

    @property
    def tri_hd(self) -> int:
        return self.tri_heads * self.tri_width

    @property
    def token_trans_channels(self) -> int:
        """token_trans_bias channels: one H_t-head bias per token-transformer layer (3 C_z at Boltz-2)."""
        return self.token_transformer_depth * self.token_transformer_heads


BOLTZ2 = Hyper()


def hyper_from_report(report: dict) -> Hyper:
    """The Hyper of a `python -m boltz_cp.bench` report (widths, block counts and steps as run)."""
    b = report["model"]["blocks"]
    hp = {k: v for k, v in report.get("hparams", {}).items() if v is not None}
    widths = {k: hp[k] for k in ("token_s", "token_z", "atom_s", "atom_z", "s_heads", "tri_heads", "tri_width",
                                 "msa_s", "template_dim", "token_transformer_heads", "atom_heads", "num_bins")
              if k in hp}
    return replace(
        BOLTZ2, **widths,
        pairformer_blocks=b.get("pairformer", BOLTZ2.pairformer_blocks),
        msa_blocks=b.get("msa", BOLTZ2.msa_blocks), template_blocks=b.get("template", BOLTZ2.template_blocks),
        confidence_blocks=b.get("confidence", BOLTZ2.confidence_blocks),
        token_transformer_depth=b.get("token_transformer", BOLTZ2.token_transformer_depth),
        atom_encoder_depth=b.get("atom_encoder", BOLTZ2.atom_encoder_depth),
        atom_decoder_depth=b.get("atom_decoder", BOLTZ2.atom_decoder_depth),
        recycling_steps=report["recycling_steps"], sampling_steps=report["sampling_steps"],
        samples=report["diffusion_samples"],
        atoms_per_token=report["n_atoms"] / report["n_tokens"],
    )


# Parameters of Boltz2CP with the `full` preset's widths, by part (counted by building the model:
# all stacks 1 deep, then each stack 2 deep; `python benchmarks/model.py params` recounts; atom
# encoder / decoder depths fixed at 3). With Boltz-2's depths they add up to 506,724,992, the
# released checkpoint's count.
PARAMS_BASE = 12_936_064  # everything outside the per-block counts below (embedder, heads, conditioning, ...)
PARAMS_PER_BLOCK = {
    "pairformer_blocks": 3_070_848,
    "msa_blocks": 795_136,
    "template_blocks": 181_632,
    "confidence_blocks": 3_070_848,
    "token_transformer_depth": 11_214_336,  # a layer + its token_trans_proj_z
}


def parameter_count(hp: Hyper) -> int:
    """Parameters of the model (the released Boltz-2: 506,724,992 -- see boltz_cp.models.checkpoint)."""
    return PARAMS_BASE + sum(getattr(hp, k) * v for k, v in PARAMS_PER_BLOCK.items())


# ----------------------------------------------------------------------------------------------
# Geometry and dtypes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """N tokens (M atoms) on a p x p mesh."""

    n_tokens: int
    side: int
    atoms: int

    @property
    def ranks(self) -> int:
        return self.side * self.side

    @property
    def n_padded(self) -> int:
        return -(-self.n_tokens // self.ranks) * self.ranks

    @property
    def n(self) -> int:
        """Tile side (tokens of my row block I_r)."""
        return self.n_padded // self.side

    @property
    def pairs(self) -> int:
        return self.n * self.n

    @property
    def local_atoms(self) -> int:
        """L: atoms per rank (whole 32-atom windows, split evenly; at least the 48-atom halo)."""
        windows = -(-self.atoms // 32)
        return max(-(-windows // self.ranks), 2) * 32


def geometry(n_tokens: int, side: int, hp: Hyper = BOLTZ2, atoms: int | None = None) -> Geometry:
    return Geometry(n_tokens, side, atoms if atoms is not None else round(n_tokens * hp.atoms_per_token))


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of the three dtype classes (see the module docstring)."""

    A: int
    F: int = 4
    L: int = 4

    @classmethod
    def of(cls, precision: str) -> "Dtypes":
        if precision == "fp32":
            return cls(4)
        if precision == "bf16":
            return cls(2)
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")


# ----------------------------------------------------------------------------------------------
# Memory: inventories of what is alive at each stage's peak
# ----------------------------------------------------------------------------------------------

Terms = list[tuple[str, float]]  # (what, bytes per rank)

# Chunk sizes of the implementation (pairs or channels), as in the code they mirror.
SCORE_BLOCK_PER_TILE = 1  # boltz_cp/layers/triangular_attention.py
TRANSITION_CHUNK = 128  # boltz_cp/layers/transition.py CHUNK_HIDDEN
APB_CHUNK_PAIRS = 1 << 18  # boltz_cp/layers/attentionv2.py CHUNK_PAIRS
RELPOS_CHUNK_PAIRS = 1 << 17  # boltz_cp/modules/encodersv2.py CHUNK_PAIRS

# Calibrated on the measured CPU runs (benchmarks/RESULTS.md, "bench + model" section): what the
# inventory does not explain, per stage, in fp32 pair tiles [n, n, C_z] ...
RESIDUAL_TILES = {
    "pair init": 0.0,
    "templates": 0.05,
    "MSA module": 0.10,
    "pairformer": 0.05,
    "distogram": 0.05,
    "diffusion conditioning": 0.0,
    "sampling": 0.0,
    "confidence: pairformer": 0.25,
    "confidence: heads": 1.4,  # the heads' many [n, n, 64] softmax / weight temporaries, not all counted
}
# ... in the chunked transition (measured in the diffusion conditioning's pair transitions: 9.5
# tiles where the inventory counts 8.5, at N = 256 ... 512);
TRANSITION_RESIDUAL_TILES = 1.0
# ... extra bytes on meshes p > 1, per token of the tile side n (measured +14.4 MiB at n = 256 and
# +25.6 MiB at n = 500 in the pair stages on 2x2: O(n), not O(n^2); not located -- gloo staging
# of the ring messages is the likely owner), per stage:
MESH_BYTES_PER_TOKEN = {"pairformer": 52_000, "MSA module": 52_000, "confidence: pairformer": 52_000,
                        "templates": 0, "diffusion conditioning": 20_000, "distogram": 10_000,
                        "confidence: heads": 0, "sampling": 0, "pair init": 0}
# ... and per atom of the rank (the atom windows; fitted over N = 256 ... 1,000, 1x1 and 2x2):
ATOM_BYTES_EMBEDDER = 29_500  # input embedder: window pair features p [.., W, H, atom_z] ~3.6 copies
ATOM_BYTES_STEP = 27_000  # one denoising step per sample: the repeated atom biases, window k/v, scores


def _tile(g: Geometry, channels: float, nbytes: int) -> float:
    return g.pairs * channels * nbytes


@dataclass(frozen=True)
class MemOptions:
    """Changes to the implementation whose memory effect the model can show (all off = as built)."""

    free_before_confidence: bool = False  # drop token_trans_bias, relpos, atom biases after sampling
    release_inputs: bool = False  # callers drop their reference to a block's input z (pass ownership)
    tri_att_act_dtype: bool = False  # triangle attention's x_ln, k|v, q in the activation dtype (state fp32)
    cannon_act_dtype: bool = False  # triangle multiplication's Cannon blocks in the activation dtype (acc fp32)
    score_block_per_tile: float = SCORE_BLOCK_PER_TILE  # score block size relative to the tile

    def label(self) -> str:
        parts = [k for k in ("free_before_confidence", "release_inputs", "tri_att_act_dtype", "cannon_act_dtype")
                 if getattr(self, k)]
        if self.score_block_per_tile != SCORE_BLOCK_PER_TILE:
            parts.append(f"score_block_per_tile={self.score_block_per_tile:g}")
        return " + ".join(parts) or "as implemented"


AS_BUILT = MemOptions()


def triangle_attention_terms(g: Geometry, c: int, hp: Hyper, dt: Dtypes, opts: MemOptions = AS_BUILT) -> Terms:
    """boltz_cp/layers/triangular_attention.py `_attend` at its peak (all in >= fp32).

    Alive through the call: x_ln, the [k | v | mask] block, the bias block, q, the softmax
    state (acc + max/sum); then either the ring loop (score block of c/H query rows = c channels,
    plus the next k|v|mask and bias blocks in flight when p > 1) or the gating (o, sigmoid(g),
    o * g): whichever is larger.
    """
    hd, h = hp.tri_hd, hp.tri_heads
    op = dt.A if opts.tri_att_act_dtype else dt.F  # operand dtype
    terms: Terms = []
    if op != dt.A:
        terms.append(("tri-att: x in fp32", _tile(g, c, dt.F)))
    terms += [
        ("tri-att: x_ln", _tile(g, c, op)),
        ("tri-att: k|v|mask block", _tile(g, 2 * hd + 1, op)),
        ("tri-att: bias block", _tile(g, h, op)),
        ("tri-att: q", _tile(g, hd, op)),
        ("tri-att: softmax acc + max/sum", _tile(g, hd + 2 * h, dt.F)),
    ]
    loop = _tile(g, opts.score_block_per_tile * c, dt.F)
    if g.side > 1:
        loop += _tile(g, 2 * hd + 1 + h, op)
    gating = _tile(g, hd, dt.F) + _tile(g, 2 * hd, op)
    if loop >= gating:
        terms.append(("tri-att: score block" + (" + next k|v|mask, bias in flight" if g.side > 1 else ""), loop))
    else:
        terms.append(("tri-att: gating o, sigmoid(g), o*g", gating))
    return terms


def triangle_mult_terms(g: Geometry, c: int, dt: Dtypes, opts: MemOptions = AS_BUILT) -> Terms:
    """boltz_cp/layers/triangular_mult.py `_forward` at its peak: the largest of the input
    projection (x_in, p_in, g_in, sigmoid), the Cannon loop (x_in, a|b, current + next blocks
    in flight, accumulator) and the output gating (x_in, a|b, acc, p_out, sigmoid, out)."""
    blk = dt.A if opts.cannon_act_dtype else dt.F
    fp32_copy = _tile(g, 2 * c, dt.F) if dt.A != blk else 0.0
    phase_in = _tile(g, c, dt.L) + _tile(g, 6 * c, dt.A)
    base = _tile(g, c, dt.L) + _tile(g, 2 * c, dt.A) + fp32_copy
    if g.side > 1:
        loop = base + _tile(g, 4 * c, blk) + _tile(g, c, dt.F)  # current a, b + next a, b + accumulator
    else:
        loop = base + _tile(g, 2 * c, blk) + _tile(g, c, dt.F)  # matmul's contiguous a, b + output
    phase_out = base + _tile(g, c, dt.F) + _tile(g, 3 * c, dt.A)
    best = max((phase_in, "input projections x_in, p_in, g_in, sigmoid"),
               (loop, "Cannon loop x_in, a|b, blocks" + (" + next blocks" if g.side > 1 else "") + ", acc"),
               (phase_out, "output gating"))
    return [(f"tri-mul: {best[1]}", best[0])]


def transition_terms(g: Geometry, c: int, hidden: int, dt: Dtypes) -> Terms:
    """Upstream Transition chunked by 128 hidden channels (boltz_cp/layers/transition.py)."""
    if hidden > TRANSITION_CHUNK:
        k = TRANSITION_CHUNK
        return [("transition: norm, 3 hidden chunks, out", _tile(g, c, dt.L) + _tile(g, 3 * k + c, dt.A)),
                (f"transition: calibrated ({TRANSITION_RESIDUAL_TILES:.1f} fp32 tile over the count)",
                 _tile(g, TRANSITION_RESIDUAL_TILES * c, dt.A))]
    return [("transition: norm, hidden, out", _tile(g, c, dt.L) + _tile(g, 3 * hidden + c, dt.A))]


def pair_layer_terms(g: Geometry, c: int, hp: Hyper, dt: Dtypes, opts: MemOptions = AS_BUILT) -> Terms:
    """The largest transient of one pair layer (triangle attention, multiplication, transition)."""
    options = [triangle_attention_terms(g, c, hp, dt, opts), triangle_mult_terms(g, c, dt, opts),
               transition_terms(g, c, 4 * c, dt)]
    return max(options, key=lambda t: sum(b for _, b in t))


def _atoms_persistent(g: Geometry, hp: Hyper, dt: Dtypes) -> Terms:
    """The diffusion conditioning's atom outputs, alive from conditioning to the end: q, c and the
    window biases of every encoder and decoder layer [.., W, H, depth*heads]."""
    heads = (hp.atom_encoder_depth + hp.atom_decoder_depth) * hp.atom_heads
    la = g.local_atoms
    return [("atom biases (enc + dec), q, c", la * hp.window_keys * heads * dt.A + 2 * la * hp.atom_s * dt.A)]


def stage_memory(g: Geometry, hp: Hyper = BOLTZ2, precision: str = "fp32",
                 opts: MemOptions = AS_BUILT) -> dict[str, Terms]:
    """Per stage: the terms alive at its peak on one rank (activations above the forward's start:
    weights and inputs excluded). Stages as `python -m boltz_cp.bench` names them (shortened)."""
    dt = Dtypes.of(precision)
    c, td, t = hp.token_z, hp.template_dim, hp.templates
    z = lambda what, ch=c, nb=dt.A: (what, _tile(g, ch, nb))  # noqa: E731
    def res(stage: str) -> Terms:
        terms = [(f"calibrated residual ({RESIDUAL_TILES[stage]:.2f} fp32 tiles)",
                  _tile(g, RESIDUAL_TILES[stage] * c, 4))]
        if g.side > 1 and MESH_BYTES_PER_TOKEN[stage]:
            terms.append(("calibrated mesh residual (O(n), p > 1)", MESH_BYTES_PER_TOKEN[stage] * g.n))
        return terms

    single = [("single track s, s_inputs, ...", 12 * g.n * hp.token_s * dt.F)]
    trunk_keep = [z("z_init (recycle input)"), z("relative position encoding"), z("z (trunk)")]
    out: dict[str, Terms] = {}

    out["input embedder"] = [("atom window pair features (calibrated per atom)",
                              g.local_atoms * ATOM_BYTES_EMBEDDER * dt.A / 4)]
    relpos_chunk = min(g.pairs, max(1, RELPOS_CHUNK_PAIRS // g.n) * g.n)
    out["pair init"] = [z("outer sum"), z("relative position encoding"), z("z sum"), z("token bonds / contacts"),
                        ("relpos one-hot chunk (int64 + fp32 + cat)", relpos_chunk * 139 * (8 + 4 + 4))]
    out["pair init"] += res("pair init")

    # Templates: the template pairformer runs on [T, n, n, template_dim] (batch B*T).
    tpl = trunk_keep + [z("template z_proj", td), z("template v", td * t), z("template v (current)", td * t)]
    if hp.template_blocks > 1:
        tpl.append(z("template v (block input)", td * t))
    tpl += [(f"{w} x{t}" if t > 1 else w, b * t) for w, b in pair_layer_terms(g, td, hp, dt, opts)]
    out["templates"] = tpl + res("templates")

    # MSA module: trunk z, the MSA layer's input z (layer >= 1), post-OPM z, current z; MSA rows.
    s_rows = -(-hp.msa_rows // g.side)
    msa = trunk_keep + [z("z after outer product mean"), z("z (current)")]
    if hp.msa_blocks > 1:
        msa.append(z("z (MSA layer input)"))
    msa.append(("MSA m [S/p, n, msa_s] + pair-weighted values", s_rows * g.n * (3 * hp.msa_s + 8 * 32) * dt.F))
    out["MSA module"] = msa + pair_layer_terms(g, c, hp, dt, opts) + res("MSA module")

    pf = trunk_keep + [z("z (current)")]
    if hp.pairformer_blocks > 1:
        pf.append(z("z (block input)"))
    out["pairformer"] = pf + pair_layer_terms(g, c, hp, dt, opts) + single + res("pairformer")

    out["distogram"] = trunk_keep + [z("z^T received"), z("z + z^T")] + res("distogram")

    keep = [z("z (trunk)"), z("relative position encoding"), z("pdistogram", hp.num_bins)]
    ttb = hp.token_trans_channels
    cond_options = [
        [z("cat(z, relpos)", 2 * c), ("layer norm of it", _tile(g, 2 * c, dt.L)), z("init projection")],
        [z("conditioned z")] + transition_terms(g, c, 2 * c, dt),
        [z("conditioned z"), z("token_trans_bias parts", ttb), ("layer norm of z", _tile(g, c, dt.L)),
         z("token_trans_bias (cat)", ttb)],
    ]
    out["diffusion conditioning"] = keep + max(cond_options, key=lambda t: sum(b for _, b in t)) + res(
        "diffusion conditioning")

    after = keep + [z("token_trans_bias", ttb)] + _atoms_persistent(g, hp, dt)
    conf_keep = [z("z (trunk)"), z("pdistogram", hp.num_bins)] if opts.free_before_confidence else after
    samp = list(after)
    if dt.A != dt.F:
        samp.append(("token_trans_bias in fp32 (score model's _at_least_fp32)", _tile(g, ttb, dt.F)))
    samp.append(("one denoising step (calibrated per atom x samples)",
                 g.local_atoms * ATOM_BYTES_STEP * hp.samples * dt.F / 4))
    out["sampling"] = samp + res("sampling")

    conf = conf_keep + [z("confidence z (stack input)"), z("z (current)")]
    if hp.confidence_blocks > 1:
        conf.append(z("z (block input)"))
    out["confidence: pairformer"] = conf + pair_layer_terms(g, c, hp, dt, opts) + single + res("confidence: pairformer")
    out["confidence: heads"] = conf_keep + [
        z("confidence z"), z("z^T received"), z("z + z^T"), z("pae logits", 64), z("pde logits (building)", 3 * 64),
    ] + res("confidence: heads")
    if opts.release_inputs:  # a block's input z and the caller's copy are dropped once used
        drop = {"z (block input)", "z (MSA layer input)", "template v (block input)", "z after outer product mean"}
        for stage in ("pairformer", "confidence: pairformer", "MSA module", "templates"):
            out[stage] = [t for t in out[stage] if t[0] not in drop]
        out["pairformer"] = [t for t in out["pairformer"] if t[0] != "z (trunk)"]
        out["confidence: pairformer"] = [t for t in out["confidence: pairformer"]
                                         if t[0] != "confidence z (stack input)"]
    return out


def weights_bytes(hp: Hyper, precision: str = "fp32") -> float:
    """Parameter bytes per rank: every rank holds all weights (fp32 master weights under autocast)."""
    return parameter_count(hp) * 4.0


def memory_summary(g: Geometry, hp: Hyper = BOLTZ2, precision: str = "fp32", opts: MemOptions = AS_BUILT) -> dict:
    """Peak activation bytes per rank, the stage that sets it, and the total with weights."""
    stages = {k: sum(b for _, b in v) for k, v in stage_memory(g, hp, precision, opts).items()}
    top = max(stages, key=stages.get)
    w = weights_bytes(hp, precision)
    return {"stages": stages, "peak_stage": top, "activations": stages[top], "weights": w,
            "total": stages[top] + w}


# ----------------------------------------------------------------------------------------------
# Work: FLOPs, bytes moved and ring traffic per stage
# ----------------------------------------------------------------------------------------------


@dataclass
class Work:
    """Per rank, one call of one sublayer: FLOPs by rate class, memory traffic, messages."""

    flops_fp32: float = 0.0  # contractions the code promotes to fp32 (tri-att, Cannon einsum, s-track)
    flops_act: float = 0.0  # linears in the activation dtype (bf16 under autocast)
    bytes_elementwise: float = 0.0  # per-pair elementwise / LayerNorm / linear traffic
    bytes_scores: float = 0.0  # materialised attention scores (written, masked, biased, softmaxed, read)
    ring: tuple[float, float, int] | None = None  # (bytes on ring_j, bytes on ring_i) per step, steps
    bytes_exposed: float = 0.0  # transfers before the loop (alignment, transposes): not overlapped
    latency_msgs: float = 0.0  # messages whose latency is exposed
    ops: float = 0.0  # framework ops (kernels) launched: eager dispatch costs time per op

    @property
    def flops(self) -> float:
        return self.flops_fp32 + self.flops_act


Stage = list[tuple[Work, float]]  # (sublayer work, calls of it in one call of the stage)

# Bytes per score element in the materialised triangle attention (write q k^T, += mask, += bias,
# amax, -= max, exp, sum, read for p @ v): 12 passes of 4 B.
SCORE_PASSES_BYTES = 48
# Tile passes (reads + writes of a C-channel tile) of the elementwise work per sublayer, counted
# from the code: triangle multiplication ~40, triangle attention ~24, transition ~50.
PASSES = {"trimul": 40, "triatt": 24, "transition": 50}


def pair_layer_work(g: Geometry, c: int, hp: Hyper, dt: Dtypes, with_single: bool, compact_wire: bool = False) -> Stage:
    """One pairformer (or PairformerNoSeq) layer of width c on my tile: its sublayers.

    compact_wire: a change to the implementation -- ring blocks sent in bf16, and triangle
    attention ships x_ln [n, n, c] (+ mask) instead of [k | v | mask] (2hd+1 channels), the
    receiver recomputing k and v (4 n^2 c hd extra FLOPs per step)."""
    n, q, big_n, p = g.n, g.pairs, g.n_padded, g.side
    hd, h = hp.tri_hd, hp.tri_heads
    # Triangle multiplication: projections in the activation dtype, Cannon einsum in fp32; per
    # step an A block on ring_j and a B block on ring_i (fp32), after a skew + fused transpose.
    trimul = Work(flops_act=12 * q * c * c, flops_fp32=2 * q * big_n * c,
                  bytes_elementwise=PASSES["trimul"] * q * c * dt.A, ops=30 + 4 * p)
    # Triangle attention (starting or ending node): all in fp32 (autocast off), scores
    # materialised; per step the k|v|mask block on one ring and the bias block on the other.
    score_rows = max(1, SCORE_BLOCK_PER_TILE * c // h)
    triatt = Work(flops_fp32=10 * q * c * hd + 2 * q * c * h + 4 * q * big_n * hd,
                  bytes_elementwise=PASSES["triatt"] * q * c * dt.F, bytes_scores=q * big_n * h * SCORE_PASSES_BYTES,
                  ops=25 + p * (10 + 12 * -(-n // score_rows)))
    transition = Work(flops_act=24 * q * c * c, bytes_elementwise=PASSES["transition"] * q * c * dt.A,
                      ops=4 + 7 * (4 * c // TRANSITION_CHUNK))
    kv, bias, blk = (2 * hd + 1) * q * 4, h * q * 4, c * q * 4
    if compact_wire:
        kv, bias, blk = (c + 1) * q * 2, h * q * 2, c * q * 2
        triatt.flops_act += (p - 1) * 4 * q * c * hd
    start, end = replace(triatt), replace(triatt)
    if p > 1:
        trimul.ring, trimul.bytes_exposed, trimul.latency_msgs = (blk, blk, p - 1), 2 * blk, 2
        start.ring, start.bytes_exposed, start.latency_msgs = (kv, bias, p - 1), kv + 2 * bias, 3
        end.ring, end.bytes_exposed, end.latency_msgs = (bias, kv, p - 1), kv + 2 * bias, 3
    stage: Stage = [(trimul, 2), (start, 1), (end, 1), (transition, 1)]
    if with_single:
        cs, hs = hp.token_s, hp.s_heads
        apb_rows = max(1, APB_CHUNK_PAIRS // n)
        stage.append((Work(flops_fp32=34 * n * cs * cs + 4 * q * cs + 2 * q * c * hs,
                           bytes_elementwise=4 * q * c * dt.F + q * hs * 24, latency_msgs=2,
                           ops=40 + 14 * -(-n // apb_rows) + 4 * p), 1))
    return stage


def _times(stage: Stage, k: float) -> Stage:
    return [(w, m * k) for w, m in stage]


def stage_work(g: Geometry, hp: Hyper = BOLTZ2, precision: str = "fp32",
               compact_wire: bool = False) -> dict[str, tuple[Stage, int]]:
    """Per stage: the sublayer work of ONE call on one rank, and the calls in a forward."""
    dt = Dtypes.of(precision)
    pair_layer = lambda g_, c_, hp_, dt_, single: pair_layer_work(g_, c_, hp_, dt_, single, compact_wire)  # noqa: E731
    c, q, n, big_n = hp.token_z, g.pairs, g.n, g.n_padded
    passes = hp.recycling_steps + 1
    out: dict[str, tuple[Stage, int]] = {}

    la = g.local_atoms
    atom_layer = la * (2 * 4 * hp.atom_s**2 + 4 * hp.window_keys * hp.atom_s + 12 * hp.atom_s**2)
    out["input embedder"] = ([(Work(flops_act=hp.atom_encoder_depth * atom_layer,
                                    bytes_elementwise=la * ATOM_BYTES_EMBEDDER * 6), 1)], 1)
    out["pair init"] = ([(Work(flops_act=2 * q * 139 * c + 2 * q * 8 * c,
                               bytes_elementwise=q * (139 * 16 + 12 * c * dt.A)), 1)], 1)

    tpl = _times(pair_layer(g, hp.template_dim, hp, dt, False), hp.template_blocks * hp.templates)
    tpl.append((Work(flops_act=2 * q * hp.templates * (109 + 2 * c) * hp.template_dim,
                     bytes_elementwise=q * hp.templates * 109 * 12), 1))
    out["templates"] = (tpl, passes)

    s_rows = hp.msa_rows / g.side
    msa = _times(pair_layer(g, c, hp, dt, False), hp.msa_blocks)
    msa.append((Work(flops_fp32=(2 * s_rows * n * big_n * 256  # pair-weighted averaging (Cannon over N)
                                 + 2 * q * hp.msa_rows * 32 * 32  # outer product (Cannon over S)
                                 + g.side * 2 * q * 1024 * c),  # proj_o applied at every Cannon step
                     flops_act=s_rows * n * (2 * hp.msa_s * 512 + 2 * 256 * hp.msa_s + 6 * hp.msa_s * 256),
                     bytes_elementwise=q * (8 * 12 + 2 * c) * dt.F), hp.msa_blocks))
    out["MSA module"] = (msa, passes)
    out["pairformer"] = (_times(pair_layer(g, c, hp, dt, True), hp.pairformer_blocks), passes)
    out["distogram"] = ([(Work(flops_act=2 * q * c * hp.num_bins, bytes_elementwise=4 * q * c * dt.A,
                               bytes_exposed=q * c * dt.A if g.side > 1 else 0.0), 1)], 1)

    ttb = hp.token_trans_channels
    out["diffusion conditioning"] = ([(Work(
        flops_act=2 * q * 2 * c * c + 2 * 12 * q * c * c + 2 * q * c * ttb,
        bytes_elementwise=q * (30 * c + 2 * ttb + hp.token_transformer_depth * c) * dt.A), 1)], 1)

    # One denoising step of `samples` samples: the token transformer on my row block I_r
    # (n tokens, dim 2*token_s; every rank of a tile row runs its rows), keys J_c; atom windows.
    d, m = 2 * hp.token_s, hp.samples
    tt_rows = max(1, APB_CHUNK_PAIRS // n)
    tt_layer = Work(flops_act=m * 38 * n * d * d, flops_fp32=m * 4 * q * d,
                    bytes_scores=m * q * hp.token_transformer_heads * 24, latency_msgs=2,
                    ops=40 + 14 * -(-n // tt_rows) + 2 * g.side)
    atoms = Work(flops_act=m * (hp.atom_encoder_depth + hp.atom_decoder_depth) * atom_layer,
                 bytes_elementwise=m * la * ATOM_BYTES_STEP * 4,
                 latency_msgs=6 + 2 * (hp.atom_encoder_depth + hp.atom_decoder_depth),
                 ops=150 + 60 * (hp.atom_encoder_depth + hp.atom_decoder_depth))
    out["diffusion step"] = ([(tt_layer, hp.token_transformer_depth), (atoms, 1)], hp.sampling_steps)

    # The confidence module runs once per sample (run_sequentially).
    out["confidence: pairformer"] = (_times(pair_layer(g, c, hp, dt, True), hp.confidence_blocks), hp.samples)
    out["confidence: heads"] = ([(Work(flops_act=2 * q * c * 64 * 4, bytes_elementwise=q * 64 * 40 * dt.F,
                                       bytes_exposed=q * c * dt.A if g.side > 1 else 0.0), 1)], hp.samples)
    return out


# ----------------------------------------------------------------------------------------------
# Machines and time
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """Achieved rates of one rank (peak x efficiency)."""

    name: str
    fp32_flops: float  # contractions promoted to fp32 (as implemented)
    act_flops: dict  # precision -> FLOP/s of the activation-dtype linears
    hbm_bytes: float  # bytes/s of elementwise work and materialised scores
    ring_j_bytes: float  # bytes/s per direction on ring_j (my tile row)
    ring_i_bytes: float  # ... on ring_i (my tile column)
    latency: float  # seconds per exposed message
    op_overhead: float  # seconds of framework dispatch per op (eager PyTorch)
    overlap_dispatch: bool  # GPU: dispatch runs ahead of the kernels (time = max); CPU: it adds
    fused_attention: bool = False  # scores never reach memory (a flash-style kernel)
    contraction_flops: float | None = None  # rate of the fp32 contractions if kernels change it
    notes: str = ""


# H100 SXM5 80 GB. Peaks (NVIDIA datasheet, dense): bf16 989 TFLOP/s, TF32 495, FP32 (CUDA
# cores) 67; HBM3 3.35 TB/s; NVLink 4 900 GB/s per GPU (450 GB/s each way); InfiniBand NDR
# 400 Gb/s (50 GB/s) per GPU between nodes of 8 GPUs. Assumed achieved fractions: 45% of the
# bf16 / TF32 peak, 70% of FP32, 70% of HBM, 70% of NVLink, 80% of IB; 20 us per exposed message;
# 15 us of eager-PyTorch dispatch per op (hidden behind kernels longer than that).
H100 = Machine(
    name="H100 SXM5 (assumed rates)",
    fp32_flops=0.70 * 67e12,
    act_flops={"fp32": 0.70 * 67e12, "bf16": 0.45 * 989e12},
    hbm_bytes=0.70 * 3.35e12,
    ring_j_bytes=0.70 * 450e9,
    ring_i_bytes=0.70 * 450e9,
    latency=20e-6,
    op_overhead=15e-6,
    overlap_dispatch=True,
    notes="as implemented: tri-att / Cannon / s-track contractions in fp32 on CUDA cores "
          "(torch.set_float32_matmul_precision('highest')), attention scores materialised in HBM",
)


def h100_variant(kind: str, inter_node: bool = False) -> Machine:
    """H100 variants: 'as implemented'; 'tf32' (the fp32 contractions on TF32 tensor cores);
    'fused' (flash-style triangle-attention kernels returning the log-sum-exp the ring merge
    needs, bf16 contractions, scores on chip). inter_node: the mesh spans nodes of 8 GPUs, one
    tile row per node, so ring_j is NVLink and ring_i (and the transposes) InfiniBand."""
    m = H100
    if inter_node:
        m = replace(m, ring_i_bytes=0.80 * 50e9, name=m.name + ", ring_i across nodes on IB NDR")
    if kind == "as implemented":
        return m
    if kind == "tf32":
        return replace(m, contraction_flops=0.45 * 495e12, name=m.name + ", TF32 contractions")
    if kind == "fused":
        return replace(m, contraction_flops=0.45 * 989e12, fused_attention=True,
                       name=m.name + ", fused bf16 attention kernels")
    raise ValueError(kind)


# This 2-core CPU (gloo, 1 thread per rank): rates fitted to the measured per-stage CPU seconds
# of the 1x1 runs (`python benchmarks/model.py fit-cpu REPORT.json ...`).
CPU_HERE = Machine(
    name="2-core AMD EPYC VM, 1 thread/rank (fitted)",
    fp32_flops=53e9, act_flops={"fp32": 53e9}, hbm_bytes=9.5e9, ring_j_bytes=1e9, ring_i_bytes=1e9, latency=2e-4,
    op_overhead=0.0, overlap_dispatch=False,
)


def work_time(w: Work, mach: Machine, precision: str) -> float:
    """Seconds for one sublayer call: compute + memory traffic + the ring time its steps do not hide."""
    compute = w.flops_fp32 / (mach.contraction_flops or mach.fp32_flops) + w.flops_act / mach.act_flops[precision]
    memory = w.bytes_elementwise / mach.hbm_bytes + (0.0 if mach.fused_attention else w.bytes_scores / mach.hbm_bytes)
    busy = compute + memory
    exposed = w.bytes_exposed / min(mach.ring_j_bytes, mach.ring_i_bytes)
    if w.ring is not None:
        bj, bi, steps = w.ring
        per_step = max(bj / mach.ring_j_bytes, bi / mach.ring_i_bytes)
        # p blocks are computed while p-1 transfers run: step k's transfer hides behind block k.
        exposed += max(0.0, steps * per_step - busy * steps / (steps + 1))
    dispatch = w.ops * mach.op_overhead
    busy = max(busy, dispatch) if mach.overlap_dispatch else busy + dispatch
    return busy + exposed + w.latency_msgs * mach.latency


def stage_time(g: Geometry, hp: Hyper, mach: Machine, precision: str = "fp32",
               compact_wire: bool = False) -> dict[str, dict]:
    """Per stage: seconds per call, calls per forward, seconds per forward (one rank)."""
    out = {}
    for name, (stage, calls) in stage_work(g, hp, precision, compact_wire).items():
        t = sum(m * work_time(w, mach, precision) for w, m in stage)
        out[name] = {"per_call": t, "calls": calls, "total": t * calls}
    return out


def sample_time(g: Geometry, hp: Hyper, mach: Machine, precision: str,
                compact_wire: bool = False) -> tuple[float, dict]:
    """Seconds per sample (the whole forward with `samples` samples, divided by samples)."""
    st = stage_time(g, hp, mach, precision, compact_wire)
    return sum(v["total"] for v in st.values()) / hp.samples, st


def ring_step_table(g: Geometry, hp: Hyper = BOLTZ2) -> list[tuple[str, str, float, int]]:
    """Bytes sent per rank per ring step, per primitive of one pairformer block (fp32 wire)."""
    q, c, hd, h = g.pairs, hp.token_z, hp.tri_hd, hp.tri_heads
    p = g.side
    if p == 1:
        return []
    return [
        ("tri-mul out / in: A block (ring_j)", "ring_j", q * c * 4, 2 * (p - 1)),
        ("tri-mul out / in: B block (ring_i)", "ring_i", q * c * 4, 2 * (p - 1)),
        ("tri-mul: transpose+skew of the mis-placed operand", "mesh", q * c * 4, 2),
        ("tri-att start: k|v|mask (ring_j)", "ring_j", q * (2 * hd + 1) * 4, p - 1),
        ("tri-att start: bias (ring_i)", "ring_i", q * h * 4, p - 1),
        ("tri-att end: k|v|mask (ring_i)", "ring_i", q * (2 * hd + 1) * 4, p - 1),
        ("tri-att end: bias (ring_j)", "ring_j", q * h * 4, p - 1),
        ("tri-att: k|v|mask skew (before the loop)", "ring_j / ring_i", q * (2 * hd + 1) * 4, 2),
        ("tri-att: bias transpose + skew (before the loop)", "mesh", q * h * 4, 2 * 2),
        ("s-attention: k_in transpose", "mesh", g.n * (hp.token_s + 1) * 4, 1),
        ("s-attention: partial states all_gather (ring_j)", "ring_j", g.n * (hp.token_s + 2 * hp.s_heads) * 4, p - 1),
    ]


# ----------------------------------------------------------------------------------------------
# Measured vs model
# ----------------------------------------------------------------------------------------------

# bench stage name -> model stage
BENCH_STAGES = {
    "trunk: input embedder": "input embedder",
    "trunk: templates": "templates",
    "trunk: MSA module": "MSA module",
    "trunk: pairformer": "pairformer",
    "trunk: distogram": "distogram",
    "diffusion conditioning": "diffusion conditioning",
    "sampling (all steps)": "sampling",
    "confidence: pairformer": "confidence: pairformer",
    "confidence: heads": "confidence: heads",
}
BENCH_TIME_STAGES = {
    "trunk: input embedder": "input embedder", "trunk: templates": "templates", "trunk: MSA module": "MSA module",
    "trunk: pairformer": "pairformer", "diffusion conditioning": "diffusion conditioning",
    "diffusion step (score model)": "diffusion step", "confidence: pairformer": "confidence: pairformer",
}


def compare(report: dict) -> dict:
    """Measured (a bench report) vs model: per-stage peak memory (max over ranks), the forward
    peak, and per-stage CPU seconds (max over ranks) vs CPU_HERE."""
    hp = hyper_from_report(report)
    side = int(report["mesh"].split("x")[0])
    g = geometry(report["n_tokens"], side, hp, atoms=report["n_atoms"])
    mem = {k: sum(b for _, b in v) for k, v in stage_memory(g, hp, "fp32").items()}
    rows = []
    for st in report["stages"]:
        if st["stage"] in BENCH_STAGES and st["peak_bytes_max"] is not None:
            key = BENCH_STAGES[st["stage"]]
            rows.append((st["stage"], st["peak_bytes_max"], mem[key]))
    fwd = max(r["forward_act_bytes"] for r in report["ranks"])
    times = stage_time(g, hp, CPU_HERE, "fp32")
    trows = []
    for st in report["stages"]:
        if st["stage"] in BENCH_TIME_STAGES:
            key = BENCH_TIME_STAGES[st["stage"]]
            trows.append((st["stage"], st.get("cpu_seconds_max"), times[key]["total"]))
    return {"n": report["n_tokens"], "mesh": report["mesh"], "memory": rows, "forward_measured": fwd,
            "forward_model": max(mem.values()), "time": trows, "geometry": g, "hyper": hp}


def print_check(paths: list[str]) -> None:
    for path in paths:
        rep = json.loads(Path(path).read_text())
        r = compare(rep)
        g = r["geometry"]
        tile = g.pairs * r["hyper"].token_z * 4
        print(f"\n## {Path(path).name}: N={r['n']} mesh {r['mesh']} (tile {g.n}x{g.n}, fp32 tile {tile / MIB:.1f} MiB)")
        print("| stage | measured MiB | model MiB | model / measured | measured tiles |")
        print("|---|---|---|---|---|")
        for name, meas, mod in r["memory"]:
            print(f"| {name} | {meas / MIB:.1f} | {mod / MIB:.1f} | {mod / meas:.3f} | {meas / tile:.2f} |")
        f_meas, f_mod = r["forward_measured"], r["forward_model"]
        print(f"| **forward peak (max over ranks)** | {f_meas / MIB:.1f} | {f_mod / MIB:.1f} | {f_mod / f_meas:.3f} | "
              f"{f_meas / tile:.2f} |")
        print("\n| stage | measured CPU s | model CPU s | model / measured |")
        print("|---|---|---|---|")
        for name, meas, mod in r["time"]:
            if meas:
                print(f"| {name} | {meas:.2f} | {mod:.2f} | {mod / meas:.2f} |")


# ----------------------------------------------------------------------------------------------
# Predictions
# ----------------------------------------------------------------------------------------------

# (label, tokens, mesh side, mesh spans nodes, atoms of the benchmark input after featurize_lean)
CASES = (
    ("3,605 tokens (benchmarks/inputs/pi4ka_complex_3605.yaml), 2x2 H100", 3605, 2, False, 30351),
    ("30,000 tokens (benchmarks/inputs/synthetic_30000.yaml), 8x8 H100 (8 nodes x 8)", 30000, 8, True, 250415),
)
# Per-GPU memory outside torch's allocator statistics (CUDA context, NCCL buffers, allocator
# fragmentation): an assumption, added before comparing with the 80 GB.
GPU_RUNTIME_BYTES = 3e9


def predict_case(n_tokens: int, side: int, inter_node: bool, hp: Hyper = BOLTZ2, atoms: int | None = None) -> dict:
    g = geometry(n_tokens, side, hp, atoms)
    out = {"geometry": g, "memory": {}, "time": {}}
    for prec in ("fp32", "bf16"):
        out["memory"][prec] = memory_summary(g, hp, prec)
    for kind, prec, wire in (("as implemented", "fp32", False), ("as implemented", "bf16", False),
                             ("tf32", "bf16", False), ("fused", "bf16", False), ("fused", "bf16", True)):
        mach = h100_variant(kind, inter_node)
        total, st = sample_time(g, hp, mach, prec, wire)
        free_links = replace(mach, ring_j_bytes=math.inf, ring_i_bytes=math.inf, latency=0.0)
        label = kind + (" + compact wire" if wire else "")
        out["time"][(label, prec)] = (total, st, total - sample_time(g, hp, free_links, prec, wire)[0])
    return out


FIXES = (
    AS_BUILT,
    MemOptions(free_before_confidence=True),
    MemOptions(free_before_confidence=True, release_inputs=True),
    MemOptions(free_before_confidence=True, release_inputs=True, tri_att_act_dtype=True),
    MemOptions(free_before_confidence=True, release_inputs=True, tri_att_act_dtype=True, cannon_act_dtype=True),
    MemOptions(free_before_confidence=True, release_inputs=True, tri_att_act_dtype=True, cannon_act_dtype=True,
               score_block_per_tile=0.25),
)


def print_predictions(hp: Hyper = BOLTZ2) -> None:
    print("# PREDICTED (analytic model, benchmarks/model.py; memory calibrated on CPU runs, GPU rates assumed)")
    print(f"Boltz-2 as released: {hp.pairformer_blocks} pairformer blocks, {hp.recycling_steps} recycles, "
          f"{hp.sampling_steps} sampling steps, token transformer {hp.token_transformer_depth} x "
          f"{hp.token_transformer_heads}, confidence {hp.confidence_blocks} blocks, {hp.samples} sample, "
          f"MSA rows {hp.msa_rows} (single sequence), {hp.atoms_per_token} atoms/token; weights "
          f"{weights_bytes(hp) / GB:.2f} GB per rank.")
    for label, n_tokens, side, inter, atoms in CASES:
        r = predict_case(n_tokens, side, inter, hp, atoms)
        g = r["geometry"]
        print(f"\n## {label}: tile {g.n} x {g.n}, {g.local_atoms} atoms per rank")
        print(f"| precision | peak activations GB/rank | + weights GB/rank | peak stage | "
              f"fits 80 GB (with {GPU_RUNTIME_BYTES / GB:.0f} GB runtime)? |")
        print("|---|---|---|---|---|")
        for prec, m in r["memory"].items():
            total = m["total"] / GB
            print(f"| {prec} | {m['activations'] / GB:.1f} | {total:.1f} | {m['peak_stage']} | "
                  f"{'yes' if m['total'] + GPU_RUNTIME_BYTES <= 80 * GB else 'NO'} |")
        terms = stage_memory(g, hp, "bf16")[r["memory"]["bf16"]["peak_stage"]]
        print(f"\nbf16 peak stage '{r['memory']['bf16']['peak_stage']}', alive at the peak:")
        for what, b in terms:
            print(f"  {b / GB:7.2f} GB  {what}")
        print("\nWhat would lower the bf16 peak (cumulative; each a change to the implementation):")
        print("| change | peak GB/rank (+ weights) | peak stage |")
        print("|---|---|---|")
        for opts in FIXES:
            m = memory_summary(g, hp, "bf16", opts)
            print(f"| {opts.label()} | {m['total'] / GB:.1f} | {m['peak_stage']} |")
        print("\n| kernels / precision | s per sample | trunk | diffusion (all steps) | confidence | "
              "of which exposed communication | dominant stage |")
        print("|---|---|---|---|---|---|---|")
        for (kind, prec), (total, st, comm) in r["time"].items():
            trunk = sum(st[k]["total"] for k in ("input embedder", "pair init", "templates", "MSA module",
                                                 "pairformer", "distogram"))
            diff = st["diffusion conditioning"]["total"] + st["diffusion step"]["total"]
            conf = st["confidence: pairformer"]["total"] + st["confidence: heads"]["total"]
            top = max(st, key=lambda k: st[k]["total"])
            print(f"| {kind}, {prec} | {total:.0f} | {trunk:.0f} | {diff:.0f} | {conf:.0f} | {comm:.0f} | {top} "
                  f"({st[top]['total'] / total:.0%}) |")


def plot_memory(path: Path, hp: Hyper = BOLTZ2) -> bool:
    """Memory per rank vs N for several meshes with the 80 GB line; False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    sizes = [int(x) for x in (500 * 1.15**k for k in range(40)) if x <= 40000]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for side, color in ((1, "k"), (2, "tab:blue"), (4, "tab:green"), (8, "tab:red")):
        for prec, style in (("fp32", "-"), ("bf16", "--")):
            ys = [memory_summary(geometry(n, side, hp), hp, prec)["total"] / GB for n in sizes]
            ax.plot(sizes, ys, style, color=color, label=f"{side}x{side} {prec}")
    best = FIXES[-1]
    ys = [memory_summary(geometry(n, 8, hp), hp, "bf16", best)["total"] / GB for n in sizes]
    ax.plot(sizes, ys, ":", color="tab:red", label="8x8 bf16 + memory fixes (see RESULTS)")
    ax.axhline(80, color="grey", lw=1)
    ax.text(sizes[0], 84, "80 GB (H100)", color="grey")
    for _label, n_tokens, _side, _inter, _atoms in CASES:
        ax.axvline(n_tokens, color="grey", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("GB per rank (activation peak + weights)")
    ax.set_title("PREDICTED per-rank memory, Boltz-2 (64 blocks), CP model as implemented")
    ax.legend(ncol=2, fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def stage_features(g: Geometry, hp: Hyper, precision: str = "fp32") -> dict[str, tuple[float, float, float]]:
    """Per stage and forward: (FLOPs, bytes moved, ops) on one rank, no communication."""
    out = {}
    for name, (stage, calls) in stage_work(g, hp, precision).items():
        f = sum(m * w.flops for w, m in stage) * calls
        b = sum(m * (w.bytes_elementwise + w.bytes_scores) for w, m in stage) * calls
        o = sum(m * w.ops for w, m in stage) * calls
        out[name] = (f, b, o)
    return out


def fit_cpu(paths: list[str]) -> tuple[float, float, float]:
    """Fit CPU_HERE's rates (FLOP/s, bytes/s, s per op) to the measured per-stage CPU seconds
    of 1x1 bench reports: non-negative least squares on relative errors."""
    import numpy as np
    from scipy.optimize import nnls

    rows, ts = [], []
    for path in paths:
        rep = json.loads(Path(path).read_text())
        if rep["mesh"] != "1x1":
            continue
        hp = hyper_from_report(rep)
        g = geometry(rep["n_tokens"], 1, hp, atoms=rep["n_atoms"])
        feats = stage_features(g, hp)
        for st in rep["stages"]:
            key = BENCH_TIME_STAGES.get(st["stage"])
            t = st.get("cpu_seconds_max")
            if key and t and t > 0.05:
                f, b, o = feats[key]
                rows.append([f / t, b / t, o / t])
                ts.append(1.0)
    x, _ = nnls(np.array(rows), np.array(ts))
    rates = tuple(1 / v if v > 0 else math.inf for v in x[:2]) + (float(x[2]),)
    print(f"fitted on {len(rows)} stage times: {rates[0] / 1e9:.1f} GFLOP/s, {rates[1] / 1e9:.2f} GB/s, "
          f"{rates[2] * 1e6:.1f} us per op")
    return rates


def count_params() -> None:
    """Recount PARAMS_BASE / PARAMS_PER_BLOCK by building Boltz2CP (needs boltz_cp; ~1 min)."""
    import copy

    from boltz_cp.cli.bench import apply_blocks
    from boltz_cp.models.boltz2 import Boltz2CP
    from boltz_cp.models.checkpoint import PRESETS

    def count(**blocks):
        hp = copy.deepcopy(PRESETS["full"])
        apply_blocks(hp, blocks, False)
        return sum(p.numel() for p in Boltz2CP(hp).parameters())

    ones = dict(pairformer=1, msa=1, template=1, confidence=1, token_transformer=1)
    base1 = count(**ones)
    print("all stacks 1 deep:", base1)
    for k in ones:
        print(f"{k}: +{count(**{**ones, k: 2}) - base1} per block")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict")
    p.add_argument("--plot", type=Path, default=None)
    c = sub.add_parser("check")
    c.add_argument("reports", nargs="+")
    m = sub.add_parser("comm")
    m.add_argument("--tokens", type=int, default=3605)
    m.add_argument("--side", type=int, default=2)
    sub.add_parser("params")
    fc = sub.add_parser("fit-cpu")
    fc.add_argument("reports", nargs="+")
    args = ap.parse_args()
    if args.cmd == "predict":
        print_predictions()
        if args.plot:
            if plot_memory(args.plot):
                print(f"\nwrote {args.plot}")
    elif args.cmd == "check":
        print_check(args.reports)
    elif args.cmd == "comm":
        g = geometry(args.tokens, args.side)
        inter = args.side * args.side > 8
        mach = h100_variant("as implemented", inter_node=inter)
        print(f"Ring traffic per rank, one pairformer block, N={args.tokens} on {args.side}x{args.side} (fp32 wire); "
              f"PREDICTED transfer times at {mach.ring_j_bytes / 1e9:.0f} GB/s on ring_j, "
              f"{mach.ring_i_bytes / 1e9:.0f} GB/s on ring_i and across the mesh ({mach.name})")
        print("| message | ring | MB per step | steps | ms per step |")
        print("|---|---|---|---|---|")
        for what, ring, b, steps in ring_step_table(g):
            bw = mach.ring_j_bytes if ring == "ring_j" else mach.ring_i_bytes
            print(f"| {what} | {ring} | {b / 1e6:.1f} | {steps} | {b / bw * 1e3:.1f} |")
        for name, (stage, calls) in stage_work(g, BOLTZ2, "bf16").items():
            if name == "pairformer":
                for kind in ("as implemented", "fused"):
                    m2 = h100_variant(kind, inter_node=inter)
                    busy = [work_time(replace(w, ring=None, bytes_exposed=0, latency_msgs=0), m2, "bf16")
                            for w, _ in stage[:4]]
                    full = [work_time(w, m2, "bf16") for w, _ in stage[:4]]
                    print(f"{kind}: per call, compute+memory vs with communication (ms): tri-mul "
                          f"{busy[0] * 1e3:.0f} / {full[0] * 1e3:.0f}, tri-att start {busy[1] * 1e3:.0f} / "
                          f"{full[1] * 1e3:.0f}, tri-att end {busy[2] * 1e3:.0f} / {full[2] * 1e3:.0f}")
    elif args.cmd == "params":
        count_params()
    elif args.cmd == "fit-cpu":
        fit_cpu(args.reports)


if __name__ == "__main__":
    main()
