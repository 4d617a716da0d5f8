"""Calibration and checks of the per-rank memory / time / traffic model (`boltz_cp.plan`).

    python benchmarks/model.py predict [--plot benchmarks/memory_model.png]
    python benchmarks/model.py check REPORT.json [REPORT.json ...]
    python benchmarks/model.py comm --tokens 3605 --side 2 [--cols 3]
    python benchmarks/model.py fit-cpu REPORT.json ...        # refit CPU_HERE from 1x1 reports
    python benchmarks/model.py params                         # recount the parameter table

The model itself lives in `boltz_cp/plan/` (memory inventory, work and time, meshes: see its
docstrings); `boltz_cp plan INPUT gpus=G gpu_memory_gb=M` is its user-facing form. This script
keeps what measures it: `check` compares the model with reports of `python -m boltz_cp.bench ...
json=REPORT.json` (per stage and per rank: measured vs model, square and R x C meshes);
`predict` prints the predictions for the headline cases (3,605 tokens on 2x2 H100, 30,000 on 8x8,
Boltz-2 as released) and draws memory per rank vs N for several meshes; `comm` prints the bytes of
every ring step of one pairformer block; `fit-cpu` refits the CPU rates; `params` recounts the
parameter table. Everything printed says "predicted" or "measured".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from boltz_cp.plan.memory import AS_BUILT, MemOptions, memory_summary, stage_memory
from boltz_cp.plan.model import BOLTZ2, GB, MIB, Geometry, Hyper, geometry, weights_bytes
from boltz_cp.plan.model import parameter_count  # noqa: F401  (re-exported: tests/test_bench.py)
from boltz_cp.plan.planner import RUNTIME_ALLOWANCE_BYTES
from boltz_cp.plan.timing import H100  # noqa: F401  (re-exported: tests/test_bench.py)
from boltz_cp.plan.timing import CPU_HERE, h100_variant, ring_step_table, sample_time, stage_time, stage_work, work_time


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


def compare(report: dict, opts: MemOptions = AS_BUILT) -> dict:
    """Measured (a bench report) vs model: per-stage peak memory (max over ranks), the forward
    peak, and per-stage CPU seconds (max over ranks) vs CPU_HERE."""
    hp = hyper_from_report(report)
    rows, cols = (int(x) for x in report["mesh"].split("x"))
    g = geometry(report["n_tokens"], rows, cols, hp, atoms=report["n_atoms"])
    kernels = report_kernels(report)
    opts = replace(opts, kernels=kernels)
    mem = {k: sum(b for _, b in v) for k, v in stage_memory(g, hp, "fp32", opts).items()}
    rows = []
    for st in report["stages"]:
        if st["stage"] in BENCH_STAGES and st["peak_bytes_max"] is not None:
            key = BENCH_STAGES[st["stage"]]
            rows.append((st["stage"], st["peak_bytes_max"], mem[key]))
    fwd = max(r["forward_act_bytes"] for r in report["ranks"])
    times = stage_time(g, hp, replace(CPU_HERE, fused_attention=kernels == "fused"), "fp32")
    ops = stage_ops(g, hp, fused=kernels == "fused")
    trows, orows = [], []
    for st in report["stages"]:
        if st["stage"] in BENCH_TIME_STAGES:
            key = BENCH_TIME_STAGES[st["stage"]]
            trows.append((st["stage"], st.get("cpu_seconds_max"), times[key]["total"]))
            orows.append((st["stage"], st.get("launches_rank0"), ops[key]))
    return {"n": report["n_tokens"], "mesh": report["mesh"], "memory": rows, "forward_measured": fwd,
            "forward_model": max(mem.values()), "time": trows, "ops": orows, "geometry": g, "hyper": hp}


def stage_ops(g: Geometry, hp: Hyper, fused: bool = True) -> dict[str, float]:
    """Per stage and forward: the kernel launches the model counts on one rank (`Work.ops`)."""
    return {name: sum(m * w.ops for w, m in stage) * calls
            for name, (stage, calls) in stage_work(g, hp, fused=fused).items()}


def print_check(paths: list[str], opts: MemOptions = AS_BUILT) -> None:
    for path in paths:
        rep = json.loads(Path(path).read_text())
        r = compare(rep, opts)
        g = r["geometry"]
        tile = g.pairs * r["hyper"].token_z * 4
        print(f"\n## {Path(path).name}: N={r['n']} mesh {r['mesh']} (tile {g.n}x{g.m}, fp32 tile {tile / MIB:.1f} MiB)")
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
        if any(meas for _, meas, _ in r["ops"]):
            print("\n| stage | measured kernel launches (rank 0) | model ops | model / measured |")
            print("|---|---|---|---|")
            for name, meas, mod in r["ops"]:
                if meas:
                    print(f"| {name} | {meas:,} | {mod:,.0f} | {mod / meas:.2f} |")


# ----------------------------------------------------------------------------------------------
# Predictions
# ----------------------------------------------------------------------------------------------

# (label, tokens, mesh side, mesh spans nodes, atoms of the benchmark input after featurize_lean)
CASES = (
    ("3,605 tokens (benchmarks/inputs/pi4ka_complex_3605.yaml), 2x2 H100", 3605, 2, False, 30351),
    ("30,000 tokens (benchmarks/inputs/synthetic_30000.yaml), 8x8 H100 (8 nodes x 8)", 30000, 8, True, 250415),
)
# Per-GPU memory outside torch's allocator statistics: the planner's stated allowance.
GPU_RUNTIME_BYTES = RUNTIME_ALLOWANCE_BYTES


def predict_case(n_tokens: int, side: int, inter_node: bool, hp: Hyper = BOLTZ2, atoms: int | None = None) -> dict:
    g = geometry(n_tokens, side, side, hp, atoms)
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


# Reports measured before Boltz2CP.forward dropped relpos and the conditioning before confidence
# (benchmarks/results up to 2026-12-01), and before callers released block inputs (up to the
# *_lean.json reports of 2026-12-02).
HELD = MemOptions(held_before_confidence=True, release_inputs=False, rebuild_relpos=False)
KEPT_INPUTS = MemOptions(release_inputs=False, rebuild_relpos=False)
FIXES = (
    HELD,
    KEPT_INPUTS,
    MemOptions(rebuild_relpos=False),
    AS_BUILT,
    MemOptions(tri_att_act_dtype=True),
    MemOptions(tri_att_act_dtype=True, score_block_per_tile=0.25),
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
            ys = [memory_summary(geometry(n, side, side, hp), hp, prec)["total"] / GB for n in sizes]
            ax.plot(sizes, ys, style, color=color, label=f"{side}x{side} {prec}")
    best = FIXES[-1]
    ys = [memory_summary(geometry(n, 8, 8, hp), hp, "bf16", best)["total"] / GB for n in sizes]
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


def report_kernels(report: dict) -> str:
    """The attention kernel a bench report ran (reports before `kernels_attention` ran torch's)."""
    return "torch" if report.get("kernels_attention", "torch") == "torch" else "fused"


def stage_features(g: Geometry, hp: Hyper, precision: str = "fp32",
                   kernels: str = "torch") -> dict[str, tuple[float, float, float]]:
    """Per stage and forward: (FLOPs, bytes moved, ops) on one rank, no communication; with
    kernels='fused' the attention scores never reach memory (as `work_time` with fused_attention)."""
    out = {}
    scores = 0.0 if kernels == "fused" else 1.0
    for name, (stage, calls) in stage_work(g, hp, precision, fused=kernels == "fused").items():
        f = sum(m * w.flops for w, m in stage) * calls
        b = sum(m * (w.bytes_elementwise + scores * w.bytes_scores) for w, m in stage) * calls
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
        g = geometry(rep["n_tokens"], 1, 1, hp, atoms=rep["n_atoms"])
        feats = stage_features(g, hp, kernels=report_kernels(rep))
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

    from boltz_cp.models.boltz2 import Boltz2CP
    from boltz_cp.models.presets import PRESETS, apply_blocks

    def count(**blocks):
        hp = copy.deepcopy(PRESETS["full"])
        apply_blocks(hp, blocks, False)
        return sum(p.numel() for p in Boltz2CP(hp).parameters())

    ones = {"pairformer": 1, "msa": 1, "template": 1, "confidence": 1, "token_transformer": 1}
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
    c.add_argument("--held", action="store_true",
                   help="reports measured before Boltz2CP.forward dropped relpos / token_trans_bias / atom "
                        "biases before confidence (benchmarks/results up to 2026-12-01)")
    c.add_argument("--kept-inputs", action="store_true",
                   help="reports measured before callers released block inputs and relpos was rebuilt "
                        "(every report in benchmarks/results but the *_lean.json ones)")
    m = sub.add_parser("comm")
    m.add_argument("--tokens", type=int, default=3605)
    m.add_argument("--side", type=int, default=2)
    m.add_argument("--cols", type=int, default=None, help="columns of an R x C mesh (default: --side)")
    sub.add_parser("params")
    fc = sub.add_parser("fit-cpu")
    fc.add_argument("reports", nargs="+")
    args = ap.parse_args()
    if args.cmd == "predict":
        print_predictions()
        if args.plot and plot_memory(args.plot):
            print(f"\nwrote {args.plot}")
    elif args.cmd == "check":
        print_check(args.reports, HELD if args.held else KEPT_INPUTS if args.kept_inputs else AS_BUILT)
    elif args.cmd == "comm":
        g = geometry(args.tokens, args.side, args.cols)
        inter = g.ranks > 8
        mach = h100_variant("as implemented", inter_node=inter)
        print(f"Ring traffic per rank, one pairformer block, N={args.tokens} on {g.label} (fp32 wire); "
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
