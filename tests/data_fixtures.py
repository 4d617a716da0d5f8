"""Session fixtures for the data path and predict tests: an offline residue cache and a tiny
random checkpoint, each built once per test session (registered from conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def boltz_cache(tmp_path_factory) -> Path:
    """A cache dir holding the canonical residues built from biotite's CCD (no network)."""
    from boltz_cp.data.ccd import ensure_molecules

    cache = tmp_path_factory.mktemp("boltz_cache")
    ensure_molecules(cache / "mols", ["ATP"])
    return cache


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from boltz_cp.models.checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", preset="tiny", seed=0)


SMALL_YAML = """\
version: 1
sequences:
  - protein:
      id: A
      sequence: MKTAYIAKQRQ
      msa: {msa}
  - protein:
      id: B
      sequence: GSHMSLFD
      msa: empty
  - dna:
      id: C
      sequence: ATGC
  - ligand:
      id: D
      smiles: 'CC(=O)O'
"""

SMALL_A3M = ">q\nMKTAYIAKQRQ\n>h1\nMKTAYIAKERQ\n>h2\nMRTAYLAKQRQ\n"


@pytest.fixture
def small_input(tmp_path) -> Path:
    """A small multichain YAML (two proteins, one with an MSA, DNA, a SMILES ligand): 30 tokens."""
    msa = tmp_path / "A.a3m"
    msa.write_text(SMALL_A3M)
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_YAML.format(msa=msa))
    return path


# A synthetic two-chain protein: N = 404 tokens (n_padded 404 on 2x2), above every channel width
# of the tiny preset (the largest is atom_feature_dim 388), so only token dims trip a size guard.
GUARD_TOKENS = 404


@pytest.fixture(scope="session")
def guard_features(tmp_path_factory):
    """`featurize_lean` of the GUARD_TOKENS-token protein, itself run under the size guard (the
    featurizing process must not hold an N x N feature either); tensors only."""
    import torch

    from boltz_cp.data.ccd import ensure_molecules
    from boltz_cp.data.features import featurize_lean
    from boltz_cp.data.inputs import ProcessedDirs, parse_target, write_processed
    from boltz_cp.data.synthetic import synthetic_proteins_yaml
    from boltz_cp.parity.guards import FullSizeGuard

    folder = tmp_path_factory.mktemp("guard_input")
    mol_dir = folder / "mols"
    ensure_molecules(mol_dir, [])
    path = folder / "two_chains.yaml"
    path.write_text(synthetic_proteins_yaml(GUARD_TOKENS, chains=2))
    dirs = ProcessedDirs(folder / "processed").make()
    record = write_processed(parse_target(path, mol_dir, 0), path, dirs)
    guard = FullSizeGuard(GUARD_TOKENS)
    with guard:
        batch = featurize_lean(record, dirs, mol_dir, seed=0)
    assert guard.violations == [], f"featurization allocated full-size tensors: {guard.violations[:5]}"
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
