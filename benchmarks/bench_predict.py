"""Per-rank memory and CPU time of a whole CP prediction (trunk, sampling, confidence), 1x1 vs 2x2.

    python benchmarks/bench_predict.py [--tokens 200] [--sides 1 2] [--sampling-steps 2]

The model is `Boltz2CP` at Boltz-2's widths (the `full` checkpoint preset: token_s 384, token_z
128, atom_s 128, score model dim 768 with 16 heads) with few blocks (pairformer 2, MSA 1,
template 1, token transformer 2, atom encoder/decoder 1, confidence pairformer 1), random
weights, float32, 0 recycles, `--sampling-steps` steps, 1 sample. The input is the synthetic
two-chain protein of bench_trunk.py, featurized once by the parent with `featurize_lean`; every
rank cuts its pieces (not timed), runs one warm-up forward and one measured forward (seeded
alike). Memory and CPU are measured as in the other tables (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import TABLE_HEADER, launch, rank_setup, report_forward, table_row
from bench_trunk import featurize_synthetic, few_block_hparams


def hparams() -> dict:
    hp = few_block_hparams()
    sm = hp["score_model_args"]
    sm.update(token_transformer_depth=2, atom_encoder_depth=1, atom_decoder_depth=1)
    hp["confidence_model_args"]["pairformer_args"]["num_blocks"] = 1
    return hp


def _worker(feats_path: str, steps: int) -> None:
    import torch

    from boltz_cp.distributed import shutdown_distributed
    from boltz_cp.models.boltz2 import Boltz2CP, ModelInputs
    from boltz_cp.models.checkpoint import _upstream_steering_defaults
    from boltz_cp.parity.reference import randomize_

    mesh, feats, layout = rank_setup(feats_path)
    model = randomize_(Boltz2CP(hparams()), torch.Generator().manual_seed(0)).float().eval()
    model.steering_args = {**_upstream_steering_defaults(), "contact_guidance_update": False}
    inputs = ModelInputs.cut(feats, layout)
    del feats

    def forward():
        torch.manual_seed(0)
        return model(inputs, layout, recycling_steps=0, num_sampling_steps=steps, diffusion_samples=1)

    report_forward(forward, mesh)
    shutdown_distributed()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[200])
    ap.add_argument("--sides", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sampling-steps", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("feats", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.feats, args.sampling_steps)
        return
    print(TABLE_HEADER)
    for n in args.tokens:
        with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
            feats = featurize_synthetic(n, Path(tmp), lean=True)
            base = None
            for side in args.sides:
                rows = launch(__file__, side, [str(feats), "--sampling-steps", str(args.sampling_steps)])
                row, base = table_row(n, side, rows, base)
                print(row, flush=True)


if __name__ == "__main__":
    main()
