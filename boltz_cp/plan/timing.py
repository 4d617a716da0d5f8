"""Per-rank time and ring traffic of the CP Boltz-2 forward.

Per stage and rank: FLOPs of the contractions (at the rate of their dtype class) + bytes moved by
the per-pair elementwise work and by materialised attention scores (at HBM bandwidth), + ring
communication not hidden behind compute (each ring step overlaps its transfer with its block's
compute: max(compute, transfer) + latency). The rates are a `Machine`: `CPU_HERE` is fitted to
measured CPU runs; `H100` is stated assumptions (see its comment). Square meshes run Cannon
(p - 1 shifts per ring); R x C meshes run the broadcast schedule of distributed/summa.py (C
broadcasts on ring_j, R on ring_i) after a transpose of the mis-placed operand.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from boltz_cp.plan.memory import (
    ATOM_BYTES_EMBEDDER,
    ATOM_BYTES_STEP,
    TRANSITION_CHUNK,
    apb_chunk_rows,
    triatt_chunk_rows,
)
from boltz_cp.plan.model import BOLTZ2, Dtypes, Geometry, Hyper


@dataclass
class Work:
    """Per rank, one call of one sublayer: FLOPs by rate class, memory traffic, messages."""

    flops_fp32: float = 0.0  # contractions the code runs in fp32 whatever the precision (s-track scores)
    flops_act: float = 0.0  # contractions in the activation dtype (bf16 under autocast; fp32 accumulation)
    bytes_elementwise: float = 0.0  # per-pair elementwise / LayerNorm / linear traffic
    bytes_scores: float = 0.0  # materialised attention scores (written, masked, biased, softmaxed, read)
    ring: tuple[float, float, int] | None = None  # (bytes on ring_j, bytes on ring_i) per step, steps
    bytes_exposed: float = 0.0  # transfers before the loop (alignment, transposes): not overlapped
    latency_msgs: float = 0.0  # messages whose latency is exposed
    ops: float = 0.0  # kernels launched (benchmarks/count_ops.py): eager dispatch costs time per launch

    @property
    def flops(self) -> float:
        return self.flops_fp32 + self.flops_act

    @property
    def bytes_sent(self) -> float:
        """Ring bytes this rank moves per call (loop steps + transfers before the loop)."""
        loop = (self.ring[0] + self.ring[1]) * self.ring[2] if self.ring else 0.0
        return loop + self.bytes_exposed


Stage = list[tuple[Work, float]]  # (sublayer work, calls of it in one call of the stage)

# Bytes per score element in the materialised triangle attention (write q k^T, += mask, += bias,
# amax, -= max, exp, sum, read for p @ v): 12 passes of 4 B.
SCORE_PASSES_BYTES = 48
# Tile passes (reads + writes of a C-channel tile) of the elementwise work per sublayer, counted
# from the code: triangle multiplication ~40, triangle attention ~24, transition ~50.
PASSES = {"trimul": 40, "triatt": 24, "transition": 50}


def _ring(g: Geometry, bytes_j: float, bytes_i: float) -> tuple[float, float, int]:
    """(bytes per step on ring_j, on ring_i, steps) of one block stream: Cannon's p - 1 shifts on
    a square mesh; C broadcasts on ring_j and R on ring_i on R x C (spread over the longer)."""
    steps = g.side - 1
    return (bytes_j * (g.cols - 1) / steps, bytes_i * (g.rows - 1) / steps, steps)


def pair_layer_work(g: Geometry, c: int, hp: Hyper, dt: Dtypes, with_single: bool, compact_wire: bool = False,
                    fused: bool = True) -> Stage:
    """One pairformer (or PairformerNoSeq) layer of width c on my tile: its sublayers.

    ops: kernel launches per call as `benchmarks/count_ops.py` counts them (1x1, Boltz-2 widths,
    fused kernels: trimul 13; triangle attention 19 + 7 per query-row chunk (gate) + per key
    block 7 + 22 per chunk; transition 4 + 5 per hidden chunk; attention with pair bias 17 + 10
    per chunk), plus 2 per mesh row or column beyond the first (ring and transpose messages).

    compact_wire: a change to the implementation -- ring blocks sent in bf16, and triangle
    attention ships x_ln [n, m, c] (+ mask) instead of [k | v | mask] (2hd+1 channels), the
    receiver recomputing k and v (4 n m c hd extra FLOPs per step)."""
    n, q, big_n, p = g.n, g.pairs, g.n_padded, g.side
    hd, h = hp.tri_hd, hp.tri_heads
    # Triangle multiplication: projections and the Cannon / SUMMA einsum on operands in the
    # activation dtype (layers/_precision.wire_dtype; fp32 accumulation); per step an A block on
    # ring_j and a B block on ring_i in that dtype, after a skew + fused transpose.
    trimul = Work(flops_act=12 * q * c * c + 2 * q * big_n * c,
                  bytes_elementwise=PASSES["trimul"] * q * c * dt.A, ops=13 + 2 * (g.rows + g.cols - 2))
    # Triangle attention (starting or ending node): operands (x_ln, k|v|mask, bias, q) in the
    # activation dtype, so under bf16 its contractions run at the bf16 rate (online softmax state
    # and kernel accumulation fp32); scores materialised (torch) or on chip (fused); per step the
    # k|v|mask block on one ring and the bias block on the other, in the activation dtype.
    chunks = -(-n // triatt_chunk_rows(fused, n, c, h))
    tri_flops = 10 * q * c * hd + 2 * q * c * h + 4 * q * big_n * hd
    triatt = Work(flops_act=tri_flops,
                  bytes_elementwise=PASSES["triatt"] * q * c * dt.A, bytes_scores=q * big_n * h * SCORE_PASSES_BYTES,
                  ops=19 + 7 * chunks + p * (7 + 22 * chunks))
    transition = Work(flops_act=24 * q * c * c, bytes_elementwise=PASSES["transition"] * q * c * dt.A,
                      ops=4 + 5 * (4 * c // TRANSITION_CHUNK))
    kv, bias, blk = (2 * hd + 1) * q * dt.A, h * q * dt.A, c * q * dt.A
    if compact_wire:
        kv, bias, blk = (c + 1) * q * 2, h * q * 2, c * q * 2
        triatt.flops_act += (p - 1) * 4 * q * c * hd
    start, end = replace(triatt), replace(triatt)
    if g.ranks > 1:
        # trimul: square: skew of both operands (+ transpose of one); R x C: one transpose
        trimul.ring, trimul.bytes_exposed, trimul.latency_msgs = _ring(g, blk, blk), (2 if g.is_square else 1) * blk, 2
        if g.is_square:  # tri-att: k|v|mask rings unskewed; the bias is transposed and all-gathered
            start.ring, end.ring = _ring(g, kv, 0.0), _ring(g, 0.0, kv)
            start.bytes_exposed = end.bytes_exposed = p * bias
        else:  # the broadcast schedule: k|v|mask on its ring, bias blocks on the other
            start.ring, end.ring = _ring(g, kv, bias), _ring(g, bias, kv)
            start.bytes_exposed = end.bytes_exposed = 2 * bias
        start.latency_msgs = end.latency_msgs = 3
    stage: Stage = [(trimul, 2), (start, 1), (end, 1), (transition, 1)]
    if with_single:
        cs, hs = hp.token_s, hp.s_heads
        apb_rows = apb_chunk_rows(g.m, c)
        stage.append((Work(flops_fp32=34 * n * cs * cs + 4 * q * cs + 2 * q * c * hs,
                           bytes_elementwise=4 * q * c * dt.F + q * hs * 24, latency_msgs=2,
                           ops=17 + 10 * -(-n // apb_rows) + 2 * (g.rows + g.cols - 2)), 1))
    return stage


def _times(stage: Stage, k: float) -> Stage:
    return [(w, m * k) for w, m in stage]


def stage_work(g: Geometry, hp: Hyper = BOLTZ2, precision: str = "fp32",
               compact_wire: bool = False, fused: bool = True) -> dict[str, tuple[Stage, int]]:
    """Per stage: the sublayer work of ONE call on one rank, and the calls in a forward
    (fused: kernels.attention is fused, which sizes the query-row chunks)."""
    dt = Dtypes.of(precision)

    def pair_layer(g_, c_, hp_, dt_, single):
        return pair_layer_work(g_, c_, hp_, dt_, single, compact_wire, fused)

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

    s_rows = hp.msa_rows / g.cols
    msa = _times(pair_layer(g, c, hp, dt, False), hp.msa_blocks)
    msa.append((Work(flops_fp32=2 * s_rows * n * big_n * 256,  # pair-weighted averaging (over N)
                     flops_act=(s_rows * n * (2 * hp.msa_s * 512 + 2 * 256 * hp.msa_s + 6 * hp.msa_s * 256)
                                + 2 * q * hp.msa_rows * 32 * 32  # outer product (over S), operands in wire dtype
                                + g.side * 2 * q * 1024 * c),  # proj_o applied at every ring step
                     bytes_elementwise=q * (8 * 12 + 2 * c) * dt.F), hp.msa_blocks))
    out["MSA module"] = (msa, passes)
    out["pairformer"] = (_times(pair_layer(g, c, hp, dt, True), hp.pairformer_blocks), passes)
    out["distogram"] = ([(Work(flops_act=2 * q * c * hp.num_bins, bytes_elementwise=4 * q * c * dt.A,
                               bytes_exposed=q * c * dt.A if g.ranks > 1 else 0.0), 1)], 1)

    ttb = hp.token_trans_channels
    out["diffusion conditioning"] = ([(Work(
        flops_act=2 * q * 2 * c * c + 2 * 12 * q * c * c + 2 * q * c * ttb,
        bytes_elementwise=q * (30 * c + 2 * ttb + hp.token_transformer_depth * c) * dt.A), 1),
        # the relative position encoding, rebuilt for it (Boltz2CP.forward) rather than held
        (Work(flops_act=2 * q * 139 * c, bytes_elementwise=q * (139 * 16 + c * dt.A)), 1)], 1)

    # One denoising step of `samples` samples: the token transformer on my row block I_r
    # (n tokens, dim 2*token_s; every rank of a tile row runs its rows), keys J_c; atom windows.
    d, m = 2 * hp.token_s, hp.samples
    tt_rows = apb_chunk_rows(g.m, hp.token_transformer_heads * m)
    tt_layer = Work(flops_act=m * 38 * n * d * d, flops_fp32=m * 4 * q * d,
                    bytes_scores=m * q * hp.token_transformer_heads * 24, latency_msgs=2,
                    ops=44 + 10 * -(-n // tt_rows) + g.rows + g.cols)
    atoms = Work(flops_act=m * (hp.atom_encoder_depth + hp.atom_decoder_depth) * atom_layer,
                 bytes_elementwise=m * la * ATOM_BYTES_STEP * 4,
                 latency_msgs=6 + 2 * (hp.atom_encoder_depth + hp.atom_decoder_depth),
                 ops=135 + 52 * (hp.atom_encoder_depth + hp.atom_decoder_depth))
    out["diffusion step"] = ([(tt_layer, hp.token_transformer_depth), (atoms, 1)], hp.sampling_steps)

    # The confidence module runs once per sample (run_sequentially).
    out["confidence: pairformer"] = (_times(pair_layer(g, c, hp, dt, True), hp.confidence_blocks), hp.samples)
    out["confidence: heads"] = ([(Work(flops_act=2 * q * c * 64 * 4, bytes_elementwise=q * 64 * 40 * dt.F,
                                       bytes_exposed=q * c * dt.A if g.ranks > 1 else 0.0), 1)], hp.samples)
    return out


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
IB_BYTES = 0.80 * 50e9  # per GPU between nodes


def h100_variant(kind: str, inter_node: bool = False) -> Machine:
    """H100 variants: 'as implemented' (also 'torch': attention scores materialised); 'tf32'
    (the fp32 contractions on TF32 tensor cores); 'fused' (kernels.attention=fused: flash-style
    kernels returning the log-sum-exp the ring merge needs, scores on chip). Which contractions
    run in bf16 follows from the precision (`stage_work`), as the code decides it.
    inter_node: the mesh spans nodes, one tile row per node, so ring_j is NVLink and ring_i (and
    the transposes) InfiniBand."""
    m = H100
    if inter_node:
        m = replace(m, ring_i_bytes=IB_BYTES, name=m.name + ", ring_i across nodes on IB NDR")
    if kind in ("as implemented", "torch"):
        return m
    if kind == "tf32":
        return replace(m, contraction_flops=0.45 * 495e12, name=m.name + ", TF32 contractions")
    if kind == "fused":
        return replace(m, fused_attention=True, name=m.name + ", fused attention kernels")
    raise ValueError(kind)


# This 2-core CPU (gloo, 1 thread per rank): rates fitted to the measured per-stage CPU seconds
# of the 1x1 runs (`python benchmarks/model.py fit-cpu benchmarks/results/bench_n1000_1x1_ops_*.json`,
# 2026-12-06; the VM of that day ran ~1.45x slower than the one of 2026-12-02).
CPU_HERE = Machine(
    name="2-core AMD EPYC VM, 1 thread/rank (fitted)",
    fp32_flops=27.7e9, act_flops={"fp32": 27.7e9}, hbm_bytes=12.6e9, ring_j_bytes=1e9, ring_i_bytes=1e9, latency=2e-4,
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
        # steps + 1 blocks are computed while `steps` transfers run: step k's hides behind block k.
        exposed += max(0.0, steps * per_step - busy * steps / (steps + 1))
    dispatch = w.ops * mach.op_overhead
    busy = max(busy, dispatch) if mach.overlap_dispatch else busy + dispatch
    return busy + exposed + w.latency_msgs * mach.latency


def stage_time(g: Geometry, hp: Hyper, mach: Machine, precision: str = "fp32",
               compact_wire: bool = False) -> dict[str, dict]:
    """Per stage: seconds per call, calls per forward, seconds per forward (one rank)."""
    out = {}
    for name, (stage, calls) in stage_work(g, hp, precision, compact_wire, mach.fused_attention).items():
        t = sum(m * work_time(w, mach, precision) for w, m in stage)
        out[name] = {"per_call": t, "calls": calls, "total": t * calls}
    return out


def sample_time(g: Geometry, hp: Hyper, mach: Machine, precision: str,
                compact_wire: bool = False) -> tuple[float, dict]:
    """Seconds per sample (the whole forward with `samples` samples, divided by samples)."""
    st = stage_time(g, hp, mach, precision, compact_wire)
    return sum(v["total"] for v in st.values()) / hp.samples, st


def ring_traffic(g: Geometry, hp: Hyper = BOLTZ2, precision: str = "fp32") -> float:
    """Bytes one rank sends on its rings over a whole forward (the pair stages' blocks and
    transposes; the single track's small messages are left out)."""
    return sum(m * w.bytes_sent * calls for stage, calls in stage_work(g, hp, precision).values()
               for w, m in stage)


def ring_step_table(g: Geometry, hp: Hyper = BOLTZ2) -> list[tuple[str, str, float, int]]:
    """Bytes sent per rank per ring step, per primitive of one pairformer block (fp32 wire);
    steps: Cannon's p - 1 shifts (square) or the broadcasts of a ring (R x C)."""
    q, c, hd, h = g.pairs, hp.token_z, hp.tri_hd, hp.tri_heads
    sj, si = g.cols - 1, g.rows - 1
    if g.ranks == 1:
        return []
    rows = [
        ("tri-mul out / in: A block (ring_j)", "ring_j", q * c * 4, 2 * sj),
        ("tri-mul out / in: B block (ring_i)", "ring_i", q * c * 4, 2 * si),
        ("tri-mul: transpose (+ skew on a square mesh) of the mis-placed operand", "mesh", q * c * 4,
         2 if g.is_square else 1),
        ("tri-att start: k|v|mask (ring_j)", "ring_j", q * (2 * hd + 1) * 4, sj),
        ("tri-att start: bias (ring_i; square: all_gather before the loop)", "ring_i", q * h * 4, si),
        ("tri-att end: k|v|mask (ring_i)", "ring_i", q * (2 * hd + 1) * 4, si),
        ("tri-att end: bias (ring_j; square: all_gather before the loop)", "ring_j", q * h * 4, sj),
        ("tri-att: bias transpose (before the loop)", "mesh", q * h * 4, 2),
        ("s-attention: k_in transpose", "mesh", g.n * (hp.token_s + 1) * 4, 1),
        ("s-attention: partial states all_gather (ring_j)", "ring_j", g.n * (hp.token_s + 2 * hp.s_heads) * 4, sj),
    ]
    return [row for row in rows if row[3] > 0]
