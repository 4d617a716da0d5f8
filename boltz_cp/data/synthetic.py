"""Synthetic inputs for tests and benchmarks: multichain proteins of a given size."""

from __future__ import annotations

import random

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def synthetic_proteins_yaml(n_tokens: int, chains: int = 4, seed: int = 0) -> str:
    """A Boltz YAML of `chains` protein chains (`msa: empty`) with n_tokens residues in all,
    split as evenly as possible; random sequences from `seed`."""
    rng = random.Random(seed)
    text = "version: 1\nsequences:\n"
    for c in range(chains):
        length = n_tokens // chains + (c < n_tokens % chains)
        seq = "".join(rng.choice(AMINO_ACIDS) for _ in range(length))
        text += f"  - protein:\n      id: {chr(65 + c)}\n      sequence: {seq}\n      msa: empty\n"
    return text
