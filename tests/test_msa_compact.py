"""The compact host MSA against upstream's MSA features. Tier: no process group.

A 200-token input (two proteins with 256- and 200-row CSV MSAs sharing taxonomy keys, so rows
pair, with insertions, so deletions; a DNA chain with upstream's dummy MSA): every MSA feature
rebuilt from `featurize_lean`'s compact keys equals upstream's featurizer output exactly (dtype,
shape, bits), whole and as the column blocks and subsampled rows of each rank of a 2x2 mesh.
"""

from __future__ import annotations

import random

import pytest
import torch

from boltz_cp.data.ccd import ensure_molecules
from boltz_cp.data.features import featurize_lean
from boltz_cp.data.inputs import ProcessedDirs, featurize, parse_target, write_processed
from boltz_cp.data.msa_compact import MSA_COMPACT_KEYS, MSA_DENSE_KEYS, msa_features_block
from boltz_cp.distributed import TokenLayout
from boltz_cp.modules.trunkv2 import msa_column_blocks

AA = "ACDEFGHIKLMNPQRSTVWY"


def _msa_rows(rng: random.Random, query: str, rows: int, keys: list) -> str:
    lines = ["key,sequence", f",{query}"]
    for i in range(1, rows):
        out = []
        for c in query:
            if rng.random() < 0.04:
                out.append("".join(rng.choice(AA).lower() for _ in range(rng.randint(1, 5))))
            r = rng.random()
            out.append("-" if r < 0.1 else (rng.choice(AA) if r < 0.4 else c))
        lines.append(f"{keys[i] if keys[i] is not None else ''},{''.join(out)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def features(tmp_path_factory, boltz_cache):
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("msa_compact")
    a = "".join(rng.choice(AA) for _ in range(110))
    b = "".join(rng.choice(AA) for _ in range(70))
    keys_a = [None] + [(i if i % 3 == 0 else None) for i in range(1, 256)]
    keys_b = [None] + [(i if i % 2 == 0 else None) for i in range(1, 200)]
    (root / "A.csv").write_text(_msa_rows(rng, a, 256, keys_a))
    (root / "B.csv").write_text(_msa_rows(rng, b, 200, keys_b))
    yaml = root / "deep.yaml"
    yaml.write_text(f"version: 1\nsequences:\n  - protein:\n      id: A\n      sequence: {a}\n"
                    f"      msa: {root / 'A.csv'}\n  - protein:\n      id: B\n      sequence: {b}\n"
                    f"      msa: {root / 'B.csv'}\n  - dna:\n      id: C\n      sequence: ATGCATGCATGCATGCATGC\n")
    mol_dir = boltz_cache / "mols"
    ensure_molecules(mol_dir, [])
    dirs = ProcessedDirs(root / "processed").make()
    record = write_processed(parse_target(yaml, mol_dir), yaml, dirs)
    return featurize(record, dirs, mol_dir, seed=3), featurize_lean(record, dirs, mol_dir, seed=3)


def _same(a: torch.Tensor, b: torch.Tensor, key: str) -> None:
    assert (a.dtype, a.shape) == (b.dtype, b.shape), key
    assert torch.equal(a, b), key


def test_compact_msa_equals_upstream(features):
    up, lean = features
    assert not set(MSA_DENSE_KEYS) & set(lean) and set(MSA_COMPACT_KEYS) <= set(lean)
    assert up["msa"].shape == (1, 289, 200)  # the query row, paired rows, then unpaired rows
    assert bool(up["msa_paired"][0, 1:].any())
    # NOTE(parity): upstream's deletion table slices one chain's deletions cumulatively
    # (construct_paired_msa), so after the query row (none) every sequence reads none
    assert not bool(up["has_deletion"].any()) and lean["msa_deletions"].shape == (1, 0, 3)
    assert lean["msa_residues"].dtype == torch.uint8
    for key in ("profile", "deletion_mean"):
        _same(up[key], lean[key], key)
    whole = msa_features_block(lean, slice(0, 200))
    for key in MSA_DENSE_KEYS:
        _same(up[key], whole[key], key)


class _Mesh:
    def __init__(self, side: int, rank: int) -> None:
        self.rows = self.cols = side
        self.size, self.rank = side * side, rank
        self.coord = (rank // side, rank % side)
        self.token_multiple = self.size


def test_compact_msa_column_blocks_2x2(features):
    up, lean = features
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(289, generator=g)[:100]  # a subsample, as the MSA module draws it
    for rank in range(4):
        layout = TokenLayout(200, _Mesh(2, rank))
        dense, compact = msa_column_blocks(up, layout), msa_column_blocks(lean, layout)
        for key in MSA_DENSE_KEYS:
            assert compact[key].shape == dense[key].shape, key
            assert compact[key].device == dense[key].device, key
            _same(dense[key].index_select(1, keep), compact[key].index_select(1, keep), key)


def test_sparse_deletions_decode_like_upstream():
    """The deletion path upstream's inputs never reach (see the NOTE above), on a hand-made
    table: has_deletion / deletion_value / deletion_mean as upstream's formulas give them."""
    import numpy as np

    from boltz_cp.data.msa_compact import _profile_and_deletion_mean

    g = torch.Generator().manual_seed(1)
    s, n = 9, 7
    counts = torch.randint(0, 40, (n, s), generator=g) * (torch.rand(n, s, generator=g) < 0.4)
    tok, row = torch.nonzero(counts, as_tuple=True)
    dels = torch.stack([tok, row, counts[tok, row]], dim=1).int()
    compact = {"msa_residues": torch.zeros((s, n), dtype=torch.uint8), "msa_deletions": dels}
    feats = {"msa_residues": compact["msa_residues"][None], "msa_deletions": dels[None],
             "msa_paired_chain": torch.zeros((1, s, 1), dtype=torch.uint8), "asym_id": torch.zeros((1, n))}
    upstream = torch.tensor(counts.numpy(), dtype=torch.float).transpose(1, 0)
    value = np.pi / 2 * np.arctan(upstream / 3)
    rows = torch.tensor([4, 0, 7])
    block = msa_features_block(feats, slice(2, 9), rows)  # two padding columns
    _same(block["has_deletion"][0, :, :5], (upstream > 0)[rows][:, 2:], "has_deletion")
    _same(block["deletion_value"][0, :, :5], value[rows][:, 2:].contiguous(), "deletion_value")
    assert not block["has_deletion"][0, :, 5:].any() and not block["deletion_value"][0, :, 5:].any()
    _same(_profile_and_deletion_mean(compact, n)["deletion_mean"], value.mean(axis=0), "deletion_mean")
