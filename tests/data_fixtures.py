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
