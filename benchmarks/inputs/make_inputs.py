"""Write the benchmark inputs of this folder (SYNTHETIC sequences, see README.md).

    python benchmarks/inputs/make_inputs.py [--out benchmarks/inputs]

- pi4ka_complex_3605.yaml: the four-chain headline complex, chains of the real lengths
  (PI4KA 2,102 + TTC7A 858 + FAM126A 521 + EFR3A C-terminal segment 124 = 3,605 residues) with
  synthetic sequences; replace each `sequence:` with the real one to fold the real complex.
- synthetic_<N>.yaml for N in 1000 2000 5000 10000 20000 30000: multichain proteins of N
  residues (4 chains, 1 more per 2,500 residues past 10,000), from
  `boltz_cp.data.synthetic.synthetic_proteins_yaml`.
Every protein is `msa: empty` (single-sequence mode). The output is a deterministic function
of the seeds below, so rerunning rewrites the same files.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from boltz_cp.data.synthetic import AMINO_ACIDS, synthetic_proteins_yaml

SIZES = (1000, 2000, 5000, 10000, 20000, 30000)

# (chain id, protein, UniProt accession, residues of the construct, length)
HEADLINE = (
    ("A", "PI4KA (phosphatidylinositol 4-kinase alpha)", "P42356", "1-2102", 2102),
    ("B", "TTC7A (tetratricopeptide repeat protein 7A)", "Q9ULT0", "1-858", 858),
    ("C", "FAM126A (hyccin)", "Q9BYI3", "1-521", 521),
    ("D", "EFR3A, C-terminal segment", "Q14156", "698-821 (the last 124 residues)", 124),
)


def headline_yaml(seed: int = 3605) -> str:
    """The four-chain complex with synthetic sequences of the real chain lengths."""
    rng = random.Random(seed)
    total = sum(c[-1] for c in HEADLINE)
    text = (
        f"# Benchmark input: the PI4KA / TTC7A / FAM126A / EFR3A complex, {total:,} residues.\n"
        "# SYNTHETIC SEQUENCES: each chain has the real protein's length, but its sequence is\n"
        f"# random (random.Random({seed}), 20 amino acids): fine for timing and memory, meaningless\n"
        "# as a structure. To fold the real complex, replace each `sequence:` with the UniProt\n"
        "# sequence named above it (check the EFR3A construct you want), and give MSAs\n"
        "# (`msa: path/to/chain.a3m`) instead of `msa: empty`.\n"
        "# Written by benchmarks/inputs/make_inputs.py.\n"
        "version: 1\nsequences:\n"
    )
    for chain, name, accession, span, length in HEADLINE:
        seq = "".join(rng.choice(AMINO_ACIDS) for _ in range(length))
        text += (f"  # {name}: UniProt {accession}, residues {span}, {length} aa (SYNTHETIC sequence)\n"
                 f"  - protein:\n      id: {chain}\n      sequence: {seq}\n      msa: empty\n")
    return text


def chains_for(n: int) -> int:
    return 4 + max(0, math.ceil((n - 10000) / 2500))


def synthetic_yaml(n: int) -> str:
    head = (f"# SYNTHETIC benchmark input: {n:,} protein residues in {chains_for(n)} chains, random\n"
            f"# sequences (boltz_cp.data.synthetic.synthetic_proteins_yaml, seed {n}), msa: empty.\n"
            "# Written by benchmarks/inputs/make_inputs.py.\n")
    return head + synthetic_proteins_yaml(n, chains=chains_for(n), seed=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pi4ka_complex_3605.yaml").write_text(headline_yaml())
    for n in SIZES:
        (args.out / f"synthetic_{n}.yaml").write_text(synthetic_yaml(n))
    print(f"wrote {len(SIZES) + 1} inputs to {args.out}")


if __name__ == "__main__":
    main()
