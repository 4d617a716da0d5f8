"""Kernel launches per call of each pairformer sublayer, counted against the plan's `Work.ops`.

On a GPU eager PyTorch pays a dispatch cost per kernel it launches (the plan's `op_overhead`),
hidden only behind kernels longer than it, so the plan counts the launches of each sublayer.
This counts them: one call of each CP sublayer at Boltz-2's widths (random weights, float32,
all tokens real, as in inference), on a 1x1 mesh in this process, every aten op seen by a
dispatch mode (`boltz_cp.measure.OpCounter`: all ops, and those that launch a kernel).

    OMP_NUM_THREADS=1 python benchmarks/count_ops.py --tokens 64 256 [--kernels fused]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from boltz_cp.measure import OpCounter
from boltz_cp.plan.model import BOLTZ2, Dtypes, geometry
from boltz_cp.plan.timing import pair_layer_work, stage_work

# parity case -> index of its sublayer in `pair_layer_work`'s stage
SUBLAYERS = {"trimul_out": 0, "triatt_start": 1, "triatt_end": 2, "transition_z": 3, "attention_pair_bias": 4}


def _all_real(inputs: dict) -> dict:
    """Every token real (masks of ones), as Boltz-2's inference sees them."""
    out = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    return {k: torch.ones_like(v) if "mask" in k else v for k, v in out.items()}


def count(name: str, n: int, layout) -> tuple[int, int]:
    """(aten ops, kernel launches) of one call of parity case `name`'s CP module at N = n."""
    from boltz_cp.parity.reference import randomize_
    from boltz_cp.parity.runner import LAYER_WIDTHS, load_cases

    case = load_cases()[name]
    gen = torch.Generator().manual_seed(0)
    twin = case.cp_twin(randomize_(case.build(LAYER_WIDTHS["full"]), gen).float().eval())
    inputs = _all_real(case.inputs(n, LAYER_WIDTHS["full"], gen))
    with torch.inference_mode():
        case.cp(twin, inputs, layout)  # warm-up: lazy imports, caches
        base = OpCounter()
        with base:  # the harness alone (shard + gather around an identity)
            layout.gather_pair(layout.shard_pair(inputs["z"])) if name != "attention_pair_bias" else \
                layout.gather_single(layout.shard_single(inputs["s"]))
        counter = OpCounter()
        with counter:
            case.cp(twin, inputs, layout)
    return counter.ops - base.ops, counter.launches - base.launches


def count_diffusion(layout) -> dict[str, int]:
    """Kernel launches of one score-model call (parity case `diffusion_step`: its tiny widths,
    token transformer 3 layers, atom encoder 2 and decoder 2; all tokens real): in the token
    transformer, in the atom transformers, and in the whole call (with the case's input cuts)."""
    import boltz_cp.modules.diffusion as dm
    from boltz_cp.parity.reference import randomize_
    from boltz_cp.parity.runner import LAYER_WIDTHS, load_cases

    parts = {"token transformer": 0, "atom transformers": 0}
    wrapped = [(dm, "atom_transformer", "atom transformers"),
               (dm.DiffusionModule, "_token_transformer", "token transformer")]
    originals = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in wrapped]

    def counting(fn, key):
        def run(*args, **kwargs):
            with OpCounter() as c:
                out = fn(*args, **kwargs)
            parts[key] += c.launches
            return out
        return run

    case = load_cases()["diffusion_step"]
    gen = torch.Generator().manual_seed(0)
    twin = case.cp_twin(randomize_(case.build(LAYER_WIDTHS["tiny"]), gen).float().eval())
    x = _all_real(case.inputs(layout.n, LAYER_WIDTHS["tiny"], gen))
    try:
        with torch.inference_mode():
            case.cp(twin, x, layout)  # warm-up
            for obj, attr, key in wrapped:
                setattr(obj, attr, counting(getattr(obj, attr), key))
            with OpCounter() as total:
                case.cp(twin, x, layout)
    finally:
        for obj, attr, fn in originals:
            setattr(obj, attr, fn)
    return {**parts, "whole call": total.launches}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--kernels", default="fused", choices=["torch", "fused"])
    args = ap.parse_args()
    from boltz_cp.distributed import CPMesh, TokenLayout, init_distributed, shutdown_distributed
    from boltz_cp.kernels import set_backend

    set_backend(args.kernels)
    init_distributed(600, "cpu")
    try:
        mesh = CPMesh.build(1, 1)
        print(f"aten ops per call, 1x1, kernels.attention={args.kernels}, Boltz-2 widths, float32")
        print("| sublayer | N | aten ops | kernel launches | plan (`Work.ops`) | plan / launches |")
        print("|---|---|---|---|---|---|")
        for n in args.tokens:
            stage = pair_layer_work(geometry(n, 1, 1, BOLTZ2), BOLTZ2.token_z, BOLTZ2, Dtypes.of("fp32"), True)
            for name, idx in SUBLAYERS.items():
                ops, launches = count(name, n, TokenLayout(n, mesh))
                planned = stage[idx][0].ops
                print(f"| {name} | {n} | {ops:,} | {launches:,} | {planned:,.0f} | {planned / launches:.2f} |",
                      flush=True)
        from boltz_cp.parity.cases.diffusion import DEC_DEPTH, ENC_DEPTH, TOKEN_DEPTH

        n = 40
        counts = count_diffusion(TokenLayout(n, mesh))
        hp = replace(BOLTZ2, token_transformer_depth=TOKEN_DEPTH, atom_encoder_depth=ENC_DEPTH,
                     atom_decoder_depth=DEC_DEPTH)
        (tt, layers), (atoms, _) = stage_work(geometry(n, 1, 1, hp), hp)["diffusion step"][0]
        print(f"\nscore model, one call (diffusion_step case, N={n}, token transformer {TOKEN_DEPTH} layers, "
              f"atom encoder {ENC_DEPTH} + decoder {DEC_DEPTH}): kernel launches")
        print("| part | measured | plan (`Work.ops`) |")
        print("|---|---|---|")
        print(f"| token transformer | {counts['token transformer']:,} | {tt.ops * layers:,.0f} |")
        print(f"| atom transformers + the rest of the call | {counts['whole call'] - counts['token transformer']:,} "
              f"(atom transformers {counts['atom transformers']:,}) | {atoms.ops:,.0f} |")
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
