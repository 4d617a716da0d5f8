"""Per-rank peak memory: an inventory, per stage, of the tensors alive at that stage's peak.

Read off the CP implementation (boltz_cp/layers, modules, models), in units of a pair tile
[n, m, C] (see `Geometry`). Each term has a dtype class (`Dtypes`). A few terms the inventory does
not explain are calibrated on measured CPU runs (RESIDUAL_TILES, ATOM_BYTES_*, MESH_BYTES_PER_TOKEN;
benchmarks/RESULTS.md): they say "calibrated" in every breakdown.

Rectangular meshes (R != C) run the broadcast schedule of distributed/summa.py, whose stream keeps
my own block (for its broadcast turn) and one reused receive buffer per operand: two blocks, as
Cannon keeps; the generic `transpose_exchange` holds its receive buffers and the contiguous
copies of the pieces it sends next to the result (`transpose_staging`).

kernels: 'fused' (the default, kernels.attention=auto/fused/cueq) keeps no score block, only the
block output and its LSE (KERNELS.md §6.1); 'torch' (kernels.attention=torch) materialises the
score blocks.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

from boltz_cp.layers.attentionv2 import chunk_rows as apb_chunk_rows
from boltz_cp.layers.transition import CHUNK_HIDDEN as TRANSITION_CHUNK
from boltz_cp.layers.triangular_attention import SCORE_BLOCK_PER_TILE
from boltz_cp.layers.triangular_attention import chunk_rows as triatt_chunk_rows
from boltz_cp.modules.encodersv2 import CHUNK_PAIRS as RELPOS_CHUNK_PAIRS
from boltz_cp.plan.model import BOLTZ2, Dtypes, Geometry, Hyper, weights_bytes

__all__ = [
    "apb_chunk_rows",
    "triatt_chunk_rows",
    "AS_BUILT",
    "KERNELS",
    "RELPOS_CHUNK_PAIRS",
    "SCORE_BLOCK_PER_TILE",
    "TRANSITION_CHUNK",
    "MemOptions",
    "memory_summary",
    "stage_memory",
]

Terms = list[tuple[str, float]]  # (what, bytes per rank)

KERNELS = ("torch", "fused")  # attention kernels the memory model knows (cueq: as fused)

# Calibrated on the measured CPU runs (benchmarks/RESULTS.md, "bench + model" section): what the
# inventory does not explain, per stage, in fp32 pair tiles [n, m, C_z] ...
RESIDUAL_TILES = {
    "pair init": 0.0,
    "templates": 0.05,
    "MSA module": 0.10,
    "pairformer": 0.05,
    "distogram": 0.05,
    "diffusion conditioning": 0.0,
    "sampling": 0.0,
    "confidence: pairformer": 0.25,
    # the heads' [n, m, 64] softmax / weight temporaries not counted. Was 1.4 while the confidence
    # stack's input z stayed alive beside its output (now an explicit term when release_inputs is
    # off): released, the heads measured -497 MiB (1.02 tiles) at N=1,000 1x1 and 0.06 (N=1,000) /
    # 0.17 (N=384) tile over the count
    "confidence: heads": 0.1,
}
# ... in the chunked transition (measured in the diffusion conditioning's pair transitions: 9.5
# tiles where the inventory counts 8.5, at N = 256 ... 512);
TRANSITION_RESIDUAL_TILES = 1.0
# ... extra bytes on meshes of more than one rank, per token of the tile side (measured +14.4 MiB
# at n = 256 and +25.6 MiB at n = 500 in the pair stages on 2x2: O(n), not located -- gloo
# staging of the ring messages is the likely owner), per stage:
MESH_BYTES_PER_TOKEN = {"pairformer": 52_000, "MSA module": 52_000, "confidence: pairformer": 52_000,
                        "templates": 0, "diffusion conditioning": 20_000, "distogram": 10_000,
                        "confidence: heads": 0, "sampling": 0, "pair init": 0}
# ... and per atom of the rank (the atom windows; fitted over N = 256 ... 1,000, 1x1 and 2x2):
ATOM_BYTES_EMBEDDER = 29_500  # input embedder: window pair features p [.., W, H, atom_z] ~3.6 copies
ATOM_BYTES_STEP = 27_000  # one denoising step per sample: the repeated atom biases, window k/v, scores
# With kernels.attention=fused the atom windows keep no score block: refitted on the fused 1x1 runs
# at N=384 and 1,000 (embedder 27,870 / 28,040; step 20,730 / 22,160 B per atom)
ATOM_BYTES_FUSED = {"embedder": 27_900, "step": 21_400}


def _tile(g: Geometry, channels: float, nbytes: int) -> float:
    return g.pairs * channels * nbytes


@dataclass(frozen=True)
class MemOptions:
    """Changes to the implementation whose memory effect the model can show (the defaults: as built)."""

    # relpos held through sampling, token_trans_bias and the atom biases through confidence: as
    # built before Boltz2CP.forward dropped them (the reports in benchmarks/results were measured so)
    held_before_confidence: bool = False
    # callers drop their reference to a block's input z, the residuals add in place (layers/
    # pairformer.py `consume`), the recycle input z_init is dropped after the last recycle and the
    # template module drops z_proj(z) once v is built
    release_inputs: bool = True
    # the trunk's relative position encoding is rebuilt for the diffusion conditioning
    # (Boltz2CP.forward) instead of a tile held through the trunk's pair stages
    rebuild_relpos: bool = True
    tri_att_act_dtype: bool = True  # triangle attention's x_ln, k|v, bias, q in the activation dtype (state fp32)
    cannon_act_dtype: bool = True  # triangle multiplication's Cannon blocks in the activation dtype (acc fp32)
    score_block_per_tile: float = SCORE_BLOCK_PER_TILE  # score block size relative to the tile
    kernels: str = "fused"  # attention kernels: fused (the default) | torch (score blocks materialised)

    def label(self) -> str:
        """What differs from the code as built ("as implemented" when nothing does)."""
        parts = [f"{k}={getattr(self, k)}" for k in ("held_before_confidence", "release_inputs", "rebuild_relpos",
                                                      "tri_att_act_dtype", "cannon_act_dtype")
                 if getattr(self, k) != getattr(AS_BUILT, k)]
        if self.score_block_per_tile != SCORE_BLOCK_PER_TILE:
            parts.append(f"score_block_per_tile={self.score_block_per_tile:g}")
        if self.kernels != AS_BUILT.kernels:
            parts.append(f"kernels={self.kernels}")
        return " + ".join(parts) or "as implemented"


AS_BUILT = MemOptions()


def triangle_attention_terms(g: Geometry, c: int, hp: Hyper, dt: Dtypes, opts: MemOptions = AS_BUILT) -> Terms:
    """boltz_cp/layers/triangular_attention.py `_attend` at its peak, the largest of its phases.

    Operands (x_ln, the [k | v | mask] block, the bias block, q) in the activation dtype (the
    autocast dtype; tri_att_act_dtype=False: >= fp32, as before, x copied to fp32); softmax
    state >= fp32. Build: x_ln + k|v|mask + bias + q. Ring loop (x_ln released): k|v|mask + bias +
    q + state + the kernel's transient (score block of c/H query rows = c channels, or with a fused
    kernel that row chunk's output + LSE) + the next k|v|mask and bias blocks in flight on a mesh
    (+ my own blocks on a rectangular one). Gate: state (finalized in place) + the output tile
    (x's dtype) + one query-row chunk of o, layer_norm(x), g and linear_o's output.
    """
    hd, h = hp.tri_hd, hp.tri_heads
    op = dt.A if opts.tri_att_act_dtype else dt.F  # operand dtype
    fused = opts.kernels != "torch"
    # query rows per chunk (layers/triangular_attention.py chunk_rows, at this option's budget)
    rows = min(g.n, triatt_chunk_rows(fused, g.n, c, h, opts.score_block_per_tile))
    kv = ("tri-att: k|v|mask block", _tile(g, 2 * hd + 1, op))
    # square: the bias row block all-gathered (p blocks of H channels); R x C: one block
    bias = ("tri-att: bias blocks", _tile(g, h * (g.side if g.is_square else 1), op))
    q = ("tri-att: q", _tile(g, hd, op))
    state = ("tri-att: softmax acc + max/sum", _tile(g, hd + 2 * h, dt.F))
    x_copy: Terms = [] if op == dt.A else [("tri-att: x in fp32", _tile(g, c, dt.F))]
    build = x_copy + [("tri-att: x_ln", _tile(g, c, op)), kv, bias, q]
    if opts.kernels == "torch":
        what, loop = "tri-att: score block", _tile(g, opts.score_block_per_tile * c, dt.F)
    else:  # one query-row chunk's output [rows, H, m, d] (op) + LSE, its state and the merge's product (F)
        what, loop = "tri-att: fused kernel's chunk output + LSE, merge", rows * g.m * (hd * (op + 2 * dt.F) + 3 * h * dt.F)
    if g.ranks > 1:
        what += " + next k|v|mask" + ("" if g.is_square else ", bias") + " in flight"
        loop += _tile(g, 2 * hd + 1 + (0 if g.is_square else h), op)
    ring = x_copy + [kv, bias, q, state, (what, loop)]
    # o chunk (op) + layer_norm(x) chunk (F) + its op copy + g (op) + linear_o's output (op)
    chunk = rows * g.m * (2 * hd * op + c * (dt.F + 2 * op))
    gate = x_copy + [state, ("tri-att: output tile", _tile(g, c, dt.A)), ("tri-att: gating row chunk", chunk)]
    return max((build, ring, gate), key=lambda t: sum(b for _, b in t))


def triangle_mult_terms(g: Geometry, c: int, dt: Dtypes, opts: MemOptions = AS_BUILT) -> Terms:
    """boltz_cp/layers/triangular_mult.py `_forward` at its peak: the largest of the input
    projection (x_in, p_in, g_in, sigmoid), the Cannon / SUMMA loop (x_in, the operand blocks,
    the next ones in flight, accumulator) and the output gating (x_in, a|b, acc, p_out, sigmoid, out).
    On R x C (cannon_matmul's SUMMA path) the mis-placed operand is transposed into a new tile
    first, and each step's product is a new tile added to the accumulator."""
    blk = dt.A if opts.cannon_act_dtype else dt.F
    fp32_copy = _tile(g, 2 * c, dt.F) if dt.A != blk else 0.0
    phase_in = _tile(g, c, dt.L) + _tile(g, 6 * c, dt.A)
    base = _tile(g, c, dt.L) + _tile(g, 2 * c, dt.A) + fp32_copy
    if g.ranks == 1:
        loop, what = base + _tile(g, 2 * c, blk) + _tile(g, c, dt.F), "matmul's contiguous a, b + output"
    else:  # a|b is freed once both operands are tiles of their own (handed to the loop on a
        # square mesh, freed once aligned); Cannon: blocks + next in flight; SUMMA: own a and b
        # + a receive buffer each
        loop = _tile(g, c, dt.L) + _tile(g, 4 * c, blk) + _tile(g, c, dt.F)
        what = ("Cannon loop x_in, aligned blocks + next, acc" if g.is_square
                else "SUMMA loop x_in, own a and b, a receive buffer each, acc")
    phase_out = base + _tile(g, c, dt.F) + _tile(g, 3 * c, dt.A)
    best = max((phase_in, "input projections x_in, p_in, g_in, sigmoid"), (loop, what), (phase_out, "output gating"))
    return [(f"tri-mul: {best[1]}", best[0])]


def transition_terms(g: Geometry, c: int, hidden: int, dt: Dtypes) -> Terms:
    """Upstream Transition chunked by TRANSITION_CHUNK hidden channels (boltz_cp/layers/transition.py)."""
    if hidden > TRANSITION_CHUNK:
        k = TRANSITION_CHUNK
        return [("transition: norm, 3 hidden chunks, out", _tile(g, c, dt.L) + _tile(g, 3 * k + c, dt.A)),
                (f"transition: calibrated ({TRANSITION_RESIDUAL_TILES:.1f} fp32 tile over the count)",
                 _tile(g, TRANSITION_RESIDUAL_TILES * c, dt.A))]
    return [("transition: norm, hidden, out", _tile(g, c, dt.L) + _tile(g, 3 * hidden + c, dt.A))]


def transpose_terms(g: Geometry, channels: float, nbytes: int, what: str) -> Terms:
    """A tile received from `transpose_exchange`; on R x C also its receive buffers and the
    contiguous copies of the pieces sent, alive until it completes."""
    terms = [(f"{what} received", _tile(g, channels, nbytes))]
    if not g.is_square:
        terms.append((f"{what}: receive buffers + sent pieces (R x C transpose)",
                      _tile(g, transpose_staging(g.rows, g.cols) * channels, nbytes)))
    return terms


@functools.lru_cache(maxsize=None)
def transpose_staging(rows: int, cols: int) -> float:
    """R x C `comm.transpose_exchange` of a [1, n, m, C] tile: the pieces a rank sends (copied
    unless they span the tile's columns) plus those it receives (separate buffers), not counting
    its own piece, in tiles; the largest over the ranks (2x3: 5/3, measured 1.67 at N=192).
    Block edges as `comm._overlap` cuts them, on a side of rows * cols."""
    side = rows * cols

    def overlap(pa, a, pb, b):  # length of block a of side/pa and block b of side/pb
        return max(0, min((a + 1) * side // pa, (b + 1) * side // pb) - max(a * side // pa, b * side // pb))

    # The area a piece covers factorises (column part x row part) and whether it is copied
    # depends on the row part only, so each rank's sum is separable: O(R + C) per rank.
    worst = 0
    for a in range(rows):
        f = [overlap(rows, a, cols, pb) for pb in range(cols)]
        f_all = sum(f)
        for b in range(cols):
            g = [overlap(cols, b, rows, pa) for pa in range(rows)]
            weight = [gi * (2 if gi < side // cols else 1) for gi in g]  # sent copy + received
            worst = max(worst, f_all * sum(weight) - f[b] * weight[a])
    return worst / (side // rows * side // cols)


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
    if opts.kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {opts.kernels!r}")
    dt = Dtypes.of(precision)
    c, td, t = hp.token_z, hp.template_dim, hp.templates
    def z(what, ch=c, nb=dt.A):
        return (what, _tile(g, ch, nb))

    def res(stage: str) -> Terms:
        terms = [(f"calibrated residual ({RESIDUAL_TILES[stage]:.2f} fp32 tiles)",
                  _tile(g, RESIDUAL_TILES[stage] * c, 4))]
        if g.ranks > 1 and MESH_BYTES_PER_TOKEN[stage]:
            terms.append(("calibrated mesh residual (O(n), P > 1)", MESH_BYTES_PER_TOKEN[stage] * max(g.n, g.m)))
        return terms

    single = [("single track s, s_inputs, ...", 12 * g.n * hp.token_s * dt.F)]
    trunk_keep = [z("z_init (recycle input)")] if hp.recycling_steps > 0 or not opts.release_inputs else []
    if not opts.rebuild_relpos:
        trunk_keep.append(z("relative position encoding"))
    trunk_keep.append(z("z (trunk)"))
    out: dict[str, Terms] = {}

    fused = opts.kernels == "fused"
    per_atom_embedder = ATOM_BYTES_FUSED["embedder"] if fused else ATOM_BYTES_EMBEDDER
    per_atom_step = ATOM_BYTES_FUSED["step"] if fused else ATOM_BYTES_STEP
    out["input embedder"] = [("atom window pair features (calibrated per atom)",
                              g.local_atoms * per_atom_embedder * dt.A / 4)]
    relpos_chunk = min(g.pairs, max(1, RELPOS_CHUNK_PAIRS // g.m) * g.m)
    out["pair init"] = [z("outer sum"), z("relative position encoding"), z("z sum"), z("token bonds / contacts"),
                        ("relpos one-hot chunk (int64 + fp32 + cat)", relpos_chunk * 139 * (8 + 4 + 4))]
    out["pair init"] += res("pair init")

    # Templates: the template pairformer runs on [T, n, m, template_dim] (batch B*T).
    tpl = trunk_keep + [z("template z_proj", td), z("template v", td * t), z("template v (current)", td * t)]
    if hp.template_blocks > 1:
        tpl.append(z("template v (block input)", td * t))
    tpl += [(f"{w} x{t}" if t > 1 else w, b * t) for w, b in pair_layer_terms(g, td, hp, dt, opts)]
    out["templates"] = tpl + res("templates")

    # MSA module: trunk z, the MSA layer's input z (layer >= 1), post-OPM z, current z; MSA rows.
    s_rows = -(-hp.msa_rows // g.cols)
    msa = trunk_keep + [z("z after outer product mean"), z("z (current)")]
    if hp.msa_blocks > 1:
        msa.append(z("z (MSA layer input)"))
    msa.append(("MSA m [S/C, n, msa_s] + pair-weighted values", s_rows * g.n * (3 * hp.msa_s + 8 * 32) * dt.F))
    out["MSA module"] = msa + pair_layer_terms(g, c, hp, dt, opts) + res("MSA module")

    pf = trunk_keep + [z("z (current)")]
    if hp.pairformer_blocks > 1:
        pf.append(z("z (block input)"))
    out["pairformer"] = pf + pair_layer_terms(g, c, hp, dt, opts) + single + res("pairformer")

    after_loop = [t for t in trunk_keep if not (opts.release_inputs and t[0].startswith("z_init"))]
    out["distogram"] = after_loop + transpose_terms(g, c, dt.A, "z^T") + [z("z + z^T")] + res("distogram")

    keep = [z("z (trunk)"), z("relative position encoding"), z("pdistogram", hp.num_bins)]
    ttb = hp.token_trans_channels
    # rebuilt relpos (a function passed to the conditioning) is dropped once concatenated with z
    cond_keep = [t for t in keep if not (opts.rebuild_relpos and t[0] == "relative position encoding")]
    cond_options = [
        [z("cat(z, relpos)", 2 * c), ("layer norm of it", _tile(g, 2 * c, dt.L)), z("init projection")],
        [z("conditioned z")] + transition_terms(g, c, 2 * c, dt),
        [z("conditioned z"), z("token_trans_bias parts", ttb), ("layer norm of z", _tile(g, c, dt.L)),
         z("token_trans_bias (cat)", ttb)],
    ]
    out["diffusion conditioning"] = cond_keep + max(cond_options, key=lambda t: sum(b for _, b in t)) + res(
        "diffusion conditioning")

    # Boltz2CP.forward drops relpos after the conditioning and the conditioning after sampling
    kept = keep if opts.held_before_confidence else [t for t in keep if t[0] != "relative position encoding"]
    after = kept + [z("token_trans_bias", ttb)] + _atoms_persistent(g, hp, dt)
    conf_keep = after if opts.held_before_confidence else [z("z (trunk)"), z("pdistogram", hp.num_bins)]
    samp = list(after)
    if dt.A != dt.F:
        samp.append(("token_trans_bias in fp32 (score model's _at_least_fp32)", _tile(g, ttb, dt.F)))
    samp.append(("one denoising step (calibrated per atom x samples at once)",
                 g.local_atoms * per_atom_step * hp.samples_at_once * dt.F / 4))
    out["sampling"] = samp + res("sampling")

    conf = conf_keep + [z("confidence z (stack input)"), z("z (current)")]
    if hp.confidence_blocks > 1:
        conf.append(z("z (block input)"))
    out["confidence: pairformer"] = conf + pair_layer_terms(g, c, hp, dt, opts) + single + res("confidence: pairformer")
    held_input = [] if opts.release_inputs else [z("confidence z (stack input, beside its output)")]
    out["confidence: heads"] = conf_keep + [z("confidence z")] + held_input + transpose_terms(g, c, dt.A, "z^T") + [
        z("z + z^T"), z("pae logits", 64), z("pde logits (building)", 3 * 64),
    ] + res("confidence: heads")
    if opts.release_inputs:  # a block's input z and the caller's copy are dropped once used
        drop = {"z (block input)", "z (MSA layer input)", "template v (block input)", "z after outer product mean",
                "template z_proj"}
        for stage in ("pairformer", "confidence: pairformer", "MSA module", "templates"):
            out[stage] = [t for t in out[stage] if t[0] not in drop]
        out["pairformer"] = [t for t in out["pairformer"] if t[0] != "z (trunk)"]
        out["confidence: pairformer"] = [t for t in out["confidence: pairformer"]
                                         if t[0] != "confidence z (stack input)"]
    return out


def memory_summary(g: Geometry, hp: Hyper = BOLTZ2, precision: str = "fp32", opts: MemOptions = AS_BUILT) -> dict:
    """Peak activation bytes per rank, the stage that sets it, and the total with weights."""
    stages = {k: sum(b for _, b in v) for k, v in stage_memory(g, hp, precision, opts).items()}
    top = max(stages, key=stages.get)
    w = weights_bytes(hp)
    return {"stages": stages, "peak_stage": top, "activations": stages[top], "weights": w,
            "total": stages[top] + w}
