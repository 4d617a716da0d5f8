"""Per-rank memory and CPU time of the full-width CP trunk, 1x1 vs 2x2 (vs 3x3).

    python benchmarks/bench_trunk.py [--tokens 128 256] [--sides 1 2] [--recycling-steps 0]

The trunk is `Boltz2Trunk` at Boltz-2's widths (the `full` checkpoint preset: token_s 384,
token_z 128, atom_s 128, msa_s 64, template_dim 64, atom encoder 3 layers) with few blocks
(pairformer 2, MSA module 1, template pairformer 1), random weights, float32. The input is a
synthetic two-chain protein of N tokens (one chain with an 8-row MSA, the other `msa: empty`),
featurized once by the parent; every rank then cuts its pieces (`TrunkInputs.cut`, not timed)
and runs one warm-up forward and one measured forward. Per rank: activation memory = peak of
heap bytes in use (glibc mallinfo2, sampled after every aten op) minus the bytes in use before
the forward (weights and inputs excluded); CPU seconds of the forward (process_time). Prints a
table and the ratios: per-rank memory / (1x1 memory / P), sum of CPU seconds / 1x1 CPU seconds.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from _common import TABLE_HEADER, launch, rank_setup, report_forward, table_row

AA = "ACDEFGHIKLMNPQRSTVWY"


def few_block_hparams() -> dict:
    """The `full` preset with 2 pairformer blocks, 1 MSA block, 1 template block."""
    import copy

    from boltz_cp.models.presets import PRESETS

    hp = copy.deepcopy(PRESETS["full"])
    hp["pairformer_args"]["num_blocks"] = 2
    hp["msa_args"]["msa_blocks"] = 1
    hp["template_args"]["template_blocks"] = 1
    return hp


def featurize_synthetic(n: int, folder: Path, lean: bool = False) -> Path:
    """Featurize a two-chain protein of n tokens (upstream's featurizer, or `featurize_lean`);
    save its tensors to folder/feats.pt."""
    import torch

    from boltz_cp.data.ccd import ensure_molecules
    from boltz_cp.data.features import featurize_lean
    from boltz_cp.data.inputs import ProcessedDirs, featurize, parse_target, write_processed

    rng = random.Random(n)
    a_len = n // 2
    seq_a = "".join(rng.choice(AA) for _ in range(a_len))
    seq_b = "".join(rng.choice(AA) for _ in range(n - a_len))
    rows = [seq_a] + ["".join(c if rng.random() > 0.2 else rng.choice(AA) for c in seq_a) for _ in range(7)]
    (folder / "A.a3m").write_text("".join(f">s{i}\n{r}\n" for i, r in enumerate(rows)))
    yaml = folder / "synthetic.yaml"
    yaml.write_text(f"version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: {seq_a}\n"
                    f"      msa: {folder / 'A.a3m'}\n  - protein:\n      id: B\n      sequence: {seq_b}\n"
                    f"      msa: empty\n")
    mol_dir = folder / "mols"
    ensure_molecules(mol_dir, [])
    dirs = ProcessedDirs(folder / "processed").make()
    record = write_processed(parse_target(yaml, mol_dir, 0), yaml, dirs)
    batch = (featurize_lean if lean else featurize)(record, dirs, mol_dir, seed=0)
    path = folder / "feats.pt"
    torch.save({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, path)
    return path


def _worker(feats_path: str, recycling_steps: int) -> None:
    import torch

    from boltz_cp.distributed import shutdown_distributed
    from boltz_cp.models.trunk import Boltz2Trunk, TrunkInputs
    from boltz_cp.parity.reference import randomize_

    mesh, feats, layout = rank_setup(feats_path)
    trunk = randomize_(Boltz2Trunk(few_block_hparams()), torch.Generator().manual_seed(0)).float().eval()
    inputs = TrunkInputs.cut(feats, layout)
    del feats
    report_forward(lambda: trunk(inputs, layout, recycling_steps), mesh)
    shutdown_distributed()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--sides", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--recycling-steps", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("feats", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.feats, args.recycling_steps)
        return
    print(TABLE_HEADER)
    for n in args.tokens:
        with tempfile.TemporaryDirectory(prefix="bench_trunk_") as tmp:
            feats = featurize_synthetic(n, Path(tmp))
            base = None
            for side in args.sides:
                rows = launch(__file__, side, [str(feats), "--recycling-steps", str(args.recycling_steps)])
                row, base = table_row(n, side, rows, base)
                print(row, flush=True)


if __name__ == "__main__":
    main()
